"""privet as a library: run experiments and read their results from Python.

    import privet
    run = privet.simulate("experiments/configs/tiny.toml", overrides={"rounds": 3})
    run.summary["accuracy"], run.rounds[["round", "test_accuracy", "max_epsilon"]]
    model = run.model()                       # the trained torch module, rebuilt
    run.predict(frame)                        # new rows scored as the run's test rows were
    again = privet.load_run(run.path)         # any run directory, finished or not
    privet.resume(run.path)                   # a stopped run goes on after its last round

The experiment itself runs as `privet simulate` does, in a child process (Flower's
simulation runtime and its worker processes are left behind in it, and a notebook's kernel
keeps running if the run fails); this process reads the run directory it wrote.
"""

from privet.api import PrivetError, Run, compare, load_run, resume, simulate

__all__ = ["PrivetError", "Run", "compare", "load_run", "resume", "simulate"]

"""The Python API behind `import privet` (see the package docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from privet.common.config import PROJECT_DIR


class PrivetError(RuntimeError):
    """A privet command failed: the message is its one-line error (bad input, a failed
    run); `code` is its exit code, `output` all it printed."""

    def __init__(self, message: str, code: int, output: str) -> None:
        super().__init__(message)
        self.code, self.output = code, output


@dataclass(frozen=True)
class Run:
    """One run directory, read as it is now (a running run shows its finished rounds)."""
    path: Path

    @property
    def summary(self) -> dict:
        """summary.json: status, accuracy, scores, privacy (per client ε and its history)."""
        return json.loads((self.path / "summary.json").read_text(encoding="utf-8"))

    @property
    def rounds(self):
        """rounds.csv as a pandas DataFrame: one row per finished round (test accuracy,
        loss, balanced accuracy, macro F1, AUC, majority baseline, max ε, user ε, ...;
        regression: test RMSE, MAE, R² and the baseline's instead of the accuracies)."""
        return self._csv("rounds.csv")

    @property
    def clients(self):
        """metrics.csv as a pandas DataFrame: one row per round and client (status,
        examples, training loss and accuracy, ε so far, steps, σ, q, seconds)."""
        return self._csv("metrics.csv")

    @property
    def config(self):
        """The run's resolved ExperimentConfig (from its config.toml)."""
        from privet.common.config import load_config
        return load_config(self.path / "config.toml")

    def model(self):
        """The latest global model as a torch nn.Module on the CPU in eval mode, rebuilt from
        the run's `train.model` (a built-in or the user's factory, which must be importable)
        with the input shape, outputs and feature layout in model.json, and loaded with
        model.pt. It maps a batch of encoded rows (B, *input_shape) float32 to logits (B,
        classes); regression: (B, 1), the scaled target z (y = center + half·z with
        summary["target"]). The run directory suffices; a run from before model.json existed
        is rebuilt from its data, which must then still be where its config says. Raises
        FileNotFoundError before the first round is saved."""
        from privet.common import saved_model

        cfg = self.config
        return saved_model.build(cfg, saved_model.read(self.path, cfg), self.path)

    def predict(self, rows, *, labels=None):
        """Score new rows as `privet predict` does: a pandas DataFrame for a table (the run's
        feature columns, by name: text read as the run's files were, number formats
        included, or numeric dtypes taken as numbers; any other column ignored, the label
        too), cleaned and encoded as the run's clients encoded theirs (the shared transform
        saved in model.json: missing markers, the columns' number formats, values outside
        a vocabulary as `other`); for an image or array run, a numpy array or torch tensor
        (N, *input_shape) (or one example), float, images in [0, 1].

        Returns a pandas DataFrame with the input's index (arrays: 0..N-1): `prediction`
        (the class name; regression: the prediction in the label's units) and, classifying,
        `prob_<class>` per class (softmax, float64). `attrs["scores"]`: with a label column
        in the frame (or `labels` given for arrays: class indices or names), accuracy
        (regression: rmse, mae, r2 in the label's units) over the labelled rows and their
        count, else None; `attrs["notes"]`: what was done to the rows (non-finite numbers
        made missing, values outside a vocabulary, unlabelled rows).

        Raises PrivetError (code 2) with one line: a missing column, a cell that is not a
        number, rows of the wrong shape, a run whose rows were encoded per client (no
        shared transform: re-run with preprocess.fit = "federated"), a run without model.pt.
        """
        from privet.common import predict as scoring
        from privet.common.data.tables import DataError

        try:
            scorer = scoring.Predictor(self.path)
            scored = scorer.score_python(rows, labels)
        except (scoring.PredictError, DataError) as error:
            raise PrivetError(str(error), 2, "") from None
        table = scored.table
        table.attrs["scores"] = scored.scores
        table.attrs["notes"] = list(scored.notes)
        return table

    def _csv(self, name: str):
        import pandas as pd
        return pd.read_csv(self.path / name)


def load_run(path: str | os.PathLike) -> Run:
    """A run directory privet wrote (raises FileNotFoundError when it holds no summary)."""
    run = Run(Path(path).resolve())
    if not (run.path / "summary.json").is_file():
        raise FileNotFoundError(f"{run.path}: no summary.json: not a privet run directory")
    return run


def _import_path(what: str, thing: str | Callable) -> str:
    """`thing`'s `package.module:name` (a string is taken as one already); raises PrivetError
    for something the clients or the server could not import by name."""
    if isinstance(thing, str):
        return thing
    module, name = getattr(thing, "__module__", ""), getattr(thing, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise PrivetError(f"{what}: pass one defined in an importable module (or its "
                          "'package.module:name' path): the run imports it by name", 2, "")
    return f"{module}:{name}"


def _plain(key: str, value: Any) -> Any:
    """`value` as the TOML writer takes it: numpy scalars as Python numbers, table keys as
    strings (client ids), nested alike. Raises PrivetError for None (TOML has no null)."""
    if value is None:
        raise PrivetError(f"overrides: {key} = None: TOML has no null; leave the key out for "
                          "its default", 2, "")
    if isinstance(value, Mapping):
        return {str(k): _plain(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(key, v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy, torch scalars
        return value.item()
    return value


def _settings(overrides: Mapping[str, Any] | None) -> list[str]:
    """--set arguments: values as TOML (strings quoted, tables inline)."""
    from privet.common.config import _inline  # the config's own TOML writer: one dialect

    return [f"{key}={_inline(_plain(key, value))}" for key, value in (overrides or {}).items()]


def _run_cli(args: list[str], verbose: bool | None) -> str:
    if verbose is None:
        verbose = sys.stdout.isatty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.getcwd(), str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run([sys.executable, "-m", "privet.experiments.cli", *args], env=env,
                          stdout=None if verbose else subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    output = proc.stdout or ""
    if proc.returncode not in (0, 3):  # 3: finished, some clients failed (named in it)
        errors = [line for line in output.splitlines() if "privet: error" in line]
        raise PrivetError(errors[-1] if errors else f"privet {args[0]} exited with "
                          f"{proc.returncode}", proc.returncode, output)
    return output


def simulate(config: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
             *, out: str | os.PathLike | None = None, model: str | Callable | None = None,
             dataset: str | Callable | None = None, strategy: str | type | None = None,
             pause_after: int = 0, verbose: bool | None = None) -> Run:
    """Run one experiment as `privet simulate` does and return its Run.

    config: an experiment TOML (default: the default experiment); overrides: keys as in the
    file, dotted ({"rounds": 5, "privacy.epsilon": 1}); model: `train.model`, as
    "package.module:function" or the factory itself (it must live in an importable module);
    dataset: `data.dataset` (a built-in name, or a loader as path or itself); strategy:
    `strategy.name` (a built-in name, or a Flower FedAvg subclass as path or itself);
    out: the run directory (default: a new folder under the system's temp directory);
    pause_after: stop after that round with status "paused" (`resume` continues it);
    verbose: show privet's console output (default: on a terminal yes, in a notebook or a
    pipe no: captured, and in PrivetError.output if the run fails).
    Raises PrivetError with privet's one-line error when the run is refused or fails."""
    settings = dict(overrides or {})
    for key, given in (("train.model", model), ("data.dataset", dataset),
                       ("strategy.name", strategy)):
        if given is not None:
            settings[key] = _import_path(key, given)
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="privet-")) / "run"
    args = ["simulate", "--out", str(out)]
    if config is not None:
        args += ["--config", str(config)]
    for setting in _settings(settings):
        args += ["--set", setting]
    if pause_after:
        args += ["--pause-after", str(int(pause_after))]
    _run_cli(args, verbose)
    return load_run(out)


def resume(path: str | os.PathLike, *, pause_after: int = 0, verbose: bool | None = None
           ) -> Run:
    """Continue a stopped run (paused, interrupted, killed) after its last finished round,
    as `privet simulate --resume` does, and return its Run. Raises PrivetError with privet's
    one line when there is nothing to resume (finished, no checkpoint)."""
    args = ["simulate", "--resume", str(path)]
    if pause_after:
        args += ["--pause-after", str(int(pause_after))]
    _run_cli(args, verbose)
    return load_run(path)


def compare(config: str | os.PathLike | None = None, *, epsilons=(0.5, 1, 2, 4, 8, "inf"),
            seeds: int = 3, overrides: Mapping[str, Any] | None = None,
            out: str | os.PathLike | None = None, verbose: bool | None = None):
    """Sweep privacy budgets as `privet compare` does; returns its compare.csv as a pandas
    DataFrame (one row per ε and seed: accuracy, ε spent, run directory). Raises PrivetError
    on failure."""
    import pandas as pd

    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="privet-compare-"))
    args = ["compare", "--out", str(out), "--seeds", str(seeds),
            "--epsilons", ",".join(str(e) for e in epsilons)]
    if config is not None:
        args += ["--config", str(config)]
    for setting in _settings(overrides):
        args += ["--set", setting]
    _run_cli(args, verbose)
    return pd.read_csv(out / "compare.csv")

"""privet's process-pool backend for Flower's simulation runtime (experiments/process_backend)."""

import threading

import pytest
from flwr.clientapp.client_app import ClientAppException

from privet.experiments.process_backend import CONFIG_KEY, ProcessPoolBackend
from privet.experiments.simulation import backend_config


@pytest.fixture
def backend():
    config = backend_config(2)
    config[CONFIG_KEY] = {"workers": 2, "app": "pool_app:app"}
    # what Flower's run_simulation does to a backend config before the backend sees it
    from flwr.simulation.run_simulation import _replace_keys

    backend = ProcessPoolBackend(_replace_keys(config, match="-", target="_"))
    backend.build(lambda: None)
    yield backend
    backend.terminate()


def test_messages_run_side_by_side_in_separate_workers(backend):
    assert backend.num_workers == 2
    replies = {}

    def send(name):
        replies[name] = backend.process_message(name, {})

    threads = [threading.Thread(target=send, args=(f"m{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {name: reply for name, (reply, _) in replies.items()} == {"m0": "m0 done",
                                                                       "m1": "m1 done"}
    pids = {context["pid"] for _, context in replies.values()}
    assert len(pids) == 2, "both workers should have taken a message"
    # side by side: each began before the other ended (an order, not a duration: it holds
    # however loaded the machine is)
    (a_start, a_end), (b_start, b_end) = (c["ran"] for _, c in replies.values())
    assert a_start < b_end and b_start < a_end, "the two messages ran one after the other"


def test_a_failing_client_is_reported_as_its_error(backend):
    with pytest.raises(ClientAppException, match="ValueError: the client says no"):
        backend.process_message("fail", {})
    assert backend.process_message("again", {})[0] == "again done"  # the pool survives


def test_a_worker_that_dies_fails_its_message_and_is_replaced(backend):
    with pytest.raises(ClientAppException, match="exit code 3"):
        backend.process_message("die", {})
    replies = [backend.process_message(f"m{i}", {}) for i in range(2)]
    assert [reply for reply, _ in replies] == ["m0 done", "m1 done"]
    assert backend.num_workers == 2 and backend.is_worker_idle()


def test_a_function_runs_in_a_worker_for_the_driver(backend):
    """What common.plots.draw uses: a picklable call, its result or its error."""
    import os

    assert backend.submit(os.getpid).result() != os.getpid()
    with pytest.raises(ZeroDivisionError):  # the function's own error, as it was
        backend.submit(divmod, 1, 0).result()
    backend.terminate()  # a stopped pool refuses, as a shut-down Executor does
    with pytest.raises(RuntimeError, match="stopped"):
        backend.submit(os.getpid)


def test_a_client_process_trains_on_one_torch_thread():
    """Workers × torch threads ≤ cores: the pool has one worker per core, each one thread."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PRIVET_TORCH_THREADS"}
    code = "import privet.clients.app, torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == "1"


def test_a_stopped_pool_runs_nothing_and_replaces_no_worker(backend):
    """After Flower terminates the backend (the run is ending: Ctrl-C, SIGTERM), a message
    fails at once instead of running in a worker started anew."""
    backend.terminate()
    with pytest.raises(ClientAppException, match="stopped"):
        backend.process_message("late", {})
    assert not backend._processes

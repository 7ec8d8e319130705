"""The warm ClientApp launcher (experiments/launcher.py)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import PROJECT_DIR

from privet.experiments import launcher as L

# --- pure logic -----------------------------------------------------------------------------


def test_cli_mirrors_flwr_clientapp_flags():
    args = L.parse_args(["--insecure"])
    assert args.runtime_api_address == "127.0.0.1:9094" and args.insecure
    assert args.preload == list(L.DEFAULT_PRELOAD) and args.max_wait_time == 300
    # the pre-1.41 name of the option still works
    args = L.parse_args(["--clientappio-api-address", "10.0.0.2:9100", "--root-certificates",
                         "ca.pem", "--preload", "numpy", "--max-wait-time", "0"])
    assert args.runtime_api_address == "10.0.0.2:9100" and not args.insecure
    assert args.root_certificates == "ca.pem" and args.preload == ["numpy"]
    assert L.parse_args(["--insecure", "--no-preload"]).preload == []


@pytest.mark.parametrize("argv", [
    ["--insecure", "--root-certificates", "ca.pem"],
    ["--insecure", "--poll-interval", "0"],
    ["--insecure", "--max-children", "0"],
    ["--insecure", "--max-wait-time", "-1"],
    ["--insecure", "--preload", "torch", "--no-preload"],
])
def test_cli_rejects_contradictions(argv):
    with pytest.raises(SystemExit):
        L.parse_args(argv)


def test_backoff_doubles_up_to_the_cap_and_resets():
    backoff = L.Backoff(initial=0.5, factor=2, maximum=5)
    assert [backoff.next() for _ in range(6)] == [0.5, 1, 2, 4, 5, 5]
    backoff.reset()
    assert backoff.next() == 0.5
    with pytest.raises(ValueError):
        L.Backoff(initial=2, maximum=1)


def test_gives_up_only_after_max_wait_time_of_continuous_failure():
    assert not L.gave_up(None, 100.0, 10)          # never failed
    assert not L.gave_up(95.0, 100.0, 10)          # down 5 s of 10
    assert L.gave_up(85.0, 100.0, 10)              # down 15 s
    assert not L.gave_up(0.0, 1e9, 0)              # 0 = retry forever


def test_exit_status_of_waitpid():
    assert L.exit_status(3 << 8) == 3
    assert L.exit_status(signal.SIGKILL) == 128 + signal.SIGKILL


def test_round_latencies_are_differences_of_cumulative_elapsed(tmp_path):
    path = tmp_path / "rounds.csv"
    path.write_text("round,elapsed_seconds\n1,6.5\n2,13.0\n3,19.25\n")
    assert L.round_latencies(path) == [6.5, 6.5, 6.25]


def test_stale_preload_is_detected_against_the_fab(tmp_path):
    project, fab = tmp_path / "project", tmp_path / "fab"
    for root in (project, fab):
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / "__init__.py").write_text("")
        (root / "pkg" / "app.py").write_text("x = 1\n")
    modules = {"pkg": types.SimpleNamespace(__file__=str(project / "pkg" / "__init__.py")),
               "pkg.app": types.SimpleNamespace(__file__=str(project / "pkg" / "app.py")),
               "json": json}  # not under the project: ignored
    preloaded = L.project_sources(project, modules)
    assert set(preloaded) == {"pkg", "pkg.app"}
    assert L.stale_sources(preloaded, fab) == []
    (fab / "pkg" / "app.py").write_text("x = 2\n")
    assert L.stale_sources(preloaded, fab) == ["pkg.app"]
    (fab / "pkg" / "__init__.py").unlink()
    assert L.stale_sources(preloaded, fab) == ["pkg", "pkg.app"]


@pytest.mark.parametrize("same", [True, False])
def test_a_child_drops_preloaded_modules_that_the_fab_changed(tmp_path, monkeypatch, same):
    """Flower's loader reuses sys.modules: a stale preload must not shadow the FAB's code."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    app_dir = tmp_path / "apps" / f"pub.demo.1.0.{'ab' * 4}"  # Flower's get_project_dir
    (app_dir / "demo_pkg").mkdir(parents=True)
    (app_dir / "demo_pkg" / "app.py").write_text("x = 1\n" if same else "x = 2\n")
    monkeypatch.setitem(sys.modules, "demo_pkg.app", types.ModuleType("demo_pkg.app"))
    launcher = L.Launcher(L.parse_args(["--insecure", "--no-preload"]))
    digest = hashlib.sha256(b"x = 1\n").hexdigest()
    launcher.preloaded = {"demo_pkg.app": ("demo_pkg/app.py", digest)}
    loaded = []
    runtime = types.SimpleNamespace(get_load_client_app_fn=lambda *a, **k: (
        lambda *fab: loaded.append(fab) or "app"))
    launcher._guard_stale_preload(runtime)
    load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert load("pub/demo", "1.0", "ab" * 32) == "app" and loaded == [("pub/demo", "1.0",
                                                                       "ab" * 32)]
    assert ("demo_pkg.app" in sys.modules) == same


# --- the process, without a SuperNode ---------------------------------------------------------

@pytest.fixture
def spawn(tmp_path):
    """Start processes in their own session; kill every group afterwards, also on failure."""
    procs = []

    def start(*argv: str) -> tuple[subprocess.Popen, Path]:
        output = tmp_path / f"launcher{len(procs)}.log"
        with open(output, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "privet.experiments.launcher", *argv],
                                    cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(proc)
        return proc, output

    yield start
    for proc in procs:
        L._kill_group(proc, grace=5)


def test_exits_1_when_the_supernode_stays_away(spawn):
    started = time.monotonic()
    proc, output = spawn("--insecure", "--no-preload", "--runtime-api-address",
                         f"127.0.0.1:{L.free_port()}", "--max-wait-time", "2")
    proc.wait(timeout=60)
    out = output.read_text()
    assert proc.returncode == 1, out
    assert "retrying in 0.5 s" in out and "retrying in 1.0 s" in out  # backs off
    assert "unreachable for" in out and time.monotonic() - started < 60


def test_sigterm_stops_it_cleanly(spawn):
    proc, output = spawn("--insecure", "--no-preload", "--runtime-api-address",
                         f"127.0.0.1:{L.free_port()}", "--max-wait-time", "0")
    L.wait_for(lambda: "polling" in output.read_text(), 60, "the launcher", [("it", proc)])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    out = output.read_text()
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_polls_a_real_supernode_and_signs_acquire_task_with_its_secret(spawn, tmp_path):
    """A SuperNode serves its Runtime API before it reaches a SuperLink, so none is needed."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    api = L.free_port()
    bin_dir = Path(sys.executable).parent
    with open(tmp_path / "supernode.log", "w") as out:
        supernode = subprocess.Popen(
            [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
             f"127.0.0.1:{L.free_port()}", "--isolation", "process", "--host", "127.0.0.1",
             "--port", str(api), "--superexec-auth-secret-file", str(secret)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "FLWR_HOME": str(tmp_path / "home")})
    try:
        L.wait_for(lambda: L._listening(api), 60, "the Runtime API", [("supernode", supernode)])
        common = ("--insecure", "--no-preload", "--runtime-api-address", f"127.0.0.1:{api}")
        unsigned, unsigned_log = spawn(*common)
        signed, signed_log = spawn(*common, "--superexec-auth-secret-file", str(secret))
        unsigned.wait(timeout=60)
        assert unsigned.returncode == 1 and "refused AcquireTask (401)" in unsigned_log.read_text()
        L.wait_for(lambda: "polling" in signed_log.read_text(), 60, "polling", [("l", signed)])
        time.sleep(1.5)  # several empty AcquireTask replies
        signed.send_signal(signal.SIGTERM)
        signed.wait(timeout=30)
        text = signed_log.read_text()
        assert signed.returncode == 0 and "unavailable" not in text and "refused" not in text
    finally:
        L._kill_group(supernode, grace=5)


def test_shutdown_terminates_running_children():
    """A forked child (stuck retrying an absent Runtime API) is stopped and reaped."""
    launcher = L.Launcher(L.parse_args(["--insecure", "--no-preload", "--shutdown-grace", "20",
                                        "--runtime-api-address",
                                        f"127.0.0.1:{L.free_port()}"]))
    launcher.fork("0" * 64, task_id=1, run_id=1)
    (pid,) = launcher.children
    try:
        time.sleep(1.0)  # let it reach run_clientapp (and Flower's signal handlers)
        started = time.monotonic()
        launcher.shutdown()
        assert launcher.children == {} and time.monotonic() - started < 20
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped
    finally:
        if launcher.children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# --- end to end -----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_supernodes_in_process_isolation_run_on_warm_launchers(tmp_path):
    rounds = 2
    with L.LocalFederation(tmp_path / "fed", nodes=2, warm=True, rows=500) as fed:
        fed.run({"num-clients": 2, "clients-per-round": 2, "rounds": rounds},
                tmp_path / "run", timeout=600)
        groups = [proc.pid for _, proc in fed.procs]
        logs = [fed.log_text(f"launcher{i}") for i in range(2)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == rounds
    assert len(L.round_latencies(tmp_path / "run" / "rounds.csv")) == rounds
    for text in logs:
        # torch and opacus were imported once, by the parent; every message got a fork
        assert text.count("warm: imported torch, opacus") == 1, text
        assert text.count("forked child pid") >= rounds, text
        assert text.count("exited 0 after") >= rounds, text
        assert "Traceback" not in text
    for pgid in groups:  # nothing the test started is left running
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)

"""Warm ClientApp launcher: a SuperNode that does not pay torch/opacus imports per message.

How Flower 1.41 runs a ClientApp
--------------------------------
For every message it pulls from the SuperLink, a SuperNode creates a *task* in its state
(status PENDING) and serves a Runtime HTTP API (`--host`/`--port`, default 127.0.0.1:9094).
An executor polls that API with `AcquireTask(supported_task_types=["flwr-clientapp"])`; the
reply carries the task and a one-time token. The executor then starts a process that, with
that token, pulls the message, context, run and FAB (`PullTaskInput`, `PullMessages`), runs
the ClientApp, pushes the reply (`PushMessages`, `PushObject`) and the final context
(`PushTaskOutput`), then exits. With `--isolation subprocess` (the default) the SuperNode starts
`flower-superexec`, which launches one fresh `flwr-clientapp --token ...` per task, so every
message pays the Python, torch, opacus and app imports again. With `--isolation process` the
SuperNode starts no executor: whoever polls `AcquireTask` runs the tasks.

This module is such an executor. It imports torch, opacus, numpy, pandas, scikit-learn, Flower
and this project's ClientApp once, then for each acquired task `os.fork()`s a child that runs
Flower's own `flwr.supernode.runtime.run_clientapp.run_clientapp(token=...)` (the body of
`flwr-clientapp`) for exactly that task and exits. The parent reaps children and keeps polling.

    flower-supernode --insecure --superlink 127.0.0.1:8000 --isolation process \\
        --host 127.0.0.1 --port 9094 --node-config 'partition-id=0 data-path="/data/mine.csv"'
    python -m privet.experiments.launcher --runtime-api-address 127.0.0.1:9094 --insecure

CLI (`python -m privet.experiments.launcher`, or `privet deploy launcher` with the same flags):

    --runtime-api-address HOST:PORT   the SuperNode's Runtime API (alias:
                                      --clientappio-api-address); default 127.0.0.1:9094
    --insecure | --root-certificates CA.pem
                                      plain HTTP, or HTTPS verified against this CA (the
                                      SuperNode's --ssl-ca-certfile); neither = HTTPS with the
                                      system's CAs, as for flwr-clientapp
    --superexec-auth-secret-file F    the SuperNode's SuperExec shared secret, if it has one
    --poll-interval S                 seconds between AcquireTask polls when idle (0.2)
    --max-children N                  tasks run at once; at the limit no task is claimed (4)
    --max-wait-time S                 exit 1 once the Runtime API has failed for this long
                                      in a row (counted from start if it never answered;
                                      300; 0 = retry forever); retries back off 0.5 s -> 10 s
    --parent-pid PID                  exit when this process ends (e.g. the SuperNode)
    --preload MODULE                  module to import once in the parent (repeatable;
                                      replaces the default list: torch, opacus, numpy, pandas,
                                      sklearn, Flower's clientapp runtime, clients.app);
                                      one that fails to import is skipped with a warning
    --no-preload                      import nothing ahead (a cold fork; for comparison)
    --shutdown-grace S                on SIGTERM/SIGINT, seconds children get before SIGKILL (10)
    -v / --verbose                    debug logging
    --require-level sample|user|both, --max-epsilon E, --min-noise S, --noise-source secure,
    --trusted-fab-hash SHA256 (repeatable), --any-app
                                      the node's own policy (privet.experiments.node_policy):
                                      each task's input is pulled and checked before any of
                                      the app's code is loaded; a refused task gets an error
                                      reply naming the rule and one log line

    python -m privet.experiments.launcher --bench [--rounds 3] [--rows 2000] [--repeat 1]
                                   [--workdir DIR] [--timeout 900]
        starts a SuperLink and 2 SuperNodes on loopback and runs `flwr run` with the default
        subprocess isolation, then with process isolation plus one launcher per node (repeated
        alternately), and prints the per-round latency (rounds.csv elapsed_seconds) of each.

Fork safety: the parent runs no torch op (so neither the OpenMP nor the intra-op pool exists
when it forks; `clients.app` only sets the thread count), opens no gRPC channel (Flower 1.41's
Runtime API is HTTP; its httpx client in the parent is never touched by a child, and children
leave with `os._exit`, so nothing of the parent's is closed or flushed twice), and registers no
Flower exit handlers (children would inherit and run them). Each child builds its own HTTP
client, heartbeat thread and signal handlers inside `run_clientapp`.

Stale code: a preloaded `clients.app` would otherwise shadow the code in the FAB that `flwr run`
shipped (Flower's loader reuses `sys.modules`). The parent hashes the source of every project
module it preloads; a child whose FAB holds different bytes drops them from `sys.modules`, so
that task imports the FAB's code (torch and opacus stay warm).

Not supported: runtime dependency installation (a forked interpreter cannot switch to a new
environment), and task types other than ClientApp (use `flower-superexec` for those).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from privet.patches import STOCK_ENV, stock

log = logging.getLogger("privet.launcher")

DEFAULT_RUNTIME_API_ADDRESS = "127.0.0.1:9094"
DEFAULT_PRELOAD = ("torch", "opacus", "numpy", "pandas", "sklearn",
                   "flwr.supernode.runtime.run_clientapp", "privet.clients.app")
PROJECT_DIR = Path(__file__).resolve().parents[2]
# Only AcquireTask is signed with the SuperExec secret; children authenticate with the token.
SUPEREXEC_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
# a task refused by the node's policy: the error reply's code and the child's exit status
POLICY_ERROR_CODE = 403
POLICY_EXIT_CODE = 3


# --- pure helpers ---------------------------------------------------------------------------

class Backoff:
    """Exponential retry delays: initial, initial*factor, ... capped at maximum."""

    def __init__(self, initial: float = 0.5, factor: float = 2.0, maximum: float = 10.0):
        if initial <= 0 or factor < 1 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        self.initial, self.factor, self.maximum = initial, factor, maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


def gave_up(down_since: float | None, now: float, max_wait_time: float) -> bool:
    """True when the API has been unreachable for longer than max_wait_time (0 = never)."""
    return bool(max_wait_time) and down_since is not None and now - down_since > max_wait_time


def exit_status(wait_status: int) -> int:
    """waitpid status -> shell-style code (128 + signal for a killed child)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def round_latencies(rounds_csv: Path) -> list[float]:
    """Seconds each round took: differences of rounds.csv's cumulative elapsed_seconds."""
    with open(rounds_csv, newline="") as file:
        elapsed = [float(row["elapsed_seconds"]) for row in csv.DictReader(file)]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project_sources(project_dir: Path, modules: dict | None = None) -> dict[str, tuple[str, str]]:
    """{module: (path relative to project_dir, sha256)} for imported modules of this project,
    i.e. with a source file under project_dir and not inside the interpreter's environment."""
    project_dir = project_dir.resolve()
    env = Path(sys.prefix).resolve()
    found = {}
    for name, module in list((sys.modules if modules is None else modules).items()):
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        path = Path(file).resolve()
        if path.is_relative_to(project_dir) and not path.is_relative_to(env) and path.is_file():
            found[name] = (str(path.relative_to(project_dir)), _sha256(path))
    return found


def stale_sources(preloaded: dict[str, tuple[str, str]], app_dir: Path) -> list[str]:
    """Preloaded modules whose source differs from (or is missing in) the installed FAB."""
    stale = []
    for name, (relative, digest) in preloaded.items():
        candidate = app_dir / relative
        if not candidate.is_file() or _sha256(candidate) != digest:
            stale.append(name)
    return sorted(stale)


# --- CLI ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m privet.experiments.launcher",
        description="Run ClientApp tasks of a `flower-supernode --isolation process` in "
                    "forked children of one warm process (see the module docstring).")
    parser.add_argument("--runtime-api-address", "--clientappio-api-address",
                        dest="runtime_api_address", default=DEFAULT_RUNTIME_API_ADDRESS,
                        help="the SuperNode's Runtime API, HOST:PORT (its --host/--port)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS")
    tls.add_argument("--root-certificates", metavar="CA_PEM",
                     help="CA that signed the Runtime API's certificate")
    parser.add_argument("--superexec-auth-secret-file", metavar="FILE",
                        help="the SuperNode's SuperExec shared secret")
    parser.add_argument("--poll-interval", type=float, default=0.2, metavar="S")
    parser.add_argument("--max-children", type=int, default=4, metavar="N")
    parser.add_argument("--max-wait-time", type=float, default=300.0, metavar="S",
                        help="exit after the API is unreachable this long (0 = never)")
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID")
    parser.add_argument("--preload", action="append", metavar="MODULE",
                        help=f"import once in the parent (default: {', '.join(DEFAULT_PRELOAD)})")
    parser.add_argument("--no-preload", action="store_true")
    parser.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S")
    parser.add_argument("-v", "--verbose", action="store_true")
    policy = parser.add_argument_group(
        "node policy (privet.experiments.node_policy): refuse runs that break it")
    policy.add_argument("--require-level", choices=("sample", "user", "both"), default="",
                        help="privacy.level must include this level of DP")
    policy.add_argument("--max-epsilon", type=float, default=None, metavar="E",
                        help="every ε charged to this node's rows is finite and <= E")
    policy.add_argument("--min-noise", type=float, default=None, metavar="SIGMA",
                        help="sample-level DP on; the ClientApp checks its planned σ >= SIGMA "
                             "(node-config min-noise)")
    policy.add_argument("--noise-source", choices=("secure",), default="",
                        help="refuse privacy.noise-source = \"seeded\"")
    policy.add_argument("--trusted-fab-hash", action="append", default=[], metavar="SHA256",
                        help="run only FABs with this sha256 (repeatable); default with any "
                             "policy flag: only FABs whose code equals this node's privet")
    policy.add_argument("--any-app", action="store_true",
                        help="do not check the FAB's code (the policy then rests on the app "
                             "honouring its config)")
    bench = parser.add_argument_group("benchmark (--bench)")
    bench.add_argument("--bench", action="store_true",
                       help="measure per-round latency: subprocess isolation vs this launcher")
    bench.add_argument("--rounds", type=int, default=3)
    bench.add_argument("--rows", type=int, default=2000, help="Adult rows per node")
    bench.add_argument("--workdir", type=Path, default=None)
    bench.add_argument("--repeat", type=int, default=1, help="cold/warm pairs, alternated")
    bench.add_argument("--timeout", type=float, default=900.0, help="seconds per `flwr run`")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.poll_interval <= 0 or args.max_children < 1 or args.max_wait_time < 0:
        parser.error("--poll-interval > 0, --max-children >= 1, --max-wait-time >= 0")
    if args.no_preload and args.preload:
        parser.error("--preload and --no-preload exclude each other")
    args.preload = [] if args.no_preload else (args.preload or list(DEFAULT_PRELOAD))
    from privet.experiments.node_policy import NodePolicy
    try:
        args.policy = NodePolicy(
            require_level=args.require_level, max_epsilon=args.max_epsilon,
            min_noise=args.min_noise, noise_source=args.noise_source,
            trusted_fab_hashes=tuple(h.lower() for h in args.trusted_fab_hash),
            any_app=args.any_app)
    except ValueError as err:
        parser.error(str(err))
    return args


# --- the launcher ---------------------------------------------------------------------------

@dataclass
class Child:
    task_id: int
    run_id: int
    started: float


@dataclass
class Launcher:
    args: argparse.Namespace
    children: dict[int, Child] = field(default_factory=dict)
    preloaded: dict[str, tuple[str, str]] = field(default_factory=dict)
    stopping: bool = False
    certificates: bytes | None = None

    def warm_up(self) -> None:
        """Import the heavy modules once; every forked child inherits them."""
        import importlib
        root = logging.getLogger()
        before, known = list(root.handlers), set(sys.modules)
        started, imported = time.perf_counter(), []
        for name in self.args.preload:
            try:
                importlib.import_module(name)
                imported.append(name)
            except ImportError as err:  # e.g. the app is not installed here: tasks import it
                log.warning("could not preload %s (%s); each task imports it", name, err)
        seconds = time.perf_counter() - started
        # Opacus calls logging.basicConfig() on import; clients/train.py drops that handler
        # when it imports opacus itself, so drop it here too or children print lines twice.
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        self.preloaded = project_sources(
            PROJECT_DIR, {n: m for n, m in sys.modules.items() if n not in known})
        if self.preloaded and stock():  # no loader guard on stock Flower: forget them
            for name in self.preloaded:
                sys.modules.pop(name, None)
            log.info("stock libraries (%s): the project's own modules are imported by each "
                     "task, not preloaded", STOCK_ENV)
            self.preloaded = {}
        log.info("warm: imported %s in %.2f s (%d project modules, %d Python threads)",
                 ", ".join(imported) or "nothing", seconds, len(self.preloaded),
                 threading.active_count())

    def _client(self):
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.args.superexec_auth_secret_file:
            from flwr.supercore.auth import load_superexec_auth_secret
            secret = load_superexec_auth_secret(self.args.superexec_auth_secret_file)
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=SUPEREXEC_AUTH_METHODS))
        # No retry invoker: Flower's retries forever and would hide an absent SuperNode;
        # the serve loop backs off and gives up on its own.
        return RuntimeHttpClient.from_server_address(
            server_address=self.args.runtime_api_address, insecure=self.args.insecure,
            root_certificates=self.certificates, interceptors=interceptors)

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        """Sleep in short steps so a signal or a finished child is noticed quickly."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
            self.reap()

    def reap(self) -> None:
        # Our pids only (not waitpid(-1)): an embedding process may have children of its own.
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                done, status = pid, 0
            if done == 0:
                continue
            child = self.children.pop(pid)
            log.info("child pid %d (task %d, run %d) exited %d after %.2f s", pid,
                     child.task_id, child.run_id, exit_status(status),
                     time.monotonic() - child.started)

    def _parent_gone(self) -> bool:
        if self.args.parent_pid is None:
            return False
        try:
            os.kill(self.args.parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def serve(self) -> int:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.certificates = validate_and_resolve_root_certificates(
            self.args.root_certificates, self.args.insecure)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        client = self._client()
        backoff, down_since = Backoff(), time.monotonic()  # never reached counts from start
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        log.info("polling %s for ClientApp tasks every %.2f s", self.args.runtime_api_address,
                 self.args.poll_interval)
        if self.args.policy.active:
            log.info("node policy: %s", self.args.policy.describe())
        code = 0
        try:
            while not self.stopping:
                self.reap()
                if self._parent_gone():
                    log.info("parent pid %d is gone: exiting", self.args.parent_pid)
                    break
                if len(self.children) >= self.args.max_children:
                    self._sleep(self.args.poll_interval)
                    continue
                try:
                    reply = client.AcquireTask(request)
                except httpx.HTTPStatusError as err:
                    if err.response.status_code in (401, 403):
                        log.error("Runtime API refused AcquireTask (%s): wrong or missing "
                                  "--superexec-auth-secret-file?", err.response.status_code)
                        code = 1
                        break
                    reply = None
                    error = f"HTTP {err.response.status_code}"
                except httpx.HTTPError as err:
                    reply, error = None, f"{type(err).__name__}: {err}"
                if reply is None:
                    now = time.monotonic()
                    down_since = now if down_since is None else down_since
                    if gave_up(down_since, now, self.args.max_wait_time):
                        log.error("Runtime API at %s unreachable for %.0f s: exiting",
                                  self.args.runtime_api_address, now - down_since)
                        code = 1
                        break
                    delay = backoff.next()
                    log.warning("Runtime API at %s unavailable (%s); retrying in %.1f s",
                                self.args.runtime_api_address, error, delay)
                    self._sleep(delay)
                    continue
                backoff.reset()
                down_since = None  # the give-up clock runs only during a streak of failures
                if reply.HasField("task") and reply.token:
                    self.fork(reply.token, reply.task.task_id, reply.task.run_id)
                    continue  # more work may be pending: poll again at once
                self._sleep(self.args.poll_interval)
        finally:
            self.shutdown()
            client.close()
        return code

    def fork(self, token: str, task_id: int, run_id: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()  # or buffered lines would be written by parent and child
        pid = os.fork()
        if pid == 0:
            self._child(token)  # never returns
        self.children[pid] = Child(task_id, run_id, time.monotonic())
        log.info("forked child pid %d for task %d (run %d)", pid, task_id, run_id)

    def _child(self, token: str) -> None:
        code = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)  # run_clientapp installs Flower's own
            from flwr.supernode.runtime import run_clientapp as runtime
            if self.args.policy.active:
                self._enforce_policy(runtime, token)  # exits here when the run is refused
            self._guard_stale_preload(runtime)
            runtime.run_clientapp(
                runtime_api_address=self.args.runtime_api_address, token=token,
                insecure=self.args.insecure, certificates=self.certificates,
                parent_pid=os.getppid(), runtime_dependency_install=False)
            code = 0
        except SystemExit as exc:  # run_clientapp always ends in flwr_exit -> sys.exit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)  # skip the parent's atexit handlers and finalizers

    def _enforce_policy(self, runtime, token: str) -> None:
        """Pull the task's input (message, context, run, FAB) before any of the app's code is
        loaded and check the node's policy against the FAB and the run_config the SuperNode
        fused. Accepted: `run_clientapp` gets this same input (it is pulled once). Refused:
        one log line, an error reply naming the rule, the task reported failed, exit."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import SubStatus
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        from privet.experiments.node_policy import PolicyRefused

        client = RuntimeHttpClient.from_server_address(
            server_address=self.args.runtime_api_address, insecure=self.args.insecure,
            root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)])
        try:
            pulled = runtime.pull_task_input(client)
            message, context, run, fab = pulled
            try:
                partition = context.node_config.get("partition-id")
                client_id = None if partition is None else int(partition)
            except (TypeError, ValueError):
                client_id = None
            try:
                self.args.policy.check(context.run_config, client_id, fab.content,
                                       PROJECT_DIR)
            except PolicyRefused as refused:
                log.error("refused run %d (task token ...%s): %s", run.run_id, token[-4:],
                          refused)
                reason = str(refused)
                runtime.push_message(client, Message(Error(code=POLICY_ERROR_CODE,
                                                            reason=reason),
                                                      reply_to=message), context)
                runtime.push_task_output(client, context, SubStatus.FAILED, reason)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(POLICY_EXIT_CODE)
        finally:
            client.close()
        from privet.patches.flower import reuse_task_input

        reuse_task_input(runtime, pulled)  # run_clientapp gets this same input

    def _guard_stale_preload(self, runtime) -> None:
        """Wrap the ClientApp loader so a FAB that differs from the preloaded code wins
        (privet.patches.flower.guard_client_app_loader)."""
        if not self.preloaded:
            return
        from flwr.common.config import get_project_dir

        from privet.patches import flower

        preloaded = self.preloaded

        def drop() -> None:
            for name in preloaded:
                sys.modules.pop(name, None)

        flower.guard_client_app_loader(
            runtime, lambda *fab: stale_sources(preloaded, get_project_dir(*fab)), drop, log)

    def shutdown(self) -> None:
        """SIGTERM the children (Flower's handler then reports the task), SIGKILL stragglers."""
        for pid in list(self.children):
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.args.shutdown_grace
        while self.children and time.monotonic() < deadline:
            time.sleep(0.05)
            self.reap()
        for pid in list(self.children):
            log.warning("child pid %d ignored SIGTERM: killing it", pid)
            _signal_pid(pid, signal.SIGKILL)
        while self.children:
            time.sleep(0.05)
            self.reap()


def _signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# --- benchmark: a SuperLink and SuperNodes on loopback --------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for name, proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                   f"{what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def write_node_data(directory: Path, nodes: int, rows: int) -> list[Path]:
    """Consecutive slices of the shipped Adult train file, one CSV with a header per node."""
    from privet.common.data.adult import load_raw
    frame = load_raw("train")
    paths = []
    for i in range(nodes):
        path = directory / f"node{i}" / "adult.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.iloc[i * rows:(i + 1) * rows].to_csv(path, index=False)
        paths.append(path)
    return paths


class LocalFederation:
    """A SuperLink, SuperNodes and (with warm=True) launchers on loopback.

    Every process starts in its own session; leaving the `with` block SIGTERMs each process
    group (SuperExec, flwr-clientapp and forked children included), then SIGKILLs it.
    """

    def __init__(self, workdir: Path, nodes: int = 2, warm: bool = False, rows: int = 2000,
                 project: Path = PROJECT_DIR, launcher_args: tuple[str, ...] = ()):
        self.workdir, self.nodes, self.warm, self.rows = Path(workdir), nodes, warm, rows
        self.project, self.launcher_args = project, launcher_args
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs: dict[str, Path] = {}
        bin_dir = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        self.logs[name] = self.workdir / "logs" / f"{name}.log"
        self.logs[name].parent.mkdir(parents=True, exist_ok=True)
        with open(self.logs[name], "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.project,
                                    env={**self.env, "FLWR_HOME": str(home)},
                                    start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def __enter__(self) -> LocalFederation:
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_all(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = write_node_data(self.workdir / "data", self.nodes, self.rows)
        self.port = free_port()
        self._start("superlink", ["flower-superlink", "--insecure",
                                  "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)],
                    self.workdir / "home-superlink")
        wait_for(lambda: _listening(self.port), 60, "the SuperLink", self.procs)
        isolation = "process" if self.warm else "subprocess"
        for i, path in enumerate(data):
            api = free_port()
            home = self.workdir / f"home-node{i}"
            self._start(f"supernode{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--isolation", isolation, "--host", "127.0.0.1", "--port", str(api),
                "--node-config", f'partition-id={i} data-path="{path}"'], home)
            if self.warm:
                self._start(f"launcher{i}", [
                    sys.executable, "-m", "privet.experiments.launcher", "--insecure",
                    "--runtime-api-address", f"127.0.0.1:{api}", *self.launcher_args], home)
        for i in range(self.nodes if self.warm else 0):
            wait_for(lambda i=i: "polling" in self.log_text(f"launcher{i}"), 180,
                     f"launcher{i} to warm up", self.procs)
        cli_home = self.workdir / "home-cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.cli_home = cli_home

    def run(self, run_config: dict, out_dir: Path, timeout: float = 900.0
            ) -> subprocess.CompletedProcess:
        """`flwr run <project> loopback --run-config ... --stream`; raises if it fails."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in
                             {**run_config, "out-dir": str(out_dir)}.items())
        cmd = ["flwr", "run", str(self.project), "loopback", "--run-config", overrides,
               "--stream"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=self.project,
                                env={**self.env, "FLWR_HOME": str(self.cli_home)},
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        finally:
            _kill_group(proc)
        (self.workdir / "logs" / "flwr-run.log").write_text(stdout)
        done = subprocess.CompletedProcess(cmd, proc.returncode, stdout)
        if done.returncode != 0 or not (out_dir / "rounds.csv").exists():
            raise RuntimeError(f"`flwr run` failed ({done.returncode}):\n{stdout[-3000:]}")
        return done

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            _kill_group(proc)
        self.procs.clear()


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it (a group outlives its leader)."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; give the rest of its group the same grace
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            break
    if proc.poll() is None:
        proc.wait(timeout=5)


def bench(args: argparse.Namespace) -> int:
    """Alternate cold (subprocess isolation) and warm (launcher) runs, `--repeat` times each,
    so that a change in the machine's load hits both alike."""
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="privet-launcher-bench-"))
    run_config = {"num-clients": 2, "clients-per-round": 2, "rounds": args.rounds}
    labels = {False: "subprocess isolation", True: "process isolation + launcher"}
    results: dict[str, list] = {label: [] for label in labels.values()}
    for repeat in range(args.repeat):
        for warm in (False, True):
            sub = workdir / f"{'warm' if warm else 'cold'}{repeat}"
            started = time.monotonic()
            with LocalFederation(sub, nodes=2, warm=warm, rows=args.rows) as fed:
                fed.run(run_config, sub / "run", timeout=args.timeout)
            latencies = [round(x, 2) for x in round_latencies(sub / "run" / "rounds.csv")]
            results[labels[warm]].append({"round_seconds": latencies,
                                          "wall_seconds": round(time.monotonic() - started, 1),
                                          "load_average": os.getloadavg()[0]})
            print(f"{labels[warm]:30s} per round {latencies} s, mean "
                  f"{sum(latencies) / len(latencies):.2f} s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    (workdir / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"details and logs: {workdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s launcher[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.propagate = False  # Opacus adds a root handler on import; don't print twice
    if args.bench:
        return bench(args)
    launcher = Launcher(args)
    launcher.warm_up()
    return launcher.serve()


if __name__ == "__main__":
    sys.exit(main())

"""`privet deploy ...` and `privet run`: Flower's SuperLink and SuperNodes, secured."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from privet.common import results
from privet.common.config import DEFAULT_CONFIG, PROJECT_DIR, ConfigError, load_config
from privet.experiments.cli_common import ConfigFile, Overrides, err, exit_now, fail, say

deploy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Deploy on Flower's SuperLink and SuperNodes, TLS and node "
                              "authentication on (see the README's Deploy section).")


def _insecure_warning(link: bool = False) -> None:
    from privet.experiments.deploy import INSECURE_LINK_WARNING, INSECURE_WARNING

    if link:
        err.print(f"[bold red]privet: WARNING: {INSECURE_LINK_WARNING}[/]", markup=True,
                  soft_wrap=True)
        return
    err.print(f"[bold yellow]privet: warning:[/] {INSECURE_WARNING}", markup=True,
              soft_wrap=True)


def _exec(cmd: list[str], dry_run: bool) -> None:
    """Show the plain Flower command, then become it (signals reach Flower directly)."""
    import os

    from privet.experiments.deploy import flower_env, show

    say(show(cmd))
    if dry_run:
        return
    sys.stdout.flush()
    try:
        os.execvpe(cmd[0], cmd, flower_env())
    except OSError as error:
        fail(f"cannot start {cmd[0]}: {error}")


@deploy_app.command("certs")
def deploy_certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the CA, the SuperLink "
                                      "certificate and node keys")] = Path("certs"),
    hosts: Annotated[Optional[list[str]], typer.Option(
        "--host", help="name or IP address SuperNodes use to reach the SuperLink "
                       "(repeatable); IPs become IP SANs, names DNS SANs")] = None,
    nodes: Annotated[int, typer.Option(min=0, help="node key pairs to create "
                                       "(nodes/node-<i>.key, .pub); existing ones are kept")
                     ] = 0,
    loopback: Annotated[bool, typer.Option(help="also valid for localhost, 127.0.0.1 and "
                                           "::1: a SuperLink listening on 0.0.0.0 has its "
                                           "own ServerApp runner dial 127.0.0.1")] = True,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 365,
    operators: Annotated[int, typer.Option(min=0, help="operator client certificates to "
                                           "create (operators/operator-<i>.pem, .key), from "
                                           "their own operator CA; existing ones are kept")
                         ] = 0,
) -> None:
    """Create a CA, a SuperLink TLS certificate for --host, SuperNode key pairs and
    operator certificates (only they open the Control API: submit, list, stop, read runs,
    register nodes).

    Re-running keeps the CA (SuperNodes keep trusting it) and existing node keys, and
    issues a new SuperLink certificate: the way to add a host or a node.

    Example: privet deploy certs --out certs --host 203.0.113.7 --host link.example.org --nodes 3 --operators 1
    """
    from privet.experiments.deploy import make_certs

    try:
        files = make_certs(out, hosts or [], nodes, loopback=loopback, days=days,
                           operators=operators)
    except ValueError as error:
        fail(str(error))
    say(f"{'created' if files.new_ca else 'kept'} CA        {files.ca_cert}  "
        "(copy to every SuperNode; its key ca.key stays here, offline if you can)")
    say(f"SuperLink cert    {files.server_cert}, key {files.server_key}")
    for private, public in files.node_keys:
        say(f"node key          {private} (to that node only), {public} (register it)")
    for cert, key in files.operators:
        say(f"operator          {cert} and {key} (to that operator only: "
            "privet deploy connection ... --operator-cert)")


@deploy_app.command("node-key")
def deploy_node_key(
    out: Annotated[Path, typer.Option("--out", "-o", help="private key file; the public "
                                      "key goes next to it as .pub")] = Path("node.key"),
    force: Annotated[bool, typer.Option(help="replace an existing key (rotation)")] = False,
) -> None:
    """Create one SuperNode key pair on the participant's machine.

    The private key never has to travel; register the .pub at the SuperLink.
    """
    from privet.experiments.deploy import make_node_key

    if out.exists() and not force:
        fail(f"{out} exists; pass --force to replace it (then register the new .pub and "
             "unregister the old node)")
    private, public = make_node_key(out, force=True)
    say(f"private key {private} (mode 0600), public key {public}")


@deploy_app.command("connection")
def deploy_connection(
    name: Annotated[str, typer.Argument(help="connection name, used as `flwr run . NAME` and "
                                        "`privet run --federation NAME`")],
    superlink: Annotated[str, typer.Option(help="SuperLink address HOST:PORT")],
    root_certificates: Annotated[Optional[Path], typer.Option(
        help="the CA certificate (ca.pem) the SuperLink's certificate was issued by")] = None,
    operator_cert: Annotated[Optional[Path], typer.Option(
        help="this operator's certificate (operators/operator-<i>.pem from `privet deploy "
             "certs --operators N`)")] = None,
    operator_key: Annotated[Optional[Path], typer.Option(
        help="its private key (default: the certificate's name with .key)")] = None,
    insecure: Annotated[bool, typer.Option(help="plain HTTP, no TLS (not for real data)")
                        ] = False,
    default: Annotated[bool, typer.Option(help="make it the default connection")] = False,
) -> None:
    """Write a SuperLink connection for `privet flwr`, `privet run` and the flwr CLI.

    The connection goes into $FLWR_HOME/config.toml (~/.flwr/config.toml), where Flower
    1.41 looks; the operator credential into $FLWR_HOME/privet-operators.toml, which
    `privet flwr ...` and `privet run` present to the SuperLink's proxy.
    """
    from privet.experiments.deploy import write_connection

    if insecure == (root_certificates is not None):
        fail("give either --root-certificates ca.pem, or --insecure")
    if insecure:
        if operator_cert is not None:
            fail("--operator-cert needs TLS: leave out --insecure")
        _insecure_warning()
    elif operator_cert is None:
        fail("give --operator-cert operators/operator-<i>.pem (`privet deploy certs "
             "--operators N`): the SuperLink's Control API refuses a client without one")
    try:
        path = write_connection(name, superlink, root_certificates, default=default,
                                operator_cert=operator_cert, operator_key=operator_key)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    say(f"[superlink.{name}] → {superlink} written to {path}"
        + (f"; operator certificate {operator_cert}" if operator_cert else ""))


@deploy_app.command("superlink")
def deploy_superlink(
    certs: Annotated[Optional[Path], typer.Option(
        help="folder from `privet deploy certs` (ca.pem, privet.server.pem/.key, "
             "privet.internal.pem/.key, operators/operator-ca.pem)")] = None,
    database: Annotated[Path, typer.Option(help="SuperLink state (runs, registered nodes, "
                                           "messages in flight): SQLite file")
                        ] = Path("superlink.db"),
    host: Annotated[str, typer.Option(help="address the proxy (or, with --insecure, the "
                                      "SuperLink) listens on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="the one public HTTPS port: "
                                      "SuperNodes and operators (privet flwr, privet run)")
                    ] = 8000,
    internal_port: Annotated[Optional[int], typer.Option(
        min=1, max=65535, help="the SuperLink's own port, on 127.0.0.1 behind the proxy "
                               "(its ServerApp dials it too); default --port + 1")] = None,
    log_file: Annotated[Optional[Path], typer.Option(help="also log to this file (rotated)")
                        ] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS and no node authentication")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the flower-superlink command only")
                       ] = False,
) -> None:
    """Start flower-superlink behind nginx: TLS, SuperNode authentication, operator
    certificates for the Control API, state on disk.

    flower-superlink listens on 127.0.0.1:--internal-port only; nginx (the distribution's
    package), started as its child with its configuration, pid, logs and temp files in
    proxy/ next to --database, takes --host:--port: SuperNodes pass, the Control API only
    with an operator certificate, nothing else. Runtime dependency installation is off.
    Register nodes with `privet flwr supernode register`.
    """
    from privet.experiments import deploy

    if insecure:
        _insecure_warning(link=True)
    elif certs is None:
        fail("give --certs DIR (from `privet deploy certs`), or --insecure")
    if internal_port is None:
        internal_port = port + 1 if port < 65535 else port - 1
    if not insecure and internal_port == port:
        fail("--internal-port must differ from --port")
    try:
        if insecure:
            cmd = deploy.superlink_command(None, database, host=host, port=port,
                                           log_file=log_file)
        else:
            cmd = deploy.superlink_command(certs, database, host="127.0.0.1",
                                           port=internal_port, log_file=log_file,
                                           internal=True)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    if insecure:
        if not dry_run:
            database.parent.mkdir(parents=True, exist_ok=True)
        _exec(cmd, dry_run)
        return
    nginx = deploy.find_nginx()
    folder = database.resolve().parent / deploy.PROXY_DIR
    conf = folder / "nginx.conf"
    if dry_run:
        say(deploy.show(deploy.nginx_command(nginx or "nginx", conf)) + " &")
        _exec(cmd, dry_run)
        return
    if nginx is None:
        fail("nginx not found: install the distribution's package (Debian/Ubuntu: apt-get "
             "install nginx-light). It is the proxy that admits only operators to the "
             "Control API; --insecure runs without it, and without any authentication")
    try:
        conf = deploy.write_proxy(certs, folder, host, port, internal_port)
        say(deploy.show(deploy.nginx_command(nginx, conf)) + " &")
        deploy.start_proxy(deploy.nginx_command(nginx, conf), host, port)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        fail(str(error))
    _exec(cmd, dry_run)


@deploy_app.command("supernode")
def deploy_supernode(
    superlink: Annotated[str, typer.Option(help="SuperLink address HOST:PORT")],
    data: Annotated[Path, typer.Option(help="this node's own data file (or image folder); "
                                       "its privacy ledger is kept next to it")],
    partition_id: Annotated[int, typer.Option(min=0, help="this node's client id, "
                                              "0..num-clients-1, unique per node")],
    root_certificates: Annotated[Optional[Path], typer.Option(
        help="the CA certificate (ca.pem)")] = None,
    key: Annotated[Optional[Path], typer.Option(help="this node's private key "
                                                "(registered at the SuperLink)")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="local port of the node's "
                                      "ClientApp API (127.0.0.1); one per node on a machine")
                    ] = 9094,
    isolation: Annotated[str, typer.Option(help="process: a warm launcher (torch and the app "
                                           "imported once) runs each ClientApp; subprocess: "
                                           "Flower starts a fresh process per message")
                         ] = "process",
    ledger_dir: Annotated[Optional[Path], typer.Option(
        help="keep the privacy ledger here instead of next to --data")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS, no node authentication")] = False,
    require_level: Annotated[str, typer.Option(
        help="node policy: refuse runs without this level of DP (sample, user or both)")
                             ] = "",
    max_epsilon: Annotated[Optional[float], typer.Option(
        help="node policy: refuse runs charging this node's rows more than ε (or ε = inf, "
             "or clear training metrics); with the ledger, all runs on its data stay within "
             "it")] = None,
    min_noise: Annotated[Optional[float], typer.Option(
        help="node policy: refuse runs whose DP-SGD noise multiplier σ for this node's rows "
             "would be below this (no sample-level DP: refused before any task runs)")] = None,
    noise_source: Annotated[str, typer.Option(
        help="node policy: 'secure' refuses privacy.noise-source = \"seeded\"")] = "",
    trusted_fab_hash: Annotated[Optional[list[str]], typer.Option(
        help="node policy: run only apps (FABs) with this sha256 (repeatable); by default a "
             "node with a policy runs only FABs whose code equals its own privet")] = None,
    any_app: Annotated[bool, typer.Option(
        help="node policy: do not check the app's code (the policy then rests on the "
             "operator's app honouring the config)")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the flower-supernode command only")
                       ] = False,
) -> None:
    """Start flower-supernode for one participant, reading only its own data file.

    TLS to the SuperLink (verified with the CA), authenticated by the node's key.
    """
    from privet.experiments.deploy import supernode_command

    if not data.exists():  # a file, or an image folder (data.dataset = "image-folder")
        fail(f"--data {data}: no such file or folder")
    if insecure:
        _insecure_warning()
    elif root_certificates is None or key is None:
        fail("give --root-certificates ca.pem and --key node.key, or --insecure")
    if isolation not in ("subprocess", "process"):
        fail(f"--isolation {isolation!r}: expected 'subprocess' or 'process'")
    from privet.experiments.node_policy import NodePolicy
    try:
        policy = NodePolicy(require_level=require_level, max_epsilon=max_epsilon,
                            min_noise=min_noise, noise_source=noise_source,
                            trusted_fab_hashes=tuple(h.lower() for h in trusted_fab_hash or ()),
                            any_app=any_app)
    except ValueError as error:
        fail(f"node policy: {error}")
    if policy.active and isolation != "process":
        fail("a node policy is enforced by privet's launcher: use --isolation process "
             "(with subprocess isolation Flower runs the operator's app unchecked)")
    try:
        cmd = supernode_command(superlink, data, partition_id,
                                root_certificates=None if insecure else root_certificates,
                                private_key=None if insecure else key, port=port,
                                isolation=isolation, ledger_dir=ledger_dir,
                                min_noise=min_noise)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if not dry_run:  # a mismatch would have Flower retry forever without saying why
        from privet.experiments.deploy import tls_mismatch

        mismatch = tls_mismatch(superlink, insecure)
        if mismatch:
            fail(mismatch)
    if isolation == "process":
        _start_launcher(port, dry_run, policy_args(policy))
    _exec(cmd, dry_run)


def policy_args(policy) -> list[str]:
    """The launcher's flags for a node policy."""
    args = []
    if policy.require_level:
        args += ["--require-level", policy.require_level]
    if policy.max_epsilon is not None:
        args += ["--max-epsilon", repr(policy.max_epsilon)]
    if policy.min_noise is not None:
        args += ["--min-noise", repr(policy.min_noise)]
    if policy.noise_source:
        args += ["--noise-source", policy.noise_source]
    for digest in policy.trusted_fab_hashes:
        args += ["--trusted-fab-hash", digest]
    if policy.any_app:
        args += ["--any-app"]
    return args


def _start_launcher(port: int, dry_run: bool, extra: list[str] = ()) -> None:
    """The warm ClientApp launcher for this node, polling the SuperNode's local Runtime API
    (loopback, plain HTTP). It watches this PID, which exec keeps for flower-supernode, and
    exits with it."""
    import os
    import subprocess

    from privet.experiments.deploy import show

    cmd = [sys.executable, "-m", "privet.experiments.launcher", "--insecure",
           "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid", str(os.getpid()),
           *extra]
    say(show(cmd) + " &")
    if not dry_run:
        subprocess.Popen(cmd, cwd=PROJECT_DIR, start_new_session=True)


def run_deployed(
    federation: Annotated[str, typer.Option(
        help="SuperLink connection in $FLWR_HOME/config.toml (`privet deploy connection`)")],
    config: ConfigFile = DEFAULT_CONFIG,
    overrides: Overrides = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="run directory on the SuperLink machine (default "
                            "runs/<name>-<timestamp> where the SuperLink was started)")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="RUN_DIR", help="continue the stopped run in RUN_DIR (on the "
        "SuperLink's machine: the first run's --out) after its last checkpointed round; "
        "with its config.toml when this machine can read it, else give the same --config "
        "and --set as the first time")] = None,
    pause_after: Annotated[int, typer.Option(
        "--pause-after", metavar="ROUND", min=0, help="stop after this round with status "
        "paused; --resume continues it (0: run to the end)")] = 0,
    results_to: Annotated[Optional[Path], typer.Option(
        "--results-to", metavar="LOCAL_DIR", help="where on this machine the run's result "
        "files come back to (a new or empty folder; default runs/<name>-<timestamp>-results "
        "here)")] = None,
) -> None:
    """Run an experiment on deployed SuperNodes (over `flwr run`).

    Submits the resolved config and streams the ServerApp's log until the run ends.

    Example: privet run --federation lab --config experiments/configs/adult.toml --set rounds=5

    After a SuperLink restart: privet run --federation lab --resume RUN_DIR
    """
    from privet.experiments import deploy

    extra = list(overrides or [])
    run_config: dict = {}
    if resume is not None:
        if out:
            fail("--resume RUN_DIR names the run directory: leave out --out")
        local = Path(resume).expanduser()
        if not extra and config == DEFAULT_CONFIG and (local / results.CONFIG).is_file():
            from privet.experiments.cli import resumable  # cli imports this module

            cfg, after = resumable(local.resolve())  # one line if finished or no checkpoint
            say(f"privet: resuming after round {after} of {cfg.rounds} with "
                f"{local.resolve() / results.CONFIG}")
            config, extra = local.resolve() / results.CONFIG, []
            resume = str(local.resolve())
        run_config["resume"] = True
        extra.append(f"out-dir={_toml_string(resume)}")
    elif out:
        extra.append(f"out-dir={_toml_string(out)}")
    if pause_after:
        run_config["pause-after"] = pause_after
    try:
        cfg = load_config(config, extra)
    except ConfigError as error:
        fail(str(error))
    from privet.common.privacy.randomness import NoiseSourceError, resolve_noise_source

    try:  # the nodes and the ServerApp would refuse it too; say so before submitting
        resolve_noise_source(cfg.privacy.noise_source, True, "privet run")
    except NoiseSourceError as error:
        fail(str(error))
    from privet.common.models import shipped_with_app

    unshipped = (shipped_with_app(cfg.train.model, PROJECT_DIR)
                 or shipped_with_app(cfg.strategy.name, PROJECT_DIR, "strategy.name")
                 or (shipped_with_app(cfg.data.dataset, PROJECT_DIR, "data.dataset")
                     if cfg.data.loader else None))
    if unshipped:
        fail(unshipped)
    # the ServerApp maps one node to one client: it refuses extra nodes, waits for missing
    online = deploy.online_nodes(federation)
    if online is not None and online > cfg.num_clients:
        fail(f"{online} SuperNodes are online at {federation!r} but num-clients = "
             f"{cfg.num_clients}; set num-clients to the number of nodes")
    if online is not None and online < cfg.num_clients:
        err.print(f"privet: warning: {online} of num-clients = {cfg.num_clients} SuperNodes "
                  f"online at {federation!r}; the run waits for the others")
    local_dir = _results_folder(results_to, cfg.name)  # one line if it is not free
    try:
        seen = deploy.run(cfg, federation, echo=say, run_config=run_config)
    except FileNotFoundError as error:
        fail(str(error))
    run_dir = seen.run_dir or cfg.out_dir
    _bring_results(seen.results, local_dir, run_dir)
    if seen.code or seen.run_id is None:
        _last_words(seen, federation, run_dir, lost=seen.link_lost)
        exit_now(seen.code or 1)
    status = deploy.run_status(seen.run_id, federation)
    where = run_dir or f"runs/{cfg.name}-<timestamp> under the SuperLink's directory"
    say(f"privet: run {seen.run_id}: {status or 'status unknown'}; results on the SuperLink "
        f"machine in {where}")
    if status and status != "finished:completed":
        _last_words(seen, federation, run_dir, lost=status == "finished:failed")
        exit_now(1)
    if pause_after and run_dir:
        say(f"privet: paused after round {pause_after}; continue it with: privet run "
            f"--federation {federation} --resume {run_dir}")
    exit_now(_failures_said(local_dir))


def _failures_said(local_dir: Path) -> int:
    """Flower calls a run that ended complete-with-failures "finished:completed": the
    summary that came back says which clients failed and why (a node's policy, a crash),
    and the exit code is simulate's for it (3); 0 otherwise."""
    from privet.experiments.cli import EXIT_FAILURES

    try:
        summary = json.loads((local_dir / results.SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if summary.get("status") != "complete-with-failures":
        return 0
    failures = (summary.get("failures") or {}).get("clients") or {}
    err.print(f"privet: the run finished, but {len(failures)} client(s) failed and were left "
              "out:", markup=False, soft_wrap=True)
    for client, failure in failures.items():
        err.print(f"privet:   client {client}, {failure.get('stage', '?')} (round "
                  f"{failure.get('round', '?')}): {failure.get('reason', '?')}", markup=False,
                  soft_wrap=True)
    return EXIT_FAILURES


def _results_folder(given: Optional[Path], name: str) -> Path:
    """The local folder the results come back to: `--results-to`, else a new
    runs/<name>-<timestamp>-results here; refused at once (before the run) unless new or
    empty: privet never writes over a user's files."""
    from datetime import datetime

    folder = given if given is not None else Path("runs") / (
        f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-results")
    folder = folder.expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        fail(f"--results-to {folder}: not an empty folder; give a new or empty one (the "
             "run's results are copied there)")
    return folder


def _bring_results(reader, folder: Path, run_dir: str | None) -> None:
    """Write what the ServerApp's log carried (common.carried) into `folder`, and say so."""
    where = run_dir or "its run directory"
    if not reader.files:
        if reader.source is not None or reader.broken:
            err.print(f"privet: warning: the results did not come back whole (damaged: "
                      f"{', '.join(reader.broken) or 'none'}); they are on the SuperLink "
                      f"machine in {where}", markup=False, soft_wrap=True)
        return
    same = run_dir is not None and Path(run_dir).expanduser().resolve() == folder.resolve()
    if same:
        return
    try:
        written = reader.write(folder)
    except OSError as error:
        err.print(f"privet: warning: the results were not copied to {folder}: {error}; they "
                  f"are on the SuperLink machine in {where}", markup=False, soft_wrap=True)
        return
    say(f"privet: results copied to {folder.resolve()} ({len(written)} files: "
        f"{', '.join(p.name for p in written)})")
    if reader.skipped:
        say(f"privet: left on the SuperLink machine in {where} (over "
            f"{reader_limit_mib()} MiB in all): "
            + ", ".join(f"{n} ({size:,} bytes)" for n, size in reader.skipped.items()))
    if reader.broken or not reader.ended:
        err.print(f"privet: warning: some results did not come back whole (damaged: "
                  f"{', '.join(reader.broken) or 'none'}; block ended: {reader.ended}); the "
                  f"full set is on the SuperLink machine in {where}", markup=False,
                  soft_wrap=True)


def reader_limit_mib() -> float:
    from privet.common.carried import MAX_BYTES

    return MAX_BYTES / 2 ** 20


def _last_words(seen, federation: str, run_dir: str | None, lost: bool) -> None:
    """After a run that did not complete: the ServerApp's own error lines again (they may
    be far up the streamed log), or, when the SuperLink went away, how to continue."""
    for line in dict.fromkeys(seen.errors or []):
        err.print(line, markup=False, soft_wrap=True)
    if seen.errors or not lost:
        return
    if run_dir is None:
        err.print(f"privet: the SuperLink went away; once it is back, continue the run with: "
                  f"privet run --federation {federation} --resume RUN_DIR (its run "
                  f"directory on the SuperLink's machine)", markup=False, soft_wrap=True)
        return
    local = Path(run_dir).expanduser()
    if local.is_dir() and not (local / results.CHECKPOINT).is_file():
        err.print("privet: the SuperLink went away before the run's first round ended: there "
                  "is nothing to resume; once it is back, start the run again", markup=False,
                  soft_wrap=True)
        return
    err.print(f"privet: the SuperLink went away; once it is back, continue the run with: "
              f"privet run --federation {federation} --resume {run_dir}", markup=False,
              soft_wrap=True)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

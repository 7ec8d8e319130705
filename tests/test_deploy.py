"""Deployment: certificates and command lines (fast), and a real SuperLink with real
SuperNodes on loopback, TLS and node authentication on (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT_DIR, free_port
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from privet.common.config import CONFIGS_DIR, load_config
from privet.experiments import deploy
from privet.experiments.cli import app

BIN = Path(sys.executable).parent


def sans(cert_path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ({str(ip) for ip in names.get_values_for_type(x509.IPAddress)},
            set(names.get_values_for_type(x509.DNSName)))


# --- fast ------------------------------------------------------------------------------

def test_certs_sans_permissions_and_formats_flower_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    files = deploy.make_certs(tmp_path, ["203.0.113.7", "Link.Example.org", "2001:db8::1"], 2,
                              loopback=False)
    ips, dns = sans(files.server_cert)
    assert ips == {"203.0.113.7", "2001:db8::1"} and dns == {"link.example.org"}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in (tmp_path / deploy.CA_KEY, files.server_key,
                   *(private for private, _ in files.node_keys)):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    for private, public in files.node_keys:
        # what flower-supernode --auth-supernode-private-key and flwr supernode register do
        key = load_ssh_private_key(private.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(public)

    # re-running keeps the CA and the node keys, and re-issues the server certificate
    ca_before, node_before = files.ca_cert.read_bytes(), files.node_keys[0][0].read_bytes()
    again = deploy.make_certs(tmp_path, ["203.0.113.8"], 3)
    assert not again.new_ca and again.ca_cert.read_bytes() == ca_before
    assert again.node_keys[0][0].read_bytes() == node_before and len(again.node_keys) == 3
    ips, dns = sans(again.server_cert)
    assert ips == {"203.0.113.8", "127.0.0.1", "::1"} and dns == {"localhost"}


def test_certs_refuse_bad_hosts(tmp_path):
    with pytest.raises(ValueError, match="not an IP address or a DNS name"):
        deploy.make_certs(tmp_path, ["bad host!"])
    with pytest.raises(ValueError, match="at least one --host"):
        deploy.make_certs(tmp_path, [])
    assert not list(tmp_path.iterdir())  # nothing written


def test_secure_by_default_and_insecure_only_on_request(tmp_path):
    deploy.make_certs(tmp_path / "certs", ["127.0.0.1"], 1)
    data = tmp_path / "data.csv"
    data.write_text("x\n")
    runner = CliRunner()
    done = runner.invoke(app, ["deploy", "superlink", "--certs", str(tmp_path / "certs"),
                               "--database", str(tmp_path / "s.db"), "--dry-run"])
    assert done.exit_code == 0, done.output
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
                 "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                 "--database"):
        assert flag in done.output
    assert "--insecure" not in done.output
    done = runner.invoke(app, ["deploy", "superlink", "--dry-run"])
    assert done.exit_code == 2 and "--insecure" in done.output
    done = runner.invoke(app, ["deploy", "superlink", "--insecure", "--dry-run"])
    assert done.exit_code == 0 and "WARNING: INSECURE SUPERLINK" in done.output
    assert "NO operator authentication" in done.output
    assert "--insecure" in done.output and "--enable-supernode-auth" not in done.output
    assert "nginx" not in done.output

    node = ["deploy", "supernode", "--superlink", "203.0.113.7:8000", "--data", str(data),
            "--partition-id", "3", "--dry-run"]
    done = runner.invoke(app, node)
    assert done.exit_code == 2 and "--root-certificates" in done.output
    done = runner.invoke(app, node + ["--root-certificates", str(tmp_path / "certs/ca.pem"),
                                      "--key", str(tmp_path / "certs/nodes/node-0.key")])
    assert done.exit_code == 0, done.output
    assert f'partition-id=3 data-path="{data.resolve()}"' in done.output
    # Flower's flower-supernode, run with a 10 s heartbeat (privet.experiments.supernode)
    supernode = next(line for line in done.output.splitlines()
                     if "privet.experiments.supernode" in line)
    assert "--auth-supernode-private-key" in supernode and "--insecure" not in supernode
    # the warm launcher talks plain HTTP, but only to the node's own Runtime API on loopback
    launcher = next(line for line in done.output.splitlines() if "privet.experiments.launcher" in line)
    assert "--runtime-api-address 127.0.0.1:9094" in launcher
    done = runner.invoke(app, node + ["--insecure"])
    assert done.exit_code == 0 and "warning: insecure mode" in done.output


def test_node_config_refuses_what_flower_cannot_parse(tmp_path):
    from flwr.common.config import parse_config_args

    line = deploy.node_config(2, tmp_path / "node.csv", {"ledger-dir": str(tmp_path)})
    assert parse_config_args([line]) == {"partition-id": 2,
                                         "data-path": str((tmp_path / "node.csv").resolve()),
                                         "ledger-dir": str(tmp_path)}
    spaced = tmp_path / "my data" / "it's.csv"
    assert parse_config_args([deploy.node_config(0, spaced)])["data-path"] == str(spaced)
    with pytest.raises(ValueError, match="double quotes"):
        deploy.node_config(0, tmp_path / 'say "hi".csv')


def test_run_config_file_is_what_flower_reads(tmp_path):
    from flwr.common.config import parse_config_args

    cfg = load_config(CONFIGS_DIR / "adult.toml",
                      ["privacy.client-epsilon={ 1 = 1.0 }", 'out-dir="/srv/runs/a b"'])
    path = deploy.run_config_file(cfg, tmp_path)
    assert parse_config_args([str(path)]) == cfg.to_run_config()
    cmd = deploy.run_command("lab", path)
    assert cmd[:3] == [sys.executable, "-m", "privet.experiments.flwr_operator"]
    assert cmd[3:] == ["run", str(PROJECT_DIR), "lab", "--run-config", str(path), "--stream"]


def test_run_config_file_carries_resume_as_execution_keys(tmp_path):
    from flwr.common.config import parse_config_args

    from privet.common.config import from_run_config
    from privet.server.app import resume_options

    cfg = load_config(CONFIGS_DIR / "tiny.toml", ['out-dir="/srv/runs/a"'])
    path = deploy.run_config_file(cfg, tmp_path, {"resume": True, "pause-after": 3})
    found = parse_config_args([str(path)])
    assert resume_options(found) == (True, 3)
    assert from_run_config(found) == from_run_config(cfg.to_run_config())


def test_checkpoint_is_the_run_directorys_wherever_it_was_named_from(tmp_path):
    """A deployed run started with a relative --out resumes with the directory's absolute
    path (or after the folder moved); another experiment is still refused."""
    import torch

    from privet.server.checkpoint import Checkpoint, CheckpointError

    first = load_config(CONFIGS_DIR / "tiny.toml", ['out-dir="runs/a"'])
    Checkpoint(2, "r", first.to_toml(), {"w": torch.zeros(1)}, {}, {}, "", ((1,), [], None),
               None, torch.get_rng_state()).save(tmp_path)
    again = load_config(CONFIGS_DIR / "tiny.toml", [f'out-dir="{tmp_path}"'])
    assert Checkpoint.load(tmp_path, again.to_toml()).round == 2
    other = load_config(CONFIGS_DIR / "tiny.toml", [f'out-dir="{tmp_path}"', "rounds=9"])
    with pytest.raises(CheckpointError, match="written under another config"):
        Checkpoint.load(tmp_path, other.to_toml())


def test_claim_waits_for_the_previous_holder_when_asked(tmp_path):
    from privet.common.run_dir import RunDirError, claim

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from privet.common.run_dir import claim; "
         f"claim({str(tmp_path / 'run')!r}); print('held', flush=True); time.sleep(3)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by another privet run .pid {holder.pid}"):
            claim(tmp_path / "run")
        seen = []
        claim(tmp_path / "run", wait=30, waiting=seen.append)
        assert seen == [str(holder.pid)] and holder.poll() is not None
    finally:
        holder.kill()
        holder.wait()


def test_privet_run_resume_refuses_out_and_a_finished_run(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["run", "--federation", "lab", "--resume", str(tmp_path),
                               "--out", str(tmp_path / "x")])
    assert done.exit_code == 2 and "leave out --out" in done.output
    (tmp_path / "config.toml").write_text((CONFIGS_DIR / "tiny.toml").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({"status": "complete"}))
    done = runner.invoke(app, ["run", "--federation", "lab", "--resume", str(tmp_path)])
    assert done.exit_code == 2 and "the run is complete: there is nothing to resume" in \
        done.output, done.output


def test_connection_is_written_where_flwr_reads_it(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    deploy.make_certs(tmp_path / "certs", ["127.0.0.1"], operators=1)
    ops = tmp_path / "certs" / "operators"
    base = ["deploy", "connection", "lab", "--superlink", "203.0.113.7:8000",
            "--root-certificates", str(tmp_path / "certs/ca.pem")]
    done = CliRunner().invoke(app, base)  # the Control API would refuse it: say so now
    assert done.exit_code == 2 and "--operator-cert" in done.output
    done = CliRunner().invoke(app, base + ["--operator-cert", str(ops / "operator-0.pem"),
                                           "--operator-key", str(ops / "operator-ca.key")])
    assert done.exit_code == 2 and "is not the key of" in done.output
    done = CliRunner().invoke(app, base + ["--operator-cert", str(ops / "operator-0.pem")])
    assert done.exit_code == 0, done.output
    found = read_superlink_connection("lab")
    assert found.address == "203.0.113.7:8000" and not found.insecure
    assert found.root_certificates == str((tmp_path / "certs/ca.pem").resolve())
    assert read_superlink_connection("local").address  # Flower's own entries are kept
    # the credential, for privet flwr / privet run, kept apart from Flower's file, 0600
    assert deploy.read_operator_credentials() == {"203.0.113.7:8000": {
        "certificate": str((ops / "operator-0.pem").resolve()),
        "key": str((ops / "operator-0.key").resolve())}}
    creds = tmp_path / "home" / deploy.OPERATOR_CREDENTIALS
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    done = CliRunner().invoke(app, ["deploy", "connection", "lab", "--superlink", "h:1",
                                    "--insecure", "--operator-cert", str(ops / "operator-0.pem")])
    assert done.exit_code == 2 and "needs TLS" in done.output


def test_operator_certificates_come_from_their_own_ca(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec as ec_
    from cryptography.x509.oid import ExtendedKeyUsageOID

    files = deploy.make_certs(tmp_path, ["127.0.0.1"], 1, operators=2)
    ops = tmp_path / deploy.OPERATORS_DIR
    assert files.operators == tuple((ops / f"operator-{i}.pem", ops / f"operator-{i}.key")
                                    for i in range(2))
    ca = x509.load_pem_x509_certificate((tmp_path / deploy.CA_CERT).read_bytes())
    op_ca = x509.load_pem_x509_certificate((ops / deploy.OPERATOR_CA).read_bytes())
    assert op_ca.subject != ca.subject and op_ca.public_key() != ca.public_key()
    for cert_path, key_path in files.operators:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert cert.issuer == op_ca.subject
        op_ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                  ec_.ECDSA(cert.signature_hash_algorithm))
        assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((ops / deploy.OPERATOR_CA_KEY).stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in ops.iterdir()}
    deploy.make_certs(tmp_path, ["127.0.0.1"], 1, operators=3)  # kept, one added
    after = {p.name: p.read_bytes() for p in ops.iterdir()}
    assert {k: after[k] for k in before} == before and "operator-2.pem" in after
    done = CliRunner().invoke(app, ["deploy", "certs", "--out", str(tmp_path / "c2"),
                                    "--host", "127.0.0.1", "--operators", "1"])
    assert done.exit_code == 0 and "operator-0.pem" in done.output


def test_superlink_listens_on_loopback_behind_the_proxy(tmp_path):
    deploy.make_certs(tmp_path / "certs", ["127.0.0.1"], operators=1)
    done = CliRunner().invoke(app, ["deploy", "superlink", "--certs", str(tmp_path / "certs"),
                                    "--database", str(tmp_path / "link" / "s.db"),
                                    "--port", "8443", "--dry-run"])
    assert done.exit_code == 0, done.output
    nginx, link = [line for line in done.output.splitlines() if line.strip()][-2:]
    assert "nginx" in nginx and str(tmp_path / "link" / "proxy" / "nginx.conf") in nginx
    assert "flower-superlink --host 127.0.0.1 --port 8444 " in link
    conf = deploy.write_proxy(tmp_path / "certs", tmp_path / "link" / "proxy", "0.0.0.0",
                              8443, 8444).read_text()
    assert "listen 0.0.0.0:8443 ssl;" in conf and "server 127.0.0.1:8444;" in conf
    assert f"ssl_client_certificate {tmp_path / 'certs/operators/operator-ca.pem'};" in conf
    assert "proxy_ssl_verify on;" in conf and "daemon off;" in conf
    assert f"pid {tmp_path / 'link/proxy/nginx.pid'};" in conf
    control = conf[conf.index("location /v1/control/"):conf.index("location / ")]
    assert "if ($ssl_client_verify != SUCCESS)" in control and "return 403;" in control
    assert "location /v1/fleet/" in conf and "/v1/runtime" not in conf  # never proxied
    assert "listen [::]:8443 ssl;" in deploy.proxy_config(tmp_path / "certs", tmp_path, "::",
                                                          8443, 8444)
    nginx_bin = deploy.find_nginx()
    if nginx_bin is None:
        print("nginx not found: its own check of the configuration is skipped")
        return
    test = subprocess.run(deploy.nginx_command(nginx_bin, tmp_path / "link/proxy/nginx.conf")
                          + ["-t"], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    # without operator credentials there is nothing to check a client against
    (tmp_path / "certs/operators/operator-ca.pem").unlink()
    with pytest.raises(FileNotFoundError, match="--operators"):
        deploy.write_proxy(tmp_path / "certs", tmp_path / "p2", "0.0.0.0", 8443, 8444)


# --- slow: real processes ----------------------------------------------------------------

PLANTED = [f"Zzyzx-Planted-{i}" for i in range(3)]  # in native-country, never a real value


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _set_subreaper(on: bool) -> None:
    """Orphans of our children (Flower starts its SuperExec, ServerApp and ClientApps in new
    sessions; they outlive a killed parent for a moment) then become our children instead
    of init's, so the process tree below this test is complete."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, int(on), 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


class Processes:
    """Every process the test starts, each in its own session and logged to a file; teardown
    stops the whole tree below the test process (a child subreaper keeps it complete)."""

    def __init__(self, root: Path) -> None:
        self.root, self.started, self.seen = root, [], set()

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def ours(self) -> set[int]:
        tree, found = _children(), set()
        stack = list(tree.get(os.getpid(), []))
        while stack:
            pid = stack.pop()
            if pid not in found:
                found.add(pid)
                stack += tree.get(pid, [])
        found = {p for p in found if _alive(p)}
        self.seen |= found
        return found

    def stop_all(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            targets = self.ours()
            for pid in targets:
                for kill in (os.killpg, os.kill):  # its group (if it leads one), then itself
                    try:
                        kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.time() + grace
            while time.time() < deadline and self.ours():
                for _, proc in self.started:
                    proc.poll()
                _reap()
                time.sleep(0.2)
            if not self.ours():
                break
        for _, proc in self.started:
            if proc.poll() is None:
                proc.wait(timeout=5)
        _reap()


@pytest.fixture
def processes(tmp_path):
    _set_subreaper(True)
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        try:
            procs.stop_all()
            left = [p for p in procs.seen | procs.ours() if _alive(p)]
            assert not left, "processes outlived the test: " + "; ".join(
                f"{p} {_cmdline(p)[:150]}" for p in left)
        finally:
            _set_subreaper(False)


def node_csv(path: Path, index: int, rows: int = 1500) -> None:
    from privet.common.data import adult

    frame = adult.load_raw("train").iloc[index * rows:(index + 1) * rows].copy()
    frame["native-country"] = frame["native-country"].where(
        frame.index % 25 != 0, PLANTED[index])
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[adult.COLUMNS].to_csv(path, index=False)


def wait_for(what: str, check, timeout: float, logs) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{logs()}")


class Deployment:
    """A SuperLink (TLS, node authentication) and SuperNodes on loopback, all started with
    the privet CLI as an operator and participants would, in `processes`.

    Each command runs on a role's machine ("superlink", "operator", "node<i>") through
    `where`; here they all share this one, and the SuperLink listens on `host`
    (tests/test_deploy_netns.py puts each role in a network namespace of its own)."""

    host = "127.0.0.1"

    def __init__(self, root: Path, processes: Processes, nodes: int = 3,
                 certs_args: tuple[str, ...] = ()) -> None:
        self.root, self.processes = root, processes
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(root / "operator"), "PYTHONUNBUFFERED": "1"}
        self.privet, self.flwr = str(BIN / "privet"), str(BIN / "flwr")
        self.certs, self.port, self.internal_port = root / "certs", free_port(), free_port()
        self.cli(self.privet, "deploy", "certs", "--out", str(self.certs), "--host", self.host,
                 "--nodes", str(nodes), "--operators", "1", *certs_args)
        self.operator_cert = self.certs / deploy.OPERATORS_DIR / "operator-0.pem"

    def where(self, role: str, cmd: list[str]) -> list[str]:
        """`cmd` as run on `role`'s machine: here, this one."""
        return cmd

    def serving_tls(self) -> bool:
        """The proxy's public port completes a TLS handshake for `host`, and the SuperLink
        behind it (started after it) one on its loopback port, trusting our CA."""
        context = ssl.create_default_context(cafile=str(self.certs / deploy.CA_CERT))
        try:
            for host, port in ((self.host, self.port), ("127.0.0.1", self.internal_port)):
                with socket.create_connection((host, port), timeout=2) as raw, \
                        context.wrap_socket(raw, server_hostname=host):
                    pass
            return True
        except OSError:
            return False

    def running(self, run: subprocess.Popen) -> bool:
        """True while `privet run` (the process `run`) goes on; fails the test once it ended."""
        if run.poll() is not None:
            pytest.fail(f"`privet run` ended early ({run.returncode})\n{self.tails()}")
        return True

    def wait_for_rounds(self, run: subprocess.Popen, out: Path, rounds: int,
                        seconds: float) -> None:
        """Wait until `out`/rounds.csv holds `rounds` rounds while `privet run` goes on."""
        wait_for(f"round {rounds}", lambda: self.running(run) and len(
            read_csv(out / "rounds.csv")) >= rounds, seconds, self.tails)

    def tails(self) -> str:
        return "\n".join(f"--- {name}.log ---\n{self.processes.log(name)[-3000:]}"
                         for name, _ in self.processes.started)

    def cli(self, *args: str, timeout: float = 60, role: str = "operator"
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(self.where(role, list(args)), env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
        return done

    def start_superlink(self, name: str = "superlink") -> subprocess.Popen:
        """`privet deploy superlink` with its state in link/state.db (SQLite: a restart on
        the same file keeps runs and registered nodes), logged to <name>.log. nginx in
        front of it (skips the test without nginx)."""
        if deploy.find_nginx() is None:
            print("nginx not found (apt-get install nginx-light): skipping")
            pytest.skip("nginx not found: privet deploy superlink needs it as its proxy "
                        "(apt-get install nginx-light)")
        link = self.processes.start(name, self.where("superlink", [
            self.privet, "deploy", "superlink", "--certs", str(self.certs),
            "--host", self.host, "--port", str(self.port),
            "--internal-port", str(self.internal_port),
            "--database", str(self.root / "link" / "state.db")]),
            {**self.env, "FLWR_HOME": str(self.root / "link")}, self.root)

        def serving_tls() -> bool:
            if link.poll() is not None:
                pytest.fail(f"the SuperLink exited with {link.returncode}\n{self.tails()}")
            return self.serving_tls()

        wait_for("the SuperLink", serving_tls, 60, self.tails)
        self.cli(self.privet, "deploy", "connection", "test", "--superlink",
                 f"{self.host}:{self.port}", "--root-certificates",
                 str(self.certs / deploy.CA_CERT), "--operator-cert", str(self.operator_cert))
        return link

    def register(self, index: int) -> int:
        """`privet flwr supernode register` node-<index>.pub; its node id."""
        done = self.cli(self.privet, "flwr", "supernode", "register",
                        str(self.certs / "nodes" / f"node-{index}.pub"), "test",
                        "--format", "json")
        assert "node-id" in done.stdout, done.stdout + done.stderr + self.tails()
        return int(json.loads(done.stdout)["node-id"])

    def data(self, index: int) -> Path:
        return self.root / f"node{index}" / "data.csv"

    def start_supernode(self, index: int, node_port: int, name: str | None = None,
                        link_port: int | None = None, extra: tuple[str, ...] = ()
                        ) -> subprocess.Popen:
        """`privet deploy supernode` for participant `index` (its own key, data file and
        partition-id), logged to <name>.log; it dials the proxy, or `link_port`."""
        data = self.data(index)
        if not data.exists():
            node_csv(data, index)
        return self.processes.start(name or f"supernode{index}", self.where(f"node{index}", [
            self.privet, "deploy", "supernode", "--superlink",
            f"{self.host}:{link_port or self.port}",
            "--data", str(data), "--partition-id", str(index),
            "--root-certificates", str(self.certs / deploy.CA_CERT),
            "--key", str(self.certs / "nodes" / f"node-{index}.key"),
            "--port", str(node_port), *extra]),
            {**self.env, "FLWR_HOME": str(data.parent / "flwr")}, data.parent)

    def nodes(self) -> list[dict]:
        done = self.cli(self.privet, "flwr", "supernode", "list", "test", "--format", "json")
        return json.loads(done.stdout)["nodes"]

    def online(self) -> list[dict]:
        return [n for n in self.nodes() if n["status"] == "online"]

    def status(self, node_id: int) -> str:
        return next((n["status"] for n in self.nodes() if int(n["node-id"]) == node_id), "")


@pytest.mark.slow
def test_deployment_tls_node_auth_and_no_rows_at_the_superlink(tmp_path, processes):
    dep = Deployment(tmp_path, processes)
    dep.start_superlink()
    # a client that does not trust our CA is turned away
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", dep.port), timeout=5) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")

    for i in range(2):  # node 2's key is never registered
        dep.register(i)
    for i in range(3):
        dep.start_supernode(i, free_port())

    wait_for("2 SuperNodes online", lambda: len(dep.online()) == 2, 90, dep.tails)
    refused = processes.started[-1][1]
    wait_for("the unregistered SuperNode to be refused", lambda: refused.poll() is not None,
             60, dep.tails)
    assert refused.returncode != 0
    assert "Failed to activate SuperNode" in processes.log("supernode2")
    assert "No SuperNode found with the given public key" in processes.log("superlink")

    out = tmp_path / "run"
    run = subprocess.run(
        [dep.privet, "run", "--federation", "test", "--config", str(CONFIGS_DIR / "tiny.toml"),
         "--set", "rounds=2", "--set", "num-clients=2", "--set", "clients-per-round=2",
         "--set", 'evaluation.mode="federated"', "--out", str(out)],
        env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    (tmp_path / "run-output.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{dep.tails()}"
    assert "finished:completed" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == 2
    assert len(dep.online()) == 2  # the refused node never joined
    for i in range(2):  # each node keeps its ledger next to its own data
        assert list((tmp_path / f"node{i}").glob(".privet-ledger/spend/*-client*.json"))
    # and draws its DP noise from OS entropy: the seed in the run config is the server's
    assert summary["privacy"]["noise_source"] == "secure"
    assert {c["noise_source"] for c in summary["privacy"]["clients"].values()} == {"secure"}

    # nothing from any node's file reached the SuperLink: state database, logs, run output
    superlink_side = [*(tmp_path / "link").glob("state.db*"), tmp_path / "superlink.log",
                      tmp_path / "run-output.log", *out.iterdir()]
    assert any(p.name == "state.db" for p in superlink_side)
    for path in superlink_side:
        content = path.read_bytes()
        for planted in PLANTED:
            assert planted.encode() not in content, f"{planted} found in {path}"


@pytest.mark.slow
def test_deployment_node_policy_refuses_runs_and_apps_that_break_it(tmp_path, processes):
    """Nodes started with their own policy refuse, before any training, a run without DP
    and a modified app that ignores the config; a compliant run completes."""
    dep = Deployment(tmp_path, processes, nodes=2)
    dep.start_superlink()
    policy = ("--require-level", "sample", "--max-epsilon", "4", "--noise-source", "secure")
    for i in range(2):
        dep.register(i)
        dep.start_supernode(i, free_port(), extra=policy)
    wait_for("2 SuperNodes online", lambda: len(dep.online()) == 2, 90, dep.tails)
    wait_for("both launchers with the policy", lambda: all(
        "node policy: require-level=sample" in processes.log(f"supernode{i}")
        for i in range(2)), 180, dep.tails)
    base = ["--set", "rounds=1", "--set", "num-clients=2", "--set", "clients-per-round=2",
            "--set", 'privacy.train-metrics="off"']

    def privet_run(name: str, *sets: str) -> subprocess.CompletedProcess:
        run = subprocess.run(
            [dep.privet, "run", "--federation", "test", "--config",
             str(CONFIGS_DIR / "tiny.toml"), *base, *sets, "--out", str(tmp_path / name)],
            env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        (tmp_path / f"{name}-output.log").write_text(run.stdout + run.stderr)
        return run

    def spent() -> list[Path]:
        return [p for i in range(2)
                for p in (tmp_path / f"node{i}").glob(".privet-ledger/spend/*.json")]

    # 1. privacy.level = "none": every node refuses, nothing is spent, the operator sees why
    run = privet_run("none", "--set", 'privacy.level="none"')
    output = run.stdout + run.stderr
    assert "finished:completed" not in output
    assert "node policy: require-level" in output, output[-4000:]
    assert not spent()
    for i in range(2):
        lines = [line for line in processes.log(f"supernode{i}").splitlines()
                 if "node policy: require-level:" in line]
        assert len(lines) == 1, processes.log(f"supernode{i}")[-3000:]
        assert 'privacy.level = "none"' in lines[0]

    # 2. a modified app that ignores the config, with an otherwise compliant config
    evil = tmp_path / "evil"
    for part in ("privet", "experiments", "pyproject.toml", "README.md"):
        source = PROJECT_DIR / part
        if source.is_dir():
            shutil.copytree(source, evil / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, evil / part)
    app_py = evil / "privet" / "clients" / "app.py"
    app_py.write_text(app_py.read_text() + "\n# trains with sigma = 0 whatever the config\n")
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ["rounds=1", "num-clients=2",
                                                  "clients-per-round=2",
                                                  'privacy.train-metrics="off"',
                                                  f'out-dir="{tmp_path / "evil-out"}"'])
    config_file = deploy.run_config_file(cfg, tmp_path)
    run = subprocess.run([dep.privet, "flwr", "run", str(evil), "test", "--run-config",
                          str(config_file), "--stream"], env={**dep.env,
                                            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    (tmp_path / "evil-output.log").write_text(output)
    assert "node policy: installed-app" in output, output[-4000:]
    assert "privet/clients/app.py differs" in output
    assert not spent()
    for i in range(2):
        assert "node policy: installed-app:" in processes.log(f"supernode{i}")

    # 3. a compliant run completes, and is charged to the nodes' ledgers
    run = privet_run("ok")
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{dep.tails()}"
    assert "finished:completed" in run.stdout
    assert len(spent()) == 2


def read_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ledger_steps(path: Path) -> tuple[list[list], int]:
    """(spends, total DP-SGD steps) of a node's ledger record."""
    spends = json.loads(path.read_text())["spends"]
    return spends, sum(int(n) for _, _, n, purpose in spends if purpose == "dp-sgd")


@pytest.mark.slow
def test_deployment_node_lost_mid_run_and_restarted_resumes_its_ledger(tmp_path, processes):
    """A participant's SuperNode crashes (SIGKILL) after round 1: the run goes on with the
    other two (min-clients = 1) once Flower declares the node lost, metrics.csv records the
    loss, and the same node restarted (same key, data file and partition-id) rejoins and
    trains again, its ε resumed from the ledger file next to its data."""
    started = time.time()
    dep = Deployment(tmp_path, processes)
    dep.start_superlink()
    node_ids = {i: dep.register(i) for i in range(3)}
    ports = {i: free_port() for i in range(3)}
    nodes = {i: dep.start_supernode(i, ports[i]) for i in range(3)}
    wait_for("3 SuperNodes online", lambda: len(dep.online()) == 3, 90, dep.tails)

    out, rounds = tmp_path / "run", 6
    run = processes.start("run", [
        dep.privet, "run", "--federation", "test", "--config", str(CONFIGS_DIR / "tiny.toml"),
        "--set", f"rounds={rounds}", "--set", "num-clients=3", "--set", "clients-per-round=3",
        "--set", "min-clients=1", "--set", 'evaluation.mode="federated"', "--out", str(out)],
        dep.env, tmp_path)

    dep.wait_for_rounds(run, out, 1, 180)
    launcher = next(p for p in processes.ours() if "privet.experiments.launcher" in _cmdline(p)
                    and f"127.0.0.1:{ports[2]}" in _cmdline(p))
    os.killpg(nodes[2].pid, signal.SIGKILL)  # a crash: no deactivation, no goodbye
    nodes[2].wait(timeout=10)
    killed = time.time()
    # the launcher (its own session) sees its SuperNode gone and exits with it
    wait_for("node 2's launcher to exit", lambda: not _alive(launcher), 30, dep.tails)
    ledger = list(dep.data(2).parent.glob(".privet-ledger/spend/*-client2.json"))
    assert len(ledger) == 1, ledger
    history_at_kill, steps_at_kill = ledger_steps(ledger[0])
    assert steps_at_kill > 0

    # Flower declares it lost once it misses its heartbeats (interval 30 s, patience 2)
    wait_for("node 2 to be declared lost",
             lambda: dep.running(run) and dep.status(node_ids[2]) != "online", 120, dep.tails)
    lost = time.time()
    # the round in flight gets Flower's NODE_UNAVAILABLE reply at the ServerApp's next pull
    # (every 3 s); a node restarted before that could take that round's message itself
    wait_for("node 2's loss to be recorded", lambda: dep.running(run) and any(
        r["status"].startswith("error") for r in read_csv(out / "metrics.csv")), 60, dep.tails)
    killed_in_round = min(int(r["round"]) for r in read_csv(out / "metrics.csv")
                          if r["status"].startswith("error"))
    restarted = dep.start_supernode(2, ports[2], name="supernode2-restarted")
    wait_for("node 2 to come back", lambda: dep.running(run) and dep.status(node_ids[2]) == "online",
             90, dep.tails)
    back = time.time()

    try:
        run.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not finish\n{dep.tails()}")
    finished = time.time()
    log = processes.log("run")
    assert run.returncode == 0, f"{log[-4000:]}\n{dep.tails()}"
    assert "finished:completed" in log
    assert restarted.poll() is None, processes.log("supernode2-restarted")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == rounds
    per_round = read_csv(out / "rounds.csv")
    assert [int(r["round"]) for r in per_round] == list(range(1, rounds + 1))
    metrics = read_csv(out / "metrics.csv")

    # the loss is recorded: the round in flight got Flower's NODE_UNAVAILABLE error reply
    errors = [r for r in metrics if r["status"].startswith("error")]
    assert errors, metrics
    assert all(int(r["round"]) == killed_in_round for r in errors), errors
    assert "Node Unavailable" in errors[0]["status"], errors
    # Flower's error reply comes from the SuperLink (src_node_id 1); the recorder traces it
    # back to the node the message went to, and that node to the client it answered for
    assert [r["client"] for r in errors] == ["2"], errors
    trained = {(int(r["round"]), r["client"]) for r in metrics if r["status"] == "trained"}
    assert (killed_in_round, "2") not in trained
    for r in per_round:  # the others trained every round
        assert {(int(r["round"]), "0"), (int(r["round"]), "1")} <= trained, metrics
    # rounds after the loss, until the node is back, are trained by the remaining two
    after = [int(r["round"]) for r in per_round if int(r["round"]) > killed_in_round]
    rejoined = [n for n in after if (n, "2") in trained]
    assert rejoined, f"node 2 never trained again\n{metrics}\n{dep.tails()}"
    for r in per_round:
        n = int(r["round"])
        assert int(r["clients_trained"]) == (2 if killed_in_round <= n < rejoined[0] else 3), \
            per_round

    # the restarted node resumed its ledger from disk instead of starting from zero
    history, steps = ledger_steps(ledger[0])
    assert [h[:2] for h in history[:len(history_at_kill)]] == \
        [h[:2] for h in history_at_kill]
    step_rows = {int(r["round"]): int(r["steps"]) for r in metrics
                 if r["client"] == "2" and r["status"] == "trained"}
    assert steps == steps_at_kill + sum(s for n, s in step_rows.items() if n > killed_in_round)
    eps = {int(r["round"]): float(r["epsilon"]) for r in metrics
           if r["client"] == "2" and r["status"] == "trained"}
    assert eps[rejoined[0]] > max(e for n, e in eps.items() if n < killed_in_round)
    assert summary["privacy"]["clients"]["2"]["epsilon"] <= 2.0

    latencies = [round(float(b["elapsed_seconds"]) - float(a["elapsed_seconds"]), 2)
                 for a, b in zip([{"elapsed_seconds": 0}, *per_round], per_round)]
    (tmp_path / "timings.json").write_text(json.dumps({
        "killed_in_round": killed_in_round, "rejoined_round": rejoined[0],
        "kill_to_lost_s": round(lost - killed, 1), "lost_to_online_s": round(back - lost, 1),
        "round_seconds": latencies, "total_s": round(finished - started, 1)}))
    print(f"timings: {(tmp_path / 'timings.json').read_text()}")


@pytest.mark.slow
def test_deployment_superlink_restart_and_privet_run_resume(tmp_path, processes, request):
    """The SuperLink crashes (SIGKILL of its process group) after round 2 of 6 and is
    restarted on the same database and port: `privet run` says how to continue, the nodes
    reconnect by themselves, and `privet run --resume RUN_DIR` finishes the same run from
    its checkpoint. Each node's ledger holds one record for the run: the rounds it trained,
    plus a round in flight at the crash paid again (secure noise: a redo is a new release)."""
    from independent import pld_epsilon

    started = time.time()
    orphans = OrphanReaper(processes)  # as init would: Flower's processes watch parent PIDs
    request.addfinalizer(orphans.stop)  # before `processes` stops what is left
    dep = Deployment(tmp_path, processes)
    link = dep.start_superlink()
    for i in range(3):
        dep.register(i)
    for i in range(3):
        dep.start_supernode(i, free_port())
    wait_for("3 SuperNodes online", lambda: len(dep.online()) == 3, 90, dep.tails)

    out, rounds = tmp_path / "run", 6
    run = processes.start("run", [
        dep.privet, "run", "--federation", "test", "--config", str(CONFIGS_DIR / "tiny.toml"),
        "--set", f"rounds={rounds}", "--set", "num-clients=3", "--set", "clients-per-round=3",
        "--set", 'evaluation.mode="federated"', "--out", str(out)], dep.env, tmp_path)

    dep.wait_for_rounds(run, out, 2, 240)
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    os.killpg(link.pid, signal.SIGKILL)  # a crash: its SuperExec then exits, and its
    link.wait(timeout=10)                 # ServerApp with it (each watches its parent)
    killed = time.time()
    checkpointed = torch_round(out)
    try:
        run.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`privet run` did not notice the SuperLink was gone\n{dep.tails()}")
    assert run.returncode != 0
    told = processes.log("run")
    assert f"privet run --federation test --resume {out}" in told, told[-3000:]

    dep.start_superlink(name="superlink-restarted")
    restarted = time.time()
    wait_for("3 SuperNodes online again", lambda: len(dep.online()) == 3, 180, dep.tails)
    back = time.time()

    # another experiment than the checkpoint's is refused by the ServerApp, in one line
    refused = subprocess.run([
        dep.privet, "run", "--federation", "test", "--resume", str(out), "--config",
        str(CONFIGS_DIR / "tiny.toml"), "--set", "rounds=7", "--set", "num-clients=3",
        "--set", "clients-per-round=3", "--set", 'evaluation.mode="federated"'],
        env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said[-3000:]
    assert said.splitlines()[-1].startswith("privet: error: cannot resume: "), said[-3000:]
    assert "written under another config" in said.splitlines()[-1]
    assert "continue the run with" not in said

    resumed = processes.start("resume", [dep.privet, "run", "--federation", "test",
                                         "--resume", str(out)], dep.env, tmp_path)
    try:
        resumed.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed run did not finish\n{dep.tails()}")
    finished = time.time()
    log = processes.log("resume")
    assert resumed.returncode == 0, f"{log[-4000:]}\n{dep.tails()}"
    assert "finished:completed" in log and f"resuming after round {checkpointed}" in log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == rounds
    assert summary["run_id"] == run_id
    assert [int(r["round"]) for r in read_csv(out / "rounds.csv")] == \
        list(range(1, rounds + 1))
    metrics = read_csv(out / "metrics.csv")
    privacy = summary["privacy"]
    redone_total = 0
    for i in range(3):
        ledgers = list(dep.data(i).parent.glob(f".privet-ledger/spend/*-client{i}.json"))
        assert len(ledgers) == 1, ledgers  # one record: the resumed run kept its run id
        record = json.loads(ledgers[0].read_text())
        assert record["run"] == run_id
        spends, steps = ledger_steps(ledgers[0])
        rows = [r for r in metrics if r["client"] == str(i) and r["status"] == "trained"]
        trained = sorted(int(r["round"]) for r in rows)
        # every round once; the last may be declined: the redo spent part of the budget
        assert trained == list(range(1, len(trained) + 1)) and len(trained) >= rounds - 1, \
            metrics
        per_round = {int(r["steps"]) for r in rows}
        assert len(per_round) == 1, rows
        paid = record["releases"]
        assert set(paid) == {f"train-{n}" for n in trained}, paid
        # a secure redo is paid again; a round the server checkpointed is never redone
        redone = [name for name, prints in paid.items() if len(prints) == 2]
        assert all(len(prints) in (1, 2) for prints in paid.values()), paid
        assert all(int(name.split("-")[1]) > checkpointed for name in redone), paid
        redone_total += len(redone)
        assert steps == per_round.pop() * (len(trained) + len(redone)), (spends, paid)
        # ε in summary.json: dp-accounting's own PLD of what the ledger recorded
        reference = pld_epsilon([(s, q, n) for s, q, n, _ in spends], privacy["delta"])
        epsilon = privacy["clients"][str(i)]["epsilon"]
        assert reference * (1 - 1e-9) <= epsilon <= reference * 1.01, (epsilon, reference)

    (tmp_path / "timings.json").write_text(json.dumps({
        "checkpointed_round": checkpointed, "rounds_redone_on_nodes": redone_total,
        "declined": sorted((r["round"], r["client"]) for r in metrics
                           if r["status"] == "declined"),
        "kill_to_restart_s": round(restarted - killed, 1),
        "restart_to_nodes_online_s": round(back - restarted, 1),
        "resume_s": round(finished - back, 1), "total_s": round(finished - started, 1)}))
    print(f"timings: {(tmp_path / 'timings.json').read_text()}")


class OrphanReaper:
    """Reaps, every half second, the processes that end orphaned below the test (it is their
    child subreaper) and that it did not start itself, as init would. Flower's SuperExec and
    ServerApp exit when their parent's PID is gone, and a zombie parent's PID is not."""

    def __init__(self, processes: Processes) -> None:
        import threading

        self.processes, self.done = processes, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            started = {proc.pid for _, proc in self.processes.started}
            for pid in _children().get(os.getpid(), []):
                if pid not in started and not _alive(pid):
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def torch_round(run_dir: Path) -> int:
    """The round the run directory's checkpoint holds."""
    import pickle

    with open(run_dir / "checkpoint.pkl", "rb") as handle:
        return int(pickle.load(handle)["round"])


@pytest.mark.slow
def test_deployment_reports_the_nodes_data_brings_results_back_and_refuses_duplicates(
        tmp_path, processes):
    """Issue 19 items 3-5 with real processes: partitions.csv is what the nodes hold (server
    evaluation, the SuperLink holding Adult itself), the result files come back to the
    operator's --results-to, two nodes with one partition-id fail the run before any ledger
    records spend, and a node told --insecure at the TLS port says so and exits."""
    import csv

    dep = Deployment(tmp_path, processes)
    dep.start_superlink()
    # a plaintext node at the TLS port: one line, non-zero, before Flower retries forever
    plain = subprocess.run(
        [dep.privet, "deploy", "supernode", "--superlink", f"127.0.0.1:{dep.port}", "--insecure",
         "--data", str(PROJECT_DIR / "pyproject.toml"), "--partition-id", "0",
         "--port", str(free_port())],
        env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    assert "speaks TLS but this node was started with --insecure" in plain.stderr, plain.stderr

    for i in range(3):
        dep.register(i)
    for i in range(2):
        node_csv(dep.data(i), i, rows=1500 + 300 * i)  # different sizes: 1500 and 1800 rows
        dep.start_supernode(i, free_port())
    wait_for("2 SuperNodes online", lambda: len(dep.online()) == 2, 90, dep.tails)

    out, local = tmp_path / "run", tmp_path / "operator-results"
    args = [dep.privet, "run", "--federation", "test", "--config",
            str(CONFIGS_DIR / "tiny.toml"), "--set", "rounds=1", "--set", "num-clients=2",
            "--set", "clients-per-round=2"]
    run = subprocess.run(args + ["--out", str(out), "--results-to", str(local)],
                         env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{dep.tails()}"
    with open(out / "partitions.csv", newline="") as f:
        parts = {int(r["client"]): int(r["rows"]) for r in csv.DictReader(f)}
    held = {i: sum(1 for _ in open(dep.data(i))) - 1 for i in range(2)}
    assert parts == held == {0: 1500, 1: 1800}
    summary = json.loads((out / "summary.json").read_text())
    assert "label counts" in summary["privacy"]["released_in_clear"]["0"]
    # the results came back, byte for byte, and the block was not echoed
    assert "privet-results:" not in run.stdout
    assert f"privet: results copied to {local.resolve()}" in run.stdout
    expected = {"summary.json", "config.toml", "rounds.csv", "metrics.csv", "partitions.csv",
                "model.json", "model.pt"}
    assert expected <= {p.name for p in local.iterdir()}
    for path in local.iterdir():
        assert path.read_bytes() == (out / path.name).read_bytes(), path.name

    # a third node claims partition-id 1: refused before anyone trains or spends
    ledgers = {p: p.read_bytes() for i in range(2)
               for p in (tmp_path / f"node{i}").rglob(".privet-ledger/**/*") if p.is_file()}
    node_csv(dep.data(2), 2)
    processes.start("supernode-dup", [
        dep.privet, "deploy", "supernode", "--superlink", f"127.0.0.1:{dep.port}",
        "--data", str(dep.data(2)), "--partition-id", "1",
        "--root-certificates", str(dep.certs / deploy.CA_CERT),
        "--key", str(dep.certs / "nodes" / "node-2.key"), "--port", str(free_port())],
        {**dep.env, "FLWR_HOME": str(tmp_path / "node2" / "flwr")}, tmp_path / "node2")
    wait_for("3 SuperNodes online", lambda: len(dep.online()) == 3, 90, dep.tails)
    dup = subprocess.run([*args[:-4], "--set", "num-clients=3", "--set", "clients-per-round=3",
                          "--out", str(tmp_path / "dup")],
                         env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert dup.returncode != 0
    line = next((x for x in dup.stderr.splitlines() if "is used by two nodes" in x), "")
    assert "privet: error: partition-id 1 is used by two nodes (" in line, \
        f"{dup.stdout[-3000:]}\n{dup.stderr[-2000:]}"
    assert {p: p.read_bytes() for p in ledgers} == ledgers  # nothing more spent
    assert not list((tmp_path / "node2").rglob(".privet-ledger/spend/*.json"))
    assert json.loads((tmp_path / "dup" / "summary.json").read_text())["status"] == "failed"


def test_privet_flwr_presents_the_operator_certificate_for_its_address(tmp_path, monkeypatch):
    """Flower's Control API client, under privet flwr, loads the operator certificate for
    the address it dials, and only for that one."""
    from flwr.supercore.control.control_http_client import ControlHttpClient

    from privet.experiments import flwr_operator

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    deploy.make_certs(tmp_path / "certs", ["127.0.0.1"], operators=1)
    deploy.write_operator_credential("127.0.0.1:9", tmp_path / "certs/operators/operator-0.pem")
    loaded = []
    original_load = ssl.SSLContext.load_cert_chain
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain",
                        lambda self, *a, **k: loaded.append(a) or original_load(self, *a, **k))
    monkeypatch.setattr(ControlHttpClient, "from_server_address",
                        ControlHttpClient.from_server_address)  # undone after the test
    flwr_operator.install()
    ca = (tmp_path / "certs" / deploy.CA_CERT).read_bytes()
    ControlHttpClient.from_server_address("127.0.0.1:9", False, ca, []).close()
    assert loaded == [(str((tmp_path / "certs/operators/operator-0.pem").resolve()),
                       str((tmp_path / "certs/operators/operator-0.key").resolve()))]
    ControlHttpClient.from_server_address("127.0.0.1:10", False, ca, []).close()
    assert len(loaded) == 1  # another SuperLink: Flower's own client, no certificate


def _attacker_home(home: Path, address: str, ca: Path) -> Path:
    """An unrelated flwr configuration, as anyone holding the public CA certificate writes."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "t"\n[superlink.t]\n'
                                      f'address = "{address}"\nroot-certificates = "{ca}"\n')
    return home


def _round_seconds(run_dir: Path) -> list[float]:
    """Seconds between the ends of consecutive rounds (round 1 also pays the start)."""
    ends = [float(r["elapsed_seconds"]) for r in read_csv(run_dir / "rounds.csv")]
    return [round(b - a, 3) for a, b in zip(ends, ends[1:])]


@pytest.mark.slow
def test_control_api_only_for_operators(tmp_path, processes):
    """The case control-api-unauthenticated, against privet deploy superlink (nginx in front):
    with only the CA, or with a certificate from another CA, flwr ls / run / supernode
    register are refused and no ClientApp runs anywhere; the operator's certificate works;
    the SuperNodes notice nothing. Then the same short run without the proxy (nodes and
    operator dialing the SuperLink's loopback port), for the per-round latency."""
    dep = Deployment(tmp_path, processes, nodes=2)
    dep.start_superlink()
    for i in range(2):
        dep.register(i)
    nodes = [dep.start_supernode(i, free_port()) for i in range(2)]
    wait_for("2 SuperNodes online", lambda: len(dep.online()) == 2, 90, dep.tails)
    flwr_env = {**dep.env, **deploy.NO_INSTALL}
    address = f"127.0.0.1:{dep.port}"
    rogue_key = tmp_path / "rogue" / "rogue.key"
    deploy.make_node_key(rogue_key)
    other = tmp_path / "other-certs"  # a look-alike operator CA and certificate
    deploy.make_certs(other, ["127.0.0.1"], operators=1)

    def attempt(home: Path, cmd: list[str], what: str) -> str:
        done = subprocess.run(cmd, env={**flwr_env, "FLWR_HOME": str(home)}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        out = done.stdout + done.stderr
        (tmp_path / f"attempt-{what}.log").write_text(out)
        assert done.returncode != 0, f"{what} was let in:\n{out[-3000:]}"
        return out

    attack_out = tmp_path / "attack-out"
    run_config = (f'rounds=1 num-clients=2 clients-per-round=2 name="attack" '
                  f'privacy.level="none" out-dir="{attack_out}"')
    # (a) only the CA: Flower's own flwr, and privet flwr without a credential
    bare = _attacker_home(tmp_path / "attacker", address, dep.certs / deploy.CA_CERT)
    for what, cmd in {
        "ls": [dep.flwr, "ls", "t"],
        "register": [dep.flwr, "supernode", "register", str(rogue_key.with_suffix(".pub")), "t"],
        "run": [dep.flwr, "run", str(PROJECT_DIR), "t", "--run-config", run_config, "--stream"],
        "privet-flwr-ls": [dep.privet, "flwr", "ls", "t"],
        "log": [dep.flwr, "log", "1", "t", "--show"],
    }.items():
        assert "403" in attempt(bare, cmd, what), what
    # (b) a client certificate from another CA
    wrong = _attacker_home(tmp_path / "wrong", address, dep.certs / deploy.CA_CERT)
    deploy_env = {**flwr_env, "FLWR_HOME": str(wrong)}
    subprocess.run([dep.privet, "deploy", "connection", "t", "--superlink", address,
                    "--root-certificates", str(dep.certs / deploy.CA_CERT), "--operator-cert",
                    str(other / deploy.OPERATORS_DIR / "operator-0.pem")],
                   env=deploy_env, check=True, capture_output=True)
    for what, cmd in {
        "wrong-ls": [dep.privet, "flwr", "ls", "t"],
        "wrong-register": [dep.privet, "flwr", "supernode", "register",
                           str(rogue_key.with_suffix(".pub")), "t"],
        "wrong-run": [dep.privet, "flwr", "run", str(PROJECT_DIR), "t", "--run-config",
                      run_config, "--stream"],
    }.items():
        out = attempt(wrong, cmd, what)
        assert "400" in out or "403" in out, what
    # the Runtime API (the ServerApp's) and everything else is not served through the proxy
    import httpx

    context = ssl.create_default_context(cafile=str(dep.certs / deploy.CA_CERT))
    for path in ("/v1/runtime/pull-messages", "/docs", "/openapi.json"):
        assert httpx.post(f"https://{address}{path}", verify=context).status_code == 404, path
    # nor does a Control API path dressed up as a Fleet one get through (sent as is)
    import http.client

    for path in ("/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                 "/v1/fleet%2F..%2Fcontrol/list-runs", "//v1/control/list-runs",
                 "/v1/fleet/../runtime/pull-messages", "/v1/Control/list-runs"):
        conn = http.client.HTTPSConnection("127.0.0.1", dep.port, context=context, timeout=10)
        conn.request("POST", path, body=b"")
        assert conn.getresponse().status in (403, 404), path
        conn.close()

    # nothing ran: no run at the SuperLink, no ledger at any node, no output; nodes online
    listed = json.loads(dep.cli(dep.privet, "flwr", "ls", "test", "--format", "json").stdout)
    assert listed["runs"] == [], listed
    assert not attack_out.exists()
    for i in range(2):
        assert not (tmp_path / f"node{i}" / ".privet-ledger").exists()
        assert nodes[i].poll() is None
    assert len(dep.online()) == 2 and len(dep.nodes()) == 2  # the rogue key never registered
    control = (tmp_path / "link" / "proxy" / "control.log").read_text()
    assert " NONE POST /v1/control/start-run 403" in control, control
    assert "CN=privet operator 0,O=privet" in control

    # (c) the operator: privet run through the proxy
    def privet_run(federation: str, out: Path) -> list[float]:
        run = subprocess.run(
            [dep.privet, "run", "--federation", federation, "--config",
             str(CONFIGS_DIR / "tiny.toml"), "--set", "rounds=5", "--set", "num-clients=2",
             "--set", "clients-per-round=2", "--out", str(out)],
            env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        (tmp_path / f"run-{federation}.log").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{dep.tails()}"
        assert "finished:completed" in run.stdout
        return _round_seconds(out)

    proxied = privet_run("test", tmp_path / "run-proxied")
    assert len(dep.online()) == 2

    # the same run without the proxy: nodes and operator dial the SuperLink's own port
    # (each node with a fresh ledger: the first run spent the budget of these rows)
    for proc in nodes:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in nodes:
        proc.wait(timeout=30)
    wait_for("the nodes to go offline", lambda: not dep.online(), 60, dep.tails)
    for i in range(2):
        dep.start_supernode(i, free_port(), name=f"direct{i}", link_port=dep.internal_port,
                            extra=("--ledger-dir", str(tmp_path / f"ledger-direct{i}")))
    wait_for("2 SuperNodes online, direct", lambda: len(dep.online()) == 2, 90, dep.tails)
    dep.cli(dep.privet, "deploy", "connection", "direct", "--superlink",
            f"127.0.0.1:{dep.internal_port}", "--root-certificates",
            str(dep.certs / deploy.CA_CERT), "--operator-cert", str(dep.operator_cert))
    direct = privet_run("direct", tmp_path / "run-direct")
    assert len(proxied) == len(direct) == 4, (proxied, direct)
    mean = lambda xs: round(sum(xs) / len(xs), 3)  # noqa: E731
    report = {"rounds_2_to_5_seconds": {"proxied": proxied, "direct": direct},
              "mean_round_seconds": {"proxied": mean(proxied), "direct": mean(direct)}}
    print("per-round latency, tiny run, 2 nodes:", json.dumps(report))
    (tmp_path / "latency.json").write_text(json.dumps(report))

"""Deployment on Flower's SuperLink and SuperNodes: certificates, the command lines that
start them securely, the CLI's connection entry, and `privet run`.

Everything here builds inputs for Flower's own commands (`flower-superlink`,
`flower-supernode`, `flwr run`); nothing replaces them, so the plain Flower commands the
README shows keep working with the same files.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from privet.common import carried
from privet.common.config import PROJECT_DIR, ExperimentConfig

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "privet.server.pem", "privet.server.key"
NODES_DIR = "nodes"
# One HTTPS port carries the Fleet (SuperNodes), Control (flwr CLI) and Runtime (ServerApp)
# APIs of a SuperLink in Flower 1.41; a SuperNode serves its Runtime API (ClientApp) locally.
SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
INSECURE_WARNING = ("insecure mode: no TLS and no SuperNode authentication; model updates "
                    "travel in the clear and any machine that reaches the port can join. "
                    "Use it only on a trusted, isolated network.")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")


# --- certificates and keys --------------------------------------------------------------

@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[tuple[Path, Path], ...]  # (private, public) per node
    new_ca: bool


def _write_private(path: Path, data: bytes) -> None:
    """Create the file 0600 from the start, so the key is never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def subject_names(hosts: list[str], loopback: bool) -> list:
    """SANs for the SuperLink certificate: IP literals as IP SANs, the rest as DNS SANs."""
    from cryptography import x509

    if not hosts:  # loopback alone would fail every remote SuperNode's TLS check
        raise ValueError("give at least one --host: the name or IP the SuperNodes dial")
    names: list = []
    wanted = list(hosts) + (["localhost", "127.0.0.1", "::1"] if loopback else [])
    for host in wanted:
        host = host.strip().strip("[]")
        try:
            name = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS_NAME.match(host):
                raise ValueError(f"--host {host!r}: not an IP address or a DNS name") from None
            name = x509.DNSName(host.lower())
        if name not in names:
            names.append(name)
    return names


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def _load_ca(out: Path, days: int):
    """The CA in `out`, or a new one: re-running `certs` (more hosts, more nodes) must keep
    the CA every SuperNode already trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return cert, key, False
    if cert_path.exists() or key_path.exists():
        raise ValueError(f"{out}: holds only one of {CA_CERT} and {CA_KEY}; "
                         "remove it or restore the other")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("privet deployment CA")).issuer_name(_name("privet deployment CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, True


def issue_server_cert(out: Path, hosts: list[str], loopback: bool, days: int,
                      ca_cert, ca_key) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = subject_names(hosts, loopback)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(str(names[0].value))).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days),
                                 ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(out / SERVER_KEY, _pem_key(key))
    _write_public(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(private_path: Path, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair, in the formats Flower 1.41 reads: an
    unencrypted OpenSSH private key (`flower-supernode --auth-supernode-private-key`) and
    an OpenSSH public key on a NIST curve (`flwr supernode register`). P-384, as Flower's
    docs use."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    public_path = private_path.with_suffix(".pub")
    if private_path.exists() and not force:
        return private_path, public_path
    key = ec.generate_private_key(ec.SECP384R1())
    comment = f" privet-{private_path.stem}".encode()
    _write_private(private_path, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH,
                                                   s.NoEncryption()))
    _write_public(public_path, key.public_key().public_bytes(
        s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + comment + b"\n")
    return private_path, public_path


def make_certs(out: Path, hosts: list[str], nodes: int = 0, *, loopback: bool = True,
               days: int = 365) -> CertFiles:
    """CA (kept if `out` already has one), a fresh SuperLink certificate for `hosts`, and
    node key pairs `nodes/node-<i>` for i < `nodes` (existing ones are kept).

    `loopback` adds localhost, 127.0.0.1 and ::1: a SuperLink bound to 0.0.0.0 starts its
    ServerApp runner (SuperExec) against 127.0.0.1 with the same CA, which then has to match.
    """
    subject_names(hosts, loopback)  # fail on a bad host before writing anything
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, new_ca = _load_ca(out, days)
    issue_server_cert(out, hosts, loopback, days, ca_cert, ca_key)
    keys = tuple(make_node_key(out / NODES_DIR / f"node-{i}.key") for i in range(nodes))
    return CertFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY, keys, new_ca)


# --- command lines ----------------------------------------------------------------------

def flower_env() -> dict[str, str]:
    """Environment for Flower's processes: never pip/uv-install the app's dependencies (it
    would pull a multi-GB CUDA torch), and find flower-superexec next to this Python."""
    env = {**os.environ, **NO_INSTALL}
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def flower_bin(name: str) -> str:
    """A Flower command from this environment (the one privet runs in), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def runner_must_match(server_cert: Path, host: str) -> None:
    """flower-superlink starts its ServerApp runner (SuperExec) against its own --host, with
    0.0.0.0 / :: replaced by 127.0.0.1 / ::1, over TLS with the same CA: a certificate that
    does not name that address leaves the SuperLink up but no run ever starts (the SuperExec
    dies at a failed handshake, in the SuperLink's log only). Refuse that before starting."""
    from cryptography import x509

    bare = host.strip().strip("[]")
    dialed = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bare, bare)
    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    try:
        valid = ipaddress.ip_address(dialed) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        valid = dialed.lower() in names.get_values_for_type(x509.DNSName)
    if not valid:
        via = f" (what it dials when listening on {host})" if dialed != bare else ""
        raise ValueError(
            f"{server_cert} is not valid for {dialed}, the address the SuperLink's own "
            f"ServerApp runner dials{via}: no run would start. Listen on an address the "
            "certificate names (--host), or re-issue it with `privet deploy certs --out "
            f"{server_cert.parent} --host ... --loopback`")


def superlink_command(certs: Path | None, database: Path, *, host: str = "0.0.0.0",
                      port: int = SUPERLINK_PORT, log_file: Path | None = None) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication, a state database on disk and
    no runtime dependency installation; `certs=None` is the insecure mode."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(database.resolve()),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd += ["--insecure"]
    else:
        certs = certs.resolve()
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (certs / name).is_file():
                raise FileNotFoundError(f"{certs / name} not found; create it with "
                                        f"`privet deploy certs --out {certs} --host ...`")
        runner_must_match(certs / SERVER_CERT, host)
        cmd += ["--ssl-ca-certfile", str(certs / CA_CERT),
                "--ssl-certfile", str(certs / SERVER_CERT),
                "--ssl-keyfile", str(certs / SERVER_KEY), "--enable-supernode-auth"]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    return cmd


def node_config(partition_id: int, data_path: Path, extra: dict[str, str] | None = None) -> str:
    """`--node-config` for the ClientApp: its client id and its own data file. Values are
    TOML basic strings; Flower's parser ends one at the next double quote."""
    items = {"partition-id": partition_id, "data-path": str(data_path.resolve()),
             **(extra or {})}
    parts = []
    for key, value in items.items():
        if isinstance(value, int):
            parts.append(f"{key}={value}")
            continue
        if any(c in str(value) for c in '"\\\n'):
            raise ValueError(f"node-config {key} = {value!r}: Flower's --node-config cannot "
                             "carry double quotes, backslashes or newlines; move or link "
                             "the file")
        parts.append(f'{key}="{value}"')
    return " ".join(parts)


def supernode_command(superlink: str, data_path: Path, partition_id: int, *,
                      root_certificates: Path | None, private_key: Path | None,
                      port: int = SUPERNODE_PORT, isolation: str = "subprocess",
                      ledger_dir: Path | None = None,
                      min_noise: float | None = None) -> list[str]:
    """`flower-supernode` for one participant (run by privet.experiments.supernode: a 10 s
    heartbeat); `root_certificates=None` is insecure mode. `min_noise`: the node's floor on
    σ, for the ClientApp (node-config `min-noise`)."""
    extra = {"ledger-dir": str(ledger_dir.resolve())} if ledger_dir else {}
    if min_noise is not None:
        extra["min-noise"] = repr(float(min_noise))
    # Flower's flower-supernode, its heartbeat every 10 s (privet.experiments.supernode)
    cmd = [sys.executable, "-m", "privet.experiments.supernode", "--superlink", superlink,
           "--node-config", node_config(partition_id, data_path, extra),
           "--isolation", isolation, "--port", str(port)]
    if root_certificates is None:
        cmd += ["--insecure"]
    else:
        if private_key is None:
            raise ValueError("a secure SuperNode needs its private key (--key)")
        for path in (root_certificates, private_key):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
        cmd += ["--root-certificates", str(root_certificates.resolve()),
                "--auth-supernode-private-key", str(private_key.resolve())]
    return cmd


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# --- the flwr CLI's connection ----------------------------------------------------------

def write_connection(name: str, address: str, root_certificates: Path | None,
                     *, default: bool = False) -> Path:
    """Add or replace `[superlink.<name>]` in $FLWR_HOME/config.toml (Flower 1.41 keeps
    SuperLink connections there; `flwr run . <name>` and `flwr supernode ...` read it).
    `root_certificates=None` writes an insecure connection."""
    from flwr.cli.flower_config import (
        read_flower_config,
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    if root_certificates is not None:
        root_certificates = root_certificates.expanduser().resolve()
        if not root_certificates.is_file():
            raise FileNotFoundError(f"{root_certificates} not found")
    read_flower_config()  # creates the default file on first use
    write_superlink_connection(SuperLinkConnection(
        name=name, address=address,
        root_certificates=str(root_certificates) if root_certificates else None,
        insecure=True if root_certificates is None else None))
    if default:
        set_default_superlink_connection(name)
    return get_flwr_home() / "config.toml"


# --- privet run -------------------------------------------------------------------------

def run_config_file(cfg: ExperimentConfig, directory: Path,
                    execution: dict | None = None) -> Path:
    """The resolved experiment as a TOML file for `flwr run --run-config FILE`: Flower
    flattens a file's tables itself, while its `key=value` string form cannot carry values
    with quotes (e.g. `preprocess.missing-markers`). `execution`: how to run it, not what
    (config.EXECUTION_KEYS: `resume`, `pause-after`), as top-level keys."""
    path = directory / "run-config.toml"
    head = "".join(f"{key} = {json.dumps(value)}\n" for key, value in (execution or {}).items())
    path.write_text(head + cfg.to_toml(run_config=True), encoding="utf-8")
    return path


def run_command(federation: str, run_config: Path, *, app_dir: Path = PROJECT_DIR,
                stream: bool = True) -> list[str]:
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} has no pyproject.toml: `privet run` submits the "
                                "app from a privet checkout (pip install -e .)")
    cmd = [flower_bin("flwr"), "run", str(app_dir), federation, "--run-config", str(run_config)]
    return cmd + (["--stream"] if stream else [])


RUN_STARTED = re.compile(r"Successfully started run (\d+)")
RUN_DIRECTORY = re.compile(r"privet: run directory (\S.*?)\s*$")  # the ServerApp's line
PRIVET_ERROR = re.compile(r"(privet: error: .*?)\s*$")
LINK_LOST = "Connection to the SuperLink is unavailable"


@dataclass
class Streamed:
    """What `run` saw: flwr's exit code, the run id, the run directory the ServerApp named
    (on the SuperLink's machine), its `privet: error:` lines, and whether flwr lost the
    SuperLink."""
    code: int
    run_id: int | None = None
    run_dir: str | None = None
    errors: list[str] | None = None
    link_lost: bool = False
    results: carried.Reader = field(default_factory=carried.Reader)  # the files carried back


def run(cfg: ExperimentConfig, federation: str, *, echo=print,
        run_config: dict | None = None) -> Streamed:
    """Submit `cfg` (with `run_config`'s keys added: `resume`, `pause-after`) to the
    SuperLink behind connection `federation` and stream its logs until it ends; the result
    files the ServerApp writes into its log at the end (common.carried) are collected in
    `results`, not echoed."""
    with tempfile.TemporaryDirectory(prefix="privet-run-") as tmp:
        cmd = run_command(federation, run_config_file(cfg, Path(tmp), run_config))
        seen = Streamed(0, errors=[])
        proc = subprocess.Popen(cmd, env=flower_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if seen.results.feed(line):  # the results carried back: not for the console
                    continue
                echo(line.rstrip("\n"))
                if seen.run_id is None and (found := RUN_STARTED.search(line)):
                    seen.run_id = int(found.group(1))
                if seen.run_dir is None and (found := RUN_DIRECTORY.search(line)):
                    seen.run_dir = found.group(1)
                if found := PRIVET_ERROR.search(line):
                    seen.errors.append(found.group(1))
                seen.link_lost = seen.link_lost or LINK_LOST in line
            seen.code = proc.wait()
            return seen
        except KeyboardInterrupt:
            # The run goes on on the SuperLink; say how to stop it rather than orphan it.
            proc.terminate()
            proc.wait()
            if seen.run_id is not None:
                echo(f"privet: stopped streaming; the run goes on. Stop it with: "
                     f"flwr stop {seen.run_id} {federation}")
            raise


def _flwr_json(args: list[str]) -> dict:
    out = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=flower_env(),
                         capture_output=True, text=True, timeout=60)
    try:
        found = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def online_nodes(federation: str) -> int | None:
    """SuperNodes online at the SuperLink (`flwr supernode list`); None if it cannot say."""
    found = _flwr_json(["supernode", "list", federation])
    if not found.get("success"):
        return None
    return sum(node.get("status") == "online" for node in found.get("nodes", []))


def run_status(run_id: int, federation: str) -> str:
    """The run's status as `flwr ls` reports it, e.g. `finished:completed`; "" if unknown."""
    runs = _flwr_json(["ls", federation, "--run-id", str(run_id)]).get("runs") or [{}]
    return str(runs[0].get("status", ""))


def speaks_tls(address: str, timeout: float = 3.0) -> bool | None:
    """Whether the SuperLink at HOST:PORT answers a TLS handshake (True), answers it in
    plain text (False: a SuperLink started with --insecure), or cannot be asked (None: not
    reachable, or it hung up). No certificate is checked: this only asks what the port
    speaks, before Flower retries a mismatched connection forever without saying why."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=host or None):
                    return True
            except ssl.SSLEOFError:
                return None  # hung up: cannot tell
            except ssl.SSLError:
                return False  # answered, but not in TLS (an HTTP 400, say)
    except (OSError, ValueError):
        return None


def tls_mismatch(address: str, insecure: bool, timeout: float = 3.0) -> str:
    """One line when the SuperLink at `address` speaks TLS and the node was told
    --insecure, or the other way round; "" when they agree or the SuperLink cannot be
    asked (Flower then retries until it is up)."""
    tls = speaks_tls(address, timeout)
    if tls is True and insecure:
        return (f"the SuperLink at {address} speaks TLS but this node was started with "
                "--insecure; give --root-certificates ca.pem and --key node.key instead")
    if tls is False and not insecure:
        return (f"the SuperLink at {address} does not speak TLS (it was started with "
                "--insecure); start this node with --insecure too, or the SuperLink with "
                "--certs")
    return ""

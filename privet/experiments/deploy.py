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
# the SuperLink's own listener behind the proxy, on loopback only (localhost, 127.0.0.1, ::1):
# the proxy and the SuperLink's ServerApp runner dial it there, whatever names the public
# certificate has (`privet deploy certs --no-loopback`)
INTERNAL_CERT, INTERNAL_KEY = "privet.internal.pem", "privet.internal.key"
NODES_DIR = "nodes"
# Operators: their own CA (only it opens the Control API at the proxy) and client certificates
OPERATORS_DIR = "operators"
OPERATOR_CA, OPERATOR_CA_KEY = "operator-ca.pem", "operator-ca.key"
OPERATOR_CREDENTIALS = "privet-operators.toml"  # in $FLWR_HOME, next to Flower's config.toml
PROXY_DIR = "proxy"  # next to the SuperLink's database: nginx.conf, its pid, logs, temp files
# One HTTPS port carries the Fleet (SuperNodes), Control (flwr CLI) and Runtime (ServerApp)
# APIs of a SuperLink in Flower 1.41; a SuperNode serves its Runtime API (ClientApp) locally.
SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
INSECURE_WARNING = ("insecure mode: no TLS and no SuperNode authentication; model updates "
                    "travel in the clear and any machine that reaches the port can join. "
                    "Use it only on a trusted, isolated network.")
INSECURE_LINK_WARNING = ("INSECURE SUPERLINK: no TLS, no SuperNode authentication and NO "
                         "operator authentication: anyone who reaches the port can list, read "
                         "and stop runs, register nodes and submit a run, whose code then runs "
                         "on this machine and on every SuperNode.")
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
    operators: tuple[tuple[Path, Path], ...] = ()  # (certificate, key) per operator


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
    the CA every SuperNode already trusts. (certificate, key, whether it is new)."""
    return _kept_or_new_ca(out / CA_CERT, out / CA_KEY, "privet deployment CA", days)


def _kept_or_new_ca(cert_path: Path, key_path: Path, subject: str, days: int):
    """The CA at `cert_path`/`key_path` (kept), or a new self-signed one (ECDSA P-384,
    path length 0) named `subject`. Raises ValueError when only one of the two files is
    there. Returns (certificate, key, whether it is new)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return cert, key, False
    if cert_path.exists() or key_path.exists():
        raise ValueError(f"{cert_path.parent}: holds only one of {cert_path.name} and "
                         f"{key_path.name}; remove it or restore the other")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(_name(subject))
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


def _issue_leaf(cert_path: Path, key_path: Path, subject: str, usage, days: int, ca_cert,
                ca_key, names=None) -> None:
    """A new ECDSA P-384 key and its certificate for `subject`, signed by the CA (valid for
    `days`, never past the CA), with extended key usage `usage` (an ExtendedKeyUsageOID) and
    subject alternative names `names` (None: none); written to `cert_path` and `key_path`
    (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(min(now + datetime.timedelta(days=days),
                                    ca_cert.not_valid_after_utc)))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def issue_server_cert(out: Path, hosts: list[str], loopback: bool, days: int,
                      ca_cert, ca_key, files: tuple[str, str] = (SERVER_CERT, SERVER_KEY)
                      ) -> None:
    """A server certificate for `hosts` (plus the loopback names with `loopback`), signed by
    the CA, written to `files` (certificate, key) in `out`."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = subject_names(hosts, loopback)
    _issue_leaf(out / files[0], out / files[1], str(names[0].value),
                ExtendedKeyUsageOID.SERVER_AUTH, days, ca_cert, ca_key, names)


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


def _operator_ca(folder: Path, days: int):
    """The operator CA in `folder` (kept), or a new one. Apart from the deployment CA that
    every participant holds: only certificates it issued open the Control API."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key, _ = _kept_or_new_ca(folder / OPERATOR_CA, folder / OPERATOR_CA_KEY,
                                   "privet operator CA", days)
    return cert, key


def make_operator_certs(out: Path, count: int, days: int = 365) -> tuple[tuple[Path, Path], ...]:
    """Operator client certificates `operators/operator-<i>.pem` (+ `.key`) for i < `count`,
    issued by the operator CA in `out/operators` (created once, then kept; existing
    operator certificates are kept too). Returns (certificate, key) pairs."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = out / OPERATORS_DIR
    if count == 0:
        return ()
    ca_cert, ca_key = _operator_ca(folder, days)
    pairs = []
    for i in range(count):
        cert_path, key_path = folder / f"operator-{i}.pem", folder / f"operator-{i}.key"
        pairs.append((cert_path, key_path))
        if cert_path.exists() and key_path.exists():
            continue
        _issue_leaf(cert_path, key_path, f"privet operator {i}",
                    ExtendedKeyUsageOID.CLIENT_AUTH, days, ca_cert, ca_key)
    return tuple(pairs)


def make_certs(out: Path, hosts: list[str], nodes: int = 0, *, loopback: bool = True,
               days: int = 365, operators: int = 0) -> CertFiles:
    """CA (kept if `out` already has one), a fresh SuperLink certificate for `hosts`, and
    node key pairs `nodes/node-<i>` for i < `nodes` (existing ones are kept).

    `loopback` adds localhost, 127.0.0.1 and ::1: a SuperLink bound to 0.0.0.0 starts its
    ServerApp runner (SuperExec) against 127.0.0.1 with the same CA, which then has to match.
    """
    subject_names(hosts, loopback)  # fail on a bad host before writing anything
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, new_ca = _load_ca(out, days)
    issue_server_cert(out, hosts, loopback, days, ca_cert, ca_key)
    issue_server_cert(out, ["localhost"], True, days, ca_cert, ca_key,
                      (INTERNAL_CERT, INTERNAL_KEY))
    keys = tuple(make_node_key(out / NODES_DIR / f"node-{i}.key") for i in range(nodes))
    ops = make_operator_certs(out, operators, days)
    return CertFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY, keys, new_ca, ops)


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
                      port: int = SUPERLINK_PORT, log_file: Path | None = None,
                      internal: bool = False) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication, a state database on disk and
    no runtime dependency installation; `certs=None` is the insecure mode. `internal`: the
    SuperLink behind the operator proxy, on loopback, with the loopback-only certificate."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(database.resolve()),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd += ["--insecure"]
    else:
        certs = certs.resolve()
        cert, key = (INTERNAL_CERT, INTERNAL_KEY) if internal else (SERVER_CERT, SERVER_KEY)
        for name in (CA_CERT, cert, key):
            if not (certs / name).is_file():
                raise FileNotFoundError(f"{certs / name} not found; create it with "
                                        f"`privet deploy certs --out {certs} --host ...`")
        runner_must_match(certs / cert, host)
        cmd += ["--ssl-ca-certfile", str(certs / CA_CERT),
                "--ssl-certfile", str(certs / cert),
                "--ssl-keyfile", str(certs / key), "--enable-supernode-auth"]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    return cmd


# --- the operator proxy in front of the SuperLink ----------------------------------------
#
# Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port and has no
# authentication for the Control API in its OSS distribution. So the SuperLink listens on
# loopback only, and nginx (the distribution's package) takes the public port: the Fleet
# API passes (SuperNodes authenticate with their keys at the SuperLink, as before), the
# Control API only with a client certificate from the operator CA, the Runtime API and
# anything else not at all. nginx talks TLS to the SuperLink and checks its certificate.

def find_nginx() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    import shutil

    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _listen(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nginx_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '";{}\\\n\'') or any(c.isspace() for c in text):
        raise ValueError(f"{text}: nginx's configuration cannot hold this path (spaces, "
                         "quotes, braces, semicolons); move or link the folder")
    return text


def proxy_config(certs: Path, folder: Path, host: str, port: int, upstream_port: int) -> str:
    """nginx.conf for the proxy: everything (pid, logs, temp files) in `folder`."""
    certs, folder = certs.resolve(), folder.resolve()
    ca, cert, key = (_nginx_path(certs / n) for n in (CA_CERT, SERVER_CERT, SERVER_KEY))
    operator_ca = _nginx_path(certs / OPERATORS_DIR / OPERATOR_CA)
    f = _nginx_path(folder)
    temp = "\n".join(f"    {kind}_temp_path {f}/temp/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# written by `privet deploy superlink`; rewritten at each start
daemon off;
worker_processes 1;
pid {f}/nginx.pid;
error_log {f}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
{temp}
    access_log off;
    server_tokens off;
    client_max_body_size 0;          # FABs and model updates: no limit beyond Flower's own
    proxy_request_buffering off;     # stream both ways: log streams, long polls
    proxy_buffering off;
    proxy_read_timeout 1h;
    proxy_send_timeout 1h;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    # to the SuperLink on loopback, over TLS, its certificate checked against the CA
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    log_format operator '$time_iso8601 $remote_addr "$ssl_client_s_dn" $ssl_client_verify '
                        '$request_method $uri $status';
    server {{
        listen {_listen(host, port)} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:privet:1m;
        # operators present a certificate from the operator CA; SuperNodes present none
        ssl_client_certificate {operator_ca};
        ssl_verify_client optional;
        ssl_verify_depth 1;
        # Fleet API: SuperNodes, authenticated by their registered keys at the SuperLink
        location /v1/fleet/ {{
            proxy_pass https://superlink;
        }}
        # Control API: runs, logs, node registration -- operators only
        location /v1/control/ {{
            access_log {f}/control.log operator;
            if ($ssl_client_verify != SUCCESS) {{
                return 403;
            }}
            proxy_pass https://superlink;
        }}
        # the Runtime API (the SuperLink's own ServerApp, on loopback) and anything else
        location / {{
            return 404;
        }}
    }}
}}
"""


def write_proxy(certs: Path, folder: Path, host: str, port: int, upstream_port: int) -> Path:
    """Write `folder/nginx.conf` (and its temp folders); the file's path."""
    for name in (OPERATORS_DIR + "/" + OPERATOR_CA, CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise FileNotFoundError(
                f"{certs / name} not found; create it with `privet deploy certs --out {certs} "
                "--host ... --operators 1`" + (" (operator credentials)"
                                               if name.startswith(OPERATORS_DIR) else ""))
    text = proxy_config(certs, folder, host, port, upstream_port)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / "temp" / kind).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # nginx's workers drop to `nobody`; they write only temp files
        import shutil

        try:
            for sub in (folder / "temp", *(folder / "temp").iterdir()):
                shutil.chown(sub, "nobody")
        except LookupError:  # no such user: nginx then refuses its configuration, saying so
            pass
    path = folder / "nginx.conf"
    path.write_text(text, encoding="utf-8")
    return path


def nginx_command(nginx: str, conf: Path) -> list[str]:
    folder = conf.resolve().parent
    return [nginx, "-p", str(folder), "-c", str(conf.resolve()), "-e", str(folder / "error.log")]


def _die_with(parent: int):
    """For the child before exec: SIGTERM when `parent` goes (it becomes flower-superlink by
    exec, so nginx stops with the SuperLink, even if that one is SIGKILLed)."""
    def arm() -> None:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG
        if os.getppid() != parent:  # it went before the line above
            os._exit(1)
    return arm


def start_proxy(cmd: list[str], host: str, port: int, timeout: float = 15.0):
    """Check nginx's configuration, start nginx in the foreground as this process's child,
    and wait until it accepts connections; raises RuntimeError with its error otherwise."""
    import socket
    import time

    test = subprocess.run(cmd + ["-t", "-q"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise RuntimeError(f"nginx refused its configuration:\n{test.stderr.strip()}")
    proc = subprocess.Popen(cmd, preexec_fn=_die_with(os.getpid()))
    dial = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host.strip("[]") == "::"
                                                      else host.strip("[]"))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log = Path(cmd[cmd.index("-e") + 1])
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{tail.strip()}")
        try:
            with socket.create_connection((dial, port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"nginx did not listen on {_listen(host, port)} within {timeout:.0f} s")


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
                     *, default: bool = False, operator_cert: Path | None = None,
                     operator_key: Path | None = None) -> Path:
    """Add or replace `[superlink.<name>]` in $FLWR_HOME/config.toml (Flower 1.41 keeps
    SuperLink connections there; `flwr run . <name>` and `flwr supernode ...` read it).
    `root_certificates=None` writes an insecure connection. An operator certificate and key
    go into $FLWR_HOME/privet-operators.toml, for `address` (`privet flwr` presents them)."""
    if operator_cert is not None:
        write_operator_credential(address, operator_cert, operator_key)
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


def _credentials_file() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home() / OPERATOR_CREDENTIALS


def read_operator_credentials() -> dict[str, dict[str, str]]:
    """{SuperLink address: {"certificate": path, "key": path}} from privet-operators.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10; tomli comes with flwr
        import tomli as tomllib

    path = _credentials_file()
    if not path.is_file():
        return {}
    found = tomllib.loads(path.read_text(encoding="utf-8"))
    return {addr: entry for addr, entry in found.items() if isinstance(entry, dict)}


def write_operator_credential(address: str, cert: Path, key: Path | None = None) -> Path:
    """Record the operator certificate and key (paths, checked to be a pair) to present to
    the SuperLink at `address`. The key defaults to the certificate's name with .key."""
    import tomli_w
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = cert.expanduser().resolve()
    key = (key or cert.with_suffix(".key")).expanduser().resolve()
    for path in (cert, key):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    try:
        public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
        private = serialization.load_pem_private_key(key.read_bytes(), None)
    except ValueError as error:
        raise ValueError(f"{cert} / {key}: not a PEM certificate and key ({error})") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if (public.public_bytes(serialization.Encoding.PEM, raw)
            != private.public_key().public_bytes(serialization.Encoding.PEM, raw)):
        raise ValueError(f"{key} is not the key of {cert}")
    found = read_operator_credentials()
    found[address] = {"certificate": str(cert), "key": str(key)}
    path = _credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, tomli_w.dumps(found).encode())
    return path


def flwr_command(args: list[str]) -> list[str]:
    """The flwr CLI, presenting the operator certificate recorded for the SuperLink it dials
    (privet.experiments.flwr_operator); plain `flwr` would be refused by the proxy."""
    return [sys.executable, "-m", "privet.experiments.flwr_operator", *args]


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
    cmd = flwr_command(["run", str(app_dir), federation, "--run-config", str(run_config)])
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
    out = subprocess.run(flwr_command([*args, "--format", "json"]), env=flower_env(),
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

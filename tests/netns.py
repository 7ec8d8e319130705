"""Separate hosts on one machine: Linux network namespaces, each with its own address on a
private /24, joined by a bridge that lives in a namespace of its own (nothing is added to
the machine's own network). Names carry the test's PID and a random suffix, so parallel
sessions never collide; `Hosts.close` removes everything, also after a failure."""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"

# Checks run inside a namespace by its own Python (`Hosts.python`): exit 0 or print why.
TLS_CHECK = """
import socket, ssl, sys
host, port, ca, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection((host, port), timeout=3) as raw, \\
            context.wrap_socket(raw, server_hostname=name):
        print("ok")
except ssl.SSLCertVerificationError as error:
    print("verify:", error.verify_message); sys.exit(3)
except OSError as error:
    print("connect:", error); sys.exit(4)
"""

TCP_CHECK = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except OSError as error:
    print("closed:", error); sys.exit(4)
"""


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (no `ip`, no CAP_SYS_ADMIN, ...)."""


def used_networks(ip_o_addr: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks in `ip -o addr` output."""
    found = []
    for line in ip_o_addr.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return found


def free_subnet(used: list[ipaddress.IPv4Network], rng: random.Random | None = None,
                tries: int = 200) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps none of `used`."""
    rng = rng or random.Random()
    for _ in range(tries):
        net = ipaddress.ip_network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError(f"no free 10.x.y.0/24 after {tries} tries")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, [IP, *args], done.stdout,
                                            done.stderr)
    return done


class Hosts:
    """Namespaces `roles` (e.g. "superlink", "operator", "node0"), each a host with its own
    address in one random /24, all on a bridge in a hub namespace."""

    def __init__(self, roles: list[str]) -> None:
        if not Path(IP).exists():
            raise NetnsUnavailable("no `ip` command (iproute2)")
        self.prefix = f"privet-{os.getpid()}-{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.names: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.created: list[str] = []
        try:
            _ip("netns", "add", self.hub)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            raise NetnsUnavailable(f"`ip netns add` failed: {detail.strip()}") from error
        self.created.append(self.hub)
        try:
            self.subnet = free_subnet(used_networks(_ip("-o", "addr").stdout))
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            hosts = self.subnet.hosts()
            for i, role in enumerate(roles):
                name, address = f"{self.prefix}-{role}", str(next(hosts))
                _ip("netns", "add", name)
                self.created.append(name)
                # the veth is made in the hub, its peer goes straight into the host's
                # namespace: no interface ever appears in the machine's own network
                _ip("-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name",
                    "eth0", "netns", name)
                _ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "addr", "add", f"{address}/{self.subnet.prefixlen}",
                    "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                self.names[role], self.addresses[role] = name, address
        except BaseException:
            self.close()
            raise

    def exec(self, role: str, cmd: list[str]) -> list[str]:
        """`cmd` as run on `role`'s host."""
        return [IP, "netns", "exec", self.names[role], *cmd]

    def run(self, role: str, cmd: list[str], timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec(role, cmd), capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def python(self, role: str, script: str, *args: str) -> subprocess.CompletedProcess:
        return self.run(role, [sys.executable, "-c", script, *args])

    def tls(self, role: str, host: str, port: int, ca: Path, server_hostname: str
            ) -> subprocess.CompletedProcess:
        """A TLS handshake from `role` to host:port trusting `ca`, checking `server_hostname`."""
        return self.python(role, TLS_CHECK, host, str(port), str(ca), server_hostname)

    def tcp(self, role: str, host: str, port: int) -> bool:
        return self.python(role, TCP_CHECK, host, str(port)).returncode == 0

    def listening(self, role: str) -> set[str]:
        """The TCP addresses (ADDR:PORT) something listens on in `role`'s namespace."""
        done = self.run(role, ["ss", "-Hltn"])
        done.check_returncode()
        return {line.split()[3] for line in done.stdout.splitlines() if line.strip()}

    def pids(self) -> set[int]:
        """Every process in one of our namespaces."""
        found: set[int] = set()
        for name in self.created:
            done = _ip("netns", "pids", name, check=False)
            found |= {int(p) for p in done.stdout.split() if p.isdigit()}
        return found

    def close(self) -> list[str]:
        """Kill what still runs in our namespaces (by PID), delete them (the bridge and veths
        go with the hub); what could not be removed, said in words."""
        problems = []
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while pids and time.time() < deadline:
                try:  # our children among them: reap, or they stay as zombies in the list
                    while os.waitpid(-1, os.WNOHANG)[0]:
                        pass
                except ChildProcessError:
                    pass
                pids = self.pids()
                time.sleep(0.1)
            if not pids:
                break
        if self.pids():
            problems.append(f"processes left in the namespaces: {sorted(self.pids())}")
        for name in reversed(self.created):
            done = _ip("netns", "delete", name, check=False)
            if done.returncode != 0:
                problems.append(f"ip netns delete {name}: {done.stderr.strip()}")
        self.created.clear()
        left = [n for n in _ip("netns", "list", check=False).stdout.split()
                if n.startswith(self.prefix)]
        if left:
            problems.append(f"namespaces left: {left}")
        return problems

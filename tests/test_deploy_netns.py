"""Separate hosts, really (issue 19 item 6): the SuperLink, the operator and each SuperNode
in a network namespace of its own, each with its own address, the SuperLink's certificate
for its address only (`privet deploy certs --no-loopback`). Loopback hides what separate
machines expose: certificate names, what listens where. Where namespaces cannot be made,
the tests are skipped with the reason (shown by -rs, in pyproject's addopts)."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from netns import Hosts, NetnsUnavailable, free_subnet, used_networks
from test_deploy import Deployment, Processes, processes, sans, wait_for  # noqa: F401

from privet.common.config import CONFIGS_DIR
from privet.experiments import deploy


def make_hosts(request, roles: list[str], procs: Processes | None = None) -> Hosts:
    """Namespaces for `roles`, removed at teardown after every process we started (in
    `procs`, then anything else in the namespaces) is stopped; skipped where impossible."""
    try:
        hosts = Hosts(roles)
    except NetnsUnavailable as why:
        pytest.skip(f"network namespaces unavailable: {why}")

    def teardown() -> None:
        try:
            if procs is not None:
                procs.stop_all()
        finally:
            problems = hosts.close()
            assert not problems, problems

    request.addfinalizer(teardown)
    return hosts


class NetnsDeployment(Deployment):
    """`Deployment` with each role in its own namespace of `hosts`; the SuperLink listens on
    its namespace's address, for which alone its certificate is issued."""

    def __init__(self, root: Path, processes: Processes, hosts: Hosts, nodes: int) -> None:
        self.hosts, self.host = hosts, hosts.addresses["superlink"]
        super().__init__(root, processes, nodes, certs_args=("--no-loopback",))

    def where(self, role: str, cmd: list[str]) -> list[str]:
        return self.hosts.exec(role, cmd)

    def serving_tls(self) -> bool:
        """The proxy as an operator sees it, from its own host, and the SuperLink behind it
        on the SuperLink host's loopback (started after the proxy)."""
        ca = self.certs / deploy.CA_CERT
        return (self.hosts.tls("operator", self.host, self.port, ca, self.host).returncode == 0
                and self.hosts.tls("superlink", "127.0.0.1", self.internal_port, ca,
                                   "127.0.0.1").returncode == 0)


# --- fast ------------------------------------------------------------------------------

def test_free_subnet_avoids_the_hosts_networks():
    out = ("1: lo    inet 127.0.0.1/8 scope host lo\\ valid_lft forever\n"
           "2: eth0    inet 10.7.0.5/16 brd 10.7.255.255 scope global eth0\n"
           "2: eth0    inet6 fe80::1/64 scope link\n")
    used = used_networks(out)
    assert used == [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.7.0.0/16")]
    rng = random.Random(0)
    for _ in range(200):
        net = free_subnet(used, rng)
        assert net.prefixlen == 24 and net.subnet_of(ipaddress.ip_network("10.0.0.0/8"))
        assert not net.overlaps(used[1])
    with pytest.raises(RuntimeError, match="no free"):
        free_subnet([ipaddress.ip_network("10.0.0.0/8")], rng, tries=5)


def test_a_public_certificate_without_loopback_names_still_runs(tmp_path):
    """Found on separate hosts: certificates for the public address only (--no-loopback)
    and --host 0.0.0.0 left a SuperLink whose ServerApp runner dialled 127.0.0.1, failed the
    handshake and died, so no run ever started. Behind the operator proxy the SuperLink
    listens on loopback with its own loopback-only certificate (privet.internal.pem), so any
    public certificate works; a SuperLink started without the proxy is still checked."""
    from typer.testing import CliRunner

    from privet.experiments.cli import app

    certs = tmp_path / "certs"
    deploy.make_certs(certs, ["10.20.30.40", "link.example.org"], loopback=False, operators=1)
    assert sans(certs / deploy.INTERNAL_CERT) == ({"127.0.0.1", "::1"}, {"localhost"})
    runner = CliRunner()
    for host in ("0.0.0.0", "::", "10.20.30.40", "link.example.org"):
        done = runner.invoke(app, ["deploy", "superlink", "--certs", str(certs), "--database",
                                   str(tmp_path / "s.db"), "--dry-run", "--host", host])
        assert done.exit_code == 0, (host, done.output)
        assert deploy.INTERNAL_CERT in done.output and "--host 127.0.0.1" in done.output
    for host in ("0.0.0.0", "::", "127.0.0.1", "10.20.30.41"):  # the public one, directly
        with pytest.raises(ValueError, match="ServerApp runner dials.*--loopback"):
            deploy.superlink_command(certs, tmp_path / "s.db", host=host)
    for host in ("10.20.30.40", "link.example.org", "LINK.example.org"):
        deploy.superlink_command(certs, tmp_path / "s.db", host=host)


def test_namespaces_are_separate_hosts_and_are_removed(request):
    hosts = make_hosts(request, ["a", "b"])
    names = list(hosts.names.values())
    assert len(set(hosts.addresses.values())) == 2
    assert all(ipaddress.ip_address(a) in hosts.subnet for a in hosts.addresses.values())
    server = subprocess.Popen(hosts.exec("b", [
        sys.executable, "-c", "import socket, time; s = socket.socket(); "
        "s.bind(('0.0.0.0', 5000)); s.listen(); print('up', flush=True); time.sleep(60)"]),
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        assert hosts.listening("b") == {"0.0.0.0:5000"} and hosts.listening("a") == set()
        assert hosts.tcp("a", hosts.addresses["b"], 5000)  # across the bridge
        assert not hosts.tcp("a", "127.0.0.1", 5000)       # a's own loopback is its own
        assert hosts.pids() == {server.pid}
    finally:
        assert hosts.close() == []  # kills the server by PID, deletes the namespaces
    # killed by PID; close() may have reaped it itself, and Popen then reads its status as 0
    server.wait(timeout=5)
    assert not os.path.exists(f"/proc/{server.pid}")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)


# --- slow: a deployment across namespaces ----------------------------------------------

@pytest.mark.slow
def test_deployment_on_separate_hosts(tmp_path, processes, request):  # noqa: F811
    started = time.time()
    hosts = make_hosts(request, ["superlink", "operator", "node0", "node1"], processes)
    dep = NetnsDeployment(tmp_path, processes, hosts, nodes=2)
    link, ca = dep.host, dep.certs / deploy.CA_CERT
    assert sans(dep.certs / deploy.SERVER_CERT) == ({link}, set())  # no loopback names
    dep.start_superlink()

    # what listens where: the SuperLink's one port on its own address, nothing else reachable
    assert {a for a in hosts.listening("superlink") if not a.startswith("127.")} == \
        {f"{link}:{dep.port}"}, hosts.listening("superlink")
    # the certificate names the SuperLink's address, and nothing on loopback
    seen = hosts.tls("node0", link, dep.port, ca, link)
    assert seen.returncode == 0, seen.stdout + seen.stderr
    seen = hosts.tls("node0", link, dep.port, ca, "127.0.0.1")
    assert seen.returncode == 3 and "IP address mismatch" in seen.stdout, seen.stdout
    seen = hosts.tls("superlink", "127.0.0.1", dep.port, ca, "127.0.0.1")
    assert seen.returncode == 4, seen.stdout  # not listening there at all

    for i in range(2):
        dep.register(i)
    ports = {i: free_port() for i in range(2)}
    for i in range(2):
        dep.start_supernode(i, ports[i])
    wait_for("2 SuperNodes online", lambda: len(dep.online()) == 2, 120, dep.tails)
    for i in range(2):  # a node's ClientApp API is its own: loopback, not reachable
        role = f"node{i}"
        assert all(a.startswith("127.") for a in hosts.listening(role)), hosts.listening(role)
        assert not hosts.tcp("operator", hosts.addresses[role], ports[i])
    assert hosts.listening("operator") == set()

    out = tmp_path / "run"
    run = subprocess.run(dep.where("operator", [
        dep.privet, "run", "--federation", "test", "--config", str(CONFIGS_DIR / "tiny.toml"),
        "--set", "rounds=2", "--set", "num-clients=2", "--set", "clients-per-round=2",
        "--out", str(out)]),
        env=dep.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    (tmp_path / "run-output.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{dep.tails()}"
    assert "finished:completed" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == 2
    for i in range(2):
        assert list((tmp_path / f"node{i}").glob(".privet-ledger/spend/*-client*.json"))
    # who called: the operator proxy's log names every Control call's address and operator
    # certificate (only the operator's); the SuperLink itself, behind the proxy, is called
    # from loopback only
    control = (tmp_path / "link" / "proxy" / "control.log").read_text()
    assert set(re.findall(r"^\S+ ([0-9a-f.:]+) ", control, re.M)) == \
        {hosts.addresses["operator"]}, control[-2000:]
    assert "CN=privet operator 0" in control
    callers = set(re.findall(r"\] ([0-9.]+):\d+ - \"[A-Z]+ /v1/(\w+)/",
                             processes.log("superlink")))
    assert {ip for ip, _ in callers} == {"127.0.0.1"}, callers
    assert {api for _, api in callers} >= {"control", "fleet"}, callers
    print(f"separate hosts {hosts.addresses}: {time.time() - started:.1f} s")

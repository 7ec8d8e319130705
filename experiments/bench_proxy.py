"""What the operator proxy costs a request: Control API round trips (ListRuns) through
`privet deploy superlink`'s nginx vs straight to the SuperLink on its loopback port.

Starts its own SuperLink (fresh certificates, free ports, a temporary folder), needs nginx.
    python experiments/bench_proxy.py [--requests 300]
Prints JSON: median and 90th-percentile milliseconds per request, two passes each way.
Per-round times of a whole run, with and without the proxy, come from the slow test
tests/test_deploy.py::test_control_api_only_for_operators (it prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611
    from flwr.supercore.control.control_http_client import ControlHttpClient

    from privet.experiments import deploy

    with tempfile.TemporaryDirectory(prefix="privet-bench-proxy-") as tmp:
        root = Path(tmp)
        deploy.make_certs(root / "certs", ["127.0.0.1"], operators=1)
        port, internal = free_port(), free_port()
        link = subprocess.Popen(
            [sys.executable, "-m", "privet.experiments.cli", "deploy", "superlink", "--certs",
             str(root / "certs"), "--database", str(root / "link" / "state.db"), "--host",
             "127.0.0.1", "--port", str(port), "--internal-port", str(internal)],
            env={**os.environ, "FLWR_HOME": str(root / "home")}, cwd=root,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(root / "certs" / deploy.CA_CERT)
            ops = root / "certs" / deploy.OPERATORS_DIR
            ctx.load_cert_chain(ops / "operator-0.pem", ops / "operator-0.key")
            out: dict[str, list] = {}
            deadline = time.time() + 60
            for name, at in (("proxied", port), ("direct", internal)) * 2:
                client = ControlHttpClient(f"https://127.0.0.1:{at}", verify=ctx,
                                           interceptors=[CliClientHttpInterceptor()])
                while True:  # connect and handshake once; the SuperLink starts after nginx
                    try:
                        client.ListRuns(ListRunsRequest())
                        break
                    except Exception:  # noqa: BLE001 - not up yet
                        if time.time() > deadline or link.poll() is not None:
                            raise
                        time.sleep(0.5)
                took = []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    client.ListRuns(ListRunsRequest())
                    took.append(time.perf_counter() - start)
                client.close()
                took.sort()
                out.setdefault(name, []).append({
                    "median_ms": round(1000 * took[len(took) // 2], 3),
                    "p90_ms": round(1000 * took[int(len(took) * 0.9)], 3)})
            print(json.dumps(out))
        finally:
            os.killpg(link.pid, signal.SIGTERM)
            link.wait(timeout=30)


if __name__ == "__main__":
    main()

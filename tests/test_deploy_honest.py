"""Issue 19 items 3-5, the fast parts: the results a deployed run carries back in its log,
duplicate partition-ids named before anything trains, a TLS / plaintext mismatch said in one
line, and the SuperNode's shorter heartbeat."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from privet.common import carried
from privet.experiments import deploy
from privet.server.describe import DuplicatePartition, check_unique
from conftest import PROJECT_DIR


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "complete"}')
    (run / "partitions.csv").write_text("client,rows\n0,10\n1,12\n")
    (run / "model.pt").write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    (run / "checkpoint.pkl").write_bytes(b"never sent")
    (run / "notes.txt").write_text("not a result file")
    return run


def test_results_block_round_trips_through_log_lines(tmp_path):
    run = _run_dir(tmp_path)
    lines = carried.block(run)
    # as the operator sees them: Flower's level prefix, other lines in between
    streamed = ["INFO :      privet: round 1/1 ..."] + [f"INFO :      {x}\n" for x in lines]
    reader = carried.Reader()
    echoed = [line for line in streamed if not reader.feed(line)]
    assert echoed == ["INFO :      privet: round 1/1 ..."]
    assert reader.ended and not reader.broken and reader.source == str(run)
    assert set(reader.files) == {"summary.json", "partitions.csv", "model.pt"}
    written = reader.write(tmp_path / "local")
    for path in written:
        assert path.read_bytes() == (run / path.name).read_bytes()


def test_results_block_leaves_out_what_is_over_the_limit_and_says_so(tmp_path):
    run = _run_dir(tmp_path)
    reader = carried.Reader()
    for line in carried.block(run, limit=1000):
        reader.feed(line)
    assert "model.pt" not in reader.files and reader.skipped == {"model.pt": 10240}
    assert "summary.json" in reader.files


def test_a_damaged_or_foreign_file_is_not_written(tmp_path):
    run = _run_dir(tmp_path)
    lines = carried.block(run)
    at = next(i for i, x in enumerate(lines) if "file partitions.csv" in x)
    lines[at + 1] = lines[at + 1][:-4] + "AAAA"  # a changed byte: the digest no longer fits
    lines.insert(1, f"{carried.TAG} file ..evil 4 00")
    lines.insert(2, f"{carried.TAG} data AAAA")
    reader = carried.Reader()
    for line in lines:
        reader.feed(line)
    assert set(reader.broken) == {"partitions.csv", "..evil"}
    assert "partitions.csv" not in reader.files and "summary.json" in reader.files


def test_results_never_overwrite_a_folder_with_files(tmp_path):
    reader = carried.Reader()
    for line in carried.block(_run_dir(tmp_path)):
        reader.feed(line)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError):
        reader.write(mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_run_refuses_a_results_folder_with_files_before_submitting(tmp_path):
    from typer.testing import CliRunner

    from privet.experiments.cli import app

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    done = CliRunner().invoke(app, ["run", "--federation", "nowhere", "--results-to",
                                    str(mine), "--config",
                                    str(PROJECT_DIR / "experiments/configs/tiny.toml")])
    assert done.exit_code == 2 and "--results-to" in done.output, done.output
    assert "not an empty folder" in done.output


def test_two_nodes_with_one_partition_id_are_named_in_one_line():
    check_unique({11: 0, 12: 1, 13: 2})
    with pytest.raises(DuplicatePartition) as refused:
        check_unique({705: 1, 11: 0, 42: 1})
    message = str(refused.value)
    assert "partition-id 1 is used by two nodes (42 and 705)" in message
    assert "\n" not in message and "nothing was trained" in message


def _serve(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def test_a_tls_or_plaintext_mismatch_is_said_in_one_line(tmp_path):
    certs = deploy.make_certs(tmp_path / "certs", ["127.0.0.1"])
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "certs" / deploy.SERVER_CERT,
                            tmp_path / "certs" / deploy.SERVER_KEY)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        _serve(server)
    try:
        plain_at = f"127.0.0.1:{plain.server_address[1]}"
        tls_at = f"127.0.0.1:{tls.server_address[1]}"
        assert deploy.speaks_tls(plain_at) is False and deploy.speaks_tls(tls_at) is True
        assert "speaks TLS but this node was started with --insecure" in \
            deploy.tls_mismatch(tls_at, insecure=True)
        assert "does not speak TLS" in deploy.tls_mismatch(plain_at, insecure=False)
        assert deploy.tls_mismatch(tls_at, insecure=False) == ""
        assert deploy.tls_mismatch(plain_at, insecure=True) == ""
        with socket.socket() as unused:  # nobody there: Flower retries until it is up
            unused.bind(("127.0.0.1", 0))
            nobody = f"127.0.0.1:{unused.getsockname()[1]}"
        assert deploy.speaks_tls(nobody) is None and deploy.tls_mismatch(nobody, True) == ""
    finally:
        for server in (plain, tls):
            server.shutdown()
            server.server_close()
    assert certs


def test_the_supernode_heartbeat_is_flowers_least():
    probe = ("from privet.patches.flower import shorter_node_heartbeat as s; s(); "
             "from flwr.supercore import heartbeat as h; "
             "from flwr.supernode import fleet_http_connection as f; "
             "from flwr.common.constant import HEARTBEAT_MIN_INTERVAL as least; "
             "print(h.HEARTBEAT_DEFAULT_INTERVAL, f.HEARTBEAT_DEFAULT_INTERVAL, least)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=PROJECT_DIR, timeout=120)
    assert done.stdout.split() == ["10", "10", "10"], done.stderr

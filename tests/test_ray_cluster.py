"""`privet simulate --ray-address`: the clients run on an existing two-node Ray cluster."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest
from conftest import PROJECT_DIR

from privet.common.config import CONFIGS_DIR, load_config

TINY = CONFIGS_DIR / "tiny.toml"
ACTOR_CLASS = "ClientAppActor"  # flwr.simulation.ray_transport.ray_actor


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A real local Ray cluster: a head node and a second node, one CPU each.

    Its files (and the `ray_current_cluster` address file) live in a temporary directory,
    not /tmp/ray, so it cannot capture another Ray run on this machine; it is shut down
    (and its processes killed) however the test ends."""
    from ray.cluster_utils import Cluster

    # short: Ray's unix socket paths must stay under 108 characters
    temp_dir = tempfile.mkdtemp(prefix="privet-ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    nodes = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert len(nodes) == 2
    out = tmp_path / "run"
    started = time.time()
    # 3 clients per round, 2 CPUs: Flower's pool has one actor per CPU, and both get work
    done = subprocess.run(
        [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config", str(TINY),
         "--ray-address", cluster.address, "--out", str(out)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_config(TINY, [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == cfg.rounds
    assert 0.6 < summary["accuracy"] <= 1
    assert set(summary["privacy"]["clients"]) == {str(i) for i in range(cfg.num_clients)}
    assert all(c["rounds_trained"] == cfg.rounds for c in summary["privacy"]["clients"].values())
    assert f"round   {cfg.rounds}/{cfg.rounds}" in done.stdout

    # privet only disconnected: the user's cluster is still up, both nodes alive
    assert cluster.remaining_processes_alive()
    alive = {n["NodeID"] for n in cluster.global_state.node_table() if n["Alive"]}
    assert alive == nodes

    # the ClientApp actors ran on both nodes (the GCS keeps finished actors' records)
    actors = [a for a in cluster.global_state.actor_table(None).values()
              if a["ActorClassName"] == ACTOR_CLASS]
    per_node = Counter(a["Address"]["NodeID"] for a in actors)
    print(f"\n{ACTOR_CLASS} actors per node: {dict(per_node)} (head "
          f"{cluster.head_node.node_id}); run took {time.time() - started:.1f}s")
    assert set(per_node) == nodes, per_node
    assert sorted(per_node.values()) == [1, 1], per_node  # one CPU, one actor, per node

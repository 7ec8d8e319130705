"""privet.patches: installed only when asked, version-checked, and results equal on stock."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_DIR
from privet import patches

TINY = PROJECT_DIR / "experiments" / "configs" / "tiny.toml"


def _python(code: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False, cwd=PROJECT_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_importing_privet_patches_nothing():
    """Importing privet (its accountants, its apps) leaves Flower and dp-accounting stock."""
    out = _python(
        "import privet, privet.api, privet.common.privacy.accountants, privet.clients.app, "
        "privet.server.app, privet.experiments.simulation\n"
        "from dp_accounting.pld import pld_pmf\n"
        "from flwr.server.superlink.fleet.vce import vce_api\n"
        "from privet import patches\n"
        "print(patches.installed(), hasattr(pld_pmf._truncate_tails, '__wrapped__'), "
        "hasattr(vce_api._register_nodes, 'original'))")
    assert out == "() False False"


def test_install_patches_named_libraries_once_and_stock_installs_none():
    code = ("from privet import patches\n"
            "from dp_accounting.pld import pld_pmf\n"
            "print(patches.install('dp-accounting'), patches.install('dp-accounting'), "
            "hasattr(pld_pmf._truncate_tails, '__wrapped__'))")
    assert _python(code) == "('dp-accounting',) ('dp-accounting',) True"
    assert _python(code, PRIVET_STOCK_LIBRARIES="1") == "() () False"
    # dp-accounting not imported yet: patched the moment it is (it costs ~0.8 s to import)
    assert _python("from privet import patches; print(patches.install())\n"
                   "import dp_accounting\n"
                   "from dp_accounting.pld import pld_pmf\n"
                   "print(patches.installed(), hasattr(pld_pmf._truncate_tails, '__wrapped__'))"
                   ) == "('flwr',)\n('flwr', 'dp-accounting') True"
    # and when privet's own patch module is what imports it first
    assert _python("from privet import patches; patches.install('dp-accounting')\n"
                   "from privet.common.privacy import accountants\n"
                   "accountants.epsilon(((1.0, 0.01, 10),), 1e-5, 'pld')\n"
                   "print(patches.installed())") == "('dp-accounting',)"


def test_a_version_the_patches_were_not_written_for_is_refused_in_one_line():
    patches.check_version("flwr", "1.41.2", ("1.41.",))
    with pytest.raises(patches.PatchError) as raised:
        patches.check_version("flwr", "1.42.0", ("1.41.",))
    message = str(raised.value)
    assert "\n" not in message and "flwr 1.42.0" in message and "1.41.x" in message
    assert "PRIVET_STOCK_LIBRARIES=1" in message


def test_the_cli_refuses_an_unpatched_dp_accounting_version_with_one_line(tmp_path):
    """A dp-accounting release the patches were not written for: `privet` says so and how to
    run stock, rather than patching a private function that may have changed."""
    shim = tmp_path / "sitecustomize.py"
    shim.write_text("import importlib.metadata as m\n_v = m.version\n"
                    "m.version = lambda name: '9.9.9' if name == 'dp-accounting' else _v(name)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{PROJECT_DIR}"}
    proc = subprocess.run([sys.executable, "-m", "privet.experiments.cli", "budget", "--rows",
                           "1000", "--sigma", "1", "--out", str(tmp_path / "b.png")],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dp-accounting 9.9.9" in lines[0], proc.stderr
    stock = subprocess.run([sys.executable, "-m", "privet.experiments.cli", "budget", "--rows",
                            "1000", "--sigma", "1", "--rounds", "2", "--out",
                            str(tmp_path / "b.png")], capture_output=True, text=True,
                           env={**env, "PRIVET_STOCK_LIBRARIES": "1"}, check=False)
    assert stock.returncode == 0, stock.stderr


def _tiny(out, **env):
    proc = subprocess.run([sys.executable, "-m", "privet.experiments.cli", "simulate",
                           "--config", str(TINY), "--out", str(out)], capture_output=True,
                          text=True, env={**os.environ, **env}, check=False, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    model = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    return summary, model


@pytest.mark.slow
def test_the_tiny_run_on_stock_libraries_equals_the_patched_run(tmp_path):
    """The patches change speed only: the tiny experiment (seeded noise, every client in every
    round) on stock Flower (Ray) and stock dp-accounting spends the same ε (1e-6 relative)
    and ends with the same model (max |Δw| ≤ 1e-6) as on the patched ones."""
    patched, patched_model = _tiny(tmp_path / "patched")
    stock, stock_model = _tiny(tmp_path / "stock", PRIVET_STOCK_LIBRARIES="1")
    assert patched["patched"] == ["flwr", "dp-accounting"] and stock["patched"] == []
    assert patched["status"] == stock["status"] == "complete"
    assert patched["privacy"]["noise_source"] == "seeded"
    eps = {c: e["epsilon"] for c, e in patched["privacy"]["clients"].items()}
    assert eps and all(e > 0 for e in eps.values())
    for client, e in stock["privacy"]["clients"].items():
        assert e["epsilon"] == pytest.approx(eps[client], rel=1e-6)
    assert patched_model.keys() == stock_model.keys()
    assert max((patched_model[k] - stock_model[k]).abs().max().item()
               for k in patched_model) <= 1e-6


def test_node_stores_built_on_first_use_hold_the_contexts_flower_builds_up_front():
    """Patch 5 (privet.patches.flower): a node's context, built when its first message comes,
    is the one Flower's _register_node_info_stores builds for every node before round 1."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.run import Run

    from privet.patches import flower

    original = getattr(vce_api._register_node_info_stores, "original",
                       vce_api._register_node_info_stores)
    run = Run.create_empty(run_id=7)
    run.override_config = {"rounds": 3, "out-dir": "/nowhere"}
    mapping = {node: i for i, node in enumerate((11, 23, 35, 47))}
    eager = original(mapping, run, str(PROJECT_DIR))
    lazy = flower._node_stores(vce_api)(mapping, run, str(PROJECT_DIR))
    assert len(lazy) == 0
    for node in (35, 11):
        built, flowers = lazy[node].retrieve_context(7), eager[node].retrieve_context(7)
        assert built.node_id == flowers.node_id == node
        assert dict(built.node_config) == dict(flowers.node_config) == {
            "partition-id": mapping[node], "num-partitions": 4}
        assert built.run_config == flowers.run_config and built.run_config["rounds"] == 3
    assert sorted(lazy) == [11, 35] and lazy[35] is lazy[35]
    with pytest.raises(KeyError):
        lazy[99]


def test_the_fused_config_is_read_once_per_run_and_each_caller_gets_its_own_copy():
    from flwr.common.config import get_fused_config_from_dir

    from privet.patches import flower

    fused = flower._fused_once(get_fused_config_from_dir)
    first = fused(PROJECT_DIR, {"rounds": 3})
    second = fused(PROJECT_DIR, {"rounds": 3})
    assert first == second == get_fused_config_from_dir(PROJECT_DIR, {"rounds": 3})
    assert first is not second
    assert fused(PROJECT_DIR, {"rounds": 4})["rounds"] == 4

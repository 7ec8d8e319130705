import math
import subprocess
import sys

import pytest
from conftest import PROJECT_DIR

from privet.common.config import (
    CONFIGS_DIR,
    EXECUTION_KEYS,
    ConfigError,
    ExperimentConfig,
    from_run_config,
    load_config,
    parse_override,
    tomllib,  # the Python 3.10 fallback lives there
)


def test_shipped_configs_load():
    adult = load_config(CONFIGS_DIR / "adult.toml")
    assert (adult.num_clients, adult.data.partition, adult.data.alpha) == (10, "dirichlet", 0.5)
    assert adult.privacy.epsilon == 3.0 and adult.privacy.level == "sample"
    tiny = load_config(CONFIGS_DIR / "tiny.toml")
    assert tiny.num_clients <= 3 and tiny.rounds <= 2


def test_overrides_reach_every_key():
    cfg = load_config(CONFIGS_DIR / "adult.toml",
                      ["rounds=5", "privacy.epsilon=1", "data.partition=iid", "train.lr=0.5",
                       "privacy.accountant=rdp", "name=x"])
    assert (cfg.rounds, cfg.privacy.epsilon, cfg.data.partition) == (5, 1.0, "iid")
    assert (cfg.train.lr, cfg.privacy.accountant, cfg.name) == (0.5, "rdp", "x")


def test_infinite_epsilon_means_not_private():
    cfg = load_config(CONFIGS_DIR / "adult.toml", ["privacy.epsilon=inf"])
    assert math.isinf(cfg.privacy.epsilon) and not cfg.private
    assert not load_config(CONFIGS_DIR / "adult.toml", ["privacy.level=none"]).private


@pytest.mark.parametrize("override, names", [
    ("privacy.epsilonn=1", ["privacy.epsilonn", "unknown key"]),
    ("colour=red", ["colour", "unknown key"]),
    ("rounds=0", ["rounds", "≥ 1"]),
    ("rounds=2.5", ["rounds", "expected int"]),
    ("rounds=five", ["rounds", "'five'", "expected int"]),
    ("privacy.delta=0", ["privacy.delta", "> 0"]),
    ("privacy.epsilon=-1", ["privacy.epsilon", "> 0"]),
    ("privacy.epsilon=nan", ["privacy.epsilon", "nan"]),
    ("train.lr=inf", ["train.lr", "finite"]),
    ("data.partition=random", ["data.partition", "'iid'", "'dirichlet'"]),
    ("privacy.level=central", ["privacy.level", "'sample'", "'user'", "'both'", "'none'"]),
    ("privacy.user-clip=0", ["privacy.user-clip", "> 0"]),
    ("privacy.accountant=gdp", ["privacy.accountant", "'pld'"]),
    ("clients-per-round=11", ["clients-per-round", "num-clients"]),
    ("data=3", ["data", "table"]),
])
def test_bad_values_name_key_value_and_allowed(override, names):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS_DIR / "adult.toml", [override])
    message = str(info.value)
    # the error comes from the override, so it names the override, not the file
    assert message.startswith(f"--set {override}: ") and "\n" not in message
    for name in names:
        assert name in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("rounds")


def test_round_trips():
    cfg = load_config(CONFIGS_DIR / "adult.toml", ["privacy.epsilon=inf", "name=a \"b\""])
    assert from_run_config(cfg.to_run_config()) == cfg
    assert ExperimentConfig() == load_config(CONFIGS_DIR / "adult.toml")
    resolved = tomllib.loads(cfg.to_toml())
    assert resolved["privacy"]["epsilon"] == math.inf and resolved["name"] == 'a "b"'


def test_flower_app_defaults_are_the_default_experiment():
    """`flwr run .` must run exactly experiments/configs/adult.toml."""
    pyproject = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    flat = {}
    for key, value in app_config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    # and the keys that say how to run (resume, pause), off by default
    assert {k: flat.pop(k) for k in EXECUTION_KEYS} == {"resume": False, "pause-after": 0}
    assert flat == load_config(CONFIGS_DIR / "adult.toml").to_run_config()


def test_cli_reports_bad_config_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config",
         str(CONFIGS_DIR / "tiny.toml"), "--set", "privacy.delta=2", "--out", str(tmp_path)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "privacy.delta = 2" in lines[0] and "≤ 0.1" in lines[0]
    assert not (tmp_path / "summary.json").exists()


def test_cli_rejects_an_impossible_partition_before_starting(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config",
         str(CONFIGS_DIR / "tiny.toml"), "--set", "data.min-rows=20000", "--out", str(tmp_path)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "tiny.toml" in done.stderr and "20000 rows each" in done.stderr


def test_per_client_targets():
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ["privacy.client-epsilon={ 0 = 1.0, 2 = inf }"])
    assert [cfg.epsilon_for(c) for c in range(3)] == [1.0, cfg.privacy.epsilon, math.inf]
    assert [cfg.client_private(c) for c in range(3)] == [True, True, False]
    assert from_run_config(cfg.to_run_config()) == cfg
    assert load_config(CONFIGS_DIR / "tiny.toml",
                       ["privacy.client-epsilon.1=0.5"]).epsilon_for(1) == 0.5
    with pytest.raises(ConfigError, match="client 5 does not exist"):
        load_config(CONFIGS_DIR / "tiny.toml", ["privacy.client-epsilon={ 5 = 1.0 }"])
    with pytest.raises(ConfigError, match="client-epsilon.*ε > 0"):
        load_config(CONFIGS_DIR / "tiny.toml", ["privacy.client-epsilon={ 1 = -2 }"])


def test_simulate_help_lists_the_options():
    done = subprocess.run([sys.executable, "-m", "privet.experiments.cli", "simulate", "--help"],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--config", "--set", "--out", "--overwrite", "--verbose"):
        assert option in done.stdout

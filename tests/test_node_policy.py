"""A node's own privacy floor (experiments/node_policy.py): each rule refuses in one line
naming it; the app check accepts only the node's own code or a trusted FAB hash."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from privet.common.config import DEFAULT_CONFIG, load_config
from privet.experiments import launcher
from privet.experiments.node_policy import NodePolicy, PolicyRefused

PYPROJECT = b"""[tool.flwr.app.components]
serverapp = "privet.server.app:app"
clientapp = "privet.clients.app:app"
"""


def run_config(**privacy) -> dict:
    flat = load_config(DEFAULT_CONFIG).to_run_config()
    flat.update({"privacy.train-metrics": "off", **privacy})
    return flat


def refusal(policy: NodePolicy, config: dict, client: int | None = 0) -> str:
    with pytest.raises(PolicyRefused) as caught:
        policy.check_config(config, client)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"node policy: {caught.value.rule}: ")
    return caught.value.rule


def test_a_run_without_dp_breaks_every_privacy_rule():
    none = run_config(**{"privacy.level": "none"})
    assert refusal(NodePolicy(require_level="sample"), none) == "require-level"
    assert refusal(NodePolicy(require_level="user"), none) == "require-level"
    assert refusal(NodePolicy(max_epsilon=5), none) == "max-epsilon"
    assert refusal(NodePolicy(min_noise=0.5), none) == "min-noise"
    NodePolicy(noise_source="secure").check_config(none, 0)  # noise-source: nothing drawn


def test_require_level():
    sample, user = run_config(), run_config(**{"privacy.level": "user"})
    both = run_config(**{"privacy.level": "both"})
    NodePolicy(require_level="sample").check_config(sample, 0)
    NodePolicy(require_level="sample").check_config(both, 0)
    NodePolicy(require_level="user").check_config(user, 0)
    NodePolicy(require_level="both").check_config(both, 0)
    assert refusal(NodePolicy(require_level="sample"), user) == "require-level"
    assert refusal(NodePolicy(require_level="both"), sample) == "require-level"
    # sample level with ε = inf (for this node) is no sample-level DP
    assert refusal(NodePolicy(require_level="sample"),
                   run_config(**{"privacy.epsilon": float("inf")})) == "require-level"
    per_client = run_config(**{"privacy.epsilon": float("inf"),
                               "privacy.client-epsilon": "1:8.0"})
    NodePolicy(require_level="sample").check_config(per_client, 1)
    assert refusal(NodePolicy(require_level="sample"), per_client, 0) == "require-level"


def test_max_epsilon():
    policy = NodePolicy(max_epsilon=3.0)
    policy.check_config(run_config(**{"privacy.epsilon": 3.0}), 0)
    assert refusal(policy, run_config(**{"privacy.epsilon": 3.5})) == "max-epsilon"
    assert refusal(policy, run_config(**{"privacy.epsilon": float("inf")})) == "max-epsilon"
    assert refusal(policy, run_config(**{"privacy.client-epsilon": "0:8.0"})) \
        == "max-epsilon"
    policy.check_config(run_config(**{"privacy.client-epsilon": "1:8.0"}), 0)
    assert refusal(policy, run_config(**{"privacy.level": "user"})) == "max-epsilon"
    assert refusal(policy, run_config(**{"privacy.level": "both",
                                         "privacy.user-epsilon": 4.0})) == "max-epsilon"
    assert refusal(policy, run_config(**{"preprocess.epsilon": float("inf")})) == "max-epsilon"
    assert refusal(policy, run_config(**{"privacy.train-metrics": "clear"})) == "max-epsilon"


def test_min_noise_and_noise_source():
    NodePolicy(min_noise=0.8).check_config(run_config(), 0)  # σ itself: the ClientApp
    assert refusal(NodePolicy(min_noise=0.8), run_config(**{"privacy.level": "user"})) \
        == "min-noise"
    secure = NodePolicy(noise_source="secure")
    secure.check_config(run_config(**{"privacy.noise-source": "auto"}), 0)
    secure.check_config(run_config(**{"privacy.noise-source": "secure"}), 0)
    assert refusal(secure, run_config(**{"privacy.noise-source": "seeded"})) == "noise-source"


def test_bad_policies_are_refused():
    for bad in ({"require-level": "none"}, {"max_epsilon": 0}, {"max_epsilon": float("inf")},
                {"min_noise": -1}, {"noise_source": "seeded"}):
        with pytest.raises(ValueError):
            NodePolicy(**{k.replace("-", "_"): v for k, v in bad.items()})


def fab(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_only_the_nodes_own_code_or_a_trusted_hash_runs(tmp_path):
    (tmp_path / "pyproject.toml").write_bytes(PYPROJECT + b"\n[tool.flwr.app.config]\nx = 1\n")
    (tmp_path / "privet" / "clients").mkdir(parents=True)
    (tmp_path / "privet" / "clients" / "app.py").write_bytes(b"app = 1\n")
    ours = {"pyproject.toml": PYPROJECT + b"\n[tool.flwr.app.config]\nx = 2\n",
            "privet/clients/app.py": b"app = 1\n", "README.md": b"anything",
            ".info/CONTENT": b"hashes"}
    policy = NodePolicy(max_epsilon=3)
    policy.check_app(fab(ours), tmp_path)  # config defaults and non-code files may differ

    def rule(files: dict, p: NodePolicy = policy) -> str:
        with pytest.raises(PolicyRefused) as caught:
            p.check_app(fab(files), tmp_path)
        return f"{caught.value.rule}: {caught.value.why}"

    assert "privet/clients/app.py differs" in rule(
        {**ours, "privet/clients/app.py": b"app = 'no dp'\n"})
    assert "evil.py is not part" in rule({**ours, "evil.py": b"import os\n"})
    assert "evil.so is not part" in rule({**ours, "evil.so": b"\x7fELF"})
    assert "components" in rule({**ours, "pyproject.toml": PYPROJECT.replace(
        b"privet.clients.app:app", b"evil:app")})
    assert rule({**ours, "../x.py": b""}).startswith("installed-app")
    assert rule({**ours, str(tmp_path / "privet" / "clients" / "app.py"): b"app = 1\n"}
                ).startswith("installed-app")
    assert rule({"x.txt": b""}).startswith("installed-app")  # no pyproject.toml

    content = fab({**ours, "privet/clients/app.py": b"app = 2\n"})
    digest = hashlib.sha256(content).hexdigest()
    NodePolicy(max_epsilon=3, trusted_fab_hashes=(digest,)).check_app(content, tmp_path)
    assert rule(ours, NodePolicy(trusted_fab_hashes=(digest,))).startswith("trusted-fab-hash")
    NodePolicy(max_epsilon=3, any_app=True).check_app(content, tmp_path)
    NodePolicy().check_app(content, tmp_path)  # no policy: nothing is checked


def test_the_launcher_and_deploy_supernode_take_the_policy(tmp_path):
    args = launcher.parse_args(["--require-level", "sample", "--max-epsilon", "4",
                                "--min-noise", "0.7", "--noise-source", "secure",
                                "--trusted-fab-hash", "AB"])
    assert args.policy == NodePolicy("sample", 4.0, 0.7, "secure", ("ab",))
    assert not launcher.parse_args([]).policy.active
    with pytest.raises(SystemExit):
        launcher.parse_args(["--max-epsilon", "inf"])

    from privet.experiments.cli_deploy import policy_args
    assert launcher.parse_args(policy_args(args.policy)).policy == args.policy

    from typer.testing import CliRunner

    from privet.experiments.cli import app
    data = tmp_path / "data.csv"
    data.write_text("a\n1\n")
    base = ["deploy", "supernode", "--superlink", "127.0.0.1:1", "--data", str(data),
            "--partition-id", "0", "--insecure", "--dry-run"]
    done = CliRunner().invoke(app, [*base, "--require-level", "sample", "--min-noise", "0.7"])
    assert done.exit_code == 0, done.output
    assert "--require-level sample --min-noise 0.7" in done.output
    assert 'min-noise="0.7"' in done.output  # for the ClientApp's σ check
    done = CliRunner().invoke(app, [*base, "--max-epsilon", "3", "--isolation", "subprocess"])
    assert done.exit_code != 0 and "--isolation process" in done.output


def test_the_clientapp_checks_planned_noise_against_the_nodes_floor():
    from flwr.app import Context, RecordDict

    from privet.clients import accounting
    from privet.clients.app import _noise_floor

    def context(**node) -> Context:
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                       run_config={})

    assert accounting.min_noise(context(**{"partition-id": 0})) is None
    floored = context(**{"partition-id": 0, "min-noise": "0.7"})
    assert accounting.min_noise(floored) == 0.7
    _noise_floor(context(), None, False, 100)  # no floor: nothing to check
    _noise_floor(floored, (0.9, 0.1, 10), True, 100)
    _noise_floor(floored, None, True, 100)  # no budget: the caller declines
    for plan, private in (((0.5, 0.1, 10), True), (None, False)):
        with pytest.raises(RuntimeError, match=r"^node policy: min-noise: planned σ = "):
            _noise_floor(floored, plan, private, 100)
    with pytest.raises(ValueError):
        accounting.min_noise(context(**{"min-noise": "lots"}))

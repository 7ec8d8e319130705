"""A deployed node's own privacy floor, enforced by the node's launcher, not by the app.

The operator chooses the run's config *and* ships the ClientApp's code (the FAB), so a check
inside the ClientApp proves nothing to the node. Privet's launcher (experiments/launcher.py)
is the node's own code: before a task's app code is loaded it pulls the task (message,
context, run, FAB) from the SuperNode and checks two things here:

- the app: the FAB's hash is one the node trusts (`--trusted-fab-hash`), or every code file
  in it is byte-identical to the node's own installed privet and its pyproject names the same
  ClientApp (the default once any policy flag is set; `--any-app` turns it off);
- the config: the run_config the *SuperNode* fused (FAB defaults + the operator's
  overrides, exactly what the ClientApp will read) against each rule below.

A refused task gets an error reply naming the rule and nothing of the app runs.

Rules (each refusal is one line, "node policy: <rule>: <why>"):

- require-level sample|user|both: privacy.level must include that level, with a finite ε.
- max-epsilon E: every ε this node's rows are charged in the run is finite and ≤ E
  (its sample-level target, the user-level target, the preprocessing statistics' ε) and
  nothing is released outside ε (privacy.train-metrics = "clear" is refused). The trusted
  ClientApp then keeps the node's ledger (all runs on these rows) within the run's target,
  hence within E.
- min-noise S: sample-level DP must be on (σ > 0); the planned σ depends on the node's row
  count, so the trusted ClientApp compares it before the first step (node-config
  `min-noise`, set by `privet deploy supernode`).
- noise-source secure: privacy.noise-source must not be "seeded".
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LEVELS = ("sample", "user", "both")
# files Python may execute on import: these must equal the node's own copy
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".pth")
FAB_META = ".info/"
PREFIX = "node policy"


class PolicyRefused(Exception):
    """A run breaks the node's policy; str() is the one line naming the rule."""

    def __init__(self, rule: str, why: str) -> None:
        self.rule, self.why = rule, why
        super().__init__(f"{PREFIX}: {rule}: {why}")


@dataclass(frozen=True)
class NodePolicy:
    require_level: str = ""
    max_epsilon: float | None = None
    min_noise: float | None = None
    noise_source: str = ""
    trusted_fab_hashes: tuple[str, ...] = ()
    any_app: bool = False

    def __post_init__(self) -> None:
        if self.require_level not in ("", *LEVELS):
            raise ValueError(f"require-level {self.require_level!r}: expected one of "
                             f"{', '.join(LEVELS)}")
        if self.noise_source not in ("", "secure"):
            raise ValueError(f"noise-source {self.noise_source!r}: only 'secure' is a floor")
        if self.max_epsilon is not None and not (0 < self.max_epsilon < math.inf):
            raise ValueError("max-epsilon must be a finite number > 0")
        if self.min_noise is not None and not (0 < self.min_noise < math.inf):
            raise ValueError("min-noise must be a finite number > 0")

    @property
    def privacy_rules(self) -> bool:
        return bool(self.require_level or self.max_epsilon is not None
                    or self.min_noise is not None or self.noise_source)

    @property
    def active(self) -> bool:
        return self.privacy_rules or bool(self.trusted_fab_hashes)

    @property
    def checks_app(self) -> bool:
        return self.active and not self.any_app

    def describe(self) -> str:
        parts = [f"require-level={self.require_level}" if self.require_level else "",
                 f"max-epsilon={self.max_epsilon:g}" if self.max_epsilon is not None else "",
                 f"min-noise={self.min_noise:g}" if self.min_noise is not None else "",
                 f"noise-source={self.noise_source}" if self.noise_source else ""]
        app = ("any app" if not self.checks_app else
               f"FAB hash in {len(self.trusted_fab_hashes)} trusted" if self.trusted_fab_hashes
               else "the node's installed privet code only")
        return ", ".join([p for p in parts if p] + [app])

    # --- the app ---------------------------------------------------------------------

    def check_app(self, fab_content: bytes, project_dir: Path) -> None:
        """Raise PolicyRefused unless the FAB is trusted (see the module docstring)."""
        if not self.checks_app:
            return
        digest = hashlib.sha256(fab_content).hexdigest()
        if self.trusted_fab_hashes:
            if digest not in self.trusted_fab_hashes:
                raise PolicyRefused("trusted-fab-hash", f"the run's app (FAB sha256 "
                                    f"{digest[:16]}...) is not one this node trusts")
            return
        why = installed_code_mismatch(fab_content, project_dir)
        if why:
            raise PolicyRefused("installed-app", f"the run's app is not this node's installed "
                                f"privet: {why}")

    # --- the config ------------------------------------------------------------------

    def check_config(self, run_config: Mapping[str, Any], client_id: int | None) -> None:
        """Raise PolicyRefused for the first rule the fused run_config breaks."""
        if not self.privacy_rules:
            return
        from privet.common.config import ConfigError, from_run_config

        try:
            cfg = from_run_config(run_config)
        except (ConfigError, ValueError, TypeError, KeyError) as err:
            raise PolicyRefused("config", f"the run's config cannot be read ({err})") from None
        p = cfg.privacy
        level = p.level
        sample_eps = cfg.epsilon_for(client_id) if client_id is not None else max(
            [p.epsilon, *_client_targets(p.client_epsilon)])
        sample_on = level in ("sample", "both") and math.isfinite(sample_eps)
        user_on = level in ("user", "both")
        if self.require_level:
            needed = {"sample": sample_on, "user": user_on,
                      "both": sample_on and user_on}[self.require_level]
            if not needed:
                raise PolicyRefused("require-level", f'privacy.level = "{level}"'
                                    + (f" with ε = {sample_eps:g}" if level != "none" else "")
                                    + f"; this node requires {self.require_level}-level DP")
        if self.max_epsilon is not None:
            cap = self.max_epsilon
            if level == "none":
                raise PolicyRefused("max-epsilon", f'privacy.level = "none" trains with no DP '
                                    f"(ε = inf); this node's cap is ε ≤ {cap:g}")
            if level in ("sample", "both") and not sample_eps <= cap:
                raise PolicyRefused("max-epsilon", f"sample-level target ε = {sample_eps:g} "
                                    f"for this node; its cap is ε ≤ {cap:g}")
            if level == "user" and not sample_on:
                # rows leave only as a clipped update the server noises: the node cannot
                # see that noise, so a cap on its own ε needs sample level
                raise PolicyRefused("max-epsilon", 'privacy.level = "user": the node\'s rows '
                                    "are trained with no sample-level noise; its cap "
                                    f"ε ≤ {cap:g} needs level sample or both")
            if user_on and not p.user_epsilon <= cap:
                raise PolicyRefused("max-epsilon", f"privacy.user-epsilon = {p.user_epsilon:g}"
                                    f"; this node's cap is ε ≤ {cap:g}")
            if not math.isfinite(cfg.preprocess.epsilon) and _statistics_released(cfg):
                raise PolicyRefused("max-epsilon", "preprocess.epsilon = inf releases the "
                                    "node's preprocessing statistics without noise")
            if p.train_metrics == "clear":
                raise PolicyRefused("max-epsilon", 'privacy.train-metrics = "clear" sends '
                                    "training loss and accuracy outside every ε; use "
                                    '"noised" or "off"')
        if self.min_noise is not None and not sample_on:
            raise PolicyRefused("min-noise", f'privacy.level = "{level}"'
                                + (f" with ε = {sample_eps:g}" if level != "none" else "")
                                + f" trains this node's rows with σ = 0; its floor is "
                                  f"σ ≥ {self.min_noise:g}")
        if self.noise_source == "secure" and p.noise_source == "seeded":
            raise PolicyRefused("noise-source", 'privacy.noise-source = "seeded" draws noise '
                                "from the run's seed; this node requires secure noise")

    def check(self, run_config: Mapping[str, Any], client_id: int | None,
              fab_content: bytes, project_dir: Path) -> None:
        self.check_app(fab_content, project_dir)
        self.check_config(run_config, client_id)


def _client_targets(text: str) -> list[float]:
    from privet.common.config import parse_client_epsilon
    return [e for _, e in parse_client_epsilon(text)]


def _statistics_released(cfg) -> bool:
    """Do the node's preprocessing statistics leave it (federated fit of a table)?"""
    return cfg.federated_preprocessing


def installed_code_mismatch(fab_content: bytes, project_dir: Path) -> str:
    """"" when every code file of the FAB equals the node's copy under project_dir and the
    FAB's pyproject names the same app components; else the first difference."""
    project_dir = Path(project_dir)
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab_content))
    except zipfile.BadZipFile:
        return "the FAB is not a zip archive"
    with archive:
        names = archive.namelist()
        if "pyproject.toml" not in names:
            return "no pyproject.toml in the FAB"
        try:
            theirs = _components(archive.read("pyproject.toml"))
            ours = _components((project_dir / "pyproject.toml").read_bytes())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            return f"pyproject.toml unreadable ({err})"
        if theirs != ours:
            return f"its [tool.flwr.app.components] {theirs} differ from the node's {ours}"
        for name in names:
            if name.endswith("/") or name.startswith(FAB_META) or \
                    not name.endswith(CODE_SUFFIXES):
                continue
            mine = project_dir / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not mine.is_file():
                return f"{name} is not part of the node's installation"
            if archive.read(name) != mine.read_bytes():
                return f"{name} differs from the node's copy"
    return ""


def _components(pyproject: bytes) -> dict:
    data = tomllib.loads(pyproject.decode("utf-8"))
    return dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}))

"""The experiment configuration: frozen dataclasses, parsed and validated once.

One TOML file describes an experiment. Keys are spelled with dashes (`num-clients`,
`[train] batch-size`); the dataclass fields use underscores. The same config travels
to the ServerApp and every ClientApp as Flower's flat `run_config`
(`{"privacy.epsilon": 3.0, ...}`), so both sides rebuild the identical object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; tomli comes with flwr
    import tomli as tomllib

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONFIGS_DIR = PROJECT_DIR / "experiments" / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "adult.toml"


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _spec(default: Any, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, allow_inf: bool = False,
          help: str = "") -> Any:
    """A dataclass field carrying its own validation rule."""
    return field(default=default, metadata={
        "choices": choices, "low": low, "high": high, "low_open": low_open,
        "allow_inf": allow_inf, "help": help})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _spec("adult", choices=("adult",), help="dataset registry name")
    partition: str = _spec("dirichlet", choices=("iid", "dirichlet"),
                           help="how rows are split over clients")
    alpha: float = _spec(0.5, low=0.0, low_open=True,
                         help="Dirichlet concentration; smaller = more label skew")
    min_rows: int = _spec(64, low=1, help="smallest partition the partitioner accepts")


@dataclass(frozen=True)
class TrainConfig:
    model: str = _spec("mlp", choices=("mlp", "logreg"), help="model registry name")
    hidden: int = _spec(64, low=1, help="hidden units of the MLP")
    local_epochs: int = _spec(1, low=1, help="passes over the local data per round")
    batch_size: int = _spec(64, low=1, help="expected batch size (Poisson sampling)")
    lr: float = _spec(0.2, low=0.0, low_open=True, help="SGD learning rate")
    momentum: float = _spec(0.8, low=0.0, high=0.999, help="SGD momentum")


@dataclass(frozen=True)
class PrivacyConfig:
    level: str = _spec("sample", choices=("sample", "user", "both", "none"),
                       help="sample = DP-SGD on each client; user = clipped, noised client "
                            "updates on the server; both; none = no privacy")
    epsilon: float = _spec(3.0, low=0.0, low_open=True, allow_inf=True,
                           help="target ε per client for the whole run; inf = no noise")
    client_epsilon: str = _spec("", help="per-client sample-level targets, e.g. "
                                         "{ 0 = 1.0, 3 = 8.0 }; others use epsilon")
    delta: float = _spec(1e-5, low=0.0, high=0.1, low_open=True, help="target δ")
    max_grad_norm: float = _spec(1.0, low=0.0, low_open=True,
                                 help="per-sample clipping bound C")
    user_epsilon: float = _spec(3.0, low=0.0, low_open=True,
                                help="user-level target ε for the whole run (level user/both)")
    user_clip: float = _spec(1.0, low=0.0, low_open=True,
                             help="L2 bound S on each client's model update (user level)")
    user_clipping: str = _spec("fixed", choices=("fixed", "adaptive"),
                               help="user level: fixed S, or S tracking a quantile of update "
                                    "norms (Andrew et al., 2021)")
    user_clip_quantile: float = _spec(0.5, low=0.0, high=1.0,
                                      help="adaptive clipping: target fraction of unclipped "
                                           "updates")
    user_clip_lr: float = _spec(0.2, low=0.0, low_open=True,
                                help="adaptive clipping: geometric learning rate of S")
    user_count_stddev: float = _spec(0.0, low=0.0,
                                     help="adaptive clipping: noise on the clipped count; "
                                          "0 = expected cohort / 20")
    on_exhausted: str = _spec("skip", choices=("skip", "stop"),
                              help="when clients run out of budget: skip = go on with the "
                                   "others; stop = end the run once fewer than "
                                   "clients-per-round can still train")
    ledger_dir: str = _spec("", help="folder for clients' privacy ledgers on disk (simulation);"
                                     " deployment keeps them next to each node's data")
    accountant: str = _spec("pld", choices=("pld", "prv", "rdp"),
                            help="privacy accountant used for calibration and reports")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _spec("adult", help="run name; the run directory starts with it")
    seed: int = _spec(42, low=0, help="seed for partitioning, init and sampling")
    rounds: int = _spec(20, low=1, high=10_000, help="federated rounds")
    num_clients: int = _spec(10, low=1, high=100_000, help="simulated clients")
    clients_per_round: int = _spec(10, low=1, help="clients sampled each round")
    out_dir: str = _spec("", help="run directory; empty = runs/<name>-<timestamp>")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        for client, _ in parse_client_epsilon(self.privacy.client_epsilon):
            if client >= self.num_clients:
                raise ConfigError(f"privacy.client-epsilon: client {client} does not exist; "
                                  f"expected ids 0..{self.num_clients - 1}")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round = {self.clients_per_round}: must be ≤ num-clients "
                f"({self.num_clients})")

    @property
    def private(self) -> bool:
        """Sample-level DP: (some) clients run DP-SGD."""
        targets = [self.privacy.epsilon,
                   *(e for _, e in parse_client_epsilon(self.privacy.client_epsilon))]
        return self.privacy.level in ("sample", "both") and any(map(math.isfinite, targets))

    def epsilon_for(self, client_id: int) -> float:
        """The sample-level target ε of one client (its own entry, else the common one)."""
        return dict(parse_client_epsilon(self.privacy.client_epsilon)).get(
            client_id, self.privacy.epsilon)

    def client_private(self, client_id: int) -> bool:
        return self.privacy.level in ("sample", "both") and not math.isinf(
            self.epsilon_for(client_id))

    @property
    def user_level(self) -> bool:
        """User-level DP: the server clips and noises client updates."""
        return self.privacy.level in ("user", "both")

    @property
    def client_sample_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    def to_run_config(self) -> dict[str, Any]:
        """Flat `{"section.key": value}` mapping, as Flower's run_config holds it."""
        return _flatten(self)

    def experiment_id(self) -> str:
        """Stable identity of what is being run: the resolved config minus where results go.

        Ledgers on disk are keyed by it, so re-running the same experiment (after a crash
        or a restart) resumes the budget its clients already spent.
        """
        # where results and ledgers live, and what to do when budgets run out, are not
        same = dataclasses.replace(self, out_dir="", privacy=dataclasses.replace(
            self.privacy, on_exhausted="skip", ledger_dir=""))
        digest = hashlib.sha256(same.to_toml().encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"

    def to_toml(self) -> str:
        """The resolved config as a TOML document (readable by `load_config`)."""
        lines: list[str] = []
        tables: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                tables.append(f"\n[{_key(f.name)}]")
                tables += [f"{_key(g.name)} = {_toml_value(getattr(value, g.name))}"
                           for g in dataclasses.fields(value)]
            else:
                lines.append(f"{_key(f.name)} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"


def _key(name: str) -> str:
    return name.replace("_", "-")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _key(f.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Return `value` coerced to the field's type, or raise ConfigError naming `key`."""
    meta, expected = f.metadata, type(f.default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str) and value.lower() in ("inf", "+inf"):
        value = math.inf
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} = {value!r}: expected {expected.__name__}")
    if meta["choices"] is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key} = {value!r}: expected one of {allowed}")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key} = nan: expected a number")
    if isinstance(value, float) and math.isinf(value):
        if meta["allow_inf"] and value > 0:
            return value
        raise ConfigError(f"{key} = {value}: expected a finite number")
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        bound = f"> {low}" if meta["low_open"] else f"≥ {low}"
        raise ConfigError(f"{key} = {value!r}: expected a value {bound}"
                          + (f" and ≤ {high}" if high is not None else ""))
    if high is not None and value > high:
        raise ConfigError(f"{key} = {value!r}: expected a value ≤ {high}")
    return value


def parse_client_epsilon(text: str) -> tuple[tuple[int, float], ...]:
    """"0:1.0,3:inf" -> ((0, 1.0), (3, inf)); the run_config form of the per-client table."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        client, sep, value = item.partition(":")
        try:
            pair = (int(client), float(value))
        except ValueError:
            pair = None
        if not sep or pair is None or pair[0] < 0 or not pair[1] > 0:
            raise ConfigError(f"privacy.client-epsilon: {item!r}: expected client id = ε > 0, "
                              "e.g. { 0 = 1.0, 3 = 8.0 }")
        pairs.append(pair)
    return tuple(sorted(pairs))


def _client_epsilon_text(value: Any, key: str) -> str:
    """Accept a TOML table {id = ε} (or its string form) and return the string form."""
    if isinstance(value, Mapping):
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected a table of client id = ε")
    pairs = parse_client_epsilon(value)
    return ",".join(f"{c}:{_toml_value(e) if math.isinf(e) else repr(e)}" for c, e in pairs)


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    known = {_key(f.name): f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = prefix + key
        if key not in known:
            raise ConfigError(f"{full}: unknown key; expected one of "
                              + ", ".join(prefix + k for k in known))
        f = known[key]
        if full == "privacy.client-epsilon":
            kwargs[f.name] = _client_epsilon_text(value, full)
        elif f.default is dataclasses.MISSING:  # a nested section
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full} = {value!r}: expected a table [{full}]")
            kwargs[f.name] = _build(f.default_factory, value, full + ".")  # type: ignore[misc]
        else:
            kwargs[f.name] = _check_value(full, value, f)
    return cls(**kwargs)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is a value, not a section")
        node[leaf] = value
    return nested


def parse_override(assignment: str) -> tuple[str, Any]:
    """`privacy.epsilon=1` -> ("privacy.epsilon", 1). Values are TOML; bare words are strings."""
    key, sep, raw = assignment.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. privacy.epsilon=1")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def from_mapping(values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
                 ) -> ExperimentConfig:
    """Build and validate a config from nested TOML data plus flat dotted overrides."""
    merged = _unflatten(_flatten_mapping(values))
    for key, value in _unflatten(overrides or {}).items():
        _deep_merge(merged, key, value)
    return _build(ExperimentConfig, merged)


def _flatten_mapping(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten_mapping(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _deep_merge(into: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and isinstance(into.get(key), dict):
        for k, v in value.items():
            _deep_merge(into[key], k, v)
    else:
        into[key] = value


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Read an experiment TOML file and apply `key=value` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    parsed = dict(parse_override(o) for o in overrides or [])
    try:
        return from_mapping(values, parsed)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild the config from Flower's flat run_config (server and client side)."""
    return from_mapping(_unflatten(dict(run_config)))

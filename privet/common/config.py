"""The experiment configuration: frozen dataclasses, parsed and validated once.

One TOML file describes an experiment. Keys are spelled with dashes (`num-clients`,
`[train] batch-size`); the dataclass fields use underscores. The same config travels
to the ServerApp and every ClientApp as Flower's flat `run_config`
(`{"privacy.epsilon": 3.0, ...}`), so both sides rebuild the identical object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; tomli comes with flwr
    import tomli as tomllib

# `data.dataset`: tables go through privet's tabular pipeline (cleaning, a schema, fitted
# preprocessing); images are arrays used as they are. A user's loader (an import path) is
# either, by what it returns: ask DataConfig.tabular, never these lists.
TABLE_DATASETS = ("adult", "csv", "parquet")
IMAGE_DATASETS = ("fashion-mnist", "digits", "image-folder")
SHIPPED_DATASETS = ("adult", "fashion-mnist", "digits")
PROJECT_DIR = Path(__file__).resolve().parents[2]  # the repository: the Flower app folder
CONFIGS_DIR = PROJECT_DIR / "experiments" / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "adult.toml"
# where DP random draws come from (common.privacy.randomness)
NOISE_SOURCES = ("auto", "seeded", "secure")
# `train.device` (resolved on each machine by common.device)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d{1,3})?")
DEVICE_EXPECTED = ('"auto" (cuda where available, else cpu), "cpu", "cuda" or "cuda:N" '
                   "(GPU number N)")
TASKS = ("classification", "regression")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _spec(default: Any, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, allow_inf: bool = False,
          shape: type | None = None, help: str = "") -> Any:
    """A dataclass field carrying its own validation rule.

    `shape` (dict or list) marks a TOML table or array. Flower's run_config holds only
    scalars, so such a value travels as canonical JSON text and is parsed where used.
    """
    return field(default=default, metadata={
        "choices": choices, "low": low, "high": high, "low_open": low_open,
        "allow_inf": allow_inf, "shape": shape, "help": help})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _spec("adult", help="adult, fashion-mnist, digits, csv, parquet, "
                                       "image-folder, or your loader as package.module:loader "
                                       "(common.data.loader)")
    path: str = _spec("", help="csv/parquet: one file (partitioned like any dataset) or a "
                               "folder with one file per client; image-folder: a folder with "
                               "one subfolder of images per class; fashion-mnist: the folder "
                               "holding its IDX files (empty = the usual places); a loader "
                               "reads it as it likes")
    label: str = _spec("", help="csv/parquet, or a loader returning a DataFrame: the label "
                                "column")
    classes: str = _spec("", shape=list, help="csv/parquet/image-folder/loader: label values "
                                              "(image-folder: subfolder names) in class order, "
                                              "e.g. [\"no\", \"yes\"]; empty = sorted values "
                                              "found")
    column_types: str = _spec("", shape=dict, help="csv/parquet: override inferred types, e.g. "
                                                   "{ zip = \"categorical\" }")
    categories: str = _spec("", shape=dict, help="csv/parquet: vocabulary per categorical "
                                                 "column, e.g. { colour = [\"red\", \"blue\"] }")
    bounds: str = _spec("", shape=dict, help="public [low, high] per numeric column, e.g. "
                                             "{ age = [0, 120] }; federated preprocessing "
                                             "clips to them to bound each row's influence")
    label_bounds: str = _spec("", shape=list,
                              help="train.task = \"regression\": the public [low, high] range "
                                   "of data.label, e.g. [0, 100]; the target is clipped to it on "
                                   "the clients and scaled to [-1, 1] by it (adult: the "
                                   "column's census range when empty)")
    decimal: str = _spec("", choices=("", ".", ","),
                         help="csv: the decimal mark of every numeric column; empty = found "
                              "per column (25,165 in a ;-separated file is 25.165)")
    thousands: str = _spec("", choices=("", "none", ",", ".", " ", "'"),
                           help="csv: the thousands separator of every numeric column; empty "
                                "= found per column (1,234.5 is 1234.5)")
    bad_lines: str = _spec("error", choices=("error", "skip"),
                           help="csv: a line with the wrong number of fields stops the run "
                                "(error) or is skipped and counted (skip)")
    test_path: str = _spec("", help="csv/parquet: the server's test file; image-folder: a "
                                    "folder of the same layout; empty = hold out "
                                    "test-fraction of the rows")
    test_fraction: float = _spec(0.2, low=0.0, high=0.9, low_open=True,
                                 help="share of rows held out as the server's test set when "
                                      "the dataset has no test split of its own")
    image_size: int = _spec(28, low=1, high=1024,
                            help="image-folder: every image is resized to image-size × "
                                 "image-size pixels")
    image_channels: int = _spec(3, choices=(1, 3),
                                help="image-folder: 1 = grayscale, 3 = RGB")
    download: bool = _spec(False, help="fashion-mnist: download through torchvision when no "
                                       "local copy is found (needs a network)")
    partition: str = _spec("dirichlet", choices=("iid", "dirichlet", "shards", "quantity",
                                                 "natural"),
                           help="how rows are split over clients")
    alpha: float = _spec(0.5, low=0.0, low_open=True,
                         help="dirichlet: concentration; smaller = more label skew")
    shards_per_client: int = _spec(2, low=1, help="shards: label shards (classes) per client")
    power: float = _spec(1.0, low=0.0, help="quantity: client sizes fall off as rank^-power")
    natural_column: str = _spec("native-country", help="natural: the column whose values "
                                                       "make clients (grouped when more "
                                                       "values than clients)")
    min_rows: int = _spec(64, low=1, help="smallest partition the partitioner accepts")

    @property
    def loader(self) -> bool:
        """`dataset` is a user's loader, `package.module:loader` (common.data.loader)."""
        return is_import_path(self.dataset)

    @property
    def tabular(self) -> bool:
        """Whether privet's tabular pipeline applies: cleaning, a schema (columns, classes),
        preprocessing fitted from rows (with DP), row digests over cells. True for adult,
        csv, parquet and a loader that returns a DataFrame; False where the features are
        arrays used as they are (images: digits, fashion-mnist, image-folder; a loader's
        arrays or torch Dataset). The one place this is decided: code asks this, never the
        dataset's name. For a loader it loads the data (once per process, cached); raises
        common.data.loader.DatasetError (one line) when the loader cannot be used."""
        if self.dataset in TABLE_DATASETS:
            return True
        if not self.loader:
            return False
        from privet.common.data.loader import load  # imports the user's module: only when asked
        return load(self).tabular


@dataclass(frozen=True)
class PreprocessConfig:
    fit: str = _spec("auto", choices=("auto", "federated", "local"),
                     help="federated = clients send noised statistics and the server fits "
                          "one shared transform; local = each client fits on its own rows "
                          "(from noised statistics, charged to its ledger, when it trains "
                          "with DP-SGD); auto = federated, or local with user-level DP "
                          "(which refuses federated); tabular data only")
    missing_markers: str = _spec('["?", "NA", "N/A", "NaN", "null", "None"]', shape=list,
                                 help="cell values that mean missing (empty cells always do)")
    drop_duplicates: bool = _spec(True, help="drop exact duplicate rows (counted)")
    impute_numeric: str = _spec("median", choices=("median", "mean", "constant"),
                                help="fill missing numbers")
    impute_categorical: str = _spec("most-frequent", choices=("most-frequent", "other"),
                                    help="fill missing categories: the most frequent value "
                                         "or the `other` bucket")
    fill_value: float = _spec(0.0, help="impute-numeric = constant: the value")
    max_categories: int = _spec(0, low=0, help="keep the k most frequent values of each "
                                               "categorical column, the rest go to `other`; "
                                               "0 = the whole vocabulary (needs federated)")
    clip_quantile: float = _spec(0.0, low=0.0, high=0.25,
                                 help="clip numbers to the [q, 1-q] quantiles; 0 = off")
    scaling: str = _spec("standard", choices=("standard", "minmax", "robust", "bounds",
                                              "none"),
                         help="numeric scaling; bounds = (x - low) / (high - low) from "
                              "data.bounds, which needs no statistics of the rows")
    select: str = _spec("none", choices=("none", "variance", "mutual-info"),
                        help="feature selection (needs fit = federated)")
    variance_threshold: float = _spec(0.0, low=0.0, help="select = variance: keep features "
                                                         "whose variance exceeds this")
    top_k: int = _spec(20, low=1, help="select = mutual-info: features kept")
    pca: int = _spec(0, low=0, help="project onto this many principal components; 0 = off "
                                    "(needs fit = federated)")
    epsilon: float = _spec(0.3, low=0.0, low_open=True, allow_inf=True,
                           help="ε the noised preprocessing statistics spend (local or "
                                "federated), out of each client's sample-level budget; "
                                "inf = no noise")
    bins: int = _spec(64, low=2, high=4096, help="federated: histogram bins per numeric "
                                                 "column (quantiles, mutual information)")


@dataclass(frozen=True)
class EvaluationConfig:
    mode: str = _spec("server", choices=("server", "federated"),
                      help="server = the global model is evaluated on the server's test set; "
                           "federated = every client evaluates it on a held-out share of its "
                           "own rows and the server, holding no data, averages the results")
    holdout: float = _spec(0.2, low=0.0, high=0.9, low_open=True,
                           help="federated: share of each client's rows kept out of training "
                                "(fixed by the seed) to evaluate on")


@dataclass(frozen=True)
class TrainConfig:
    model: str = _spec("mlp", help="a built-in model (mlp, logreg; cnn: image datasets) or "
                                   "your factory as package.module:function (common.models)")
    fix_model: bool = _spec(False, help="let Opacus replace layers DP-SGD cannot train "
                                        "(BatchNorm → GroupNorm); off: such a model is refused")
    dp_path: str = _spec("auto", choices=("auto", "one-pass", "hooks", "ghost"),
                         help="how DP-SGD computes the clipped gradients: auto (one-pass where "
                              "the model's layers allow, else the Opacus mode measured "
                              "fastest) | one-pass (privet's) | hooks | ghost (Opacus); the "
                              "same steps, noise and ε")
    hidden: int = _spec(64, low=1, help="hidden units of the MLP")
    local_epochs: int = _spec(1, low=1, help="passes over the local data per round")
    batch_size: int = _spec(64, low=1, help="expected batch size (Poisson sampling)")
    lr: float = _spec(0.2, low=0.0, low_open=True, help="SGD learning rate")
    momentum: float = _spec(0.8, low=0.0, high=0.999, help="SGD momentum")
    task: str = _spec("classification", choices=TASKS,
                      help="classification (a class per row, cross-entropy) or regression (a "
                           "number per row: data.label, scaled by data.label-bounds)")
    loss: str = _spec("auto", choices=("auto", "cross-entropy", "mse", "huber"),
                      help="auto = cross-entropy for classification, mse for regression; "
                           "regression: mse or huber (delta 1 on the scaled target)")
    device: str = _spec("auto", help="where clients train and models are evaluated: auto (cuda "
                                     "where torch finds a GPU, else cpu) | cpu | cuda | cuda:N; "
                                     "weights travel on the CPU either way")
    num_gpus: float = _spec(0.0, low=0.0, high=1.0,
                            help="simulation on a GPU: the share of one GPU each training "
                                 "client takes (Flower's client-resources.num-gpus), e.g. "
                                 "0.25 = four clients train on a GPU at once; 0 = the clients "
                                 "that train at once share the GPUs evenly")


STRATEGY_NAMES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                  "trimmed-mean", "median", "krum")
# strategies user-level DP (a clipped, noised sum) is analysed for: FedAvg's mean (fedprox
# changes only the clients' local objective) and server optimizers stepped on the noised
# mean (post-processing); not robust aggregates, whose sensitivity is not a sum's
USER_LEVEL_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = _spec("fedavg",
                      help="server aggregation: fedavg | fedavgm (server momentum) | fedprox "
                           "(proximal term) | fedadam | fedyogi | fedadagrad (Reddi et al. "
                           "2021) | trimmed-mean | median | krum (robust to corrupted "
                           "updates) | package.module:Class (your FedAvg subclass)")
    weighting: str = _spec("uniform", choices=("examples", "uniform"),
                           help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad: average the "
                                "updates weighted by each client's examples (FedAvg) or "
                                "uniformly (each client once, as at user level)")
    server_lr: float = _spec(0.0, low=0.0,
                             help="server learning rate (fedavgm, fedadam, fedyogi, "
                                  "fedadagrad); 0 = the strategy's own default (Flower's: "
                                  "fedavgm 1.0, fedadam 0.1, fedyogi 0.01, fedadagrad 0.1)")
    server_momentum: float = _spec(0.9, low=0.0, high=0.999, help="fedavgm: server momentum")
    beta1: float = _spec(0.9, low=0.0, high=0.999, help="fedadam, fedyogi: first moment decay")
    beta2: float = _spec(0.99, low=0.0, high=0.9999,
                         help="fedadam, fedyogi: second moment decay")
    tau: float = _spec(1e-3, low=0.0, low_open=True,
                       help="fedadam, fedyogi, fedadagrad: adaptivity (added to √v)")
    trim_beta: float = _spec(0.2, low=0.0, high=0.49,
                             help="trimmed-mean: share cut at each end, per coordinate")
    byzantine: int = _spec(0, low=0, help="krum: corrupted updates to tolerate")
    multi: int = _spec(1, low=1, help="krum: updates kept and averaged (1 = Krum)")
    proximal_mu: float = _spec(0.01, low=0.0,
                               help="fedprox: weight μ of the proximal term (μ/2)·‖w − w_global‖²"
                                    " in each client's local objective")


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
    noise_source: str = _spec("auto", choices=NOISE_SOURCES,
                              help="where DP noise and sampling come from: seeded = from "
                                   "`seed` (reproducible; simulation only), secure = a "
                                   "ChaCha20 stream keyed from OS entropy; auto = seeded in "
                                   "simulation, secure in deployment (which refuses seeded)")
    train_metrics: str = _spec("clear", choices=("clear", "noised", "off"),
                               help="clients' training loss and accuracy: sent in the clear "
                                    "(outside every ε; listed in summary.json), noised "
                                    "(sample level; costs train-metrics-epsilon) or not at all")
    train_metrics_epsilon: float = _spec(0.3, low=0.0, low_open=True,
                                         help="train-metrics = \"noised\": ε of all rounds' "
                                              "metrics together, out of each client's "
                                              "sample-level budget")


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is also logged, besides its own directory (server.tracking). Nothing is
    imported for an empty key; where the library is missing, privet stops before any client
    trains with one line naming the key and the extra to install."""
    mlflow: str = _spec("", help="MLflow tracking URI: a folder (./mlruns, a local file "
                                 "store), sqlite:///mlflow.db or http(s)://host:port; empty = "
                                 "off; needs pip install 'privet[mlflow]'")
    tensorboard: str = _spec("", help="folder for TensorBoard event files (the rounds.csv "
                                      "scalars per round), in <folder>/<experiment>/<run>; "
                                      "empty = off; needs pip install 'privet[tensorboard]'")
    experiment: str = _spec("", help="MLflow experiment (and TensorBoard subfolder); empty = "
                                     "the run's name (privet compare: its folder's name)")


DRIFT_SOURCES = ("agrawal", "sea", "hyperplane", "adult", "csv", "parquet")
DRIFT_POLICIES = ("never", "periodic", "on-drift")


@dataclass(frozen=True)
class DriftConfig:
    """Data that arrives over time (privet.common.drift): each client's rows come in windows,
    one per `rounds-per-window` rounds; the clients monitor each new window with the current
    global model before training on it, and a policy decides when to retrain. Empty `source`
    = off (a fixed data set per client)."""
    source: str = _spec("", choices=("",) + DRIFT_SOURCES,
                        help="agrawal, sea, hyperplane: river's generators, one stream per "
                             "client; adult: Adult with a scheduled shift; csv or parquet: "
                             "data.path with a time column; empty = no drift mode")
    rows_per_window: int = _spec(200, low=1, high=10_000_000,
                                 help="rows each client receives per window (generators, adult)")
    rounds_per_window: int = _spec(1, low=1, high=10_000,
                                   help="rounds spent on each window before the next arrives")
    drift_round: int = _spec(0, low=0, help="first round whose window has drifted (generators, "
                                            "adult: where the drift is put; csv, parquet: "
                                            "where you know one starts, for scoring the "
                                            "detection); 0 = none")
    width: int = _spec(0, low=0, help="windows over which the drift is gradual; 0 = abrupt")
    concept_before: int = _spec(0, low=0, help="agrawal: classification function 0-9; sea: "
                                               "variant 0-3; hyperplane: the plane's seed")
    concept_after: int = _spec(2, low=0, help="the concept after the drift (as concept-before)")
    label_noise: float = _spec(0.0, low=0.0, high=0.5,
                               help="share of labels flipped (sea) or perturbation (agrawal)")
    shift: str = _spec("covariate", choices=("covariate", "prior", "concept"),
                       help="adult: what changes at drift-round: the age and hours mix, the "
                            "share of >50K, or the labels of one subgroup")
    drift_clients: int = _spec(0, low=0, help="how many clients the drift hits (the first k "
                                              "of a seeded shuffle); 0 = all")
    time_column: str = _spec("", help="csv/parquet: the column that orders rows in time")
    window_length: str = _spec("", help="csv/parquet: a pandas offset (7D, 1MS, ...) per "
                                        "window; rows are windowed by it")
    test_rows: int = _spec(100, low=1, help="held-out rows per client and window that the "
                                            "server scores the model on (simulation oracle)")
    monitor_noise: float = _spec(8.0, low=0.0, low_open=True,
                                 help="noise multiplier of each window's monitoring release "
                                      "(count, errors, loss, feature histograms), "
                                      "relative to its L2 sensitivity")
    monitor_bins: int = _spec(5, low=2, high=100,
                              help="equal-width bins per feature over its declared range")
    detector: str = _spec("page-hinkley", choices=("page-hinkley", "adwin", "threshold"),
                          help="river's PageHinkley or ADWIN on the federated error rate and "
                               "feature shift (PSI), or fixed thresholds")
    detector_threshold: float = _spec(0.2, low=0.0, low_open=True,
                                      help="page-hinkley: λ on the error rate; threshold: "
                                           "error rise over the reference window")
    psi_threshold: float = _spec(0.25, low=0.0, low_open=True,
                                 help="PSI that flags a shift of the feature mix (0.25: the "
                                      "usual 'significant' level); page-hinkley: λ on PSI")
    policy: str = _spec("on-drift", choices=DRIFT_POLICIES,
                        help="when to retrain after the first training: never, periodic "
                             "(every `period` windows) or on-drift (after a detection)")
    period: int = _spec(10, low=1, help="periodic: windows between retrainings")
    retrain: str = _spec("fine-tune", choices=("fine-tune", "reset"),
                         help="retrain from the current model, or from a fresh initialisation")
    retrain_rounds: int = _spec(5, low=1, help="rounds trained after each trigger")
    warmup_rounds: int = _spec(10, low=1, help="rounds trained at the start, before the "
                                              "model is first used")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _spec("adult", help="run name; the run directory starts with it")
    seed: int = _spec(42, low=0, high=2 ** 63 - 1,
                      help="seed for partitioning, init, sampling and seeded DP noise")
    rounds: int = _spec(20, low=1, high=10_000, help="federated rounds")
    num_clients: int = _spec(10, low=1, high=100_000, help="simulated clients")
    clients_per_round: int = _spec(10, low=1, help="clients sampled each round")
    min_clients: int = _spec(1, low=1, help="fewest clients a round runs with: clients that "
                                            "disconnect are left out while this many remain")
    out_dir: str = _spec("", help="run directory; empty = runs/<name>-<timestamp>")
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    def __post_init__(self) -> None:
        for client, _ in parse_client_epsilon(self.privacy.client_epsilon):
            if client >= self.num_clients:
                raise ConfigError(f"privacy.client-epsilon: client {client} does not exist; "
                                  f"expected ids 0..{self.num_clients - 1}")
        pre = self.preprocess
        data = self.data
        if data.dataset not in TABLE_DATASETS + IMAGE_DATASETS and \
                not is_import_path(data.dataset):
            raise ConfigError(f"data.dataset = {data.dataset!r}: expected one of "
                              + ", ".join(repr(d) for d in TABLE_DATASETS + IMAGE_DATASETS)
                              + ", or an import path package.module:loader")
        # a loader's kind is known once it has run, which checking a config never does: it
        # counts as a table here (the cnn factory refuses tables itself, before round 1)
        tabular = data.loader or data.tabular
        if self.fit_mode == "local":
            for key, on in (("select", pre.select != "none"), ("pca", pre.pca > 0),
                            ("max-categories", pre.max_categories > 0)):
                if on:
                    raise ConfigError(
                        f"preprocess.{key}: needs preprocess.fit = \"federated\"; fitted on "
                        "each client's own rows it would give clients different features")
        if pre.fit == "federated" and self.user_level and tabular:
            raise ConfigError(
                f"preprocess.fit = \"federated\" with privacy.level = \"{self.privacy.level}\": "
                "refused: each participant's statistics cover all of its rows, so user-level "
                "noise would have to hide a whole participant's counts and would swamp them "
                "below thousands of participants; use preprocess.fit = \"local\" (a "
                "participant's own transform is part of its update, which the server clips)")
        if not (self.strategy.name in STRATEGY_NAMES or is_import_path(self.strategy.name)):
            raise ConfigError(f"strategy.name = {self.strategy.name!r}: expected one of "
                              f"{', '.join(STRATEGY_NAMES)} or an import path "
                              "package.module:Class")
        if self.user_level and self.strategy.name not in USER_LEVEL_STRATEGIES:
            raise ConfigError(
                f"strategy.name = \"{self.strategy.name}\" with privacy.level = "
                f"\"{self.privacy.level}\": refused: user-level DP clips each update and "
                "noises their sum (DP-FedAvg, McMahan et al. 2018); a robust aggregate's "
                "sensitivity is not that of a sum, and a user's strategy is not analysed; "
                f"use one of {', '.join(USER_LEVEL_STRATEGIES)}, or sample level")
        s = self.strategy
        if s.name == "krum" and self.clients_per_round <= 2 * s.byzantine + 2:
            raise ConfigError(f"strategy.byzantine = {s.byzantine}: krum needs clients-per-round"
                              f" > 2·byzantine + 2 (Blanchard et al.), here "
                              f"{self.clients_per_round}")
        if s.name == "trimmed-mean" and int(s.trim_beta * self.clients_per_round) == 0:
            raise ConfigError(f"strategy.trim-beta = {s.trim_beta}: with clients-per-round = "
                              f"{self.clients_per_round} the trimmed mean cuts "
                              f"⌊{s.trim_beta}·{self.clients_per_round}⌋ = 0 updates at each "
                              "end, i.e. it is the plain mean; raise trim-beta to at least "
                              f"1/{self.clients_per_round} or use fedavg")
        if s.name == "krum" and s.multi > self.clients_per_round:
            raise ConfigError(f"strategy.multi = {s.multi}: at most clients-per-round "
                              f"({self.clients_per_round}) updates can be kept")
        if self.privacy.train_metrics == "noised" and self.privacy.level != "sample":
            raise ConfigError(
                f"privacy.train-metrics = \"noised\" with privacy.level = "
                f"\"{self.privacy.level}\": refused: the noise is sized for one row, not for "
                "a whole participant; use \"off\" (or \"clear\", listed as outside every ε)")
        lowest = min([self.privacy.epsilon,
                      *(e for _, e in parse_client_epsilon(self.privacy.client_epsilon))])
        if self.privacy.train_metrics == "noised" and \
                self.privacy.train_metrics_epsilon >= lowest:
            raise ConfigError(
                f"privacy.train-metrics-epsilon = {self.privacy.train_metrics_epsilon}: must "
                f"be below the lowest sample-level target ε ({lowest}); it is spent out of it")
        required = {"csv": ("path", "label"), "parquet": ("path", "label"),
                    "image-folder": ("path",)}.get(data.dataset, ())
        for key in required:
            if not getattr(data, key):
                raise ConfigError(f"data.{key}: required for data.dataset = {data.dataset!r}")
        if not DEVICE_PATTERN.fullmatch(self.train.device):
            raise ConfigError(f"train.device = {self.train.device!r}: expected {DEVICE_EXPECTED}")
        if self.train.num_gpus > 0 and self.train.device == "cpu":
            raise ConfigError(f"train.num-gpus = {self.train.num_gpus!r} with train.device = "
                              "\"cpu\": a GPU share for clients that train on the CPU; set "
                              "train.device = \"auto\" or \"cuda\", or train.num-gpus = 0")
        if not (self.train.model.isidentifier() or is_import_path(self.train.model)):
            raise ConfigError(f"train.model = {self.train.model!r}: expected a built-in name "
                              "(mlp, logreg, cnn) or an import path package.module:factory")
        if self.train.model == "cnn" and tabular and not data.loader:
            raise ConfigError(f"train.model = \"cnn\": expected an image dataset "
                              f"({', '.join(IMAGE_DATASETS)}), not {self.data.dataset!r}")
        if self.min_clients > self.clients_per_round:
            raise ConfigError(f"min-clients = {self.min_clients}: must be ≤ clients-per-round "
                              f"({self.clients_per_round})")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round = {self.clients_per_round}: must be ≤ num-clients "
                f"({self.num_clients})")
        self._check_task()
        self._check_drift()

    def _check_drift(self) -> None:
        """`[drift]` against the rest; raises ConfigError, one line naming the key."""
        d = self.drift
        if not d.source:
            return
        if self.privacy.level not in ("sample", "none"):
            raise ConfigError(
                f"privacy.level = \"{self.privacy.level}\" with drift.source: refused: drift "
                "mode accounts each window's rows at sample level (event level over time); "
                "user level over windows is not accounted; use \"sample\" or \"none\"")
        if self.regression:
            raise ConfigError("train.task = \"regression\" with drift.source: drift mode "
                              "monitors a classifier's error rate; use classification")
        if self.strategy.name != "fedavg":
            raise ConfigError(f"strategy.name = \"{self.strategy.name}\" with drift.source: "
                              "drift mode aggregates with FedAvg; use \"fedavg\"")
        if self.preprocess.fit == "federated":
            raise ConfigError("preprocess.fit = \"federated\" with drift.source: drift "
                              "sources scale by declared ranges; use \"local\"")
        if self.privacy.client_epsilon:
            raise ConfigError("privacy.client-epsilon with drift.source: not supported; each "
                              "window's target is privacy.epsilon")
        if d.source not in ("csv", "parquet") and d.rows_per_window < self.train.batch_size:
            raise ConfigError(f"drift.rows-per-window = {d.rows_per_window}: fewer than "
                              f"train.batch-size = {self.train.batch_size}; no client could "
                              "train on a window")
        if self.tracking.mlflow or self.tracking.tensorboard:
            raise ConfigError("tracking.mlflow/tensorboard with drift.source: not supported "
                              "yet in drift mode; its results are drift.csv, summary.json and "
                              "drift.png in the run directory")
        if self.privacy.ledger_dir:
            raise ConfigError("privacy.ledger-dir with drift.source: not supported yet: drift "
                              "mode keeps each window's ledger in the run directory (this run's "
                              "spend only); leave it empty")
        if d.warmup_rounds > self.rounds:
            raise ConfigError(f"drift.warmup-rounds = {d.warmup_rounds}: more than rounds "
                              f"({self.rounds})")
        if d.source in ("csv", "parquet"):
            for key, value in (("time-column", d.time_column),
                               ("window-length", d.window_length)):
                if not value:
                    raise ConfigError(f"drift.{key}: required for drift.source = "
                                      f"\"{d.source}\"")
            if not self.data.path:
                raise ConfigError(f"data.path: required for drift.source = \"{d.source}\"")
        elif d.time_column or d.window_length:
            raise ConfigError(f"drift.time-column/window-length: only for a csv or parquet "
                              f"source, not drift.source = \"{d.source}\"")

    def _check_task(self) -> None:
        """`train.task` against the keys that only make sense for one task; raises
        ConfigError, one line naming the key, what was given and what is allowed."""
        data, train = self.data, self.train
        if not self.regression:
            if train.loss in ("mse", "huber"):
                raise ConfigError(
                    f"train.loss = \"{train.loss}\" with train.task = \"classification\": "
                    "refused: mse and huber are regression losses; use \"auto\" or "
                    "\"cross-entropy\", or set train.task = \"regression\"")
            if data.label_bounds:
                raise ConfigError("data.label-bounds: only for train.task = \"regression\" "
                                  "(a classifier's label has classes, not a range)")
            if data.dataset == "adult" and data.label not in ("", "income"):
                raise ConfigError(
                    f"data.label = {data.label!r} with data.dataset = \"adult\": Adult's "
                    "classes are its income column; to predict a numeric column set "
                    "train.task = \"regression\"")
            return
        if train.loss == "cross-entropy":
            raise ConfigError("train.loss = \"cross-entropy\" with train.task = \"regression\""
                              ": expected \"auto\", \"mse\" or \"huber\"")
        if not data.loader and not data.tabular:  # a loader's kind: known once it has run
            raise ConfigError(
                f"train.task = \"regression\" with data.dataset = \"{data.dataset}\": "
                "refused: image datasets have classes; regression needs a numeric data.label "
                "of a table (adult, csv, parquet, or a loader's DataFrame)")
        if data.classes:
            raise ConfigError("data.classes: a list of classes, with train.task = "
                              "\"regression\" whose label is a number; leave it empty")
        if data.dataset == "adult":
            from privet.common.data.adult import NUMERIC  # the census columns: no rows read

            if data.label not in NUMERIC:
                raise ConfigError(
                    f"data.label = {data.label!r}: train.task = \"regression\" on adult needs "
                    f"one of its numeric columns: {', '.join(NUMERIC)}")
        elif not data.label_bounds:
            raise ConfigError(
                f"data.label-bounds: required for train.task = \"regression\" on "
                f"{data.dataset}: the public [low, high] range of {data.label!r}, e.g. [0, 100]; "
                "it scales the target for every client alike without any statistic of the "
                "labels")
        if data.label_bounds:
            label_bounds(data)  # ConfigError for a pair that is not [low, high]
        if self.evaluation.mode == "federated":
            raise ConfigError(
                "evaluation.mode = \"federated\" with train.task = \"regression\": not "
                "supported yet: clients would have to send their held-out labels' spread in "
                "the clear for R²; use evaluation.mode = \"server\"")
        if self.preprocess.select == "mutual-info":
            raise ConfigError(
                "preprocess.select = \"mutual-info\" with train.task = \"regression\": "
                "refused: the mutual information is computed from per-class tables; use "
                "\"variance\" or \"none\"")

    @property
    def regression(self) -> bool:
        """`train.task = "regression"`: one output, a float label, RMSE/MAE/R² scores."""
        return self.train.task == "regression"

    @property
    def loss_name(self) -> str:
        """The training loss: `train.loss`, with auto resolved (cross-entropy for
        classification, mse for regression)."""
        if self.train.loss != "auto":
            return self.train.loss
        return "mse" if self.regression else "cross-entropy"

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

    def metrics_noised(self, client_id: int) -> bool:
        """This client sends its training metrics with DP noise (`privacy.train-metrics`)."""
        return self.privacy.train_metrics == "noised" and self.client_private(client_id)

    @property
    def fit_mode(self) -> str:
        """"federated" or "local": `preprocess.fit`, with auto resolved (local at user level,
        where each participant's statistics would need user-level noise)."""
        if self.preprocess.fit == "auto":
            return "local" if self.user_level else "federated"
        return self.preprocess.fit

    @property
    def federated_preprocessing(self) -> bool:
        """Tabular data fitted by one shared transform from clients' noised statistics."""
        return self.fit_mode == "federated" and self.data.tabular

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

    def to_toml(self, run_config: bool = False) -> str:
        """The resolved config as a TOML document (readable by `load_config`); with
        `run_config`, tables and arrays as the text Flower's run config carries (it takes
        scalars only), for `flwr run --run-config FILE`."""
        lines: list[str] = []
        tables: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                tables.append(f"\n[{_key(f.name)}]")
                tables += [f"{_key(g.name)} = "
                           + (_toml_value(getattr(value, g.name)) if run_config
                              else _field_toml(g, getattr(value, g.name)))
                           for g in dataclasses.fields(value)]
            else:
                lines.append(f"{_key(f.name)} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"


def label_bounds(data: DataConfig) -> tuple[float, float] | None:
    """`data.label-bounds` as (low, high), or None when unset. Raises ConfigError for a
    value that is not [low, high] with finite numbers low < high."""
    pair = shaped(data.label_bounds, None)
    if pair is None:
        return None
    if (not isinstance(pair, list) or len(pair) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
            or not all(map(math.isfinite, pair)) or not pair[0] < pair[1]):
        raise ConfigError(f"data.label-bounds = {pair!r}: expected [low, high] with finite "
                          "numbers low < high")
    return float(pair[0]), float(pair[1])


def is_import_path(name: str) -> bool:
    """`package.module:attr` (Flower's `module:attr` convention), not a registered name."""
    module, _, attr = name.partition(":")
    return bool(module and attr) and all(
        part.isidentifier() for part in module.split(".") + attr.split("."))


def _key(name: str) -> str:
    return name.replace("_", "-")


def _field_toml(f: dataclasses.Field, value: Any) -> str:
    """A field as TOML: tables and arrays (kept as JSON text, or "0:1.0" pairs) written as
    TOML tables and arrays again, empty ones included, so the file reads like the one the
    user wrote."""
    if f.name == "client_epsilon":
        return _inline({str(c): e for c, e in parse_client_epsilon(value)})
    if f.metadata.get("shape"):
        return _inline(shaped(value, f.metadata["shape"]()))
    return _toml_value(value)


def _inline(value: Any) -> str:
    """A TOML inline value for JSON-shaped data (tables, arrays, strings, numbers)."""
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_inline(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return _toml_value(value)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


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
        shown = "< 2**63" if high == 2 ** 63 - 1 else f"≤ {high}"
        raise ConfigError(f"{key} = {value!r}: expected a value {shown}")
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


def _shaped_text(value: Any, shape: type, key: str) -> str:
    """A TOML table/array (or its JSON text, as run_config carries it) -> canonical JSON."""
    kind = "table" if shape is dict else "array"
    if isinstance(value, str):
        if not value.strip():
            return ""
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{key} = {value!r}: expected a TOML {kind}") from None
    if isinstance(value, Mapping):
        value = dict(value)
    if not isinstance(value, shape):
        raise ConfigError(f"{key} = {value!r}: expected a TOML {kind}")
    return json.dumps(value, sort_keys=True) if value else ""


def shaped(text: str, empty: Any = None) -> Any:
    """The table/array a shaped field holds ({} / [] style `empty` when unset)."""
    return json.loads(text) if text else empty


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
        elif f.metadata.get("shape"):
            kwargs[f.name] = _shaped_text(value, f.metadata["shape"], full)
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
    """Read an experiment TOML file and apply `key=value` overrides. Raises ConfigError, one
    line naming the file (or the `--set` override) and what was expected."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file (--config)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found" + (
            "; privet runs from its project folder (a Flower App with experiments/configs/): "
            "clone it and `pip install -e .`" if not (PROJECT_DIR / "pyproject.toml").is_file()
            else "")) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})"
                          ) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark from a Windows editor is fine
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                          "save the config as UTF-8") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    assignments = list(overrides or [])
    parsed = dict(parse_override(o) for o in assignments)
    try:
        from_mapping(values)
    except ConfigError as err:
        if not any(key_named(key, str(err)) for key in parsed):
            raise ConfigError(f"{path}: {err}") from None
    try:
        return from_mapping(values, parsed)
    except ConfigError as err:
        named = [a for a, key in zip(assignments, parsed) if key_named(key, str(err))]
        where = ", ".join(f"--set {a}" for a in named) if named else str(path)
        raise ConfigError(f"{where}: {err}") from None


def key_named(key: str, message: str) -> bool:
    """Whether a ConfigError message is about `key` (it starts with, or quotes, the key)."""
    return message.startswith(f"{key} ") or message.startswith(f"{key}:") or \
        f" {key} " in message or f" {key}:" in message


# run_config keys that say how to run, not what: `privet simulate --resume`, `--pause-after`
# (server.app.resume_options); never part of the experiment's config
EXECUTION_KEYS = ("resume", "pause-after")


def from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild the config from Flower's flat run_config (server and client side)."""
    return from_mapping(_unflatten({k: v for k, v in run_config.items()
                                    if k not in EXECUTION_KEYS}))

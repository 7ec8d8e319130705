"""Where tensors live: `train.device` ("auto", "cpu", "cuda", "cuda:N") resolved on this machine.

Client training (both DP-SGD paths and plain SGD, clients.train) and evaluation (server and
clients, common.evaluation) run on the resolved device; weights cross the wire on the CPU
as before. Nothing here touches CUDA at import: the process pool's fork server imports the
ClientApp, and a process that has initialised CUDA cannot hand a working CUDA to the
children it forks; `torch.cuda` is first asked in a worker (or in the `privet` process,
which forks nothing that uses torch), when a device is resolved.

In a simulation the clients share GPUs by fractions, as Flower's
`client-resources.num-gpus` says for Ray (`train.num-gpus`, `client_gpus`): each client that
trains takes that share, so 1/share clients train on one GPU at once.
"""

from __future__ import annotations

import math

import torch

from privet.common.config import DEVICE_EXPECTED, DEVICE_PATTERN, ConfigError

CPU_CODE = -1  # the reply metric's code for the CPU; N ≥ 0 is cuda:N (`device_code`)
RAY_PRECISION = 10_000  # Ray keeps fractional resources to 1/10⁴


class DeviceError(ConfigError):
    """`train.device` asks for a device this machine (or Ray cluster) does not have."""


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU here"


def resolve_device(requested: str, key: str = "train.device") -> torch.device:
    """The torch device for `train.device` = `requested` on this machine: "auto" is cuda
    (torch's current CUDA device) where `torch.cuda.is_available()`, else cpu; "cpu";
    "cuda" (the current CUDA device); "cuda:N". Raises DeviceError (one line naming `key`)
    for cuda where CUDA is unavailable or N is not a GPU here, ConfigError for anything
    else. Initialises CUDA in this process only for "auto" and cuda requests."""
    if not isinstance(requested, str) or not DEVICE_PATTERN.fullmatch(requested):
        raise ConfigError(f"{key} = {requested!r}: expected {DEVICE_EXPECTED}")
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    if not available:
        raise DeviceError(f"{key} = \"{requested}\": CUDA is not available ({_why_no_cuda()}); "
                          "expected \"auto\" or \"cpu\" on this machine")
    index = int(requested.partition(":")[2] or torch.cuda.current_device())
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"{key} = \"{requested}\": this machine has {count} GPU(s), "
                          f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def device_code(device: torch.device) -> int:
    """A device as a number for Flower's MetricRecord (which carries numbers only):
    `CPU_CODE` for the CPU, N for cuda:N (the current CUDA device where no index is
    given; a Ray actor sees the GPU Ray gave it as cuda:0). Raises ValueError for another
    kind of device."""
    if device.type == "cpu":
        return CPU_CODE
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    raise ValueError(f"device {device}: privet trains on cpu or cuda only")


def device_name(code: int) -> str:
    """`device_code`'s inverse as text: "cpu" or "cuda:N"."""
    code = int(code)
    return "cpu" if code == CPU_CODE else f"cuda:{code}"


def client_gpus(num_gpus: float, gpus: float, workers: int) -> float:
    """GPUs each training client takes (Flower's `client-resources.num-gpus`): 0 when the
    clients train on the CPU (`gpus`, the GPUs they may use, is 0); `num_gpus`
    (`train.num-gpus`) when set; else (0 = auto) 1/k with k = ⌈workers/gpus⌉, the clients
    each GPU must hold for the `workers` that train at once to fit, at most one GPU each.

    Not gpus/workers: Ray places a share below 1 on one GPU, so 2 GPUs and 3 workers at 2/3
    each would fit 2 actors, not 3 (Flower would start 3, and one would wait for ever). The
    share is rounded down to Ray's precision (10⁻⁴), so that k of them fit on one GPU and
    Flower, which counts ⌊GPUs/share⌋ actors, counts enough. Raises ValueError for
    workers < 1."""
    if workers < 1:
        raise ValueError(f"workers = {workers}: expected at least 1")
    if gpus <= 0:
        return 0.0
    if num_gpus > 0:
        return float(num_gpus)
    per_gpu = math.ceil(workers / gpus)
    return math.floor(RAY_PRECISION / per_gpu) / RAY_PRECISION


def clients_per_gpu(share: float) -> int:
    """How many clients taking `share` of a GPU fit on one at once (⌊1/share⌋, at least 1;
    a share of 0, CPU training, sets no limit: a very large number)."""
    if share <= 0:
        return 1 << 30
    return max(1, math.floor(1.0 / share + 1e-9))


def check_simulation_device(requested: str, *, on_ray: bool, cluster: bool = False,
                            key: str = "train.device") -> None:
    """Before a simulation starts (privet simulate's checks): raises DeviceError, one line,
    for "cuda"/"cuda:N" where this machine has no such GPU, and for "cuda:N" on Ray
    (`on_ray`), which gives each client actor its GPU itself (CUDA_VISIBLE_DEVICES: the
    actor sees it as cuda:0), so a number cannot name one. On a Ray `cluster` this
    machine's GPUs are not the clients': the cluster's are counted once joined
    (`cluster_gpus`)."""
    if on_ray and requested.startswith("cuda:"):
        raise DeviceError(f"{key} = \"{requested}\": on Ray each client is given its share of "
                          "a GPU by Ray, which picks the GPU; expected \"cuda\" or \"auto\"")
    if not cluster:
        resolve_device(requested, key)


def local_gpus(requested: str, on_ray: bool) -> int:
    """GPUs the clients of a simulation on this machine train on: 0 when `requested`
    (`train.device`) resolves to the CPU; with the process pool 1 (its workers share the
    one GPU the device names); on a Ray of the run's own every GPU torch sees (Ray hands
    them out by share). Raises DeviceError as `resolve_device`."""
    if resolve_device(requested).type == "cpu":
        return 0
    return torch.cuda.device_count() if on_ray else 1


def cluster_gpus(requested: str, resources: dict, key: str = "train.device") -> float:
    """GPUs the clients train on in a Ray cluster whose `resources` are
    `ray.cluster_resources()` ({"CPU": …, "GPU": …}): 0 for "cpu", and for "auto" on a
    cluster without GPUs. Raises DeviceError for "cuda" on a cluster without any."""
    if requested == "cpu":
        return 0.0
    gpus = float(resources.get("GPU", 0.0))
    if gpus <= 0 and requested != "auto":
        raise DeviceError(f"{key} = \"{requested}\": the Ray cluster has no GPU (its nodes "
                          "report none to Ray); expected \"auto\" or \"cpu\" there")
    return gpus

"""`train.device`: checked in one line, resolved on this machine, the same results on the CPU
as before it existed, and the GPU shared by fractions in the process pool and on Ray. All
on the CPU: a GPU run is experiments/gpu_check.py's."""

import hashlib
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_inputs import one_error_line
from test_inputs import simulate as simulate_any
from test_spend_report import simulate
from torch import nn

from privet.common import device as D
from privet.common.config import CONFIGS_DIR, ConfigError, load_config
from privet.common.evaluation import evaluate, logits, score
from privet.experiments.simulation import backend_config

TINY = CONFIGS_DIR / "tiny.toml"
NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("setting, expected", [
    ('train.device="gpu"', "train.device = 'gpu': expected \"auto\""),
    ('train.device="cuda:x"', "train.device = 'cuda:x': expected"),
    ('train.device="CPU"', "train.device = 'CPU': expected"),
    ("train.device=0", "train.device = 0: expected str"),
    ("train.num-gpus=1.5", "train.num-gpus = 1.5: expected a value ≤ 1.0"),
    ("train.num-gpus=-0.5", "train.num-gpus = -0.5: expected a value ≥ 0.0"),
])
def test_a_device_that_is_not_one_is_one_line_naming_the_key(setting, expected):
    with pytest.raises(ConfigError) as raised:
        load_config(TINY, [setting])
    message = str(raised.value)
    assert message.startswith(f"--set {setting}: {expected}") and "\n" not in message


def test_a_gpu_share_for_clients_on_the_cpu_is_refused():
    with pytest.raises(ConfigError, match=r"train.num-gpus = 0.5 with train.device = \"cpu\""):
        load_config(TINY, ["train.num-gpus=0.5", 'train.device="cpu"'])
    for device in ("auto", "cuda", "cuda:1"):  # resolved on the machine that trains
        assert load_config(TINY, ["train.num-gpus=0.5", f'train.device="{device}"'])


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_auto_is_the_cpu_here_and_cuda_is_one_line_saying_why_not():
    assert D.resolve_device("auto") == D.resolve_device("cpu") == torch.device("cpu")
    for requested in ("cuda", "cuda:0"):
        with pytest.raises(D.DeviceError) as raised:
            D.resolve_device(requested)
        message = str(raised.value)
        assert message.startswith(f'train.device = "{requested}": CUDA is not available (')
        assert message.endswith('expected "auto" or "cpu" on this machine')
        assert "\n" not in message


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it answers on a machine with two GPUs (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_devices_resolve_as_on_a_machine_with_two_gpus(two_gpus):
    assert D.resolve_device("auto") == torch.device("cuda")
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(D.DeviceError, match=r'"cuda:2": this machine has 2 GPU\(s\), cuda:0 to '
                                            r"cuda:1$"):
        D.resolve_device("cuda:2")
    assert [D.device_code(torch.device(d)) for d in ("cpu", "cuda", "cuda:1")] == [-1, 0, 1]
    assert [D.device_name(c) for c in (-1, 0, 1)] == ["cpu", "cuda:0", "cuda:1"]


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_where_there_is_none_stops_the_simulation_before_it_starts(tmp_path):
    code, stdout = simulate_any(tmp_path / "run", "train.device=cuda")
    line = one_error_line(stdout)
    assert code == 2 and "--set train.device=cuda: train.device = \"cuda\": CUDA is not " \
                         "available" in line
    assert not (tmp_path / "run").exists()  # nothing ran, nothing left behind


def test_a_gpu_number_on_ray_is_refused_ray_picks_the_gpu():
    with pytest.raises(D.DeviceError, match=r'train.device = "cuda:1": on Ray each client'):
        D.check_simulation_device("cuda:1", on_ray=True, cluster=True)
    D.check_simulation_device("cpu", on_ray=True)
    D.check_simulation_device("auto", on_ray=False)


# The tiny run (seed 7) as the code before train.device computed it (commit 7972202) on
# x86-64, torch 2.13.0+cpu, AVX512 kernels: sha256 of model.pt's state dict (sorted names,
# raw bytes), the final accuracy and each client's ε. Another CPU's kernels may round the
# same arithmetic differently: the digest is compared only where it was pinned.
BEFORE_DEVICE = {
    "one-pass": ("c6c99d075caf886f7717bdc31792bfc7edc8334edca75d3b72ca0db3d29a44be", 0.841656,
                 {"0": 1.997095115939198, "1": 1.9999806816007557, "2": 1.9992908183719476}),
    "hooks": ("d6429e106cf9c6fe36fbb08a7d20296b15a3305ed210929a93c0f81affdc0797", 0.841656,
              {"0": 1.997095115939198, "1": 1.9999806816007557, "2": 1.9992908183719476}),
    "none": ("2cd916f93fb2f4a00f153266c19490c4e1f113693d0cd2d2628edef6a3ef34f1", 0.852036,
             {"0": None, "1": None, "2": None}),
}
PINNED_ON = ("2.13.0+cpu", "x86_64", "AVX512")
SETTINGS = {"one-pass": (), "hooks": ('train.dp-path="hooks"',), "none": ("privacy.level=none",)}


def _digest(run_dir) -> str:
    state = torch.load(run_dir / "model.pt")["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    return digest.hexdigest()


def _same_as_before(run_dir, summary, path):
    digest, accuracy, epsilons = BEFORE_DEVICE[path]
    found = {c: e["epsilon"] for c, e in summary["privacy"]["clients"].items()}
    assert found.keys() == epsilons.keys()
    for client, epsilon in epsilons.items():  # None: no DP
        assert found[client] == (epsilon if epsilon is None else pytest.approx(epsilon,
                                                                                  rel=1e-9))
    here = (torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability())
    if here == PINNED_ON:
        assert (_digest(run_dir), summary["accuracy"]) == (digest, accuracy)
    else:
        assert summary["accuracy"] == pytest.approx(accuracy, abs=0.005)


def _run(tmp_path, device, path="one-pass"):
    out = tmp_path / f"{path}-{device}"
    summary, _ = simulate(out, f'train.device="{device}"', *SETTINGS[path])
    return out, summary


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
@pytest.mark.skipif(not NO_CUDA, reason="auto is cuda on this machine")
def test_on_the_cpu_auto_and_cpu_give_the_very_model_and_epsilon_of_before(tmp_path):
    """Seeded, one-pass DP-SGD: "cpu" and "auto" (the CPU here) give bit-identical models and
    the same ε, and those of the code before train.device; summary.json says where the
    clients trained and the server evaluated, and that is not counted as released."""
    runs = {device: _run(tmp_path, device) for device in ("cpu", "auto")}
    (cpu_dir, cpu), (auto_dir, auto) = runs["cpu"], runs["auto"]
    assert _digest(cpu_dir) == _digest(auto_dir) and cpu["accuracy"] == auto["accuracy"]
    assert [e["epsilon"] for e in cpu["privacy"]["clients"].values()] == \
        [e["epsilon"] for e in auto["privacy"]["clients"].values()]
    _same_as_before(cpu_dir, cpu, "one-pass")
    for device, summary in (("cpu", cpu), ("auto", auto)):
        assert summary["device"] == {"requested": device, "server": "cpu", "clients": ["cpu"]}
        assert {e["device"] for e in summary["privacy"]["clients"].values()} == {"cpu"}
        assert "device" not in str(summary["privacy"]["released_in_clear"])


@pytest.mark.slow
@pytest.mark.parametrize("path", ["hooks", "none"])
def test_opacus_and_plain_sgd_on_the_cpu_give_the_model_of_before(tmp_path, path):
    """Opacus' hooks path and non-private SGD, with train.device = "cpu": the model and ε
    the code before train.device gave."""
    out, summary = _run(tmp_path, "cpu", path)
    _same_as_before(out, summary, path)


class _Probe(nn.Module):
    """Remembers the device of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen: list[torch.device] = []

    def forward(self, x):
        self.seen.append(x.device)
        return self.linear(x)


def test_evaluation_runs_on_the_device_asked_and_gives_the_same_scores():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = rng.integers(0, 2, 50)
    model = _Probe()
    assert evaluate(model, x, y, batch_size=16) == evaluate(model, x, y, batch_size=16,
                                                             device="cpu")
    assert score(model, x, y, 2, device=torch.device("cpu")) == score(model, x, y, 2)
    model.seen.clear()
    out = logits(model, x, batch_size=16, device="cpu")
    assert model.seen == [torch.device("cpu")] * 4 and out.device == torch.device("cpu")
    assert next(model.parameters()).device == torch.device("cpu")


def test_the_server_evaluates_on_train_device_and_a_deployed_server_without_it_on_the_cpu(
        monkeypatch):
    from privet.server.app import evaluation_device

    assert evaluation_device(load_config(TINY, ['train.device="cpu"']), False).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = load_config(TINY, ['train.device="cuda"'])
    assert evaluation_device(load_config(TINY), False).type == "cpu"  # auto
    with pytest.raises(D.DeviceError):
        evaluation_device(cuda, deployed_run=False)
    assert evaluation_device(cuda, deployed_run=True).type == "cpu"  # the clients' GPU


def test_training_leaves_the_model_where_it_was_and_cpu_changes_nothing():
    from privet.clients.train import train_local

    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = rng.integers(0, 2, 64)
    trained = []
    for device in (None, "cpu", torch.device("cpu")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        extra = {} if device is None else {"device": device}
        train_local(model, x, y, epochs=1, batch_size=16, lr=0.1, momentum=0.0, seed=3,
                    noise_multiplier=1.0, **extra)
        assert next(model.parameters()).device == torch.device("cpu")
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert all(torch.equal(trained[0], t) for t in trained[1:])


def test_ray_actors_take_the_gpu_share_flower_calls_client_resources_num_gpus():
    assert backend_config(4)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert backend_config(4, num_gpus=0.25)["client_resources"] == {"num_cpus": 1,
                                                                     "num_gpus": 0.25}
    assert backend_config(4, "10.0.0.5:6379", num_gpus=0.5)["client_resources"]["num_gpus"] \
        == 0.5
    # the share: none on the CPU, train.num-gpus when set, else the GPUs split evenly
    assert D.client_gpus(0.0, gpus=0, workers=4) == 0.0
    assert D.client_gpus(0.5, gpus=0, workers=4) == 0.0
    assert D.client_gpus(0.0, gpus=1, workers=4) == 0.25
    assert D.client_gpus(0.5, gpus=1, workers=4) == 0.5
    assert D.client_gpus(0.0, gpus=4, workers=2) == 1.0  # at most one GPU each
    # whole clients per GPU (Ray puts a share below 1 on one GPU), to Ray's precision
    assert D.client_gpus(0.0, gpus=2, workers=3) == 0.5
    assert D.client_gpus(0.0, gpus=1, workers=3) == 0.3333
    for gpus, workers in ((1, 3), (2, 3), (3, 16), (8, 100), (1, 7)):
        share = D.client_gpus(0.0, gpus, workers)
        assert D.clients_per_gpu(share) * gpus >= workers  # Ray can place every worker
        assert int(gpus / share) >= workers  # Flower counts them all (ray_actor.py)
    assert [D.clients_per_gpu(s) for s in (1.0, 0.5, 1 / 3, 0.3, 0.25)] == [1, 2, 3, 3, 4]
    assert D.clients_per_gpu(0.0) > 10 ** 6  # on the CPU: no limit
    # a Ray cluster's GPUs, from ray.cluster_resources()
    assert D.cluster_gpus("cpu", {"CPU": 8.0, "GPU": 2.0}) == 0.0
    assert D.cluster_gpus("auto", {"CPU": 8.0}) == 0.0
    assert D.cluster_gpus("cuda", {"CPU": 8.0, "GPU": 2.0}) == 2.0
    with pytest.raises(D.DeviceError, match="the Ray cluster has no GPU"):
        D.cluster_gpus("cuda", {"CPU": 8.0})


@pytest.mark.parametrize("backend, settings, share, workers", [
    ("processes", (), 0.3333, 3),                   # three workers share the one GPU
    ("processes", ("train.num-gpus=0.5",), 0.5, 2),  # two fit on it at once
    ("ray", (), 0.5, None),                           # Ray: three actors over two GPUs
    ("ray", ("train.num-gpus=0.25",), 0.25, None),
    ("processes", ('train.device="cpu"',), 0.0, 3),
])
def test_a_simulation_hands_flower_the_gpu_share(two_gpus, monkeypatch, tmp_path, backend,
                                                 settings, share, workers):
    """simulation.run on a (pretended) two-GPU machine with 4 cores and 3 clients a round:
    the backend config Flower's runtime gets (nothing runs: Flower's entry point is
    replaced)."""
    import importlib

    from privet.experiments import process_backend, simulation

    run_simulation = importlib.import_module("flwr.simulation.run_simulation")

    captured = {}
    monkeypatch.setattr(run_simulation, "_run_simulation",
                        lambda **kwargs: captured.update(kwargs["backend_config"]))
    monkeypatch.setattr(simulation, "_start_local_ray", lambda init_args: None)
    monkeypatch.setattr(simulation, "simulation_cpus", lambda: 4)
    for name in ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "RAY_DEDUP_LOGS", "PRIVET_TORCH_THREADS",
                 "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):  # run() sets them: put back after
        monkeypatch.setenv(name, os.environ.get(name, "1" if name == "PRIVET_TORCH_THREADS"
                                                else "0"))
    monkeypatch.setenv(simulation.BACKEND_ENV, backend)
    monkeypatch.setenv("PRIVET_PROMPT_POLLING", "0")  # privet.patches.flower: keep Flower's
    simulation.run(load_config(TINY, list(settings)), tmp_path)
    assert captured["client_resources"]["num_gpus"] == pytest.approx(share)
    pool = captured.get(process_backend.CONFIG_KEY)
    assert (pool["workers"] if pool else None) == workers


def test_the_fork_server_imports_the_client_app_without_touching_cuda():
    """The pool's workers are forked from a fork server that imported the ClientApp: had that
    import initialised CUDA, no worker could use the GPU (CUDA does not survive a fork).
    The fork server itself is a fresh interpreter (exec'd, multiprocessing.forkserver), so
    only what it imports matters."""
    code = ("import torch\n"
            "def touched(*args, **kwargs):\n"
            "    raise SystemExit('CUDA touched at import')\n"
            "for name in ('is_available', 'device_count', 'init', '_lazy_init', "
            "'current_device', 'set_device'):\n"
            "    setattr(torch.cuda, name, touched)\n"
            "import privet.clients.app, privet.experiments.pool_worker\n"
            "print('clean')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stdout + done.stderr


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_the_gpu_check_without_a_gpu_says_so_in_one_line_and_fails():
    from conftest import PROJECT_DIR

    done = subprocess.run([sys.executable, "-m", "experiments.gpu_check"], cwd=PROJECT_DIR,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("experiments.gpu_check: no CUDA GPU here (")
    assert done.stderr.count("\n") == 1


def test_the_gpu_check_compares_its_devices_side_by_side(monkeypatch, capsys):
    """The check's step benchmark, with "auto" (the CPU here) standing in for "cuda": no GPU
    needed to keep it working."""
    from experiments import gpu_check

    monkeypatch.setattr(gpu_check, "DEVICES", ("cpu", "auto"))
    gpu_check.step_benchmark(["digits"], ["one-pass"], repeats=1, epochs=1)
    lines = capsys.readouterr().out.splitlines()
    assert "cpu ms  auto ms  cpu/auto" in lines[2]
    timed = [line.split() for line in lines[3:]]
    assert [(t[1], t[2]) for t in timed] == [("mlp", "plain"), ("mlp", "one-pass"),
                                             ("cnn", "plain"), ("cnn", "one-pass")]
    assert all(float(t[3]) > 0 and float(t[4]) > 0 for t in timed)


@pytest.mark.slow
def test_the_gpu_check_runs_the_default_experiment_on_both(monkeypatch, capsys):
    from experiments import gpu_check

    monkeypatch.setattr(gpu_check, "DEVICES", ("cpu", "auto"))
    gpu_check.simulation_check(["rounds=1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("privet simulate experiments/configs/adult.toml --set rounds=1")
    cpu, auto = (line.split() for line in out[2:4])
    assert cpu[0] == "cpu" and auto[0] == "auto" and cpu[2:4] == auto[2:4]  # accuracy, ε
    assert out[4].startswith("cpu/auto wall time: "), out

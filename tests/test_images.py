"""Image datasets (IDX reader, digits split) and the CNN under Opacus DP-SGD."""

import gzip
import sys

import numpy as np
import pytest
import torch
from torch import nn

from privet.clients.train import BOOKKEEPING, train_local
from privet.common.config import TrainConfig
from privet.common.data import images
from privet.common.models import build_model

ROWS, HEIGHT, WIDTH = 5, 3, 4  # not square, so a swapped height and width would show


def _write_idx(path, magic, array, gz):
    header = magic.to_bytes(4, "big") + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _write_split(folder, split="train", gz=False, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(rows, HEIGHT, WIDTH))
    pixels[0, 0, 0] = 255  # the top of the scale is there to check
    labels = rng.integers(0, 10, size=rows)
    prefix = "train" if split == "train" else "t10k"
    image_file = _write_idx(folder / f"{prefix}-images-idx3-ubyte", 0x803, pixels, gz)
    label_file = _write_idx(folder / f"{prefix}-labels-idx1-ubyte", 0x801, labels, gz)
    return pixels, labels, image_file, label_file


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No copy found by default: no env var, an empty home, no Debian folder."""
    monkeypatch.delenv(images.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(images, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    return tmp_path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_idx_files(nowhere, gz, split):
    pixels, labels, _, _ = _write_split(nowhere / "fm", split, gz)
    data = images.load_fashion_mnist(split, path=str(nowhere / "fm"))
    assert data.images.shape == (ROWS, 1, HEIGHT, WIDTH) and data.images.dtype == np.float32
    assert data.images.max() == 1.0
    np.testing.assert_allclose(data.images[:, 0], pixels / 255.0, rtol=1e-6)
    assert data.labels.dtype == np.int64 and list(data.labels) == list(labels)
    assert data.classes == images.FASHION_MNIST_CLASSES and len(data.classes) == 10
    assert images.load_fashion_mnist(split, path=str(nowhere / "fm")) is data  # cached
    assert not data.images.flags.writeable  # shared through the cache


def test_env_var_and_torchvision_layout_and_cache_dir(nowhere, monkeypatch):
    _write_split(nowhere / "tv" / "FashionMNIST" / "raw")
    monkeypatch.setenv(images.FASHION_MNIST_ENV, str(nowhere / "tv"))
    assert images.fashion_mnist_dir() == nowhere / "tv" / "FashionMNIST" / "raw"
    monkeypatch.delenv(images.FASHION_MNIST_ENV)
    _write_split(nowhere / "home" / ".cache" / "privet" / "fashion-mnist", gz=True)
    assert len(images.load_fashion_mnist("train")) == ROWS


def test_truncated_file_names_the_file(nowhere):
    _, _, image_file, _ = _write_split(nowhere / "fm")
    image_file.write_bytes(image_file.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: .*truncated"):
        images.load_fashion_mnist("train", path=str(nowhere / "fm"))


def test_corrupt_gzip_names_the_file(nowhere):
    _, _, _, label_file = _write_split(nowhere / "fm", gz=True)
    label_file.write_bytes(label_file.read_bytes()[:-5])  # cut off the gzip trailer
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: cannot read"):
        images.load_fashion_mnist("train", path=str(nowhere / "fm"))


def test_wrong_magic_names_the_file(nowhere):
    _, _, _, label_file = _write_split(nowhere / "fm")
    _write_idx(label_file, 0x803, np.zeros((ROWS, 1, 1)), gz=False)  # images in its place
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: magic number"):
        images.load_fashion_mnist("train", path=str(nowhere / "fm"))


def test_missing_data_says_where_it_looked(nowhere):
    with pytest.raises(FileNotFoundError) as err:
        images.load_fashion_mnist("train")
    message = str(err.value)
    assert "\n" not in message
    for place in (nowhere / "no-debian", nowhere / "home" / ".cache" / "privet"):
        assert str(place) in message
    assert "apt install dataset-fashion-mnist" in message and "data.download" in message


def test_explicit_path_is_not_silently_replaced(nowhere):
    _write_split(nowhere / "home" / ".cache" / "privet" / "fashion-mnist")
    with pytest.raises(FileNotFoundError, match=str(nowhere / "typo")):
        images.load_fashion_mnist("train", path=str(nowhere / "typo"))


def test_download_without_torchvision_says_to_install_it(nowhere, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="pip install torchvision"):
        images.load_fashion_mnist("train", download=True)


def test_digits_split_is_seeded_stratified_and_a_partition():
    train = images.load_digits("train", seed=3, test_fraction=0.25)
    test = images.load_digits("test", seed=3, test_fraction=0.25)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() == 1.0
    assert train.classes == tuple("0123456789")
    assert len(train) + len(test) == 1797 and len(test) == pytest.approx(0.25 * 1797, abs=1)

    def rows(*splits):  # (image, label) rows as a sorted multiset
        x = np.concatenate([s.images.reshape(len(s), -1) for s in splits])
        y = np.concatenate([s.labels for s in splits])
        return np.sort(np.column_stack([x, y]).view([("", x.dtype)] * (x.shape[1] + 1)),
                       axis=0)

    from sklearn.datasets import load_digits
    everything = load_digits()
    full = images.ImageSplit((everything.images / 16.0).astype(np.float32)[:, None],
                             everything.target, ())
    assert np.array_equal(rows(train, test), rows(full))  # nothing lost, nothing repeated
    share = np.bincount(test.labels, minlength=10) / np.bincount(full.labels, minlength=10)
    assert np.all(np.abs(share - 0.25) < 0.02)  # every class split in the same proportion

    again = images.load_digits("test", seed=3, test_fraction=0.25)
    assert np.array_equal(again.images, test.images)
    other = images.load_digits("test", seed=4, test_fraction=0.25)
    assert not np.array_equal(other.labels, test.labels)
    with pytest.raises(ValueError, match="split"):
        images.load_digits("validation", seed=0, test_fraction=0.25)


def _cnn(shape, hidden=8):
    torch.manual_seed(0)
    return build_model(TrainConfig(model="cnn", hidden=hidden), shape, 10)


def test_cnn_shapes():
    for size in (8, 28):
        assert _cnn((1, size, size))(torch.zeros(3, 1, size, size)).shape == (3, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in _cnn((1, 8, 8)).modules())
    with pytest.raises(ValueError, match="image input"):
        _cnn((64,))


@pytest.mark.parametrize("size", [8, 28])
def test_cnn_dp_sgd_step(size):
    rng = np.random.default_rng(size)
    x = rng.random((48, 1, size, size), dtype=np.float32)
    y = rng.integers(0, 10, 48).astype(np.int64)
    model = _cnn((1, size, size))
    before = [p.detach().clone() for p in model.parameters()]
    result = train_local(model, x, y, epochs=1, batch_size=16, lr=0.1, momentum=0.0, seed=0,
                         noise_multiplier=1.0, grad_sample_mode=BOOKKEEPING)
    assert result.steps == 3 and np.isfinite(result.loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert type(model) is nn.Sequential and not model._forward_hooks  # no hooks left behind
    assert model(torch.from_numpy(x)).shape == (48, 10)


@pytest.mark.parametrize("mode", [BOOKKEEPING, "hooks"])
def test_cnn_update_is_the_mean_of_clipped_per_sample_gradients(mode):
    """The CNN's per-sample gradients are clipped correctly, by privet's path and Opacus'."""
    rows, clip, lr = 24, 0.05, 1.0
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((rows, 1, 8, 8), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, rows).astype(np.int64))
    model = _cnn((1, 8, 8))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    assert (norms > clip).all()
    scale = clip / (norms + 1e-6)
    expected = {k: (g * scale.view(-1, *[1] * (g.dim() - 1))).mean(0) for k, g in grads.items()}
    # batch = all rows: q = 1, one step, and Poisson sampling takes every row
    train_local(model, x.numpy(), y.numpy(), epochs=1, batch_size=rows, lr=lr, momentum=0.0,
                seed=1, noise_multiplier=1e-9, max_grad_norm=clip, grad_sample_mode=mode)
    for key, value in model.named_parameters():
        step = (params[key] - value.detach()) / lr
        assert torch.allclose(step, expected[key], atol=1e-6), key


@pytest.mark.parametrize("size", [8, 28])
def test_cnn_bookkeeping_takes_the_steps_opacus_takes(size):
    """Same seed: the same Poisson batches (some empty), clipping and noise as Opacus' DP-SGD,
    so the same CNN after two epochs."""
    rng = np.random.default_rng(size)
    x = rng.random((40, 1, size, size), dtype=np.float32)
    y = rng.integers(0, 10, 40).astype(np.int64)
    trained = []
    for mode in ("bookkeeping", "hooks"):
        model = _cnn((1, size, size))
        result = train_local(model, x, y, epochs=2, batch_size=4, lr=0.1, momentum=0.5,
                             seed=3, noise_multiplier=0.7, max_grad_norm=0.5,
                             grad_sample_mode=mode)
        trained.append((result, [p.detach() for p in model.parameters()]))
    (ours, ours_params), (opacus, opacus_params) = trained
    assert ours.steps == opacus.steps == 20 and ours.accuracy == opacus.accuracy
    for a, b in zip(ours_params, opacus_params):
        assert torch.allclose(a, b, atol=1e-5)


def test_digits_kept_in_the_cache_directory_are_scikit_learns_split(tmp_path, monkeypatch):
    """The digits split read back from the cache (sparing scikit-learn's import) is the split
    scikit-learn makes: the same pixels, labels and order."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    from privet.common.data import images

    monkeypatch.setenv("PRIVET_CACHE_DIR", str(tmp_path))
    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        x, bunch.target.astype(np.int64), test_size=0.3, random_state=5, stratify=bunch.target)
    for _ in range(2):  # computed and written, then read from the file
        images._digits.cache_clear()
        train = images.load_digits("train", seed=5, test_fraction=0.3)
        test = images.load_digits("test", seed=5, test_fraction=0.3)
        assert np.array_equal(train.images, train_x) and np.array_equal(train.labels, train_y)
        assert np.array_equal(test.images, test_x) and np.array_equal(test.labels, test_y)
        assert len(list((tmp_path / "digits").glob("*.npz"))) == 1
    images._digits.cache_clear()

"""Image datasets as numpy arrays: scikit-learn's 8x8 digits, Fashion-MNIST (28x28), and a
folder of the user's own images (one subfolder per class, torchvision's ImageFolder layout).

All come back as float32 (N, channels, H, W) in [0, 1] with int64 labels. Fashion-MNIST is
read from its IDX files wherever a copy is found (see `load_fashion_mnist`), an image folder
with Pillow; nothing here needs torchvision unless a download is asked for. Parsed arrays
are cached per process and returned read-only, since every round of every client reads
them.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privet.common.cache import cache_dir, save_arrays
from privet.common.imports import one_line

DIGITS_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")

FASHION_MNIST_ENV = "PRIVET_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # dataset-fashion-mnist
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801  # unsigned bytes, 3 dims / 1 dim


@dataclass(frozen=True)
class ImageSplit:
    """Examples as arrays, used as they are (no tabular preprocessing): images, or the
    features a user's loader returned (common.data.loader)."""
    images: np.ndarray   # float32, (N, *example shape): images (N, C, H, W) in [0, 1]
    labels: np.ndarray   # int64 class indices into `classes`
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _check_split(split: str) -> None:
    if split not in _FILES:
        raise ValueError(f"split = {split!r}: expected 'train' or 'test'")


def _frozen(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> ImageSplit:
    # Shared by every caller through the cache: writing into it would leak between clients.
    images.setflags(write=False)
    labels.setflags(write=False)
    return ImageSplit(images, labels, classes)


# --- digits -------------------------------------------------------------------------------

def _digits_split_path(seed: int, test_fraction: float) -> Path:
    import importlib.metadata

    version = importlib.metadata.version("scikit-learn")
    return cache_dir() / "digits" / f"sklearn-{version}-seed{seed}-test{test_fraction!r}.npz"


@functools.lru_cache(maxsize=8)
def _digits(seed: int, test_fraction: float) -> dict[str, ImageSplit]:
    """The split, kept in the cache directory per (scikit-learn version, seed, fraction):
    importing scikit-learn to read its digits costs ~1 s per process (the driver's and every
    worker's), more than a whole small run's training. A cache that cannot be read or
    written only costs that time again."""
    path = _digits_split_path(seed, test_fraction)
    try:
        with np.load(path) as kept:
            arrays = {k: kept[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, KeyError, ValueError):
        from sklearn.datasets import load_digits as sklearn_digits  # ships with sklearn
        from sklearn.model_selection import train_test_split

        bunch = sklearn_digits()
        images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixels are 0..16
        labels = bunch.target.astype(np.int64)
        train_x, test_x, train_y, test_y = train_test_split(
            images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
        arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        save_arrays(path, arrays)
    return {"train": _frozen(arrays["train_x"], arrays["train_y"], DIGITS_CLASSES),
            "test": _frozen(arrays["test_x"], arrays["test_y"], DIGITS_CLASSES)}


def load_digits(split: str, *, seed: int, test_fraction: float) -> ImageSplit:
    """scikit-learn's 1,797 8x8 digits, split train/test stratified by class; same seed,
    same split."""
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction = {test_fraction}: expected a value in (0, 1)")
    return _digits(seed, float(test_fraction))[split]


# --- Fashion-MNIST ------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read ({e}); the file is corrupt or truncated, "
                         "remove it and fetch it again") from e


def _parse_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes: big-endian magic, `dims` sizes, then the data."""
    raw = _read(path)
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than an IDX header; "
                         "the file is truncated")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: magic number {found:#010x}, expected {magic:#010x}; "
                         "not the IDX file this name promises")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=dims, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}; "
                         "the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):  # plain first: faster to read
        if candidate.is_file():
            return candidate
    return None


def _has_split(folder: Path, split: str) -> bool:
    return all(_find_file(folder, name) for name in _FILES[split])


def _candidates(path: str) -> list[Path]:
    """Folders to try, in order. An explicit path (argument, else environment) is the only
    place looked: a wrong setting should fail, not fall back to some other copy."""
    def with_torchvision_layout(root: Path) -> list[Path]:
        return [root, root / "FashionMNIST" / "raw"]

    explicit = path or os.environ.get(FASHION_MNIST_ENV, "")
    if explicit:
        return with_torchvision_layout(Path(explicit).expanduser())
    cache = _cache_root()
    return [DEBIAN_FASHION_MNIST_DIR, cache / "fashion-mnist", cache / "FashionMNIST" / "raw"]


def _cache_root() -> Path:
    return Path.home() / ".cache" / "privet"


@functools.lru_cache(maxsize=4)
def _fashion_mnist(folder: Path, split: str) -> ImageSplit:
    images_name, labels_name = _FILES[split]
    images_path, labels_path = _find_file(folder, images_name), _find_file(folder, labels_name)
    assert images_path and labels_path, "checked by _has_split"
    images = _parse_idx(images_path, _IMAGES_MAGIC, 3)
    labels = _parse_idx(labels_path, _LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path}: {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} outside 0..9")
    scaled = images.astype(np.float32)[:, None] / np.float32(255.0)
    return _frozen(scaled, labels.astype(np.int64), FASHION_MNIST_CLASSES)


def _download(root: Path) -> Path:
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as e:
        raise RuntimeError("data.download = true needs torchvision: pip install torchvision "
                           "(or install the Debian package dataset-fashion-mnist)") from e
    FashionMNIST(root=str(root), train=True, download=True)
    FashionMNIST(root=str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


def fashion_mnist_dir(split: str = "train", *, path: str = "", download: bool = False) -> Path:
    """The folder whose IDX files `load_fashion_mnist` reads (downloading them if asked)."""
    _check_split(split)
    candidates = _candidates(path)
    for folder in candidates:
        if _has_split(folder, split):
            return folder
    if download:
        explicit = path or os.environ.get(FASHION_MNIST_ENV, "")
        folder = _download(Path(explicit).expanduser() if explicit else _cache_root())
        if _has_split(folder, split):
            return folder
        raise FileNotFoundError(f"Fashion-MNIST: torchvision's download left no {split} "
                                f"IDX files in {folder}")
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({' and '.join(_FILES[split])}, optionally .gz) not "
        f"found in {looked}; get them with `apt install dataset-fashion-mnist`, or set "
        f"data.path (or ${FASHION_MNIST_ENV}) to a folder holding them, or set "
        f"data.download = true (needs torchvision and a network)")


def load_fashion_mnist(split: str, *, path: str = "", download: bool = False) -> ImageSplit:
    """Fashion-MNIST's 60,000 train or 10,000 test 28x28 images.

    Looks in `path` if given, else in ${PRIVET_FASHION_MNIST_DIR} if set (each also in
    torchvision's `<root>/FashionMNIST/raw/` layout); else in Debian's dataset-fashion-mnist
    (/usr/share/datasets/fashion-mnist), ~/.cache/privet/fashion-mnist and torchvision's
    layout under ~/.cache/privet. With `download`, a missing copy is fetched by torchvision.
    """
    return _fashion_mnist(fashion_mnist_dir(split, path=path, download=download), split)


# --- a folder of images, one subfolder per class -------------------------------------------

# what torchvision's ImageFolder reads, and GIF; other files in a class folder are passed over
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif",
                  ".tiff", ".webp")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as float32 (channels, size, size) in [0, 1]: converted to grayscale
    (channels 1) or RGB (3), resized bilinearly to size × size. 16-bit grayscale is scaled
    by 65535. Raises DataError (one line naming the file) when Pillow cannot read it."""
    from PIL import Image

    from privet.common.data.tables import DataError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16") or image.mode in ("I", "F"):
                scale = 1.0 if image.mode == "F" else 65535.0
                gray = np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)
                plane = Image.fromarray(gray)  # float32: mode "F"
                if plane.size != (size, size):
                    plane = plane.resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.clip(np.asarray(plane, dtype=np.float32), 0.0, 1.0)[None]
                return np.repeat(pixels, channels, axis=0)
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds; name the file
        reason = one_line(error) or type(error).__name__
        raise DataError(f"{path}: cannot read this image ({reason}); expected an image file "
                        "Pillow can open (data.path)") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


@functools.lru_cache(maxsize=4)
def load_image_folder(path: str | Path, *, size: int, channels: int,
                      classes: tuple[str, ...] = ()) -> tuple[ImageSplit, tuple[str, ...]]:
    """A folder with one subfolder of images per class (torchvision's ImageFolder layout):
    `path/cat/1.png`, `path/dog/a.jpg`, ... Images in nested folders belong to their class.

    Returns the images, float32 (N, channels, size, size) in [0, 1] (grayscale for
    channels 1, RGB for 3; resized bilinearly), their int64 labels and the class names, and
    the warnings to show (files passed over). The classes are `classes` in that order when
    given (each subfolder must be one of them; a class may have no subfolder, as on a
    deployed node that holds none of it), else the subfolder names, sorted. Images are in
    class order, then sorted by path. Hidden files and folders are skipped; files that are
    not images by their suffix (IMAGE_SUFFIXES) are passed over and listed in the warnings.

    Raises DataError, one line: the folder is missing or has no class subfolders, a
    subfolder is not a declared class, a class folder holds no images, or an image cannot
    be read (naming the file)."""
    from privet.common.data.tables import DataError

    root = Path(path).expanduser()
    layout = ("expected a folder with one subfolder of images per class, e.g. "
              f"{root / 'cat' / '1.png'} (data.path)")
    if not root.is_dir():
        raise DataError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}; "
                        f"{layout}")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    loose = [p.name for p in entries if not p.is_dir()]
    if not folders:
        raise DataError(f"{root}: no class subfolders; {layout}")
    names = tuple(classes) or tuple(p.name for p in folders)
    unknown = [p.name for p in folders if p.name not in names]
    if unknown:
        raise DataError(f"{root}: subfolder(s) {unknown} not among data.classes "
                        f"{list(names)}; expected one subfolder per declared class")
    files: list[Path] = []
    labels: list[int] = []
    passed_over = [root / name for name in loose]
    for folder in sorted(folders, key=lambda p: names.index(p.name)):
        found = sorted(f for f in folder.rglob("*") if f.is_file() and not _hidden(f, root))
        pictures = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES]
        passed_over += [f for f in found if f.suffix.lower() not in IMAGE_SUFFIXES]
        if not pictures:
            raise DataError(f"{folder}: no images in this class folder; expected image files "
                            f"({', '.join(IMAGE_SUFFIXES)}) (data.path)")
        files += pictures
        labels += [names.index(folder.name)] * len(pictures)
    pixels = np.empty((len(files), channels, size, size), dtype=np.float32)
    for i, file in enumerate(files):
        pixels[i] = _read_image(file, size, channels)
    warnings = ()
    if passed_over:
        shown = ", ".join(str(f.relative_to(root)) for f in passed_over[:5])
        warnings = (f"{root}: passed over {len(passed_over)} file(s) without an image "
                    f"suffix: {shown}"
                    + (" …" if len(passed_over) > 5 else ""),)
    return _frozen(pixels, np.asarray(labels, dtype=np.int64), names), warnings


def hold_out(split: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """(kept, held out): a seeded share `fraction` of the examples for the server's test
    set, each part in its original order. Raises ValueError when either part would be
    empty."""
    n = len(split)
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    if not 0 < cut < n:
        raise ValueError(f"data.test-fraction = {fraction}: holds out {cut} of {n} examples; "
                         "expected some for the test set and some to train on")
    kept, held = np.sort(order[cut:]), np.sort(order[:cut])
    return (_frozen(split.images[kept], split.labels[kept], split.classes),
            _frozen(split.images[held], split.labels[held], split.classes))

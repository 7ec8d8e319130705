"""Where the random numbers a DP guarantee depends on come from.

Every draw a mechanism's privacy rests on — which rows a DP-SGD step samples, the Gaussian
noise on the clipped gradients, the noise on preprocessing statistics, the server's
user-level noise and the clients it samples — comes from one `Randomness` object:

- `seeded`: torch's and numpy's generators seeded from the experiment's `seed`, the round
  and the client. Reproducible, so only for simulation, where one person holds all the data
  (and the seed). Anyone who knows the seed can replay the noise and subtract it: against
  that party the guarantee is void.
- `secure`: a ChaCha20 key stream (the `cryptography` package's OpenSSL binding) keyed with
  256 bits from the operating system (`os.urandom`). The key lives in this object only: it
  is never derived from the config, logged, persisted or checkpointed (the object cannot
  be pickled). Gaussian noise is drawn as Opacus' `secure_mode` draws it: the sum of four
  Gaussians of the same standard deviation, halved, which defeats the floating-point
  attacks on a single Gaussian draw (Holohan & Braghin 2021, arXiv:2107.10138 §5.1; Opacus'
  `optimizers.optimizer._generate_noise`). Opacus' own secure mode needs torchcsprng,
  which has no build for this torch.

`resolve_noise_source` picks one from the config's `privacy.noise-source` and where the
code runs: deployment always uses `secure`.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from privet.common.config import NOISE_SOURCES

_MANTISSA = (1 << 53) - 1


class NoiseSourceError(ValueError):
    """A run asks for seeded DP noise where someone other than the data holder knows the seed."""


def resolve_noise_source(requested: str, deployed: bool, where: str = "this node") -> str:
    """The noise source to use: "seeded" or "secure".

    `auto` is `seeded` in simulation and `secure` in deployment. A deployed party (a node
    with its own data, a SuperLink's ServerApp) refuses `seeded`: the seed travels in the
    run config, so whoever submits the run could replay the noise and remove it.
    Raises NoiseSourceError for that, ValueError for an unknown name."""
    if requested not in NOISE_SOURCES:
        raise ValueError(f"privacy.noise-source = {requested!r}: expected one of "
                         f"{', '.join(NOISE_SOURCES)}")
    if deployed:
        if requested == "seeded":
            raise NoiseSourceError(
                f"privacy.noise-source = \"seeded\": refused by {where}: in deployment the "
                "seed comes with the run config, so whoever submits the run could replay "
                "the DP noise and subtract it; use \"secure\" (or \"auto\")")
        return "secure"
    return "seeded" if requested == "auto" else requested


class Randomness(ABC):
    """The random draws of DP mechanisms. Shapes are torch shapes; `std` is the standard
    deviation of the noise in the units of the value it is added to."""

    kind: str

    def start_epoch(self) -> None:
        """Called as each pass over the data starts (seeded: the draw torch's DataLoader takes
        then, so that batches stay the DataLoader's, draw for draw)."""

    @abstractmethod
    def poisson_masks(self, steps: int, rows: int, rate: float) -> torch.Tensor:
        """bool tensor (steps, rows): row j joins step i's batch with probability `rate`,
        independently (Poisson sampling, as Opacus' UniformWithReplacementSampler)."""

    @abstractmethod
    def gaussian(self, shape: Sequence[int], std: float, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
        """N(0, std²) noise of `shape` as a torch tensor of `dtype`."""

    @abstractmethod
    def gaussian_numpy(self, shape: Sequence[int] | int, std: float) -> np.ndarray:
        """N(0, std²) noise of `shape` as a float64 numpy array."""

    @abstractmethod
    def uniform(self, size: int) -> np.ndarray:
        """`size` float64 draws, uniform on [0, 1) (Poisson sampling of clients)."""


class SeededRandomness(Randomness):
    """Reproducible draws, for simulation. `seed` (an int, or a sequence of ints for numpy's
    SeedSequence) seeds torch's sampling generator (seed) and noise generator (seed + 1)
    and a numpy Generator: the streams privet drew from before noise sources existed."""

    kind = "seeded"

    def __init__(self, seed: int | Sequence[int]) -> None:
        if isinstance(seed, (int, np.integer)):
            torch_seed = int(seed)
        else:
            seed = [int(s) for s in seed]
            torch_seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 2)
        self.sampling = torch.Generator().manual_seed(torch_seed)
        self.noise = torch.Generator().manual_seed(torch_seed + 1)
        self._numpy = np.random.default_rng(seed)

    def start_epoch(self) -> None:
        torch.empty((), dtype=torch.int64).random_(generator=self.sampling)

    def poisson_masks(self, steps: int, rows: int, rate: float) -> torch.Tensor:
        return torch.rand(steps, rows, generator=self.sampling) < rate

    def gaussian(self, shape, std, dtype=torch.float32):
        return torch.normal(0.0, float(std), tuple(shape), generator=self.noise, dtype=dtype)

    def gaussian_numpy(self, shape, std):
        return self._numpy.normal(0.0, float(std), shape)

    def uniform(self, size):
        return self._numpy.random(size)

    def state_dict(self) -> dict:
        """The streams' positions (torch's generator states, numpy's bit generator state):
        a run resumed from a checkpoint draws what the uninterrupted run would have."""
        return {"sampling": self.sampling.get_state(), "noise": self.noise.get_state(),
                "numpy": self._numpy.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.sampling.set_state(state["sampling"])
        self.noise.set_state(state["noise"])
        self._numpy.bit_generator.state = state["numpy"]


class SecureRandomness(Randomness):
    """Draws from a ChaCha20 key stream keyed with 256 bits of OS entropy (see module doc)."""

    kind = "secure"

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        # key and nonce are consumed here; only the cipher's internal state keeps them
        self._stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)),
                              mode=None).encryptor()

    def __reduce__(self):
        raise TypeError("secure randomness cannot be pickled: its key must not leave "
                        "this process")

    def _words(self, count: int) -> torch.Tensor:
        """`count` 64-bit words of key stream (the encryption of zeros), as int64."""
        data = bytearray(self._stream.update(bytes(8 * count)))
        return torch.frombuffer(data, dtype=torch.int64) if count else torch.empty(
            0, dtype=torch.int64)

    def _unit(self, count: int) -> torch.Tensor:
        """float64 uniform on (0, 1): 53 random bits, centred in their interval (never 0)."""
        return ((self._words(count) >> 11) & _MANTISSA).double().add_(0.5).mul_(2.0 ** -53)

    def _standard_normal(self, count: int) -> torch.Tensor:
        """float64 N(0, 1) by Box–Muller: each pair of uniforms gives two normals."""
        pairs = (count + 1) // 2
        u = self._unit(2 * pairs)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]

    def poisson_masks(self, steps: int, rows: int, rate: float) -> torch.Tensor:
        if rate >= 1:
            return torch.ones(steps, rows, dtype=torch.bool)
        # P(word < rate · 2⁶⁴) = rate, to 2⁻⁶⁴; compared as unsigned through numpy
        words = self._words(steps * rows).numpy().view(np.uint64)
        threshold = np.uint64(min(int(rate * 2.0 ** 64), (1 << 64) - 1))
        return torch.from_numpy(words < threshold).reshape(steps, rows)

    def _noise(self, count: int, std: float) -> torch.Tensor:
        # Opacus' secure_mode: (sum of four N(0, std²)) / 2 has std `std`
        four = self._standard_normal(4 * count).view(4, count)
        return four.sum(0).mul_(float(std) / 2.0)

    def gaussian(self, shape, std, dtype=torch.float32):
        shape = tuple(shape)
        count = math.prod(shape)
        if std == 0:
            return torch.zeros(shape, dtype=dtype)
        return self._noise(count, std).to(dtype).view(shape)

    def gaussian_numpy(self, shape, std):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if std == 0:
            return np.zeros(shape)
        return self._noise(math.prod(shape), std).numpy().reshape(shape)

    def uniform(self, size):
        return self._unit(size).numpy()


def make_randomness(kind: str, seed: int | Sequence[int]) -> Randomness:
    """`kind` "seeded" (with `seed`) or "secure" (`seed` ignored: drawn from the OS)."""
    if kind == "secure":
        return SecureRandomness()
    if kind == "seeded":
        return SeededRandomness(seed)
    raise ValueError(f"noise source {kind!r}: expected \"seeded\" or \"secure\"")

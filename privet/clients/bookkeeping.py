"""DP-SGD in one backward pass (book-keeping, Bu et al. 2023) for sequential models of
Linear and Conv2d layers.

One autograd pass to the trained layers' outputs gives each example's output gradient g_i;
with the layer inputs a_i kept from the forward pass, every per-example gradient is known by
its factors. For a Linear layer on 2-D input it is the outer product g_i a_iᵀ, whose squared
norm ‖g_i‖²·(‖a_i‖² + 1 with a bias) needs no gradient built; a convolution's is G_i U_iᵀ with
U_i the unfolded input, small enough to build. The clipped sum Σ_i c_i ∇_i is then one product
per layer. Opacus' ghost mode needs a second backward pass for that sum and its hooks mode
computes the ordinary gradients as well; see experiments/bench_dpsgd.py for the cost of each.

Everything else is exactly Opacus' DP-SGD, so the two paths take the same steps (tested):
clip factor min(1, C / (‖g_i‖ + 1e-6)), Gaussian noise of std σC per parameter in parameter
order, and the sum divided by the expected batch size ⌊q·n⌋. The noise comes from a
`Randomness` (common.privacy.randomness): seeded in simulation, secure in deployment. Which
rows a step sees (Poisson sampling) is the caller's draw (clients.train).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from privet.common.privacy.randomness import Randomness

# Layers with no parameters that act on each example alone: per-example gradients stay exact.
_PER_EXAMPLE = (nn.Flatten, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU,
                nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d)


def _trainable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.groups == 1
            and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple))


def supports(model: nn.Module) -> bool:
    """True for an nn.Sequential of Linear layers, Conv2d layers (zero padding, one group) and
    parameter-free per-example layers (activations, pooling, Flatten)."""
    return (isinstance(model, nn.Sequential) and len(model) > 0
            and all(_trainable(layer) or isinstance(layer, _PER_EXAMPLE) for layer in model)
            and any(_trainable(layer) for layer in model))


class _LinearGrads:
    """Example i's weight gradient g_i a_iᵀ, known by its factors: never built."""

    def __init__(self, layer: nn.Linear, a: torch.Tensor, g: torch.Tensor):
        if a.dim() != 2:
            raise ValueError(f"book-keeping DP-SGD needs 2-D input to each Linear layer, got "
                             f"shape {tuple(a.shape)}")
        self.layer, self.a, self.g = layer, a, g

    def squared_norms(self) -> torch.Tensor:
        input_sq = self.a.square().sum(1)
        if self.layer.bias is not None:
            input_sq += 1.0
        return self.g.square().sum(1) * input_sq

    def clipped_sums(self, clip: torch.Tensor) -> list[torch.Tensor]:
        weighted = self.g * clip.unsqueeze(1)
        sums = [weighted.T @ self.a]
        if self.layer.bias is not None:
            sums.append(weighted.sum(0))
        return sums


class _ConvGrads:
    """Example i's weight gradient G_i U_iᵀ (output gradient times unfolded input), built:
    for small convolutions it is small, and the clipped sum is then one product."""

    def __init__(self, layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor):
        unfolded = functional.unfold(a, layer.kernel_size, dilation=layer.dilation,
                                     padding=layer.padding, stride=layer.stride)
        g = g.flatten(2)
        self.layer = layer
        self.weight = torch.bmm(g, unfolded.transpose(1, 2)).flatten(1)
        self.bias = g.sum(2) if layer.bias is not None else None

    def squared_norms(self) -> torch.Tensor:
        norms = self.weight.square().sum(1)
        return norms if self.bias is None else norms + self.bias.square().sum(1)

    def clipped_sums(self, clip: torch.Tensor) -> list[torch.Tensor]:
        sums = [(clip @ self.weight).view_as(self.layer.weight)]
        if self.bias is not None:
            sums.append(clip @ self.bias)
        return sums


class BookkeepingDPSGD:
    """Runs DP-SGD steps on `model` with `optimizer` (anything with a `step()` that applies the
    parameters' `.grad`, e.g. a torch optimizer over them).

    Each step's gradient is (Σ_i clipped ∇_i + N(0, (σC)²)) / `expected_batch_size`, the noise
    drawn as `randomness.gaussian(p.shape, σC / expected_batch_size, p.dtype)` for each trained
    parameter p in `model.parameters()` order, whether or not the batch is empty. With
    `SeededRandomness` these are the standard normals Opacus' DPOptimizer draws from a
    generator seeded alike; it scales them by σC and then divides by the batch, so the two
    agree to rounding.
    Raises ValueError for a model `supports` refuses, a frozen parameter or an expected batch
    size below 1."""

    def __init__(self, model: nn.Module, optimizer, *,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 randomness: Randomness):
        if not supports(model):
            raise ValueError("book-keeping DP-SGD needs an nn.Sequential of Linear, Conv2d and "
                             f"parameter-free per-example layers, got {model!r}")
        if expected_batch_size < 1:
            raise ValueError(f"expected batch size must be >= 1, got {expected_batch_size}")
        self.model = model
        self.optimizer = optimizer
        self.noise_std = noise_multiplier * max_grad_norm
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.randomness = randomness
        self._trained = [_trainable(layer) for layer in model]
        self.layers = [layer for layer, trained in zip(model, self._trained) if trained]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len(self.params) != sum(1 + (layer.bias is not None) for layer in self.layers):
            raise ValueError("book-keeping DP-SGD trains every parameter: none may be frozen")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DP-SGD step on the batch (x, y), which may be empty. Returns the logits and the
        summed loss, detached."""
        inputs, outputs = [], []
        h = x
        for layer, is_trained in zip(self.model, self._trained):
            if is_trained:
                inputs.append(h)
                h = layer(h)
                outputs.append(h)
            else:
                h = layer(h)
        loss_sum = functional.cross_entropy(h, y, reduction="sum")
        if len(y):  # the sum's gradient at each output is each example's own
            backprops = torch.autograd.grad(loss_sum, outputs)
        with torch.no_grad():
            # (clipped sum + noise) / expected batch, the division folded into both terms
            grads = self._clipped_sums(inputs, backprops) if len(y) else None
            std = self.noise_std / self.expected_batch_size
            for i, p in enumerate(self.params):
                noise = self.randomness.gaussian(p.shape, std, p.dtype)
                p.grad = noise if grads is None else noise.add_(grads[i])
        self.optimizer.step()
        return h.detach(), loss_sum.detach()

    def _clipped_sums(self, inputs: list[torch.Tensor], backprops: tuple[torch.Tensor, ...]
                      ) -> list[torch.Tensor]:
        per_layer = [(_LinearGrads if isinstance(layer, nn.Linear) else _ConvGrads)(layer, a, g)
                     for layer, a, g in zip(self.layers, inputs, backprops)]
        squared = sum(grads.squared_norms() for grads in per_layer)
        # Opacus' factor min(1, C / (‖g‖ + 1e-6)), over the expected batch size
        batch = self.expected_batch_size
        clip = ((self.max_grad_norm / batch) / (squared.sqrt() + 1e-6)).clamp_(max=1.0 / batch)
        return [s for grads in per_layer for s in grads.clipped_sums(clip)]

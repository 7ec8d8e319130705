"""DP-SGD in one backward pass for stacks of Linear layers (book-keeping, Bu et al. 2023).

For a Linear layer on 2-D input, example i's weight gradient is the outer product g_i a_iᵀ of
its output gradient and its input, so its squared norm is ‖g_i‖²·(‖a_i‖² + 1 with a bias) and
never has to be built. One autograd pass to the layers' outputs gives every g_i; the clipped
sum is then Σ_i c_i g_i a_iᵀ, a single matrix product per layer. Opacus' ghost mode needs a
second backward pass for that sum and its hooks mode builds every per-example gradient; on the
shipped MLP both cost 3-4x a plain SGD step, this about 1.5x (experiments/bench_dpsgd.py).

Everything else is exactly Opacus' DP-SGD, so the two paths take the same steps (tested):
Poisson sampling as its UniformWithReplacementSampler draws it (torch.rand(n) < q from the
same generator), clip factor min(1, C / (‖g_i‖ + 1e-6)), Gaussian noise of std σC drawn per
parameter in parameter order, and the sum divided by the expected batch size ⌊q·n⌋.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

# Layers with no parameters that act on each example alone: per-example gradients stay exact.
_ELEMENTWISE = (nn.Flatten, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU,
                nn.Identity)


def supports(model: nn.Module) -> bool:
    """True for an nn.Sequential of Linear layers and parameter-free per-example layers."""
    return (isinstance(model, nn.Sequential) and len(model) > 0
            and all(isinstance(layer, (nn.Linear, *_ELEMENTWISE)) for layer in model)
            and any(isinstance(layer, nn.Linear) for layer in model))


class BookkeepingDPSGD:
    """Runs DP-SGD steps on `model` with `optimizer` (any torch optimizer over its parameters)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 noise_generator: torch.Generator):
        if not supports(model):
            raise ValueError("book-keeping DP-SGD needs an nn.Sequential of Linear and "
                             f"parameter-free layers, got {type(model).__name__}")
        if expected_batch_size < 1:
            raise ValueError(f"expected batch size must be >= 1, got {expected_batch_size}")
        self.model = model
        self.optimizer = optimizer
        self.noise_std = noise_multiplier * max_grad_norm
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.generator = noise_generator
        self.linears = [layer for layer in model if isinstance(layer, nn.Linear)]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len(self.params) != sum(1 + (lin.bias is not None) for lin in self.linears):
            raise ValueError("book-keeping DP-SGD trains every Linear parameter: none may be "
                             "frozen")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DP-SGD step on the batch (x, y), which may be empty. Returns the logits and the
        per-example losses, detached."""
        inputs, outputs = [], []
        h = x
        for layer in self.model:
            if isinstance(layer, nn.Linear):
                if h.dim() != 2:
                    raise ValueError(f"book-keeping DP-SGD needs 2-D input to each Linear "
                                     f"layer, got shape {tuple(h.shape)}")
                inputs.append(h)
                h = layer(h)
                outputs.append(h)
            else:
                h = layer(h)
        losses = functional.cross_entropy(h, y, reduction="none")
        if len(y):
            backprops = torch.autograd.grad(losses.sum(), outputs)
        with torch.no_grad():
            grads = self._clipped_sums(inputs, backprops) if len(y) else None
            for i, p in enumerate(self.params):
                noise = torch.normal(0.0, self.noise_std, p.shape, generator=self.generator,
                                     dtype=p.dtype)
                p.grad = (noise if grads is None else noise.add_(grads[i])).div_(
                    self.expected_batch_size)
        self.optimizer.step()
        return h.detach(), losses.detach()

    def _clipped_sums(self, inputs: list[torch.Tensor], backprops: tuple[torch.Tensor, ...]
                      ) -> list[torch.Tensor]:
        squared = torch.zeros(len(backprops[0]))
        for lin, a, g in zip(self.linears, inputs, backprops):
            input_sq = a.square().sum(1)
            if lin.bias is not None:
                input_sq += 1.0
            squared += g.square().sum(1) * input_sq
        clip = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp_(max=1.0)
        grads = []
        for lin, a, g in zip(self.linears, inputs, backprops):
            weighted = g * clip.unsqueeze(1)
            grads.append(weighted.T @ a)
            if lin.bias is not None:
                grads.append(weighted.sum(0))
        return grads

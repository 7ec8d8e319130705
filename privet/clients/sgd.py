"""SGD with momentum: torch.optim.SGD's update, without its ~1 s first use per process.

A torch optimizer's first construction imports torch._dynamo (torch.optim wraps its methods
in torch._disable_dynamo), about a second in every simulation actor and for every client
process a SuperNode starts. Plain SGD needs none of it. Same arithmetic as torch.optim.SGD
with dampening 0, no weight decay, no Nesterov (tests compare the two bit for bit).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            direction = p.grad
            if self.momentum:
                buffer = self._buffers[i]
                if buffer is None:
                    buffer = self._buffers[i] = torch.clone(direction).detach()
                else:
                    buffer.mul_(self.momentum).add_(direction)
                direction = buffer
            p.add_(direction, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def add_proximal_term(optimizer, params: list[torch.nn.Parameter], mu: float):
    """FedProx's proximal term (Li et al., 2020, "Federated Optimization in Heterogeneous
    Networks", MLSys; arXiv:1812.06127): before each `optimizer.step()`, add μ·(w − w_global)
    to every parameter's `.grad`, the gradient of (μ/2)·‖w − w_global‖², where w_global is
    each parameter's value now (call this once the global model is loaded, before training).

    Under DP-SGD the term enters after clipping and noise: it depends on no example, so it
    is neither clipped nor noised and costs no ε (the noised gradient plus a public vector is
    post-processing). Putting it into the loss instead would put it into every per-sample
    gradient, where clipping would shrink it with the data's part.
    Returns `optimizer`, whose `step` now adds the term; μ = 0 leaves it as it was."""
    if not mu:
        return optimizer
    anchors = [p.detach().clone() for p in params]
    step = optimizer.step

    def proximal_step(*args, **kwargs):
        with torch.no_grad():
            for p, anchor in zip(params, anchors):
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)
        return step(*args, **kwargs)

    optimizer.step = proximal_step
    return optimizer

"""DP-SGD in one backward pass (book-keeping: Bu, Wang, Zha & Karypis 2023, "Differentially
private optimization on large model at small cost", ICML) for models built of Linear,
Conv2d, LayerNorm, GroupNorm and Embedding layers.

One autograd pass to the trained layers' outputs gives each example's output gradient g_i;
with each layer's input a_i kept from the forward pass (forward hooks), every per-example
gradient is known by its factors. The model may be any module tree (nn.Sequential or not:
residual additions, concatenations and other per-example code in its forward) whose modules
with trainable parameters are all of the layers below and whose other leaves are
parameter-free per-example layers (activations, Dropout, Flatten, pooling, …). Per layer,
for example i (B examples; T positions, the dimensions between the batch and the feature
dimension, summed over):

- Linear, input a_i (T, D), output gradient g_i (T, O): ∇W_i = Σ_t g_it a_itᵀ, ∇b_i = Σ_t g_it.
  With T = 1 (2-D input) ‖∇W_i‖² = ‖g_i‖²‖a_i‖², never built; with T > 1 either the Gram form
  ‖∇W_i‖² = Σ_{t,s} (a_it·a_is)(g_it·g_is), O(T²(D+O)), or ∇W_i built, O(T·D·O), whichever
  is cheaper (Bu et al.'s mixed ghost clipping). The clipped sum Σ_i c_i ∇W_i is one product.
- Conv2d: ∇W_i = G_i U_iᵀ (output gradient times the unfolded input), built.
- LayerNorm over the last dims N, GroupNorm over (C, *): with x̂ the normalised input (no
  affine), ∇γ_i = Σ_positions g_i ⊙ x̂_i, ∇β_i = Σ_positions g_i (positions: the dims between
  batch and N for LayerNorm, the spatial dims for GroupNorm), built: (B, N) or (B, C).
- Embedding, indices k_i (T,), output gradient g_i (T, D): ∇E_i = Σ_t e_{k_it} g_itᵀ, the
  rows g_it scatter-added into the rows k_it, positions at `padding_idx` left out (torch
  gives that row no gradient). A sample that looks up the same row twice sums the two
  contributions before squaring: ‖∇E_i‖² = Σ_{t,s: k_it = k_is} g_it·g_is, computed by
  grouping equal (i, k) pairs, never building the (B, V, D) tensor. Opacus' own embedding
  sampler ignores padding_idx (it gives the padding row a per-sample gradient).

A module called more than once in a forward pass adds its calls' gradients: Linear and
Embedding calls are joined along T, built gradients summed. Parameters shared between two
modules (tied weights) are refused: `supports` says no and clients.train sends the model to
Opacus' hooks mode, which adds them up per example. Frozen parameters (requires_grad False)
get no gradient, no norm and no noise, as in Opacus.

The loss (common.losses: cross-entropy, or mse / huber for regression) is a sum of
per-example terms, so the summed loss's gradient at each example's output is that example's
own, whichever loss it is.

Everything else is exactly Opacus' DP-SGD, so the two paths take the same steps (tested):
clip factor min(1, C / (‖g_i‖ + 1e-6)), Gaussian noise of std σC per trained parameter in
parameter order, and the sum divided by the expected batch size ⌊q·n⌋. The noise comes from
a `Randomness` (common.privacy.randomness): seeded in simulation, secure in deployment.
Which rows a step sees (Poisson sampling) is the caller's draw (clients.train).

What a forward pass could do behind the formulas' back is checked: a trained layer's input
or output changed in place afterwards (every step, by tensor versions), and a parameter used
outside its layer's call, as in `h @ embedding.weight.T` (the first step with examples: the
unclipped per-example sum must be autograd's batch gradient); both raise ValueError. Like
Opacus, this trusts a model's own forward code to treat each example alone (code that mixes
the examples of a batch breaks per-example clipping on either path); BatchNorm is refused.
Step times against Opacus' modes: experiments/bench_dpsgd.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from privet.common.losses import task_loss
from privet.common.privacy.randomness import Randomness

# Leaf layers with no parameters that act on each example alone: per-example gradients stay
# exact through them. (Softmax and friends only over a dimension other than the batch's.)
_PER_EXAMPLE = (nn.Flatten, nn.Unflatten, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
                nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                nn.LogSigmoid, nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ALONG_A_DIM = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_WITH_FORMULA = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


class UsedOutsideItsLayer(ValueError):
    """A trained parameter gets gradient from outside its layer's own call."""


def _trained(module: nn.Module) -> list[nn.Parameter]:
    """The module's own parameters that are trained."""
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _formula_refuses(layer: nn.Module) -> str | None:
    """Why the formula for this layer's type does not apply to it, or None."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return "grouped convolution"
        if layer.padding_mode != "zeros" or not isinstance(layer.padding, tuple):
            return f"padding {layer.padding!r} ({layer.padding_mode})"
    if isinstance(layer, nn.Embedding):
        if layer.max_norm is not None:
            return "max_norm renormalises the looked-up rows in place"
        if layer.scale_grad_by_freq:
            return "scale_grad_by_freq scales by counts over the whole batch"
        if layer.sparse:
            return "sparse gradients"
    return None


def _batch_apart(layer: nn.Module) -> bool:
    """False for the reshapes that would merge or split the batch dimension."""
    if isinstance(layer, nn.Flatten):
        return layer.start_dim != 0
    if isinstance(layer, nn.Unflatten):
        return layer.dim != 0
    return True


def unsupported(model: nn.Module) -> str | None:
    """Why the one-pass path cannot train `model` (one line naming the first layer it
    refuses), or None when it can: every module with trained parameters is a Linear, Conv2d
    (zero padding, one group), LayerNorm, GroupNorm or Embedding (no max_norm,
    scale_grad_by_freq or sparse) of exactly that type, no parameter belongs to two of them,
    every other leaf module is a parameter-free per-example layer, and something is
    trained."""
    owners: dict[int, tuple[nn.Module, str]] = {}  # a trained parameter's layer
    for name, module in model.named_modules(remove_duplicate=False):
        where = f"layer {name or 'the model'!r} ({type(module).__name__})"
        own = list(module.parameters(recurse=False))
        if type(module) in _WITH_FORMULA:
            refused = _formula_refuses(module)
            if refused and any(p.requires_grad for p in own):
                return f"{where}: {refused}"
        elif any(p.requires_grad for p in own):
            return f"{where}: no one-pass formula for its parameters"
        elif next(module.children(), None) is None and not (
                type(module) in _PER_EXAMPLE and _batch_apart(module)
                or type(module) in _ALONG_A_DIM and module.dim not in (None, 0)):
            return f"{where}: not a known per-example layer"
        for p in own:  # one module reached by two names is one layer called twice: fine
            if p.requires_grad and owners.setdefault(id(p), (module, name))[0] is not module:
                return (f"{where}: its parameter is shared with layer "
                        f"{owners[id(p)][1]!r} (tied weights)")
    if not owners:
        return "nothing to train"
    return None


def supports(model: nn.Module) -> bool:
    """True when privet's one-pass DP-SGD trains `model` (see `unsupported`)."""
    return unsupported(model) is None


class _Built:
    """Per-example gradients built: {parameter: (B, *parameter shape)}."""

    def __init__(self, per_example: dict[nn.Parameter, torch.Tensor]):
        self.per_example = per_example

    def squared_norms(self) -> torch.Tensor:
        return sum(g.flatten(1).square().sum(1) for g in self.per_example.values())

    def clipped_sums(self, clip: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: (clip @ g.flatten(1)).view_as(p) for p, g in self.per_example.items()}


def _add(built: dict, p: nn.Parameter, g: torch.Tensor) -> None:
    built[p] = built[p] + g if p in built else g


def _conv_grads(layer: nn.Conv2d, weight: nn.Parameter | None, bias: nn.Parameter | None,
                calls: list[tuple[torch.Tensor, torch.Tensor]]) -> _Built:
    """Example i's weight gradient G_i U_iᵀ (output gradient times unfolded input), built:
    for small convolutions it is small, and the clipped sum is then one product."""
    built: dict[nn.Parameter, torch.Tensor] = {}
    for a, g in calls:
        g = g.flatten(2)
        if weight is not None:
            unfolded = functional.unfold(a, layer.kernel_size, dilation=layer.dilation,
                                         padding=layer.padding, stride=layer.stride)
            _add(built, weight, torch.bmm(g, unfolded.transpose(1, 2)))
        if bias is not None:
            _add(built, bias, g.sum(2))
    return _Built(built)


def _norm_grads(layer: nn.LayerNorm | nn.GroupNorm, weight: nn.Parameter | None,
                bias: nn.Parameter | None, calls: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> _Built:
    """LayerNorm (B, *, N) or GroupNorm (B, C, *): ∇γ_i = Σ g_i ⊙ x̂_i and ∇β_i = Σ g_i over
    the positions each affine parameter is shared across, x̂ recomputed from the input."""
    built: dict[nn.Parameter, torch.Tensor] = {}
    for a, g in calls:
        if isinstance(layer, nn.LayerNorm):
            dims = tuple(range(1, a.dim() - len(layer.normalized_shape)))
        else:
            dims = tuple(range(2, a.dim()))
        if weight is not None:
            if isinstance(layer, nn.LayerNorm):
                normalised = functional.layer_norm(a, layer.normalized_shape, eps=layer.eps)
            else:
                normalised = functional.group_norm(a, layer.num_groups, eps=layer.eps)
            product = g * normalised
            _add(built, weight, product.sum(dims) if dims else product)
        if bias is not None:
            _add(built, bias, g.sum(dims) if dims else g)
    return _Built(built)


class _LinearGrads:
    """Example i's weight gradient Σ_t g_it a_itᵀ, known by its factors a (B, T, D) and
    g (B, T, O) (every call's positions joined along T): never built for T = 1, and for T > 1
    only where that is cheaper than the Gram form of its norm."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None,
                 calls: list[tuple[torch.Tensor, torch.Tensor]]):
        self.weight, self.bias = weight, bias  # the trained ones, else None
        if len(calls) == 1 and calls[0][0].dim() == 2:
            self.a, self.g = calls[0]
            self.positions = 1
        else:
            batch = calls[0][0].shape[0]
            self.a = torch.cat([a.reshape(batch, -1, a.shape[-1]) for a, _ in calls], 1)
            self.g = torch.cat([g.reshape(batch, -1, g.shape[-1]) for _, g in calls], 1)
            self.positions = self.a.shape[1]
        self.built: torch.Tensor | None = None

    GRAM: bool | None = None  # None: the cheaper form; True/False force it (tests)

    def squared_norms(self) -> torch.Tensor:
        a, g = self.a, self.g
        if self.positions == 1:  # a (B, D), g (B, O): ‖g_i‖²(‖a_i‖² + 1 with a bias)
            output_sq = g.square().sum(1)
            if self.weight is None:
                return output_sq
            input_sq = a.square().sum(1)
            if self.bias is not None:
                input_sq += 1.0
            return output_sq * input_sq
        norms = g.new_zeros(g.shape[0])
        if self.weight is not None:
            t, d, o = self.positions, a.shape[-1], g.shape[-1]
            if self.GRAM if self.GRAM is not None else t * (d + o) < d * o:
                # Gram form: Σ_{t,s} (a_t·a_s)(g_t·g_s)
                norms += ((a @ a.mT) * (g @ g.mT)).sum((1, 2))
            else:
                self.built = g.mT @ a  # (B, O, D)
                norms += self.built.square().sum((1, 2))
        if self.bias is not None:
            norms += g.sum(1).square().sum(1)
        return norms

    def clipped_sums(self, clip: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        sums = {}
        if self.positions == 1:
            weighted = self.g * clip.unsqueeze(1)
            if self.weight is not None:
                sums[self.weight] = weighted.T @ self.a
            if self.bias is not None:
                sums[self.bias] = weighted.sum(0)
            return sums
        if self.weight is not None:
            if self.built is not None:
                sums[self.weight] = (clip @ self.built.flatten(1)).view_as(self.weight)
            else:
                weighted = self.g * clip.view(-1, 1, 1)
                sums[self.weight] = (weighted.reshape(-1, self.g.shape[-1]).T
                                     @ self.a.reshape(-1, self.a.shape[-1]))
        if self.bias is not None:
            sums[self.bias] = clip @ self.g.sum(1)
        return sums


class _EmbeddingGrads:
    """Example i's gradient Σ_t e_{k_it} g_itᵀ: the output-gradient rows g (B, T, D)
    scatter-added into the looked-up rows k (B, T); rows at `padding_idx` count for nothing."""

    # up to this many lookups per example the norm is the masked Gram Σ_{k_t = k_s} g_t·g_s,
    # O(T²D); beyond, equal (example, row) pairs are grouped by a sort, O(T log T + TD)
    GRAM_POSITIONS = 16

    def __init__(self, layer: nn.Embedding, weight: nn.Parameter,
                 calls: list[tuple[torch.Tensor, torch.Tensor]]):
        batch = calls[0][0].shape[0]
        self.weight = weight
        self.k = torch.cat([k.reshape(batch, -1) for k, _ in calls], 1)
        self.g = torch.cat([g.reshape(batch, -1, g.shape[-1]) for _, g in calls], 1)
        if layer.padding_idx is not None:
            self.g = self.g * (self.k != layer.padding_idx).unsqueeze(-1)

    def squared_norms(self) -> torch.Tensor:
        k, g = self.k, self.g
        batch, positions = k.shape
        if positions == 1:
            return g.square().sum((1, 2))
        if positions <= self.GRAM_POSITIONS:
            same = k.unsqueeze(2) == k.unsqueeze(1)
            return ((g @ g.mT) * same).sum((1, 2))
        rows = self.weight.shape[0]
        keys = (torch.arange(batch, device=k.device).unsqueeze(1) * rows + k).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        grouped = g.new_zeros(len(unique), g.shape[-1]).index_add_(
            0, inverse, g.reshape(-1, g.shape[-1]))
        return g.new_zeros(batch).index_add_(0, unique // rows, grouped.square().sum(1))

    def clipped_sums(self, clip: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        weighted = (self.g * clip.view(-1, 1, 1)).reshape(-1, self.g.shape[-1])
        return {self.weight: torch.zeros_like(self.weight).index_add_(
            0, self.k.reshape(-1), weighted)}


def _grads(layer: nn.Module, weight: nn.Parameter | None, bias: nn.Parameter | None,
           calls: list[tuple[torch.Tensor, torch.Tensor]]):
    """The per-example gradients of `layer`'s trained `weight` and `bias` (None: not
    trained) from its `calls`: (input, output gradient) of each."""
    if isinstance(layer, nn.Linear):
        return _LinearGrads(weight, bias, calls)
    if isinstance(layer, nn.Embedding):
        return _EmbeddingGrads(layer, weight, calls)
    if isinstance(layer, nn.Conv2d):
        return _conv_grads(layer, weight, bias, calls)
    return _norm_grads(layer, weight, bias, calls)


class BookkeepingDPSGD:
    """Runs DP-SGD steps on `model` with `optimizer` (anything with a `step()` that applies the
    parameters' `.grad`, e.g. a torch optimizer over them).

    Each step's gradient is (Σ_i clipped ∇_i + N(0, (σC)²)) / `expected_batch_size`, the noise
    drawn as `randomness.gaussian(p.shape, σC / expected_batch_size, p.dtype)` for each trained
    parameter p in `model.parameters()` order, whether or not the batch is empty. With
    `SeededRandomness` these are the standard normals Opacus' DPOptimizer draws from a
    generator seeded alike; it scales them by σC and then divides by the batch, so the two
    agree to rounding.
    `loss` names the per-example loss (common.losses): "cross-entropy" on logits (B, classes)
    and int64 labels, "mse" or "huber" on one output (B, 1) and float targets (B,).
    Raises ValueError for a model `supports` refuses or an expected batch size below 1, and
    in `step` for a forward pass that changes a trained layer's input or output in place
    (its gradient would then be another tensor's) or, checked on the first step with
    examples, uses a trained parameter outside its layer's own call (`_check`)."""

    def __init__(self, model: nn.Module, optimizer, *,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 randomness: Randomness, loss: str = "cross-entropy"):
        refused = unsupported(model)
        if refused:
            raise ValueError(f"book-keeping DP-SGD cannot train this model: {refused}")
        if expected_batch_size < 1:
            raise ValueError(f"expected batch size must be >= 1, got {expected_batch_size}")
        self.model = model
        self.optimizer = optimizer
        self.noise_std = noise_multiplier * max_grad_norm
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.randomness = randomness
        self.loss = loss
        self.layers = [m for m in model.modules() if type(m) in _WITH_FORMULA and _trained(m)]
        self._params_of = {layer: tuple(p if p is not None and p.requires_grad else None
                                      for p in (layer.weight, getattr(layer, "bias", None)))
                         for layer in self.layers}  # (weight, bias), None where not trained
        self.params = [p for p in model.parameters() if p.requires_grad]
        # an nn.Sequential of leaves (the built-in models) is walked here, without hooks
        self._walk = isinstance(model, nn.Sequential) and not any(
            next(layer.children(), None) is not None for layer in model)
        self._checked = False  # the first non-empty step checks the formulas see everything

    def _forward(self, x: torch.Tensor, calls: list[tuple]) -> torch.Tensor:
        """The model's output for `x`; each call of a trained layer appended to `calls` as
        (layer, input detached, output, their versions then)."""
        def keep(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = inputs[0].detach()
            calls.append((layer, a, output, a._version, output._version))

        if self._walk:
            h = x
            for layer in self.model:
                out = layer(h)
                if layer in self._params_of:
                    keep(layer, (h,), out)
                h = out
            return h
        handles = [layer.register_forward_hook(keep) for layer in self.layers]
        try:
            return self.model(x)
        finally:
            for handle in handles:
                handle.remove()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DP-SGD step on the batch (x, y), which may be empty. Returns the outputs (logits,
        or the scaled predictions (B, 1)) and the summed loss, detached."""
        calls: list[tuple] = []
        h = self._forward(x, calls)
        loss_sum = task_loss(self.loss, h, y, reduction="sum")
        if len(y):  # the sum's gradient at each output is each example's own
            for layer, a, z, a_version, z_version in calls:
                if a.shape[0] != len(y):  # per-example clipping needs one row per example
                    raise ValueError(
                        f"book-keeping DP-SGD: a {type(layer).__name__} saw {a.shape[0]} rows "
                        f"for a batch of {len(y)} examples: the forward pass reshapes or mixes "
                        "the batch dimension, so no per-example clipping (and no ε) holds; "
                        "keep the batch as the first dimension, one row per example")
                if a._version != a_version or z._version != z_version:
                    raise ValueError(
                        f"book-keeping DP-SGD: the forward pass changed the input or output "
                        f"of a {type(layer).__name__} in place after the layer ran "
                        "(ReLU(inplace=True), `h += …`): write it out of place (Opacus' modes "
                        "fail on it too)")
            calls = [call for call in calls if call[2].requires_grad]  # else under no_grad
            outputs = [call[2] for call in calls]
            check = [] if self._checked else self.params
            found = torch.autograd.grad(loss_sum, outputs + check, allow_unused=True)
            backprops = found[:len(outputs)]
        with torch.no_grad():
            grads = {}
            if len(y):
                per_layer = self._per_layer(calls, backprops)
                if check:
                    self._check(per_layer, found[len(outputs):], len(y), h)
                grads = self._clipped_sums(per_layer, len(y), h)
            # (clipped sum + noise) / expected batch, the division folded into both terms
            std = self.noise_std / self.expected_batch_size
            for p in self.params:  # drawn on the CPU, copied to a GPU (clients.train's doc)
                noise = self.randomness.gaussian(p.shape, std, p.dtype).to(p.device)
                clipped = grads.get(id(p))
                p.grad = noise if clipped is None else noise.add_(clipped)
        self.optimizer.step()
        return h.detach(), loss_sum.detach()

    def _per_layer(self, calls: list[tuple], backprops: tuple) -> list:
        """Each trained layer's per-example gradients from its calls' inputs and output
        gradients."""
        per_layer: dict[nn.Module, list] = {}
        for (layer, a, *_), g in zip(calls, backprops):
            if g is not None:  # None: an output the loss does not use
                per_layer.setdefault(layer, []).append((a, g))
        return [_grads(layer, *self._params_of[layer], layer_calls)
                for layer, layer_calls in per_layer.items()]

    def _check(self, per_layer: list, batch_grads: tuple, batch: int,
               logits: torch.Tensor) -> None:
        """Raises ValueError unless the per-example gradients, summed unclipped, are the batch
        gradient autograd gives: a parameter used outside its layer's own call (F.linear(x,
        self.fc.weight), logits = h @ embedding.weight.T) would get a gradient the formulas
        do not see. Once, on the first step with examples (one more backward pass's worth of
        work)."""
        ones = logits.new_ones(batch)
        sums = {id(p): s for g in per_layer for p, s in g.clipped_sums(ones).items()}
        names = {id(p): name for name, p in self.model.named_parameters()}
        for p, expected in zip(self.params, batch_grads):
            ours = sums.get(id(p))
            expected = torch.zeros_like(p) if expected is None else expected
            ours = torch.zeros_like(p) if ours is None else ours
            scale = float(expected.abs().max()) + float(ours.abs().max())
            if not torch.allclose(ours, expected, rtol=1e-3, atol=1e-5 * scale + 1e-12):
                raise UsedOutsideItsLayer(
                    f"book-keeping DP-SGD: parameter {names[id(p)]!r} gets gradient from "
                    "outside its layer's own call (used directly in a forward, e.g. "
                    "F.linear(x, self.fc.weight) or h @ embedding.weight.T), which the "
                    "one-pass formulas do not see; train this model with train.dp-path = "
                    "\"hooks\"")
        self._checked = True

    def _clipped_sums(self, per_layer: list, batch: int, logits: torch.Tensor
                      ) -> dict[int, torch.Tensor]:
        """{id(parameter): Σ_i c_i ∇_i / expected batch}."""
        squared = (sum(g.squared_norms() for g in per_layer) if per_layer
                   else logits.new_zeros(batch))
        # Opacus' factor min(1, C / (‖g‖ + 1e-6)), over the expected batch size
        scale = self.expected_batch_size
        clip = ((self.max_grad_norm / scale) / (squared.sqrt() + 1e-6)).clamp_(max=1.0 / scale)
        return {id(p): s for g in per_layer for p, s in g.clipped_sums(clip).items()}

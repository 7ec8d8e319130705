"""Models: a registry of built-ins, and a user's own by import path.

`[train] model` is a registered name (`mlp`, `logreg`, `cnn`) or `package.module:factory`
(Flower's `module:attr` convention). A factory is called as
`factory(input_shape, num_outputs, train)` — one example's shape, (features,) or
(channels, height, width); the number of classes (1 for `train.task = "regression"`: the
scaled target, common.data.target); the TrainConfig — and returns an nn.Module mapping a
batch (B, *input_shape) to logits (B, num_outputs). A factory whose
signature also takes the keyword `features` gets what each input column is
(`common.data.features.Features`: numbers, and each categorical column's one-hot block and
values; None for images): the same on every party, from the shared transform or the schema.

Any module Opacus can train is accepted: clients.train picks privet's one-pass DP-SGD where
every trainable layer is one it supports, else Opacus. Layers DP-SGD cannot handle (BatchNorm
mixes examples in a batch) are refused before round 1 by Opacus' ModuleValidator, or replaced
by its fix (`train.fix-model = true`: BatchNorm → GroupNorm, etc.), which every party applies
the same way so that the weights fit.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from typing import TYPE_CHECKING, Callable

from torch import nn

from privet.common.config import TrainConfig, is_import_path
from privet.common.imports import import_attr, one_line

if TYPE_CHECKING:
    from privet.common.data.features import Features

Factory = Callable[[tuple[int, ...], int, TrainConfig], nn.Module]
MODELS: dict[str, Factory] = {}


class ModelError(ValueError):
    """A model that cannot be built or trained with DP-SGD; the message is one line naming
    `train.model` (and the layer) and the fix."""


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a built-in model factory under `name` (what `train.model` says)."""
    def add(factory: Factory) -> Factory:
        MODELS[name] = factory
        return factory
    return add


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig) -> nn.Module:
    """One hidden layer of `train.hidden` ReLU units."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), train.hidden),
                         nn.ReLU(), nn.Linear(train.hidden, num_outputs))


@register("logreg")
def logreg(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


@register("cnn")
def cnn(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig) -> nn.Module:
    """Two 3x3 convolutions, then dense layers; for (channels, height, width) inputs of 8x8
    and up. The adaptive pool fixes the dense input at 32x4x4 whatever the image size, and
    keeps the per-sample gradient work (what DP-SGD pays for) small on a CPU."""
    if len(input_shape) != 3:
        raise ModelError(f"train.model = 'cnn' needs image input (channels, height, width), "
                         f"got one example of shape {tuple(input_shape)}")
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(32 * 4 * 4, train.hidden), nn.ReLU(),
        nn.Linear(train.hidden, num_outputs))


def factory(name: str) -> Factory:
    """The factory `train.model` names; raises ModelError (one line) when there is none."""
    if name in MODELS:
        return MODELS[name]
    if not is_import_path(name):
        raise ModelError(f"train.model = {name!r}: expected one of {', '.join(MODELS)} or an "
                         "import path package.module:factory")
    return import_attr(name, "train.model", ModelError, "factory")


def shipped_with_app(name: str, app_dir, key: str = "train.model") -> str | None:
    """Why the import path `name` that setting `key` holds (`train.model`, a loader's
    `data.dataset`, a user's `strategy.name`) would not reach the deployed SuperNodes and
    ServerApp (Flower ships the .py files of the app folder `app_dir` in its FAB, nothing
    else), or None when it would: a built-in name, or a module whose file lies in the app
    folder."""
    if name in MODELS or not is_import_path(name):
        return None
    from pathlib import Path

    module = name.partition(":")[0]
    spec = None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        pass
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    app = Path(app_dir).resolve()
    if origin is None:
        return (f"{key} = {name!r}: module {module!r} not found; in deployment it must "
                f"be a module in the app folder {app}, which Flower ships to the SuperNodes")
    if app not in origin.parents:
        return (f"{key} = {name!r}: {origin} is outside the app folder {app}; Flower "
                "ships only the app folder to the SuperNodes: move the module into it")
    return None


def takes_features(make: Callable) -> bool:
    """Whether a factory's signature accepts the keyword `features` (or any keyword)."""
    try:
        parameters = inspect.signature(make).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): called as before
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "features" and p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) for p in parameters)


def _call(make: Callable, train: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
          features: Features | None) -> nn.Module:
    shape = tuple(int(d) for d in input_shape)
    if takes_features(make):
        return make(shape, int(num_classes), train, features=features)
    return make(shape, int(num_classes), train)


def build_model(train: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                features: Features | None = None) -> nn.Module:
    """The model `train.model` names for one example of `input_shape` and `num_classes`
    outputs, with Opacus' fixes applied when `train.fix-model` (the same on every party).
    `features` (tables) goes to a factory that takes that keyword, and only to one.
    Raises ModelError when the factory fails or returns something else than an nn.Module."""
    make = factory(train.model)
    if isinstance(make, type) and issubclass(make, nn.Module):
        raise ModelError(f"train.model = {train.model!r}: names the class {make.__name__}; "
                         "expected a factory function (input_shape, num_outputs, train) that "
                         "returns the module")
    if features is not None and tuple(input_shape) != (len(features),):
        raise ModelError(f"train.model = {train.model!r}: the feature description has "
                         f"{len(features)} columns, the input shape is {tuple(input_shape)}")
    try:
        model = _call(make, train, input_shape, num_classes, features)
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's code: one line, what it said
        raise ModelError(f"train.model = {train.model!r}: the factory failed for input shape "
                         f"{tuple(input_shape)} and {num_classes} outputs: "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"train.model = {train.model!r}: the factory returned "
                         f"{type(model).__name__}, expected a torch.nn.Module")
    if train.fix_model:
        from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    return model


def unsupported(model: nn.Module) -> list[str]:
    """What DP-SGD cannot train in `model`, by Opacus' ModuleValidator: one text per
    layer, naming it ("layer 'body.1' (BatchNorm1d): BatchNorm cannot support training with
    differential privacy."); [] when every layer is fine."""
    from opacus.validators import ModuleValidator
    found = []
    for name, layer in model.named_modules():
        check = ModuleValidator.VALIDATORS.get(type(layer))
        for error in check(layer) if check else ():
            first = str(error).strip().split(". ")[0].rstrip(".")
            found.append(f"layer {name or 'the model'!r} ({type(layer).__name__}): {first}")
    return found


def replaced(train: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
             features: Features | None = None) -> list[str]:
    """With `train.fix-model`: which layers Opacus' fix replaced, as "name: Old → New"."""
    original = _call(factory(train.model), train, input_shape, num_classes, features)
    fixed = dict(build_model(train, input_shape, num_classes, features).named_modules())
    return [f"layer {name!r}: {type(layer).__name__} → {type(fixed[name]).__name__}"
            for name, layer in original.named_modules()
            if name in fixed and type(fixed[name]) is not type(layer)]


def check_model(train: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                features: Features | None = None, *, dp_sgd: bool = True) -> list[str]:
    """Build the model once and check that it takes the input and, where clients train it
    with DP-SGD (`dp_sgd`), that DP-SGD can train it; returns notes to show (what
    `fix-model` replaced). Raises ModelError naming the first unsupported layer and the
    fix. Without DP-SGD Opacus' validators are not consulted (nor imported: ~1 s)."""
    model = build_model(train, input_shape, num_classes, features)
    problems = unsupported(model) if dp_sgd else []
    if problems:
        raise ModelError(f"train.model = {train.model!r}: DP-SGD cannot train "
                         f"{problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                         + "; set train.fix-model = true to let Opacus replace such layers "
                         "(BatchNorm → GroupNorm), or change the model")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"train.model = {train.model!r}: the model has no trainable "
                         "parameters")
    _probe(model, train, input_shape, num_classes, features)
    changes = replaced(train, input_shape, num_classes, features) if train.fix_model else []
    return [f"train.fix-model replaced {', '.join(changes)}"] if changes else []


def _probe(model: nn.Module, train: TrainConfig, input_shape: tuple[int, ...],
           num_outputs: int, features: Features | None) -> None:
    """One forward pass on 3 made-up examples (in eval mode, no gradient, the global RNG
    untouched): the model must take (3, *input_shape), give (3, num_outputs), and give the
    first example the same output whatever the others are (DP-SGD clips per example: a
    forward pass that mixes the examples of a batch voids it). Raises ModelError (one line).
    Made-up inputs: uniform on [0, 1), with one-hot blocks where `features` has them."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.rand((3, *input_shape), generator=generator)
    if features is not None:
        for block in features.categorical:
            x[:, block.start:block.stop] = 0.0
            x[torch.arange(3), block.start + torch.arange(3) % (block.stop - block.start)] = 1.0
    other = x.clone()
    other[1:] = torch.rand((2, *input_shape), generator=generator)
    name = f"train.model = {train.model!r}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out, again = model(x), model(other)
    except Exception as error:  # noqa: BLE001 - the user's forward pass, named
        raise ModelError(f"{name}: a forward pass on a batch of shape {tuple(x.shape)} failed: "
                         f"{type(error).__name__}: {one_line(error)[:300]}"
                         ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, num_outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{name}: a batch of 3 examples gave output {shape}; expected "
                         f"(3, {num_outputs}): one " + ("output (the scaled target)"
                                                        if num_outputs == 1 else
                                                        "logit per class") + " per example")
    if not torch.allclose(out[0], again[0], rtol=1e-4, atol=1e-5):
        raise ModelError(f"{name}: the first example's output changed when the other examples "
                         "of its batch did: the forward pass mixes examples (a batch mean, "
                         "BatchNorm-like code), which per-example clipping cannot bound; "
                         "DP-SGD needs each example's output to depend on it alone")

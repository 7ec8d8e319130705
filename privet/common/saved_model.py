"""What model.pt takes and gives, saved beside it as model.json: with it a run directory alone
rebuilds the model and encodes new rows, without the data it was trained on.

The server writes model.json before round 1, once it knows the model's input (the shared
transform is fitted by then): the task, one example's shape, the number of outputs, the class
names in the order of the outputs, what each input column is (`Features`), and for tables the
label column, how numbers were written (`NumberFormat` per column), and how rows are encoded:

- `shared`: one transform for every client and the server, fitted by the server from the
  clients' noised statistics (`preprocess.fit = "federated"`); the same as transform.json;
- `public`: local fits whose options need no statistics of any row (declared bounds,
  constant fills, missing categories to `other`): every client fitted the same transform,
  known before any row is read (`federated.fit_public`);
- `per-client`: each client encoded its rows with a transform fitted on its own rows
  (`preprocess.fit = "local"`, the default at user level): no one encoding is the model's,
  and new rows are not scored (`privet.common.predict` says why, in one line);
- `none`: arrays used as they are (images, a loader's arrays).

Regression runs add the target's public scale (model outputs z, y = center + half·z). Nothing
in it is a statistic of a client's rows beyond what transform.json already holds (the shared
transform is a DP release); a `public` transform holds only declared settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from privet.common import results
from privet.common.config import ExperimentConfig, shaped
from privet.common.data.features import Features
from privet.common.data.numbers import NumberFormat
from privet.common.data.preprocess import OTHER, FittedTransform, Schema
from privet.common.data.target import TargetScale, target_scale

VERSION = 1
ENCODINGS = ("shared", "public", "per-client", "none")


@dataclass(frozen=True)
class ModelSpec:
    """model.json: everything besides the weights that scoring a row needs.

    `input_shape`: one example's shape as the model takes it ((features,) for tables,
    (channels, height, width) for images); `outputs`: the model's outputs (one per class,
    1 for regression); `classes`: class names in output order (() for regression);
    `data`: "table", "images" or "arrays" (a loader's arrays); `transform`: the
    FittedTransform JSON rows are encoded with (`encoding` shared or public; else "");
    `target`: regression's public scale."""
    task: str
    data: str
    dataset: str
    input_shape: tuple[int, ...]
    outputs: int
    classes: tuple[str, ...]
    features: Features | None = None
    label: str = ""
    formats: dict[str, NumberFormat] = field(default_factory=dict)
    encoding: str = "none"
    transform: str = ""
    target: TargetScale | None = None

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    def fitted_transform(self) -> FittedTransform | None:
        return FittedTransform.from_json(self.transform) if self.transform else None

    def to_json(self) -> str:
        return json.dumps({
            "version": VERSION, "task": self.task, "data": self.data,
            "dataset": self.dataset, "input_shape": list(self.input_shape),
            "outputs": self.outputs, "classes": list(self.classes),
            "features": json.loads(self.features.to_json()) if self.features else None,
            "label": self.label,
            "formats": {c: {"decimal": f.decimal, "thousands": f.thousands}
                        for c, f in self.formats.items()},
            "encoding": self.encoding,
            "transform": json.loads(self.transform) if self.transform else None,
            "target": self.target.as_dict() if self.target else None,
        }, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Raises ValueError (KeyError, TypeError and JSON errors included) for a file
        that is not one privet wrote."""
        raw = json.loads(text)
        if raw.get("version") != VERSION or raw.get("encoding") not in ENCODINGS:
            raise ValueError(f"version {raw.get('version')!r}, encoding "
                             f"{raw.get('encoding')!r}: not a model.json this privet reads")
        target = raw.get("target")
        return cls(
            task=str(raw["task"]), data=str(raw["data"]), dataset=str(raw["dataset"]),
            input_shape=tuple(int(v) for v in raw["input_shape"]),
            outputs=int(raw["outputs"]), classes=tuple(str(c) for c in raw["classes"]),
            features=Features.from_json(json.dumps(raw["features"]))
            if raw.get("features") else None,
            label=str(raw.get("label", "")),
            formats={c: NumberFormat(str(f["decimal"]), str(f["thousands"]))
                     for c, f in (raw.get("formats") or {}).items()},
            encoding=raw["encoding"],
            transform=json.dumps(raw["transform"]) if raw.get("transform") else "",
            target=TargetScale(float(target["low"]), float(target["high"])) if target else None)


def data_kind(cfg: ExperimentConfig) -> str:
    """"table" (privet's tabular pipeline), "images" (pixels in [0, 1]: the image datasets)
    or "arrays" (a loader's arrays, used as they are). Calls a loader (cached) to tell."""
    if cfg.data.tabular:
        return "table"
    return "arrays" if cfg.data.loader else "images"  # not a table: a loader's, or images


def schema_from_features(cfg: ExperimentConfig, features: Features) -> Schema:
    """The schema as far as a server that reads no rows knows it: the columns of a local
    fit's layout (numbers, then each vocabulary + `other`), the declared bounds."""
    from privet.common.data import adult

    numeric = tuple(features.names[i] for i in features.numeric)
    categories = {c.name: c.values[:-1] if c.values[-1:] == (OTHER,) else c.values
                  for c in features.categorical}
    bounds = dict(adult.BOUNDS) if cfg.data.dataset == "adult" else {}
    bounds.update({c: (float(p[0]), float(p[1])) for c, p in shaped(cfg.data.bounds, {}).items()
                   if isinstance(p, list) and len(p) == 2})
    return Schema(numeric, categories, label_column(cfg), (),
                  {c: b for c, b in bounds.items() if c in numeric}, {}, cfg.train.task)


def label_column(cfg: ExperimentConfig) -> str:
    """The label's column name in a table: `data.label`, or Adult's `income`."""
    from privet.common.data import adult

    if cfg.data.dataset == "adult" and not cfg.regression:
        return adult.LABEL
    return cfg.data.label


def describe(cfg: ExperimentConfig, input_shape, classes, features: Features | None,
             transform: str, schema: Schema | None) -> ModelSpec:
    """The model.json of a run about to start: `transform` is the shared transform's JSON
    ("" without one); `schema` the one the server read (None when it reads no rows: then
    what `features` says of the columns and the declared bounds)."""
    from privet.common.data import federated

    kind = data_kind(cfg)
    encoding, fitted = "none", ""
    if kind == "table":
        if transform:
            encoding, fitted = "shared", transform
        else:
            table = schema or (schema_from_features(cfg, features) if features else None)
            if table is not None and not federated.needs_statistics(table, cfg.preprocess):
                encoding = "public"
                fitted = federated.fit_public(table, cfg.preprocess).to_json()
            else:
                encoding = "per-client"
    formats = dict(schema.formats) if schema is not None else {}
    if kind == "table" and schema is None:  # declared formats only: no row was read here
        from privet.common.data.datasets import declared_format

        declared = declared_format(cfg.data)
        if declared is not None and features is not None:
            formats = {features.names[i]: declared for i in features.numeric}
    return ModelSpec(
        task=cfg.train.task, data=kind, dataset=cfg.data.dataset,
        input_shape=tuple(int(v) for v in input_shape),
        outputs=1 if cfg.regression else len(classes),
        classes=() if cfg.regression else tuple(str(c) for c in classes),
        features=features, label=label_column(cfg) if kind == "table" else "",
        formats=formats, encoding=encoding, transform=fitted, target=target_scale(cfg))


def from_data(cfg: ExperimentConfig, run_dir: Path) -> ModelSpec:
    """A run written before model.json existed: the spec rebuilt as its server built it,
    from the run's config, transform.json and the data (which must still be where the config
    says). Raises what reading the data raises (DataError, FileNotFoundError, ValueError)."""
    from privet.common.data import datasets

    path = Path(run_dir) / results.TRANSFORM
    transform = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not cfg.data.tabular:
        return describe(cfg, datasets.model_input_shape(cfg), datasets.classes(cfg), None,
                        "", None)
    test = datasets.test_data(cfg, transform)
    return describe(cfg, test.features.shape[1:], datasets.classes(cfg), test.feature_spec,
                    transform if cfg.federated_preprocessing else "", datasets.schema(cfg))


def read(run_dir: Path, cfg: ExperimentConfig) -> ModelSpec:
    """The run's model.json; for a run from before it existed, rebuilt from the data
    (`from_data`). Raises ValueError for a damaged model.json."""
    path = Path(run_dir) / results.MODEL_SPEC
    if not path.is_file():
        return from_data(cfg, run_dir)
    try:
        return ModelSpec.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: damaged or not written by privet ({error})") from None


def build(cfg: ExperimentConfig, spec: ModelSpec, run_dir: Path):
    """The run's latest global model (model.pt) as a torch nn.Module on the CPU in eval
    mode, rebuilt from `train.model` with the spec's input shape, outputs and features.
    Raises FileNotFoundError before round 1 is saved, ModelError when a user's factory
    cannot be imported or built."""
    import torch

    from privet.common.models import build_model

    saved = torch.load(Path(run_dir) / results.MODEL, map_location="cpu")
    model = build_model(cfg.train, spec.input_shape, spec.outputs, spec.features)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


EXPORT_NOTE = "privet.json"  # in an exported program's extra files: model.json and the round


def exported_by_privet(path: Path) -> bool:
    """Whether `path` is a program `privet export` wrote (a .pt2 zip holding its note)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{EXPORT_NOTE}") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def export(cfg: ExperimentConfig, spec: ModelSpec, run_dir: Path, out: Path) -> int:
    """The run's model as a torch.export ExportedProgram saved to `out` (torch.export.save;
    load with torch.export.load(out).module()): float32 (N, *input_shape) encoded rows in,
    logits (N, outputs) out (regression: the scaled target z), any N. model.json and the
    round ride along as the extra file `privet.json`, so the encoding travels with it.
    Returns the round exported. Raises FileNotFoundError before round 1 is saved,
    ModelError for a user's factory that does not import or build, RuntimeError (torch's
    own) for a model torch.export cannot trace, OSError for `out`."""
    import os
    import tempfile

    import torch

    model = build(cfg, spec, run_dir)
    round_ = int(torch.load(Path(run_dir) / results.MODEL, map_location="cpu")["round"])
    batch = torch.export.Dim("batch")
    example = torch.zeros(2, *spec.input_shape)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    note = json.dumps({"model": json.loads(spec.to_json()), "round": round_,
                       "run_dir": str(Path(run_dir).resolve()),
                       "train.model": cfg.train.model})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".pt2")
    os.close(fd)
    try:
        torch.export.save(program, tmp, extra_files={EXPORT_NOTE: note})
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return round_

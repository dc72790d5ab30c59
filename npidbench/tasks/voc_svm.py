"""VOC07 SVM and low-shot SVM (PROTOCOLS.md "VOC07 SVM", "VOC07 low-shot SVM").

One family, three presets: ``voc-svm`` (the full SVM on every layer, the best layer, then
low-shot on it: the whole row of the table), ``voc-svm-full`` and ``voc-lowshot``. Features come
from a checkpoint (squash-resized images, Feature1..5) or from ``--features-dir``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npidbench.atomic import atomic_write_text
from npidbench.backbones import Backbone
from npidbench.backbones.resnet import FEATURE_LAYERS
from npidbench.config import check_choices, config_to_dict
from npidbench.data import load_split
from npidbench.data.images import EvalTransform
from npidbench.errors import BadInput
from npidbench.features_dir import LabelConvention, read_features_dir
from npidbench.progress import log, make_progress
from npidbench.solvers.voc_svm import (
    LOWSHOT_KS,
    CostListName,
    LayerResult,
    Method,
    Selection,
    SolverName,
    TrainKernel,
    cost_list,
    full_svm,
    lowshot_svm,
)
from npidbench.tables import TableSpec, npid_reference
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput

NAME = "voc-svm"
PARTS = ("full", "lowshot")
PROTOCOL = "voc07-svm"


# The solver is part of how a number was made (both reach liblinear's objective; benchmarks/).
SOLVERS: dict[SolverName, str] = {
    "batched": "npidbench batched truncated-Newton in the eigenbasis of the trainval Gram matrix "
    "(N <= D + 1) or of the feature covariance (N > D + 1; each layer's record names its method), "
    "every class x cost x fold at once",
    "sklearn": "sklearn LinearSVC (liblinear, dual), one fit per class x cost x fold",
}


@dataclass(frozen=True)
class Config:
    parts: tuple[str, ...] = PARTS
    layers: tuple[str, ...] = FEATURE_LAYERS
    costs: CostListName = "mms"  # cost list: mms (default), fair or vissl
    solver: SolverName = "batched"  # batched, or sklearn: the anchors' LinearSVC one fit at a time
    method: Method = "auto"  # batched solver's basis: gram (N x N), primal (D x D), auto by size
    jobs: int = 1  # sklearn solver: parallel processes (1 = the anchors' way)
    folds: int = 3
    lowshot_ks: tuple[int, ...] = LOWSHOT_KS
    lowshot_samples: int = 5
    seed: int = 0  # low-shot draws; the anchors set none
    lowshot_layer: str = (
        "auto"  # auto: the best layer (this run, else the latest full-SVM record), else Feature5
    )
    selection: Selection = "test"  # test: published (test-selected) choices; heldout: chosen on trainval
    labels: LabelConvention = "fair"  # --features-dir label convention: fair (1/0/-1) or voc (1/-1/0)
    resize: int = 256  # short side 256, then squashed to size x size (no crop)
    size: int = 224

    def __post_init__(self) -> None:
        check_choices(self)  # the Literal fields, also when built in Python
        if not self.parts or any(p not in PARTS for p in self.parts):
            raise ValueError(f"parts must be a list of {', '.join(PARTS)}, got {list(self.parts)}")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.jobs < 1 or self.lowshot_samples < 1:
            raise ValueError("jobs and lowshot_samples must be at least 1")
        if not self.lowshot_ks or any(k < 1 for k in self.lowshot_ks):
            raise ValueError(f"lowshot_ks must be positive integers, got {list(self.lowshot_ks)}")
        # The names are the backbone's (checked when it is loaded) or a features directory's.
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct layer names, got {list(self.layers)}")
        if self.resize < 1 or self.size < 1:
            raise ValueError("resize and size must be at least 1 pixel")


@dataclass
class _Inputs:
    """Features per layer (loaded lazily) and labels in VOC's convention, from either source."""

    train_labels: np.ndarray
    test_labels: np.ndarray
    layers: list[str]
    dataset: dict[str, Any]
    model: dict[str, Any] | None
    source: Any

    def features(self, split: str, layer: str) -> np.ndarray:
        return self.source(split, layer)

    def arrays(self, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the solvers take: trainval features and labels, test features and labels."""
        return (
            self.features("trainval", layer),
            self.train_labels,
            self.features("test", layer),
            self.test_labels,
        )


def _from_features_dir(ctx: RunContext, config: Config, layers: list[str] | None) -> _Inputs:
    fdir = read_features_dir(ctx.features_dir, config.labels, layers)  # type: ignore[arg-type]
    return _Inputs(
        train_labels=fdir.train_labels,
        test_labels=fdir.test_labels,
        layers=fdir.layers,
        dataset={
            "name": "voc07",
            "display": f"features from {fdir.root}",
            "synthetic": False,
            "root": str(fdir.root),
            "fingerprint": fdir.sha256,
            "train": {"split": "trainval", "images": len(fdir.train_labels)},
            "test": {"split": "test", "images": len(fdir.test_labels)},
            "classes": fdir.train_labels.shape[1],
            "label_convention": config.labels,
        },
        model={
            "name": fdir.root.name or str(fdir.root),
            "config": "-",
            "sha256": fdir.sha256,
            "branch": "",
            "features_dir": str(fdir.root),
            "files": fdir.files,
        },
        source=fdir.features,
    )


def _from_checkpoint(ctx: RunContext, config: Config, layers: list[str]) -> _Inputs:
    train = load_split(ctx.preset.dataset, "trainval", ctx.data_root)
    test = load_split(ctx.preset.dataset, "test", ctx.data_root)
    if train.label_matrix is None or test.label_matrix is None:
        raise BadInput(f"{train.root} has no classification labels")
    transform = EvalTransform(config.resize, config.size, "squash", ctx.model.backbone.interpolation)
    cached: dict[str, Any] = {}
    for split, part in (("trainval", train), ("test", test)):
        feats = ctx.features(part, transform, layers)
        for layer, entry in feats.items():
            if entry.skipped:
                raise BadInput(
                    f"{len(entry.skipped)} unreadable images in {part.root}: the SVM protocol needs every image"
                )
            cached[(split, layer)] = entry.features
    return _Inputs(
        train_labels=train.label_matrix,
        test_labels=test.label_matrix,
        layers=layers,
        dataset={
            "name": ctx.preset.dataset,
            "display": train.display_name,
            "synthetic": train.synthetic,
            "root": str(train.root),
            "fingerprint": f"{train.fingerprint}:{test.fingerprint}",
            "train": {"split": "trainval", "images": len(train)},
            "test": {"split": "test", "images": len(test)},
            "classes": train.label_matrix.shape[1],
            "label_source": train.label_source,
        },
        model=None,
        source=lambda split, layer: cached[(split, layer)],
    )


def _previous_best_layer(ctx: RunContext, model_sha: str, fingerprint: str) -> str | None:
    """The best layer of the latest full-SVM record for the same features and data."""
    found = None
    for record in ctx.previous_records():
        best = record.get("metrics", {}).get("best_layer")
        if (
            record.get("family") == NAME
            and best
            and record.get("model", {}).get("sha256") == model_sha
            and record.get("dataset", {}).get("fingerprint") == fingerprint
        ):
            found = best  # records come oldest first: the last match is the latest
    return found


def _model_sha(ctx: RunContext, inputs: _Inputs) -> str:
    return inputs.model["sha256"] if inputs.model else ctx.model.sha256


def _explicit_layer(config: Config, known: Sequence[str]) -> str | None:
    """lowshot_layer in the spelling of ``known`` (names match case-insensitively, as layers=
    does); None for auto. A name ``known`` lacks is returned as given, for the caller to refuse."""
    if config.lowshot_layer == "auto":
        return None
    return _spelled(known).get(config.lowshot_layer.lower(), config.lowshot_layer)


def _spelled(known: Sequence[str]) -> dict[str, str]:
    return {name.lower(): name for name in known}


def _load_inputs(ctx: RunContext, config: Config) -> _Inputs:
    if ctx.features_dir is not None:
        return _from_features_dir(ctx, config, None)  # every layer the directory has
    # One forward pass yields every layer: a low-shot run whose layer is only known from a
    # previous record extracts them all (and a later full SVM finds them cached).
    backbone = ctx.model.backbone
    explicit = _explicit_layer(config, list(backbone.layers()))
    if explicit is not None and explicit not in backbone.layers():
        raise BadInput(
            f"lowshot_layer={explicit} is not a layer of {backbone.arch}; choose auto or one of "
            f"{', '.join(backbone.layers())}"
        )
    layers = (
        [explicit] if explicit is not None and "full" not in config.parts else _svm_layers(config, backbone)
    )
    return _from_checkpoint(ctx, config, layers)


def _svm_layers(config: Config, backbone: Backbone) -> list[str]:
    """The layers of the full SVM: the setting, where the default ResNet names stand for the
    backbone's own multi-layer features (a ViT's four evenly spaced blocks)."""
    if config.layers == FEATURE_LAYERS and backbone.family != "resnet":
        return list(backbone.feature_layers)
    # names match case-insensitively, as the linear probes' layers= does; the record keeps the
    # backbone's own spelling
    spelled = _spelled(list(backbone.layers()))
    layers = [spelled.get(name.lower(), name) for name in config.layers]
    backbone.check_layers(layers)
    return layers


def run(ctx: RunContext, config: Config) -> TaskOutput:
    costs = cost_list(config.costs)
    inputs = _load_inputs(ctx, config)
    _check_labels(inputs)
    metrics: dict[str, Any] = {"selection": config.selection, "cost_list": config.costs}
    best: str | None = None
    kernel: TrainKernel | None = None
    partial: _PartialLayers | None = None
    if "full" in config.parts:
        partial = _PartialLayers(ctx, config, _model_sha(ctx, inputs), inputs.dataset["fingerprint"], costs)
        full, best, kernel = _run_full(ctx, config, inputs, costs, partial)
        metrics.update(full)
    seeds: list[int] = []
    if "lowshot" in config.parts:
        layer, layer_from = _lowshot_layer(ctx, config, inputs, best)
        inputs = _with_layer(ctx, config, inputs, layer)
        low_kernel = kernel if layer == best else None
        metrics["lowshot"] = _run_lowshot(ctx, config, inputs, costs, layer, layer_from, low_kernel)
        seeds = [config.seed]
    if partial is not None:
        partial.clear()  # the record holds it all now
    return TaskOutput(
        metrics=metrics,
        dataset=inputs.dataset,
        protocol=PROTOCOL,
        seeds=seeds,
        details={"costs": costs, "solver": SOLVERS[config.solver], **_protocol_note(ctx)},
        model=inputs.model,
    )


def _protocol_note(ctx: RunContext) -> dict[str, str]:
    """The published SVM protocols are for ResNets (PROTOCOLS-ARCH.md section 2: none for ViTs):
    a record of another backbone says which features stood in for Feature1..5."""
    if ctx.backbone is None or ctx.model.backbone.family == "resnet":
        return {}
    backbone = ctx.model.backbone
    return {
        "layers": list(backbone.feature_layers),  # what stood in for the configured Feature1..5
        "protocol_note": f"no published VOC07 SVM protocol for {backbone.family} backbones; the layers "
        f"are {', '.join(backbone.feature_layers)} ({backbone.arch}), best layer chosen as for ResNets",
    }


def _run_full(
    ctx: RunContext, config: Config, inputs: _Inputs, costs: list[float], partial: _PartialLayers
) -> tuple[dict[str, Any], str, TrainKernel | None]:
    """The full SVM on every layer (finished ones kept from an interrupted run): the metrics'
    layers, best_layer and svm, the best layer, and its trainval kernel when low-shot follows."""
    summaries: dict[str, dict[str, Any]] = {}
    kernels: dict[str, TrainKernel] = {}

    # Best layer: the published protocol takes the highest test mAP; heldout takes the
    # highest mean cross-validated AP, which never looks at the test set.
    def key(name: str) -> float:
        return float(summaries[name]["mAP" if config.selection == "test" else "cv_map"])

    for layer in inputs.layers:
        saved = partial.load(layer)
        if saved is not None:
            summaries[layer] = saved
            log(f"  {layer}: mAP {saved['mAP']:.2f} (kept from an interrupted run)")
            continue
        result = _full_layer(ctx, config, inputs, layer, costs)
        summaries[layer] = result.summary()
        partial.save(layer, summaries[layer])
        log(f"  {layer}: mAP {result.map:.2f} ({result.seconds:.1f} s)")
        # Keep only the best layer's trainval kernel so far: low-shot reuses it.
        if result.kernel is not None and max(summaries, key=key) == layer:
            kernels = {layer: result.kernel}
    best = max(summaries, key=key)
    return {"layers": summaries, "best_layer": best, "svm": summaries[best]["mAP"]}, best, kernels.get(best)


def _full_layer(
    ctx: RunContext, config: Config, inputs: _Inputs, layer: str, costs: list[float]
) -> LayerResult:
    log(f"VOC07 SVM {layer}: {train_dims(inputs, layer)} dims, {len(costs)} costs, solver {config.solver}")
    with make_progress("cost") as bar:
        # the batched solver reports each cost of the path; sklearn reports at the end
        task = bar.add_task(f"SVM {layer}", total=len(costs))
        result = full_svm(
            *inputs.arrays(layer),
            costs,
            solver=config.solver,
            folds=config.folds,
            device=ctx.extract.device,
            jobs=config.jobs,
            keep_kernel="lowshot" in config.parts,
            method=config.method,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    return result


def _lowshot_layer(ctx: RunContext, config: Config, inputs: _Inputs, best: str | None) -> tuple[str, str]:
    """The low-shot layer and where it came from: the explicit lowshot_layer, else this run's
    best layer, else the latest full-SVM record's, else a features directory's only layer, else
    Feature5."""
    known = inputs.layers if ctx.features_dir is not None else list(ctx.model.backbone.layers())
    explicit = _explicit_layer(config, known)
    layer = (
        explicit or best or _previous_best_layer(ctx, _model_sha(ctx, inputs), inputs.dataset["fingerprint"])
    )
    if layer is None and ctx.features_dir is not None and len(inputs.layers) == 1:
        layer = inputs.layers[0]
    deepest = "Feature5" if ctx.features_dir is not None else ctx.model.backbone.feature_layers[-1]
    layer_from = "explicit" if explicit else ("this run" if best else f"previous record or {deepest}")
    return layer or deepest, layer_from


def _with_layer(ctx: RunContext, config: Config, inputs: _Inputs, layer: str) -> _Inputs:
    """``inputs``, or the checkpoint's features of ``layer`` when they lack it."""
    if layer in inputs.layers:
        return inputs
    if ctx.features_dir is not None:
        raise BadInput(
            f"{ctx.features_dir} has no layer {layer}; set lowshot_layer to one of {inputs.layers}"
        )
    return _from_checkpoint(ctx, config, [layer])


def _run_lowshot(
    ctx: RunContext,
    config: Config,
    inputs: _Inputs,
    costs: list[float],
    layer: str,
    layer_from: str,
    kernel: TrainKernel | None,
) -> dict[str, Any]:
    """The low-shot SVM on ``layer``: the metrics' lowshot part."""
    log(f"VOC07 low-shot SVM on {layer}: k = {list(config.lowshot_ks)}, {config.lowshot_samples} samples")
    try:
        with make_progress("k") as bar:
            task = bar.add_task(f"low-shot {layer}", total=len(config.lowshot_ks))
            low = lowshot_svm(
                *inputs.arrays(layer),
                costs,
                layer=layer,
                ks=config.lowshot_ks,
                samples=config.lowshot_samples,
                seed=config.seed,
                selection=config.selection,
                solver=config.solver,
                device=ctx.extract.device,
                jobs=config.jobs,
                kernel=kernel,
                progress=lambda _message: bar.advance(task),
            )
    except ValueError as exc:  # too few positives / negatives for a k
        raise BadInput(f"{exc}: lower it with --set lowshot_ks=[...]") from exc
    return {
        "layer": layer,
        "layer_from": layer_from,
        "selection": config.selection,
        "seed": config.seed,
        "k": low.summary(),
        "seconds": round(low.seconds, 2),
        **low.stats,
    }


class _PartialLayers:
    """Finished layers of a full SVM run, saved atomically as they complete, so that an
    interrupted run (the sklearn solver takes hours) resumes at the next layer. Keyed by the
    features' identity, the data, the solver settings and the cost list; removed when the run
    completes."""

    def __init__(
        self, ctx: RunContext, config: Config, model_sha: str, fingerprint: str, costs: list[float]
    ) -> None:
        settings = {k: v for k, v in config_to_dict(config).items() if k in _FULL_SVM_SETTINGS}
        identity = json.dumps([model_sha, fingerprint, settings, costs], sort_keys=True)
        self.folder = ctx.cache.root / "voc-svm-partial" / hashlib.sha256(identity.encode()).hexdigest()[:24]

    def load(self, layer: str) -> dict[str, Any] | None:
        path = self.folder / f"{layer}.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None  # a damaged file is recomputed

    def save(self, layer: str, summary: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / f"{layer}.json", json.dumps(summary))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


_FULL_SVM_SETTINGS = {"costs", "solver", "folds", "resize", "size", "labels"}


def train_dims(inputs: _Inputs, layer: str) -> int:
    return int(inputs.features("trainval", layer).shape[1])


def _check_labels(inputs: _Inputs) -> None:
    for name, labels in (("trainval", inputs.train_labels), ("test", inputs.test_labels)):
        missing = np.flatnonzero(~(labels == 1).any(axis=0))
        if len(missing):
            raise BadInput(
                f"{name} labels: class {int(missing[0])} has no positive image; the SVM needs some"
            )


LOWSHOT_COLUMNS = tuple(f"k={k}" for k in LOWSHOT_KS)


def _table_values(record: dict[str, Any]) -> dict[str, Any]:
    """voc-svm-full fills Best Layer and SVM, voc-lowshot the k columns, voc-svm all of them."""
    metrics = record["metrics"]
    values: dict[str, Any] = {"Best Layer": metrics.get("best_layer"), "SVM": metrics.get("svm")}
    per_k = metrics.get("lowshot", {}).get("k", {})
    for column in LOWSHOT_COLUMNS:
        values[column] = per_k.get(column[2:], {}).get("mean")
    return values


TABLE = TableSpec(
    key="voc-svm",
    title="SVM / Low-shot SVM",
    columns=("Best Layer", "SVM", *LOWSHOT_COLUMNS),
    values=_table_values,
    default_protocol=PROTOCOL,
    seeded=frozenset(LOWSHOT_COLUMNS),
    references={
        "voc07": [
            npid_reference(
                ("Best Layer", "SVM", *LOWSHOT_COLUMNS),
                ("feature5", 76.75, 26.96, 35.37, 44.48, 53.89, 60.39, 66.41, 71.48, 73.39),
            )
        ]
    },
)
FAMILY = TaskFamily(
    name=NAME,
    description="VOC07 linear SVM per layer (3-fold CV cost choice) and low-shot SVM, k = 1..96",
    config=Config,
    run=run,
    tables=(TABLE,),
    datasets=("voc07",),
    accepts_features_dir=True,
)

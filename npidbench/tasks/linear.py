"""Linear probes on Feature1..5 + AvgPool of a frozen backbone (PROTOCOLS.md "Linear probes").

Two parts, as the anchors run them: the five FeatureN heads (BN without affine + Linear) trained
together on one forward pass per batch (mmselfsup's multi-head protocol, last epoch reported),
and the AvgPool head as its own run with its own augmentation and optimiser (MoCo's protocol:
lr 30, no weight decay, best epoch reported). ``mode=cached`` trains the same heads on features
extracted once with the test transform (no augmentation): much faster, a different protocol,
and named so in the record and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npidbench.backbones import Backbone
from npidbench.config import check_choices
from npidbench.data import load_split
from npidbench.data.images import EvalTransform
from npidbench.data.splits import DatasetSplit
from npidbench.distributed import DistInfo, check_global_batch, current_world, prepare_for_training
from npidbench.errors import BadInput
from npidbench.precision import autocast, precision_name
from npidbench.solvers.linear import HeadSet, build_heads, topk_correct
from npidbench.tables import TableSpec, npid_reference
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput, run_identity, split_record
from npidbench.training.augment import Augmentation, TrainAugment, TrainImages
from npidbench.training.batches import augmented_batches, row_batches, training_input
from npidbench.training.evaluate import forward_on, topk_accuracy
from npidbench.training.loop import ResumeState, StepResult, StepSchedule, fit, scaled_lr

PARTS = ("features", "avgpool")
Mode = Literal["augmented", "cached"]
PROTOCOLS = {"augmented": "linear-mhead", "cached": "linear-cached"}


@dataclass(frozen=True)
class Config:
    parts: tuple[str, ...] = PARTS
    mode: Mode = "augmented"  # cached: heads on features extracted once, no augmentation
    # Which layers to probe (and, cached, to extract and store), e.g. [Feature5, AvgPool]; names
    # match case-insensitively. Empty: every layer of the parts (Feature1..5 and AvgPool).
    layers: tuple[str, ...] = ()
    batch_size: int = 256  # global batch; lrs below are for 256 and scaled linearly
    seed: int = 0
    resize: int = 256  # test transform: short side 256, center crop 224
    crop: int = 224
    train_resize: int = 256  # places augmentation: resize and center crop before the random crop
    train_split: str = "train"
    test_split: str = "val"
    momentum: float = 0.9
    gamma: float = 0.1
    # FeatureN heads (mmselfsup 0.x multi-head protocol; ImageNet: 90 epochs, steps 30/60)
    features_epochs: int = 90
    features_milestones: tuple[int, ...] = (30, 60)
    features_lr: float = 0.01
    features_weight_decay: float = 1e-4
    features_nesterov: bool = True
    features_augment: Augmentation = "rrc-jitter-lighting"
    color_jitter: float = 0.4
    lighting: float = 0.1
    # AvgPool head (MoCo protocol: lr 30, wd 0, 100 epochs, steps 60/80, best epoch)
    avgpool_epochs: int = 100
    avgpool_milestones: tuple[int, ...] = (60, 80)
    avgpool_lr: float = 30.0
    avgpool_weight_decay: float = 0.0
    avgpool_augment: Augmentation = "rrc"
    avgpool_eval_every: int = 1
    amp: bool = True  # bf16 autocast of the frozen forward on CUDA (recorded); false: fp32

    def __post_init__(self) -> None:
        check_choices(self)  # the Literal fields, also when built in Python
        if (
            not self.parts
            or any(p not in PARTS for p in self.parts)
            or len(set(self.parts)) != len(self.parts)
        ):
            raise ValueError(f"parts must be some of {', '.join(PARTS)}, got {list(self.parts)}")
        if self.batch_size < 1 or self.features_epochs < 1 or self.avgpool_epochs < 1:
            raise ValueError("batch_size, features_epochs and avgpool_epochs must be at least 1")
        if min(self.features_lr, self.avgpool_lr) <= 0:
            raise ValueError("learning rates must be positive")
        if min(self.features_weight_decay, self.avgpool_weight_decay, self.momentum) < 0:
            raise ValueError("weight decay and momentum cannot be negative")
        if not (1 <= self.crop <= self.resize) or self.train_resize < self.crop:
            raise ValueError(f"need 1 <= crop <= resize and train_resize >= crop, got crop {self.crop}")
        if self.avgpool_eval_every < 1:
            raise ValueError("avgpool_eval_every must be at least 1")
        if len({name.lower() for name in self.layers}) != len(self.layers):
            raise ValueError(f"layers must be distinct layer names, got {list(self.layers)}")

    def probed(self, backbone: Backbone) -> dict[str, tuple[str, ...]]:
        """{part: the layers its heads probe}: every layer of each part, or those of ``layers``;
        a part left with none is not run. Raises BadInput for a name no part has."""
        offered = {name: self._part_layers(name, backbone) for name in self.parts}
        if not self.layers:
            return offered
        known = {layer.lower(): layer for layers in offered.values() for layer in layers}
        unknown = [name for name in self.layers if name.lower() not in known]
        if unknown:
            raise BadInput(
                f"--set layers: {', '.join(unknown)} is not a layer of parts={','.join(self.parts)} "
                f"on {backbone.arch}; choose from {', '.join(known.values())}"
            )
        wanted = {known[name.lower()] for name in self.layers}
        chosen = {
            name: tuple(layer for layer in layers if layer in wanted) for name, layers in offered.items()
        }
        return {name: layers for name, layers in chosen.items() if layers}

    def _part_layers(self, name: str, backbone: Backbone) -> tuple[str, ...]:
        return backbone.feature_layers if name == "features" else (backbone.default_layer,)

    def part(self, name: str, backbone: Backbone, layers: tuple[str, ...] | None = None) -> _Part:
        """The ``features`` part trains a head per multi-layer feature of ``backbone``
        (Feature1..5 of a ResNet), the ``avgpool`` part one on its global feature; ``layers``:
        only those of them (``probed``)."""
        layers = layers or self._part_layers(name, backbone)
        if name == "features":
            augment = TrainAugment(
                self.features_augment, self.crop, self.train_resize, self.color_jitter, self.lighting
            )
            return _Part(
                name,
                layers,
                StepSchedule(self.features_epochs, self.features_milestones, self.gamma),
                self.features_lr,
                self.features_weight_decay,
                self.features_nesterov,
                augment,
                eval_every=self.features_epochs,  # reported at the last epoch
            )
        augment = TrainAugment(self.avgpool_augment, self.crop, self.train_resize, 0.0, 0.0)
        return _Part(
            name,
            layers,
            StepSchedule(self.avgpool_epochs, self.avgpool_milestones, self.gamma),
            self.avgpool_lr,
            self.avgpool_weight_decay,
            False,
            augment,
            eval_every=self.avgpool_eval_every,
        )


@dataclass(frozen=True)
class _Part:
    name: str
    layers: tuple[str, ...]
    schedule: StepSchedule
    lr: float
    weight_decay: float
    nesterov: bool
    augment: TrainAugment
    eval_every: int

    def evaluate_at(self, epoch: int) -> bool:
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.schedule.epochs


def classification_splits(ctx: RunContext, config: Any) -> tuple[DatasetSplit, DatasetSplit]:
    """(train, test) of the preset's dataset by ``config.train_split`` / ``test_split``; a test
    split with classes the training split lacks is refused."""
    train = load_split(ctx.preset.dataset, config.train_split, ctx.data_root)
    test = load_split(ctx.preset.dataset, config.test_split, ctx.data_root)
    if len(test.classes) > len(train.classes):
        raise BadInput(f"{test.root} {config.test_split} has more classes than {config.train_split}")
    return train, test


def run(ctx: RunContext, config: Config) -> TaskOutput:
    dataset = ctx.preset.dataset
    train, test = classification_splits(ctx, config)
    world = current_world(ctx.extract.device)
    check_global_batch(config.batch_size, world)
    probe = Probe(ctx, config, train, test, world)
    probed = config.probed(probe.backbone)  # --set layers=...: only those are extracted and probed
    if config.mode == "cached":  # one forward pass for every part's layers; the parts then hit the cache
        layers = tuple(layer for name in probed for layer in probed[name])
        for split in (train, test):
            ctx.features(split, probe.test_transform, layers)
    states, histories, metrics = [], {}, {"top1": {}, "top5": {}}
    for name in probed:
        part = config.part(name, probe.backbone, probed[name])
        identity = run_identity(ctx, config, world.world_size, part=part.name, data=train.fingerprint)
        state = ResumeState(ctx.cache.root, identity, world)
        history = _train_part(probe, part, state)
        histories[name] = history
        states.append(state)
        chosen = _reported(part, history)
        if name == "avgpool":
            metrics["avgpool_best_epoch"] = chosen["epoch"]
        for layer in part.layers:
            metrics["top1"][layer] = chosen["eval"][layer]["top1"]
            metrics["top5"][layer] = chosen["eval"][layer]["top5"]
    for state in states:
        state.clear()
    return TaskOutput(
        metrics=metrics,
        dataset=split_record(dataset, train, test),
        protocol=PROTOCOLS[config.mode],
        seeds=[config.seed],
        details={
            # cached features come from the fp32 extractor (npidbench.features); their storage
            # dtype (--cache-dtype) is the record's details.cache_dtype
            "precision": precision_name(ctx.extract.device, config.amp and config.mode == "augmented"),
            "history": histories,
            "global_batch": config.batch_size,
            "lr_scaled": {
                name: scaled_lr(config.part(name, probe.backbone).lr, config.batch_size) for name in probed
            },
            "layers": [layer for name in probed for layer in probed[name]],
        },
    )


def _reported(part: _Part, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The history line a part reports: mmselfsup reports the last epoch of the multi-head run,
    MoCo the best epoch of the AvgPool run."""
    evaluated = [line for line in history if "eval" in line]
    if part.name == "features":
        return evaluated[-1]
    return max(evaluated, key=lambda line: line["eval"]["AvgPool"]["top1"])


@dataclass(frozen=True)
class Probe:
    """What the heads of one linear run share: the context, the settings (``seed``, ``amp``,
    ``batch_size``, ``resize``, ``crop``), the splits, the world."""

    ctx: RunContext
    config: Any
    train: DatasetSplit
    test: DatasetSplit
    world: DistInfo
    interpolation: str | None = None  # the test resize; None: the backbone's framework's

    @property
    def device(self) -> torch.device:
        return torch.device(self.world.device)

    @property
    def backbone(self) -> Backbone:
        return self.ctx.model.backbone

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.world.world_size

    @property
    def test_transform(self) -> EvalTransform:
        # the backbone's framework resize: bilinear for ResNets, bicubic for ViT / ConvNeXt
        interpolation = self.interpolation or self.backbone.interpolation
        return EvalTransform(self.config.resize, self.config.crop, "center-crop", interpolation)


Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Source:
    """Where a probe's head inputs come from: ``batches(epoch)``, ``inputs(batch)`` -> (features,
    labels) of a training batch, ``test()`` -> the test split's, ``size`` images per epoch."""

    batches: Callable[[int], Iterable[Any]]
    inputs: Callable[[Any], tuple[Features, torch.Tensor]]
    test: Callable[[], Iterator[tuple[Features, torch.Tensor]]]
    size: int


def augmented_source(
    probe: Probe, layers: tuple[str, ...], augment: TrainAugment, *, drop_last: bool = False
) -> Source:
    """Augmented training images through the frozen backbone at every step (the protocol):
    ``layers`` of each batch and of the test split."""
    ctx, config, device = probe.ctx, probe.config, probe.device
    extractor = frozen_extractor(probe.backbone, layers, device)
    images = TrainImages(probe.train, augment, config.seed)
    imagenet_norm = ctx.model.input_normalised  # False: [0, 1] pixels (SimCLR v1)

    def inputs(batch) -> tuple[Features, torch.Tensor]:
        with torch.no_grad(), autocast(device, config.amp):
            features = extractor(training_input(batch, device, imagenet_norm=imagenet_norm))
        return _float(features), batch.labels.to(device)

    def test() -> Iterator[tuple[Features, torch.Tensor]]:
        outputs = forward_on(
            extractor,
            probe.test,
            probe.test_transform,
            probe.world,
            ctx.extract,
            config.amp,
            imagenet_norm=imagenet_norm,
        )
        return ((_float(features), labels) for features, labels in outputs)

    batches = augmented_batches(
        images, probe.world, probe.local_batch, ctx.extract.workers, device, drop_last=drop_last
    )
    return Source(batches, inputs, test, len(probe.train))


def _cached_source(probe: Probe, part: _Part) -> Source:
    """Rows of the features extracted once with the test transform (``mode=cached``)."""
    world, device = probe.world, probe.device
    train_x, train_y = _cached(probe.ctx, probe.train, probe.test_transform, part.layers)
    test_x, test_y = _cached(probe.ctx, probe.test, probe.test_transform, part.layers)

    def inputs(rows: torch.Tensor) -> tuple[Features, torch.Tensor]:
        return _rows(train_x, rows, device), train_y[rows].to(device)

    def test() -> Iterator[tuple[Features, torch.Tensor]]:
        shard = torch.arange(world.rank, len(test_y), world.world_size)
        for rows in shard.split(probe.ctx.extract.batch_size):
            yield _rows(test_x, rows, device), test_y[rows].to(device)

    batches = row_batches(len(train_y), world, probe.local_batch, probe.config.seed)
    return Source(batches, inputs, test, len(train_y))


def _train_part(probe: Probe, part: _Part, state: ResumeState) -> list[dict[str, Any]]:
    config = probe.config
    lr = scaled_lr(part.lr, config.batch_size)
    torch.manual_seed(config.seed)  # the heads' initial weights
    heads, trainable = prepare_for_training(
        frozen_heads_for(probe.backbone, len(probe.train.classes), part.layers),
        probe.world,
        sync_bn=False,
        channels_last=False,
    )
    # The heads hold Linear layers only (BN has no affine): weight decay applies to all of them.
    optimizer = sgd(heads.parameters(), lr, config.momentum, part.nesterov, part.weight_decay)
    if config.mode == "augmented":
        source = augmented_source(probe, part.layers, part.augment)
    else:
        source = _cached_source(probe, part)
    shown = part.layers[-1]

    def step(batch) -> StepResult:
        features, labels = source.inputs(batch)
        logits = trainable(features)
        loss = sum(F.cross_entropy(out, labels) for out in logits.values())
        return StepResult(loss, len(labels), topk_correct(logits[shown].detach(), labels, (1,))[1])

    def evaluate() -> dict[str, Any]:
        outputs = ((heads(features).values(), labels) for features, labels in source.test())
        return topk_accuracy(heads, outputs, part.layers, probe.world)

    return fit(
        label=f"linear {part.name}" + (" (cached)" if config.mode == "cached" else ""),
        trainable=heads,
        optimizer=optimizer,
        base_lrs=[lr],
        schedule=part.schedule,
        batches=source.batches,
        step=step,
        evaluate=evaluate,
        evaluate_at=part.evaluate_at,
        state=state,
        world=probe.world,
        images_per_epoch=source.size,
    )


def sgd(params, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    """SGD with torch's fused kernel: the five heads hold 44M parameters for 1000 classes
    (ResNet-50), and the fused update is about 8x faster than the per-tensor loop on a CPU
    (benchmarks/linear_heads.py), which keeps the multi-head probe close to a single head."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, fused=True
    )


def frozen_extractor(backbone: Backbone, layers: tuple[str, ...], device: torch.device) -> nn.Module:
    """The backbone in eval mode (BN statistics frozen) without gradients: one forward pass
    yields every head's input."""
    extractor = backbone.extractor(layers).to(device).eval()
    for param in extractor.parameters():
        param.requires_grad_(False)
    return extractor.to(memory_format=torch.channels_last)


def _float(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.float() for name, value in features.items()}


def _cached(
    ctx: RunContext, split: DatasetSplit, transform: EvalTransform, layers: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Cached features (memory-mapped) of the readable images and their labels."""
    entries = ctx.features(split, transform, layers)
    first = entries[layers[0]]
    keep = first.valid if first.skipped else slice(None)
    arrays = {name: np.asarray(entry.features)[keep] for name, entry in entries.items()}
    return arrays, torch.from_numpy(np.asarray(first.labels)[keep].astype(np.int64))


def _rows(arrays: dict[str, np.ndarray], rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's rows as float32 on ``device`` (rows of a float16 cache upcast here, per batch)."""
    index = rows.numpy()
    return {
        name: torch.from_numpy(np.ascontiguousarray(a[index])).to(device=device, dtype=torch.float32)
        for name, a in arrays.items()
    }


def frozen_heads_for(backbone: Backbone, classes: int, layers: tuple[str, ...] | None = None) -> HeadSet:
    """The heads a probe of ``backbone`` trains on ``layers`` (default: its multi-layer features;
    the probe builds them here; tests and benchmarks read their sizes)."""
    exposed = backbone.layers()
    return build_heads([exposed[name] for name in layers or backbone.feature_layers], classes)


LINEAR_COLUMNS = ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool")


def _table_values(record: dict[str, Any]) -> dict[str, float | None]:
    """Top-1 per head: the features part fills Feature1..5, the avgpool part AvgPool."""
    top1 = record["metrics"].get("top1", {})
    return {column: top1.get(column) for column in LINEAR_COLUMNS}


TABLE = TableSpec(
    key="linear",
    title="Linear Evaluation",
    columns=LINEAR_COLUMNS,
    values=_table_values,
    default_protocol=PROTOCOLS["augmented"],
    references={
        "imagenet": [npid_reference(LINEAR_COLUMNS, (14.68, 31.98, 42.85, 56.95, 58.41, 57.97))],
        "places205": [npid_reference(LINEAR_COLUMNS[:5], (19.98, 34.86, 41.59, 48.43, 48.71))],
    },
)


def _check_layers(config: Config, backbone: Backbone) -> str | None:
    """--set layers names a layer no part has: refused before any work (one line, exit 2)."""
    try:
        config.probed(backbone)
    except BadInput as exc:
        return str(exc)
    return None


FAMILY = TaskFamily(
    name="linear",
    description="Linear probes: Feature1..5 heads in one pass + the AvgPool head; top-1/top-5",
    config=Config,
    run=run,
    tables=(TABLE,),
    datasets=("imagenet", "places205", "inat18"),
    protocol_keys=("mode",),  # named by the protocol ("linear-cached"), not repeated as a variant
    backbone_check=_check_layers,
)

"""Object detection transfer: Faster R-CNN C4 on VOC07+12 and Mask R-CNN FPN on COCO
(PROTOCOLS.md "Detection"; MoCo's detectron2 configs, mmdetection), torchvision backend.

The whole network fine-tunes (every stage and BN; SyncBN under torchrun on GPUs) with SGD
(no weight decay on norm layers where the protocol's trainer has none: ``norm_weight_decay``)
for a fixed number of iterations, or for ``epochs`` over the training images the reference
trainer keeps (mmdetection's epoch schedule; the iterations are computed at run time and
recorded): linear warm-up, steps x0.1, lr scaled to the global batch (recorded). The run is cut
into windows of iterations, each saved atomically, so a killed run resumes at the next window.
BN statistics are recomputed over training batches before testing (precise BN).
Metrics: VOC07 11-point AP at IoU .50:.95 / .50 / .75 with difficult objects ignored, as
detectron2's PascalVOCDetectionEvaluator (detections rounded as it writes them), or COCO box
(and mask) AP / AP50 / AP75 with pycocotools. ``trials=N`` repeats with seeds seed..seed+N-1.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from npidbench.backbones import Backbone
from npidbench.checkpoint import LoadedBackbone
from npidbench.checkpoint.own import export_backbone
from npidbench.config import check_choices
from npidbench.data import dataset_root, load_detection_split
from npidbench.data.splits import DetectionImage, DetectionSplit
from npidbench.data.voc import find_year_dir
from npidbench.distributed import DistInfo, prepare_for_training
from npidbench.errors import BadInput
from npidbench.metrics_dense import coco_metrics, voc_metrics
from npidbench.precision import autocast
from npidbench.pretrain.data import mix_seed
from npidbench.progress import log
from npidbench.tables import TableSpec, npid_reference, trial_values
from npidbench.tasks import dense
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput
from npidbench.training.layer_decay import layer_decay_groups, vit_layer
from npidbench.training.loop import StepResult
from npidbench.transfer.det_data import DetectionImages, collate_detection
from npidbench.transfer.detection import NORM_LAYERS, Head, build_detector, parameter_groups, precise_bn
from npidbench.transfer.detectron2_backend import coco_entry, require_detectron2, run_detectron2, voc_entry
from npidbench.transfer.vitdet import build_vitdet

PROTOCOLS = {"c4": "faster-rcnn-c4", "fpn": "mask-rcnn-fpn", "vitdet": "vitdet"}
MASK_HEADS = ("fpn", "vitdet")  # Mask R-CNN: instance masks in training and the mask AP
Backend = Literal["torchvision", "detectron2"]
# training images kept: "detectron2" (at least one non-crowd object) or "mmdet" (at least one
# annotation, crowd included, and a short side >= 32 px): ``kept_for_training``
TrainFilter = Literal["detectron2", "mmdet"]


@dataclass(frozen=True)
class Config:
    head: Head = "c4"  # c4 (Faster R-CNN R50-C4), fpn (Mask R-CNN R50-FPN) or vitdet (ViTDet's Mask R-CNN)
    backend: Backend = "torchvision"  # or detectron2 (MoCo's configs), used only where it is installed
    iterations: int = 24_000  # 0 with an epoch schedule (computed from epochs)
    window: int = 1_000  # iterations between resume checkpoints (epochs: the nearest divisor at or above)
    batch_size: int = 16  # global
    reference_batch: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # weight decay of norm layers' weight and bias: detectron2's SOLVER.WEIGHT_DECAY_NORM = 0.0
    # (MoCo's configs keep it); mmdetection decays them as everything else (det-coco: 1e-4)
    norm_weight_decay: float = 0.0
    milestones: tuple[int, ...] = (18_000, 22_000)  # iterations; empty with an epoch schedule
    epochs: int = 0  # > 0: epoch-based schedule (mmdetection), iterations = epochs x iterations/epoch
    epoch_milestones: tuple[int, ...] = ()  # epochs after which lr x gamma (mmdetection's step)
    train_filter: TrainFilter = "detectron2"  # the training images the reference trainer keeps
    gamma: float = 0.1
    warmup: int = 100
    warmup_factor: float = 0.001  # detectron2's linear warm-up starts at lr x 0.001
    min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))  # training short sides
    max_size: int = 1333
    test_size: int = 800
    roi_batch: int = 512  # RoIs sampled per image for the box head (detectron2's default)
    roi_resolution: int = 14  # C4: RoIAlign output fed to res5 (detectron2's POOLER_RESOLUTION)
    proposals_train: int = 2000  # RPN proposals kept after NMS
    proposals_test: int = 1000
    precise_bn: int = 200  # training batches for precise BN before testing (0: off)
    test_images: int = 0  # 0: the whole test split; N: its first N images (quick checks)
    trials: int = 1
    seed: int = 0
    train_split: str = "trainval"
    test_split: str = "test"
    sync_bn: bool = True
    # head=vitdet (transfer.vitdet; PROTOCOLS-ARCH.md section 3): AdamW with layer-wise lr decay
    # instead of SGD, large-scale jitter to a square image_size instead of min_sizes / test_size
    image_size: int = 1024  # LSJ's square crop and test size (square_pad)
    scale_range: tuple[float, float] = (0.1, 2.0)  # LSJ's ResizeScale
    attention_window: int = 14  # tokens per side of a window-attention block
    global_blocks: tuple[int, ...] = ()  # 0-based global-attention blocks; () = ViTDet's (2, 5, 8, 11 of 12)
    drop_path: float = 0.1
    layer_decay: float = 0.7  # ViT-B (0.8 for L, 0.9 for H)
    amp: bool = False  # bf16 autocast on CUDA (ViTDet trains with AMP); a no-op on the CPU

    def __post_init__(self) -> None:
        check_choices(self)  # the Literal fields, also when built in Python
        dense.check_at_least_one(self, "window", "batch_size", "reference_batch", "trials", "roi_batch")
        if self.epochs < 0 or self.weight_decay < 0 or self.norm_weight_decay < 0:
            raise ValueError("epochs, weight_decay and norm_weight_decay must be non-negative")
        if self.epochs:
            if self.iterations or self.milestones:
                raise ValueError(
                    f"epochs={self.epochs} computes the iterations and their milestones from the training "
                    "images: leave iterations=0 and milestones=[] (or set epochs=0 for an iteration schedule)"
                )
            if any(not 0 < m < self.epochs for m in self.epoch_milestones):
                raise ValueError(
                    f"epoch_milestones {list(self.epoch_milestones)} must lie in 1..{self.epochs - 1}"
                )
        else:
            if self.iterations < 1:
                raise ValueError("iterations must be >= 1 (or epochs > 0 for an epoch schedule)")
            if self.epoch_milestones:
                raise ValueError("epoch_milestones need epochs > 0; with iterations use milestones")
            dense.check_windows(self.iterations, self.window)
        if self.lr <= 0 or not self.min_sizes or min(self.min_sizes) < 1 or self.test_size < 1:
            raise ValueError("lr must be positive and min_sizes / test_size positive pixel sizes")
        if self.max_size < max(self.min_sizes):
            raise ValueError(
                f"max_size {self.max_size} is below the largest training size {max(self.min_sizes)}"
            )
        if not 0 < self.warmup_factor <= 1 or self.warmup < 0 or self.precise_bn < 0 or self.test_images < 0:
            raise ValueError("need 0 < warmup_factor <= 1 and non-negative warmup, precise_bn, test_images")
        if self.head == "vitdet":
            if self.image_size < 1 or self.attention_window < 1 or not 0 < self.layer_decay <= 1:
                raise ValueError("head=vitdet needs image_size >= 1, attention_window >= 1 and 0 < layer_decay <= 1")
            if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
                raise ValueError("scale_range must be [low, high] with 0 < low <= high")
            if not 0 <= self.drop_path < 1 or any(b < 0 for b in self.global_blocks):
                raise ValueError("need 0 <= drop_path < 1 and global_blocks of 0-based block numbers")

    @property
    def scaled_lr(self) -> float:
        return dense.linear_lr(self.lr, self.batch_size, self.reference_batch)


@dataclass(frozen=True)
class Schedule:
    """The iterations a run trains for, as computed at run time (recorded in the details)."""

    iterations: int
    window: int
    milestones: tuple[int, ...]
    warmup: int
    warmup_factor: float
    gamma: float
    epochs: int = 0  # 0: iteration-based
    iterations_per_epoch: int = 0
    train_images: int = 0  # training images kept (train_filter)

    def lr_factor(self, iteration: int) -> float:
        """Steps x gamma at the milestones times the linear warm-up from ``warmup_factor``
        (detectron2's WarmupMultiStepLR; mmcv's 'linear' warm-up, 1 - (1 - i / n)(1 - ratio), is
        the same line)."""
        steps = self.gamma ** sum(iteration >= m for m in self.milestones)
        return steps * dense.linear_warmup(iteration, self.warmup, self.warmup_factor)

    def record(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "train_images": self.train_images,
            "iterations_per_epoch": self.iterations_per_epoch,
            "iterations": self.iterations,
            "milestones": list(self.milestones),
            "warmup": self.warmup,
            "warmup_factor": self.warmup_factor,
            "gamma": self.gamma,
            "window": self.window,
        }


def schedule_for(config: Config, train_images: int) -> Schedule:
    """``config``'s schedule for ``train_images`` kept training images. An epoch schedule takes
    ceil(train_images / batch_size) iterations per epoch (every image once per epoch at the
    global batch; mmdetection's group sampler may add one iteration for its aspect-ratio groups),
    its milestones at the epoch boundaries, and windows of the smallest divisor of the total at or
    above ``window``, so that the resumable windows tile the run exactly."""
    common = dict(warmup=config.warmup, warmup_factor=config.warmup_factor, gamma=config.gamma)
    if not config.epochs:
        return Schedule(
            config.iterations, config.window, tuple(config.milestones), train_images=train_images, **common
        )
    per_epoch = math.ceil(train_images / config.batch_size)
    total = config.epochs * per_epoch
    window = next(d for d in range(min(config.window, total), total + 1) if total % d == 0)
    return Schedule(
        total,
        window,
        tuple(m * per_epoch for m in config.epoch_milestones),
        epochs=config.epochs,
        iterations_per_epoch=per_epoch,
        train_images=train_images,
        **common,
    )


def kept_for_training(image: DetectionImage, rule: TrainFilter) -> bool:
    """Whether the reference trainer trains on ``image``. "detectron2": at least one non-crowd
    object (DATALOADER.FILTER_EMPTY_ANNOTATIONS = True, detectron2/config/defaults.py:128;
    filter_images_with_only_crowd_annotations, detectron2/data/build.py:46). "mmdet": at least
    one annotation of the classes, crowd ones included, and a short side of at least 32 px
    (mmdetection 2.x CocoDataset._filter_imgs with filter_empty_gt=True, min_size=32)."""
    if rule == "mmdet":
        return len(image.labels) > 0 and min(image.width, image.height) >= 32
    return bool((~image.crowd).any())


def training_split(split: DetectionSplit, rule: TrainFilter) -> DetectionSplit:
    kept = [image for image in split.images if kept_for_training(image, rule)]
    if not kept:
        raise BadInput(f"no image of {split.dataset} {split.split} has an object to train on")
    return replace(split, images=kept)


def _splits(ctx: RunContext, config: Config) -> tuple[DetectionSplit, DetectionSplit]:
    dataset = ctx.preset.dataset
    train = load_detection_split(dataset, config.train_split, ctx.data_root)
    test_dataset = "voc07" if dataset == "voc0712" else dataset  # VOC07+12 tests on VOC2007 test
    test = load_detection_split(test_dataset, config.test_split, ctx.data_root)
    if config.test_images:
        test.images = test.images[: config.test_images]
    return train, test


def run(ctx: RunContext, config: Config) -> TaskOutput:
    if config.backend == "detectron2":
        require_detectron2()  # before any work: one line saying how to install it
        refuse_for_detectron2(ctx.model)
    train, test = _splits(ctx, config)
    world = dense.training_world(ctx, config.batch_size)
    if config.head in MASK_HEADS and train.dataset != "coco":
        raise BadInput(f"head={config.head} trains Mask R-CNN and needs instance masks: use it with COCO")
    kept = training_split(train, config.train_filter)
    schedule = schedule_for(config, len(kept))
    if config.epochs:
        log(
            f"{config.epochs} epochs over {len(kept)} training images at batch {config.batch_size}: "
            f"{schedule.iterations} iterations, milestones {list(schedule.milestones)}, warm-up {schedule.warmup}"
        )

    def run_one(trial: dense.Trial) -> dense.TrialResult:
        if config.backend == "detectron2":
            as_iterations = _as_iterations(config, schedule, trial.seed)
            return dense.TrialResult(*_with_detectron2(ctx, as_iterations, train, test, trial))
        return _train_and_test(trial, config, schedule, kept, test)

    fingerprint = _fingerprint(train)
    trials = dense.run_trials(ctx, config, world, fingerprint, run_one)
    return _output(ctx, config, schedule, train, test, fingerprint, trials)


def _output(
    ctx: RunContext,
    config: Config,
    schedule: Schedule,
    train: DetectionSplit,
    test: DetectionSplit,
    fingerprint: str,
    trials: list[dense.TrialResult],
) -> TaskOutput:
    """The record: the trials' mean and spread, the data, the schedule the run computed."""
    return dense.task_output(
        ctx,
        config,
        trials,
        metrics=dense.metrics_over_trials(trials, [t.metrics for t in trials]),
        dataset=dense.dataset_record(
            ctx.preset.dataset,
            train,
            test,
            fingerprint,
            train_extra={"objects": train.objects},
            test_extra={"objects": test.objects},
        ),
        protocol=PROTOCOLS[config.head],
        backend=config.backend,
        details={
            "weight_decay": {"default": config.weight_decay, "norm": config.norm_weight_decay},
            "schedule": schedule.record(),
        },
    )


def _as_iterations(config: Config, schedule: Schedule, seed: int) -> Config:
    """``config`` as detectron2's trainer takes it: the trial's seed, and an epoch schedule
    handed over as its computed iterations, milestones and windows."""
    return replace(
        config,
        seed=seed,
        epochs=0,
        epoch_milestones=(),
        iterations=schedule.iterations,
        milestones=schedule.milestones,
        window=schedule.window,
    )


def refuse_for_detectron2(model: LoadedBackbone) -> None:
    """backend=detectron2 builds a standard-width ``R-<depth>`` ResNet (``_with_detectron2``) on
    ImageNet-normalised input: one line for a backbone it would build or feed otherwise."""
    if not re.fullmatch(r"resnet\d+", model.arch):
        raise BadInput(
            f"backend=detectron2 builds standard torchvision-width ResNets (resnet18..resnet152), not "
            f"{model.arch}; use backend=torchvision, which reads the backbone's widths"
        )
    if not model.input_normalised:
        raise BadInput(
            f"backend=detectron2 feeds ImageNet-normalised pixels, and this {model.inspection.format} network "
            "takes them in [0, 1] without mean/std; use backend=torchvision, which feeds them so"
        )


def _with_detectron2(
    ctx: RunContext, config: Config, train: DetectionSplit, test: DetectionSplit, trial: dense.Trial
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """One trial with detectron2 (``config``: ``_as_iterations``): the backbone converted to its
    names (MoCo's convention), the splits registered under npidbench names (the test split cut to
    its ``test_images``, as the built-in backend evaluates it), detectron2's trainer (resumable
    from its own checkpoints in the run's folder). The preset's norm weight decay goes in as
    SOLVER.WEIGHT_DECAY_NORM; the training images are detectron2's own choice (at least one
    non-crowd object), whatever ``train_filter`` says."""
    output = trial.state.folder / "detectron2"
    output.mkdir(parents=True, exist_ok=True)
    weights = export_backbone(ctx.model.model, "detectron2", output / "backbone.pkl")
    depth = int(ctx.model.arch.removeprefix("resnet"))
    if train.dataset == "coco":
        data = {"train": [coco_entry(train)], "test": [coco_entry(test, output)]}
    else:
        data = _voc_entries(ctx, config, test, output)
    return run_detectron2(
        config,
        config.head,
        depth,
        weights,
        train.dataset,
        data,
        output,
        list(train.classes),
        trial.device.type,
        ctx.extract.workers,
    )


def _voc_entries(ctx: RunContext, config: Config, test: DetectionSplit, output: Path) -> dict[str, list[Any]]:
    """register_pascal_voc's arguments (name, VOC year folder, split, year): VOC2007 (+ VOC2012
    for voc0712) train_split to train, VOC2007 test_split (its evaluated images) to test."""
    root07, _ = dataset_root("voc07", ctx.data_root)
    train_parts = [("2007", find_year_dir(root07, "2007"))]
    if ctx.preset.dataset == "voc0712":
        root12, _ = dataset_root("voc12", ctx.data_root)
        train_parts.append(("2012", find_year_dir(root12, "2012")))
    return {
        "train": [voc_entry(d, config.train_split, y) for y, d in train_parts],
        "test": [voc_entry(find_year_dir(root07, "2007"), config.test_split, "2007", test, output)],
    }


def _fingerprint(split: DetectionSplit) -> str:
    digest = hashlib.sha256()
    for image in split.images:
        digest.update(f"{image.path}\t{image.boxes.tobytes().hex()}\t{image.labels.tolist()}\n".encode())
    return digest.hexdigest()


def _train_and_test(
    trial: dense.Trial, config: Config, schedule: Schedule, train: DetectionSplit, test: DetectionSplit
) -> dense.TrialResult:
    """One trial with the torchvision backend: build, fine-tune, precise BN, test."""
    model, wrapped, optimizer = build_model(trial, config, len(train.classes))
    plan = dense.TrainingPlan(
        schedule.iterations, schedule.window, config.batch_size, config.scaled_lr, schedule.lr_factor
    )
    dataset = DetectionImages(train, trial.seed, masks=config.head in MASK_HEADS)
    batches = trial.batches(dataset, len(train), plan, collate_detection)
    losses = _training_loss(wrapped, trial.device, autocast(trial.device, config.amp))
    history = trial.fit(
        model, optimizer, plan, batches, lambda batch: StepResult(losses(batch), len(batch[0]), None)
    )
    if config.precise_bn:
        log(f"precise BN over {config.precise_bn} training batches")
        torch.manual_seed(mix_seed(trial.seed, 7))
        precise_bn(model, batches(plan.windows), config.precise_bn, losses)
    return dense.TrialResult(evaluate(model, test, config.head, trial.world, trial.device), history)


def build_model(
    trial: dense.Trial, config: Config, classes: int
) -> tuple[nn.Module, nn.Module, torch.optim.SGD]:
    """(model, what trains it, its optimizer): the detector on a copy of the checkpoint's
    backbone, its new layers drawn from the trial's seed, prepared for its world (SyncBN, DDP)."""
    torch.manual_seed(trial.seed)  # the new layers' initial weights
    network = copy.deepcopy(trial.ctx.model.model)
    model: nn.Module
    if config.head == "vitdet":
        model = build_vitdet(
            network,
            classes,
            image_size=config.image_size,
            window=config.attention_window,
            global_indexes=config.global_blocks or None,
            drop_path=config.drop_path,
            scale_range=config.scale_range,
        )
    else:
        model = build_detector(
            network,
            config.head,
            classes,
            config.min_sizes,
            config.max_size,
            config.test_size,
            config.roi_resolution,
            imagenet_norm=trial.ctx.model.input_normalised,  # False: [0, 1] pixels (SimCLR v1)
        )
    model.roi_heads.fg_bg_sampler.batch_size_per_image = config.roi_batch
    model.rpn._post_nms_top_n = {"training": config.proposals_train, "testing": config.proposals_test}
    model, wrapped = prepare_for_training(model, trial.world, config.sync_bn, channels_last=False)
    return model, wrapped, make_optimizer(model, config)


def _training_loss(
    wrapped: nn.Module, device: torch.device, amp: contextlib.AbstractContextManager
) -> Callable[[Any], torch.Tensor]:
    """batch -> the sum of the detector's training losses (RPN, box and mask heads), under ``amp``."""

    def losses(batch) -> torch.Tensor:
        images, targets, error = batch
        dense.refuse_unreadable(error)
        images = [image.to(device).float() / 255 for image in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with amp:
            return sum(wrapped(images, targets).values())

    return losses


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD with ``weight_decay`` on every parameter but the norm layers' weight and bias, which
    get ``norm_weight_decay`` (``parameter_groups``); ViTDet: AdamW by ``vitdet_groups``."""
    if config.head == "vitdet":
        groups = vitdet_groups(model, config)
        return torch.optim.AdamW(groups, lr=config.scaled_lr, betas=(0.9, 0.999), fused=True)
    groups = parameter_groups(model, config.weight_decay, config.norm_weight_decay)
    return torch.optim.SGD(groups, lr=config.scaled_lr, momentum=config.momentum, fused=True)


def vitdet_groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """ViTDet's AdamW groups: layer-wise lr decay over the ViT's blocks (``vit_layer``: the
    embeddings at decay^(depth + 1), block i at decay^(depth - i), pyramid and heads at 1;
    detectron2 get_vit_lr_decay_rate), ``weight_decay`` on every parameter but the norm layers'
    (weight_decay_norm = 0) and the position embedding (its override); biases decay (detectron2's
    default weight_decay_bias)."""
    depth = len(model.backbone.trunk.blocks)
    norms = {
        id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)
    }
    return layer_decay_groups(
        model.named_parameters(),
        lambda name: vit_layer(name, depth, prefix="backbone.trunk."),
        depth,
        config.layer_decay,
        config.weight_decay,
        decays=lambda name, p: id(p) not in norms and not name.endswith("pos_embed"),
    )


@torch.no_grad()
def predict(
    model: nn.Module, split: DetectionSplit, world: DistInfo, device: torch.device
) -> list[tuple[int, dict]]:
    """(image index, outputs on the CPU) for this rank's share of ``split``."""
    model.eval()
    out = []
    for index in range(world.rank, len(split), world.world_size):
        pixels = dense.read_test_image(split.images[index].path)
        result = model([pixels.to(device).float() / 255])[0]
        out.append((index, {k: v.cpu() for k, v in result.items()}))
    model.train()
    return out


def _gathered(items: list, world: DistInfo) -> list:
    if world.world_size == 1:
        return items
    parts: list = [None] * world.world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def evaluate(
    model: nn.Module, split: DetectionSplit, head: str, world: DistInfo, device: torch.device
) -> dict[str, float]:
    outputs = _gathered(predict(model, split, world, device), world)
    if split.dataset == "voc":
        return voc_metrics(split, outputs)
    return coco_metrics(split, outputs, masks=head in MASK_HEADS)


def _backbone_check(config: Config, backbone: Backbone) -> str | None:
    """Which detector runs on which backbone: C4 (res4 trunk, res5 box head) on ResNets; the FPN
    Mask R-CNN on ResNets and ConvNeXts (as the ConvNeXt paper); ViTDet on plain ViTs."""
    family = backbone.family
    if config.head == "vitdet" and family != "vit":
        runs = "det-coco (Mask R-CNN FPN)" + (" or det-voc0712 (Faster R-CNN C4)" if family == "resnet" else "")
        return f"ViTDet is the plain-ViT detector; a {family} runs {runs}"
    if config.head != "vitdet" and family == "vit":
        return (
            f"the {PROTOCOLS[config.head]} detector reads a multi-stage network's maps; a plain ViT runs "
            "det-coco-vitdet (ViTDet's simple feature pyramid)"
        )
    if config.head == "c4" and family != "resnet":
        return f"Faster R-CNN C4 is built on a ResNet's res4 / res5; a {family} runs det-coco (Mask R-CNN FPN)"
    return None


COCO_COLUMNS = ("mAP(Box)", "AP50(Box)", "AP75(Box)", "mAP(Mask)", "AP50(Mask)", "AP75(Mask)")
VOC_TABLE = TableSpec(
    key="detection-voc",
    title="Detection",
    columns=("mAP", "AP50"),
    values=lambda record: trial_values(record, {"mAP": "mAP", "AP50": "AP50"}),
    default_protocol=PROTOCOLS["c4"],
    references={"voc0712": [npid_reference(("AP50",), (79.52,))]},
)
COCO_TABLE = TableSpec(
    key="detection-coco",
    title="Detection and Instance Segmentation",
    columns=COCO_COLUMNS,
    values=lambda record: trial_values(record, {c: c.replace("mAP", "AP") for c in COCO_COLUMNS}),
    default_protocol=PROTOCOLS["fpn"],
    references={
        "coco": [
            npid_reference(COCO_COLUMNS, (38.5, 57.7, 42.0, 34.6, 54.8, 37.1)),
            # PROTOCOLS-ARCH.md section 3: ViTDet Mask R-CNN, 100 epochs, MAE-initialised
            *(
                {
                    "Model": f"MAE ViT-{size} [{PROTOCOLS['vitdet']}]",
                    "Config": "ViTDet paper / detectron2 projects/ViTDet",
                    **dict.fromkeys(COCO_COLUMNS),
                    "mAP(Box)": box,
                    "mAP(Mask)": mask,
                }
                for size, box, mask in (("B", 51.6, 45.9), ("L", 55.5, 49.2))
            ),
        ]
    },
)
FAMILY = TaskFamily(
    name="detection",
    description="Detection fine-tuning: Faster R-CNN C4 (VOC07+12), Mask R-CNN FPN and ViTDet (COCO); AP",
    config=Config,
    run=run,
    tables=(VOC_TABLE, COCO_TABLE),
    datasets=("voc0712", "voc07", "coco"),
    backbone_check=_backbone_check,
)

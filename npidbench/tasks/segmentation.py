"""Semantic segmentation transfer, mIoU on val, by three protocols (``head``):

- ``fcn`` (protocol ``fcn-d8``): FCN-D8 on ResNets (PROTOCOLS.md "Segmentation"; mmsegmentation's
  fcn_r50-d8 as mmselfsup runs it), SGD with poly lr.
- ``upernet`` (``upernet-mae`` on ViTs, ``upernet-convnext`` on ConvNeXts; PROTOCOLS-ARCH.md section
  3): UperNet fine-tuning as mmseg's MAE config and the ConvNeXt repo's ADE20K configs run it
  (transfer/vit_segmentation.py), AdamW (betas 0.9 / 0.999) with layer-wise (ViT) or stage-wise
  (ConvNeXt) lr decay, mmcv's poly lr (power 1, min 0) under a linear warm-up of 1,500 iterations
  from 1e-6; weight decay as mmseg's LearningRateDecayOptimizerConstructor gives it.
- ``linear`` (``linear-dinov2``): DINOv2's linear head (BN + 1x1 on the concatenated patch maps)
  on a frozen ViT, AdamW with iBOT's published linear schedule (its DINOv2 training settings were
  not found: PROTOCOLS-ARCH.md section 3).

The network fine-tunes (SyncBN under torchrun on GPUs) for a fixed number of iterations; the run
is cut into windows of iterations, each saved atomically so a killed run resumes at the next
window. ``trials=N`` repeats the run with seeds seed .. seed + N - 1 and records every trial's mIoU
(the report shows mean ± std; the record's ``std`` with N > 1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npidbench.backbones import Backbone
from npidbench.config import check_choices
from npidbench.data import load_segmentation_split
from npidbench.data.images import normalize_batch
from npidbench.data.splits import SegmentationSplit
from npidbench.distributed import DistInfo, prepare_for_training
from npidbench.errors import BadInput
from npidbench.metrics_dense import confusion_matrix, mean_iou
from npidbench.precision import autocast, precision_name
from npidbench.tables import TableSpec, npid_reference
from npidbench.tasks import dense, segmentation_vit
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput
from npidbench.training.loop import StepResult, all_reduce_sum
from npidbench.transfer.seg_data import (
    SegAugment,
    SegTrainImages,
    collate_seg,
    keep_ratio_size,
    normalize_crops,
    read_mask,
)
from npidbench.transfer.segmentation import FCNSegmenter, segmentation_loss, sliding_logits

PROTOCOL = "fcn-d8"
# The record's protocol by head (and, for UperNet, backbone family: the recipes differ)
PROTOCOLS = {
    ("upernet", "vit"): "upernet-mae",  # mmseg configs/mae (MAE ViT-B, 48.13 mIoU on ADE20K)
    ("upernet", "convnext"): "upernet-convnext",  # ConvNeXt repo semantic_segmentation configs
    ("linear", "vit"): "linear-dinov2",  # DINOv2's BNHead on frozen patch tokens
}
TestMode = Literal["whole", "slide"]
Head = Literal["fcn", "upernet", "linear"]
LinearBlocks = Literal["last", "last4", "ibot"]


@dataclass(frozen=True)
class Config:
    iterations: int = 20_000
    window: int = 1_000  # iterations between resume checkpoints
    batch_size: int = 16  # global
    reference_batch: int = 16  # the batch the protocol's lr is for (lr scales linearly)
    lr: float = 0.01
    min_lr: float = 1e-4
    power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scale: tuple[int, int] = (2048, 512)  # (long, short) training and test scale
    ratio: tuple[float, float] = (0.5, 2.0)
    crop: int = 512
    cat_max_ratio: float = 0.75
    test_mode: TestMode = "whole"  # whole image, or slide (Cityscapes)
    slide_crop: int = 769
    slide_stride: int = 513
    trials: int = 1
    seed: int = 0
    train_split: str = "train_aug"
    test_split: str = "val"
    sync_bn: bool = True
    # bilinear upsampling of the heads' logits (training and test): mmseg's FCN base config says
    # False (mmselfsup 0.x _base_/models/fcn_r50-d8.py); its Cityscapes config sets True on both
    # heads (cityscapes/fcn_r50-d8_769x769_40k_cityscapes.py): tasks/seg-cityscapes.toml.
    align_corners: bool = False
    test_images: int = 0  # 0: the whole val split; N: its first N images (quick checks)
    amp: bool = True  # bf16 autocast on CUDA (recorded as the precision); false: fp32
    # --- the ViT / ConvNeXt protocols (PROTOCOLS-ARCH.md section 3); fcn ignores them ---------
    # fcn: FCN-D8, SGD (ResNets); upernet: UperNet, AdamW + layer decay (ViT, ConvNeXt);
    # linear: BN + 1x1 on a frozen ViT, AdamW (tasks/seg-*-upernet.toml, seg-*-linear.toml)
    head: Head = "fcn"
    # mmcv's linear warm-up of the poly lr (lr_config warmup='linear', warmup_iters 1500, warmup_ratio
    # 1e-6 in the MAE, ConvNeXt and iBOT configs): the factor times 1 - (1 - i / W)(1 - ratio)
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    layer_decay: float = 0.65  # ViT layer-wise lr decay (mmseg MAE ViT-B: layer_decay_rate 0.65)
    stage_decay: float = 0.9  # ConvNeXt stage-wise lr decay (ConvNeXt configs: decay_rate 0.9)
    # the ConvNeXt configs' num_layers of stage_wise decay; None: 6 for ConvNeXt-T, 12 for S/B/L/XL
    stage_decay_layers: int | None = None
    drop_path: float = 0.1  # ViT stochastic depth, rising linearly (mmseg MAE drop_path_rate 0.1)
    # ConvNeXt stochastic depth; None: the repo's per size (0.3 for ConvNeXt-S, 0.4 for T/B/L/XL)
    convnext_drop_path: float | None = None
    # UPerHead channels; None: the ViT's width (mmseg MAE ViT-B: 768) or 512 (ConvNeXt configs)
    channels: int | None = None
    aux_channels: int = 256  # the auxiliary FCNHead's channels (both configs)
    # linear: the blocks whose patch maps are concatenated: last (DINOv2 "linear"), last4
    # (DINOv2's multi-layer head), ibot (iBOT: out_indices [3, 5, 7, 11], evenly spaced)
    linear_blocks: LinearBlocks = "last"

    def __post_init__(self) -> None:
        check_choices(self)  # the Literal fields, also when built in Python
        dense.check_at_least_one(
            self, "iterations", "window", "batch_size", "reference_batch", "crop", "trials"
        )
        dense.check_windows(self.iterations, self.window)
        if self.lr <= 0 or not 0 <= self.min_lr < self.lr:
            raise ValueError("need lr > 0 and 0 <= min_lr < lr")
        if (
            len(self.scale) != 2
            or min(self.scale) < 1
            or len(self.ratio) != 2
            or not 0 < self.ratio[0] <= self.ratio[1]
        ):
            raise ValueError("scale must be [long, short] pixels and ratio [low, high] with 0 < low <= high")
        if self.slide_stride < 1 or self.slide_crop < 1:
            raise ValueError("slide_crop and slide_stride must be at least 1")
        if self.test_images < 0:
            raise ValueError(f"test_images must be 0 (the whole split) or more, got {self.test_images}")
        if self.warmup_iters < 0 or not 0 < self.warmup_ratio <= 1:
            raise ValueError("need warmup_iters >= 0 and 0 < warmup_ratio <= 1")
        if not (0 < self.layer_decay <= 1 and 0 < self.stage_decay <= 1):
            raise ValueError("layer_decay and stage_decay must be in (0, 1]")
        drop_paths = [self.drop_path] + (
            [self.convnext_drop_path] if self.convnext_drop_path is not None else []
        )
        if not all(0 <= rate < 1 for rate in drop_paths):
            raise ValueError("drop_path and convnext_drop_path must be in [0, 1)")
        sizes = [self.aux_channels] + [v for v in (self.channels, self.stage_decay_layers) if v is not None]
        if min(sizes) < 1:
            raise ValueError("channels, aux_channels and stage_decay_layers must be at least 1")

    @property
    def scaled_lr(self) -> float:
        return dense.linear_lr(self.lr, self.batch_size, self.reference_batch)

    def poly(self, iteration: int) -> float:
        """lr factor at ``iteration``: (lr - min) * (1 - t / T)^power + min, over lr."""
        lr = self.scaled_lr
        min_lr = min(self.min_lr, lr)
        return ((lr - min_lr) * (1 - iteration / self.iterations) ** self.power + min_lr) / lr

    def lr_factor(self, iteration: int) -> float:
        """``poly`` under mmcv's linear warm-up: times 1 - (1 - i / W)(1 - warmup_ratio) for the
        first W = ``warmup_iters`` iterations (mmcv LrUpdaterHook get_warmup_lr); poly alone
        without a warm-up (fcn)."""
        return self.poly(iteration) * dense.linear_warmup(iteration, self.warmup_iters, self.warmup_ratio)


def run(ctx: RunContext, config: Config) -> TaskOutput:
    train, test = _splits(ctx, config)
    world = dense.training_world(ctx, config.batch_size)
    fingerprint = _fingerprint(train)
    trials = dense.run_trials(
        ctx, config, world, fingerprint, lambda t: _train_and_test(t, config, train, test)
    )
    metrics = dense.metrics_over_trials(trials, [t.metrics["mIoU"] for t in trials])
    protocol = PROTOCOL if config.head == "fcn" else PROTOCOLS[(config.head, ctx.model.backbone.family)]
    return dense.task_output(
        ctx,
        config,
        trials,
        metrics={**metrics, "per_class_iou": trials[-1].extra["per_class"]},
        dataset=dense.dataset_record(ctx.preset.dataset, train, test, fingerprint),
        protocol=protocol,
        details={
            "align_corners": config.align_corners,
            "precision": precision_name(ctx.extract.device, config.amp),
            **(trials[-1].extra["model"] if config.head != "fcn" else {}),
        },
    )


def _splits(ctx: RunContext, config: Config) -> tuple[SegmentationSplit, SegmentationSplit]:
    dataset = ctx.preset.dataset
    train = load_segmentation_split(dataset, config.train_split, ctx.data_root)
    test = load_segmentation_split(dataset, config.test_split, ctx.data_root)
    if config.test_images:
        test = dataclasses.replace(test, pairs=test.pairs[: config.test_images])
    return train, test


def _fingerprint(split: SegmentationSplit) -> str:
    digest = hashlib.sha256()
    for image, mask in split.pairs:
        digest.update(f"{image}\t{mask}\n".encode())
    return digest.hexdigest()


def _train_and_test(
    trial: dense.Trial, config: Config, train: SegmentationSplit, test: SegmentationSplit
) -> dense.TrialResult:
    """One trial: build, fine-tune, test; the per-class IoU (percent, None for a class absent
    from the split) kept besides the mIoU."""
    model, wrapped, optimizer = build_model(trial, config, len(train.classes))
    plan = dense.TrainingPlan(
        config.iterations, config.window, config.batch_size, config.scaled_lr, config.lr_factor
    )
    augment = SegAugment(config.scale, config.ratio, config.crop, config.cat_max_ratio)
    batches = trial.batches(SegTrainImages(train, augment, trial.seed), len(train), plan, collate_seg)
    amp = autocast(trial.device, config.amp)
    imagenet_norm = trial.ctx.model.input_normalised  # False: [0, 1] pixels (SimCLR v1)
    step = _training_step(wrapped, trial.device, amp, train.ignore_index, imagenet_norm=imagenet_norm)
    history = trial.fit(model, optimizer, plan, batches, step)
    miou, per_class = evaluate(
        model, test, config, trial.world, trial.device, len(train.classes), imagenet_norm=imagenet_norm
    )
    kept = [None if np.isnan(v) else round(float(v) * 100, 3) for v in per_class]
    extra: dict[str, Any] = {"per_class": kept}
    if config.head != "fcn":
        extra["model"] = segmentation_vit.model_details(model, config, trial.ctx.model.backbone)
    return dense.TrialResult({"mIoU": miou}, history, extra)


def build_model(
    trial: dense.Trial, config: Config, classes: int
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(model, what trains it, its optimizer): FCN heads, drawn from the trial's seed, on a
    dilated copy of the checkpoint's backbone, prepared for its world (SyncBN, DDP); the
    ``upernet`` / ``linear`` heads: ``segmentation_vit.build_model``."""
    if config.head != "fcn":
        return segmentation_vit.build_model(trial, config, classes)
    torch.manual_seed(trial.seed)  # the heads' initial weights
    model: nn.Module = FCNSegmenter(copy.deepcopy(trial.ctx.model.model), classes, config.align_corners)
    model, wrapped = prepare_for_training(model, trial.world, config.sync_bn)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.scaled_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        fused=True,
    )
    return model, wrapped, optimizer


def _training_step(
    wrapped: nn.Module,
    device: torch.device,
    amp: contextlib.AbstractContextManager,
    ignore: int,
    *,
    imagenet_norm: bool = True,
) -> Callable[[Any], StepResult]:
    """batch -> the step's loss (``segmentation_loss``: main + 0.4 x auxiliary head) under
    ``amp``, on the crops normalised (``imagenet_norm``) with their padding at 0."""

    def step(batch) -> StepResult:
        pixels, masks, valid, error = batch
        dense.refuse_unreadable(error)
        masks = masks.to(device)
        # padding 0 after normalising, as mmseg
        images = normalize_crops(pixels.to(device), valid, imagenet_norm=imagenet_norm)
        with amp:
            loss = segmentation_loss(wrapped, images, masks, ignore)
        return StepResult(loss, len(masks), None)

    return step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: SegmentationSplit,
    config: Config,
    world: DistInfo,
    device: torch.device,
    classes: int,
    *,
    imagenet_norm: bool = True,
) -> tuple[float, np.ndarray]:
    """mIoU over ``split`` (this rank's share; confusion matrices summed over ranks) of a
    segmenter returning (logits, aux) with its ``align_corners``; ``imagenet_norm=False``: the
    images in [0, 1] without mean/std."""
    model.eval()
    matrix = torch.zeros(classes, classes, dtype=torch.float64, device=device)
    for index in range(world.rank, len(split), world.world_size):
        image_path, mask_path = split.pairs[index]
        image = dense.read_test_image(image_path)
        mask = read_mask(split, mask_path)
        size = list(keep_ratio_size(image.shape[-2], image.shape[-1], config.scale))
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
        pixels = resized.round().clamp(0, 255).to(torch.uint8).to(device)
        batch = normalize_batch(pixels, imagenet_norm=imagenet_norm)
        if config.test_mode == "slide":
            logits = sliding_logits(model, batch, config.slide_crop, config.slide_stride, classes)
        else:
            logits = model(batch)[0].float()
        logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=model.align_corners)
        prediction = logits.argmax(dim=1)[0].cpu().numpy()
        try:
            counts = confusion_matrix(prediction, mask, classes, split.ignore_index)
        except ValueError as exc:
            raise BadInput(f"{mask_path}: {exc}") from exc
        matrix += torch.from_numpy(counts).to(device)
    all_reduce_sum(matrix, world)
    model.train()
    return mean_iou(matrix.cpu().numpy())


def _table_values(record: dict[str, Any]) -> dict[str, Any]:
    """Every trial's mIoU (a list: the cell shows mean ± std over trials and seeds)."""
    metrics = record["metrics"]
    return {"mIOU": metrics.get("trials") or metrics.get("mIoU")}


def _presets_with(head: str) -> str:
    """The segmentation presets of ``head`` (" / "-joined), for a refusal to name."""
    from npidbench.tasks import presets

    return " / ".join(
        sorted(
            p.name
            for p in presets().values()
            if p.family == "segmentation" and p.config.get("head", "fcn") == head
        )
    )


def _backbone_check(config: Config, backbone: Backbone) -> str | None:
    """FCN-D8 is the ResNet protocol, UperNet the ViT / ConvNeXt one, the linear head the ViT one
    (each refusal names the presets to run instead); a ViT's UperNet tests by sliding windows no
    larger than the crop (its relative position bias covers the crop's grid)."""
    family = backbone.family
    instead = {
        "resnet": f"a resnet runs {_presets_with('fcn')} (FCN-D8)",
        "vit": f"a vit runs {_presets_with('upernet')} or {_presets_with('linear')}",
        "convnext": f"a convnext runs {_presets_with('upernet')}",
    }.get(family, f"a {family} backbone has no segmentation protocol here")
    if config.head == "fcn" and family != "resnet":
        return f"head=fcn is FCN-D8, the ResNet protocol (dilated res4 / res5); {instead}"
    if config.head == "upernet" and family not in ("vit", "convnext"):
        return f"head=upernet is the ViT / ConvNeXt protocol (mmseg's MAE UperNet, the ConvNeXt repo's); {instead}"
    if config.head == "linear" and family != "vit":
        return f"head=linear is DINOv2's linear head on a frozen ViT's patch tokens; {instead}"
    if (
        config.head == "upernet"
        and family == "vit"
        and (config.test_mode != "slide" or config.slide_crop > config.crop)
    ):
        return (
            "head=upernet on a ViT tests by sliding windows no larger than the crop (its relative "
            f"position bias covers the crop's grid, as mmseg's MAE): --set test_mode=slide slide_crop={config.crop}"
        )
    return None


TABLE = TableSpec(
    key="segmentation",
    title="Segmentation",
    columns=("mIOU",),
    values=_table_values,
    default_protocol=PROTOCOL,
    references={
        "voc12aug": [npid_reference(("mIOU",), (65.45,))],
        # PROTOCOLS-ARCH.md section 3: mmseg configs/mae README, single scale
        "ade20k": [
            {
                "Model": f"MAE ViT-B/16 [{PROTOCOLS[('upernet', 'vit')]}]",
                "Config": "mmseg upernet_mae-base_fp16_8x2_512x512_160k_ade20k",
                "mIOU": 48.13,
            }
        ],
    },
)
FAMILY = TaskFamily(
    name="segmentation",
    description="Segmentation fine-tuning: FCN-D8 (ResNets), UperNet (ViT, ConvNeXt), linear head (frozen ViT); mIoU",
    config=Config,
    run=run,
    tables=(TABLE,),
    datasets=("voc12aug", "cityscapes", "ade20k"),
    backbone_check=_backbone_check,
)

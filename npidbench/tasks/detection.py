"""Object detection transfer: Faster R-CNN C4 on VOC07+12 and Mask R-CNN FPN on COCO
(PROTOCOLS.md "Detection"; MoCo's detectron2 configs, mmdetection), torchvision backend.

The whole network fine-tunes (every stage and BN; SyncBN under torchrun on GPUs) for a fixed
number of iterations: linear warm-up, steps x0.1, lr scaled to the global batch (recorded). The
run is cut into windows of iterations, each saved atomically, so a killed run resumes at the next
window. BN statistics are recomputed over training batches before testing (precise BN).
Metrics: VOC07 11-point AP at IoU .50:.95 / .50 / .75 with difficult objects ignored, or COCO
box (and mask) AP / AP50 / AP75 with pycocotools. ``trials=N`` repeats with seeds seed..seed+N-1.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from npidbench.checkpoint.own import export_backbone
from npidbench.data import dataset_root, load_detection_split
from npidbench.data.images import decode_error_reason, decode_rgb
from npidbench.data.splits import DetectionSplit
from npidbench.data.voc import find_year_dir
from npidbench.distributed import DistInfo, check_global_batch, current_world, prepare_for_training
from npidbench.errors import BadInput
from npidbench.metrics_dense import GroundTruth, coco_ap, voc_detection_summary
from npidbench.pretrain.data import mix_seed
from npidbench.progress import log
from npidbench.tasks.base import RunContext, TaskOutput, run_identity
from npidbench.training.batches import window_batches
from npidbench.training.loop import ResumeState, StepResult, StepSchedule, fit
from npidbench.transfer.det_data import DetectionImages, collate_detection
from npidbench.transfer.detection import HEADS, build_detector, precise_bn
from npidbench.transfer.detectron2_backend import require_detectron2, run_detectron2

NAME = "detection"
DESCRIPTION = "Detection fine-tuning: Faster R-CNN C4 (VOC07+12), Mask R-CNN FPN (COCO); AP"
TABLE = "detection-voc"


@dataclass(frozen=True)
class Config:
    head: str = "c4"  # c4 (Faster R-CNN R50-C4) or fpn (Mask R-CNN R50-FPN)
    backend: str = "torchvision"  # or detectron2 (MoCo's configs), used only where it is installed
    iterations: int = 24_000
    window: int = 1_000  # iterations between resume checkpoints
    batch_size: int = 16  # global
    reference_batch: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (18_000, 22_000)
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

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head={self.head}; choose one of {', '.join(HEADS)}")
        if self.backend not in ("torchvision", "detectron2"):
            raise ValueError(f"backend={self.backend}; choose torchvision (built in) or detectron2")
        if (
            min(
                self.iterations,
                self.window,
                self.batch_size,
                self.reference_batch,
                self.trials,
                self.roi_batch,
            )
            < 1
        ):
            raise ValueError(
                "iterations, window, batch_size, reference_batch, trials and roi_batch must be >= 1"
            )
        if self.iterations % self.window:
            raise ValueError(f"iterations ({self.iterations}) must be a multiple of window ({self.window})")
        if self.lr <= 0 or not self.min_sizes or min(self.min_sizes) < 1 or self.test_size < 1:
            raise ValueError("lr must be positive and min_sizes / test_size positive pixel sizes")
        if self.max_size < max(self.min_sizes):
            raise ValueError(
                f"max_size {self.max_size} is below the largest training size {max(self.min_sizes)}"
            )
        if not 0 < self.warmup_factor <= 1 or self.warmup < 0 or self.precise_bn < 0 or self.test_images < 0:
            raise ValueError("need 0 < warmup_factor <= 1 and non-negative warmup, precise_bn, test_images")

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / self.reference_batch

    def lr_factor(self, iteration: int) -> float:
        factor = self.gamma ** sum(iteration >= m for m in self.milestones)
        if iteration < self.warmup:
            alpha = iteration / self.warmup
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def _splits(ctx: RunContext, config: Config) -> tuple[DetectionSplit, DetectionSplit]:
    dataset = ctx.preset.dataset
    train = load_detection_split(dataset, config.train_split, ctx.data_root)
    test_dataset = "voc07" if dataset == "voc0712" else dataset  # VOC07+12 tests on VOC2007 test
    test = load_detection_split(test_dataset, config.test_split, ctx.data_root)
    if config.test_images:
        test.images = test.images[: config.test_images]
    return train, test


def run(ctx: RunContext, config: Config) -> TaskOutput:
    assert ctx.backbone is not None
    if config.backend == "detectron2":
        require_detectron2()  # before any work: one line saying how to install it
    train, test = _splits(ctx, config)
    world = current_world(ctx.extract.device)
    check_global_batch(config.batch_size, world)
    if config.head == "fpn" and train.dataset != "coco":
        raise BadInput("head=fpn trains Mask R-CNN and needs instance masks: use it with det-coco")
    trials, states = [], []
    for trial in range(config.trials):
        seed = config.seed + trial
        identity = run_identity(ctx, config, world.world_size, seed=seed, data=_fingerprint(train))
        state = ResumeState(ctx.cache.root, identity, world)
        states.append(state)
        if config.backend == "detectron2":
            trials.append({"metrics": _with_detectron2(ctx, config, train, test, seed, state), "history": []})
        else:
            trials.append(_train_and_test(ctx, config, train, test, seed, world, state))
    for state in states:
        state.clear()
    keys = [k for k in trials[0]["metrics"]]
    metrics: dict[str, Any] = {k: float(np.mean([t["metrics"][k] for t in trials])) for k in keys}
    metrics["trials"] = [t["metrics"] for t in trials]
    if len(trials) > 1:
        metrics["std"] = {k: float(np.std([t["metrics"][k] for t in trials], ddof=1)) for k in keys}
    return TaskOutput(
        metrics=metrics,
        dataset={
            "name": ctx.preset.dataset,
            "display": f"{ctx.preset.dataset} (synthetic)" if train.synthetic else ctx.preset.dataset,
            "synthetic": train.synthetic,
            "root": str(train.root),
            "fingerprint": _fingerprint(train),
            "train": {"split": train.split, "images": len(train), "objects": train.objects},
            "test": {"split": test.split, "images": len(test), "objects": test.objects},
            "classes": len(train.classes),
        },
        protocol={"c4": "faster-rcnn-c4", "fpn": "mask-rcnn-fpn"}[config.head],
        seeds=[config.seed + t for t in range(config.trials)],
        details={
            "arch": ctx.backbone.arch,
            "backend": config.backend,
            "global_batch": config.batch_size,
            "lr_scaled": config.scaled_lr,
            "history": [t["history"] for t in trials],
        },
    )


def _with_detectron2(
    ctx: RunContext,
    config: Config,
    train: DetectionSplit,
    test: DetectionSplit,
    seed: int,
    state: ResumeState,
) -> dict[str, float]:
    """One trial with detectron2: the backbone converted to its names (MoCo's convention), the
    splits registered under npidbench names, detectron2's trainer (resumable from its own
    checkpoints in the run's folder)."""
    assert ctx.backbone is not None
    output = state.folder / "detectron2"
    output.mkdir(parents=True, exist_ok=True)
    weights = export_backbone(ctx.backbone.model, "detectron2", output / "backbone.pkl")
    depth = int(ctx.backbone.arch.removeprefix("resnet"))
    if train.dataset == "coco":
        data = {
            "train": [
                (
                    f"npidbench_coco_{train.split}",
                    train.root / "annotations" / f"instances_{train.split}.json",
                    train.root / train.split,
                )
            ],
            "test": [
                (
                    f"npidbench_coco_{test.split}",
                    test.root / "annotations" / f"instances_{test.split}.json",
                    test.root / test.split,
                )
            ],
        }
    else:
        root07, _ = dataset_root("voc07", ctx.data_root)
        train_parts = [("2007", find_year_dir(root07, "2007"))]
        if ctx.preset.dataset == "voc0712":
            root12, _ = dataset_root("voc12", ctx.data_root)
            train_parts.append(("2012", find_year_dir(root12, "2012")))
        data = {
            "train": [
                (f"npidbench_voc{y}_{config.train_split}", d, config.train_split, y) for y, d in train_parts
            ],
            "test": [
                (
                    f"npidbench_voc2007_{config.test_split}",
                    find_year_dir(root07, "2007"),
                    config.test_split,
                    "2007",
                )
            ],
        }
    return run_detectron2(
        replace(config, seed=seed),
        config.head,
        depth,
        weights,
        train.dataset,
        data,
        output,
        list(train.classes),
    )


def _fingerprint(split: DetectionSplit) -> str:
    digest = hashlib.sha256()
    for image in split.images:
        digest.update(f"{image.path}\t{image.boxes.tobytes().hex()}\t{image.labels.tolist()}\n".encode())
    return digest.hexdigest()


def _train_and_test(
    ctx: RunContext,
    config: Config,
    train: DetectionSplit,
    test: DetectionSplit,
    seed: int,
    world: DistInfo,
    state: ResumeState,
) -> dict[str, Any]:
    assert ctx.backbone is not None
    device = torch.device(world.device)
    torch.manual_seed(seed)  # the new layers' initial weights
    model: nn.Module = build_detector(
        copy.deepcopy(ctx.backbone.model),
        config.head,
        len(train.classes),
        config.min_sizes,
        config.max_size,
        config.test_size,
        config.roi_resolution,
    )
    model.roi_heads.fg_bg_sampler.batch_size_per_image = config.roi_batch
    model.rpn._post_nms_top_n = {"training": config.proposals_train, "testing": config.proposals_test}
    model, wrapped = prepare_for_training(model, world, config.sync_bn, channels_last=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.scaled_lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=True
    )
    dataset = DetectionImages(train, seed, masks=config.head == "fpn")
    windows = config.iterations // config.window
    batches = window_batches(
        dataset,
        len(train),
        world,
        config.batch_size,
        config.window,
        seed,
        ctx.extract.workers,
        collate_detection,
    )

    def losses(batch) -> torch.Tensor:
        images, targets, error = batch
        if error is not None:
            raise BadInput(f"unreadable training image {error} (replace the file)")
        images = [image.to(device).float() / 255 for image in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        return sum(wrapped(images, targets).values())

    def step(batch) -> StepResult:
        return StepResult(losses(batch), len(batch[0]), None)

    history = fit(
        label=f"{ctx.preset.name} seed {seed}",
        trainable=model,
        optimizer=optimizer,
        base_lrs=[config.scaled_lr],
        schedule=StepSchedule(windows, (), 1.0),
        batches=batches,
        step=step,
        evaluate=None,
        evaluate_at=lambda window: False,
        state=state,
        world=world,
        images_per_epoch=config.window * config.batch_size,
        iterations_per_epoch=config.window,
        lr_at=config.lr_factor,
        step_seed=seed,  # proposal and RoI sampling: a resumed run repeats the uninterrupted one
    )
    if config.precise_bn:
        log(f"precise BN over {config.precise_bn} training batches")
        torch.manual_seed(mix_seed(seed, 7))
        precise_bn(model, batches(windows), config.precise_bn, losses)
    metrics = evaluate(model, test, config.head, world, device)
    return {"metrics": metrics, "history": history}


@torch.no_grad()
def predict(
    model: nn.Module, split: DetectionSplit, world: DistInfo, device: torch.device
) -> list[tuple[int, dict]]:
    """(image index, outputs on the CPU) for this rank's share of ``split``."""
    model.eval()
    out = []
    for index in range(world.rank, len(split), world.world_size):
        path = split.images[index].path
        try:
            pixels = decode_rgb(path)
        except (RuntimeError, OSError, ValueError) as exc:
            raise BadInput(f"unreadable image {path}: {decode_error_reason(exc)}") from exc
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
    return coco_metrics(split, outputs, masks=head == "fpn")


def voc_metrics(split: DetectionSplit, outputs: list[tuple[int, dict]]) -> dict[str, float]:
    """VOC07 11-point AP (detectron2's evaluator): detections written 1-based (x1 + 1, y1 + 1),
    compared with the annotation's boxes, difficult objects ignored."""
    per_class = {}
    for c, name in enumerate(split.classes):
        truth = {
            str(i): GroundTruth(
                image.boxes[image.labels == c].astype(np.float64), image.difficult[image.labels == c]
            )
            for i, image in enumerate(split.images)
        }
        detections = []
        for index, result in outputs:
            keep = result["labels"] == c + 1
            for box, score in zip(
                result["boxes"][keep].tolist(), result["scores"][keep].tolist(), strict=True
            ):
                detections.append((str(index), score, [box[0] + 1, box[1] + 1, box[2], box[3]]))
        per_class[name] = (detections, truth)
    summary = voc_detection_summary(per_class)
    return {"mAP": summary["AP"], "AP50": summary["AP50"], "AP75": summary["AP75"]}


def coco_metrics(split: DetectionSplit, outputs: list[tuple[int, dict]], masks: bool) -> dict[str, float]:
    from pycocotools import mask as mask_utils

    annotations = split.root / "annotations" / f"instances_{split.split}.json"
    ground_truth = json.loads(annotations.read_text())
    boxes, segms = [], []
    for index, result in outputs:
        image_id = split.images[index].image_id
        for k in range(len(result["scores"])):
            x1, y1, x2, y2 = result["boxes"][k].tolist()
            entry = {
                "image_id": image_id,
                "category_id": split.category_ids[int(result["labels"][k]) - 1],
                "score": float(result["scores"][k]),
            }
            boxes.append({**entry, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            if masks:
                binary = (result["masks"][k, 0] > 0.5).numpy().astype(np.uint8)
                rle = mask_utils.encode(np.asfortranarray(binary))
                rle["counts"] = rle["counts"].decode("ascii")
                segms.append({**entry, "segmentation": rle})
    ids = [image.image_id for image in split.images]  # the evaluated images (test_images=N)
    metrics = {f"{k}(Box)": v for k, v in coco_ap(ground_truth, boxes, "bbox", ids).items()}
    if masks:
        metrics.update({f"{k}(Mask)": v for k, v in coco_ap(ground_truth, segms, "segm", ids).items()})
    return metrics

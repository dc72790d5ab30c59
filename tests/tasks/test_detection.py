"""Detection protocol details (issue 13 item 7): RoIAlign aligned=True, no weight decay on norm
layers where detectron2 has none, VOC AP exactly as detectron2's PascalVOCDetectionEvaluator
(rounded as it writes detections, empty classes at 0, ties visited as voc_eval visits them), and mmdetection's epoch
schedule for det-coco with its iterations computed and recorded."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from npidbench.data.splits import DetectionImage, DetectionSplit
from npidbench.data.voc import VOC_CLASSES
from npidbench.errors import BadInput, RunFailed
from npidbench.metrics_dense import voc_metrics
from npidbench.runner import resolve_config
from npidbench.tasks import get_preset
from npidbench.transfer.detection import build_detector

from helpers import interrupt_after_first_window, run_preset


def _voc_split(
    images: list[tuple[int, int, list[tuple[list[int], int, bool]]]], classes: int
) -> DetectionSplit:
    """(width, height, [(1-based box, class, difficult)]) per image -> an in-memory VOC split."""
    built = []
    for i, (width, height, objects) in enumerate(images):
        built.append(
            DetectionImage(
                path=f"{i:06d}.jpg",
                width=width,
                height=height,
                boxes=np.array([o[0] for o in objects], dtype=np.float32).reshape(-1, 4),
                labels=np.array([o[1] for o in objects], dtype=np.int64),
                difficult=np.array([o[2] for o in objects], dtype=bool),
                crowd=np.zeros(len(objects), dtype=bool),
                image_id=f"{i:06d}",
            )
        )
    return DetectionSplit("voc", "test", Path("."), built, list(VOC_CLASSES[:classes]), True)


def _output(boxes, scores, labels) -> dict[str, torch.Tensor]:
    """A model output: 0-based float32 boxes, float32 scores, 1-based labels."""
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


# --- VOC evaluation -------------------------------------------------------------------------


def test_scores_are_rounded_to_three_decimals_before_ranking():
    # image 0: no object, a false positive at 0.1236; image 1: one object found at 0.1244.
    # Unrounded the true positive ranks first (AP 100); written as "0.124" both tie, and the
    # tie keeps the written order (image 0 first): precision 0.5 at every recall level.
    split = _voc_split([(50, 50, []), (50, 50, [([1, 1, 10, 10], 0, False)])], classes=1)
    outputs = [
        (0, _output([[30, 30, 40, 40]], [0.1236], [1])),
        (1, _output([[0, 0, 10, 10]], [0.1244], [1])),
    ]
    assert voc_metrics(split, outputs)["AP50"] == pytest.approx(50.0, abs=1e-12)


def test_boxes_are_rounded_to_a_tenth_of_a_pixel_after_the_one_pixel_shift():
    # Object [1, 1, 10, 10]; the 0-based detection [0, 0, 5.04, 10] is written [1, 1, 5.0, 10]:
    # IoU (+1 pixels) 5.0 * 10 / 100 = 0.5, not above 0.5, so a false positive (0.504 unrounded).
    split = _voc_split([(50, 50, [([1, 1, 10, 10], 0, False)])], classes=1)
    outputs = [(0, _output([[0, 0, 5.04, 10]], [0.9], [1]))]
    assert voc_metrics(split, outputs)["AP50"] == 0.0
    outputs = [(0, _output([[0, 0, 5.06, 10]], [0.9], [1]))]  # written 5.1: IoU 0.51
    assert voc_metrics(split, outputs)["AP50"] == pytest.approx(100.0, abs=1e-12)


def test_ties_keep_image_order_whatever_order_the_ranks_return():
    # Equal scores, a false positive in image 0 and a true positive in image 1. Under torchrun
    # rank r holds images r, r + W, ...: the gathered list is not in image order.
    split = _voc_split([(50, 50, []), (50, 50, [([1, 1, 10, 10], 0, False)])], classes=1)
    fp, tp = (0, _output([[30, 30, 40, 40]], [0.5], [1])), (1, _output([[0, 0, 10, 10]], [0.5], [1]))
    assert voc_metrics(split, [fp, tp]) == voc_metrics(split, [tp, fp])
    assert voc_metrics(split, [tp, fp])["AP50"] == pytest.approx(50.0, abs=1e-12)


def test_class_without_ground_truth_counts_zero_in_the_mean():
    # Two classes, the second absent from the split: detectron2's mean is (100 + 0) / 2.
    split = _voc_split([(50, 50, [([1, 1, 10, 10], 0, False)])], classes=2)
    outputs = [(0, _output([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 2]))]
    metrics = voc_metrics(split, outputs)
    assert metrics == pytest.approx({"mAP": 50.0, "AP50": 50.0, "AP75": 50.0}, abs=1e-12)


def _reference_voc(
    split: DetectionSplit, outputs: list[tuple[int, dict]], sort_kind: str = "quicksort"
) -> dict[str, float]:
    """detectron2's PascalVOCDetectionEvaluator + voc_eval, reimplemented here from the published
    algorithm (not from its code): every detection is written as a text line (image, score with 3
    decimals, x1 + 1 and y1 + 1 in float32, coordinates with 1 decimal) in image order and read
    back; per class the lines are sorted by decreasing score with numpy's default argsort, as
    detectron2 calls it (ties in numpy's order for that written order), each is matched greedily to its image's ground-truth box of largest IoU (+1 pixel
    convention) if that IoU is strictly above the threshold: a difficult box makes it neither
    true nor false, an already found box a false positive; recall over the non-difficult count;
    VOC07 11-point AP as sum of p / 11; then, in percent, the mean over the classes at each IoU
    threshold 0.50, 0.55, ..., 0.95 and the mean of those. ``sort_kind="stable"``: the order of
    ties a stable sort would give (to show that the order of ties matters in these cases)."""
    lines: dict[int, list[str]] = {c: [] for c in range(len(split.classes))}
    for index, result in sorted(outputs, key=lambda item: item[0]):
        boxes = result["boxes"].numpy().astype(np.float32)
        for box, score, label in zip(
            boxes, result["scores"].tolist(), result["labels"].tolist(), strict=True
        ):
            x1, y1 = box[0] + np.float32(1), box[1] + np.float32(1)
            coordinates = " ".join(format(float(v), ".1f") for v in (x1, y1, box[2], box[3]))
            lines[label - 1].append(f"image{index} {score:.3f} {coordinates}")
    by_threshold = {}
    for percent in range(50, 100, 5):
        threshold = percent / 100.0
        aps = []
        for c in range(len(split.classes)):
            truth, positives = {}, 0
            for i, image in enumerate(split.images):
                mine = image.labels == c
                truth[f"image{i}"] = [
                    image.boxes[mine].astype(np.float64),
                    image.difficult[mine],
                    [False] * int(mine.sum()),
                ]
                positives += int((~image.difficult[mine]).sum())
            fields = [line.split(" ") for line in lines[c]]
            scores = np.array([float(f[1]) for f in fields])
            order = np.argsort(-scores, kind=sort_kind)
            tp, fp = np.zeros(len(order)), np.zeros(len(order))
            for rank, k in enumerate(order):
                name, box = fields[k][0], [float(v) for v in fields[k][2:]]
                gt_boxes, difficult, found = truth[name]
                best, best_iou = -1, -math.inf
                for j, g in enumerate(gt_boxes):
                    w = max(min(box[2], g[2]) - max(box[0], g[0]) + 1.0, 0.0)
                    h = max(min(box[3], g[3]) - max(box[1], g[1]) + 1.0, 0.0)
                    inter = w * h
                    union = (
                        (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
                        + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0)
                        - inter
                    )
                    if inter / union > best_iou:
                        best, best_iou = j, inter / union
                if best_iou > threshold:
                    if difficult[best]:
                        continue
                    if found[best]:
                        fp[rank] = 1.0
                    else:
                        tp[rank], found[best] = 1.0, True
                else:
                    fp[rank] = 1.0
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            with np.errstate(invalid="ignore", divide="ignore"):
                recall = tp / float(positives)  # 0 / 0 = NaN for a class without ground truth
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            ap = 0.0
            for level in np.arange(0.0, 1.1, 0.1):
                reached = recall >= level  # NaN reaches no level: AP 0
                ap = ap + (np.max(precision[reached]) if reached.sum() else 0) / 11.0
            aps.append(ap * 100)
        by_threshold[percent] = np.mean(aps)
    return {
        "mAP": float(np.mean(list(by_threshold.values()))),
        "AP50": float(by_threshold[50]),
        "AP75": float(by_threshold[75]),
    }


def _random_case(rng: np.random.Generator, distinct_scores: bool = False):
    """A small VOC-like split and model outputs: a few classes (some without any object),
    difficult objects, detections near objects (duplicates, shifted ones) and anywhere, scores
    with ties before and after rounding to 3 decimals (unless ``distinct_scores``)."""
    classes = int(rng.integers(1, 6))
    images, outputs = [], []
    pool = rng.permutation(np.arange(50, 1000))  # distinct thousandths
    taken = 0
    for i in range(int(rng.integers(1, 7))):
        width, height = int(rng.integers(20, 120)), int(rng.integers(20, 120))
        objects = []
        for _ in range(int(rng.integers(0, 5))):
            x1, y1 = int(rng.integers(1, width - 4)), int(rng.integers(1, height - 4))
            x2, y2 = int(rng.integers(x1 + 1, width + 1)), int(rng.integers(y1 + 1, height + 1))
            c = int(rng.integers(0, max(1, classes - 1)))  # the last class is often empty
            objects.append(([x1, y1, x2, y2], c, bool(rng.random() < 0.25)))
        images.append((width, height, objects))
        boxes, scores, labels = [], [], []
        for _ in range(int(rng.integers(0, 9))):
            if objects and rng.random() < 0.7:
                (x1, y1, x2, y2), c, _ = objects[int(rng.integers(len(objects)))]
                if rng.random() < 0.2:
                    c = int(rng.integers(0, classes))
                box = np.array([x1 - 1, y1 - 1, x2, y2], dtype=np.float64) + rng.normal(
                    0, rng.choice([0.05, 1.5, 4]), 4
                )
            else:
                c = int(rng.integers(0, classes))
                x, y = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
                box = np.array([x, y, rng.uniform(x + 0.5, width), rng.uniform(y + 0.5, height)])
            box = np.clip(box, 0, [width, height, width, height])
            box[2:] = np.maximum(box[2:], box[:2] + 0.01)
            if distinct_scores:
                score = pool[taken] / 1000 + rng.uniform(-0.0004, 0.0004)
                taken += 1
            else:
                score = (
                    float(rng.choice([0.5, 0.5004, 0.4996, 0.9, 0.25, 0.05]))
                    if rng.random() < 0.5
                    else rng.uniform(0.05, 1)
                )
            boxes.append(box.tolist())
            scores.append(score)
            labels.append(c + 1)
        outputs.append((i, _output(boxes, scores, labels)))
    order = rng.permutation(len(outputs))  # as gathered from several ranks
    return _voc_split(images, classes), [outputs[k] for k in order]


def test_voc_ap_agrees_exactly_with_a_reimplementation_of_detectron2s_voc_eval():
    rng = np.random.default_rng(13)
    empty_classes = ties = 0
    for _ in range(300):
        split, outputs = _random_case(rng)
        assert voc_metrics(split, outputs) == _reference_voc(split, outputs)
        present = {int(label) for image in split.images for label in image.labels[~image.difficult]}
        empty_classes += len(split.classes) - len(present)
        rounded = [f"{s:.3f}" for _, out in outputs for s in out["scores"].tolist()]
        ties += len(rounded) - len(set(rounded))
    assert empty_classes > 50 and ties > 300  # the cases exercise both


def _write_voc_annotations(root: Path, split: DetectionSplit) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    names = []
    for image in split.images:
        objects = "".join(
            f"<object><name>{split.classes[int(label)]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{int(box[0])}</xmin><ymin>{int(box[1])}</ymin>"
            f"<xmax>{int(box[2])}</xmax><ymax>{int(box[3])}</ymax></bndbox></object>"
            for box, label, difficult in zip(image.boxes, image.labels, image.difficult, strict=True)
        )
        (root / "Annotations" / f"{image.image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        names.append(str(image.image_id))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names) + "\n")


def _detectron2_voc(split: DetectionSplit, outputs: list[tuple[int, dict]], root: Path) -> dict[str, float]:
    """detectron2's PascalVOCDetectionEvaluator on ``outputs``, the annotations written under ``root``."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation.pascal_voc_evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    _write_voc_annotations(root, split)
    name = f"npidbench_test_voc_{root}"
    MetadataCatalog.get(name).set(dirname=str(root), split="test", year=2007, thing_classes=split.classes)
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    for index, result in sorted(outputs, key=lambda item: item[0]):
        instances = Instances((1, 1))
        instances.pred_boxes = Boxes(result["boxes"])
        instances.scores = result["scores"]
        instances.pred_classes = result["labels"] - 1
        evaluator.process([{"image_id": split.images[index].image_id}], [{"instances": instances}])
    theirs = evaluator.evaluate()["bbox"]
    return {"mAP": theirs["AP"], "AP50": theirs["AP50"], "AP75": theirs["AP75"]}


def test_voc_ap_agrees_exactly_with_detectron2s_own_evaluator(tmp_path):
    """detectron2's PascalVOCDetectionEvaluator itself, where detectron2 is importable, on cases
    with many tied scores: the same detections in the same order visit ties in the same order."""
    pytest.importorskip("detectron2.evaluation.pascal_voc_evaluation")
    rng = np.random.default_rng(7)
    for case in range(60):
        split, outputs = _random_case(rng, distinct_scores=case % 2 == 0)
        assert voc_metrics(split, outputs) == _detectron2_voc(split, outputs, tmp_path / f"case{case}"), case


def test_the_order_of_tied_scores_matters_on_these_cases():
    """A stable sort of ties (another visit order) gives other APs in some of the random cases:
    the agreement above is a property of visiting ties as voc_eval does, not of the cases."""
    rng = np.random.default_rng(13)
    differ = sum(
        _reference_voc(*case, sort_kind="stable") != _reference_voc(*case)
        for case in (_random_case(rng) for _ in range(100))
    )
    assert differ > 5


# --- RoIAlign aligned=True ------------------------------------------------------------------


def _boxes(generator: torch.Generator, count: int, width: float, height: float) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width - 8, height - 8])
    wh = torch.rand(count, 2, generator=generator) ** 2 * torch.tensor([width, height]) + 2
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width, height]))], dim=1)


def test_c4_box_pooler_is_roi_align_aligned(random_checkpoint):
    from npidbench.checkpoint import load_backbone

    model = build_detector(
        load_backbone(random_checkpoint).model, "c4", 20, (64,), 160, 64, roi_resolution=14
    )
    pooler = model.roi_heads.box_roi_pool
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 12, 15, generator=generator)  # stride 16 of a 192 x 240 batch
    boxes = [_boxes(generator, 30, 240, 192), _boxes(generator, 20, 200, 180)]
    pooled = pooler(OrderedDict([("0", features)]), boxes, [(192, 240), (180, 200)])
    aligned = roi_align(features, boxes, 14, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    legacy = roi_align(features, boxes, 14, spatial_scale=1 / 16, sampling_ratio=0, aligned=False)
    assert torch.equal(pooled, aligned)
    assert not torch.allclose(pooled, legacy, atol=1e-3)  # the half-pixel shift matters


def _fpn_features(generator: torch.Generator, height: int, width: int) -> OrderedDict:
    maps = OrderedDict(
        (str(k), torch.randn(2, 4, height // 2 ** (k + 2), width // 2 ** (k + 2), generator=generator))
        for k in range(4)
    )
    maps["pool"] = torch.randn(2, 4, height // 64, width // 64, generator=generator)  # never pooled
    return maps


def _fpn_reference(maps: OrderedDict, boxes: list[torch.Tensor], size: int) -> torch.Tensor:
    """FPN eq. 1 over P2..P5 (level floor(4 + log2(sqrt(area) / 224)), clamped), aligned RoIAlign."""
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    levels = torch.floor(4 + torch.log2(torch.sqrt(area) / 224) + 1e-6).clamp(2, 5).long()
    out = torch.zeros(len(rois), 4, size, size)
    for level in range(2, 6):
        keep = levels == level
        out[keep] = roi_align(maps[str(level - 2)], rois[keep], size, 1 / 2**level, 0, aligned=True)
    return out


def test_fpn_box_and_mask_poolers_are_aligned_over_p2_to_p5(random_checkpoint):
    from npidbench.checkpoint import load_backbone

    model = build_detector(load_backbone(random_checkpoint).model, "fpn", 80, (64,), 160, 64)
    generator = torch.Generator().manual_seed(1)
    maps = _fpn_features(generator, 512, 640)
    boxes = [_boxes(generator, 60, 640, 512), _boxes(generator, 40, 600, 500)]
    shapes = [(512, 640), (500, 600)]
    for pooler, size in ((model.roi_heads.box_roi_pool, 7), (model.roi_heads.mask_roi_pool, 14)):
        assert torch.equal(pooler(maps, boxes, shapes), _fpn_reference(maps, boxes, size))
        assert pooler.sampling_ratio == 0  # mmdetection's roi_layer sampling_ratio=0


def test_fpn_pooler_matches_detectron2s_roialignv2_pooler(random_checkpoint):
    poolers = pytest.importorskip("detectron2.modeling.poolers")
    from detectron2.structures import Boxes

    from npidbench.checkpoint import load_backbone

    model = build_detector(load_backbone(random_checkpoint).model, "fpn", 80, (64,), 160, 64)
    generator = torch.Generator().manual_seed(2)
    maps = _fpn_features(generator, 512, 640)
    boxes = [_boxes(generator, 80, 640, 512), _boxes(generator, 50, 600, 500)]
    reference = poolers.ROIPooler(7, (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    theirs = reference([maps[str(k)] for k in range(4)], [Boxes(b) for b in boxes])
    assert torch.equal(model.roi_heads.box_roi_pool(maps, boxes, [(512, 640), (500, 600)]), theirs)


# --- weight decay of norm layers --------------------------------------------------------------


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    out = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert id(parameter) not in out
            out[id(parameter)] = group["weight_decay"]
    return out


@pytest.mark.parametrize("head", ["c4", "fpn"])
def test_norm_layers_get_no_weight_decay_in_mocos_detectron2_protocols(random_checkpoint, head):
    from npidbench.checkpoint import load_backbone
    from npidbench.tasks.detection import make_optimizer

    config = resolve_config(get_preset("det-voc0712"), False, [])
    assert config.norm_weight_decay == 0.0 and config.weight_decay == 1e-4
    model = build_detector(load_backbone(random_checkpoint).model, head, 20, (64,), 160, 64)
    decay = _decay_of(make_optimizer(model, config))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    assert norm_params and all(decay[p] == 0.0 for p in norm_params)
    others = [p for p in model.parameters() if id(p) not in norm_params]
    assert others and all(decay[id(p)] == 1e-4 for p in others)
    assert set(decay) == {id(p) for p in model.parameters() if p.requires_grad}  # every one, once
    if head == "c4":
        assert decay[id(model.roi_heads.box_head.norm.weight)] == 0.0  # MoCo's extra BN after res5
        assert (
            decay[id(model.rpn.head.conv[0][0].bias)] == 1e-4
        )  # other biases decay (WEIGHT_DECAY_BIAS None)
        assert decay[id(model.roi_heads.box_predictor.cls_score.bias)] == 1e-4


def test_mmdetection_protocol_decays_every_parameter(random_checkpoint):
    from npidbench.checkpoint import load_backbone
    from npidbench.tasks.detection import make_optimizer

    config = resolve_config(get_preset("det-coco"), False, [])
    assert config.norm_weight_decay == config.weight_decay == 1e-4
    model = build_detector(load_backbone(random_checkpoint).model, "fpn", 80, (64,), 160, 64)
    decay = _decay_of(make_optimizer(model, config))
    assert set(decay.values()) == {1e-4} and len(decay) == len(list(model.parameters()))
    assert resolve_config(get_preset("det-coco-c4"), False, []).norm_weight_decay == 0.0


# --- det-coco: mmdetection's epoch schedule ------------------------------------------------------


def test_det_coco_is_mmdetections_mask_rcnn_1x_as_mmselfsup_ran_it():
    config = resolve_config(get_preset("det-coco"), False, [])
    assert (config.head, config.epochs, config.epoch_milestones) == ("fpn", 12, (8, 11))
    assert (config.iterations, config.milestones) == (0, ())
    assert (config.warmup, config.warmup_factor, config.gamma) == (1000, 0.001, 0.1)
    assert (config.batch_size, config.lr, config.momentum) == (16, 0.02, 0.9)
    assert config.min_sizes == (640, 672, 704, 736, 768, 800) and config.test_size == 800
    assert config.train_filter == "mmdet"
    synthetic = resolve_config(get_preset("det-coco"), True, [])
    assert (synthetic.epochs, synthetic.iterations) == (0, 200)  # the embedded data: iterations
    assert synthetic.scaled_lr == pytest.approx(0.02 * 4 / 16)  # the protocol's lr at batch 4


def test_epoch_schedule_iterations_milestones_and_windows():
    from npidbench.tasks.detection import schedule_for

    config = resolve_config(get_preset("det-coco"), False, [])
    # train2017 keeps 117266 images with annotations: ceil(117266 / 16) = 7330 per epoch
    schedule = schedule_for(config, 117_266)
    assert (schedule.iterations_per_epoch, schedule.iterations) == (7330, 87_960)
    assert schedule.milestones == (8 * 7330, 11 * 7330)
    assert schedule.iterations % schedule.window == 0 and schedule.window >= config.window
    assert schedule.window == 1466  # 87960 = 2^3 3 5 733: its smallest divisor >= 1000
    assert schedule.lr_factor(0) == pytest.approx(0.001)
    assert schedule.lr_factor(500) == pytest.approx(0.001 * 0.5 + 0.5)
    assert schedule.lr_factor(1000) == 1.0 and schedule.lr_factor(8 * 7330 - 1) == 1.0
    assert schedule.lr_factor(8 * 7330) == pytest.approx(0.1)
    assert schedule.lr_factor(11 * 7330) == pytest.approx(0.01)
    record = schedule.record()
    assert record["iterations"] == 87_960 and record["milestones"] == [58_640, 80_630]
    assert record["warmup"] == 1000 and record["epochs"] == 12 and record["train_images"] == 117_266
    small = schedule_for(resolve_config(get_preset("det-coco"), False, ["batch_size=8"]), 37)
    assert (small.iterations_per_epoch, small.iterations, small.window) == (5, 60, 60)  # window 1000 > total
    voc = schedule_for(resolve_config(get_preset("det-voc0712"), False, []), 16_551)
    assert (voc.iterations, voc.milestones, voc.window, voc.epochs) == (24_000, (18_000, 22_000), 1000, 0)


def test_epoch_and_iteration_schedules_are_not_mixed():
    preset = get_preset("det-coco")
    with pytest.raises(BadInput, match="leave iterations=0"):
        resolve_config(preset, False, ["iterations=100"])
    with pytest.raises(BadInput, match="epoch_milestones"):
        resolve_config(preset, False, ["epochs=6"])  # milestones 8 and 11 are past the end
    with pytest.raises(BadInput, match="epoch_milestones need epochs"):
        resolve_config(get_preset("det-voc0712"), False, ["epoch_milestones=[2]"])
    assert resolve_config(preset, False, ["epochs=0", "epoch_milestones=[]", "iterations=100", "window=50"])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("head=c5", "head='c5' is not one of c4, fpn"),
        ("backend=mmdet", "backend='mmdet' is not one of torchvision, detectron2"),
        ("train_filter=all", "train_filter='all' is not one of detectron2, mmdet"),
        ("roi_batch=0", "window, batch_size, reference_batch, trials and roi_batch must be at least 1"),
        ("window=7", r"iterations \(24000\) must be a multiple of window \(7\)"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(item, message):
    with pytest.raises(BadInput, match=message):
        resolve_config(get_preset("det-voc0712"), False, [item])


def _image(labels, crowd, width=100, height=80) -> DetectionImage:
    return DetectionImage(
        path="x.jpg",
        width=width,
        height=height,
        boxes=np.zeros((len(labels), 4), dtype=np.float32),
        labels=np.array(labels, dtype=np.int64),
        difficult=np.zeros(len(labels), dtype=bool),
        crowd=np.array(crowd, dtype=bool),
    )


def test_training_images_kept_as_each_reference_trainer_keeps_them():
    from npidbench.tasks.detection import kept_for_training

    empty, crowd_only, normal = _image([], []), _image([3], [True]), _image([3, 4], [True, False])
    thin = _image([1], [False], width=31, height=500)
    assert [kept_for_training(i, "detectron2") for i in (empty, crowd_only, normal, thin)] == [
        False,
        False,
        True,
        True,
    ]
    assert [kept_for_training(i, "mmdet") for i in (empty, crowd_only, normal, thin)] == [
        False,
        True,
        True,
        False,
    ]


@pytest.mark.slow
def test_epoch_schedule_runs_records_its_iterations_and_resumes(random_checkpoint, tmp_path, monkeypatch):
    """det-coco on the embedded COCO with an epoch schedule over 4 kept images at batch 2: 2
    iterations per epoch, 3 epochs, lr step after epoch 2; killed after the first window and
    resumed, it gives the uninterrupted run's metrics."""
    from npidbench.tasks import detection

    real = detection.training_split

    def four_images(split, rule):
        kept = real(split, rule)
        return detection.replace(kept, images=kept.images[:4])

    monkeypatch.setattr(detection, "training_split", four_images)
    options = [
        "epochs=3",
        "epoch_milestones=[2]",
        "iterations=0",
        "milestones=[]",
        "batch_size=2",
        "window=2",
        "warmup=2",
        "test_images=2",
        "precise_bn=1",
    ]
    straight = run_preset("det-coco", random_checkpoint, tmp_path / "a", options)
    schedule = straight["details"]["schedule"]
    assert schedule == {
        "epochs": 3,
        "train_images": 4,
        "iterations_per_epoch": 2,
        "iterations": 6,
        "milestones": [4],
        "warmup": 2,
        "warmup_factor": 0.001,
        "gamma": 0.1,
        "window": 2,
    }
    assert straight["details"]["weight_decay"] == {"default": 1e-4, "norm": 1e-4}
    (history,) = straight["details"]["history"]
    # the factor of each window's last iteration: iteration 1 is half-way through the warm-up
    assert [line["lr_factor"] for line in history] == [0.5005, 1.0, 0.1]

    saves = interrupt_after_first_window(monkeypatch)
    with pytest.raises(RunFailed, match="interrupted after 1 of 3"):
        run_preset("det-coco", random_checkpoint, tmp_path / "b", options)
    resumed = run_preset("det-coco", random_checkpoint, tmp_path / "b", options)
    assert saves == [1, 2, 3]
    assert resumed["metrics"] == straight["metrics"]

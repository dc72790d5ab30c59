"""Metrics of the detection and segmentation transfer benchmarks (PROTOCOLS.md "Detection",
"Segmentation"): VOC07 detection AP, COCO AP through pycocotools, mIoU from a confusion matrix,
and the detection table's numbers from a detector's outputs on a split (``voc_metrics``,
``coco_metrics``: outputs as (image index, torchvision detection dict on the CPU)).

The VOC detection AP is written here rather than taken from a library: pycocotools implements
COCO's 101-point rule, not the VOC07 11-point rule with difficult objects ignored that the VOC
table reports (detectron2's PascalVOCDetectionEvaluator, itself a port of the VOC devkit).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from npidbench.data.splits import DetectionSplit

VOC_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # .50:.95, as detectron2


@dataclass(frozen=True)
class GroundTruth:
    """One image's objects of one class: boxes (x1, y1, x2, y2) and their difficult flags."""

    boxes: np.ndarray  # (M, 4)
    difficult: np.ndarray  # (M,) bool


def _iou_voc(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU with the VOC devkit's inclusive pixel convention (width = x2 - x1 + 1)."""
    ix1 = np.maximum(boxes[:, 0], box[0])
    iy1 = np.maximum(boxes[:, 1], box[1])
    ix2 = np.minimum(boxes[:, 2], box[2])
    iy2 = np.minimum(boxes[:, 3], box[3])
    inter = np.maximum(ix2 - ix1 + 1.0, 0.0) * np.maximum(iy2 - iy1 + 1.0, 0.0)
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    return inter / (area + areas - inter)


def voc_detection_ap(
    detections: Sequence[tuple[str, float, Sequence[float]]],
    ground_truth: dict[str, GroundTruth],
    iou_threshold: float = 0.5,
    eleven_point: bool = True,
) -> float:
    """AP of one class, in [0, 1], computed as detectron2's ``voc_eval`` (a port of the VOC
    devkit; detectron2/evaluation/pascal_voc_evaluation.py) computes it.

    ``detections`` are (image id, score, box). They are visited in the order ``voc_eval`` visits
    them: ``np.argsort`` (numpy's default sort) of the negated float64 scores, so that the same
    detections in the same order (``voc_metrics`` gives them as detectron2 writes them: image
    order, then each image's own order) break ties exactly as detectron2 does. Each is
    matched to the ground-truth box of highest IoU (the first of equal ones) when that IoU
    exceeds the threshold strictly; a second match of a found box is a false positive. A match
    with a difficult box counts as neither a true nor a false positive; difficult boxes are not
    counted among the positives, and a class without any non-difficult box has AP 0 (in
    detectron2 its recall is 0 / 0, no recall level is reached and the 11-point AP is 0), never
    NaN. ``eleven_point``: the VOC07 rule, the best precision at recall >= 0, 0.1, ..., 1 summed
    one level at a time as p / 11 (detectron2's order of operations, so the floats agree);
    else the area under the interpolated curve (VOC2010+).
    """
    positives = sum(int((~gt.difficult).sum()) for gt in ground_truth.values())
    if positives == 0:
        return 0.0
    used = {image: np.zeros(len(gt.boxes), dtype=bool) for image, gt in ground_truth.items()}
    # numpy's default (introsort) order of ties, as voc_eval's np.argsort(-confidence)
    order = np.argsort(-np.array([float(d[1]) for d in detections], dtype=np.float64)).tolist()
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, index in enumerate(order):
        image, _, box = detections[index]
        gt = ground_truth.get(image)
        if gt is None or len(gt.boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = _iou_voc(np.asarray(box, dtype=np.float64), np.asarray(gt.boxes, dtype=np.float64))
        best = int(np.argmax(overlaps))
        if not overlaps[best] > iou_threshold:  # strictly above, as the VOC devkit
            fp[rank] = 1
        elif gt.difficult[best]:
            continue  # ignored
        elif used[image][best]:
            fp[rank] = 1  # a duplicate detection of an object already found
        else:
            tp[rank] = 1
            used[image][best] = True
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / float(positives)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if eleven_point:
        ap = 0.0
        for level in np.arange(0.0, 1.1, 0.1):
            reached = recall >= level
            ap += (float(precision[reached].max()) if reached.any() else 0.0) / 11.0
        return float(ap)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def voc_detection_summary(
    per_class: dict[str, tuple[list[tuple[str, float, Sequence[float]]], dict[str, GroundTruth]]],
) -> dict[str, float]:
    """The VOC table's numbers, in percent, as detectron2's PascalVOCDetectionEvaluator forms
    them: at each IoU threshold .50, .55, ..., .95 the mean over every class (in the given order)
    of 100 x its 11-point AP, a class without ground truth counting as 0; ``AP`` is the mean of
    the ten, ``AP50`` and ``AP75`` two of them."""
    by_threshold = {}
    for threshold in VOC_IOU_THRESHOLDS:
        aps = [voc_detection_ap(dets, gts, threshold) * 100 for dets, gts in per_class.values()]
        by_threshold[threshold] = float(np.mean(aps))
    return {
        "AP": float(np.mean(list(by_threshold.values()))),
        "AP50": by_threshold[0.5],
        "AP75": by_threshold[0.75],
    }


def coco_ap(
    ground_truth: dict, detections: list[dict], iou_type: str = "bbox", image_ids: list | None = None
) -> dict[str, float]:
    """COCO AP / AP50 / AP75 (percent) with pycocotools' COCOeval. ``ground_truth`` is a COCO
    instances dict, ``detections`` COCO result dicts (image_id, category_id, score, bbox or
    segmentation); ``image_ids`` restricts the evaluation to those images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress and summary
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        if not detections:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"AP": float(stats[0]) * 100, "AP50": float(stats[1]) * 100, "AP75": float(stats[2]) * 100}


def voc_written(image: str, score: float, box: list[float]) -> tuple[str, float, list[float]]:
    """A detection as detectron2's PascalVOCDetectionEvaluator writes it and voc_eval reads it
    back: the score with 3 decimals, the coordinates with 1 ("{score:.3f} {xmin:.1f} ...",
    pascal_voc_evaluation.py:67; parsed with float(), :241-242)."""
    return image, float(f"{score:.3f}"), [float(f"{v:.1f}") for v in box]


def voc_metrics(split: DetectionSplit, outputs: list[tuple[int, dict]]) -> dict[str, float]:
    """VOC07 11-point AP as detectron2's PascalVOCDetectionEvaluator computes it: the model's
    0-based boxes (the training targets are, as detectron2's VOC loader) go back to VOC's 1-based
    pixels with x1 + 1, y1 + 1 in float32 (pascal_voc_evaluation.py:64-65 on the float32 box),
    each detection is rounded as the evaluator writes it (``voc_written``), and they are listed
    in image order, each image's in the model's order, as the evaluator writes them, so that
    ``voc_detection_ap`` visits tied scores in voc_eval's order. Compared with the annotation's
    boxes, difficult objects ignored; a class without ground truth has AP 0."""
    detections: list[list[tuple[str, float, list[float]]]] = [[] for _ in split.classes]
    for index, result in sorted(outputs, key=lambda item: item[0]):  # stable: ranks' shares merged
        boxes = result["boxes"].to(torch.float32).clone()
        boxes[:, :2] += 1  # float32 arithmetic, as detectron2's numpy float32 box
        for label, score, box in zip(
            result["labels"].tolist(), result["scores"].tolist(), boxes.tolist(), strict=True
        ):
            detections[int(label) - 1].append(voc_written(str(index), score, box))
    per_class = {}
    for c, name in enumerate(split.classes):
        truth = {
            str(i): GroundTruth(
                image.boxes[image.labels == c].astype(np.float64), image.difficult[image.labels == c]
            )
            for i, image in enumerate(split.images)
        }
        per_class[name] = (detections[c], truth)
    summary = voc_detection_summary(per_class)
    return {"mAP": summary["AP"], "AP50": summary["AP50"], "AP75": summary["AP75"]}


def coco_metrics(split: DetectionSplit, outputs: list[tuple[int, dict]], masks: bool) -> dict[str, float]:
    """COCO box (and, with ``masks``, mask) AP / AP50 / AP75 in percent: the outputs as COCO
    results (x, y, width, height boxes; masks binarised at 0.5 and RLE-encoded) against the
    split's instances json, over the split's images only (``test_images=N``: its first N)."""
    from pycocotools import mask as mask_utils

    annotations = split.root / "annotations" / f"instances_{split.split}.json"
    ground_truth = json.loads(annotations.read_text())
    boxes, segms = [], []
    for index, result in outputs:
        image_id = split.images[index].image_id
        # x, y, width, height in the boxes' float32, as detectron2's COCOEvaluator converts them
        # (BoxMode.convert, instances_to_coco_json): the same detections score the same AP
        xywh = result["boxes"].to(torch.float32).clone()
        xywh[:, 2:] -= xywh[:, :2]
        for k in range(len(result["scores"])):
            entry = {
                "image_id": image_id,
                "category_id": split.category_ids[int(result["labels"][k]) - 1],
                "score": float(result["scores"][k]),
            }
            boxes.append({**entry, "bbox": xywh[k].tolist()})
            if masks:
                binary = (result["masks"][k, 0] >= 0.5).numpy().astype(np.uint8)  # mmdet / detectron2: >=
                rle = mask_utils.encode(np.asfortranarray(binary))
                rle["counts"] = rle["counts"].decode("ascii")
                segms.append({**entry, "segmentation": rle})
    ids = [image.image_id for image in split.images]  # the evaluated images (test_images=N)
    metrics = {f"{k}(Box)": v for k, v in coco_ap(ground_truth, boxes, "bbox", ids).items()}
    if masks:
        metrics.update({f"{k}(Mask)": v for k, v in coco_ap(ground_truth, segms, "segm", ids).items()})
    return metrics


def confusion_matrix(
    prediction: np.ndarray, target: np.ndarray, classes: int, ignore: int = 255
) -> np.ndarray:
    """(classes, classes) counts, rows = target class, columns = predicted, over the pixels whose
    target is not ``ignore`` (mmseg 0.x intersect_and_union: ``mask = label != ignore_index``).

    Raises ValueError, naming the values, when a prediction is outside [0, classes) or a target is
    outside [0, classes) and not ``ignore``: mmseg's histograms would drop such a pixel silently
    (torch.histc over [0, classes - 1]) and a flat bincount index would put it in a wrong cell.
    """
    if classes < 1:
        raise ValueError(f"classes must be at least 1, got {classes}")
    prediction, target = np.asarray(prediction), np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    for name, array in (("prediction", prediction), ("target", target)):
        if array.dtype.kind not in "iub":
            raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    prediction = prediction.ravel().astype(np.int64)
    target = target.ravel().astype(np.int64)
    outside = np.unique(prediction[(prediction < 0) | (prediction >= classes)])
    if outside.size:
        raise ValueError(f"predictions outside [0, {classes}): {_some(outside)}")
    keep = target != ignore
    outside = np.unique(target[keep & ((target < 0) | (target >= classes))])
    if outside.size:
        raise ValueError(
            f"targets outside [0, {classes}) that are not the ignore value {ignore}: {_some(outside)}"
        )
    index = target[keep] * classes + prediction[keep]
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def _some(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"{shown}, ... ({len(values)} distinct values)" if len(values) > limit else shown


def mean_iou(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU in percent, per-class IoU): IoU = TP / (TP + FP + FN); classes absent from both
    targets and predictions are NaN and left out of the mean (nanmean, as mmsegmentation)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou)) * 100, iou

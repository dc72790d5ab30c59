"""Metrics of the detection and segmentation transfer benchmarks (PROTOCOLS.md "Detection",
"Segmentation"): VOC07 detection AP, COCO AP through pycocotools, mIoU from a confusion matrix.

The VOC detection AP is written here rather than taken from a library: pycocotools implements
COCO's 101-point rule, not the VOC07 11-point rule with difficult objects ignored that the VOC
table reports (detectron2's PascalVOCDetectionEvaluator, itself a port of the VOC devkit).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
    """AP of one class: ``detections`` are (image id, score, box); each is matched, in order of
    decreasing score, to the ground-truth box of highest IoU when that IoU exceeds the threshold
    (strictly, as the VOC devkit); a second match of a found box is a false positive. A match
    with a difficult box counts as neither a true nor a false positive; difficult boxes are not
    counted among the positives. ``eleven_point``: the VOC07 rule (mean of the best precision at
    recall >= 0, 0.1, ..., 1); else the area under the interpolated curve (VOC2010+).
    """
    positives = sum(int((~gt.difficult).sum()) for gt in ground_truth.values())
    if positives == 0:
        return float("nan")
    used = {image: np.zeros(len(gt.boxes), dtype=bool) for image, gt in ground_truth.items()}
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])  # stable for ties
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
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if eleven_point:
        return float(
            np.mean(
                [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.arange(0, 1.1, 0.1)]
            )
        )
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def voc_detection_summary(
    per_class: dict[str, tuple[list[tuple[str, float, Sequence[float]]], dict[str, GroundTruth]]],
) -> dict[str, float]:
    """The VOC table's numbers, in percent: ``AP`` (mean over IoU .50:.95 of the class-mean
    11-point AP, as detectron2's VOC evaluator), ``AP50`` and ``AP75``."""
    by_threshold = {}
    for threshold in VOC_IOU_THRESHOLDS:
        aps = [voc_detection_ap(dets, gts, threshold) for dets, gts in per_class.values()]
        by_threshold[threshold] = float(np.nanmean(aps)) * 100
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


def confusion_matrix(
    prediction: np.ndarray, target: np.ndarray, classes: int, ignore: int = 255
) -> np.ndarray:
    """(classes, classes) counts, rows = target class, columns = predicted; ``ignore`` pixels and
    targets outside [0, classes) are left out."""
    target = np.asarray(target).ravel()
    prediction = np.asarray(prediction).ravel()
    keep = (target != ignore) & (target >= 0) & (target < classes)
    index = target[keep].astype(np.int64) * classes + prediction[keep].astype(np.int64)
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def mean_iou(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU in percent, per-class IoU): IoU = TP / (TP + FP + FN); classes absent from both
    targets and predictions are NaN and left out of the mean (nanmean, as mmsegmentation)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou)) * 100, iou

"""Detection and segmentation metrics on hand-made inputs with exact expected values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from npidbench.metrics_dense import (
    GroundTruth,
    coco_ap,
    confusion_matrix,
    mean_iou,
    voc_detection_ap,
    voc_detection_summary,
)

A, B, C = [0, 0, 9, 9], [20, 20, 29, 29], [0, 0, 9, 9]
GT = {
    "img1": GroundTruth(np.array([A, B], dtype=float), np.array([False, True])),
    "img2": GroundTruth(np.array([C], dtype=float), np.array([False])),
}
DETECTIONS = [
    ("img1", 0.9, A),  # true positive
    ("img1", 0.8, B),  # matches a difficult object: ignored
    ("img2", 0.7, [50, 50, 59, 59]),  # false positive (no overlap)
    ("img1", 0.6, A),  # duplicate of a found object: false positive
    ("img2", 0.5, C),  # true positive
]


def test_voc07_eleven_point_ap_exact():
    # recall .5 .5 .5 .5 1 / precision 1 1 .5 .33 .5: six points at 1, five at .5
    assert voc_detection_ap(DETECTIONS, GT, 0.5) == pytest.approx(8.5 / 11, abs=1e-12)


def test_area_ap_exact():
    assert voc_detection_ap(DETECTIONS, GT, 0.5, eleven_point=False) == pytest.approx(0.75, abs=1e-12)


def test_iou_must_exceed_the_threshold_with_inclusive_pixels():
    # [0,0,9,9] vs [5,0,14,9]: 5x10 / (100 + 100 - 50) = 1/3 with the +1 convention.
    shifted = [("img2", 1.0, [5, 0, 14, 9])]
    gt = {"img2": GroundTruth(np.array([C], dtype=float), np.array([False]))}
    assert voc_detection_ap(shifted, gt, 0.3) == 1.0
    assert voc_detection_ap(shifted, gt, 1 / 3) == 0.0  # equal is not enough (VOC devkit: ov > thresh)


def test_summary_averages_thresholds_and_classes():
    exact = {"cat": ([("i", 1.0, A)], {"i": GroundTruth(np.array([A], dtype=float), np.array([False]))})}
    summary = voc_detection_summary(exact)
    assert summary == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    only_difficult = {"dog": ([], {"i": GroundTruth(np.array([A], dtype=float), np.array([True]))})}
    assert math.isnan(voc_detection_ap([], only_difficult["dog"][1]))
    assert voc_detection_summary({**exact, **only_difficult})["AP"] == 100.0  # nan classes left out


def test_coco_ap_tiny_case():
    ground_truth = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
        ],
    }
    exact = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.8},
    ]
    assert coco_ap(ground_truth, exact) == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    # A false positive ranked first: interpolated precision 2/3 at every recall level.
    with_fp = [{"image_id": 1, "category_id": 1, "bbox": [0, 70, 10, 10], "score": 0.95}, *exact]
    assert coco_ap(ground_truth, with_fp) == pytest.approx({"AP": 200 / 3, "AP50": 200 / 3, "AP75": 200 / 3})
    assert coco_ap(ground_truth, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_miou_exact_with_ignore_and_absent_class():
    target = np.array([[0, 0, 1], [1, 255, 2]])
    prediction = np.array([[0, 1, 1], [1, 0, 0]])
    matrix = confusion_matrix(prediction, target, classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    miou, per_class = mean_iou(matrix)
    assert per_class[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(per_class[3])
    assert miou == pytest.approx(100 / 3)

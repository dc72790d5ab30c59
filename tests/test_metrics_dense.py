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
PERFECT = sum([1.0 / 11.0] * 11)  # detectron2's 11-point AP of a perfect class (p / 11 summed in order)


def test_voc07_eleven_point_ap_exact():
    # recall .5 .5 .5 .5 1 / precision 1 1 .5 .33 .5: six points at 1, five at .5
    assert voc_detection_ap(DETECTIONS, GT, 0.5) == pytest.approx(8.5 / 11, abs=1e-12)


def test_area_ap_exact():
    assert voc_detection_ap(DETECTIONS, GT, 0.5, eleven_point=False) == pytest.approx(0.75, abs=1e-12)


def test_iou_must_exceed_the_threshold_with_inclusive_pixels():
    # [0,0,9,9] vs [5,0,14,9]: 5x10 / (100 + 100 - 50) = 1/3 with the +1 convention.
    shifted = [("img2", 1.0, [5, 0, 14, 9])]
    gt = {"img2": GroundTruth(np.array([C], dtype=float), np.array([False]))}
    assert voc_detection_ap(shifted, gt, 0.3) == PERFECT
    assert voc_detection_ap(shifted, gt, 1 / 3) == 0.0  # equal is not enough (VOC devkit: ov > thresh)


def test_summary_averages_thresholds_and_classes():
    exact = {"cat": ([("i", 1.0, A)], {"i": GroundTruth(np.array([A], dtype=float), np.array([False]))})}
    summary = voc_detection_summary(exact)
    assert summary == {"AP": PERFECT * 100, "AP50": PERFECT * 100, "AP75": PERFECT * 100}
    only_difficult = {"dog": ([], {"i": GroundTruth(np.array([A], dtype=float), np.array([True]))})}
    assert voc_detection_ap([], only_difficult["dog"][1]) == 0.0
    # detectron2's evaluator: np.mean over every class, one without ground truth at AP 0 (it was
    # left out by np.nanmean, which turned this 50 into 100)
    assert voc_detection_summary({**exact, **only_difficult}) == pytest.approx(
        {"AP": 50.0, "AP50": 50.0, "AP75": 50.0}, abs=1e-12
    )


def test_class_without_ground_truth_is_zero_with_or_without_detections():
    no_truth = {"i": GroundTruth(np.zeros((0, 4)), np.zeros(0, dtype=bool))}
    only_difficult = {"i": GroundTruth(np.array([A], dtype=float), np.array([True]))}
    for truth in (no_truth, only_difficult, {}):
        for detections in ([], [("i", 0.9, A)], [("i", 0.9, A), ("i", 0.8, B)]):
            assert voc_detection_ap(detections, truth) == 0.0
            assert voc_detection_ap(detections, truth, eleven_point=False) == 0.0
    # 20 VOC classes, 3 of them absent from a small split: the mean is over all 20
    perfect = ([("i", 1.0, A)], {"i": GroundTruth(np.array([A], dtype=float), np.array([False]))})
    per_class = {f"c{k}": perfect if k < 17 else ([("i", 0.5, A)], no_truth) for k in range(20)}
    assert voc_detection_summary(per_class)["AP50"] == pytest.approx(85.0, abs=1e-12)


def test_eleven_point_sum_is_detectron2s_order_of_operations():
    # detectron2's voc_ap adds p / 11 one recall level at a time: a perfect class is 1 + 2e-16,
    # where np.mean of the eleven precisions is exactly 1.
    assert PERFECT != 1.0 and abs(PERFECT - 1.0) < 1e-15
    gt = {"i": GroundTruth(np.array([A], dtype=float), np.array([False]))}
    assert voc_detection_ap([("i", 1.0, A)], gt) == PERFECT


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


@pytest.mark.parametrize(
    "prediction, target, message",
    [
        ([[0, 4], [1, -1]], [[0, 0], [1, 1]], r"predictions outside \[0, 4\): -1, 4"),
        ([[0, 9], [1, 2]], [[0, 255], [1, 1]], r"predictions outside \[0, 4\): 9"),  # on an ignored pixel
        ([[0, 1], [1, 2]], [[0, 7], [255, 4]], r"targets outside \[0, 4\) .*ignore value 255: 4, 7"),
        ([[0, 1], [1, 2]], [[0, -3], [1, 1]], r"targets outside \[0, 4\) .*: -3"),
    ],
)
def test_confusion_matrix_refuses_values_outside_the_classes(prediction, target, message):
    # Today's flat index would put prediction 4 at target 0 into the cell (1, 0).
    with pytest.raises(ValueError, match=message):
        confusion_matrix(np.array(prediction), np.array(target), classes=4)


def test_confusion_matrix_refuses_mismatched_or_non_integer_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 3), dtype=np.int64), np.zeros((3, 2), dtype=np.uint8), classes=2)
    with pytest.raises(ValueError, match="integer class ids"):
        confusion_matrix(np.array([0.0, 1.5]), np.array([0, 1]), classes=2)


def _mmseg_mean_iou(predictions, labels, classes: int, ignore: int):
    """mmseg 0.x mmseg/core/evaluation/metrics.py, rewritten here: per image intersect_and_union
    (mask = label != ignore_index; intersect = pred[pred == label]; torch.histc of intersect, pred
    and label with bins=classes over [0, classes - 1]; union = pred + label - intersect), totals
    summed over images in float64, IoU = total intersect / total union, nanmean over classes."""
    import torch

    totals = {k: torch.zeros(classes, dtype=torch.float64) for k in ("intersect", "union")}
    for pred, label in zip(predictions, labels, strict=True):
        pred, label = torch.from_numpy(pred), torch.from_numpy(label)
        mask = label != ignore
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]

        def hist(x):
            return torch.histc(x.float(), bins=classes, min=0, max=classes - 1)

        area_intersect, area_pred, area_label = hist(intersect), hist(pred), hist(label)
        totals["intersect"] += area_intersect
        totals["union"] += area_pred + area_label - area_intersect
    iou = (totals["intersect"] / totals["union"]).numpy()
    return float(np.nanmean(iou)), iou


def test_miou_agrees_with_mmseg_mean_iou_on_random_cases():
    rng = np.random.default_rng(2024)
    checked = absent = 0
    for _ in range(300):
        classes = int(rng.integers(2, 22))
        present = rng.choice(classes, size=int(rng.integers(1, classes + 1)), replace=False)
        predictions, labels = [], []
        for _ in range(int(rng.integers(1, 5))):
            shape = (int(rng.integers(1, 24)), int(rng.integers(1, 24)))
            label = rng.choice(present, size=shape).astype(np.uint8)
            label[rng.random(shape) < rng.uniform(0, 0.5)] = 255  # ignored pixels
            pred = np.where(rng.random(shape) < 0.6, label, rng.choice(present, size=shape))
            pred = np.where(pred == 255, rng.choice(present, size=shape), pred).astype(np.int64)
            predictions.append(pred)
            labels.append(label)
        if all((label == 255).all() for label in labels):
            continue  # nothing labelled: both give an all-NaN IoU
        matrix = sum(confusion_matrix(p, t, classes, 255) for p, t in zip(predictions, labels, strict=True))
        miou, per_class = mean_iou(matrix)
        expected, expected_per_class = _mmseg_mean_iou(predictions, labels, classes, 255)
        assert np.array_equal(np.isnan(per_class), np.isnan(expected_per_class))
        np.testing.assert_allclose(per_class, expected_per_class, rtol=0, atol=1e-12, equal_nan=True)
        assert abs(miou / 100 - expected) <= 1e-12
        checked += 1
        absent += int(np.isnan(per_class).sum())
    assert checked > 250 and absent > 100  # the cases do exercise absent classes

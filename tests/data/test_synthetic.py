"""The embedded synthetic suite: deterministic, in every real layout, exercising every label path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from npidbench.data import dataset_root, load_detection_split, load_segmentation_split, load_split
from npidbench.data.check import check_dataset
from npidbench.data.cityscapes import label_id_to_train_id
from npidbench.data.coco import decode_segmentation
from npidbench.data.synthetic import (
    ADE20KSpec,
    CityscapesSpec,
    CocoSpec,
    ImageNetSpec,
    INat18Spec,
    Places205Spec,
    SuiteSpec,
    VocSpec,
    ensure_suite,
    write_suite,
)
from npidbench.data.synthetic.render import class_styles
from npidbench.data.voc import VOC_CLASSES, read_voc_mask

TINY = SuiteSpec(
    imagenet=ImageNetSpec(classes=3, train_per_class=3, val_per_class=2),
    places205=Places205Spec(classes=3, train_per_class=3, val_per_class=2),
    inat18=INat18Spec(species_per_supercategory=2, min_train=2, max_train=3, val_per_class=1),
    voc=VocSpec(voc07_trainval=12, voc07_test=6, voc12_trainval=16, seg_train=4, seg_val=3, aug_extra=3),
    coco=CocoSpec(train=8, val=4, crowd_probability=0.5),
    cityscapes=CityscapesSpec(train=3, val=2, width=64, height=32),
    ade20k=ADE20KSpec(train=4, val=2, width=64, height=48),
)


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_synth_twice_is_byte_identical_and_seed_matters(tmp_path):
    a = files(write_suite(tmp_path / "a", TINY))
    b = files(write_suite(tmp_path / "b", TINY))
    assert a == b
    annotations = [name for name in a if name.endswith((".xml", ".json", ".txt", ".csv", ".png"))]
    assert len(annotations) > 100
    c = files(write_suite(tmp_path / "c", SuiteSpec(**{**TINY.__dict__, "seed": 1})))
    assert a != c


def test_styles_differ_per_class():
    styles = class_styles(20)
    assert len({(s.shape, s.texture, s.part_shape, round(s.hue, 3)) for s in styles}) == 20


@pytest.fixture(scope="module")
def suite():
    return ensure_suite()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("imagenet", {"train": {"images": 1600, "classes": 10}, "val": {"images": 400, "classes": 10}}),
        ("places205", {"train": {"images": 800, "classes": 8}, "val": {"images": 200, "classes": 8}}),
        ("inat18", {"train": {"images": 880, "classes": 16}, "val": {"images": 160, "classes": 16}}),
        ("voc07", {"trainval": {"images": 2500, "classes": 20}, "test": {"images": 1000, "classes": 20}}),
        ("voc12", {"trainval": {"images": 1200}, "train": {"masks": 300}, "val": {"masks": 120}}),
        ("voc12aug", {"train_aug": {"masks": 600}, "val": {"masks": 120}}),
        ("coco", {"train2017": {"images": 600, "classes": 20}, "val2017": {"images": 150, "classes": 20}}),
        ("cityscapes", {"train": {"images": 100, "classes": 19}, "val": {"masks": 30}}),
        ("ade20k", {"training": {"images": 300, "classes": 150}, "validation": {"masks": 100}}),
    ],
)
def test_data_check_counts_on_every_synthetic_dataset(suite, name, expected):
    report = check_dataset(name, suite)
    assert report.synthetic
    for split, counts in expected.items():
        for key, value in counts.items():
            assert report.splits[split][key] == value, (split, key)


def test_voc07_supports_lowshot_k96_and_has_multilabel_and_difficult(suite):
    trainval = load_split("voc07", "trainval", None)
    labels = trainval.label_matrix
    assert trainval.synthetic and labels.shape == (2500, 20)
    assert (labels == 1).sum(axis=0).min() >= 96  # low-shot k = 96 positives per class
    assert (labels == -1).sum(axis=0).min() >= 1824  # and 19 x 96 negatives
    assert ((labels == 1).sum(axis=1) >= 2).sum() > 200  # multi-label images
    assert (labels == 0).any()  # classes present only as difficult objects
    detection = load_detection_split("voc07", "test", None)
    assert sum(image.difficult.sum() for image in detection.images) > 50


def test_voc_xml_carries_parts_and_truncation(suite):
    root, _ = dataset_root("voc12", None)
    texts = [p.read_text() for p in sorted((root / "Annotations").glob("*.xml"))[:300]]
    assert any("<part>" in t for t in texts)
    assert any("<truncated>1</truncated>" in t for t in texts)
    detection = load_detection_split("voc0712", "trainval", None)
    assert len(detection) == 2500 + 1200
    person = VOC_CLASSES.index("person")
    assert any(person in image.labels for image in detection.images)


def test_segmentation_masks_have_ignore_pixels_and_match_images():
    for name, split in (("voc12", "train"), ("voc12aug", "train_aug"), ("cityscapes", "val")):
        seg = load_segmentation_split(name, split, None)
        image, mask = seg.pairs[0]
        values = set()
        for _, mask in seg.pairs[:20]:
            target = read_voc_mask(mask) if name.startswith("voc") else np.array(Image.open(mask))
            values |= set(np.unique(target).tolist())
        assert 255 in values, name
        assert max(v for v in values if v != 255) < len(seg.classes)
        with Image.open(seg.pairs[0][0]) as picture, Image.open(seg.pairs[0][1]) as target:
            assert picture.size == target.size


def test_voc_official_masks_are_palette_pngs():
    seg = load_segmentation_split("voc12", "val", None)
    with Image.open(seg.pairs[0][1]) as mask:
        assert mask.mode == "P"


def test_cityscapes_label_ids_map_exactly_to_train_ids(suite):
    root, _ = dataset_root("cityscapes", None)
    table = label_id_to_train_id()
    for path in sorted((root / "gtFine" / "train").glob("*/*_labelIds.png"))[:10]:
        label_ids = np.array(Image.open(path))
        train_ids = np.array(Image.open(str(path).replace("_labelIds", "_labelTrainIds")))
        np.testing.assert_array_equal(table[label_ids], train_ids)
        assert (train_ids == 255).any()  # ego vehicle and static clutter are ignore pixels


def test_coco_has_polygons_crowd_rle_and_noncontiguous_ids(suite):
    root, _ = dataset_root("coco", None)
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    ids = sorted(c["id"] for c in data["categories"])
    assert ids != list(range(1, len(ids) + 1))  # gaps, as in real COCO
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    polygons = [a for a in data["annotations"] if not a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert any(len(a["segmentation"]) > 1 for a in polygons)  # objects split by occluders
    for ann in polygons[:50]:
        xs = [v for poly in ann["segmentation"] for v in poly[0::2]]
        ys = [v for poly in ann["segmentation"] for v in poly[1::2]]
        x, y, w, h = ann["bbox"]
        assert (min(xs), min(ys)) == pytest.approx((x, y), abs=0.02)
        assert (max(xs), max(ys)) == pytest.approx((x + w, y + h), abs=0.02)
    split = load_detection_split("coco", "val2017", None)
    image = next(i for i in split.images if i.crowd.any())
    k = int(np.flatnonzero(image.crowd)[0])
    mask = decode_segmentation(image.segmentations[k], image.height, image.width)
    assert mask.sum() > 0 and split.category_ids == ids


def test_dense_scenes_hold_few_large_objects_and_coco_draws_the_pretraining_categories(suite):
    """The scene mix that makes the dense profiles learn (dense issue): VOC images with one or two
    objects, COCO objects of the synthetic ImageNet's ten class styles only (the first ten of its
    20 categories, VOC's under their COCO ids), all 20 listed."""
    voc = load_detection_split("voc07", "trainval", None)
    counts = np.bincount([len(image.labels) for image in voc.images])
    assert counts[1] > counts[2] > 0 and len(counts) <= 3
    coco = json.loads((dataset_root("coco", None)[0] / "annotations" / "instances_train2017.json").read_text())
    used = {a["category_id"] for a in coco["annotations"]}
    listed = [c["id"] for c in coco["categories"]]
    assert len(listed) == 20 and used == set(listed[:10])
    areas = [a["area"] / (112 * 84) for a in coco["annotations"] if not a["iscrowd"]]
    assert np.median(areas) > 0.075  # 0.064 of the image with the former mix of up to 4 objects


def test_every_record_of_synthetic_data_says_so():
    split = load_split("imagenet", "val", None)
    assert split.synthetic and split.display_name == "imagenet (synthetic)"

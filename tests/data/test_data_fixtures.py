"""Real dataset layouts written by others (../shared/fixtures/real-layouts, SOURCES.md): the
expectations tabulated there. Each test skips when its fixture is absent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from npidbench.cache import FeatureCache
from npidbench.checkpoint import load_backbone
from npidbench.data.check import check_dataset
from npidbench.data.cityscapes import load_cityscapes
from npidbench.data.coco import decode_segmentation, load_coco
from npidbench.data.imagenet import load_imagefolder, load_inat18, read_subset_list
from npidbench.data.images import EvalTransform
from npidbench.data.splits import DatasetSplit, lazy_fingerprint
from npidbench.data.voc import (
    VOC_CLASSES,
    labels_from_annotation,
    load_classification,
    load_detection,
    parse_annotation,
    read_class_list,
    read_id_list,
    read_voc_mask,
)
from npidbench.errors import BadInput
from npidbench.features import ExtractOptions, extract

from conftest import fixture_path

IDS = ["000001", "000002", "000003", "000004", "000005"]


def test_mmfewshot_voc2007_xml():
    root = fixture_path("mmfewshot", "tests", "data", "VOCdevkit", "VOC2007")
    assert read_id_list(root / "ImageSets" / "Main" / "trainval.txt") == IDS
    assert read_id_list(root / "ImageSets" / "Main" / "test.txt") == IDS
    chairs = parse_annotation(root / "Annotations" / "000005.xml").objects
    assert [o.name for o in chairs] == ["chair"] * 5 and sum(o.difficult for o in chairs) == 2
    assert [o.name for o in parse_annotation(root / "Annotations" / "000004.xml").objects].count("car") == 7
    labels = labels_from_annotation(parse_annotation(root / "Annotations" / "000005.xml"))
    expected = np.full(20, -1)
    expected[VOC_CLASSES.index("chair")] = 1
    np.testing.assert_array_equal(labels, expected)
    split = load_classification(root.parent.parent, "trainval")  # no per-class lists: from the XML
    assert split.label_source == "Annotations XML" and len(split) == 5
    np.testing.assert_array_equal(split.label_matrix[4], expected)


def test_voc2012_person_parts_are_ignored():
    root = fixture_path("mmfewshot", "tests", "data", "VOCdevkit", "VOC2012")
    objects = parse_annotation(root / "Annotations" / "2007_000027.xml").objects
    assert [o.name for o in objects] == ["person"]  # its head/hand/foot parts are not objects
    detection = load_detection([(root.parent.parent, "2012", "trainval")])
    assert len(detection) == 5 and all(len(i.boxes) == len(i.labels) for i in detection.images)


def test_bing_voc2007_lists_crlf_counts():
    main = fixture_path("BING-Objectness", "VOC2007", "ImageSets", "Main")
    assert b"\r\n" in (main / "aeroplane_trainval.txt").read_bytes()
    assert len(read_id_list(main / "trainval.txt")) == 5011
    assert len(read_id_list(main / "test.txt")) == 4952

    def counts(name):
        values = list(read_class_list(main / f"{name}_trainval.txt").values())
        return {v: values.count(v) for v in (1, 0, -1)}

    assert counts("aeroplane") == {1: 238, 0: 2, -1: 4771}
    assert counts("person")[1] == 2008
    assert (counts("chair")[1], counts("chair")[0]) == (445, 127)
    assert counts("sheep")[1] == 96
    split = load_classification(main.parent.parent.parent, "trainval")
    assert split.label_matrix.shape == (5011, 20) and split.label_source.startswith("ImageSets")


def test_bing_lists_alone_report_missing_images():
    root = fixture_path("BING-Objectness")
    with pytest.raises(BadInput, match=r"JPEGImages/\d{6}\.jpg is missing"):
        check_dataset("voc07", root)


def test_bing_lists_agree_with_labels_from_mmfewshot_xml():
    main = fixture_path("BING-Objectness", "VOC2007", "ImageSets", "Main")
    annotations = fixture_path("mmfewshot", "tests", "data", "VOCdevkit", "VOC2007", "Annotations")
    for image_id in IDS:
        derived = labels_from_annotation(parse_annotation(annotations / f"{image_id}.xml"))
        listed = [
            read_class_list(main / f"{name}_trainval.txt").get(image_id)
            or read_class_list(main / f"{name}_test.txt").get(image_id)
            for name in VOC_CLASSES
        ]
        np.testing.assert_array_equal(derived, listed)


def test_irn_voc12_lists():
    root = fixture_path("irn", "voc12")
    counts = {name: len(read_id_list(root / f"{name}.txt")) for name in ("train", "val", "train_aug", "test")}
    assert counts == {"train": 1464, "val": 1449, "train_aug": 10582, "test": 1456}


@pytest.mark.parametrize(
    ("image_id", "values"),
    [
        ("2007_000032", {0, 1, 15, 255}),
        ("2007_000033", {0, 1, 255}),
        ("2007_000039", {0, 20, 255}),
        ("2007_000042", {0, 19, 255}),
    ],
)
def test_nested_unet_palette_masks_match_images(image_id, values):
    mask_path = fixture_path("Nested-unet", "SegmentationClassAug", f"{image_id}.png")
    image_path = fixture_path(
        "mmfewshot", "tests", "data", "VOCdevkit", "VOC2012", "JPEGImages", f"{image_id}.jpg"
    )
    mask = read_voc_mask(mask_path)
    assert set(np.unique(mask).tolist()) == values
    with Image.open(image_path) as image:
        assert (mask.shape[1], mask.shape[0]) == image.size


def test_datumaro_rgb_mask_and_missing_flags_and_float_boxes():
    root = fixture_path("datumaro", "tests", "assets", "voc_dataset")
    mask = read_voc_mask(root / "voc_dataset1" / "SegmentationClass" / "2007_000001.png")
    assert mask.dtype == np.uint8 and mask.shape == (10, 20)
    objects = parse_annotation(root / "voc_dataset1" / "Annotations" / "2007_000001.xml").objects
    person = next(o for o in objects if o.name == "person")
    assert (person.difficult, person.truncated) == (False, False)  # tags absent: default 0
    assert person.box == (4.0, 5.0, 6.0, 7.0)  # its <part> box is not the object
    assert parse_annotation(root / "voc_dataset2" / "Annotations" / "a.xml").objects[0].box == (
        1.0,
        2.0,
        4.0,
        6.0,
    )


def test_cityscapes_label_ids_map_to_train_ids():
    root = fixture_path("mmsegmentation", "tests", "data", "pseudo_cityscapes_dataset")
    split = load_cityscapes(root, "val")
    assert split.mask_kind == "labelTrainIds" and len(split) == 1
    label_ids = np.array(Image.open(split.pairs[0][1].replace("labelTrainIds", "labelIds")))
    train_ids = np.array(Image.open(split.pairs[0][1]))
    from npidbench.data.cityscapes import label_id_to_train_id

    agreement = (label_id_to_train_id()[label_ids] == train_ids).mean()
    assert 0.997 <= agreement < 1.0  # 99.77%: the frame was resampled


def test_cityscapes_from_label_ids_only(tmp_path):
    source = fixture_path("mmsegmentation", "tests", "data", "pseudo_cityscapes_dataset")
    root = tmp_path / "cityscapes"
    shutil.copytree(source, root)
    for path in root.rglob("*_labelTrainIds.png"):
        path.unlink()
    split = load_cityscapes(root, "val")
    assert split.mask_kind == "labelIds" and split.label_map is not None
    report = check_dataset("cityscapes", root)
    assert report.splits["val"]["masks"] == 1


def test_cityscapes_without_semantic_masks_is_a_clear_error():
    root = fixture_path("datumaro", "tests", "assets", "cityscapes_dataset", "dataset")
    with pytest.raises(BadInput, match="no semantic mask for .*instanceIds alone"):
        load_cityscapes(root, "train")


def test_coco_39769_polygons_give_their_boxes():
    annotations = json.loads(
        fixture_path(
            "transformers", "tests", "fixtures", "tests_samples", "COCO", "coco_annotations.txt"
        ).read_text()
    )
    image = fixture_path(
        "optimum-graphcore", "tests", "fixtures", "tests_samples", "COCO", "000000039769.png"
    )
    with Image.open(image) as picture:
        width, height = picture.size
    assert (width, height) == (640, 480)
    assert sorted(a["category_id"] for a in annotations) == [17, 17, 63, 65, 75, 75]
    for ann in annotations:
        xs = [v for poly in ann["segmentation"] for v in poly[0::2]]
        ys = [v for poly in ann["segmentation"] for v in poly[1::2]]
        x, y, w, h = ann["bbox"]
        assert (min(xs), min(ys), max(xs), max(ys)) == pytest.approx((x, y, x + w, y + h), abs=0.02)
        mask = decode_segmentation(ann["segmentation"], height, width)
        assert mask.shape == (480, 640) and mask.sum() > 0


def test_coco_dummy_ids_crowd_and_rle(tmp_path):
    source = fixture_path(
        "mmdetection", "tests", "data", "coco_dummy", "annotations", "instances_val2017.json"
    )
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    shutil.copy(source, root / "annotations" / "instances_val2017.json")
    split = load_coco(root, "val2017")
    assert len(split) == 2 and sum(len(i.labels) for i in split.images) == 37
    assert len(split.classes) == 80 and split.category_ids[0] == 1 and split.category_ids[-1] == 90
    assert all(0 <= label < 80 for i in split.images for label in i.labels)
    image = next(i for i in split.images if i.crowd.any())
    k = int(np.flatnonzero(image.crowd)[0])
    rle = image.segmentations[k]
    assert int(decode_segmentation(rle, image.height, image.width).sum()) == 3386  # its area says 4015
    with pytest.raises(BadInput, match=r"val2017/000000000139\.jpg is missing"):
        check_dataset("coco", root)


def test_simclr_subset_lists_cover_the_imagenet_synsets():
    one = read_subset_list(fixture_path("simclr", "imagenet_subsets", "1percent.txt"))
    ten = read_subset_list(fixture_path("simclr", "imagenet_subsets", "10percent.txt"))
    assert (len(one), len(ten)) == (12811, 128116)
    mapping = fixture_path("res18", "LOC_synset_mapping.txt").read_text().splitlines()
    wnids = [line.split()[0] for line in mapping]
    assert wnids == sorted(wnids) and len(wnids) == 1000  # ImageFolder class order
    assert {n.split("_")[0] for n in one} == set(wnids) == {n.split("_")[0] for n in ten}


def test_inat_json_label_is_category_id(tmp_path):
    source = fixture_path(
        "tensorflow-datasets", "tensorflow_datasets", "image_classification", "i_naturalist2018", "dummy_data"
    )
    shutil.copy(source / "train_annos" / "train2018.json", tmp_path / "train2018.json")
    shutil.copy(source / "categories" / "categories.json", tmp_path / "categories.json")
    split = load_inat18(tmp_path, "train")
    data = json.loads((tmp_path / "train2018.json").read_text())
    by_file = {img["file_name"]: img["id"] for img in data["images"]}
    labels = {ann["image_id"]: ann["category_id"] for ann in data["annotations"]}
    for path, label in split.samples:
        assert label == labels[by_file[str(path)[len(str(tmp_path)) + 1 :]]]
    assert "train_val2018/Plantae/7477/" in split.samples[0][0]


def test_imagefolder_robustness_nested_mixed_case_and_stray_files():
    root = fixture_path("mmpretrain", "tests", "data")
    split = load_imagefolder(root, "dataset")
    names = sorted(str(p).split("dataset/")[1] for p, _ in split.samples)
    assert split.classes == ["a", "b"]
    assert names == ["a/1.JPG", "b/2.jpeg", "b/subb/3.jpg"]  # the 0-byte 3.jpeg at the top is no class


def test_flat_val_folder_is_detected(tmp_path):
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "imagenet" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"x")
    with pytest.raises(BadInput, match="holds 3 images directly, not in class folders.*valprep"):
        load_imagefolder(tmp_path / "imagenet", "val")


def _damse_split(tmp_path) -> DatasetSplit:
    paths = [
        fixture_path("DAMSE", "tests", "data", "VOCdevkit", "VOC2007", "JPEGImages", "000001.jpg"),
        fixture_path("DAMSE", "tests", "data", "VOCdevkit", "VOC2012", "JPEGImages", "2007_000027.jpg"),
    ]
    good = fixture_path("mmfewshot", "tests", "data", "VOCdevkit", "VOC2007", "JPEGImages")
    samples = [(str(good / f"{i}.jpg"), 0) for i in IDS[:3]] + [(str(p), 0) for p in paths]
    return DatasetSplit("damse", "test", tmp_path, samples, ["x"], False, lazy_fingerprint(tmp_path, samples))


def test_truncated_jpegs_are_reported_by_path_or_skipped_when_asked(tmp_path, random_checkpoint):
    for name in ("000001.jpg",):
        with Image.open(
            fixture_path("DAMSE", "tests", "data", "VOCdevkit", "VOC2007", "JPEGImages", name)
        ) as im:
            assert im.size == (353, 500)  # the header reads
    split = _damse_split(tmp_path)
    backbone = load_backbone(random_checkpoint)
    cache = FeatureCache(tmp_path / "cache")
    transform = EvalTransform(40, 32)
    with pytest.raises(
        BadInput, match=r"unreadable image .*DAMSE.*000001\.jpg: Image is incomplete or truncated"
    ):
        extract(backbone, split, transform, ("AvgPool",), cache, ExtractOptions("cpu", 0, 2))
    found = extract(
        backbone, split, transform, ("AvgPool",), cache, ExtractOptions("cpu", 0, 2, skip_corrupt=True)
    )
    entry = found["AvgPool"]
    assert [s["path"].split("/")[-1] for s in entry.skipped] == ["000001.jpg", "2007_000027.jpg"]
    assert entry.valid.tolist() == [True, True, True, False, False]
    assert not np.array(entry.features)[3:].any()
    # The skipped entry is never handed out to a run that did not ask to skip.
    with pytest.raises(BadInput, match="pass --skip-corrupt"):
        extract(backbone, split, transform, ("AvgPool",), cache, ExtractOptions("cpu", 0, 2))


def test_data_check_counts_on_fixtures():
    voc = check_dataset("voc07", fixture_path("mmfewshot", "tests", "data"))
    assert voc.splits["trainval"]["images"] == 5 and voc.splits["test"]["images"] == 5
    assert voc.splits["trainval"]["objects"] == 17 and voc.splits["trainval"]["difficult"] == 2
    voc12 = check_dataset("voc12", fixture_path("mmfewshot", "tests", "data"))
    assert voc12.splits["trainval"]["images"] == 5
    city = check_dataset(
        "cityscapes", fixture_path("mmsegmentation", "tests", "data", "pseudo_cityscapes_dataset")
    )
    assert city.splits["val"] == {"images": 1, "masks": 1, "classes": 19} and city.absent == ["train"]

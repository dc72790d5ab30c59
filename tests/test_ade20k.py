"""ADE20K SceneParsing: the ADEChallengeData2016 loader, its errors, the synthetic layout, the check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npidbench.data
from npidbench.data import DATASETS, dataset_root, load_segmentation_split
from npidbench.data.ade20k import ADE20K_CLASSES, load_ade20k, reduce_zero_label
from npidbench.data.check import check_dataset
from npidbench.data.splits import SYNTHETIC_MANIFEST
from npidbench.data.synthetic import ADE20KSpec, SuiteSpec, generate_suite
from npidbench.data.synthetic.ade20k import STUFF, THINGS, USED_IDS, write_ade20k
from npidbench.errors import BadInput
from npidbench.transfer.seg_data import read_mask

SMALL = ADE20KSpec(train=16, val=16, width=64, height=48)  # 16: two rotations of the 8 objects


def write_pair(root: Path, split: str, stem: str, mask: np.ndarray, image: bool = True) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    if image:
        pixels = np.full((*mask.shape[:2], 3), 128, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / split / f"{stem}.jpg")
    Image.fromarray(mask).save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture()
def layout(tmp_path: Path) -> Path:
    """A real-layout ADEChallengeData2016 with two training and one validation pair."""
    root = tmp_path / "ADEChallengeData2016"
    mask = np.array([[0, 1, 2, 150], [149, 151, 255, 3]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    write_pair(root, "training", "ADE_train_00000002", mask)
    write_pair(root, "training", "ADE_train_00000001", mask)
    write_pair(root, "validation", "ADE_val_00000001", mask)
    return root


def test_classes_are_the_150_of_objectinfo150_in_order():
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[7] == "bed" and ADE20K_CLASSES[-1] == "flag"


def test_loader_pairs_images_with_annotations_and_accepts_train_val(layout):
    split = load_ade20k(layout, "training")
    assert split.split == "training" and len(split) == 2 and not split.synthetic
    assert [Path(i).name for i, _ in split.pairs] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert all(Path(m).parent.name == "training" and Path(m).suffix == ".png" for _, m in split.pairs)
    assert split.classes == list(ADE20K_CLASSES) and split.ignore_index == 255
    assert load_ade20k(layout, "train").pairs == split.pairs
    assert load_ade20k(layout, "val").pairs == load_ade20k(layout, "validation").pairs
    assert load_ade20k(layout, "val").split == "validation"


def test_reduce_zero_label_through_the_segmentation_task_reader(layout):
    table = reduce_zero_label()
    assert table.shape == (256,) and table.dtype == np.uint8
    assert table[0] == 255 and table[1] == 0 and table[150] == 149 and (table[151:] == 255).all()
    split = load_ade20k(layout, "validation")
    target = read_mask(split, split.pairs[0][1])
    assert target.dtype == np.uint8
    np.testing.assert_array_equal(
        target[::4, ::4], np.array([[255, 0, 1, 149], [148, 255, 255, 2]], dtype=np.uint8)
    )


def test_unknown_split_names_the_choices(layout):
    with pytest.raises(BadInput, match="'test'.*training or validation"):
        load_ade20k(layout, "test")


def test_missing_folders_are_named(tmp_path, layout):
    with pytest.raises(BadInput, match=re.escape(str(tmp_path / "nowhere" / "images" / "training"))):
        load_ade20k(tmp_path / "nowhere", "train")
    for path in (layout / "annotations" / "validation").iterdir():
        path.unlink()
    (layout / "annotations" / "validation").rmdir()
    with pytest.raises(BadInput, match=re.escape(str(layout / "annotations" / "validation")) + " not found"):
        load_ade20k(layout, "val")


def test_image_without_annotation_names_both_files(layout):
    (layout / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(BadInput) as info:
        load_ade20k(layout, "training")
    message = str(info.value)
    assert "\n" not in message
    assert str(layout / "images" / "training" / "ADE_train_00000002.jpg") in message
    assert str(layout / "annotations" / "training" / "ADE_train_00000002.png") in message


def test_empty_split_is_a_clear_error(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (root / sub / "validation").mkdir(parents=True)
    with pytest.raises(BadInput, match=re.escape(str(root / "images" / "validation")) + ".*no \\*.jpg"):
        load_ade20k(root, "validation")


@pytest.mark.parametrize("place", ["ADEChallengeData2016", "ade20k/ADEChallengeData2016", "itself"])
def test_found_under_a_data_root(tmp_path, place):
    data_root = tmp_path / "data"
    folder = data_root if place == "itself" else data_root / place
    write_pair(folder, "validation", "ADE_val_00000001", np.ones((8, 8), dtype=np.uint8))
    assert dataset_root("ade20k", data_root) == (folder, False)
    split = load_segmentation_split("ade20k", "val", data_root)
    assert split.dataset == "ade20k" and len(split) == 1


def test_missing_under_a_data_root_names_the_expected_folder(tmp_path):
    with pytest.raises(BadInput, match="ade20k not found.*ADEChallengeData2016"):
        dataset_root("ade20k", tmp_path)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_layout_is_deterministic_and_covers_the_used_classes(tmp_path):
    counts = write_ade20k(tmp_path / "a", SMALL, seed=0)
    assert counts == {"training": 16, "validation": 16}
    a = files(tmp_path / "a")
    write_ade20k(tmp_path / "b", SMALL, seed=0)
    assert files(tmp_path / "b") == a
    write_ade20k(tmp_path / "c", SMALL, seed=1)
    assert files(tmp_path / "c") != a
    assert "images/training/ADE_train_00000001.jpg" in a
    assert "annotations/validation/ADE_val_00000016.png" in a
    assert len(USED_IDS) == len(STUFF) + len(THINGS) == 15
    for split in ("training", "validation"):
        seen: set[int] = set()
        for image, mask in load_ade20k(tmp_path / "a", split).pairs:
            with Image.open(image) as picture, Image.open(mask) as target:
                assert picture.format == "JPEG" and target.mode == "L"
                assert picture.size == target.size == (SMALL.width, SMALL.height)
                seen |= set(np.unique(np.array(target)).tolist())
        assert 0 in seen, split  # "other" pixels: the reduce_zero_label ignore path
        assert seen - {0} == set(USED_IDS), split


def test_suite_writes_ade20k_with_a_manifest_and_the_check_passes(tmp_path, monkeypatch):
    generate_suite(tmp_path, SuiteSpec(ade20k=SMALL), only=("ade20k",))
    folder = tmp_path / DATASETS["ade20k"].subpath
    manifest = json.loads((folder / SYNTHETIC_MANIFEST).read_text())
    assert manifest["dataset"] == "ade20k" and manifest["counts"] == {"training": 16, "validation": 16}
    report = check_dataset("ade20k", tmp_path)
    assert report.synthetic and report.root == str(folder) and not report.absent
    assert report.splits["training"] == {"images": 16, "masks": 16, "classes": 150}
    assert report.splits["validation"]["masks"] == 16
    assert any("reduce_zero_label" in note for note in report.notes)
    # No --data-root: the embedded suite (here the one just written) is read through the same loader.
    monkeypatch.setattr(npidbench.data, "ensure_suite", lambda: tmp_path)
    split = load_segmentation_split("ade20k", "train", None)
    assert split.synthetic and split.split == "training" and len(split) == 16


def test_check_flags_values_outside_0_to_150(layout):
    with pytest.raises(BadInput) as info:  # the fixture masks hold 151 and 255
        check_dataset("ade20k", layout)
    message = str(info.value)
    assert "[151, 255] outside 0..150" in message
    assert str(layout / "annotations" / "training" / "ADE_train_00000001.png") in message


def test_check_flags_colour_masks(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_pair(root, "validation", "ADE_val_00000001", np.ones((8, 8, 3), dtype=np.uint8))
    with pytest.raises(
        BadInput, match="ADE_val_00000001.png has shape \\(8, 8, 3\\): expected single-channel"
    ):
        check_dataset("ade20k", root)


def test_check_reports_absent_split_and_passes(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_pair(root, "validation", "ADE_val_00000001", np.full((8, 8), 150, dtype=np.uint8))
    report = check_dataset("ade20k", root)
    assert report.absent == ["training"] and report.splits["validation"]["images"] == 1
    assert not report.synthetic

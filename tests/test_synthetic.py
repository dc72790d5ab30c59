"""The embedded synthetic data: deterministic, in the real layout, read back by the loaders."""

from __future__ import annotations

import hashlib

from npidbench.data import load_split
from npidbench.data.imagenet import load_imagefolder
from npidbench.data.synthetic import ImageNetSpec, SuiteSpec, class_styles, ensure_suite, write_imagenet


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = ImageNetSpec(classes=3, train_per_class=4, val_per_class=2)
    write_imagenet(tmp_path / "a", spec)
    write_imagenet(tmp_path / "b", spec)
    write_imagenet(tmp_path / "c", ImageNetSpec(classes=3, train_per_class=4, val_per_class=2, seed=1))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_imagenet_layout_reads_back(tmp_path):
    spec = ImageNetSpec(classes=4, train_per_class=5, val_per_class=3)
    write_imagenet(tmp_path, spec)
    train = load_imagefolder(tmp_path, "train")
    val = load_imagefolder(tmp_path, "val")
    assert len(train) == 20 and len(val) == 12 and train.classes == val.classes
    assert train.classes[0] == "n90000000"
    assert (tmp_path / "train" / "n90000001" / "n90000001_4.JPEG").exists()
    assert (tmp_path / "val" / "n90000000" / "ILSVRC2012_val_00000001.JPEG").exists()
    assert len((tmp_path / "LOC_synset_mapping.txt").read_text().splitlines()) == 4


def test_styles_differ_per_class():
    styles = class_styles(20)
    assert len({(s.shape, s.texture, s.part_shape, round(s.hue, 3)) for s in styles}) == 20


def test_suite_is_generated_once_and_named_synthetic(tmp_path):
    spec = SuiteSpec(imagenet=ImageNetSpec(classes=2, train_per_class=3, val_per_class=2))
    root = ensure_suite(spec, base=tmp_path)
    mtime = (root / "imagenet" / "npidbench-synthetic.json").stat().st_mtime_ns
    assert ensure_suite(spec, base=tmp_path) == root
    assert (root / "imagenet" / "npidbench-synthetic.json").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_default_split_is_synthetic():
    split = load_split("imagenet", "val", None)
    assert split.synthetic and split.display_name == "imagenet (synthetic)"
    assert len(split.classes) == 10

"""Semi-supervised fine-tuning: the grid choice, the label splits, held-out selection, the record."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from collections import Counter
from pathlib import Path

import pytest

from npidbench.config import build_config, parse_set_options
from npidbench.data.imagenet import load_imagefolder, read_subset_list, simclr_subset
from npidbench.data.splits import DatasetSplit
from npidbench.errors import BadInput
from npidbench.report import build_tables
from npidbench.results import ResultStore
from npidbench.runner import RunRequest, resolve_config, run_task
from npidbench.tasks import get_preset
from npidbench.tasks.semisup import Config, balanced_draw, choose_point, held_out, labelled_split

from conftest import FIXTURES, fixture_path
from helpers import tiny_imagefolder

SMALL = ["resize=48", "crop=40", "batch_size=8", "epochs=2", "milestones=[1]", "split=drawn"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tiny_imagefolder(root / "imagenet", classes=3, per_class=10, split="train", seed=0)
    tiny_imagefolder(root / "imagenet", classes=3, per_class=4, split="val", seed=1)
    return root


def test_grid_choice_is_the_best_point_and_ties_go_to_the_first():
    assert (
        choose_point({"lr0.001-head1": 10.0, "lr0.01-head100": 30.0, "lr0.1-head10": 20.0})
        == "lr0.01-head100"
    )
    assert choose_point({"lr0.001-head1": 30.0, "lr0.01-head100": 30.0}) == "lr0.001-head1"


def test_one_grid_point_or_the_nine():
    assert len(Config().grid) == 9
    assert Config(lr=0.01, head_mult=100.0).grid == [(0.01, 100.0)]
    with pytest.raises(ValueError, match="both lr and head_mult"):
        Config(lr=0.01)


@pytest.mark.parametrize(
    "option, message",
    [
        ("split=random", "split='random' is not one of simclr, drawn"),
        ("selection=val", "selection='val' is not one of test, heldout"),
    ],
)
def test_choices_are_refused_with_one_line(option, message):
    with pytest.raises(BadInput, match=message):
        build_config(Config, parse_set_options([option]))


def test_balanced_draw_is_class_balanced_seeded_and_sized(tiny_root):
    train = load_imagefolder(tiny_root / "imagenet", "train")
    drawn = balanced_draw(train, 7, seed=3)
    assert len(drawn) == len(set(drawn)) == 7
    per_class = Counter(train.samples[i][1] for i in drawn)
    assert sorted(per_class.values()) == [2, 2, 3]
    assert balanced_draw(train, 7, seed=3) == drawn
    assert balanced_draw(train, 7, seed=4) != drawn


def test_held_out_part_is_per_class_and_disjoint(tiny_root):
    train = load_imagefolder(tiny_root / "imagenet", "train")
    fit_rows, held = held_out(train, 0.2, seed=0)
    assert not set(fit_rows) & set(held) and len(fit_rows) + len(held) == len(train)
    assert Counter(train.samples[i][1] for i in held) == {0: 2, 1: 2, 2: 2}


def test_list_file_selects_exactly_its_images(tiny_root, tmp_path):
    train = load_imagefolder(tiny_root / "imagenet", "train")
    # Real SimCLR-format lines name train files <synset>_<n>.JPEG: build such a tree.
    root = tmp_path / "in"
    for path, label in train.samples:
        target = root / "imagenet" / "train" / f"n0000000{label}" / f"n0000000{label}_{Path(path).stem}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    renamed = load_imagefolder(root / "imagenet", "train")
    chosen = [Path(p).name for p, _ in renamed.samples[::4]]
    list_file = tmp_path / "1percent.txt"
    list_file.write_text("\n".join(chosen) + "\n")
    subset, info = labelled_split(renamed, Config(split_file=str(list_file)))
    assert sorted(Path(p).name for p, _ in subset.samples) == sorted(chosen)
    assert info["source"] == "list" and info["images"] == len(chosen)
    assert info["label"].startswith("in1k-") and not info["label"].endswith("drawn")
    list_file.write_text("n00000000_999.JPEG\n")
    with pytest.raises(BadInput, match="not in"):
        labelled_split(renamed, Config(split_file=str(list_file)))


def test_simclr_one_percent_list_has_the_published_size():
    names = read_subset_list(fixture_path("simclr", "imagenet_subsets", "1percent.txt"))
    assert len(names) == 12811 and len(set(names)) == 12811


@pytest.mark.parametrize(
    ("fraction", "count", "sha256"),
    [
        (0.01, 12811, "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17"),
        (0.1, 128116, "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091"),
    ],
)
def test_the_shipped_simclr_lists_are_simclrs(fraction, count, sha256):
    """google-research/simclr imagenet_subsets @ 383d414, byte for byte once decompressed."""
    shipped = simclr_subset(fraction)
    text = lzma.decompress(shipped.read_bytes())
    assert hashlib.sha256(text).hexdigest() == sha256
    assert len(read_subset_list(shipped)) == count
    original = FIXTURES / "simclr" / "imagenet_subsets" / f"{shipped.name[:-3]}"
    if original.exists():
        assert original.read_bytes() == text
    with pytest.raises(BadInput, match="split=drawn"):
        simclr_subset(0.05)


def test_real_imagenet_uses_simclrs_list_by_default():
    """Every published 1% / 10% number uses SimCLR's list: the default on real data; the draw is
    an option (split=drawn) and the synthetic profile's choice."""
    names = read_subset_list(simclr_subset(0.01))
    extra = [f"{n.split('_')[0]}_9{i}.JPEG" for i, n in enumerate(names)]  # not on the list
    samples = [(f"/in/train/{n.split('_')[0]}/{n}", 0) for n in names + extra]
    train = DatasetSplit("imagenet", "train", Path("/in"), samples, ["c"], False, lambda: "x")
    subset, info = labelled_split(train, Config())
    assert sorted(Path(p).name for p, _ in subset.samples) == sorted(names)
    assert info["source"] == "simclr" and info["label"] == "in1k-1pct"
    assert resolve_config(get_preset("semisup-imagenet-10pct"), False, []).split == "simclr"
    assert resolve_config(get_preset("semisup-imagenet-1pct"), True, []).split == "drawn"
    drawn, info = labelled_split(train, Config(split="drawn"))
    assert info["source"] == "class-balanced draw" and info["label"].endswith("-drawn")


def test_grid_run_picks_the_best_point_and_names_it(random_checkpoint, tiny_root, tmp_path):
    path = run_task(
        RunRequest(
            task="semisup-imagenet-1pct",
            checkpoint=random_checkpoint,
            data_root=tiny_root,
            set_options=[*SMALL, "fraction=0.4", "lrs=[0.01,0.5]", "head_mults=[1,10]"],
            results=tmp_path / "results",
            cache=tmp_path / "cache",
        )
    )
    record = json.loads(Path(path).read_text())
    metrics = record["metrics"]
    assert list(metrics["grid"]) == ["lr0.01-head1", "lr0.01-head10", "lr0.5-head1", "lr0.5-head10"]
    best = max(score["top1"] for score in metrics["grid"].values())
    assert metrics["grid"][metrics["chosen"]]["top1"] == best == metrics["top1"]
    assert metrics["finetuned_config"] == f"in1k-40pct-drawn_{metrics['chosen']}"
    assert record["dataset"]["train"]["labelled"]["images"] == 12
    assert record["details"]["selection"] == "test"
    assert not list((tmp_path / "cache" / "training").glob("*/state.pth"))


def test_heldout_selection_refits_the_chosen_point(random_checkpoint, tiny_root, tmp_path):
    path = run_task(
        RunRequest(
            task="semisup-imagenet-10pct",
            checkpoint=random_checkpoint,
            data_root=tiny_root,
            set_options=[*SMALL, "fraction=0.5", "lrs=[0.01,0.1]", "head_mults=[10]", "selection=heldout"],
            results=tmp_path / "results",
            cache=tmp_path / "cache",
        )
    )
    record = json.loads(Path(path).read_text())
    assert record["details"]["selected_on"].startswith("held-out")
    assert "selection=heldout" in record["variant"]  # not the published protocol: named
    assert record["metrics"]["chosen"] in record["metrics"]["grid"]


def test_one_and_ten_percent_rows_of_one_checkpoint_are_told_apart(random_checkpoint, tiny_root, tmp_path):
    results = tmp_path / "results"
    for task, fraction in (("semisup-imagenet-1pct", "0.1"), ("semisup-imagenet-10pct", "0.3")):
        run_task(
            RunRequest(
                task=task,
                checkpoint=random_checkpoint,
                data_root=tiny_root,
                set_options=[*SMALL, f"fraction={fraction}", "lr=0.01", "head_mult=10"],
                results=results,
                cache=tmp_path / "cache",
            )
        )
    (table,) = build_tables(ResultStore(results).load()[0])
    assert table.title == "ImageNet Semi-Supervised Classification"
    assert list(table.frame.columns) == [
        "Model",
        "Pretrain Config",
        "Fine-tuned Config",
        "Top-1 (%)",
        "Top-5 (%)",
    ]
    assert list(table.frame["Fine-tuned Config"]) == [
        "in1k-10pct-drawn_lr0.01-head10",
        "in1k-30pct-drawn_lr0.01-head10",
    ]


def test_presets_follow_the_protocol():
    one = resolve_config(get_preset("semisup-imagenet-1pct"), False, [])
    ten = resolve_config(get_preset("semisup-imagenet-10pct"), False, [])
    assert (one.fraction, one.weight_decay, ten.fraction, ten.weight_decay) == (0.01, 5e-4, 0.1, 1e-4)
    assert len(one.grid) == 9 and (one.epochs, one.milestones, one.gamma) == (20, (12, 16), 0.2)
    synthetic = resolve_config(get_preset("semisup-imagenet-1pct"), True, [])
    assert len(synthetic.grid) < 9 and synthetic.epochs < 20

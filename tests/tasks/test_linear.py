"""Linear probes: head sizes, frozen backbone, cached mode, resume equivalence, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from npidbench.backbones import backbone_for
from npidbench.backbones.resnet import MultiLayerFeatures
from npidbench.cache import FeatureCache
from npidbench.checkpoint import load_backbone
from npidbench.errors import BadInput, RunFailed
from npidbench.features import ExtractOptions
from npidbench.report import build_tables, render
from npidbench.results import ResultStore
from npidbench.runner import RunRequest, protocol_variant, resolve_config, run_task, synthetic_profile
from npidbench.solvers.linear import topk_correct
from npidbench.tasks import get_preset
from npidbench.tasks import linear as linear_task
from npidbench.tasks.base import RunContext
from npidbench.training import loop

from helpers import RESNET50_DIMS, tiny_imagefolder

SMALL = ["resize=48", "crop=40", "train_resize=48", "batch_size=8"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with imagenet/{train,val}: 3 classes of class-coloured images."""
    root = tmp_path_factory.mktemp("data")
    tiny_imagefolder(root / "imagenet", classes=3, per_class=8, split="train", seed=0)
    tiny_imagefolder(root / "imagenet", classes=3, per_class=4, split="val", seed=1)
    return root


def test_heads_see_the_pooled_dims_of_the_protocol():
    """PROTOCOLS.md: ResNet-50 Feature1..5 pool to 9216 / 9216 / 8192 / 9216 / 8192, AvgPool 2048."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    heads = linear_task.frozen_heads_for(
        backbone_for(model, "resnet50"),
        1000,
        ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"),
    )
    dims = {name: head.in_features for name, head in heads.heads.items()}
    assert dims == RESNET50_DIMS
    for name in ("Feature1", "Feature5"):
        assert heads.heads[name].norm.affine is False  # BN without affine (mmselfsup MultiClsHead)
    with torch.no_grad():
        features = MultiLayerFeatures(model.eval()).eval()(torch.randn(1, 3, 224, 224))
        logits = heads.eval()(features)
    assert {name: tuple(out.shape) for name, out in logits.items()} == {name: (1, 1000) for name in dims}


def test_topk_correct_counts_exactly():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}


def _context(checkpoint: Path, root: Path, cache: Path, preset: str = "linear-imagenet"):
    return RunContext(
        preset=get_preset(preset),
        backbone=load_backbone(checkpoint),
        data_root=root,
        cache=FeatureCache(cache),
        extract=ExtractOptions(batch_size=16),
    )


def _config(preset: str, options: list[str]):
    return resolve_config(get_preset(preset), False, options)


def test_frozen_backbone_stays_frozen(random_checkpoint, tiny_root, tmp_path):
    ctx = _context(random_checkpoint, tiny_root, tmp_path / "cache")
    before = {k: v.clone() for k, v in ctx.backbone.model.state_dict().items()}
    config = _config("linear-imagenet", [*SMALL, "features_epochs=2", "avgpool_epochs=2", "avgpool_lr=1.0"])
    output = linear_task.run(ctx, config)
    after = ctx.backbone.model.state_dict()
    # Weights and BatchNorm running statistics (and num_batches_tracked) are untouched.
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert set(output.metrics["top1"]) == {
        "Feature1",
        "Feature2",
        "Feature3",
        "Feature4",
        "Feature5",
        "AvgPool",
    }
    assert output.metrics["avgpool_best_epoch"] in (1, 2)
    assert output.protocol == "linear-mhead"
    history = output.details["history"]
    assert [("eval" in line) for line in history["features"]] == [False, True]  # last epoch only
    assert all("eval" in line for line in history["avgpool"])  # every epoch: best is reported
    assert not list((tmp_path / "cache" / "training").glob("*/state.pth"))  # cleared when done


def _without_timings(history: dict) -> dict:
    return {
        part: [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]
        for part, lines in history.items()
    }


@pytest.mark.parametrize("mode", ["cached", "augmented"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    random_checkpoint, tiny_root, tmp_path, monkeypatch, mode
):
    options = [*SMALL, f"mode={mode}", "parts=[features]", "features_epochs=3", "features_milestones=[2]"]
    straight = linear_task.run(
        _context(random_checkpoint, tiny_root, tmp_path / "a"), _config("linear-imagenet", options)
    )

    real_save = loop.ResumeState.save
    saves = []

    def crash_after_first_epoch(self, state):
        real_save(self, state)
        saves.append(state["epoch"])
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # as if killed right after the epoch's state was written

    monkeypatch.setattr(loop.ResumeState, "save", crash_after_first_epoch)
    ctx = _context(random_checkpoint, tiny_root, tmp_path / "b")
    with pytest.raises(RunFailed, match="interrupted after 1 of 3 epochs.*run the same command again"):
        linear_task.run(ctx, _config("linear-imagenet", options))
    assert len(list((tmp_path / "b" / "training").glob("*/state.pth"))) == 1
    resumed = linear_task.run(
        _context(random_checkpoint, tiny_root, tmp_path / "b"), _config("linear-imagenet", options)
    )
    assert saves == [1, 2, 3]  # the second run started at epoch 2
    assert resumed.metrics == straight.metrics
    assert _without_timings(resumed.details["history"]) == _without_timings(straight.details["history"])


def test_cached_mode_is_recorded_and_marked_in_the_report(random_checkpoint, tiny_root, tmp_path):
    results = tmp_path / "results"
    options = [*SMALL, "mode=cached", "features_epochs=1", "avgpool_epochs=1"]
    for extra in ([], ["mode=augmented"]):
        run_task(
            RunRequest(
                task="linear-imagenet",
                checkpoint=random_checkpoint,
                data_root=tiny_root,
                set_options=options + extra,
                results=results,
                cache=tmp_path / "cache",
            )
        )
    records = ResultStore(results).load()[0]
    assert sorted(r["protocol"] for r in records) == ["linear-cached", "linear-mhead"]
    cached = next(r for r in records if r["protocol"] == "linear-cached")
    assert cached["timings"]["extracted_images"] == 24 + 12  # one extraction of train and val
    (table,) = build_tables(records)
    assert table.title == "ImageNet Linear Evaluation"
    assert list(table.frame.columns) == [
        "Model",
        "Config",
        "Feature1",
        "Feature2",
        "Feature3",
        "Feature4",
        "Feature5",
        "AvgPool",
    ]
    names = sorted(table.frame["Model"])
    assert len(names) == 2 and "[linear-cached]" in names[0] + names[1]
    assert "[linear-cached]" not in min(names, key=len)
    text = render([table], "markdown")
    assert "linear-cached" in text


@pytest.mark.parametrize(
    "option, message",
    [
        ("mode=fast", "mode='fast' is not one of augmented, cached"),
        ("parts=[features,heads]", "parts"),
        (
            "features_augment=jitter",
            "features_augment='jitter' is not one of rrc, rrc-jitter-lighting, places",
        ),
        ("avgpool_augment=places365", "avgpool_augment='places365' is not one of rrc, "),
        ("avgpool_lr=-1", "positive"),
        ("crop=300", "crop"),
    ],
)
def test_bad_settings_are_refused_with_one_line(random_checkpoint, tiny_root, tmp_path, option, message):
    with pytest.raises(BadInput, match=message):
        run_task(
            RunRequest(
                task="linear-imagenet",
                checkpoint=random_checkpoint,
                data_root=tiny_root,
                set_options=[option],
                results=tmp_path / "results",
                cache=tmp_path / "cache",
            )
        )
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))


def test_every_linear_preset_loads_with_its_synthetic_profile():
    for name in ("linear-imagenet", "linear-places205", "linear-inat18"):
        preset = get_preset(name)
        protocol = resolve_config(preset, False, [])
        synthetic = resolve_config(preset, True, [])
        assert protocol.features_epochs > synthetic.features_epochs
        assert protocol.batch_size == 256 and protocol.avgpool_lr == 30.0
    places = resolve_config(get_preset("linear-places205"), False, [])
    assert (places.features_epochs, places.features_milestones, places.features_augment) == (
        28,
        (7, 14, 21),
        "places",
    )
    inat = resolve_config(get_preset("linear-inat18"), False, [])
    assert (inat.features_epochs, inat.features_milestones) == (84, (24, 48, 72))


def test_the_cached_mode_keeps_the_protocol_epochs_on_the_embedded_data():
    """mode=cached applies [synthetic_protocol.cached] over [synthetic] (its rows cost nothing to
    revisit); it is the standard of the linear-cached protocol, so no variant is named."""
    for name in ("linear-imagenet", "linear-places205", "linear-inat18"):
        preset = get_preset(name)
        protocol = resolve_config(preset, False, [])
        augmented = resolve_config(preset, True, [])
        cached = resolve_config(preset, True, ["mode=cached"])
        assert (cached.features_epochs, cached.avgpool_epochs) == (protocol.features_epochs, 100)
        assert augmented.features_epochs < cached.features_epochs and augmented.avgpool_lr == 30.0
        assert (cached.avgpool_weight_decay, cached.batch_size) == (0.001, 64) and cached.avgpool_lr <= 0.3
        assert protocol_variant(preset, True, cached) == ""
        # The record's profile lists what the run applied.
        assert synthetic_profile(preset, cached)["avgpool_lr"] == cached.avgpool_lr
        assert "avgpool_weight_decay" not in synthetic_profile(preset, augmented)
        assert (
            protocol_variant(preset, True, resolve_config(preset, True, ["mode=cached", "avgpool_lr=30"]))
            == "avgpool_lr=30.0"
        )
        # --set still wins over the cached profile, and real data never sees it.
        assert resolve_config(preset, True, ["mode=cached", "avgpool_epochs=2"]).avgpool_epochs == 2
        assert resolve_config(preset, False, ["mode=cached"]).avgpool_lr == 30.0


def test_record_says_lr_scaling_and_profile(random_checkpoint, tiny_root, tmp_path):
    path = run_task(
        RunRequest(
            task="linear-imagenet",
            checkpoint=random_checkpoint,
            data_root=tiny_root,
            set_options=[*SMALL, "mode=cached", "parts=[avgpool]", "avgpool_epochs=1"],
            results=tmp_path / "results",
            cache=tmp_path / "cache",
        )
    )
    record = json.loads(Path(path).read_text())
    assert record["details"]["global_batch"] == 8
    assert record["details"]["lr_scaled"] == {"avgpool": 30.0 * 8 / 256}
    assert set(record["metrics"]["top1"]) == {"AvgPool"}
    assert record["details"]["profile"] == {"name": "protocol"}


EMBEDDED_RUNS = {
    "linear-imagenet": ["features_epochs=1", "avgpool_epochs=1"],
    "linear-places205": ["features_epochs=1", "avgpool_epochs=1"],
    "linear-inat18": ["features_epochs=1", "avgpool_epochs=1"],
    "semisup-imagenet-1pct": ["epochs=1"],
    "semisup-imagenet-10pct": ["epochs=1", "lrs=[0.01]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(EMBEDDED_RUNS))
def test_every_preset_runs_on_the_embedded_data(random_checkpoint, tmp_path, task):
    """Acceptance: each preset end to end on the embedded synthetic layout (epochs cut by --set)."""
    path = run_task(
        RunRequest(
            task=task, checkpoint=random_checkpoint, set_options=EMBEDDED_RUNS[task], results=tmp_path / "r"
        )
    )
    record = json.loads(Path(path).read_text())
    assert record["details"]["profile"]["name"] == "synthetic"
    assert record["details"]["profile"]["settings"]["batch_size"] == 64
    assert record["dataset"]["synthetic"] is True
    (table,) = build_tables([record])
    assert table.title.endswith("(synthetic data)")
    assert table.title.split(" (")[0] in {
        "ImageNet Linear Evaluation",
        "Places205 Linear Evaluation",
        "iNaturalist2018 Linear Evaluation",
        "ImageNet Semi-Supervised Classification",
    }


def test_cached_layers_setting_extracts_stores_and_probes_only_those(random_checkpoint, tiny_root, tmp_path):
    """--set layers=feature5,avgpool (names in any case): only those two go to disk, per split."""
    cache = tmp_path / "cache"
    path = run_task(
        RunRequest(
            task="linear-imagenet",
            checkpoint=random_checkpoint,
            data_root=tiny_root,
            set_options=[
                *SMALL,
                "mode=cached",
                "features_epochs=1",
                "avgpool_epochs=1",
                "layers=feature5,avgpool",
            ],
            results=tmp_path / "results",
            cache=cache,
        )
    )
    record = json.loads(Path(path).read_text())
    entries = FeatureCache(cache).entries()
    assert sorted((e.meta["key"]["layer"], e.meta["key"]["split"]) for e in entries) == [
        ("AvgPool", "train"),
        ("AvgPool", "val"),
        ("Feature5", "train"),
        ("Feature5", "val"),
    ]
    assert set(record["metrics"]["top1"]) == {"Feature5", "AvgPool"}
    assert record["details"]["layers"] == ["Feature5", "AvgPool"]
    assert "layers=" in record["variant"]  # a restricted probe is named in the report


def test_layers_of_one_part_leave_the_other_part_out(random_checkpoint, tiny_root, tmp_path):
    ctx = _context(random_checkpoint, tiny_root, tmp_path / "cache")
    config = _config("linear-imagenet", [*SMALL, "mode=cached", "features_epochs=1", "layers=[Feature4]"])
    assert config.probed(ctx.backbone.backbone) == {"features": ("Feature4",)}
    output = linear_task.run(ctx, config)
    assert set(output.metrics["top1"]) == {"Feature4"} and "avgpool_best_epoch" not in output.metrics
    assert [e.meta["key"]["layer"] for e in ctx.cache.entries()] == ["Feature4", "Feature4"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["layers=feature6,avgpool"], "--set layers: feature6 is not a layer of parts=features,avgpool"),
        (["layers=[AvgPool]", "parts=[features]"], "--set layers: AvgPool is not a layer of parts=features"),
        (["layers=[AvgPool,avgpool]"], "layers must be distinct"),
    ],
)
def test_bad_layer_names_are_refused_with_one_line_exit_2(
    random_checkpoint, tiny_root, tmp_path, capsys, options, message
):
    from helpers import cli, one_error_line

    args = ["run", "linear-imagenet", str(random_checkpoint), "--data-root", str(tiny_root)]
    args += ["--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")]
    for option in [*options, "mode=cached"]:
        args += ["--set", option]
    assert cli(*args) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "cache" / "entries").exists()  # refused before any extraction

"""Checkpoints as the real frameworks write them (issue 13, "never the wrong network, silently"):
ResNet variants that share torchvision's names are refused with what they are, solo-learn's CIFAR
stem is rebuilt with its padding, lightly's and solo-learn's DINO files load the branch their own
evaluation uses, and ``inspect --json`` answers every refusal with a JSON object."""

from __future__ import annotations

import json

import pytest
import torch

from npidbench.backbones.resnet import MultiLayerFeatures, build_resnet
from npidbench.checkpoint import inspect_checkpoint, load_backbone
from npidbench.errors import BadInput

from checkpoint_zoo import VARIANTS, backbone_state, build, build_variant, random_resnet
from helpers import cli, one_error_line

JSON_KEYS = ("error", "path", "format", "arch", "loaded", "missing", "ignored", "sha256")


# Item 1 and 4: variants are named, never loaded as a plain torchvision ResNet.


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resnet_variant_is_refused_with_what_it_is(name, tmp_path):
    path = build_variant(name, tmp_path)
    info, tensors = inspect_checkpoint(path)
    assert tensors is None
    assert VARIANTS[name] in info.error
    assert "does not fill" not in info.error and "missing (first" not in info.error
    with pytest.raises(BadInput, match="not a torchvision|no torchvision ResNet"):
        load_backbone(path)


@pytest.mark.parametrize("name", ["timm-seresnet50", "mmpretrain-resnetv1d", "timm-resnet26"])
def test_cli_refuses_variant_in_one_line_exit_2(name, tmp_path, capsys):
    path = build_variant(name, tmp_path)
    assert cli("inspect", str(path)) == 2
    assert VARIANTS[name] in one_error_line(capsys.readouterr().err)
    assert cli("inspect", str(path), "--json") == 2
    captured = capsys.readouterr()
    assert VARIANTS[name] in json.loads(captured.out)["error"]
    assert VARIANTS[name] in one_error_line(captured.err)


def test_se_tensors_are_not_listed_as_ignored(tmp_path):
    info, _ = inspect_checkpoint(build_variant("timm-seresnet50", tmp_path))
    assert info.format == "timm"
    assert not any(".se." in k for k in info.ignored)  # they are the reason for the refusal


def test_blurpool_buffer_inside_a_block_is_listed_as_unexpected(tmp_path, capsys):
    path = build_variant("timm-resnet18-blurpool", tmp_path)
    info, tensors = inspect_checkpoint(path)
    assert tensors is None and info.unexpected == ["layer2.0.aa.filt"]
    assert cli("inspect", str(path)) == 2
    row = next(line for line in capsys.readouterr().out.splitlines() if "unexpected" in line)
    assert "layer2.0.aa.filt" in row


def test_heads_outside_the_backbone_stay_ignorable(tmp_path):
    model = random_resnet("resnet18", seed=2)
    state = {
        **{f"backbone.{k}": v for k, v in backbone_state(model).items()},
        "backbone.fc.weight": torch.randn(10, 512),  # the classifier under the same prefix
        "projector.0.weight": torch.randn(64, 512),
    }
    torch.save({"state_dict": state}, tmp_path / "heads.pth")
    info, tensors = inspect_checkpoint(tmp_path / "heads.pth")
    assert info.error is None and tensors is not None
    assert {"state_dict.backbone.fc.weight", "state_dict.projector.0.weight"} <= set(info.ignored)


def test_gap_or_missing_stage_is_still_incomplete(tmp_path):
    state = backbone_state(random_resnet("resnet50", seed=3))
    gap = {k: v for k, v in state.items() if not k.startswith("layer3.2.")}
    torch.save(gap, tmp_path / "gap.pth")
    info, _ = inspect_checkpoint(tmp_path / "gap.pth")
    assert "does not fill the resnet50 backbone" in info.error
    assert "layer3.2.conv1.weight" in info.missing
    no_stage = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(no_stage, tmp_path / "no_stage.pth")
    info, _ = inspect_checkpoint(tmp_path / "no_stage.pth")
    assert "does not fill the resnet50 backbone" in info.error
    assert "layer4.0.conv1.weight" in info.missing


# Item 2: solo-learn's CIFAR stem pads by 2.


def solo_learn_stem_resnet18(seed: int) -> torch.nn.Module:
    """solo-learn's CIFAR ResNet-18 (solo/methods/base.py): conv1 3x3 s1 padding=2, no max-pool."""
    return random_resnet("resnet18", seed=seed, cifar=True, stem_padding=2).eval()


def test_solo_learn_cifar_checkpoint_builds_padding_2_and_same_features(tmp_path):
    reference = solo_learn_stem_resnet18(seed=11)
    path = build("solo-learn", reference, tmp_path, other=solo_learn_stem_resnet18(seed=12))
    loaded = load_backbone(path)
    assert loaded.inspection.format == "solo-learn" and loaded.inspection.cifar_stem
    assert loaded.model.conv1.padding == (2, 2)
    assert loaded.inspection.stem_padding == 2 and loaded.provenance()["stem_padding"] == 2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = MultiLayerFeatures(loaded.model)(images)
        theirs = MultiLayerFeatures(reference)(images)
        # The padding-1 network with the very same tensors computes other features.
        padded_1 = build_resnet("resnet18", cifar_stem=True)
        padded_1.load_state_dict(loaded.model.state_dict())
        wrong = MultiLayerFeatures(padded_1.eval())(images)
    for layer in ours:
        torch.testing.assert_close(ours[layer], theirs[layer], rtol=0, atol=0)
    assert ours["Feature2"].shape == theirs["Feature2"].shape
    assert not torch.allclose(wrong["AvgPool"], theirs["AvgPool"])
    assert load_backbone(path, arch="resnet18-cifar").model.conv1.padding == (2, 2)
    # The stem is part of the feature cache's key: features of a padding-1 reading never serve it.
    from npidbench.features import _stem_suffix

    assert _stem_suffix(True, 2) == "-cifar-pad2" and _stem_suffix(True, 1) == "-cifar"
    assert _stem_suffix(False, 3) == ""


def test_other_cifar_files_keep_padding_1(tmp_path):
    model = random_resnet("resnet18", seed=5, cifar=True)
    path = tmp_path / "cifar.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone_state(model).items()}}, path)
    loaded = load_backbone(path)
    assert loaded.model.conv1.padding == (1, 1) and loaded.provenance()["stem_padding"] == 1
    assert load_backbone(tmp_path / "cifar.pth", arch="resnet18-cifar").model.conv1.padding == (1, 1)


def test_standard_stem_is_recorded_and_cli_shows_the_stem(tmp_path, capsys):
    path = build("torchvision", random_resnet("resnet18"), tmp_path)
    assert load_backbone(path).provenance()["stem_padding"] == 3
    solo = build(
        "solo-learn", solo_learn_stem_resnet18(seed=1), tmp_path, other=solo_learn_stem_resnet18(seed=2)
    )
    assert cli("inspect", str(solo)) == 0
    assert "padding 2" in capsys.readouterr().out
    assert cli("inspect", str(solo), "--json") == 0
    assert json.loads(capsys.readouterr().out)["stem_padding"] == 2


def test_convert_refuses_a_stem_a_state_dict_cannot_carry_and_arch_overrides_the_padding(tmp_path, capsys):
    """A plain state dict of solo-learn's padding-2 stem would be read back with padding 1: refused.
    --arch resnet18-cifar-pad1 overrides the format's padding (a Lightning file that only looks
    like solo-learn's)."""
    solo = build(
        "solo-learn", solo_learn_stem_resnet18(seed=1), tmp_path, other=solo_learn_stem_resnet18(seed=2)
    )
    out = tmp_path / "tv.pth"
    assert cli("convert", str(solo), "--to", "torchvision", "--out", str(out)) == 2
    assert "pads conv1 by 2" in one_error_line(capsys.readouterr().err) and not out.exists()
    assert (
        cli("convert", str(solo), "--to", "torchvision", "--out", str(out), "--arch", "resnet18-cifar-pad1")
        == 0
    )
    state = torch.load(out, weights_only=True)
    expected = backbone_state(solo_learn_stem_resnet18(seed=1))
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert load_backbone(out).model.conv1.padding == (1, 1)  # what the export says, read back
    assert load_backbone(solo, arch="resnet18-cifar-pad1").inspection.stem_padding == 1


# Item 3: DINO files of lightly and solo-learn; inspect --json on every refusal.


def test_lightly_dino_defaults_to_teacher_and_student_is_selectable(tmp_path):
    teacher, student = random_resnet(seed=21), random_resnet(seed=22)
    path = build("lightly-dino", teacher, tmp_path, other=student)
    loaded = load_backbone(path)
    assert loaded.inspection.format == "lightly" and loaded.inspection.branch == "teacher"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in backbone_state(teacher).items())
    assert any(k.startswith("state_dict.teacher_head.") for k in loaded.inspection.ignored)
    picked = load_backbone(path, branch="student")
    assert picked.inspection.branch == "student"
    assert all(torch.equal(picked.model.state_dict()[k], v) for k, v in backbone_state(student).items())


def test_solo_learn_dino_is_labelled_solo_learn_and_loads_the_online_backbone(tmp_path):
    online, momentum = random_resnet(seed=31), random_resnet(seed=32)
    info, tensors = inspect_checkpoint(build("solo-learn-dino", online, tmp_path, other=momentum))
    assert info.format == "solo-learn" and info.branch == "main"
    assert all(torch.equal(tensors[k], v) for k, v in backbone_state(online).items())
    assert any(k.startswith("state_dict.momentum_head.") for k in info.ignored)


def _json_refusal(capsys, *args: str) -> dict:
    assert cli("inspect", *args, "--json") == 2
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert all(key in info for key in JSON_KEYS), info.keys()
    assert info["error"] and info["error"] in one_error_line(captured.err)  # the same one line
    return info


def test_inspect_json_on_every_refusal(tmp_path, capsys):
    model, other = random_resnet(seed=1), random_resnet(seed=2)
    two = tmp_path / "two.pth"
    torch.save({"net_a": model.state_dict(), "net_b": other.state_dict()}, two)
    info = _json_refusal(capsys, str(two))
    assert "several backbones" in info["error"] and info["format"] == "torchvision"
    assert info["sha256"] and info["branches"] == ["net_a", "net_b"]

    dino = build("dino", model, tmp_path, other)
    info = _json_refusal(capsys, str(dino), "--branch", "nope")
    assert "--branch nope" in info["error"] and info["format"] == "dino"

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    info = _json_refusal(capsys, str(text))
    assert "text file" in info["error"] and info["format"] is None and len(info["sha256"]) == 64

    info = _json_refusal(capsys, str(tmp_path / "missing.pth"))
    assert "not found" in info["error"] and info["sha256"] is None and info["path"].endswith("missing.pth")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(build("torchvision", model, tmp_path).read_bytes()[:5000])
    assert "truncated or corrupt" in _json_refusal(capsys, str(truncated))["error"]


# Files written by timm's own saving code (CheckpointSaver with an EMA model), where timm is
# installed: it is not a dependency yet, so this skips on CI until it is.


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("resnet18", None),
        ("seresnet50", "squeeze-excitation"),
        ("resnet50_gn", "GroupNorm"),
        ("resnet26", "(2, 2, 2, 2)"),
        ("resnet50d", None),  # timm's ResNet-D: loaded as timm names it, features equal to its EMA's
        ("resnet50t", "ResNet-T"),  # another deep stem (tiered 24-32-64): still refused
        # resnet50d's exact tensors, another network (anti-aliased / blur-pool downsampling): the
        # file's training arguments say so
        ("resnetaa50d", "name model resnetaa50d, but its tensors fit"),
        ("resnetblur50d", "name model resnetblur50d, but its tensors fit"),
        ("seresnext50_32x4d", "timm seresnext50_32x4d"),
    ],
)
def test_timm_checkpoint_saver_files(name, named, tmp_path):
    timm = pytest.importorskip("timm")
    import argparse

    from timm.utils import CheckpointSaver, ModelEmaV2

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    ema = ModelEmaV2(model, decay=0.5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)  # the raw weights differ from the EMA ones
    ema.update(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(
        model,
        optimizer,
        args=argparse.Namespace(model=name),
        model_ema=ema,
        checkpoint_dir=str(tmp_path),
        recovery_dir=str(tmp_path),
        max_history=1,
    )
    saver.save_checkpoint(epoch=1, metric=1.0)
    path = tmp_path / "last.pth.tar"
    info, tensors = inspect_checkpoint(path)
    if named is not None:
        assert tensors is None and named in info.error
        return
    loaded = load_backbone(path)
    assert (loaded.inspection.format, loaded.inspection.branch) == ("timm", "ema")
    reference = ema.module.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = MultiLayerFeatures(loaded.model)(images)["AvgPool"]
        theirs = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

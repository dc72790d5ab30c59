"""ConvNeXt checkpoints in facebookresearch/ConvNeXt's and timm's layouts load strictly into
timm's ConvNeXt (every tensor equal to the source), the DINO-style teacher is the default
network, and an incomplete or foreign file is refused in one line."""

from __future__ import annotations

import re

import pytest
import torch

from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.checkpoint import load_backbone

from helpers import cli, one_error_line

pytest.importorskip("timm")

SPEC = ConvNeXtSpec((1, 1, 2, 1), (16, 32, 48, 64))


def _source() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_convnext(SPEC)
    for p in model.parameters():  # distinct values everywhere, so a misplaced tensor shows
        p.data.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _to_facebook(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names facebookresearch/ConvNeXt's models/convnext.py writes (the reverse of the map in
    PROTOCOLS-ARCH.md section 1), with its classifier ``head``."""
    out = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        out[key] = value
    out["head.weight"], out["head.bias"] = torch.randn(10, 64), torch.zeros(10)
    return out


def _equal_to_source(path, source) -> None:
    loaded = load_backbone(path)
    assert loaded.inspection.family == "convnext" and loaded.arch == SPEC.name
    state = loaded.model.state_dict()
    assert set(state) == set(source)
    for key, value in source.items():
        assert torch.equal(state[key], value), key


def test_facebook_layout_in_its_model_container_loads_every_tensor(tmp_path):
    source = _source()
    path = tmp_path / "convnext_fb.pth"
    torch.save({"model": _to_facebook(source), "epoch": 299}, path)
    _equal_to_source(path, source)
    assert load_backbone(path).inspection.format == "convnext-facebookresearch"
    ignored = load_backbone(path).inspection.ignored
    assert {"model.head.weight", "model.head.bias"} <= set(ignored)  # the classifier, never loaded


def test_timm_layout_and_the_dino_teacher_by_default(tmp_path):
    source = _source()
    path = tmp_path / "dino_convnext.pth"
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in source.items()}
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.items()}, "student": student}, path)
    _equal_to_source(path, source)
    chosen = load_backbone(path, branch="student").model.state_dict()
    assert all(float(v.abs().sum()) == 0 for v in chosen.values() if v.is_floating_point())


def test_features_equal_timms_forward(tmp_path):
    source = _source()
    path = tmp_path / "convnext.pth"
    torch.save(source, path)
    reference = build_convnext(SPEC).eval()
    reference.load_state_dict(source)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = load_backbone(path).backbone.forward_layers(images, ["AvgPool"])["AvgPool"]
        assert torch.equal(ours, reference(images))


@pytest.mark.parametrize("damage", ["missing", "foreign"])
def test_an_incomplete_or_foreign_convnext_is_one_line_exit_2(tmp_path, capsys, damage):
    state = _source()
    if damage == "missing":
        state.pop("stages.2.blocks.1.mlp.fc1.weight")
        expected = "does not hold a complete"
    else:
        state["stages.1.blocks.0.mlp.grn.weight"] = torch.ones(128)  # a ConvNeXt V2 block
        expected = "holds tensors a"
    path = tmp_path / f"{damage}.pth"
    torch.save(state, path)
    assert cli("inspect", str(path)) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_convert_refuses_a_convnext_in_one_line(tmp_path, capsys):
    path = tmp_path / "convnext.pth"
    torch.save(_source(), path)
    assert cli("convert", str(path), "--to", "torchvision", "--out", str(tmp_path / "out.pth")) == 2
    assert "convert writes ResNet names" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.pth").exists()

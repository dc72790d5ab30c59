"""``npidbench convert --to timm``: the file is a bare state dict that the timm model named on
stdout (``NAME (kwargs)``) loads with ``load_state_dict(strict=True)``, holding exactly the source
tensors, with the source network's forward; what timm has no model for is refused in one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.backbones.vit import ViTSpec, build_vit
from npidbench.checkpoint import load_backbone
from npidbench.checkpoint.own import (
    export_backbone,
    npidbench_checkpoint,
    save_npidbench_checkpoint,
    timm_model_for,
)
from npidbench.errors import BadInput

from checkpoint_zoo import (
    backbone_state,
    build_vit_file,
    random_resnet,
    random_vit,
    save_simclr_converter,
    save_swav,
    wide_resnet50,
)
from helpers import cli, one_error_line

timm = pytest.importorskip("timm")


def _convert(checkpoint: Path, out: Path, capsys) -> torch.nn.Module:
    """Run the CLI; build the printed timm model and strictly load the written file into it."""
    assert cli("convert", str(checkpoint), "--to", "timm", "--out", str(out)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    name, _, args = lines[0].partition(" ")
    call = ast.parse(f"dict{args}", mode="eval").body
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kwargs["num_classes"] == 0
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # bare: what timm's loader reads
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True)
    # timm's own route reads the same file (offline: the file overrides the hub location)
    again = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(out)}, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    return model.eval()


def _assert_same_tensors(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_loads_strictly_into_timms(arch, tmp_path, capsys):
    source = random_resnet(arch, seed=3).eval()
    path = tmp_path / f"{arch}.pth"
    save_npidbench_checkpoint(path, npidbench_checkpoint(source, arch, {"recipe": "test"}))
    model = _convert(path, tmp_path / "timm.pth", capsys)
    assert type(model).__module__.startswith("timm.") and model.default_cfg["architecture"] == arch
    _assert_same_tensors(model, backbone_state(source))
    source.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images))


def test_dino_bare_vit_loads_strictly_into_the_printed_timm_model(tmp_path, capsys):
    source = random_vit(seed=5, embed_dim=192, num_heads=3, depth=2, patch_size=16, img_size=64)
    path = tmp_path / "dino_vit.pth"
    torch.save(dict(source.state_dict()), path)  # DINO's released backbones: a bare state dict
    out = tmp_path / "vit_timm.pth"
    model = _convert(path, out, capsys)
    _assert_same_tensors(model, source.state_dict())
    assert (model.patch_embed.patch_size, len(model.blocks), model.embed_dim) == ((16, 16), 2, 192)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_backbone(path).backbone.forward_layers(images, ["CLS"])["CLS"]
        torch.testing.assert_close(model(images), source(images))
        torch.testing.assert_close(model(images), ours)


@pytest.mark.parametrize("fmt", ["dino", "moco-v3", "dinov2-reg4", "ibot", "mae"])
def test_framework_vits_convert_to_their_timm_model(fmt, tmp_path, capsys):
    """Teacher / base encoder chosen as for evaluation, MoCo v3's 12 heads, DINOv2 registers and
    layer scale, iBOT's renamed gamma: the timm model's forward is the framework's CLS feature."""
    case = build_vit_file(fmt, tmp_path)
    model = _convert(case.path, tmp_path / "timm.pth", capsys)
    _assert_same_tensors(model, case.expected)
    images = torch.randn(2, 3, case.img, case.img, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(images), case.reference(images), rtol=1e-4, atol=1e-4)


def _convnext_state(spec: ConvNeXtSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    model = build_convnext(spec)
    for p in model.parameters():  # distinct values everywhere (as test_checkpoint_convnext)
        p.data.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layer_scale", [True, False])
def test_convnext_loads_strictly_into_the_printed_timm_model(layer_scale, tmp_path, capsys):
    spec = ConvNeXtSpec((1, 1, 2, 1), (16, 32, 48, 64), layer_scale=layer_scale)
    source = _convnext_state(spec)
    path = tmp_path / "dino_convnext.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.items()}}, path)
    model = _convert(path, tmp_path / "convnext_timm.pth", capsys)
    _assert_same_tensors(model, source)
    reference = build_convnext(spec).eval()
    reference.load_state_dict(source)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        (
            ViTSpec(12, 384, 6, 16, 224),
            "vit_small_patch16_224 (num_classes=0, img_size=224, dynamic_img_size=True)",
        ),
        (
            ViTSpec(12, 384, 12, 16, 224),  # MoCo v3 ViT-S
            "vit_small_patch16_224 (num_classes=0, img_size=224, num_heads=12, dynamic_img_size=True)",
        ),
        (
            ViTSpec(12, 384, 6, 14, 518, init_values=1.0, reg_tokens=4, no_embed_class=True),
            "vit_small_patch14_reg4_dinov2 (num_classes=0, img_size=518, dynamic_img_size=True)",
        ),
        (
            ViTSpec(12, 768, 12, 14, 518, init_values=1.0, pos_interpolation="dino"),
            "vit_base_patch14_dinov2 (num_classes=0, img_size=518, dynamic_img_size=True)",
        ),
        (
            ViTSpec(12, 768, 12, 16, 224, fc_norm=True),  # MAE fine-tuned: pools the patch tokens
            "vit_base_patch16_224 (num_classes=0, img_size=224, fc_norm=True, global_pool='avg', "
            "dynamic_img_size=True)",
        ),
        (ConvNeXtSpec((3, 3, 9, 3), (96, 192, 384, 768)), "convnext_tiny (num_classes=0)"),
        (
            ConvNeXtSpec((3, 3, 27, 3), (128, 256, 512, 1024), layer_scale=False),
            "convnextv2_base (num_classes=0, use_grn=False)",
        ),
    ],
)
def test_released_sizes_are_named_as_timm_registers_them(spec, line):
    with torch.device("meta"):
        ours = build_vit(spec) if isinstance(spec, ViTSpec) else build_convnext(spec)
        target = timm_model_for(ours, spec=spec)
        theirs = target.create()
    assert str(target) == line
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


def test_deep_stem_resnet_is_written_under_timms_names(tmp_path):
    resnet = pytest.importorskip("npidbench.backbones.resnet")
    if "resnet18d" not in getattr(resnet, "DEEP_STEM_RESNETS", {}):
        pytest.skip("no deep-stem ResNets in this tree")
    torch.manual_seed(6)
    source = resnet.build_resnet("resnet18d").eval()
    for p in source.parameters():
        p.data.normal_(0, 0.1)
    out = tmp_path / "r18d.pth"
    export_backbone(source, "timm", out, arch="resnet18d")
    target = timm_model_for(source, "resnet18d")
    assert str(target) == "resnet18d (num_classes=0)"
    model = target.create().eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _assert_same_tensors(model, source.state_dict())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images))
    with pytest.raises(BadInput, match="deep stem"):
        export_backbone(source, "torchvision", tmp_path / "tv.pth", arch="resnet18d")
    assert not (tmp_path / "tv.pth").exists()


def _refused(checkpoint: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "refused.pth"
    assert cli("convert", str(checkpoint), "--to", "timm", "--out", str(out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob("*.tmp*")), list(tmp_path.iterdir())
    return line


def test_width_multiplied_resnet_is_refused_in_one_line(tmp_path, capsys):
    path = save_swav(wide_resnet50(2, randomise=False), tmp_path / "swav_RN50w2.pth.tar")
    line = _refused(path, tmp_path, capsys)
    assert "resnet50w2" in line and "no timm" in line


@pytest.mark.parametrize("padding", [1, 2])
def test_cifar_stem_resnet_is_refused_in_one_line(padding, tmp_path, capsys):
    path = tmp_path / "cifar.pth"
    torch.save(random_resnet("resnet18", cifar=True, stem_padding=padding).state_dict(), path)
    arch = [] if padding == 1 else ["--arch", "resnet18-cifar-pad2"]
    out = tmp_path / "refused.pth"
    assert cli("convert", str(path), "--to", "timm", "--out", str(out), *arch) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "CIFAR stem" in line and "timm" in line and not out.exists()


def test_simclr_unnormalised_network_is_refused_for_timm_too(tmp_path, capsys):
    path = save_simclr_converter(random_resnet("resnet50"), tmp_path / "resnet50-1x.pth")
    line = _refused(path, tmp_path, capsys)
    assert "without ImageNet mean/std" in line


def test_a_vit_is_refused_for_resnet_targets_with_the_timm_hint(tmp_path, capsys):
    path = tmp_path / "vit.pth"
    torch.save(dict(random_vit(seed=1).state_dict()), path)
    out = tmp_path / "tv.pth"
    assert cli("convert", str(path), "--to", "torchvision", "--out", str(out)) == 2
    assert "use --to timm" in one_error_line(capsys.readouterr().err) and not out.exists()

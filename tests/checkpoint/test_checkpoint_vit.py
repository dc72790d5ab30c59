"""Plain ViT checkpoints as DINO, iBOT, MoCo v3, MAE, DINOv2, timm, torchvision and mmpretrain write
them load strictly into timm's VisionTransformer (exactly the source tensors, the branch each
framework evaluates, the source network's features); what is not a plain ViT, or not all of
one, is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from npidbench.checkpoint import inspect_checkpoint, load_backbone
from npidbench.errors import BadInput

from checkpoint_zoo import VIT_FORMATS, build_vit_file, random_vit
from helpers import cli, one_error_line


@pytest.mark.parametrize("fmt", list(VIT_FORMATS))
def test_vit_layout_loads_exactly_with_its_default_branch_and_features(fmt, tmp_path):
    case = build_vit_file(fmt, tmp_path)
    detected, branch, arch, heads = VIT_FORMATS[fmt]
    loaded = load_backbone(case.path)
    info = loaded.inspection
    assert (info.family, info.format, info.branch, loaded.arch) == ("vit", detected, branch, arch)
    assert info.vit["num_heads"] == heads and loaded.model.blocks[0].attn.num_heads == heads
    state = loaded.model.state_dict()
    assert sorted(state) == sorted(case.expected)
    for name, tensor in case.expected.items():
        assert torch.equal(state[name], tensor), name
    assert info.loaded and not info.missing and not info.unexpected
    images = torch.randn(2, 3, case.img, case.img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = loaded.backbone.forward_layers(images, ["CLS"])["CLS"]
        reference = case.reference(images)
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4)
    record = loaded.provenance()
    assert record["family"] == "vit" and record["vit"]["name"] == arch


def test_heads_tokens_and_decoders_are_listed_as_ignored(tmp_path):
    info, _ = inspect_checkpoint(build_vit_file("moco-v3", tmp_path).path)
    assert any(k.startswith("state_dict.module.base_encoder.head.") for k in info.ignored)
    assert any(k.startswith("state_dict.module.momentum_encoder.") for k in info.ignored)
    assert any(k.startswith("state_dict.module.predictor.") for k in info.ignored)
    assert info.branches == ["base_encoder", "momentum_encoder"] and info.vit["heads_from"].startswith(
        "MoCo v3"
    )
    info, _ = inspect_checkpoint(build_vit_file("mae-full", tmp_path).path)
    assert {"model.mask_token", "model.decoder_pos_embed", "model.decoder_pred.weight"} <= set(info.ignored)
    info, _ = inspect_checkpoint(build_vit_file("ibot", tmp_path).path)
    assert "student.module.backbone.masked_embed" in info.ignored
    info, _ = inspect_checkpoint(build_vit_file("dinov2-reg4", tmp_path).path)
    assert info.ignored == ["mask_token"] and info.vit["reg_tokens"] == 4 and info.vit["no_embed_class"]
    assert any("register" in step for step in info.vit["converted"])


def test_branch_option_loads_the_student(tmp_path):
    path = build_vit_file("dino", tmp_path).path
    loaded = load_backbone(path, branch="student")
    assert loaded.inspection.branch == "student"
    assert torch.equal(
        loaded.model.cls_token, random_vit(seed=98, embed_dim=384, num_heads=6, patch_size=16).cls_token
    )


def test_inspect_shows_the_vit_facts_and_json_has_them(tmp_path, capsys):
    path = build_vit_file("dinov2-reg4", tmp_path).path
    assert cli("inspect", str(path)) == 0
    out = capsys.readouterr().out
    for row in ("family", "vit", "depth / width", "2 blocks x 192", "patch size", "8x8", "registers", "4"):
        assert row in out, row
    assert "resolution" in out and "32 px" in out
    assert cli("inspect", "--json", str(path)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "vit"
    vit = report["vit"]
    assert (vit["depth"], vit["embed_dim"], vit["patch_size"], vit["reg_tokens"], vit["img_size"]) == (
        2,
        192,
        8,
        4,
        32,
    )


def test_arch_option_accepts_the_spec_name_and_refuses_another(tmp_path, capsys):
    path = build_vit_file("timm-bare", tmp_path).path
    assert load_backbone(path, arch="vit_tiny_patch8_32_depth2").arch == "vit_tiny_patch8_32_depth2"
    assert cli("inspect", "--arch", "vit_base_patch16_224", str(path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds a vit_tiny_patch8_32_depth2" in line and "--arch vit_base_patch16_224" in line
    with pytest.raises(BadInput, match="pass --arch vit_tiny_patch8_32_depth2"):
        load_backbone(path, arch="resnet50")


def _bare(tmp_path, edit, name="edited.pth"):
    state = random_vit(seed=3).state_dict()
    edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def _swin(state):
    state.clear()
    state.update(
        {
            "patch_embed.proj.weight": torch.zeros(96, 3, 4, 4),
            "patch_embed.norm.weight": torch.zeros(96),
            "layers.0.blocks.0.norm1.weight": torch.zeros(96),
            "layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(169, 3),
            "layers.0.blocks.0.attn.qkv.weight": torch.zeros(288, 96),
            "layers.0.downsample.reduction.weight": torch.zeros(192, 384),
            "norm.weight": torch.zeros(768),
            "head.fc.weight": torch.zeros(1000, 768),
        }
    )


def _swiglu(state):  # DINOv2 ViT-g: SwiGLUFFNFused [dinov2 layers/swiglu_ffn.py]
    for i in range(2):
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.mlp.w12.{kind}"] = state.pop(f"blocks.{i}.mlp.fc1.{kind}")
            state[f"blocks.{i}.mlp.w3.{kind}"] = state.pop(f"blocks.{i}.mlp.fc2.{kind}")
    state["mask_token"] = torch.zeros(1, 192)


def _xcit(state):
    state["cls_attn_blocks.0.attn.q.weight"] = torch.zeros(192, 192)


def _beit(state):
    state["blocks.0.attn.relative_position_bias_table"] = torch.zeros(732, 3)


REFUSED = {
    # name: (edit of a bare timm ViT, what the one line says)
    "missing": (
        lambda s: s.pop("blocks.1.mlp.fc2.weight"),
        "1 backbone keys missing (first: blocks.1.mlp.fc2.weight)",
    ),
    "missing-cls": (lambda s: s.pop("cls_token"), "missing (first: cls_token"),
    "extra": (
        lambda s: s.update({"blocks.0.attn.q_norm.weight": torch.ones(64)}),
        "1 tensor inside the ViT backbone that a timm VisionTransformer vit_tiny_patch8_32_depth2 does not have "
        "(blocks.0.attn.q_norm.*)",
    ),
    "swiglu": (_swiglu, "SwiGLU feed-forward blocks (mlp.w12 / mlp.w3: DINOv2 ViT-g"),
    "swin": (_swin, "a Swin Transformer"),
    "xcit": (_xcit, "an XCiT"),
    "beit": (_beit, "relative position bias (BEiT"),
    "distilled": (lambda s: s.update({"dist_token": torch.zeros(1, 1, 192)}), "a distilled DeiT"),
    "odd-width": (
        lambda s: s.update(
            {k: torch.zeros(*v.shape[:-1], 256) for k, v in list(s.items()) if k == "cls_token"}
        ),
        "shape mismatches",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_is_not_a_complete_plain_vit_is_refused_in_one_line(name, tmp_path, capsys):
    edit, message = REFUSED[name]
    path = _bare(tmp_path, edit)
    assert cli("inspect", str(path)) == 2
    assert message in one_error_line(capsys.readouterr().err)
    info, tensors = inspect_checkpoint(path)
    assert tensors is None and message in info.error and info.family == "vit"
    with pytest.raises(BadInput):
        load_backbone(path)


def test_a_width_without_standard_heads_is_refused_not_guessed(tmp_path, capsys):
    model = random_vit(seed=4, embed_dim=256, num_heads=4)
    torch.save(model.state_dict(), tmp_path / "w256.pth")
    assert cli("inspect", str(tmp_path / "w256.pth")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "256 wide, not a standard width" in line and "refusing rather than guessing" in line


def test_resnet_files_keep_their_family(tmp_path):
    from checkpoint_zoo import build, random_resnet

    loaded = load_backbone(build("torchvision", random_resnet(), tmp_path))
    assert loaded.inspection.family == "resnet" and loaded.inspection.vit is None
    assert "family" not in loaded.provenance() and loaded.backbone.family == "resnet"


def test_a_vit_without_class_token_is_named_not_reported_as_damaged(tmp_path, capsys):
    model = random_vit(seed=5, class_token=False, global_pool="avg")
    torch.save(model.state_dict(), tmp_path / "gap.pth")
    assert cli("inspect", str(tmp_path / "gap.pth")) == 2
    assert "has no class token (timm class_token=False" in one_error_line(capsys.readouterr().err)


def test_a_half_precision_file_loads_as_float32(tmp_path):
    state = random_vit(seed=6).state_dict()
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "fp16.pth")
    loaded = load_backbone(tmp_path / "fp16.pth")
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name].half().float()), name

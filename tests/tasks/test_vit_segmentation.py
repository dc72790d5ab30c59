"""Segmentation on ViTs and ConvNeXts (PROTOCOLS-ARCH.md section 3): the ViT trunk against timm's
own forward, BEiT's relative position index worked out by hand, Feature2Pyramid's strides, UperNet
and its auxiliary head, the ConvNeXt stage maps, DINOv2's linear head on a frozen ViT, the layer /
stage-wise lr decay groups of mmseg's and the ConvNeXt repo's constructors, mmcv's warm-up, the
backbone refusals, and one run of every preset on the embedded data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from npidbench.backbones.convnext import ConvNeXtBackbone, ConvNeXtSpec, build_convnext
from npidbench.backbones.vit import ViTBackbone, ViTSpec, build_vit
from npidbench.report import build_tables
from npidbench.tasks.segmentation import Config
from npidbench.tasks.segmentation_vit import param_groups
from npidbench.transfer.vit_segmentation import (
    ConvNeXtTrunk,
    RelativePositionBias,
    ViTTrunk,
    center_pad,
    linear,
    pyramid_blocks,
    upernet,
)

from helpers import cli, one_error_line, run_preset

pytest.importorskip("timm")

TINY_VIT = ViTSpec(depth=4, embed_dim=192, num_heads=3, patch_size=16, img_size=64)
TINY_CONVNEXT = ConvNeXtSpec((1, 1, 2, 1), (16, 32, 48, 64))


def _vit() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(build_vit(TINY_VIT).eval(), TINY_VIT.name)


def _convnext() -> ConvNeXtBackbone:
    torch.manual_seed(0)
    return ConvNeXtBackbone(build_convnext(TINY_CONVNEXT).eval(), TINY_CONVNEXT.name)


# --- the ViT trunk ---------------------------------------------------------------------------


def test_pyramid_blocks_are_maes_out_indices_and_their_fractions():
    assert pyramid_blocks(12) == (3, 5, 7, 11)  # mmseg MAE config out_indices
    assert pyramid_blocks(24) == (7, 11, 15, 23)  # BEiT-L's
    assert pyramid_blocks(4) == (0, 1, 2, 3)


def test_the_upernet_trunk_of_a_checkpoint_without_bias_or_layer_scale_is_its_vit_at_start():
    """MAE's checkpoint has no relative position bias (zero-initialised) and no layer scale (1.0):
    at the start the trunk's maps are the ViT's block outputs, without the final norm (mmseg
    final_norm=False), class token dropped."""
    vit = _vit().model
    trunk = ViTTrunk(
        copy.deepcopy(vit), (0, 2, 3), final_norm=False, drop_path=0.1, layer_scale=1.0, window=(4, 6)
    )
    trunk.eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = vit.forward_intermediates(images, indices=[0, 2, 3], norm=False, intermediates_only=True)
        maps = trunk(images)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 4, 6)] * 3
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)
    # drop path rises linearly over the 4 blocks to 0.1; layer scale gammas start at 1
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in trunk.vit.blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert all(torch.equal(b.ls1.gamma, torch.ones(192)) for b in trunk.vit.blocks)
    assert isinstance(trunk.vit.norm, torch.nn.Identity)


def test_the_linear_trunk_reads_the_chosen_blocks_through_the_final_norm():
    vit = _vit().model
    trunk = ViTTrunk(copy.deepcopy(vit), (3,), final_norm=True).eval()
    images = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        (expected,) = vit.forward_intermediates(images, indices=[3], norm=True, intermediates_only=True)
        (got,) = trunk(images)
    torch.testing.assert_close(got, expected)


def test_relative_position_index_is_beits_by_hand():
    # Window 2x2: (2*2-1)^2 = 9 offsets + 3; offset (dy, dx) -> (dy + 1) * 3 + (dx + 1), dy = y_q - y_k.
    # Patches row-major p0 (0,0) p1 (0,1) p2 (1,0) p3 (1,1); class query 9, class key 10, both 11.
    bias = RelativePositionBias((2, 2), heads=1)
    with torch.no_grad():
        bias.table.copy_(torch.arange(12.0)[:, None])
    expected = torch.tensor(
        [
            [11, 9, 9, 9, 9],
            [10, 4, 3, 1, 0],
            [10, 5, 4, 2, 1],
            [10, 7, 6, 4, 3],
            [10, 8, 7, 5, 4],
        ],
        dtype=torch.float,
    )
    assert torch.equal(bias(2, 2, 1)[0], expected)
    # a 1x2 grid inside the window (a test window smaller than the crop) keeps the offsets
    assert torch.equal(bias(1, 2, 1)[0], torch.tensor([[11.0, 9, 9], [10, 4, 3], [10, 5, 4]]))
    with pytest.raises(ValueError, match="larger than the 2x2 grid"):
        bias(3, 2, 1)


def test_the_relative_position_bias_is_added_to_the_attention_logits():
    torch.manual_seed(1)
    vit = _vit().model
    trunk = ViTTrunk(copy.deepcopy(vit), (0,), final_norm=False, layer_scale=1.0, window=(2, 3)).eval()
    block = trunk.vit.blocks[0]
    with torch.no_grad():
        block.rel_pos.table.normal_()
        images = torch.randn(1, 3, 32, 48)
        (got,) = trunk(images)
        m = trunk.vit
        x = m._pos_embed(m.patch_embed(images))  # (1, 7, 192): class + 2 x 3 patches
        h = block.norm1(x)
        q, k, v = (
            F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias)
            .view(1, 7, 3, 3, 64)
            .permute(2, 0, 3, 1, 4)
        )
        logits = q @ k.transpose(-2, -1) / 64**0.5 + block.rel_pos(2, 3, 1)[None]
        attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, 7, 192)
        x = x + block.attn.proj(attended)
        x = x + block.mlp(block.norm2(x))
    torch.testing.assert_close(got, x[:, 1:].transpose(1, 2).reshape(1, 192, 2, 3))


# --- neck and heads --------------------------------------------------------------------------


def test_feature2pyramid_gives_strides_4_8_16_32_for_patch_16():
    model = upernet(_vit(), 5, crop=96, channels=16, aux_channels=8, drop_path=0.0).eval()
    images = torch.randn(2, 3, 64, 96)  # 4 x 6 patches
    with torch.no_grad():
        maps = model.backbone(images)
        levels = model.neck(maps)
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(level.shape[1] == 192 for level in levels)
    assert torch.equal(levels[2], maps[2]) and torch.equal(levels[3], F.max_pool2d(maps[3], 2))
    assert [type(layer).__name__ for layer in model.neck.up4] == [
        "ConvTranspose2d",
        "BatchNorm2d",
        "GELU",
        "ConvTranspose2d",
    ]


def test_upernet_logits_at_the_input_size_and_the_aux_head_only_in_training():
    model = upernet(_vit(), 5, crop=64, channels=16, aux_channels=8, drop_path=0.1)
    assert model.head.classifier.in_channels == 16 and model.aux_head.convs[0][0].in_channels == 192
    assert model.aux_head.convs[0][0].out_channels == 8 and model.aux_head.fuse is None
    model.train()
    main, aux = model(torch.randn(2, 3, 64, 64))
    assert main.shape == aux.shape == (2, 5, 64, 64)
    model.eval()
    with torch.no_grad():
        main, aux = model(torch.randn(1, 3, 60, 50))  # padded to 64 x 64 around the centre
    assert main.shape == (1, 5, 60, 50) and aux is None


def test_center_padding_splits_the_extra_around_the_centre():
    padded, (top, left) = center_pad(torch.ones(1, 1, 60, 50), 16)
    assert padded.shape == (1, 1, 64, 64) and (top, left) == (2, 7)  # 4 rows: 2 + 2; 14 columns: 7 + 7
    assert padded.sum() == 60 * 50 and padded[0, 0, 2:62, 7:57].all()


def test_convnext_stage_maps_go_through_a_layer_norm_into_uperhead():
    backbone = _convnext()
    trunk = ConvNeXtTrunk(copy.deepcopy(backbone.model), drop_path=0.4).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stages = backbone.model.forward_intermediates(images, indices=4, intermediates_only=True)
        maps = trunk(images)
    for got, stage in zip(maps, stages, strict=True):
        normed = F.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, normed)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 16, 24), (32, 8, 12), (48, 4, 6), (64, 2, 3)]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in trunk.stages for b in s.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])  # linear over the 5 blocks
    model = upernet(backbone, 5, crop=64, channels=None, aux_channels=8, drop_path=0.0)
    assert model.neck is None and model.head.classifier.in_channels == 512  # the ConvNeXt configs' 512
    assert [conv[0].in_channels for conv in model.head.laterals] == [16, 32, 48]
    assert (
        model.head.bottleneck[0].in_channels == 64 + 4 * 512 and model.aux_head.convs[0][0].in_channels == 48
    )
    model.train()
    main, aux = model(torch.randn(2, 3, 64, 64))
    assert main.shape == aux.shape == (2, 5, 64, 64)


def test_the_linear_head_is_bn_and_1x1_on_a_frozen_vit():
    backbone = _vit()
    model = linear(backbone, 5, "last4")
    trunk = model.backbone
    assert not any(p.requires_grad for p in trunk.parameters())
    assert model.head.bn.num_features == 4 * 192 and model.head.classifier.in_channels == 768
    model.train()
    assert not trunk.training and model.head.bn.training
    groups = param_groups(model, Config(head="linear", weight_decay=0.05), backbone)
    assert [len(g["params"]) for g in groups] == [4]  # BN weight / bias, conv weight / bias
    before = {n: p.clone() for n, p in trunk.named_parameters()}
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.05)
    logits, aux = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(logits, torch.randint(0, 5, (2, 64, 64))).backward()
    optimizer.step()
    assert aux is None and all(p.grad is None for p in trunk.parameters())
    assert all(torch.equal(p, before[n]) for n, p in trunk.named_parameters())
    model.eval()
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        maps = backbone.model.forward_intermediates(
            images, indices=[0, 1, 2, 3], norm=True, intermediates_only=True
        )
        expected = model.head.classifier(model.head.bn(torch.cat(maps, dim=1)))
        expected = F.interpolate(expected, size=(48, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(images)[0], expected)


# --- optimiser ---------------------------------------------------------------------------------


def _by_name(model, groups) -> dict[str, tuple[float, float]]:
    found = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(found)  # every parameter once
    return {n: found[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_vit_layer_decay_groups_are_mmsegs():
    """mmseg LearningRateDecayOptimizerConstructor, num_layers = depth + 2 = 6: embeddings layer 0,
    block i layer i + 1, the rest 5; scale 0.5^(6 - layer - 1). No weight decay on 1-d tensors and
    biases; its ('pos_embed', 'cls_token') exception compares full names and never holds."""
    backbone = _vit()
    model = upernet(backbone, 5, crop=64, channels=16, aux_channels=8, drop_path=0.1)
    config = Config(head="upernet", layer_decay=0.5, weight_decay=0.05)
    got = _by_name(model, param_groups(model, config, backbone))
    expected = {
        "backbone.vit.patch_embed.proj.weight": (0.5**5, 0.05),
        "backbone.vit.patch_embed.proj.bias": (0.5**5, 0.0),
        "backbone.vit.pos_embed": (0.5**5, 0.05),
        "backbone.vit.cls_token": (0.5**5, 0.05),
        "backbone.vit.blocks.0.attn.qkv.weight": (0.5**4, 0.05),
        "backbone.vit.blocks.0.attn.qkv.bias": (0.5**4, 0.0),
        "backbone.vit.blocks.0.rel_pos.table": (0.5**4, 0.05),
        "backbone.vit.blocks.0.ls1.gamma": (0.5**4, 0.0),
        "backbone.vit.blocks.2.norm1.weight": (0.5**2, 0.0),
        "backbone.vit.blocks.3.mlp.fc1.weight": (0.5, 0.05),
        "neck.up4.0.weight": (1.0, 0.05),
        "neck.up4.1.weight": (1.0, 0.0),
        "head.classifier.weight": (1.0, 0.05),
        "aux_head.classifier.bias": (1.0, 0.0),
    }
    assert {name: got[name] for name in expected} == expected  # powers of 0.5: exact
    assert not any(name.startswith("backbone.vit.norm.") for name in got)  # no final norm (unused)


def test_convnext_stage_wise_groups_are_the_convnext_repos():
    """get_num_layer_stage_wise with num_layers 6 (ConvNeXt-T's) + 2 = 8: stem and downsampling
    layers 0, stage i i + 1, the rest 7; scale 0.5^(8 - layer - 1)."""
    backbone = _convnext()
    model = upernet(backbone, 5, crop=64, channels=16, aux_channels=8, drop_path=0.0)
    got = _by_name(
        model, param_groups(model, Config(head="upernet", stage_decay=0.5, weight_decay=0.05), backbone)
    )
    expected = {
        "backbone.stem.0.weight": (0.5**7, 0.05),
        "backbone.stem.1.weight": (0.5**7, 0.0),
        "backbone.stages.1.downsample.1.weight": (0.5**7, 0.05),
        "backbone.stages.0.blocks.0.conv_dw.weight": (0.5**6, 0.05),
        "backbone.stages.2.blocks.1.gamma": (0.5**4, 0.0),
        "backbone.stages.3.blocks.0.mlp.fc1.weight": (0.5**3, 0.05),
        "backbone.norms.0.weight": (1.0, 0.0),
        "head.fuse.0.weight": (1.0, 0.05),
    }
    assert {name: got[name] for name in expected} == expected  # powers of 0.5: exact
    twelve = Config(head="upernet", stage_decay=0.5, stage_decay_layers=12)  # S / B / L / XL configs
    got = _by_name(model, param_groups(model, twelve, backbone))
    assert got["backbone.stem.0.weight"][0] == pytest.approx(0.5**13)
    assert got["backbone.stages.3.blocks.0.mlp.fc1.weight"][0] == pytest.approx(0.5**9)


def test_warm_up_is_mmcvs_linear_warm_up_of_the_poly_factor():
    # mmcv: regular = (1 - i / T)^power; warm-up lr = regular * (1 - (1 - i / W)(1 - ratio))
    config = Config(iterations=100, window=10, lr=1e-4, min_lr=0.0, power=1.0, warmup_iters=10)
    assert config.lr_factor(0) == pytest.approx(1e-6)
    assert config.lr_factor(5) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert config.lr_factor(10) == pytest.approx(0.9) and config.lr_factor(50) == pytest.approx(0.5)
    fcn = Config()
    assert all(fcn.lr_factor(i) == fcn.poly(i) for i in (0, 1, 999, 19_999))  # no warm-up: poly


# --- the task --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "mae_vit_tiny.pth"
    torch.save({"model": build_vit(TINY_VIT).state_dict()}, path)  # MAE's released layout
    return path


@pytest.fixture(scope="module")
def convnext_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("convnext") / "convnext_tiny_ssl.pth"
    torch.save({"model": build_convnext(TINY_CONVNEXT).state_dict(), "epoch": 3}, path)
    return path


@pytest.mark.parametrize(
    ("task", "checkpoint", "needed"),
    [
        ("seg-voc12aug", "vit_file", ["head=fcn is FCN-D8", "seg-voc12aug-upernet", "seg-voc12aug-linear"]),
        ("seg-cityscapes", "convnext_file", ["head=fcn is FCN-D8", "seg-cityscapes-upernet"]),
        ("seg-voc12aug-linear", "convnext_file", ["head=linear", "a convnext runs", "seg-voc12aug-upernet"]),
        (
            "seg-voc12aug-upernet",
            "random_checkpoint",
            ["head=upernet", "a resnet runs", "seg-voc12aug", "seg-cityscapes"],
        ),
    ],
)
def test_a_protocol_of_another_backbone_family_is_one_line_naming_the_presets(
    task, checkpoint, needed, request, results_dir, capsys
):
    assert cli("run", task, str(request.getfixturevalue(checkpoint))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(part in line for part in needed), line
    if checkpoint == "convnext_file":
        assert "-linear" not in line.split("runs", 1)[1]  # the linear head is the ViT's only
    assert not results_dir.exists() or not list(results_dir.glob("*.json"))


def test_upernet_on_a_vit_tests_by_windows_no_larger_than_the_crop(vit_file, results_dir, capsys):
    assert cli("run", "seg-voc12aug-upernet", str(vit_file), "--set", "test_mode=whole") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--set test_mode=slide slide_crop=64" in line


@pytest.mark.parametrize(
    ("task", "checkpoint", "protocol"),
    [
        ("seg-voc12aug-upernet", "vit_file", "upernet-mae"),
        ("seg-cityscapes-upernet", "vit_file", "upernet-mae"),
        ("seg-voc12aug-upernet", "convnext_file", "upernet-convnext"),
        ("seg-cityscapes-upernet", "convnext_file", "upernet-convnext"),
        ("seg-voc12aug-linear", "vit_file", "linear-dinov2"),
        ("seg-cityscapes-linear", "vit_file", "linear-dinov2"),
    ],
)
def test_every_preset_runs_on_the_embedded_data(task, checkpoint, protocol, request, tmp_path):
    options = ["iterations=2", "window=1", "batch_size=2", "warmup_iters=1", "test_images=2"]
    record = run_preset(task, request.getfixturevalue(checkpoint), tmp_path, options)
    assert record["protocol"] == protocol and record["config"]["head"] in task
    assert 0 <= record["metrics"]["mIoU"] <= 100 and len(record["details"]["history"][0]) == 2
    details = record["details"]
    if checkpoint == "vit_file":
        assert details["blocks"] == ([0, 1, 2, 3] if "upernet" in task else [3])
    if protocol == "upernet-convnext":
        assert details["lr_decay"] == {"stage_wise": 0.9, "num_layers": 6} and details["drop_path"] == 0.4
    if protocol == "upernet-mae":
        assert details["lr_decay"] == {"layer_wise": 0.65} and details["channels"] == 64  # the profile's
    (table,) = build_tables([record])
    (name,) = table.frame["Model"]
    assert name.startswith(record["model"]["name"]) and f"[{protocol}]" in name  # not the table's fcn-d8
    if protocol == "upernet-mae":  # a real ADE20K table shows mmseg's MAE ViT-B row
        ade = copy.deepcopy(record)
        ade["dataset"].update(name="ade20k", synthetic=False)
        (table,) = build_tables([ade], reference=True)
        rows = dict(zip(table.frame["Model"], table.frame["mIOU"], strict=True))
        assert rows["MAE ViT-B/16 [upernet-mae]"] == "48.13"

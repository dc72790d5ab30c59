"""ViTDet (det-coco-vitdet) and the detectors' backbone rules: the simple feature pyramid's
shapes and strides, window / global attention, the ViT's own weights in the ViTDet blocks, the
position embedding, large-scale jitter, layer-wise lr decay groups, refusals, and runs on the
embedded COCO (ViT with ViTDet, ConvNeXt with the FPN Mask R-CNN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from npidbench.backbones import backbone_for
from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.backbones.vit import ViTSpec, build_vit
from npidbench.errors import BadInput
from npidbench.runner import fit_config_to_patches, resolve_config
from npidbench.tasks import get_preset
from npidbench.tasks.detection import FAMILY, Config, vitdet_groups
from npidbench.transfer.vitdet import build_vitdet, global_blocks

from helpers import run_preset

SPEC = ViTSpec(depth=4, embed_dim=64, num_heads=2, patch_size=16, img_size=64)


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = build_vit(SPEC).eval()
    with torch.no_grad():  # every tensor random, so that a dropped or swapped one shows
        for param in vit.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return vit


def _model(**kwargs):
    options = {"image_size": 128, "window": 4, "drop_path": 0.0, "global_indexes": (1, 3), **kwargs}
    return build_vitdet(_vit(), classes=3, **options).eval()


def test_global_blocks_are_the_last_of_every_quarter():
    assert global_blocks(12) == (2, 5, 8, 11)  # ViT-B (mask_rcnn_vitdet.py)
    assert global_blocks(24) == (5, 11, 17, 23) and global_blocks(32) == (7, 15, 23, 31)
    assert global_blocks(2) == (0, 1)  # tiny test networks: every block global


def test_simple_pyramid_levels_have_strides_4_to_64_and_256_channels():
    model = _model()
    maps = model.backbone(torch.randn(2, 3, 128, 128))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape) for m in maps.values()] == [(2, 256, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    assert model.backbone.strides == (4, 8, 16, 32, 64)
    # x4: deconv, LN, GELU, deconv to a quarter of the width; x2 one deconv to half; x0.5 max-pool
    x4, x2, x1, half = model.backbone.stages
    assert [type(m).__name__ for m in x4[:4]] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]
    assert x4[3].out_channels == 16 and x2[0].out_channels == 32 and x1[0].in_channels == 64
    assert type(half[0]).__name__ == "MaxPool2d"
    assert all(stage[-4].bias is None and stage[-2].kernel_size == (3, 3) for stage in model.backbone.stages)


def test_window_blocks_see_only_their_window_and_global_blocks_see_everything():
    trunk = _model().backbone.trunk
    assert [b.window_size for b in trunk.blocks] == [4, 0, 4, 0]  # global: 1 and 3
    x = torch.randn(1, 8, 8, 64)
    changed = x.clone()
    changed[0, 0, 0] += 10.0  # a token of the top-left 4 x 4 window
    with torch.no_grad():
        moved = (trunk.blocks[0](changed) - trunk.blocks[0](x)).abs().sum(-1)[0] > 0
        moved_global = (trunk.blocks[1](changed) - trunk.blocks[1](x)).abs().sum(-1)[0] > 0
    assert moved[:4, :4].all() and not moved[4:].any() and not moved[:, 4:].any()
    assert moved_global.all()


def test_vitdet_blocks_compute_the_checkpoints_blocks_with_zero_relative_positions():
    vit = _vit()
    trunk = _model().backbone.trunk
    tokens = torch.randn(2, 64, 64)
    for index in (0, 1):  # a window block whose window covers the whole 4 x 4 grid, a global one
        trunk.blocks[index].window_size = 4 if index == 0 else 0
        with torch.no_grad():
            ours = trunk.blocks[index](tokens[:, :16].reshape(2, 4, 4, 64)).reshape(2, 16, 64)
            theirs = vit.blocks[index](tokens[:, :16])  # timm's block on the patch tokens alone
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert all(b.attn.rel_pos_h.abs().sum() == 0 for b in trunk.blocks)  # zero-initialised


def test_position_embedding_drops_the_class_entry_and_is_resized_bicubically():
    vit = _vit()
    trunk = build_vitdet(_vit(), 3, image_size=128, window=4).backbone.trunk
    patches = vit.pos_embed.detach()[:, 1:].reshape(1, 4, 4, 64)
    torch.testing.assert_close(trunk.positions(4, 4), patches)
    expected = F.interpolate(patches.permute(0, 3, 1, 2), size=(8, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(trunk.positions(8, 6), expected.permute(0, 2, 3, 1))


def test_large_scale_jitter_crops_pads_and_keeps_boxes_on_their_masks():
    model = _model()
    transform = model.transform.train()
    masks = torch.zeros(1, 84, 112, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    for seed in range(6):
        torch.manual_seed(seed)
        images, targets = transform([torch.rand(3, 84, 112)], [dict(target)])
        assert tuple(images.tensors.shape) == (1, 3, 128, 128)
        height, width = images.image_sizes[0]
        assert height <= 128 and width <= 128
        for box, mask in zip(targets[0]["boxes"], targets[0]["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    transform.eval()
    images, _ = transform([torch.rand(3, 84, 112)])
    assert images.image_sizes[0] == (96, 128)  # the long side to 128 at test, padded to the square


def test_layer_decay_groups_follow_detectron2s_vit_rates():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    config = Config(head="vitdet", layer_decay=0.7, weight_decay=0.1)
    scales, decays = {}, {}
    for group in vitdet_groups(model, config):
        for param in group["params"]:
            scales[names[id(param)]], decays[names[id(param)]] = group["lr_scale"], group["weight_decay"]
    assert len(scales) == sum(1 for p in model.parameters() if p.requires_grad)
    assert scales["backbone.trunk.pos_embed"] == scales["backbone.trunk.patch_embed.proj.weight"] == pytest.approx(0.7**5)
    for block in range(4):
        assert scales[f"backbone.trunk.blocks.{block}.attn.qkv.weight"] == pytest.approx(0.7 ** (4 - block))
        assert scales[f"backbone.trunk.blocks.{block}.attn.rel_pos_h"] == pytest.approx(0.7 ** (4 - block))
    assert scales["backbone.stages.0.0.weight"] == scales["roi_heads.box_predictor.cls_score.weight"] == 1.0
    assert decays["backbone.trunk.pos_embed"] == decays["backbone.trunk.blocks.0.norm1.weight"] == 0.0
    assert decays["backbone.stages.0.1.weight"] == 0.0  # the pyramid's LayerNorm
    assert decays["backbone.trunk.blocks.0.attn.qkv.bias"] == decays["rpn.head.cls_logits.weight"] == 0.1


def test_each_detector_runs_on_the_backbones_its_protocol_names():
    vit = backbone_for(build_vit(SPEC), SPEC.name, "vit")
    convnext = backbone_for(build_convnext(ConvNeXtSpec((1, 1, 1, 1), (16, 32, 64, 128))), "convnext_t", "convnext")
    c4, fpn, vitdet = (resolve_config(get_preset(t), True, []) for t in ("det-voc0712", "det-coco", "det-coco-vitdet"))
    assert "det-coco-vitdet" in FAMILY.refusal(c4, vit) and "det-coco-vitdet" in FAMILY.refusal(fpn, vit)
    assert FAMILY.refusal(vitdet, vit) is None and FAMILY.refusal(fpn, convnext) is None
    assert "det-coco (Mask R-CNN FPN)" in FAMILY.refusal(c4, convnext)
    assert "plain-ViT" in FAMILY.refusal(vitdet, convnext)


def test_vitdet_settings_are_checked():
    with pytest.raises(ValueError, match="layer_decay"):
        Config(head="vitdet", layer_decay=0.0)
    with pytest.raises(ValueError, match="scale_range"):
        Config(head="vitdet", scale_range=(2.0, 1.0))


def test_image_size_must_be_whole_patches_on_real_data_and_is_rounded_up_on_the_embedded():
    with pytest.raises(BadInput, match="image_size=1000"):
        fit_config_to_patches(Config(head="vitdet", image_size=1000), 16, synthetic=False)
    assert fit_config_to_patches(Config(head="vitdet", image_size=120), 16, synthetic=True).image_size == 128


def test_det_coco_vitdet_runs_on_the_embedded_coco(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    spec = ViTSpec(depth=2, embed_dim=192, num_heads=3, patch_size=16, img_size=64)
    torch.save(build_vit(spec).state_dict(), path)
    record = run_preset(
        "det-coco-vitdet", path, tmp_path, ["iterations=2", "window=1", "milestones=[]", "warmup=1", "test_images=3"]
    )
    assert record["protocol"] == "vitdet" and record["details"]["arch"] == spec.name
    assert {"AP(Box)", "AP(Mask)"} <= set(record["metrics"])
    assert len(record["details"]["history"][0]) == 2


def test_det_coco_runs_a_convnext_in_the_fpn_mask_rcnn(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "convnext.pth"
    model = build_convnext(ConvNeXtSpec((1, 1, 1, 1), (16, 32, 64, 128)))
    torch.save(model.state_dict(), path)
    record = run_preset("det-coco", path, tmp_path, ["iterations=2", "window=1", "milestones=[]", "test_images=3"])
    assert record["protocol"] == "mask-rcnn-fpn" and record["details"]["arch"].startswith("convnext")


def test_width_multiplied_resnets_feed_the_c4_fpn_and_fcn_models_with_their_widths():
    from npidbench.transfer.detection import build_detector
    from npidbench.transfer.segmentation import FCNSegmenter

    from checkpoint_zoo import wide_resnet50

    wide = wide_resnet50(2, randomise=False)  # SimCLR x2 / SwAV w2: res4 2048, res5 4096 wide
    c4 = build_detector(wide, "c4", 3, (64,), 96, 64)
    assert c4.backbone.out_channels == 2048 and c4.roi_heads.box_head.out_channels == 4096
    fpn = build_detector(wide_resnet50(2, randomise=False), "fpn", 3, (64,), 96, 64).eval()
    with torch.no_grad():
        maps = fpn.backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps.values()] == [256] * 5
    fcn = FCNSegmenter(wide_resnet50(2, randomise=False), classes=5).eval()
    assert fcn.head.convs[0][0].in_channels == 4096 and fcn.aux_head.convs[0][0].in_channels == 2048
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, 64, 64))[0].shape == (1, 5, 64, 64)


def test_the_coco_table_names_vitdet_rows_by_protocol_with_the_published_references():
    from npidbench.tasks.detection import COCO_TABLE

    rows = {row["Model"]: row for row in COCO_TABLE.references["coco"]}
    assert rows["MAE ViT-B [vitdet]"]["mAP(Box)"] == 51.6 and rows["MAE ViT-B [vitdet]"]["mAP(Mask)"] == 45.9
    assert rows["MAE ViT-L [vitdet]"]["mAP(Box)"] == 55.5 and rows["MAE ViT-L [vitdet]"]["mAP(Mask)"] == 49.2
    assert COCO_TABLE.default_protocol == "mask-rcnn-fpn"  # a ViTDet record's row is named [vitdet]

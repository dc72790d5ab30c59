"""The ViT features against what the frameworks compute: DINO's position-embedding interpolation
at another grid, and MAE's global-pool feature for fc_norm models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from npidbench.backbones import backbone_for
from npidbench.backbones.vit import ViTSpec, build_vit

pytest.importorskip("timm")


def _dino_reference(model, images: torch.Tensor) -> torch.Tensor:
    """The final-norm CLS as DINO's VisionTransformer computes it: patch tokens, the class token,
    the position embedding interpolated bicubic by (grid + 0.1) / trained grid (DINO's
    interpolate_pos_encoding, written here from its description in PROTOCOLS-ARCH.md)."""
    n = images.shape[0]
    patch = model.patch_embed.proj.kernel_size[0]
    tokens = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    side = math.isqrt(model.pos_embed.shape[1] - 1)
    dim = model.pos_embed.shape[-1]
    pos = model.pos_embed
    if tokens.shape[1] != side * side:  # DINO keeps the table at its own grid
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        h, w = images.shape[-2] // patch + 0.1, images.shape[-1] // patch + 0.1
        grid = F.interpolate(grid, scale_factor=(h / side, w / side), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    x = torch.cat([model.cls_token.expand(n, -1, -1), tokens], dim=1) + pos
    for block in model.blocks:
        x = block(x)
    return model.norm(x)[:, 0]


@pytest.mark.parametrize("size", [64, 48, 80])
def test_dino_interpolation_gives_dinos_features_at_any_grid(size):
    torch.manual_seed(0)
    spec = ViTSpec(depth=2, embed_dim=64, num_heads=2, patch_size=8, img_size=64, pos_interpolation="dino")
    model = build_vit(spec).eval()
    torch.nn.init.normal_(model.pos_embed)  # a rough table: interpolation differences show
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = backbone_for(model, spec.name, "vit").forward_layers(images, ["CLS"])["CLS"]
        reference = _dino_reference(model, images)
        timm_way = build_vit(ViTSpec(**{**spec.__dict__, "pos_interpolation": "timm"}))
        timm_way.load_state_dict(model.state_dict())
        other = backbone_for(timm_way.eval(), spec.name, "vit").forward_layers(images, ["CLS"])["CLS"]
    assert torch.allclose(ours, reference, atol=1e-5)
    if size != 64:  # timm's antialiased resample is another function of the table
        assert not torch.allclose(other, reference, atol=1e-4)


def test_mae_global_pool_models_default_to_fc_norm_of_the_mean_patch_token():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    spec = ViTSpec(depth=2, embed_dim=64, num_heads=2, patch_size=8, img_size=32, fc_norm=True)
    model = build_vit(spec).eval()
    mae_style = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=0,
        global_pool="avg",
        fc_norm=True,
    ).eval()
    mae_style.load_state_dict(model.state_dict())
    backbone = backbone_for(model, spec.name, "vit")
    assert backbone.default_layer == "AvgPatch"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            backbone.forward_layers(images, ["AvgPatch"])["AvgPatch"], mae_style(images), atol=1e-6
        )


def test_vit_and_convnext_evaluate_bicubic_and_the_cache_keys_it():
    """DINO / DINOv2 resize with interpolation=3 (bicubic); ResNet keys stay as they were."""
    import torchvision.transforms.v2.functional as TF

    from npidbench.backbones import FAMILIES
    from npidbench.data.images import EvalTransform

    assert FAMILIES["vit"].interpolation == FAMILIES["convnext"].interpolation == "bicubic"
    assert FAMILIES["resnet"].interpolation == "bilinear"
    bilinear, bicubic = EvalTransform(64, 56), EvalTransform(64, 56, interpolation="bicubic")
    assert bilinear.fingerprint == "center-crop:resize64:crop56:bilinear-aa:imagenet-norm:v1"
    assert bicubic.fingerprint != bilinear.fingerprint
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    expected = TF.center_crop(
        TF.resize(image, [64], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [56, 56]
    )
    assert torch.equal(bicubic(image), expected) and not torch.equal(bilinear(image), expected)

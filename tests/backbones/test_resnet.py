"""Multi-layer features: the pooled shapes of PROTOCOLS.md and one pass for all layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from npidbench.backbones.resnet import LAYERS, POOLING, MultiLayerFeatures, build_resnet, layer_dims

from checkpoint_zoo import random_resnet
from helpers import RESNET50_DIMS

# PROTOCOLS.md "Multi-layer features" (ResNet-50) and the same grids with ResNet-18 channels.
EXPECTED_DIMS = {
    "resnet50": RESNET50_DIMS,
    "resnet18": {
        "Feature1": 64 * 144,
        "Feature2": 64 * 36,
        "Feature3": 128 * 16,
        "Feature4": 256 * 9,
        "Feature5": 512 * 4,
        "AvgPool": 512,
    },
}


def manual_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    f1 = model.relu(model.bn1(model.conv1(x)))
    f2 = model.layer1(model.maxpool(f1))
    f3 = model.layer2(f2)
    f4 = model.layer3(f3)
    f5 = model.layer4(f4)
    return {"Feature1": f1, "Feature2": f2, "Feature3": f3, "Feature4": f4, "Feature5": f5}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_pooled_shapes_at_224(arch):
    model = random_resnet(arch, seed=0).eval()
    model.fc = nn.Identity()
    extractor = MultiLayerFeatures(model).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = extractor(x)
        maps = manual_maps(model, x)
    assert {k: v.shape[1] for k, v in out.items()} == EXPECTED_DIMS[arch]
    assert layer_dims(model) == EXPECTED_DIMS[arch]
    for name, spec in POOLING.items():
        assert maps[name].shape[-1] == spec.map_at_224
        pooled = nn.AvgPool2d(spec.kernel, spec.stride, spec.padding)(maps[name])
        assert pooled.shape[-1] == spec.grid
        torch.testing.assert_close(out[name], pooled.flatten(1))
    torch.testing.assert_close(out["AvgPool"], maps["Feature5"].mean(dim=(2, 3)))


def test_other_input_sizes_pool_adaptively_to_the_same_grid():
    model = build_resnet("resnet18").eval()
    extractor = MultiLayerFeatures(model).eval()
    with torch.inference_mode():
        out = extractor(torch.randn(1, 3, 96, 96))
    assert {k: v.shape[1] for k, v in out.items()} == EXPECTED_DIMS["resnet18"]


def test_subset_of_layers_and_single_pass_agree():
    model = build_resnet("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        everything = MultiLayerFeatures(model, LAYERS)(x)
        only_first = MultiLayerFeatures(model, ("Feature1",))(x)
    assert set(only_first) == {"Feature1"}
    torch.testing.assert_close(everything["Feature1"], only_first["Feature1"])


def test_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="unknown layers"):
        MultiLayerFeatures(build_resnet("resnet18"), ("Feature9",))

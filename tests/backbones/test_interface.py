"""The Backbone interface: what the benchmarks read from a network (layers, pooled sizes,
one-pass extraction, default layer, supported families), one implementation per family."""

from __future__ import annotations

import pytest
import torch

from npidbench.backbones import FAMILIES, Backbone, Layer, ResNetBackbone, backbone_for
from npidbench.backbones.resnet import MultiLayerFeatures, build_resnet
from npidbench.errors import BadInput

from helpers import RESNET50_DIMS


def test_resnet50_layers_are_the_protocols_pooled_sizes():
    """PROTOCOLS.md "Multi-layer features": 9216 / 9216 / 8192 / 9216 / 8192, AvgPool 2048."""
    backbone = backbone_for(build_resnet("resnet50"), "resnet50")
    dims = {name: layer.dim for name, layer in backbone.layers().items()}
    assert dims == RESNET50_DIMS
    assert backbone.feature_layers == ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5")
    assert backbone.default_layer == "AvgPool" and backbone.layers()["AvgPool"].grid == 0


def test_forward_layers_returns_what_was_asked_as_the_resnet_extractor_does():
    torch.manual_seed(0)
    model = build_resnet("resnet18").eval()
    backbone = backbone_for(model, "resnet18")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = backbone.forward_layers(images, ["Feature3", "AvgPool"])
        reference = MultiLayerFeatures(model, ("Feature3", "AvgPool"))(images)
    assert list(got) == ["Feature3", "AvgPool"]
    for name, value in got.items():
        assert torch.equal(value, reference[name])
        assert value.shape == (2, backbone.layers()[name].dim)


def test_an_unknown_layer_is_one_line_naming_the_choices():
    backbone = backbone_for(build_resnet("resnet18"), "resnet18")
    with pytest.raises(BadInput, match="resnet18 has no layer Block4; choose from Feature1, Feature2"):
        backbone.check_layers(["Block4"])


def test_a_family_a_backbone_does_not_support_is_refused_naming_who_runs_it(monkeypatch):
    class VectorOnly(Backbone):
        family = "vector-only"
        supports = frozenset({"knn"})

        def layers(self) -> dict[str, Layer]:
            return {"Out": Layer("Out", 8)}

        @property
        def feature_layers(self) -> tuple[str, ...]:
            return ("Out",)

        @property
        def default_layer(self) -> str:
            return "Out"

        def extractor(self, names):
            raise NotImplementedError

    monkeypatch.setitem(FAMILIES, VectorOnly.family, VectorOnly)
    backbone = backbone_for(torch.nn.Identity(), "toy", "vector-only")
    backbone.check_supports("knn")
    with pytest.raises(
        BadInput, match=r"detection does not run on vector-only backbones \(toy\); it runs on: convnext, resnet, vit"
    ):
        backbone.check_supports("detection")
    assert ResNetBackbone.supports is None  # the reference backbone runs every family


def test_an_unknown_backbone_family_is_bad_input():
    with pytest.raises(BadInput, match="no backbone family 'swin'"):
        backbone_for(torch.nn.Identity(), "swin_tiny", "swin")

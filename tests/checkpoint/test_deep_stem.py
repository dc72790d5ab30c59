"""timm's deep-stem ResNets (ResNet-C: conv1.0/.1/.3/.4/.6; ResNet-D: plus the average-pool
shortcut downsample.0 AvgPool / .1 conv / .2 BN): strict loads of timm-written state dicts to the
source tensors, features equal to timm's own network on the same weights, the names, the
inspection, and every refusal (other deep stems, damaged files, exports that cannot say it)."""

from __future__ import annotations

import pytest
import torch

from npidbench.backbones import backbone_for
from npidbench.backbones.resnet import DEEP_STEM_RESNETS, MultiLayerFeatures, build_resnet, layer_dims
from npidbench.checkpoint import inspect_checkpoint, load_backbone
from npidbench.checkpoint.arch import DEEP_STEM_ARCHS, infer_arch, parse_arch
from npidbench.checkpoint.own import export_backbone
from npidbench.errors import BadInput

from helpers import cli, one_error_line

timm = pytest.importorskip("timm")

STEM = "deep (ResNet-C/D, timm)"


def timm_resnet(name: str, seed: int = 0) -> torch.nn.Module:
    """A random timm ``name`` with its classifier (10 classes), every weight and BN statistic
    moved off its initial value, so that a tensor left at its default would show."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
        for key, buffer in model.named_buffers():
            if key.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif key.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif key.endswith("num_batches_tracked"):
                buffer.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def sources() -> dict[str, torch.nn.Module]:
    return {
        name: timm_resnet(name, seed) for seed, name in enumerate(("resnet50d", "resnet50c", "resnet18d"))
    }


def backbone_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def save(model: torch.nn.Module, path, layout: str):
    state = model.state_dict()
    if layout == "wrapped":  # DDP training script: {"state_dict": {"module." + k}}
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:  # timm's own model.state_dict(), fc included
        torch.save(state, path)
    return path


@pytest.mark.parametrize("layout", ["bare", "wrapped"])
@pytest.mark.parametrize("name", ["resnet50d", "resnet50c"])
def test_timm_files_load_to_the_source_tensors(sources, name, layout, tmp_path):
    source = sources[name]
    loaded = load_backbone(save(source, tmp_path / f"{name}.pth", layout))
    info = loaded.inspection
    assert (info.arch, info.cifar_stem, info.family) == (name, False, "resnet")
    assert info.stem.startswith(STEM)
    assert ("average-pool shortcuts" in info.stem) == name.endswith("d")
    assert not info.missing and not info.unexpected and not info.defaulted
    prefix = "state_dict.module." if layout == "wrapped" else ""
    assert {f"{prefix}fc.weight", f"{prefix}fc.bias"} <= set(info.ignored)
    expected = backbone_tensors(source)
    got = loaded.model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert loaded.provenance()["arch"] == name


@pytest.mark.parametrize("name", ["resnet50d", "resnet50c", "resnet18d"])
def test_features_equal_timms_network(sources, name, tmp_path):
    source = sources[name]
    loaded = load_backbone(save(source, tmp_path / f"{name}.pth", "bare"))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = MultiLayerFeatures(loaded.model)(images)
        pooled = source.forward_features(images).mean(dim=(2, 3))
        # The same extractor on timm's own module (its stem activation is act1, not relu).
        theirs = MultiLayerFeatures(source)(images)
        odd = torch.randn(1, 3, 67, 61)  # AvgPool2d ceil_mode at odd sizes
        odd_ours, odd_theirs = (
            loaded.model(odd),
            source.forward_head(source.forward_features(odd), pre_logits=True),
        )
    dims = layer_dims(loaded.model)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: (2, d) for k, d in dims.items()}
    wide = 4 if name != "resnet18d" else 1  # Bottleneck expansion
    assert dims == {
        "Feature1": 64 * 12**2,
        "Feature2": 64 * wide * 6**2,
        "Feature3": 128 * wide * 4**2,
        "Feature4": 256 * wide * 3**2,
        "Feature5": 512 * wide * 2**2,
        "AvgPool": 512 * wide,
    }
    assert torch.equal(ours["AvgPool"], pooled)
    for layer, value in theirs.items():
        assert torch.equal(ours[layer], value), layer
    assert torch.equal(odd_ours, odd_theirs)
    layers = backbone_for(loaded.model, loaded.arch).layers()
    assert layers["Feature1"].channels == 64 and layers["AvgPool"].channels == 512 * wide


@pytest.mark.parametrize("name", DEEP_STEM_ARCHS)
def test_every_deep_stem_arch_is_timms_layout_and_inferred(name):
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        ours = build_resnet(name).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    spec = infer_arch(theirs)
    assert (spec.name, spec.cifar_stem, spec.deep_stem) == (name, False, True)
    assert parse_arch(name) == spec


def test_arch_option(sources, tmp_path, capsys):
    path = save(sources["resnet50d"], tmp_path / "d.pth", "bare")
    assert load_backbone(path, arch="resnet50d").arch == "resnet50d"
    for wrong in ("resnet50", "resnet50c"):
        with pytest.raises(BadInput, match="holds a resnet50d"):
            load_backbone(path, arch=wrong)
    with pytest.raises(BadInput, match="deep stem, not a CIFAR one"):
        parse_arch("resnet50d-cifar")
    assert cli("inspect", str(path), "--arch", "resnet50d") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "resnet50d" in out and STEM in out


@pytest.mark.parametrize(
    "drop", ["conv1.3.weight", "conv1.4.running_var", "layer2.0.downsample.1.weight", "layer3.5.bn2.bias"]
)
def test_a_missing_tensor_is_refused_in_one_line(sources, drop, tmp_path, capsys):
    state = sources["resnet50d"].state_dict()
    del state[drop]
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    with pytest.raises(BadInput, match="1 backbone keys missing") as refused:
        load_backbone(path)
    assert drop in str(refused.value) and "\n" not in str(refused.value)
    assert cli("inspect", str(path)) == 2
    assert "resnet50d" in one_error_line(capsys.readouterr().err)


def test_a_mixed_shortcut_is_refused(sources, tmp_path):
    """A ResNet-C shortcut (downsample.0 conv, .1 BN) in one stage of a ResNet-D: not its network."""
    state = sources["resnet50d"].state_dict()
    conv, bn = sources["resnet50c"].state_dict(), "layer3.0.downsample"
    for key in [k for k in state if k.startswith(f"{bn}.")]:
        del state[key]
    state.update({k: v for k, v in conv.items() if k.startswith(f"{bn}.")})
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    with pytest.raises(BadInput, match="resnet50d") as refused:
        load_backbone(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("resnet50s", "ResNet-S"),
        ("resnet50t", "ResNet-T"),
        ("resnet26t", "ResNet-T"),
        ("ecaresnet50d", "channel-attention"),
        ("seresnext26d_32x4d", "squeeze-excitation"),
    ],
)
def test_other_deep_stems_are_refused(name, named):
    with torch.device("meta"):
        state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    with pytest.raises(BadInput, match=named) as refused:
        infer_arch(state)
    assert "\n" not in str(refused.value)


def test_a_replaced_stem_pool_is_not_dropped(sources, tmp_path):
    """timm's replace_stem_pool puts a conv + BN in ``maxpool``: refused, not ignored as a head."""
    state = sources["resnet50d"].state_dict()
    state["maxpool.0.weight"] = torch.randn(64, 64, 3, 3)
    path = tmp_path / "stem_pool.pth"
    torch.save(state, path)
    info, tensors = inspect_checkpoint(path)
    assert tensors is None and "maxpool.0" in info.error and "maxpool.0.weight" not in info.ignored


def test_exports(sources, tmp_path):
    loaded = load_backbone(save(sources["resnet50d"], tmp_path / "d.pth", "bare"))
    for to in ("torchvision", "detectron2"):
        with pytest.raises(BadInput, match="--to timm") as refused:
            export_backbone(loaded.model, to, tmp_path / f"out-{to}", arch=loaded.arch)
        assert "\n" not in str(refused.value)
        assert not (tmp_path / f"out-{to}").exists()
    out = export_backbone(loaded.model, "timm", tmp_path / "timm.pth", arch=loaded.arch)
    fresh = timm.create_model("resnet50d", pretrained=False, num_classes=0)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for key, value in backbone_tensors(sources["resnet50d"]).items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_builder_refuses_a_cifar_deep_stem():
    assert set(DEEP_STEM_ARCHS) == set(DEEP_STEM_RESNETS)
    with pytest.raises(ValueError, match="deep-stem"):
        build_resnet("resnet50d", cifar_stem=True)

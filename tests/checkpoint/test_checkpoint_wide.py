"""Width-multiplied ResNet-50s (SimCLR v1 via the PyTorch converter, SwAV RN50-w2/w4/w5): the
builder's widths, strict loads of both layouts to the source tensors, the converter's unnormalised
input honoured by extraction, the cache key and every training family, and the refusals.

The files are real-shaped ResNet-50 x2 networks (94M weights), written once per module."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from npidbench.backbones import backbone_for
from npidbench.backbones.resnet import LAYERS, build_resnet, wide_resnet50_width
from npidbench.cache import FeatureCache
from npidbench.checkpoint import inspect_checkpoint, load_backbone
from npidbench.checkpoint.arch import WIDE_ARCHS, infer_arch, parse_arch
from npidbench.checkpoint.formats import simclr_converter_layout
from npidbench.checkpoint.own import export_backbone
from npidbench.data.imagenet import load_imagefolder
from npidbench.data.images import EvalTransform, decode_rgb, normalize_batch
from npidbench.errors import BadInput
from npidbench.features import ExtractOptions, extract, feature_keys
from npidbench.runner import RunRequest, run_task
from npidbench.tasks.detection import refuse_for_detectron2
from npidbench.training.augment import TrainBatch
from npidbench.training.batches import training_input
from npidbench.transfer.detection import build_detector
from npidbench.transfer.seg_data import normalize_crops

from checkpoint_zoo import backbone_state, random_resnet, save_simclr_converter, save_swav, wide_resnet50
from helpers import cli, one_error_line, tiny_imagefolder

WIDTH = 2
TRANSFORM = EvalTransform(72, 64, "center-crop")
OPTIONS = ExtractOptions(device="cpu", workers=0, batch_size=4)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """The network both files hold: a ResNet-50 x2 built independently of npidbench's builder."""
    return wide_resnet50(WIDTH, seed=3)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wide")
    return {
        "swav": save_swav(source, folder / "swav_RN50w2_400ep_pretrain.pth.tar"),
        "simclr": save_simclr_converter(source, folder / "resnet50-2x.pth"),
    }


@pytest.fixture(scope="module")
def simclr(files):
    return load_backbone(files["simclr"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """imagenet/{train,val}: 2 classes of class-coloured images."""
    root = tmp_path_factory.mktemp("data")
    tiny_imagefolder(root / "imagenet", classes=2, per_class=4, size=80, split="train", seed=0)
    tiny_imagefolder(root / "imagenet", classes=2, per_class=2, size=80, split="val", seed=1)
    return root


@pytest.fixture(scope="module")
def split(data_root):
    return load_imagefolder(data_root / "imagenet", "train", dataset="imagenet")


def _meta_state(width: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return wide_resnet50(width, randomise=False).state_dict()


# --- the builder -------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 4, 5])
def test_builder_has_torchvisions_names_and_every_layer_widened(width):
    with torch.device("meta"):
        built = build_resnet(f"resnet50w{width}")
        plain = torchvision.models.resnet50()
    reference = {k: v.shape for k, v in _meta_state(width).items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in built.state_dict().items()} == reference
    assert list(built.state_dict()) == [k for k in plain.state_dict() if not k.startswith("fc.")]
    layers = backbone_for(built, f"resnet50w{width}").layers()
    channels = {name: layers[name].channels for name in LAYERS}
    assert channels == {
        "Feature1": 64 * width,
        "Feature2": 256 * width,
        "Feature3": 512 * width,
        "Feature4": 1024 * width,
        "Feature5": 2048 * width,
        "AvgPool": 2048 * width,
    }
    assert layers["Feature1"].dim == 64 * width * 12**2 and layers["AvgPool"].dim == 2048 * width
    assert isinstance(built, torchvision.models.ResNet) and built.conv1.padding == (3, 3)


def test_builder_computes_the_source_network(source):
    model = build_resnet("resnet50w2").eval()
    model.load_state_dict(backbone_state(source), strict=True)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = torch.nn.Sequential(*list(source.children())[:-1])(images).flatten(1)
        got = model(images)
        layers = backbone_for(model, "resnet50w2").forward_layers(images, LAYERS)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(layers["AvgPool"], expected)
    assert {name: tuple(v.shape) for name, v in layers.items()} == {
        "Feature1": (2, 128 * 144),
        "Feature2": (2, 512 * 36),
        "Feature3": (2, 1024 * 16),
        "Feature4": (2, 2048 * 9),
        "Feature5": (2, 4096 * 4),
        "AvgPool": (2, 4096),
    }


# --- inference of the arch ---------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_width_is_inferred_from_the_stem_and_the_stages(width):
    assert infer_arch(_meta_state(width)).name == f"resnet50w{width}"
    assert wide_resnet50_width(f"resnet50w{width}") == width
    assert parse_arch(f"resnet50w{width}").name == f"resnet50w{width}"


def test_wide_resnet50_2_stays_torchvisions(tmp_path):
    """torchvision's wide_resnet50_2 widens the inner 3x3 only and keeps 2048 outputs: it is still
    that network, with ImageNet-normalised input and a record without the new field."""
    model = random_resnet("wide_resnet50_2", seed=2)
    path = tmp_path / "wrn.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(path)
    assert (loaded.arch, loaded.inspection.format, loaded.input_normalised) == (
        "wide_resnet50_2",
        "torchvision",
        True,
    )
    assert loaded.inspection.width_multiplier == 1
    assert loaded.backbone.layers()["AvgPool"].channels == 2048
    assert "input_normalised" not in loaded.provenance()
    assert set(loaded.provenance()) == {
        "path",
        "sha256",
        "format",
        "arch",
        "cifar_stem",
        "stem_padding",
        "branch",
        "defaulted",
        "skipped_objects",
        "meta",
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("stem-only", "widened unevenly (conv1 x2, layer1 x1, layer2 x1, layer3 x1, layer4 x1)"),
        ("deeper", "a width-multiplied ResNet-101 x2 (SimCLR/SwAV style: conv1 has 128 channels, not 64)"),
        ("fractional", "only whole width multiples are built"),
        ("inner", "whose layer1 bottleneck is 256 wide (not 128)"),
    ],
)
def test_other_widened_layouts_are_refused_by_name(edit, message):
    if edit == "stem-only":
        state = {k: v for k, v in _meta_state(1).items()}
        state["conv1.weight"] = torch.empty(128, 3, 7, 7, device="meta")
    elif edit == "deeper":  # a ResNet-101 x2: no released model, not built
        state = _meta_state(2)
        for index in range(6, 23):
            state[f"layer3.{index}.conv1.weight"] = state["layer3.1.conv1.weight"]
    elif edit == "fractional":  # every layer x1.5
        state = {
            k: torch.empty(v.shape[0] * 3 // 2, *v.shape[1:], device="meta") if v.ndim else v
            for k, v in _meta_state(1).items()
        }
    else:  # stages x2, bottleneck x4: a wide_resnet50_2 widened again
        state = _meta_state(2)
        state["layer1.0.conv1.weight"] = torch.empty(256, 128, 1, 1, device="meta")
    with pytest.raises(BadInput) as refused:
        infer_arch(state)
    assert message in str(refused.value)


# --- SwAV --------------------------------------------------------------------------------------


def test_swav_file_loads_to_exactly_the_source_tensors(files, source):
    loaded = load_backbone(files["swav"])
    info = loaded.inspection
    assert (info.format, info.arch, info.branch, info.input_normalised) == (
        "swav",
        "resnet50w2",
        "main",
        True,
    )
    assert info.stem == "standard stem (7x7 stride 2, padding 3, max-pool)"  # SwAV's pad 1 + conv pad 2
    expected = backbone_state(source)
    state = loaded.model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert info.ignored and all(
        k.startswith(("module.projection_head.", "module.prototypes")) for k in info.ignored
    )
    assert not info.missing and not info.unexpected and not info.defaulted
    assert "input_normalised" not in loaded.provenance()


def test_wrong_arch_is_refused_in_one_line(files, capsys):
    for wrong in ("resnet50w4", "resnet50", "wide_resnet50_2"):
        assert cli("inspect", str(files["swav"]), "--arch", wrong) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"holds a resnet50w2, but --arch {wrong} was asked for; pass --arch resnet50w2" in line
    assert cli("inspect", str(files["swav"]), "--arch", "resnet50w2-cifar") == 2
    assert "width-multiplied ResNet-50s have the standard stem only" in one_error_line(
        capsys.readouterr().err
    )
    assert cli("inspect", str(files["swav"]), "--arch", "resnet50w2") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "resnet50w2" in out and "x2, every layer" in out and "normalised by the ImageNet mean/std" in out


# --- SimCLR v1 (the PyTorch converter) ---------------------------------------------------------


def test_simclr_converter_file_loads_to_exactly_the_source_tensors(simclr, source):
    info = simclr.inspection
    assert (info.format, info.arch, info.input_normalised) == ("simclr-converter", "resnet50w2", False)
    assert info.width_multiplier == 2
    state = simclr.model.state_dict()
    for key, value in backbone_state(source).items():
        expected = torch.zeros_like(value) if key.endswith("num_batches_tracked") else value
        assert torch.equal(state[key], expected), key
    assert sorted(info.ignored) == ["state_dict.fc.bias", "state_dict.fc.weight"]  # TF's supervised head
    assert simclr.provenance()["input_normalised"] is False


def test_simclr_features_are_the_source_network_on_unit_range_pixels(simclr, source, split, tmp_path):
    found = extract(simclr, split, TRANSFORM, ("Feature5", "AvgPool"), FeatureCache(tmp_path / "c"), OPTIONS)
    images = torch.stack([TRANSFORM(decode_rgb(path)) for path, _ in split.samples])
    trunk = torch.nn.Sequential(*list(source.children())[:-2])
    with torch.inference_mode():
        maps = trunk(images.float() / 255)  # Resize, CenterCrop, ToTensor: no mean/std
        normalised = trunk(normalize_batch(images)).mean(dim=(2, 3))
    pooled = maps.mean(dim=(2, 3)).numpy()
    scale = float(np.abs(pooled).max())
    np.testing.assert_allclose(found["AvgPool"].features, pooled, rtol=1e-4, atol=1e-5 * scale)
    feature5 = maps.flatten(1).numpy()  # a 2x2 map at 64 px: the protocol's 2x2 grid as it is
    np.testing.assert_allclose(found["Feature5"].features, feature5, rtol=1e-4, atol=1e-5 * scale)
    assert not np.allclose(found["AvgPool"].features, normalised.numpy(), rtol=1e-2)


def test_unnormalised_input_is_its_own_cache_key_and_others_keep_theirs(simclr, split, random_checkpoint):
    (key,) = feature_keys(simclr, split, TRANSFORM, ("AvgPool",))
    assert key.transform == "center-crop:resize72:crop64:bilinear-aa:unit-range:v1"
    as_if_normalised = dataclasses.replace(simclr.inspection, input_normalised=True)
    (other,) = feature_keys(type(simclr)(simclr.model, as_if_normalised), split, TRANSFORM, ("AvgPool",))
    assert dataclasses.replace(other, transform=key.transform) == key and other.transform != key.transform
    (plain,) = feature_keys(load_backbone(random_checkpoint), split, EvalTransform(), ("AvgPool",))
    assert plain.transform == "center-crop:resize256:crop224:bilinear-aa:imagenet-norm:v1"  # unchanged


def test_inspect_shows_the_width_and_the_input(files, capsys):
    assert cli("inspect", str(files["simclr"])) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("simclr-converter", "resnet50w2", "x2, every layer (stem 128", "not normalised"):
        assert text in out, text
    assert cli("inspect", str(files["simclr"]), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_normalised"] is False and info["arch"] == "resnet50w2"


def test_simclr_1x_is_told_from_a_pytorch_resnet50_by_the_converters_fingerprint(tmp_path):
    model = random_resnet("resnet50", seed=4)  # num_batches_tracked 7: trained in PyTorch
    path = save_simclr_converter(model, tmp_path / "resnet50-1x.pth")
    info, tensors = inspect_checkpoint(path)
    assert (info.format, info.arch, info.input_normalised) == ("simclr-converter", "resnet50", False)
    assert tensors is not None
    trained = {"state_dict": model.state_dict()}
    assert not simclr_converter_layout(trained)
    fresh = {"state_dict": torchvision.models.resnet50().state_dict()}  # default statistics
    assert not simclr_converter_layout(fresh)
    zeroed = torch.load(path, weights_only=True)
    assert simclr_converter_layout(zeroed)
    assert not simclr_converter_layout({**zeroed, "epoch": 3})  # another wrapper
    prefixed = {"state_dict": {f"module.{k}": v for k, v in zeroed["state_dict"].items()}}
    assert not simclr_converter_layout(prefixed)
    no_fc = {"state_dict": {k: v for k, v in zeroed["state_dict"].items() if not k.startswith("fc.")}}
    assert not simclr_converter_layout(no_fc)


def test_a_plain_export_of_an_unnormalised_network_is_refused(files, tmp_path, capsys):
    assert cli("convert", str(files["simclr"]), "--to", "torchvision", "--out", str(tmp_path / "x.pth")) == 2
    assert "cannot say so" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.pth").exists()
    with pytest.raises(BadInput, match="without ImageNet mean/std"):
        export_backbone(random_resnet(), "detectron2", tmp_path / "y.pkl", input_normalised=False)


def test_detectron2_backend_refuses_wide_and_unnormalised_backbones(simclr, files):
    with pytest.raises(BadInput, match="standard torchvision-width ResNets .* not resnet50w2"):
        refuse_for_detectron2(simclr)
    one_x = type(simclr)(simclr.model, dataclasses.replace(simclr.inspection, arch="resnet50"))
    with pytest.raises(BadInput, match="takes them in \\[0, 1\\] without mean/std"):
        refuse_for_detectron2(one_x)


def test_knn_runs_on_a_wide_resnet(files, data_root, tmp_path):
    path = run_task(
        RunRequest(
            task="knn",
            checkpoint=files["swav"],
            data_root=data_root,
            set_options=["resize=72", "crop=64", "ks=[1,3]"],
            results=tmp_path / "r",
            cache=tmp_path / "c",
        )
    )
    record = json.loads(Path(path).read_text())
    assert record["model"]["checkpoint"]["arch"] == "resnet50w2"
    assert set(record["metrics"]["top1"]) == {"1", "3"}


# --- unnormalised input in the training families -----------------------------------------------


def test_training_inputs_are_unit_range_pixels_without_mean_std():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    lighting = torch.tensor([[0.01, -0.02, 0.03], [0.0, 0.0, 0.0]])
    batch = TrainBatch(images, torch.tensor([0, 1]), lighting)
    got = training_input(batch, torch.device("cpu"), imagenet_norm=False)
    torch.testing.assert_close(got, images.float() / 255 + lighting.view(2, 3, 1, 1), rtol=0, atol=1e-7)
    normalised = training_input(batch, torch.device("cpu"))  # as before: mean/std, lighting / std
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, normalize_batch(images) + lighting.view(2, 3, 1, 1) / std)
    valid = torch.tensor([[4, 6], [8, 8]])
    crops = normalize_crops(images, valid, imagenet_norm=False)
    assert torch.equal(crops[0, :, :4, :6], images[0, :, :4, :6].float() / 255)
    assert (crops[0, :, 4:] == 0).all() and (crops[0, :, :, 6:] == 0).all()
    detector = build_detector(random_resnet(), "c4", 3, (64,), 96, 64, imagenet_norm=False)
    assert (detector.transform.image_mean, detector.transform.image_std) == ([0.0] * 3, [1.0] * 3)
    detector = build_detector(random_resnet(), "c4", 3, (64,), 96, 64)
    assert detector.transform.image_mean == [0.485, 0.456, 0.406]


FAMILY_RUNS = {
    "linear-imagenet": [
        "resize=48",
        "crop=40",
        "train_resize=48",
        "batch_size=4",
        "parts=[features]",  # rrc + colour jitter + PCA lighting
        "features_epochs=1",
        "features_milestones=[]",
    ],
    "semisup-imagenet-1pct": [
        "resize=48",
        "crop=40",
        "batch_size=4",
        "epochs=1",
        "milestones=[]",
        "split=drawn",
        "fraction=0.5",
        "lrs=[0.01]",
        "head_mults=[1]",
    ],
    "seg-voc12aug": ["iterations=1", "window=1", "batch_size=2", "crop=80", "scale=48,24", "test_images=1"],
    "det-coco-c4": [
        "iterations=1",
        "window=1",
        "milestones=[]",
        "warmup=1",
        "batch_size=2",
        "test_images=1",
        "precise_bn=0",
        "min_sizes=[64]",
        "max_size=96",
        "test_size=64",
    ],
}


@pytest.mark.parametrize("task", sorted(FAMILY_RUNS))
def test_every_training_family_feeds_unnormalised_pixels(task, random_checkpoint, data_root, tmp_path):
    """The network of a SimCLR-like checkpoint sees [0, 1] pixels in training and testing (a
    ResNet-18 marked so, for speed); marked normalised, the same run feeds it ImageNet-normalised ones."""
    ranges: dict[bool, list[tuple[float, float]]] = {}
    for normalised in (False, True):
        loaded = load_backbone(random_checkpoint)
        loaded.inspection.input_normalised = normalised
        seen = ranges.setdefault(normalised, [])
        loaded.model.conv1.register_forward_pre_hook(
            lambda module, args, seen=seen: seen.append((float(args[0].min()), float(args[0].max())))
        )
        request = RunRequest(
            task=task,
            checkpoint=random_checkpoint,
            data_root=data_root if task.startswith(("linear", "semisup")) else None,  # else embedded
            set_options=FAMILY_RUNS[task],
            results=tmp_path / f"r{normalised}",
            cache=tmp_path / f"c{normalised}",
        )
        run_task(request, backbone=loaded)
    assert ranges[False] and ranges[True]
    low, high = min(r[0] for r in ranges[False]), max(r[1] for r in ranges[False])
    assert -0.3 <= low and high <= 1.3, (low, high)  # PCA lighting may step a little outside [0, 1]
    assert min(r[0] for r in ranges[True]) < -1.0  # dark pixels, normalised


def test_released_width_multiples_are_supported():
    assert WIDE_ARCHS == ("resnet50w2", "resnet50w4", "resnet50w5")

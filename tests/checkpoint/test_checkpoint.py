"""Checkpoint loading: every format of USERS.md to identical tensors, and every refusal."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from npidbench.backbones.resnet import wide_resnet50_width
from npidbench.checkpoint import inspect_checkpoint, load_backbone
from npidbench.checkpoint.arch import SUPPORTED_ARCHS, infer_arch
from npidbench.checkpoint.own import export_backbone
from npidbench.errors import BadInput

from checkpoint_zoo import FORMATS, backbone_state, build, random_resnet, wide_resnet50


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_resnet("resnet18", seed=0)


@pytest.fixture(scope="module")
def other() -> torch.nn.Module:
    return random_resnet("resnet18", seed=99)


def assert_same_backbone(tensors: dict[str, torch.Tensor], model: torch.nn.Module, skip_nbt: bool = False):
    reference = backbone_state(model)
    assert set(tensors) == set(reference)
    for key, value in reference.items():
        if skip_nbt and key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(tensors[key], value), key


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_identical_backbone(fmt, model, other, tmp_path):
    path = build(fmt, model, tmp_path, other)
    expected_format, expected_branch = FORMATS[fmt]
    info, tensors = inspect_checkpoint(path)
    assert info.error is None, info.error
    assert info.format == expected_format
    assert info.branch == expected_branch
    assert info.arch == "resnet18" and not info.cifar_stem
    assert not info.missing
    assert not any(k.startswith(("fc.", "conv1.0")) for k in info.loaded)
    assert_same_backbone(tensors, model, skip_nbt=fmt == "lemniscate")
    loaded = load_backbone(path)
    assert_same_backbone(loaded.model.state_dict(), model, skip_nbt=fmt == "lemniscate")


def test_lemniscate_legacy_file_pickling_an_unimportable_module(model, tmp_path):
    path = build("lemniscate", model, tmp_path)
    assert not path.read_bytes().startswith(b"PK"), "must be torch's legacy non-zip serialization"
    info, _ = inspect_checkpoint(path)
    assert info.container == "torch-legacy"
    assert info.skipped_objects == ["lib.NCEAverage.NCEAverage"]
    assert any(k.startswith("lemniscate.") for k in info.ignored)  # the memory bank, not loaded
    assert len(info.defaulted) == 20  # num_batches_tracked predates the file
    assert "state_dict.module.fc.weight" in info.ignored


def test_detectron2_pickle_of_numpy_arrays(model, tmp_path):
    path = build("detectron2", model, tmp_path)
    info, tensors = inspect_checkpoint(path)
    assert info.container == "pickle" and info.format == "detectron2"
    assert_same_backbone(tensors, model)
    assert "model.stem.fc.weight" in info.ignored


@pytest.mark.parametrize(
    ("fmt", "branch"),
    [
        ("moco-v2", "encoder_k"),
        ("moco-v3", "momentum_encoder"),
        ("dino", "student"),
        ("timm", "main"),
        ("solo-learn", "momentum_backbone"),
    ],
)
def test_branch_option_selects_the_other_network(fmt, branch, model, other, tmp_path):
    path = build(fmt, model, tmp_path, other)
    info, tensors = inspect_checkpoint(path, branch=branch)
    assert info.branch == branch
    assert_same_backbone(tensors, other)


def test_unknown_branch_names_the_choices(model, other, tmp_path):
    path = build("dino", model, tmp_path, other)
    with pytest.raises(BadInput, match=r"--branch nope is not in this dino checkpoint.*student.*teacher"):
        inspect_checkpoint(path, branch="nope")


def test_two_unnamed_backbones_are_ambiguous(model, other, tmp_path):
    path = tmp_path / "two.pth"
    torch.save({"net_a": model.state_dict(), "net_b": other.state_dict()}, path)
    with pytest.raises(BadInput, match="several backbones.*--branch"):
        inspect_checkpoint(path)


def test_truncated_file_is_refused(model, tmp_path):
    path = build("torchvision", model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="truncated or corrupt"):
        inspect_checkpoint(path)


def test_truncated_legacy_file_is_refused(model, tmp_path):
    path = build("lemniscate", model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BadInput, match="truncated or corrupt"):
        inspect_checkpoint(path)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(BadInput, match="text file"):
        inspect_checkpoint(path)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        inspect_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        inspect_checkpoint(tmp_path / "empty.pth")


def test_quarter_of_keys_renamed_is_refused_with_missing_keys(model, tmp_path):
    state = backbone_state(model)
    gone = set(sorted(state)[::4])  # a quarter of the keys
    renamed = {(f"renamed_{k}" if k in gone else k): v for k, v in state.items()}
    path = tmp_path / "renamed.pth"
    torch.save({"state_dict": renamed}, path)
    info, tensors = inspect_checkpoint(path)
    assert tensors is None
    counters = {k for k in gone if k.endswith("num_batches_tracked")}  # optional, defaulted
    assert set(info.missing) == gone - counters and set(info.defaulted) == counters
    assert "does not fill the resnet18 backbone" in info.error
    assert "missing (first:" in info.error
    with pytest.raises(BadInput, match="backbone keys missing"):
        load_backbone(path)


def test_arch_mismatch_is_refused(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(random_resnet("resnet50", seed=3).state_dict(), path)
    info, _ = inspect_checkpoint(path)
    assert info.arch == "resnet50"
    with pytest.raises(BadInput, match=r"holds a resnet50, but --arch resnet18 was asked"):
        load_backbone(path, arch="resnet18")
    assert load_backbone(path, arch="resnet50").arch == "resnet50"


class _CallsPrint:
    def __reduce__(self):
        return (print, ("PWNED-BY-PICKLE",))


class _CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_print_is_inert_and_the_tensors_load(model, tmp_path, capfd):
    path = tmp_path / "prints.pth"
    torch.save({"state_dict": model.state_dict(), "a": _CallsPrint()}, path)
    info, tensors = inspect_checkpoint(path)
    out = capfd.readouterr()
    assert "PWNED-BY-PICKLE" not in out.out + out.err
    assert info.skipped_objects == ["builtins.print"]
    assert_same_backbone(tensors, model)


def test_pickled_os_system_never_runs_and_is_refused(model, tmp_path, capfd):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": model.state_dict(), "a": _CallsPrint(), "b": _CallsSystem(marker)}, path)
    with pytest.raises(BadInput, match=r"cannot be read without running code.*posix\.system.*--trust-pickle"):
        inspect_checkpoint(path)
    out = capfd.readouterr()
    assert "PWNED-BY-PICKLE" not in out.out + out.err
    assert not marker.exists()


def test_legacy_file_calling_functions_never_runs_them(model, tmp_path, capfd):
    marker = tmp_path / "executed"
    path = tmp_path / "evil_legacy.pth"
    torch.save(
        {"state_dict": model.state_dict(), "a": _CallsPrint(), "b": _CallsSystem(marker)},
        path,
        _use_new_zipfile_serialization=False,
    )
    info, tensors = inspect_checkpoint(path)  # the restricted legacy reader: placeholders, no calls
    out = capfd.readouterr()
    assert "PWNED-BY-PICKLE" not in out.out + out.err and not marker.exists()
    assert set(info.skipped_objects) == {"builtins.print", "posix.system"}
    assert_same_backbone(tensors, model)


def test_plain_pickle_calling_a_function_never_runs_it(tmp_path, capfd):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _CallsSystem(marker), "p": _CallsPrint()}, protocol=2))
    with pytest.raises(BadInput, match="no ResNet backbone"):
        load_backbone(path)
    out = capfd.readouterr()
    assert "PWNED" not in out.out + out.err and not marker.exists()


class Weird(torch.Tensor):
    """A tensor subclass (DTensor, quantised tensors...): its data cannot be trusted as plain."""


def test_unreadable_without_code_names_type_and_trust_flag(model, tmp_path):
    weird = torch.zeros(2).as_subclass(Weird)
    path = tmp_path / "weird.pth"
    torch.save({"state_dict": model.state_dict(), "w": weird}, path)
    with pytest.raises(BadInput, match=r"cannot be read without running code.*Weird.*--trust-pickle"):
        inspect_checkpoint(path)
    info, tensors = inspect_checkpoint(path, trust_pickle=True)  # the explicit opt-in
    assert info.error is None and tensors is not None


def test_vit_and_width_multiplied_and_deep_stem_are_named(tmp_path):
    vit = {
        "cls_token": torch.zeros(1, 1, 8),
        "pos_embed": torch.zeros(1, 5, 8),
        "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
        "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
    }
    torch.save(vit, tmp_path / "vit.pth")
    info, _ = inspect_checkpoint(tmp_path / "vit.pth")
    assert "Vision Transformer" in info.error

    wide = {
        k: torch.zeros(v.shape[0] * 2 if k.startswith(("conv1", "bn1")) else v.shape[0], *v.shape[1:])
        if v.ndim
        else v
        for k, v in random_resnet("resnet18").state_dict().items()
    }
    torch.save(wide, tmp_path / "x2.pth")
    info, _ = inspect_checkpoint(tmp_path / "x2.pth")
    assert "width-multiplied ResNet-18 x2" in info.error

    stem = {
        ("conv1.0.weight" if k == "conv1.weight" else k): v for k, v in random_resnet().state_dict().items()
    }
    torch.save(stem, tmp_path / "deep.pth")
    info, _ = inspect_checkpoint(tmp_path / "deep.pth")
    assert "deep stem" in info.error


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_infer_arch_from_shapes(arch):
    with torch.device("meta"):
        width = wide_resnet50_width(arch)
        state = (
            wide_resnet50(width, randomise=False) if width else torchvision.models.get_model(arch)
        ).state_dict()
    spec = infer_arch(state)
    assert (spec.name, spec.cifar_stem) == (arch, False)


def test_cifar_stem_is_detected_and_loaded(tmp_path):
    model = random_resnet("resnet18", seed=5, cifar=True)
    path = tmp_path / "solo_cifar.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone_state(model).items()}}, path)
    loaded = load_backbone(path)
    assert loaded.inspection.cifar_stem
    assert_same_backbone(loaded.model.state_dict(), model)
    assert isinstance(loaded.model.maxpool, torch.nn.Identity)
    with pytest.raises(BadInput, match="CIFAR stem"):
        load_backbone(path, arch="resnet18")
    assert load_backbone(path, arch="resnet18-cifar").inspection.cifar_stem


def test_convert_torchvision_and_detectron2_round_trip(model, tmp_path):
    source = build("moco-v2", model, tmp_path)
    loaded = load_backbone(source)
    tv_path = export_backbone(loaded.model, "torchvision", tmp_path / "tv.pth")
    state = torch.load(tv_path, weights_only=True)
    fresh = torchvision.models.resnet18()
    result = fresh.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    assert_same_backbone(state, model)

    d2_path = export_backbone(loaded.model, "detectron2", tmp_path / "d2.pkl")
    with open(d2_path, "rb") as f:
        payload = pickle.load(f)
    assert "stem.conv1.weight" in payload["model"] and "res5.1.conv2.norm.running_var" in payload["model"]
    assert "res3.0.shortcut.norm.weight" in payload["model"]
    info, tensors = inspect_checkpoint(d2_path)
    assert info.format == "detectron2"
    assert_same_backbone(tensors, model)


def test_safetensors_truncated_is_refused(model, tmp_path):
    path = build("safetensors", model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(BadInput, match="truncated"):
        inspect_checkpoint(path)


def test_half_precision_checkpoint_loads_as_float(model, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, path)
    loaded = load_backbone(path)
    assert loaded.model.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.model.conv1.weight, model.conv1.weight, atol=1e-2, rtol=1e-2)


def test_bytes_io_is_not_needed_for_weights_only_path(model):
    # Guard: the weights-only loader is tried first for plain torch files (no placeholders).
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_native_detectron2_with_caffe_bgr_input_is_refused(model, tmp_path):
    from npidbench.checkpoint.formats import to_detectron2_name

    state = {f"backbone.bottom_up.{to_detectron2_name(k)}": v for k, v in backbone_state(model).items()}
    torch.save(
        {"model": {**state, "pixel_mean": torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)}},
        tmp_path / "model_final.pth",
    )
    info, tensors = inspect_checkpoint(tmp_path / "model_final.pth")
    assert tensors is None and "native detectron2 model" in info.error
    torch.save(
        {"model": {**state, "pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)}},
        tmp_path / "moco_det.pth",
    )
    info, tensors = inspect_checkpoint(tmp_path / "moco_det.pth")
    assert info.error is None and info.format == "detectron2"
    assert_same_backbone(tensors, model)


@pytest.mark.parametrize(
    "header",
    [
        b'{"w": 3}',
        b'{"w": {"dtype": "F32"}}',
        b'{"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
        b"[1, 2]",
    ],
)
def test_malformed_safetensors_is_refused(header, tmp_path):
    import struct

    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(BadInput, match="safetensors"):
        inspect_checkpoint(path)

"""NPID with a ViT or ConvNeXt backbone: `pretrain --set arch=vit_tiny_patch16` on the embedded
data, a checkpoint that records its family and spec and loads back exactly, exact resume,
2 processes = 1, and the one-line refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain import TINY

from npidbench.checkpoint import inspect_checkpoint, load_backbone
from npidbench.errors import RunFailed
from npidbench.pretrain import train as train_module
from npidbench.pretrain.archs import CONVNEXT_ARCHS, PRETRAIN_ARCHS, VIT_ARCHS, fit_to_patches
from npidbench.pretrain.recipe import Recipe
from npidbench.pretrain.train import pretrain

from helpers import cli, one_error_line, tiny_imagefolder

pytest.importorskip("timm")

# One short epoch of the default recipe on the embedded data: 2 images per class (20), 2 steps.
SHORT = ["epochs=1", "pool_per_class=2", "batch_size=10", "lr_batch=10", "negatives=8", "workers=0"]


def _sets(*options: str) -> list[str]:
    return [part for option in options for part in ("--set", option)]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit") / "run"
    assert cli("pretrain", *_sets("arch=vit_tiny_patch16", *SHORT, "knn_every=1"), "--out", str(out)) == 0
    return out


def test_vit_pretrains_on_the_embedded_data_and_loads_back_exactly(vit_run, capsys):
    path = vit_run / "last.pth"
    saved = torch.load(path, weights_only=True)  # plain types only
    assert saved["format"] == "npidbench" and saved["arch"] == "vit_tiny_patch16" and saved["family"] == "vit"
    # the recipe's name says its network was overridden (records and the report show it)
    assert saved["meta"]["recipe"] == "npid_resnet18_synthetic+arch=vit_tiny_patch16"
    # what the tensors cannot tell is recorded; the 56 px recipe trains on 64 px crops (4 x 4 patches)
    assert saved["vit"]["num_heads"] == 3 and saved["vit"]["pos_interpolation"] == "timm"
    assert saved["vit"]["img_size"] == 64 and saved["state_dict"]["pos_embed"].shape == (1, 17, 192)
    assert set(saved["head"]) == {"head.weight", "head.bias"} and saved["head"]["head.weight"].shape == (
        128,
        192,
    )
    monitor = [json.loads(line) for line in (vit_run / "monitor.jsonl").read_text().splitlines()]
    assert len(monitor) == 1 and 0 <= monitor[0]["knn_top1"] <= 100

    assert cli("inspect", str(path), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "npidbench" and info["family"] == "vit" and not info["missing"]
    assert (
        info["arch"] == "vit_tiny_patch16_64"
        and info["vit"]["heads_from"] == "recorded in the npidbench checkpoint"
    )
    assert info["ignored"] == ["head.head.weight", "head.head.bias"]  # NPID's projection: not the backbone

    loaded = load_backbone(path)
    assert loaded.inspection.family == "vit" and loaded.backbone.default_layer == "CLS"
    trained = torch.load(vit_run / "resume.pth", weights_only=True)["model"]
    state = loaded.model.state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert set(state) == set(backbone)
    for key, value in backbone.items():
        assert torch.equal(state[key], value), key
    assert loaded.model.blocks[0].attn.num_heads == 3
    # NPID's embedding is the evaluators' default feature (CLS after the final norm) projected
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        cls = loaded.backbone.forward_layers(images, ["CLS"])["CLS"]
        torch.testing.assert_close(cls, loaded.model(images))


def test_vit_epochs_0_is_the_same_network_untrained(vit_run, tmp_path):
    out = tmp_path / "init"
    assert cli("pretrain", *_sets("arch=vit_tiny_patch16", "epochs=0"), "--out", str(out)) == 0
    initial, trained = load_backbone(out / "last.pth"), load_backbone(vit_run / "last.pth")
    assert initial.inspection.vit == trained.inspection.vit
    before, after = initial.model.state_dict(), trained.model.state_dict()
    assert set(before) == set(after) and not torch.equal(
        before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"]
    )


def test_the_recorded_vit_spec_is_used_and_checked_against_the_tensors(vit_run, tmp_path):
    saved = torch.load(vit_run / "last.pth", weights_only=True)
    six_heads = tmp_path / "six.pth"
    torch.save({**saved, "vit": {**saved["vit"], "num_heads": 6}}, six_heads)  # not in the shapes
    assert load_backbone(six_heads).model.blocks[0].attn.num_heads == 6
    wrong_patch = tmp_path / "patch.pth"
    torch.save({**saved, "vit": {**saved["vit"], "patch_size": 8}}, wrong_patch)
    info, tensors = inspect_checkpoint(wrong_patch)
    assert tensors is None and "records a ViT whose tensors differ: patch_size 8 (tensors: 16)" in info.error
    no_family = tmp_path / "no_family.pth"  # a version-1 file without family is a ResNet
    torch.save({k: v for k, v in saved.items() if k not in ("family", "vit")}, no_family)
    info, tensors = inspect_checkpoint(no_family)
    assert (
        tensors is None
        and "records no family (a ResNet) but its tensors are a Vision Transformer" in info.error
    )
    no_spec = tmp_path / "no_spec.pth"
    torch.save({k: v for k, v in saved.items() if k != "vit"}, no_spec)
    assert "records family vit without its spec" in inspect_checkpoint(no_spec)[0].error
    unknown = tmp_path / "unknown.pth"
    torch.save({**saved, "family": "swin"}, unknown)
    assert "records family 'swin', not one of resnet, vit, convnext" in inspect_checkpoint(unknown)[0].error


def test_convnext_pretrains_and_loads_back_exactly(tmp_path, capsys):
    out = tmp_path / "run"
    # one step of 10 images (a ConvNeXt-T is ~11 img/s on 2 cores)
    options = [*SHORT, "pool_per_class=1", "knn_every=0"]
    assert cli("pretrain", *_sets("arch=convnext_tiny", *options), "--out", str(out)) == 0
    capsys.readouterr()  # the checkpoint's path
    saved = torch.load(out / "last.pth", weights_only=True)
    assert saved["family"] == "convnext" and saved["convnext"] == {
        "depths": [3, 3, 9, 3],
        "dims": [96, 192, 384, 768],
        "layer_scale": True,
    }
    assert cli("inspect", str(out / "last.pth"), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "npidbench" and info["family"] == "convnext" and info["arch"] == "convnext_tiny"
    loaded = load_backbone(out / "last.pth")
    trained = torch.load(out / "resume.pth", weights_only=True)["model"]
    state = loaded.model.state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert set(state) == set(backbone) and all(torch.equal(state[k], v) for k, v in backbone.items())
    wrong = tmp_path / "wrong.pth"
    torch.save({**saved, "convnext": {**saved["convnext"], "dims": [128, 256, 512, 1024]}}, wrong)
    assert (
        "records a convnext_d3-3-9-3_w128 (depths [3, 3, 9, 3], dims [128, 256, 512, 1024]) but its "
        "tensors are a convnext_tiny (depths [3, 3, 9, 3], dims [96, 192, 384, 768])"
    ) in inspect_checkpoint(wrong)[0].error


def test_bad_arch_is_one_line_naming_every_choice(capsys):
    assert cli("pretrain", "--set", "arch=bogus") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"arch bogus is not supported; choose one of {', '.join(PRETRAIN_ARCHS)}" in line
    assert {"resnet18", "vit_tiny_patch16", "vit_base_patch14", "convnext_small"} <= set(PRETRAIN_ARCHS)
    assert len(VIT_ARCHS) == 9 and CONVNEXT_ARCHS == ("convnext_tiny", "convnext_small", "convnext_base")
    assert fit_to_patches("vit_small_patch16", 56) == 64 and fit_to_patches("vit_small_patch14", 56) == 56
    assert fit_to_patches("resnet18", 56) == 56


# On disk, tiny (3 classes x 8 images, 32 px crops = 2 x 2 patches): 3 steps of 8 per epoch.
TINY_VIT = replace(TINY, name="tiny-vit", arch="vit_tiny_patch16", knn_every=0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vit-data")
    tiny_imagefolder(root / "imagenet", classes=3, per_class=8, split="train")
    return root


def test_interrupted_and_resumed_vit_run_is_bit_identical(data_root, tmp_path, monkeypatch):
    pretrain(TINY_VIT, tmp_path / "straight", data_root)
    original = train_module._Trainer.step
    calls = {"n": 0}

    def ctrl_c_on_step_4(self, images, indices):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops after this step
        return original(self, images, indices)

    monkeypatch.setattr(train_module._Trainer, "step", ctrl_c_on_step_4)
    with pytest.raises(RunFailed, match="interrupted at epoch 2 step 1"):
        pretrain(TINY_VIT, tmp_path / "resumed", data_root)
    monkeypatch.setattr(train_module._Trainer, "step", original)
    pretrain(TINY_VIT, tmp_path / "resumed", data_root, resume=True)
    a = torch.load(tmp_path / "straight" / "resume.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "resume.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6 and "backbone.cls_token" in a["model"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["bank"], b["bank"])
    assert load_backbone(tmp_path / "resumed" / "last.pth").inspection.vit["img_size"] == 32


def _rank_main(rank: int, world: int, port: int, recipe: Recipe, out: str, data_root: str) -> None:
    os.environ.update(
        {
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    pretrain(recipe, Path(out), Path(data_root), dtype=torch.float64)


def test_two_vit_processes_equal_one_with_twice_the_batch(data_root, tmp_path):
    """No BatchNorm in a ViT: 2 gloo ranks of 4 are one process of 8, in float64 to ~1e-15."""
    recipe = replace(TINY_VIT, epochs=1)
    pretrain(recipe, tmp_path / "single", data_root, dtype=torch.float64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _rank_main, args=(2, port, recipe, str(tmp_path / "double"), str(data_root)), nprocs=2, join=True
    )
    a = torch.load(tmp_path / "single" / "resume.pth", weights_only=True)
    b = torch.load(tmp_path / "double" / "resume.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 and b["world_size"] == 2
    torch.testing.assert_close(a["bank"], b["bank"], rtol=1e-9, atol=1e-12)
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-9, atol=1e-12, msg=key)

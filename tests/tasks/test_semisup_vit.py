"""semisup's mae-finetune method (MAE's ViT recipe): the global-pool classifier, the layer-wise lr
decay groups as MAE's util/lr_decay.py forms them, and a seeded run that resumes exactly."""

from __future__ import annotations

import pytest
import torch

from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.backbones.vit import ViTSpec, build_vit
from npidbench.errors import RunFailed
from npidbench.tasks.semisup import Config
from npidbench.tasks.semisup_vit import classifier, param_groups

from helpers import cli, interrupt_after_first_window, one_error_line, run_preset

pytest.importorskip("timm")

TINY = ViTSpec(depth=2, embed_dim=192, num_heads=3, patch_size=8, img_size=56)


def test_the_classifier_is_maes_global_pool_head_with_rising_drop_path():
    torch.manual_seed(0)
    vit = build_vit(ViTSpec(depth=4, embed_dim=192, num_heads=3, patch_size=8, img_size=56))
    model = classifier(vit, classes=5, drop_path=0.3).eval()
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm.eps == 1e-6
    assert model.head.weight.std() < 1e-4 and not model.head.bias.any()
    rates = [0.0] + [block.drop_path1.drop_prob for block in model.blocks[1:]]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(images))))
        expected = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))  # CLS excluded, no final norm
        torch.testing.assert_close(model(images), expected)
    assert vit.norm.weight.shape == (192,)  # the loaded network itself is untouched


def test_layer_decay_groups_follow_maes_layer_ids():
    model = classifier(build_vit(TINY), classes=5, drop_path=0.1)
    config = Config(method="mae-finetune", ft_layer_decay=0.5, ft_weight_decay=0.05)
    scale, decay = {}, {}
    for group in param_groups(model, config):
        for param in group["params"]:
            scale[id(param)], decay[id(param)] = group["lr_scale"], group["weight_decay"]
    named = dict(model.named_parameters())
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5^1, fc_norm and head 1
    assert scale[id(named["patch_embed.proj.weight"])] == scale[id(named["pos_embed"])] == 0.125
    assert (
        scale[id(named["blocks.0.attn.qkv.weight"])] == 0.25
        and scale[id(named["blocks.1.mlp.fc2.weight"])] == 0.5
    )
    assert scale[id(named["head.weight"])] == scale[id(named["fc_norm.weight"])] == 1.0
    assert decay[id(named["blocks.0.attn.qkv.weight"])] == 0.05 and decay[id(named["head.weight"])] == 0.05
    for name in ("cls_token", "pos_embed", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "head.bias"):
        assert decay[id(named[name])] == 0.0, name
    assert sum(len(g["params"]) for g in param_groups(model, config)) == len(named)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "mae_vit.pth"
    torch.save({"model": build_vit(TINY).state_dict()}, path)  # MAE's released layout
    return path


def test_an_interrupted_fine_tuning_resumes_to_the_same_numbers(vit_file, tmp_path, monkeypatch):
    """RandAugment, mixup / cutmix and random erasing draw from seeded generators: the resumed
    run is the uninterrupted one."""
    options = ["ft_epochs=2", "ft_warmup_epochs=0.5", "fraction=0.05"]
    straight = run_preset("semisup-imagenet-10pct-mae-finetune", vit_file, tmp_path / "a", options)
    assert straight["protocol"] == "semisup-mae-finetune"
    assert straight["metrics"]["finetuned_config"] == "in1k-5pct-drawn_mae-finetune-blr0.0005-ld0.65"
    saves = interrupt_after_first_window(monkeypatch)
    with pytest.raises(RunFailed, match="interrupted after 1 of 2"):
        run_preset("semisup-imagenet-10pct-mae-finetune", vit_file, tmp_path / "b", options)
    resumed = run_preset("semisup-imagenet-10pct-mae-finetune", vit_file, tmp_path / "b", options)
    assert saves == [1, 2]
    assert resumed["metrics"] == straight["metrics"]
    assert [h["loss"] for h in resumed["details"]["history"]] == [
        h["loss"] for h in straight["details"]["history"]
    ]


def test_mae_finetune_on_a_convnext_is_one_line(tmp_path, results_dir, capsys):
    path = tmp_path / "convnext.pth"
    torch.save({"model": build_convnext(ConvNeXtSpec((1, 1, 2, 1), (16, 32, 48, 64))).state_dict()}, path)
    assert cli("run", "semisup-imagenet-1pct-mae-finetune", str(path)) == 2
    assert "method=mae-finetune is MAE's ViT recipe" in one_error_line(capsys.readouterr().err)

"""The frozen-linear probes (DINO, MAE, DINOv2's sweep): their inputs as the anchors build them,
MAE's LARS update, the cosine schedules, and each protocol end to end on the embedded data."""

from __future__ import annotations

import math

import pytest
import torch

from npidbench.backbones import backbone_for
from npidbench.backbones.resnet import build_resnet
from npidbench.backbones.vit import ViTSpec, build_vit
from npidbench.errors import BadInput
from npidbench.tasks.frozen_linear import (
    SWEEP_LRS,
    Config,
    HeadPlan,
    _optimizer,
    build_probe_heads,
    head_plans,
)
from npidbench.training.loop import CosineSchedule

from helpers import run_preset

pytest.importorskip("timm")


def _vit(embed_dim: int, heads: int, depth: int = 4):
    torch.manual_seed(0)
    spec = ViTSpec(depth=depth, embed_dim=embed_dim, num_heads=heads, patch_size=16, img_size=32)
    return backbone_for(build_vit(spec).eval(), spec.name, "vit")


def test_dino_interleaves_the_mean_patch_token_as_its_reshape_does():
    cls, mean = torch.randn(3, 5), torch.randn(3, 5)
    features = {"Block12": cls, "AvgPatch": mean}
    # eval_linear.py: cat((output.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(N, -1)
    dino = torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(3, -1)
    assert torch.equal(HeadPlan("x", ("Block12", "AvgPatch"), 1.0, interleave=True).input(features), dino)
    # DINOv2 / iBOT concatenate: [cls..., mean...]
    assert torch.equal(HeadPlan("x", ("Block12", "AvgPatch"), 1.0).input(features), torch.cat([cls, mean], 1))


def test_dino_protocol_picks_its_input_by_size_as_the_script_says():
    (small,) = head_plans(_vit(384, 6), Config(protocol="dino"))  # ViT-S: last 4 class tokens
    assert small.layers == ("Block1", "Block2", "Block3", "Block4") and not small.interleave
    (base,) = head_plans(_vit(768, 12, depth=2), Config(protocol="dino"))  # ViT-B: 1 + avgpool
    assert base.layers == ("Block2", "AvgPatch") and base.interleave and base.name == "CLS + mean patch"
    with pytest.raises(BadInput, match="use last_blocks=1 with avgpool"):
        head_plans(_vit(384, 6), Config(protocol="dino", avgpool="yes"))
    (resnet,) = head_plans(backbone_for(build_resnet("resnet18"), "resnet18"), Config(protocol="dino"))
    assert resnet.layers == ("AvgPool",)


def test_the_sweep_is_dinov2s_52_heads_on_a_vit_and_its_lrs_on_a_resnet():
    vit = head_plans(_vit(384, 6), Config(protocol="sweep"))
    assert len(vit) == 13 * 2 * 2 == 52 and len({p.name for p in vit}) == 52
    assert {p.layers for p in vit} == {
        ("Block4",),
        ("Block4", "AvgPatch"),
        ("Block1", "Block2", "Block3", "Block4"),
        ("Block1", "Block2", "Block3", "Block4", "AvgPatch"),
    }
    resnet = head_plans(backbone_for(build_resnet("resnet18"), "resnet18"), Config(protocol="sweep"))
    assert [p.lr for p in resnet] == list(SWEEP_LRS) and {p.layers for p in resnet} == {("AvgPool",)}
    with pytest.raises(BadInput, match="no sweep input exists"):
        head_plans(
            backbone_for(build_resnet("resnet18"), "resnet18"),
            Config(protocol="sweep", sweep_last_blocks=(4,)),
        )


def test_every_sweep_head_has_its_own_scaled_lr_and_sees_its_own_input():
    backbone = _vit(384, 6)
    config = Config(protocol="sweep", batch_size=512, lrs=(0.01, 0.1))
    heads = build_probe_heads(backbone, config, classes=7)
    optimizer, base_lrs = _optimizer(heads, config)
    assert base_lrs == [pytest.approx(lr * 2) for lr in (0.01, 0.1) * 4]  # x batch / 256
    assert [g["lr"] for g in optimizer.param_groups] == base_lrs
    features = {name: torch.randn(2, 384) for name in ("Block1", "Block2", "Block3", "Block4", "AvgPatch")}
    out = heads(features)
    for plan, head in zip(heads.plans, heads.heads, strict=True):
        assert torch.equal(out[plan.name], head(plan.input(features)))
        assert head.fc.in_features == 384 * len(plan.layers)


def test_mae_heads_train_with_maes_lars_update():
    """Two steps of our LARS groups against MAE's util/lars.py update written out: for tensors of
    2+ dims dp = g * trust (0.001 * |w| / |g|), biases plain; mu = momentum * mu + dp; p -= lr mu."""
    torch.manual_seed(0)
    config = Config(protocol="mae", batch_size=256, lr=0.1, warmup_epochs=1)
    heads = build_probe_heads(backbone_for(build_resnet("resnet18"), "resnet18"), config, classes=5)
    optimizer, base_lrs = _optimizer(heads, config)
    assert base_lrs == [0.1, 0.1]
    # with weight decay, timm's Lars would decay and adapt a group's biases: MAE's never are
    decayed, _ = _optimizer(heads, Config(protocol="mae", weight_decay=1e-4, warmup_epochs=1))
    assert [g["weight_decay"] for g in decayed.param_groups] == [1e-4, 0.0]
    head = heads.heads[0]
    assert isinstance(head.norm, torch.nn.BatchNorm1d) and not head.norm.affine and head.norm.eps == 1e-6
    expected = {name: p.detach().clone() for name, p in head.named_parameters()}
    momentum = {name: torch.zeros_like(p) for name, p in expected.items()}
    for _ in range(2):
        x, y = torch.randn(16, 512), torch.randint(0, 5, (16,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        for name, p in head.named_parameters():
            g = p.grad.detach()
            dp = g
            if p.ndim > 1:
                w_norm, g_norm = expected[name].norm(), g.norm()
                dp = g * (0.001 * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0)
            momentum[name] = 0.9 * momentum[name] + dp
            expected[name] = expected[name] - 0.1 * momentum[name]
        optimizer.step()
        for name, p in head.named_parameters():
            assert torch.allclose(p.detach(), expected[name], rtol=1e-6, atol=1e-8), name


def test_cosine_schedules_with_and_without_warm_up():
    dino = CosineSchedule(100)  # CosineAnnealingLR(T_max=100) stepped per epoch
    assert dino.factor(0) == 1.0 and dino.factor(50) == pytest.approx(0.5)
    assert dino.factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    floored = CosineSchedule(10, floor=0.01)  # MAE fine-tuning's min_lr
    assert floored.at(10.0) == pytest.approx(0.01) and floored.at(0.0) == 1.0
    mae = CosineSchedule(90, warmup_epochs=10)  # lr_sched.adjust_learning_rate
    assert mae.at(0.0) == 0.0 and mae.at(5.0) == pytest.approx(0.5) and mae.at(10.0) == 1.0
    assert mae.at(50.0) == pytest.approx(0.5) and mae.at(90.0) == pytest.approx(0.0)


TINY_VIT = ViTSpec(depth=2, embed_dim=192, num_heads=3, patch_size=8, img_size=56)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "dino_vit.pth"
    torch.save(build_vit(TINY_VIT).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("task", "options", "protocol"),
    [
        ("linear-imagenet-dino", ["epochs=2", "last_blocks=2"], "linear-dino"),
        ("linear-imagenet-mae", ["epochs=2", "warmup_epochs=0.5"], "linear-mae"),
    ],
)
def test_one_head_protocols_report_their_best_epoch(vit_file, tmp_path, task, options, protocol):
    record = run_preset(task, vit_file, tmp_path, options)
    assert record["protocol"] == protocol
    history = record["details"]["history"]
    assert [line["epoch"] for line in history if "eval" in line] == [1, 2]  # every epoch judged
    name = record["metrics"]["head"]
    best = max(history, key=lambda line: line["eval"][name]["top1"])
    assert record["metrics"]["best_epoch"] == best["epoch"]
    assert record["metrics"]["top1"] == best["eval"][name]["top1"]
    assert record["details"]["interpolation"]["test"] == "bicubic"


def test_the_sweep_reports_its_best_head_by_name_chosen_on_the_reported_split(vit_file, tmp_path):
    record = run_preset("linear-imagenet-sweep", vit_file, tmp_path, ["epochs=1", "lrs=[0.01, 0.3]"])
    heads = record["metrics"]["heads"]
    assert record["protocol"] == "linear-sweep" and len(heads) == record["details"]["heads"] == 4
    best = max(heads, key=lambda name: heads[name]["top1"])
    assert heads[record["metrics"]["head"]]["top1"] == heads[best]["top1"] == record["metrics"]["top1"]
    assert record["metrics"]["selected_on"] == "val" and "test-selected" in record["details"]["protocol_note"]
    assert (
        len(record["details"]["inputs"]) == 2
    )  # depth 2: n = 4 does not exist, n = 1 with and without avgpool


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["protocol=mae"], "linear-imagenet-dino is the dino protocol: run linear-imagenet-mae"),
        (["warmup_epochs=1"], "DINO's schedule has no warm-up"),
        (["lrs=[0.1, 0.1]"], "lrs lists a value twice"),
    ],
)
def test_settings_that_are_not_the_protocol_are_one_line(vit_file, results_dir, capsys, options, message):
    from helpers import cli, one_error_line

    sets = [part for option in options for part in ("--set", option)]
    assert cli("run", "linear-imagenet-dino", str(vit_file), *sets) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_maes_batchnorm_head_never_sees_a_one_image_batch(vit_file, tmp_path):
    """1,600 images in batches of 533 leave one over: dropped, as MAE's loader drops it."""
    record = run_preset(
        "linear-imagenet-mae", vit_file, tmp_path, ["epochs=1", "warmup_epochs=0", "batch_size=533"]
    )
    (line,) = record["details"]["history"]
    # three steps: the last at 2/3 of the one-epoch cosine (a fourth, partial one would be at 3/4)
    assert line["lr_factor"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 3)))

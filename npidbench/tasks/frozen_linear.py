"""Linear probes of a frozen backbone by the ViT-era protocols (PROTOCOLS-ARCH.md section 2),
for every backbone family. ``protocol`` picks one:

``dino`` (DINO eval_linear.py): one Linear head (weights N(0, 0.01), zero bias) on the class
tokens of the last n blocks, each through the final norm, concatenated; with avgpool the mean
patch token of the last block is interleaved with the class token as DINO's reshape does (which
works for n = 1 only). The script's help: ViT-S n = 4 without avgpool, ViT-B n = 1 with it.
SGD momentum 0.9, wd 0, lr 1e-3 x batch / 256, cosine stepped per epoch, 100 epochs;
RandomResizedCrop 224 + flip; the best epoch on val is reported (DINO prints the max accuracy).

``mae`` (MAE main_linprobe.py): BatchNorm1d without affine + Linear (trunc normal 0.01) on the
CLS token after the final norm; LARS (trust 0.001; biases not adapted), blr 0.1 x batch / 256,
wd 0, 90 epochs, 10 warm-up epochs then a cosine per iteration; bicubic RandomResizedCrop;
the best epoch is reported (MAE prints the max accuracy).

``sweep`` (DINOv2 eval/linear.py): many heads trained together on one frozen forward pass per
batch: every lr (13, 1e-5 .. 0.1 in 1-2-5 steps) x n in {1, 4} x avgpool {no, yes}; SGD
momentum 0.9, wd 0, cosine per iteration; bicubic RandomResizedCrop. The best head on the test
split is reported and named: DINOv2 picks its head on ImageNet val, the split it reports (test
selected; the record says so).

A backbone without tokens (ResNet, ConvNeXt) offers one input, its global feature (n = 1, no
avgpool): DINO's script evaluates a ResNet-50 so, and its sweep runs over the lrs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from npidbench.backbones import Backbone
from npidbench.config import check_choices
from npidbench.distributed import DistInfo, check_global_batch, current_world, prepare_for_training
from npidbench.errors import BadInput
from npidbench.precision import precision_name
from npidbench.solvers.linear import AvgPoolHead, BatchNormLinearHead, topk_correct
from npidbench.tables import TableSpec
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput, run_identity, split_record
from npidbench.tasks.linear import Probe, augmented_source, classification_splits
from npidbench.training.augment import TrainAugment
from npidbench.training.evaluate import topk_accuracy
from npidbench.training.loop import CosineSchedule, ResumeState, StepResult, fit, scaled_lr

Protocol = Literal["dino", "mae", "sweep"]
Choice = Literal["auto", "yes", "no"]
PROTOCOLS = {"dino": "linear-dino", "mae": "linear-mae", "sweep": "linear-sweep"}
# DINOv2's lr grid (eval/linear.py: 1e-5 .. 0.1 in 1-2-5 steps, 13 values).
SWEEP_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@dataclass(frozen=True)
class Config:
    protocol: Protocol = "dino"
    epochs: int = 100
    batch_size: int = 1024  # global; lrs are for 256 and scaled linearly (DINO: 8 x 128)
    lr: float = 1e-3  # dino: the lr for 256; mae: the base lr (blr)
    lrs: tuple[float, ...] = SWEEP_LRS  # sweep: every head's lr for 256
    last_blocks: int = 0  # dino: class tokens of the last n blocks; 0: by size (ViT-S 4, ViT-B 1)
    avgpool: Choice = "auto"  # dino: + the mean patch token; auto: ViT-B yes, others no
    sweep_last_blocks: tuple[int, ...] = (1, 4)
    sweep_avgpool: tuple[bool, ...] = (False, True)
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0  # mae: 10
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # the random crop's resize
    crop: int = 224
    resize: int = 256  # test transform: short side 256, center crop 224, the backbone's resize
    eval_every: int = 1  # dino / mae: evaluated every epoch, the best reported; sweep: at the end
    seed: int = 0
    train_split: str = "train"
    test_split: str = "val"
    amp: bool = True  # bf16 autocast of the frozen forward on CUDA (recorded); false: fp32

    def __post_init__(self) -> None:
        check_choices(self)
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_size and eval_every must be at least 1")
        if self.lr <= 0 or not self.lrs or min(self.lrs) <= 0:
            raise ValueError("lr and every value of lrs must be positive")
        if self.last_blocks < 0 or not self.sweep_last_blocks or min(self.sweep_last_blocks) < 1:
            raise ValueError("last_blocks must be 0 (auto) or more, sweep_last_blocks values at least 1")
        if not self.sweep_avgpool:
            raise ValueError("sweep_avgpool needs at least one of false, true")
        if self.weight_decay < 0 or self.momentum < 0:
            raise ValueError("weight decay and momentum cannot be negative")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if self.protocol == "dino" and self.warmup_epochs:
            raise ValueError("DINO's schedule has no warm-up (a cosine stepped per epoch): warmup_epochs=0")
        for name in ("lrs", "sweep_last_blocks", "sweep_avgpool"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {list(values)}")
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"need 1 <= crop <= resize, got crop {self.crop}, resize {self.resize}")


@dataclass(frozen=True)
class HeadPlan:
    """One head: its name, the layers concatenated into its input, its lr (for batch 256)."""

    name: str
    layers: tuple[str, ...]
    lr: float
    interleave: bool = False  # DINO's avgpool: (cls, mean) interleaved per channel

    def input(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [features[name] for name in self.layers]
        if self.interleave:  # DINO: cat((cls[..., None], mean[..., None]), -1).reshape(N, -1)
            return torch.stack(parts, dim=-1).flatten(1)
        return torch.cat(parts, dim=1)


def input_name(backbone: Backbone, last_blocks: int, avgpool: bool) -> str:
    if backbone.family != "vit":
        return backbone.default_layer
    tokens = "CLS" if last_blocks == 1 else f"CLS of the last {last_blocks} blocks"
    return tokens + (" + mean patch" if avgpool else "")


def dino_input(backbone: Backbone, config: Config) -> tuple[int, bool]:
    """(n, avgpool) of DINO's protocol for ``backbone``: given, or by size as the script's help
    says (ViT-S: 4 blocks, no avgpool; ViT-B: 1 block + avgpool; other sizes: its defaults 4, no)."""
    if backbone.family != "vit":
        return 1, False
    base = int(backbone.model.embed_dim) == 768
    last_blocks = config.last_blocks or (1 if base else 4)
    avgpool = config.avgpool == "yes" or (config.avgpool == "auto" and base)
    if avgpool and last_blocks != 1:
        raise BadInput(
            f"DINO's avgpool input interleaves one class token with the mean patch token "
            f"(eval_linear.py): use last_blocks=1 with avgpool, not {last_blocks}"
        )
    return last_blocks, avgpool


def head_plans(backbone: Backbone, config: Config) -> list[HeadPlan]:
    """The heads ``config.protocol`` trains on ``backbone``."""
    if config.protocol == "mae":
        return [HeadPlan(backbone.default_layer, (backbone.default_layer,), config.lr)]
    if config.protocol == "dino":
        last_blocks, avgpool = dino_input(backbone, config)
        layers = backbone.linear_input(last_blocks, avgpool)
        if layers is None:
            depth = len(backbone.model.blocks)
            raise BadInput(
                f"DINO's input for this width is the last {last_blocks} blocks, but {backbone.arch} has {depth}: "
                f"--set last_blocks=N with N <= {depth}"
            )
        return [HeadPlan(input_name(backbone, last_blocks, avgpool), layers, config.lr, interleave=avgpool)]
    plans = []
    for last_blocks in config.sweep_last_blocks:
        for avgpool in config.sweep_avgpool:
            layers = backbone.linear_input(last_blocks, avgpool)
            if layers is None:
                continue  # a ResNet has no class tokens: its one input is the global feature
            name = input_name(backbone, last_blocks, avgpool)
            plans += [HeadPlan(f"{name}, lr {lr:g}", layers, lr) for lr in config.lrs]
    if len({plan.name for plan in plans}) != len(plans):
        raise BadInput(f"two sweep lrs print alike ({list(config.lrs)}): give lrs that differ at 6 digits")
    if not plans:
        raise BadInput(
            f"no sweep input exists on {backbone.arch}: sweep_last_blocks / sweep_avgpool name none of "
            "its inputs (a ResNet or ConvNeXt has one: sweep_last_blocks=[1], sweep_avgpool=[false])"
        )
    return plans


class ProbeHeads(nn.Module):
    """The heads of one run on one frozen forward pass: {layer: features} -> {head: logits}.
    Each distinct input (e.g. the last 4 class tokens) is concatenated once per batch."""

    def __init__(self, plans: list[HeadPlan], heads: list[nn.Module]) -> None:
        super().__init__()
        self.plans = plans
        self.heads = nn.ModuleList(heads)  # in plan order (names hold dots: not ModuleDict keys)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(plan.name for plan in self.plans)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs: dict[tuple, torch.Tensor] = {}
        out = {}
        for plan, head in zip(self.plans, self.heads, strict=True):
            key = (plan.layers, plan.interleave)
            if key not in inputs:
                inputs[key] = plan.input(features)
            out[plan.name] = head(inputs[key])
        return out


def build_probe_heads(backbone: Backbone, config: Config, classes: int) -> ProbeHeads:
    exposed = backbone.layers()
    plans = head_plans(backbone, config)
    head = BatchNormLinearHead if config.protocol == "mae" else AvgPoolHead  # N(0, 0.01) Linear
    return ProbeHeads(plans, [head(sum(exposed[n].dim for n in p.layers), classes) for p in plans])


def _optimizer(heads: ProbeHeads, config: Config) -> tuple[torch.optim.Optimizer, list[float]]:
    """(optimiser, base lr per parameter group) for the protocol."""
    if config.protocol == "mae":
        from timm.optim import Lars

        lr = scaled_lr(config.lr, config.batch_size)
        weights = [p for p in heads.parameters() if p.ndim > 1]
        biases = [p for p in heads.parameters() if p.ndim <= 1]
        # MAE's LARS (util/lars.py) adapts every tensor of 2+ dims, biases not, and its trust
        # ratio has no epsilon; with wd 0 timm's Lars with these groups is the same update.
        groups = [
            {"params": weights, "always_adapt": True, "eps": 0.0},
            # timm adapts and decays every tensor of a group with weight decay: biases get none
            {"params": biases, "always_adapt": False, "weight_decay": 0.0},
        ]
        optimizer = Lars(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
        return optimizer, [lr, lr]
    lrs = [scaled_lr(plan.lr, config.batch_size) for plan in heads.plans]
    groups = [
        {"params": list(head.parameters()), "lr": lr} for head, lr in zip(heads.heads, lrs, strict=True)
    ]
    # torch's fused kernel: the sweep's 52 heads hold 60M parameters for 1000 classes (ViT-S),
    # and the per-tensor update would cost as much as the heads' matmuls (benchmarks/linear_sweep.py)
    optimizer = torch.optim.SGD(
        groups, lr=lrs[0], momentum=config.momentum, weight_decay=config.weight_decay, fused=True
    )
    return optimizer, lrs


def _drops_last(config: Config) -> bool:
    """MAE's and DINOv2's loaders drop the last partial batch (main_linprobe.py, eval/linear.py);
    DINO's keeps it."""
    return config.protocol != "dino"


def _iterations_per_epoch(images: int, config: Config, world: DistInfo) -> int:
    per_rank = math.ceil(images / world.world_size)  # DistributedSampler pads to equal shares
    local = config.batch_size // world.world_size
    return per_rank // local if _drops_last(config) else math.ceil(per_rank / local)


def run(ctx: RunContext, config: Config) -> TaskOutput:
    dataset = ctx.preset.dataset
    train, test = classification_splits(ctx, config)
    written = ctx.preset.config.get("protocol", config.protocol)
    if config.protocol != written:  # its schedule, batch and crops are the preset's protocol's
        raise BadInput(
            f"{ctx.preset.name} is the {written} protocol: run linear-imagenet-{config.protocol} "
            f"for {config.protocol}'s (a preset of that protocol), not --set protocol={config.protocol}"
        )
    world = current_world(ctx.extract.device)
    check_global_batch(config.batch_size, world)
    # all three resize val bicubic, whatever the backbone (eval_linear.py, main_linprobe.py, DINOv2)
    probe = Probe(ctx, config, train, test, world, interpolation="bicubic")
    torch.manual_seed(config.seed)  # the heads' initial weights
    heads = build_probe_heads(probe.backbone, config, len(train.classes))
    history = _train(probe, heads, run_identity(ctx, config, world.world_size, data=train.fingerprint))
    return TaskOutput(
        metrics=_metrics(config, heads, history),
        dataset=split_record(dataset, train, test),
        protocol=PROTOCOLS[config.protocol],
        seeds=[config.seed],
        details={
            "precision": precision_name(ctx.extract.device, config.amp),
            "history": history,
            "global_batch": config.batch_size,
            "heads": len(heads.plans),
            "inputs": sorted({" + ".join(p.layers) for p in heads.plans}),
            "interpolation": {"train": config.interpolation, "test": "bicubic"},
            "protocol_note": _NOTES[config.protocol],
        },
    )


_NOTES = {
    "dino": "DINO eval_linear.py: last-n class tokens (+ mean patch), SGD, cosine; best epoch on val",
    "mae": "MAE main_linprobe.py: BatchNorm1d (no affine) + Linear on CLS, LARS, warm-up + cosine; best epoch",
    "sweep": "DINOv2 eval/linear.py: one frozen pass for every (lr, n, avgpool) head; the best head "
    "is chosen on the reported split (test-selected, as DINOv2 chooses on ImageNet val)",
}


def _train(probe: Probe, heads: ProbeHeads, identity: dict[str, Any]) -> list[dict[str, Any]]:
    config, world = probe.config, probe.world
    layers = tuple(dict.fromkeys(layer for plan in heads.plans for layer in plan.layers))
    augment = TrainAugment("rrc", config.crop, config.resize, 0.0, 0.0, interpolation=config.interpolation)
    source = augmented_source(probe, layers, augment, drop_last=_drops_last(config))
    heads, trainable = prepare_for_training(heads, world, sync_bn=False, channels_last=False)
    optimizer, base_lrs = _optimizer(heads, config)
    schedule = CosineSchedule(config.epochs, config.warmup_epochs)
    per_epoch = _iterations_per_epoch(len(probe.train), config, world)
    shown = heads.names[0]

    def step(batch) -> StepResult:
        features, labels = source.inputs(batch)
        logits = trainable(features)
        loss = sum(F.cross_entropy(out, labels) for out in logits.values())  # DINOv2 sums the heads'
        return StepResult(loss, len(labels), topk_correct(logits[shown].detach(), labels, (1,))[1])

    def evaluate() -> dict[str, Any]:
        outputs = ((heads(features).values(), labels) for features, labels in source.test())
        return topk_accuracy(heads, outputs, heads.names, world)

    every = config.epochs if config.protocol == "sweep" else config.eval_every
    state = ResumeState(probe.ctx.cache.root, identity, world)
    history = fit(
        label=f"linear {config.protocol}",
        trainable=heads,
        optimizer=optimizer,
        base_lrs=base_lrs,
        schedule=schedule,
        batches=source.batches,
        step=step,
        evaluate=evaluate,
        evaluate_at=lambda epoch: (epoch + 1) % every == 0 or epoch + 1 == config.epochs,
        state=state,
        world=world,
        images_per_epoch=source.size,
        # DINO steps its cosine once an epoch; MAE and DINOv2 every iteration
        iterations_per_epoch=per_epoch,
        lr_at=None if config.protocol == "dino" else (lambda it: schedule.at(it / per_epoch)),
    )
    state.clear()
    return history


def _metrics(config: Config, heads: ProbeHeads, history: list[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [line for line in history if "eval" in line]
    if config.protocol == "sweep":
        final = evaluated[-1]["eval"]
        best = max(heads.names, key=lambda name: final[name]["top1"])  # ties: the first in order
        return {**final[best], "head": best, "selected_on": config.test_split, "heads": final}
    name = heads.names[0]
    chosen = max(evaluated, key=lambda line: line["eval"][name]["top1"])
    return {
        **chosen["eval"][name],
        "head": name,
        "best_epoch": chosen["epoch"],
        "selected_on": config.test_split,
    }


COLUMNS = ("Head", "Top-1 (%)", "Top-5 (%)")


def _table_values(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record["metrics"]
    return {"Head": metrics.get("head"), "Top-1 (%)": metrics.get("top1"), "Top-5 (%)": metrics.get("top5")}


def _reference(model: str, source: str, head: str, top1: float) -> dict[str, Any]:
    return {"Model": model, "Config": source, "Head": head, "Top-1 (%)": top1, "Top-5 (%)": None}


# PROTOCOLS-ARCH.md section 4 (ImageNet top-1 of the authors' READMEs).
_DINO_REFERENCES = [
    _reference("DINO ViT-S/16", "dino README", "CLS of the last 4 blocks", 77.0),
    _reference("DINO ViT-S/8", "dino README", "CLS of the last 4 blocks", 79.7),
    _reference("DINO ViT-B/16", "dino README", "CLS + mean patch", 78.2),
    _reference("DINO ViT-B/8", "dino README", "CLS + mean patch", 80.1),
    _reference("DINO ResNet-50", "dino README", "AvgPool", 75.3),
    _reference("MoCo v3 ViT-S", "moco-v3 README (its lincls: CLS, SGD lr 12 at 1024, 90 ep)", "CLS", 73.2),
    _reference("MoCo v3 ViT-B", "moco-v3 README (its lincls: CLS, SGD lr 12 at 1024, 90 ep)", "CLS", 76.7),
    *(
        _reference(f"SimCLR v1 ResNet-50 {w}", "simclr README (its linear eval)", "AvgPool", top1)
        for w, top1 in (("1x", 69.1), ("2x", 74.2), ("4x", 76.6))
    ),
    *(
        _reference(f"SwAV ResNet-50{w}", "swav README (its linear eval)", "AvgPool", top1)
        for w, top1 in (("", 75.3), ("-w2", 77.3), ("-w4", 77.9), ("-w5", 78.5))
    ),
]
_MAE_REFERENCES = [
    _reference(f"MAE ViT-{size}", "MAE paper (mae FINETUNE.md)", "CLS", top1)
    for size, top1 in (("B", 68.0), ("L", 75.8), ("H", 76.6))
]
_SWEEP_REFERENCES = [
    *(
        _reference(f"DINOv2 ViT-{size}/14", "dinov2 README", "best of the sweep", top1)
        for size, top1 in (("S", 81.1), ("B", 84.5), ("L", 86.3), ("g", 86.5))
    ),
    *(
        _reference(f"DINOv2 ViT-{size}/14 reg4", "dinov2 README", "best of the sweep", top1)
        for size, top1 in (("S", 80.9), ("B", 84.6), ("L", 86.7), ("g", 87.1))
    ),
    _reference("iBOT ViT-S/16", "ibot README (eval_linear_multi sweep)", "CLS of the last 4 blocks", 77.9),
    _reference("iBOT ViT-B/16", "ibot README (eval_linear_multi sweep)", "CLS + mean patch", 79.5),
]


def _table(key: str, title: str, protocol: str, references: list[dict[str, Any]]) -> TableSpec:
    return TableSpec(
        key=key,
        title=title,
        columns=COLUMNS,
        values=_table_values,
        default_protocol=PROTOCOLS[protocol],
        references={"imagenet": references},
    )


TABLES = (
    _table("linear-dino", "Linear Evaluation (DINO protocol)", "dino", _DINO_REFERENCES),
    _table("linear-mae", "Linear Evaluation (MAE protocol)", "mae", _MAE_REFERENCES),
    _table(
        "linear-sweep",
        "Linear Evaluation (multi-head sweep, DINOv2 protocol; best head on val)",
        "sweep",
        _SWEEP_REFERENCES,
    ),
)
FAMILY = TaskFamily(
    name="frozen-linear",
    description="Linear probes of a frozen backbone: DINO, MAE (LARS) or DINOv2's multi-head sweep",
    config=Config,
    run=run,
    tables=TABLES,
    datasets=("imagenet", "places205", "inat18"),
    protocol_keys=("protocol",),
)

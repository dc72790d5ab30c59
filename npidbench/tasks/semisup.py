"""Semi-supervised ImageNet: fine-tune the whole network on 1% or 10% of the labels
(PROTOCOLS.md "Semi-supervised ImageNet 1% / 10%"; mmselfsup 0.x / OpenSelfSup).

Every grid point (base lr x head lr multiplier) fine-tunes backbone + Linear(C, classes) for 20
epochs (lr x0.2 at 12 and 16); the published protocol picks the best point on ImageNet val
(test-selected). ``selection=heldout`` is the honest variant: points are compared on a held-out
part of the labelled split, and the chosen one is refitted on all of it before the val test.
The split is SimCLR's 1% / 10% list (shipped; every published number uses it), a list file of the
same format (``split_file=``) or, as a named option, a seeded class-balanced draw of the same size
(``split=drawn``); the record names which, and the report's "Fine-tuned Config" names split and
point.
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from npidbench.backbones import Backbone
from npidbench.config import check_choices
from npidbench.data import load_split
from npidbench.data.imagenet import load_imagenet_subset, simclr_subset
from npidbench.data.images import EvalTransform
from npidbench.data.splits import DatasetSplit
from npidbench.distributed import DistInfo, check_global_batch, current_world, prepare_for_training
from npidbench.errors import BadInput
from npidbench.precision import autocast, precision_name
from npidbench.progress import log
from npidbench.solvers.linear import topk_correct
from npidbench.tables import NPID_CONFIG, NPID_MODEL, TableSpec
from npidbench.tasks import semisup_logreg, semisup_vit
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput, run_identity, split_record
from npidbench.training.augment import TrainAugment, TrainImages
from npidbench.training.batches import augmented_batches, training_input
from npidbench.training.evaluate import forward_on, topk_accuracy
from npidbench.training.loop import ResumeState, StepResult, StepSchedule, fit, scaled_lr

Selection = Literal["test", "heldout"]
Split = Literal["simclr", "drawn"]
Method = Literal["finetune", "logreg", "mae-finetune"]
PROTOCOL = "semisup-finetune"


@dataclass(frozen=True)
class Config:
    # finetune: the ResNet grid below (mmselfsup); logreg: iBOT's logistic regression on frozen
    # features, every backbone (tasks/semisup_logreg.py); mae-finetune: MAE's ViT fine-tuning
    # recipe (tasks/semisup_vit.py, the ft_ settings)
    method: Method = "finetune"
    fraction: float = 0.01  # of the train split: 0.01 or 0.1 for SimCLR's lists
    split: Split = "simclr"  # simclr: SimCLR's list for `fraction` (shipped); drawn: seeded draw
    split_file: str = ""  # another list in SimCLR's format (one train file name per line)
    lrs: tuple[float, ...] = (0.001, 0.01, 0.1)  # base lr grid (for batch 256)
    head_mults: tuple[float, ...] = (1.0, 10.0, 100.0)  # head lr multiplier grid
    lr: float | None = None  # with head_mult: one grid point instead of the grid
    head_mult: float | None = None
    epochs: int = 20
    milestones: tuple[int, ...] = (12, 16)
    gamma: float = 0.2
    weight_decay: float = 5e-4  # 1%: 5e-4, 10%: 1e-4
    momentum: float = 0.9
    batch_size: int = 256  # global; lrs are for 256 and scaled linearly
    selection: Selection = "test"  # test: best point on val (published); heldout: on labelled data
    heldout_fraction: float = 0.2
    seed: int = 0
    resize: int = 256  # test transform
    crop: int = 224
    train_split: str = "train"
    test_split: str = "val"
    sync_bn: bool = True  # SyncBatchNorm under torchrun on GPUs
    amp: bool = True  # bf16 autocast on CUDA (recorded as the precision); false: fp32
    # method=logreg (iBOT eval_logistic_regression.py defaults)
    lambdas: tuple[float, ...] = (0.01, 0.1, 1.0)
    last_blocks: int = 1  # class tokens of the last n blocks (ViT)
    # iBOT's avgpool_patchtokens 0 (cls) / 2 (both: + the mean normed patch token); its 1 (the
    # mean of un-normed tokens of a mean-pooling ViT) is not offered
    avgpool: Literal["cls", "both"] = "cls"
    logreg_max_iter: int = 1000
    # method=mae-finetune (mae FINETUNE.md, ViT-B; ViT-L: blr 1e-3, ld 0.75, drop path 0.2, 50 ep)
    ft_blr: float = 5e-4
    ft_batch_size: int = 1024
    ft_epochs: int = 100
    ft_warmup_epochs: float = 5.0
    ft_min_lr: float = 1e-6  # the cosine's end (main_finetune.py --min_lr), before the layer scale
    ft_layer_decay: float = 0.65
    ft_weight_decay: float = 0.05
    ft_drop_path: float = 0.1
    ft_randaug: str = "rand-m9-mstd0.5-inc1"  # timm's RandAugment config; "" for none
    ft_mixup: float = 0.8
    ft_cutmix: float = 1.0
    ft_label_smoothing: float = 0.1
    ft_reprob: float = 0.25

    def __post_init__(self) -> None:
        check_choices(self)  # the Literal fields, also when built in Python
        if not self.lambdas or min(self.lambdas) <= 0 or self.last_blocks < 1 or self.logreg_max_iter < 1:
            raise ValueError("lambdas must be positive, last_blocks and logreg_max_iter at least 1")
        if self.ft_blr <= 0 or self.ft_batch_size < 1 or self.ft_epochs < 1 or self.ft_min_lr < 0:
            raise ValueError(
                "ft_blr must be positive, ft_min_lr not negative, ft_batch_size and ft_epochs at least 1"
            )
        if not 0 <= self.ft_warmup_epochs < self.ft_epochs or not 0 < self.ft_layer_decay <= 1:
            raise ValueError("need 0 <= ft_warmup_epochs < ft_epochs and 0 < ft_layer_decay <= 1")
        if min(self.ft_weight_decay, self.ft_mixup, self.ft_cutmix, self.ft_label_smoothing) < 0:
            raise ValueError("ft_weight_decay, ft_mixup, ft_cutmix and ft_label_smoothing cannot be negative")
        if not 0 <= self.ft_drop_path < 1 or not 0 <= self.ft_reprob <= 1:
            raise ValueError("ft_drop_path must be in [0, 1) and ft_reprob in [0, 1]")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if (self.lr is None) != (self.head_mult is None):
            raise ValueError("give both lr and head_mult for one grid point, or neither for the grid")
        if not self.lrs or not self.head_mults or min(self.lrs) <= 0 or min(self.head_mults) <= 0:
            raise ValueError("lrs and head_mults must be non-empty lists of positive numbers")
        if self.lr is not None and (self.lr <= 0 or self.head_mult <= 0):  # type: ignore[operator]
            raise ValueError("lr and head_mult must be positive")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"need 1 <= crop <= resize, got crop {self.crop}, resize {self.resize}")

    @property
    def grid(self) -> list[tuple[float, float]]:
        if self.lr is not None and self.head_mult is not None:
            return [(self.lr, self.head_mult)]
        return list(itertools.product(self.lrs, self.head_mults))


def point_name(lr: float, head_mult: float) -> str:
    return f"lr{lr:g}-head{head_mult:g}"


def choose_point(scores: dict[str, float]) -> str:
    """The grid point with the highest score; ties go to the first in grid order."""
    best = max(scores.values())
    return next(name for name, score in scores.items() if score == best)


def balanced_draw(train: DatasetSplit, count: int, seed: int) -> list[int]:
    """``count`` indices of ``train``, as equal per class as the class sizes allow (the extra
    images go to randomly chosen classes), drawn with ``seed``."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(train.samples):
        by_class.setdefault(label, []).append(index)
    classes = sorted(by_class)
    quota = {c: count // len(classes) for c in classes}
    for c in rng.sample(classes, count % len(classes)):
        quota[c] += 1
    chosen = []
    for c in classes:
        chosen.extend(rng.sample(by_class[c], min(quota[c], len(by_class[c]))))
    return sorted(chosen)


def held_out(split: DatasetSplit, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices of ``split``: per class, ``fraction`` of the images (at least one
    where a class has two or more) are held out."""
    rng = random.Random(seed + 1)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(split.samples):
        by_class.setdefault(label, []).append(index)
    fit_rows, held = [], []
    for members in by_class.values():
        take = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        picked = set(rng.sample(members, take))
        held.extend(i for i in members if i in picked)
        fit_rows.extend(i for i in members if i not in picked)
    return sorted(fit_rows), sorted(held)


def labelled_split(train: DatasetSplit, config: Config) -> tuple[DatasetSplit, dict[str, Any]]:
    """The labelled subset and how it was made (recorded)."""
    if config.split_file:
        subset = load_imagenet_subset(train, Path(config.split_file).expanduser())
        info: dict[str, Any] = {"source": "list", "file": str(config.split_file)}
    elif config.split == "simclr":
        listed = simclr_subset(config.fraction)
        subset = load_imagenet_subset(train, listed)
        info = {"source": "simclr", "file": f"google-research/simclr imagenet_subsets/{listed.name[:-3]}"}
    else:
        count = max(1, round(config.fraction * len(train)))
        subset = train.subset(balanced_draw(train, count, config.seed), f"{train.split}-draw{count}")
        info = {"source": "class-balanced draw", "seed": config.seed}
    percent = 100 * len(subset) / len(train)
    # SimCLR's lists are named by their nominal fraction (12,811 of 1,281,167 is 0.99996%).
    shown = 100 * config.fraction if info["source"] == "simclr" else round(percent, 1)
    label = f"in1k-{shown:g}pct" + ("-drawn" if info["source"] == "class-balanced draw" else "")
    info.update({"label": label, "images": len(subset), "percent": round(percent, 4)})
    return subset, info


def run(ctx: RunContext, config: Config) -> TaskOutput:
    dataset = ctx.preset.dataset
    train = load_split(dataset, config.train_split, ctx.data_root)
    test = load_split(dataset, config.test_split, ctx.data_root)
    written = ctx.preset.config.get("method", "finetune")
    if config.method != written:  # the preset's other settings belong to its method
        raise BadInput(
            f"{ctx.preset.name} runs method={written}: run a preset of method {config.method} "
            f"(npidbench list), not --set method={config.method}"
        )
    world = current_world(ctx.extract.device)
    labelled, split_info = labelled_split(train, config)
    if config.method == "logreg":
        return _logreg(ctx, config, train, test, labelled, split_info)
    if config.method == "mae-finetune":
        check_global_batch(config.ft_batch_size, world)
        scores, history = semisup_vit.finetune(ctx, config, world, labelled, test)
        name = f"{split_info['label']}_mae-finetune-blr{config.ft_blr:g}-ld{config.ft_layer_decay:g}"
        return TaskOutput(
            metrics={**scores, "finetuned_config": name},
            dataset=_with_labelled(split_record(dataset, train, test), split_info),
            protocol=semisup_vit.PROTOCOL,
            seeds=[config.seed],
            details={
                "precision": precision_name(ctx.extract.device, config.amp),
                "history": history,
                **semisup_vit.details(config),
            },
        )
    check_global_batch(config.batch_size, world)
    tuner = _FineTuner(ctx, config, world)
    grid_scores, chosen, final = _select(tuner, labelled, test)
    tuner.clear()
    return TaskOutput(
        metrics={
            "top1": final["top1"],
            "top5": final["top5"],
            "finetuned_config": f"{split_info['label']}_{chosen}",
            "chosen": chosen,
            "grid": grid_scores,
        },
        dataset=_with_labelled(split_record(dataset, train, test), split_info),
        protocol=PROTOCOL,
        seeds=[config.seed],
        details={
            "precision": precision_name(ctx.extract.device, config.amp),
            "selection": config.selection,
            "selected_on": "val (test-selected, as published)"
            if config.selection == "test"
            else f"held-out {config.heldout_fraction:g} of the labelled split",
            "global_batch": config.batch_size,
            "lr_scaled": {point_name(a, b): scaled_lr(a, config.batch_size) for a, b in config.grid},
        },
    )


def _logreg(
    ctx: RunContext,
    config: Config,
    train: DatasetSplit,
    test: DatasetSplit,
    labelled: DatasetSplit,
    split_info: dict[str, Any],
) -> TaskOutput:
    scores, chosen, final, layers = semisup_logreg.select(ctx, config, labelled, test)
    return TaskOutput(
        metrics={
            **final,
            "finetuned_config": f"{split_info['label']}_{chosen}",
            "chosen": chosen,
            "grid": scores,
        },
        dataset=_with_labelled(split_record(ctx.preset.dataset, train, test), split_info),
        protocol=semisup_logreg.PROTOCOL,
        seeds=[config.seed],
        details={
            "selection": config.selection,
            "selected_on": "val (test-selected, as iBOT prints every lambda)"
            if config.selection == "test"
            else f"held-out {config.heldout_fraction:g} of the labelled split",
            **semisup_logreg.details(layers),
        },
    )


def _backbone_check(config: Config, backbone: Backbone) -> str | None:
    """The fine-tuning grid is the ResNet protocol (mmselfsup); logreg runs on every backbone."""
    if config.method == "finetune" and backbone.family != "resnet":
        return (
            f"the semi-supervised fine-tuning grid is the ResNet protocol (mmselfsup); a {backbone.family} "
            "runs semisup-imagenet-1pct-logreg / -10pct-logreg (iBOT's logistic regression on frozen "
            "features)" + (" or -mae-finetune (MAE's recipe)" if backbone.family == "vit" else "")
        )
    if config.method == "mae-finetune" and backbone.family != "vit":
        runs = (
            "semisup-imagenet-1pct / -10pct"
            if backbone.family == "resnet"
            else "semisup-imagenet-1pct-logreg / -10pct-logreg"
        )
        return f"method=mae-finetune is MAE's ViT recipe; a {backbone.family} runs {runs}"
    return None


def _select(
    tuner: _FineTuner, labelled: DatasetSplit, test: DatasetSplit
) -> tuple[dict[str, dict[str, float]], str, dict[str, float]]:
    """(every grid point's scores, the chosen point, its val scores). ``selection=test`` judges
    the points on val (published); ``heldout`` on held-out labelled images, then refits the
    chosen point on all of them for val."""
    config = tuner.config
    if config.selection == "test":
        scores = {point_name(*point): tuner.score(*point, labelled, test, "val") for point in config.grid}
        chosen = choose_point({name: s["top1"] for name, s in scores.items()})
        return scores, chosen, scores[chosen]
    fit_rows, held_rows = held_out(labelled, config.heldout_fraction, config.seed)
    fit_split = labelled.subset(fit_rows, f"{labelled.split}-fit")
    held_split = labelled.subset(held_rows, f"{labelled.split}-heldout")
    scores = {
        point_name(*point): tuner.score(*point, fit_split, held_split, "heldout") for point in config.grid
    }
    chosen = choose_point({name: s["top1"] for name, s in scores.items()})
    lr, mult = dict((point_name(a, b), (a, b)) for a, b in config.grid)[chosen]
    log(f"semisup: {chosen} is best on the held-out images; refitting it on all {len(labelled)}")
    return scores, chosen, tuner.score(lr, mult, labelled, test, "val")


def _with_labelled(record: dict[str, Any], split_info: dict[str, Any]) -> dict[str, Any]:
    record["train"]["labelled"] = split_info  # how the labelled subset was made
    return record


class _Classifier(nn.Module):
    """The backbone (its forward: the global pooled feature of ``dim``, e.g. a torchvision ResNet
    without fc) + Linear head."""

    def __init__(self, backbone: nn.Module, dim: int, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class _FineTuner:
    """Fine-tunes grid points of one run; keeps their resume states until the record is written."""

    def __init__(self, ctx: RunContext, config: Config, world: DistInfo) -> None:
        self.ctx, self.config, self.world = ctx, config, world
        self.device = torch.device(world.device)
        self.transform = EvalTransform(config.resize, config.crop, "center-crop")
        self.states: list[ResumeState] = []

    def score(
        self, lr: float, mult: float, data: DatasetSplit, judge: DatasetSplit, tag: str
    ) -> dict[str, float]:
        """Top-1 / top-5 on ``judge`` after fine-tuning the point (lr, mult) on ``data``."""
        identity = run_identity(
            self.ctx,
            self.config,
            self.world.world_size,
            point=point_name(lr, mult),
            judge=tag,
            data=data.fingerprint,
            images=[Path(p).name for p, _ in data.samples],
        )
        state = ResumeState(self.ctx.cache.root, identity, self.world)
        self.states.append(state)
        return self._finetune(lr, mult, data, judge, state, tag)[-1]["eval"]

    def clear(self) -> None:
        for state in self.states:
            state.clear()

    def _model(self, lr: float, mult: float, classes: int) -> tuple[nn.Module, nn.Module, torch.optim.SGD]:
        """(the classifier, what training steps call, SGD with the head at ``mult`` x the lr)."""
        config = self.config
        torch.manual_seed(config.seed)  # the head's initial weights
        interface = self.ctx.model.backbone
        dim = interface.layers()[interface.default_layer].dim
        model: nn.Module = _Classifier(copy.deepcopy(self.ctx.model.model), dim, classes)
        model, wrapped = prepare_for_training(model, self.world, config.sync_bn)
        base = scaled_lr(lr, config.batch_size)
        optimizer = torch.optim.SGD(
            [
                {"params": model.backbone.parameters(), "lr": base},
                {"params": model.head.parameters(), "lr": base * mult},
            ],
            lr=base,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            fused=True,  # one kernel for all parameters (several times faster on a CPU)
        )
        return model, wrapped, optimizer

    def _finetune(
        self, lr: float, mult: float, data: DatasetSplit, judge: DatasetSplit, state: ResumeState, tag: str
    ) -> list[dict[str, Any]]:
        config, device = self.config, self.device
        model, wrapped, optimizer = self._model(lr, mult, len(data.classes))
        images = TrainImages(data, TrainAugment("rrc", config.crop, config.resize), config.seed)
        local_batch = config.batch_size // self.world.world_size
        imagenet_norm = self.ctx.model.input_normalised  # False: [0, 1] pixels (SimCLR v1)

        def step(batch) -> StepResult:
            labels = batch.labels.to(device)
            with autocast(device, config.amp):
                logits = wrapped(training_input(batch, device, imagenet_norm=imagenet_norm))
            loss = F.cross_entropy(logits.float(), labels)
            return StepResult(loss, len(labels), topk_correct(logits.detach(), labels, (1,))[1])

        def evaluate() -> dict[str, float]:
            outputs = forward_on(
                model,
                judge,
                self.transform,
                self.world,
                self.ctx.extract,
                config.amp,
                imagenet_norm=imagenet_norm,
            )
            return topk_accuracy(
                model, (([logits.float()], y) for logits, y in outputs), ("head",), self.world
            )["head"]

        base = scaled_lr(lr, config.batch_size)
        return fit(
            label=f"semisup {point_name(lr, mult)}" + (" (held-out)" if tag == "heldout" else ""),
            trainable=model,
            optimizer=optimizer,
            base_lrs=[base, base * mult],
            schedule=StepSchedule(config.epochs, config.milestones, config.gamma),
            batches=augmented_batches(images, self.world, local_batch, self.ctx.extract.workers, device),
            step=step,
            evaluate=evaluate,
            evaluate_at=lambda epoch: epoch + 1 == config.epochs,
            state=state,
            world=self.world,
            images_per_epoch=len(data),
        )


SEMISUP_COLUMNS = ("Fine-tuned Config", "Top-1 (%)", "Top-5 (%)")


def _table_values(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record["metrics"]
    return {
        "Fine-tuned Config": metrics.get("finetuned_config"),
        "Top-1 (%)": metrics.get("top1"),
        "Top-5 (%)": metrics.get("top5"),
    }


def _labelled_split(record: dict[str, Any]) -> str:
    """The 1% and 10% rows of one checkpoint are different rows."""
    return record["dataset"].get("train", {}).get("labelled", {}).get("label", "")


TABLE = TableSpec(
    key="semisup",
    title="Semi-Supervised Classification",
    columns=SEMISUP_COLUMNS,
    values=_table_values,
    default_protocol=PROTOCOL,
    config_column="Pretrain Config",
    row_part=_labelled_split,
    references={
        "imagenet": [
            {
                "Model": f"{NPID_MODEL}, older OpenSelfSup checkpoint",
                "Pretrain Config": NPID_CONFIG,
                "Fine-tuned Config": f"in1k-{pct}_lr0.01-head100",
                "Top-1 (%)": top1,
                "Top-5 (%)": top5,
            }
            for pct, top1, top5 in (("1pct", 27.95, 54.37), ("10pct", 57.22, 81.39))
        ]
    },
)
FAMILY = TaskFamily(
    name="semisup",
    description="Semi-supervised fine-tuning on 1% / 10% of ImageNet labels, lr x head-multiplier grid",
    config=Config,
    run=run,
    tables=(TABLE,),
    datasets=("imagenet",),
    protocol_keys=("method",),  # named by the protocol ("semisup-logreg")
    backbone_check=_backbone_check,
)

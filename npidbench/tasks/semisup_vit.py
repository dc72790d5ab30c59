"""Semi-supervised ImageNet by fine-tuning a ViT with MAE's recipe (``semisup``'s
``method=mae-finetune``; PROTOCOLS-ARCH.md section 2 "MAE fine-tune", mae FINETUNE.md and
main_finetune.py), on the 1% / 10% labelled split.

The network is MAE's global-pool classifier: the final norm is dropped, a new LayerNorm
(``fc_norm``, eps 1e-6) normalises the mean of the patch tokens, and a Linear head (weights trunc
normal std 2e-5, zero bias) classifies it; stochastic depth rises linearly to ``ft_drop_path``
over the blocks. AdamW (betas 0.9 / 0.999) with layer-wise lr decay: the patch embedding, class
token and position embedding at ld^(depth + 1), block i (0-based) at ld^(depth - i), the head at
1; no weight decay on 1-d tensors, the class token and the position embedding (mae
util/lr_decay.py). lr = blr x batch / 256, 5 warm-up epochs then a cosine per iteration.
Augmentation as timm's create_transform for MAE: bicubic RandomResizedCrop + flip, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode) after normalisation, mixup 0.8 /
cutmix 1.0 (switch 0.5, per batch) with label smoothing 0.1 and soft-target cross-entropy.
ViT-B's settings are the defaults (blr 5e-4, ld 0.65, wd 0.05, drop path 0.1, 100 epochs); ViT-L
uses blr 1e-3, ld 0.75, drop path 0.2, 50 epochs (``--set``). Evaluation: resize 256 bicubic +
center crop 224, evaluated every epoch and the best epoch reported, as MAE prints its max
accuracy (test-selected, recorded as such).

Every random draw is seeded per (seed, epoch, image) for the images and per iteration for mixup
and erasing, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from npidbench.data.images import EvalTransform
from npidbench.data.splits import DatasetSplit
from npidbench.distributed import DistInfo, prepare_for_training
from npidbench.precision import autocast
from npidbench.pretrain.data import mix_seed
from npidbench.solvers.linear import topk_correct
from npidbench.tasks.base import RunContext, run_identity
from npidbench.training.augment import TrainAugment, TrainImages
from npidbench.training.batches import augmented_batches, training_input
from npidbench.training.evaluate import forward_on, topk_accuracy
from npidbench.training.layer_decay import layer_decay_groups, vit_layer
from npidbench.training.loop import CosineSchedule, ResumeState, StepResult, fit, scaled_lr

if TYPE_CHECKING:
    from npidbench.tasks.semisup import Config

PROTOCOL = "semisup-mae-finetune"
RANDAUG = "rand-m9-mstd0.5-inc1"


def classifier(vit: nn.Module, classes: int, drop_path: float) -> nn.Module:
    """A copy of ``vit`` as MAE's global-pool classifier (module docstring)."""
    from timm.layers import DropPath

    model = copy.deepcopy(vit)
    width = int(model.embed_dim)
    model.norm = nn.Identity()  # mae models_vit.py: global_pool deletes the final norm
    model.fc_norm = nn.LayerNorm(width, eps=1e-6)
    model.global_pool = "avg"  # timm: the mean of the tokens after the prefix (class, registers)
    model.head = nn.Linear(width, classes)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)  # mae main_finetune.py
    nn.init.zeros_(model.head.bias)
    rates = torch.linspace(0, drop_path, len(model.blocks)).tolist()
    for block, rate in zip(model.blocks, rates, strict=True):
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
    return model


_NO_DECAY = {"cls_token", "pos_embed", "reg_token", "dist_token"}


def param_groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """AdamW groups by (layer, decay) with their lr scale ld^(depth + 1 - layer) (MAE's layers:
    ``training.layer_decay``); no weight decay on 1-d tensors and the tokens / position embedding."""
    depth = len(model.blocks)
    return layer_decay_groups(
        model.named_parameters(),
        lambda name: vit_layer(name, depth),
        depth,
        config.ft_layer_decay,
        config.ft_weight_decay,
        decays=lambda name, param: param.ndim > 1 and name.split(".")[0] not in _NO_DECAY,
    )


@contextmanager
def python_and_numpy_seeded_from_torch():
    """timm's RandAugment, mixup and random erasing draw from Python's and NumPy's generators:
    seed both from torch's (seeded per image or per iteration by the caller) and restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    seed = int(torch.randint(0, 2**31 - 1, ()))
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class RandAugment:
    """timm's RandAugment (PIL) on a uint8 (3, H, W) tensor, seeded from torch's generator."""

    def __init__(self, config_str: str, crop: int) -> None:
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        from npidbench.data.images import IMAGENET_MEAN

        # timm create_transform's hparams: translation 45% of the crop, fill with the mean colour
        hparams = {
            "translate_const": int(crop * 0.45),
            "img_mean": tuple(round(255 * x) for x in IMAGENET_MEAN),
            "interpolation": str_to_pil_interp("bicubic"),
        }
        self.transform = rand_augment_transform(config_str, hparams)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        with python_and_numpy_seeded_from_torch():
            out = self.transform(TF.to_pil_image(image))
        return TF.pil_to_tensor(out)


def finetune(
    ctx: RunContext, config: Config, world: DistInfo, data: DatasetSplit, judge: DatasetSplit
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(top-1 / top-5 on ``judge``, the history) after fine-tuning on ``data``."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import SoftTargetCrossEntropy

    device = torch.device(world.device)
    torch.manual_seed(config.seed)  # the new head's and fc_norm's initial weights
    model = classifier(ctx.model.model, len(data.classes), config.ft_drop_path)
    model, wrapped = prepare_for_training(model, world, sync_bn=False, channels_last=False)
    groups = param_groups(model, config)
    lr = scaled_lr(config.ft_blr, config.ft_batch_size)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    augment = TrainAugment("rrc", config.crop, config.resize, 0.0, 0.0, interpolation="bicubic")
    extra = RandAugment(config.ft_randaug, config.crop) if config.ft_randaug else None
    images = TrainImages(data, augment, config.seed, extra=extra)
    local_batch = config.ft_batch_size // world.world_size
    mixup = None
    if config.ft_mixup > 0 or config.ft_cutmix > 0:  # main_finetune.py: no mixup_fn otherwise
        mixup = Mixup(
            mixup_alpha=config.ft_mixup,
            cutmix_alpha=config.ft_cutmix,
            label_smoothing=config.ft_label_smoothing,
            num_classes=len(data.classes),
        )
    erase = RandomErasing(config.ft_reprob, mode="pixel", max_count=1, device=str(device))
    criterion = SoftTargetCrossEntropy()
    imagenet_norm = ctx.model.input_normalised
    # main_finetune.py drops the last partial batch (drop_last=True)
    per_epoch = -(-len(data) // world.world_size) // local_batch
    # lr_sched.adjust_learning_rate: the cosine ends at min_lr (then each group's layer scale)
    schedule = CosineSchedule(
        config.ft_epochs, config.ft_warmup_epochs, floor=min(1.0, config.ft_min_lr / lr)
    )

    def step(batch) -> StepResult:
        labels = batch.labels.to(device)
        inputs = training_input(batch, device, imagenet_norm=imagenet_norm)
        with python_and_numpy_seeded_from_torch():  # fit seeds torch per iteration (step_seed)
            inputs = erase(inputs) if config.ft_reprob > 0 else inputs
            if mixup is not None and len(labels) % 2 == 0:  # timm's batch mixup pairs it with its reverse
                inputs, targets = mixup(inputs, labels)
            else:
                targets = _smoothed(labels, len(data.classes), config.ft_label_smoothing)
        with autocast(device, config.amp):
            logits = wrapped(inputs)
        loss = criterion(logits.float(), targets)
        return StepResult(loss, len(labels), topk_correct(logits.detach(), labels, (1,))[1])

    transform = EvalTransform(config.resize, config.crop, "center-crop", "bicubic")

    def evaluate() -> dict[str, float]:
        outputs = forward_on(
            model, judge, transform, world, ctx.extract, config.amp, imagenet_norm=imagenet_norm
        )
        return topk_accuracy(model, (([out.float()], y) for out, y in outputs), ("head",), world)["head"]

    identity = run_identity(ctx, config, world.world_size, data=data.fingerprint, judge=judge.split)
    state = ResumeState(ctx.cache.root, identity, world)
    history = fit(
        label="semisup mae-finetune",
        trainable=model,
        optimizer=optimizer,
        base_lrs=[lr * group["lr_scale"] for group in groups],
        schedule=schedule,
        batches=augmented_batches(images, world, local_batch, ctx.extract.workers, device, drop_last=True),
        step=step,
        evaluate=evaluate,
        evaluate_at=lambda epoch: True,  # MAE evaluates every epoch and prints the max accuracy
        state=state,
        world=world,
        images_per_epoch=len(data),
        iterations_per_epoch=per_epoch,
        lr_at=lambda it: schedule.at(it / per_epoch),
        # per rank: MAE seeds each process with seed + rank (main_finetune.py), its drop-path
        # masks, erasing and mixup draws differ across the global batch
        step_seed=mix_seed(config.seed, world.rank, 29),
    )
    state.clear()
    best = max(history, key=lambda line: line["eval"]["top1"])
    return {**best["eval"], "best_epoch": best["epoch"]}, history


def _smoothed(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing (timm's, for a batch mixup cannot pair)."""
    off = smoothing / classes
    targets = torch.full((len(labels), classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def details(config: Config) -> dict[str, Any]:
    return {
        "interpolation": "bicubic",
        "protocol_note": "MAE main_finetune.py on the labelled split: global-pool head, AdamW with layer "
        f"decay {config.ft_layer_decay:g}, drop path {config.ft_drop_path:g}, RandAugment {config.ft_randaug}, "
        f"mixup {config.ft_mixup:g} / cutmix {config.ft_cutmix:g}, label smoothing {config.ft_label_smoothing:g}, "
        f"random erasing {config.ft_reprob:g}; the best epoch on val (test-selected, as MAE's max accuracy)",
        "global_batch": config.ft_batch_size,
        "lr_scaled": scaled_lr(config.ft_blr, config.ft_batch_size),
    }

"""The NPID training loop: one process, one GPU, or many under torchrun; never loses work.

Files in the output folder:
  last.pth        the checkpoint to evaluate (this project's format: backbone + head + meta)
  resume.pth      everything needed to continue exactly: model, bank, Z, optimiser, position
  monitor.jsonl   one line per epoch: loss, lr, images/s, the kNN monitor on the memory bank
Both checkpoints are replaced atomically, so a crash leaves the last good ones.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from npidbench.atomic import atomic_write, atomic_write_text
from npidbench.backbones import FAMILIES
from npidbench.checkpoint.own import npidbench_checkpoint, save_npidbench_checkpoint
from npidbench.data import load_split
from npidbench.data.images import EvalTransform, ImageList, collate, normalize_batch
from npidbench.data.splits import DatasetSplit
from npidbench.distributed import DistInfo, check_global_batch, distributed, prepare_for_training
from npidbench.errors import BadInput, RunFailed
from npidbench.precision import autocast, precision_name
from npidbench.pretrain.archs import (
    arch_family,
    backbone_spec,
    build_pretrain_backbone,
    fit_to_patches,
    patch_size,
)
from npidbench.pretrain.data import AugmentedImages, ShardSampler
from npidbench.pretrain.npid import (
    EmbeddingModel,
    MemoryBank,
    bank_scores,
    draw_noise,
    estimate_z,
    nce_loss,
    softmax_loss,
)
from npidbench.pretrain.recipe import Recipe, recipe_from_dict
from npidbench.progress import log, make_progress
from npidbench.solvers.knn import weighted_knn

RESUME_FORMAT = "npidbench-resume"


# Recipe settings that change how a run is watched and saved, not what it learns: a finished run
# or a resume file made with other values is the same run.
SAVING_SETTINGS = ("knn_every", "save_every_steps", "save_every_seconds", "workers")


@dataclass
class RunState:
    """Where a run stands; saved in resume.pth."""

    epoch: int = 0  # the epoch in progress
    step: int = 0  # steps done within it
    global_step: int = 0
    loss_sum: float = 0.0  # over the steps done in the epoch in progress
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopRequest:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def pretrain(
    recipe: Recipe,
    out_dir: Path,
    data_root: Path | None = None,
    device: str = "cpu",
    resume: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Run ``recipe`` into ``out_dir``; returns the checkpoint to evaluate (``last.pth``).

    ``dtype`` is for exactness checks from Python only (float64: the 2-process run equals the
    1-process one to ~1e-15, where float32 kernels differ by CPU and thread count); the CLI
    always trains in float32 (bf16 autocast on CUDA with ``amp``)."""
    out_dir = Path(out_dir)
    resume_file = out_dir / "resume.pth"
    if resume and not resume_file.exists():
        raise BadInput(f"nothing to resume: {resume_file} does not exist (start without --resume)")
    if not resume and (resume_file.exists() or (out_dir / "last.pth").exists()):
        if _already_complete(recipe, out_dir):
            log(f"{out_dir} already holds this recipe's finished run")
            return out_dir / "last.pth"
        raise BadInput(f"{out_dir} already holds a run: continue it with --resume, or choose another --out")
    if recipe.epochs == 0:
        return _write_initial(recipe, out_dir)
    with distributed(device) as world:
        trainer = _Trainer(recipe, out_dir, data_root, world, dtype)
        if resume:
            trainer.load_resume(resume_file)
        return trainer.run()


def _already_complete(recipe: Recipe, out_dir: Path) -> bool:
    """The same recipe already ran to its end here: rerunning the command is a no-op."""
    try:
        checkpoint = torch.load(out_dir / "last.pth", map_location="cpu", weights_only=True)
        meta = checkpoint["meta"]
        recorded = recipe_from_dict(meta["recipe_settings"])
    except Exception:  # an unreadable or foreign file: not ours to reuse
        return False
    same = not recipe.differences(recorded, ignore=SAVING_SETTINGS)
    return same and meta.get("epochs") == recipe.epochs


def _write_initial(recipe: Recipe, out_dir: Path) -> Path:
    """epochs = 0: the seeded initial weights, in the format a trained checkpoint has."""
    torch.manual_seed(recipe.seed)
    model, _ = build_pretrain_backbone(recipe.arch, recipe.input_size)
    meta = {
        "recipe": recipe.name,
        "epochs": 0,
        "dataset": recipe.dataset,
        "seed": recipe.seed,
        "random_init": True,
        "recipe_settings": recipe.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_npidbench_checkpoint(out_dir / "last.pth", _checkpoint(recipe, model, meta))


def _checkpoint(recipe: Recipe, backbone: nn.Module, meta: dict[str, Any], head=None) -> dict[str, Any]:
    """last.pth's contents: a ViT or ConvNeXt also records its family and spec (own.py)."""
    family = arch_family(recipe.arch)
    spec = backbone_spec(recipe.arch, recipe.input_size)
    return npidbench_checkpoint(backbone, recipe.arch, meta, head, family=family, spec=spec)


class _Trainer:
    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        data_root: Path | None,
        world: DistInfo,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.recipe, self.out_dir, self.world, self.dtype = recipe, out_dir, world, dtype
        self.device = torch.device(world.device)
        self.train_split = _pool(
            load_split(recipe.dataset, recipe.train_split, data_root), recipe.pool_per_class
        )
        self.val_split = load_split(recipe.dataset, recipe.val_split, data_root) if recipe.knn_every else None
        check_global_batch(recipe.batch_size, world)
        self.local_batch = recipe.batch_size // world.world_size
        self.steps_per_epoch = len(self.train_split) // recipe.batch_size
        if self.steps_per_epoch == 0:
            raise BadInput(
                f"batch_size {recipe.batch_size} exceeds the {len(self.train_split)} training images"
            )
        torch.manual_seed(recipe.seed)  # identical initial weights on every rank
        # NPID's head on the family's global feature: a ResNet's average pool, a ViT's class token
        # after the final norm, a ConvNeXt's head-normed average (archs.py).
        backbone, width = build_pretrain_backbone(recipe.arch, recipe.input_size)
        model = EmbeddingModel(backbone, width, recipe.feature_dim)
        self.model, self.ddp = prepare_for_training(model, world, recipe.sync_bn, dtype=dtype)
        self.bank = MemoryBank(
            len(self.train_split),
            recipe.feature_dim,
            recipe.bank_init,
            torch.Generator().manual_seed(recipe.seed),
            dtype,
        ).to(self.device)
        self.z = torch.tensor(-1.0, dtype=torch.float64, device=self.device)  # estimated on the first step
        self.lr = recipe.scaled_lr(recipe.batch_size)
        # NPID's SGD for every family, ViTs and ConvNeXts included. Their own recipes use AdamW
        # (DeiT, DINO, ConvNeXt), but NPID's SGD learns here: on the embedded data (10 classes) the
        # default recipe cut to 60 epochs gave a ViT-Ti/16 the monitor's kNN top-1 12.2% / 19.5% at
        # epochs 10 / 30 and ResNet-18 14.5% / 19.8%. AdamW for ViTs would be a new recipe setting,
        # not a silent switch.
        decay, no_decay = [], []
        for param in self.model.parameters():
            # 1-d parameters are norm weights and biases (BatchNorm; LayerNorm, biases and ConvNeXt's
            # layer scale): decayed unless the recipe says not
            (no_decay if param.ndim <= 1 and not recipe.norm_bias_decay else decay).append(param)
        self.optimizer = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            momentum=recipe.momentum,
        )
        self.state = RunState()
        self.last_save = time.monotonic()  # of resume.pth (save_every_seconds)
        self.dataset = AugmentedImages(self.train_split, recipe)
        self.labels = torch.tensor([label for _, label in self.train_split.samples])

    # -- resume ------------------------------------------------------------------------------
    def load_resume(self, path: Path) -> None:
        from npidbench.checkpoint.reading import read_checkpoint

        saved = read_checkpoint(path).obj
        if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT:
            raise BadInput(f"{path} is not an npidbench resume file")
        recorded = recipe_from_dict(saved["recipe"])
        changed = self.recipe.differences(
            recorded, ignore=("epochs", *SAVING_SETTINGS)
        )
        if changed:
            raise BadInput(
                f"--resume with a different recipe than {path} was made with: {'; '.join(changed)}"
            )
        if tuple(saved["bank"].shape) != tuple(self.bank.bank.shape):
            where = saved.get("data_root", "another data root")
            raise BadInput(
                f"{path} was made on {len(saved['bank'])} training images ({where}), this data has "
                f"{len(self.bank.bank)}: resume with the --data-root the run started with"
            )
        if saved.get("dtype", "torch.float32") != str(self.dtype):
            raise BadInput(f"{path} was made in {saved.get('dtype')}; resume it in the same precision")
        if saved["world_size"] != self.world.world_size:
            raise BadInput(
                f"{path} was made with {saved['world_size']} processes; resume with the same number"
            )
        self.model.load_state_dict(saved["model"])
        self.bank.bank.copy_(saved["bank"])
        self.z.fill_(float(saved["z"]))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = RunState(
            saved["epoch"],
            saved["step"],
            saved["global_step"],
            float(saved["loss_sum"]),
            list(saved["history"]),
        )
        log(f"resuming {self.recipe.name} at epoch {self.state.epoch + 1}, step {self.state.step}")

    def save_resume(self) -> None:
        if not self.world.is_main:
            return
        state = {
            "format": RESUME_FORMAT,
            "version": 1,
            "recipe": self.recipe.to_dict(),
            "world_size": self.world.world_size,
            "dtype": str(self.dtype),
            "data_root": str(self.train_split.root),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "global_step": self.state.global_step,
            "loss_sum": self.state.loss_sum,
            "history": self.state.history,
            "model": self.model.state_dict(),
            "bank": self.bank.bank.cpu(),
            "z": float(self.z),
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_write(self.out_dir / "resume.pth", lambda handle: torch.save(state, handle))
        self.last_save = time.monotonic()

    def save_checkpoint(self, epochs_done: int) -> Path:
        path = self.out_dir / "last.pth"
        if not self.world.is_main:
            return path
        meta = {
            "recipe": self.recipe.name,
            "epochs": epochs_done,
            "dataset": self.train_split.display_name,
            "data_root": str(self.train_split.root),
            "train_images": len(self.train_split),
            "seed": self.recipe.seed,
            "world_size": self.world.world_size,
            "global_batch": self.recipe.batch_size,
            "lr_scaled": self.lr,
            "precision": precision_name(self.device, self.recipe.amp)
            if self.dtype == torch.float32
            else str(self.dtype).removeprefix("torch."),
            "recipe_settings": self.recipe.to_dict(),
            "monitor": self.state.history[-1] if self.state.history else {},
        }
        head = {f"head.{k}": v for k, v in self.model.head.state_dict().items()}
        save_npidbench_checkpoint(path, _checkpoint(self.recipe, self.model.backbone, meta, head))
        lines = "".join(json.dumps(line) + "\n" for line in self.state.history)
        atomic_write_text(self.out_dir / "monitor.jsonl", lines)
        return path

    # -- training ----------------------------------------------------------------------------
    def lr_at(self, epoch: int, step: int) -> float:
        recipe = self.recipe
        progress = epoch + step / self.steps_per_epoch
        if recipe.warmup_epochs and progress < recipe.warmup_epochs:
            return self.lr * (progress + 1 / self.steps_per_epoch) / recipe.warmup_epochs
        if recipe.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress / recipe.epochs))
        return self.lr * recipe.lr_gamma ** sum(epoch >= milestone for milestone in recipe.lr_steps)

    def run(self) -> Path:
        recipe, world = self.recipe, self.world
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if world.is_main:
            log(
                f"NPID {recipe.arch} on {len(self.train_split):,} {self.train_split.display_name} images, "
                f"{world.world_size} process(es), global batch {recipe.batch_size}, lr {self.lr:g} (scaled)"
            )
            crop = fit_to_patches(recipe.arch, recipe.input_size)
            if crop != recipe.input_size:
                log(
                    f"{recipe.arch}: input_size {recipe.input_size} is not a whole number of its "
                    f"{patch_size(recipe.arch)} px patches; training crops are {crop} px (the kNN "
                    f"monitor's {fit_to_patches(recipe.arch, recipe.eval_crop)} px)"
                )
        total_steps = recipe.epochs * self.steps_per_epoch
        with _StopRequest() as stop, make_progress(unit="img") as progress:
            bar = progress.add_task(
                "pretrain",
                total=total_steps * recipe.batch_size,
                completed=self.state.global_step * recipe.batch_size,
            )
            while self.state.epoch < recipe.epochs:
                self._train_epoch(stop, progress, bar)
                if self._stop_everywhere(stop.requested):
                    self.save_resume()
                    raise RunFailed(
                        f"interrupted at epoch {self.state.epoch + 1} step {self.state.step}: progress saved in "
                        f"{self.out_dir / 'resume.pth'}; continue with --resume"
                    )
        if world.world_size > 1:
            dist.barrier()
        return self.out_dir / "last.pth"

    def _stop_everywhere(self, requested: bool) -> bool:
        if self.world.world_size == 1:
            return requested
        flag = torch.tensor([1.0 if requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _train_epoch(self, stop: _StopRequest, progress, bar) -> None:
        """Train the epoch in progress from its next step; returns early on a stop request."""
        recipe, world, state = self.recipe, self.world, self.state
        loader = self._epoch_loader()
        self.ddp.train()
        if recipe.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        started, seen = time.perf_counter(), 0
        # The lr of the epoch's last step so far: a run stopped after an epoch's last step resumes
        # with no step left in it, and the epoch's monitor line still names its lr.
        lr = self.lr_at(state.epoch, max(state.step - 1, 0))
        for images, indices in loader:
            lr = self.lr_at(state.epoch, state.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.step(images, indices)
            state.loss_sum += loss
            seen += images.shape[0] * world.world_size
            state.step += 1
            state.global_step += 1
            progress.update(
                bar,
                advance=images.shape[0] * world.world_size,
                description=f"pretrain ep {state.epoch + 1}/{recipe.epochs} loss {loss:.3f} lr {lr:.3g}",
            )
            if recipe.save_every_steps and state.global_step % recipe.save_every_steps == 0:
                self.save_resume()
            if self._stop_everywhere(stop.requested):
                return
        self._end_epoch(lr, seen, time.perf_counter() - started)

    def _epoch_loader(self) -> DataLoader:
        """This rank's images of the epoch in progress, from its next step on."""
        recipe, world, state = self.recipe, self.world, self.state
        self.dataset.epoch = state.epoch
        sampler = ShardSampler(
            len(self.dataset),
            recipe.batch_size,
            recipe.seed,
            state.epoch,
            state.step,
            world.rank,
            world.world_size,
        )
        workers = recipe.workers if recipe.workers >= 0 else (0 if self.dataset.images is not None else 2)
        return DataLoader(
            self.dataset,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def _end_epoch(self, lr: float, seen: int, elapsed: float) -> None:
        """The monitor line (kNN where due), then the resume file and the checkpoint."""
        recipe, state = self.recipe, self.state
        line = {
            "epoch": state.epoch + 1,
            "loss": state.loss_sum / self.steps_per_epoch,
            "lr": lr,
            "images_per_s": round(seen / elapsed, 1) if elapsed > 0 else 0.0,
            "seconds": round(elapsed, 2),
        }
        if recipe.knn_every and (
            (state.epoch + 1) % recipe.knn_every == 0 or state.epoch + 1 == recipe.epochs
        ):
            line["knn_top1"] = self.knn_monitor()
        state.history.append(line)
        state.epoch += 1
        state.step = 0
        state.loss_sum = 0.0
        since = time.monotonic() - self.last_save
        if state.epoch == recipe.epochs or not recipe.save_every_seconds or since >= recipe.save_every_seconds:
            self.save_resume()
            self.save_checkpoint(state.epoch)
        if self.world.is_main:
            knn = f", kNN top-1 {line['knn_top1']:.2f}" if "knn_top1" in line else ""
            log(f"epoch {state.epoch}: loss {line['loss']:.4f}, {line['images_per_s']:.0f} img/s{knn}")

    def step(self, images: torch.Tensor, indices: torch.Tensor) -> float:
        recipe, world = self.recipe, self.world
        images = normalize_batch(images.to(self.device, non_blocking=True), self.dtype)
        indices = indices.to(self.device)
        with autocast(self.device, recipe.amp):
            features = self.ddp(images)
        noise_all = draw_noise(
            recipe.batch_size,
            recipe.negatives,
            len(self.bank.bank),
            recipe.seed,
            self.state.global_step,
            self.device,
        )
        noise = noise_all[world.rank :: world.world_size][: indices.shape[0]]
        scores = bank_scores(features, self.bank.bank, indices, noise)
        if recipe.loss == "nce":
            if self.z.item() < 0:
                self.z.copy_(self._global_mean_exp(scores) * len(self.bank.bank))
            loss = nce_loss(scores, self.z, recipe.temperature, len(self.bank.bank))
        else:
            loss = softmax_loss(scores, recipe.temperature)
        value = self._global_loss(float(loss.detach()), indices.shape[0])
        if not math.isfinite(value):
            raise RunFailed(
                f"the loss became {value} at epoch {self.state.epoch + 1} step {self.state.step + 1}; the last good "
                f"checkpoints in {self.out_dir} are kept: lower the learning rate (--set lr=...) and continue with "
                "--resume"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        all_indices, all_features = self._gather(indices, features.detach())
        self.bank.update(all_indices, all_features, recipe.bank_momentum)
        return value

    def _global_mean_exp(self, scores: torch.Tensor) -> torch.Tensor:
        local = estimate_z(scores, self.recipe.temperature, 1)  # mean exp(s / T) over this rank
        if self.world.world_size == 1:
            return local
        total = torch.stack(
            [
                local * scores.numel(),
                torch.tensor(float(scores.numel()), dtype=torch.float64, device=self.device),
            ]
        )
        dist.all_reduce(total)
        return total[0] / total[1]

    def _global_loss(self, value: float, images: int) -> float:
        """The step's loss over the global batch (each rank's weighted by its images), so that
        monitor.jsonl is one process's rather than rank 0's shard; a loss that is not finite on
        any rank is not finite here on every rank, which all stop at the same step."""
        if self.world.world_size == 1:
            return value
        total = torch.tensor(
            [value * images if images else 0.0, float(images)], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] else float(total[0])

    def _gather(self, indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (indices, features), so that every rank's bank gets the same update."""
        if self.world.world_size == 1:
            return indices, features
        index_parts = [torch.empty_like(indices) for _ in range(self.world.world_size)]
        feature_parts = [torch.empty_like(features) for _ in range(self.world.world_size)]
        dist.all_gather(index_parts, indices)
        dist.all_gather(feature_parts, features)
        return torch.cat(index_parts), torch.cat(feature_parts)

    @torch.no_grad()
    def knn_monitor(self) -> float:
        """NPID's monitor: val images embedded by the model vote with the memory bank (k = 200, T = 0.07)."""
        assert self.val_split is not None
        self.model.eval()
        recipe = self.recipe
        crop = fit_to_patches(recipe.arch, recipe.eval_crop)  # a ViT's: whole patches, as in training
        interpolation = FAMILIES[arch_family(recipe.arch)].interpolation  # as the evaluators resize
        transform = EvalTransform(max(recipe.eval_resize, crop), crop, interpolation=interpolation)
        loader = DataLoader(ImageList(self.val_split.samples, transform), batch_size=256, collate_fn=collate)
        features, labels = [], []
        for batch in loader:
            if batch.errors:
                index, reason = batch.errors[0]
                raise BadInput(f"unreadable image {self.val_split.samples[index][0]}: {reason}")
            with autocast(self.device, self.recipe.amp):
                features.append(self.model(normalize_batch(batch.images.to(self.device), self.dtype)))
            labels.append(batch.labels)
        self.model.train()
        k = min(self.recipe.knn_k, len(self.train_split))
        result = weighted_knn(
            self.bank.bank,
            self.labels,
            torch.cat(features),
            torch.cat(labels),
            ks=(k,),
            temperature=self.recipe.temperature,
            num_classes=len(self.train_split.classes),
            device=self.device,
        )
        return round(result.top1[k], 3)


def _pool(split: DatasetSplit, per_class: int) -> DatasetSplit:
    """The first ``per_class`` images of every class (a small pool: many epochs per image)."""
    if not per_class:
        return split
    taken: dict[int, int] = {}
    keep = []
    for i, (_, label) in enumerate(split.samples):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return split.subset(keep, f"{split.split}-pool{per_class}")

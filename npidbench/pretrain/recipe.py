"""Pretraining recipes: TOML files in the top-level ``pretrain/`` folder, typed by ``Recipe``.

Precedence as for tasks: dataclass defaults < recipe TOML < ``--set key=value``. The defaults are
the paper's (Wu et al. 2018; PROTOCOLS.md "NPID pretraining").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from npidbench.config import build_config, check_choices, config_to_dict, parse_set_options, read_toml
from npidbench.errors import BadInput
from npidbench.paths import preset_dir
from npidbench.pretrain.archs import PRETRAIN_ARCHS
from npidbench.progress import log

DEFAULT_RECIPE = "npid_resnet18_synthetic"  # for the embedded synthetic data
PAPER_RECIPE = "npid_resnet50_8xb32-steplr-200e_in1k"  # for real data


@dataclass(frozen=True)
class Recipe:
    name: str = DEFAULT_RECIPE
    description: str = ""
    arch: str = "resnet18"  # a torchvision ResNet, vit_<size>_patch<p> or convnext_<size> (pretrain/archs.py)
    dataset: str = "imagenet"  # the embedded synthetic ImageNet layout unless --data-root is given
    train_split: str = "train"
    val_split: str = "val"  # queries of the kNN monitor
    pool_per_class: int = 0  # 0: every training image; n: the first n of each class (small pools)
    epochs: int = 200
    batch_size: int = 256  # global batch
    lr: float = 0.03  # at lr_batch images per step; scaled linearly with batch_size
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # lemniscate and mmselfsup decay every parameter (SGD over model.parameters()); false keeps
    # BatchNorm weights and biases out of the decay (a named departure, recorded with the run).
    norm_bias_decay: bool = True
    lr_schedule: Literal["step", "cosine"] = "step"  # step (the paper) or cosine
    lr_steps: tuple[int, ...] = (120, 160)
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    loss: Literal["nce", "softmax"] = "nce"  # nce (the paper, lemniscate) or softmax (mmselfsup)
    negatives: int = 4096  # K
    temperature: float = 0.07
    bank_momentum: float = 0.5
    bank_init: Literal["lemniscate", "mmselfsup"] = "lemniscate"
    feature_dim: int = 128
    input_size: int = 224
    crop_scale: tuple[float, ...] = (0.2, 1.0)
    color_jitter: float = 0.4
    grayscale: float = 0.2
    eval_resize: int = 256
    eval_crop: int = 224
    knn_k: int = 200  # NPID's monitor
    knn_every: int = 1  # epochs between kNN monitors (0: never)
    save_every_steps: int = 500  # resume points inside an epoch (0: epoch ends only)
    # Epoch ends save (resume.pth + last.pth) at most this often; 0: every epoch end. The last
    # epoch, a stop request and every save_every_steps-th step always save. A 5-second epoch of
    # the embedded pool otherwise rewrites 135 MB each time (40 GB over its 300 epochs).
    save_every_seconds: float = 60.0
    seed: int = 0
    sync_bn: bool = False  # SyncBatchNorm under torchrun on GPUs
    freeze_bn: bool = False  # BatchNorm in eval mode (statistics frozen)
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU
    workers: int = -1  # image decoding processes; -1: automatic

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in PRETRAIN_ARCHS:
            problems.append(f"arch {self.arch} is not supported; choose one of {', '.join(PRETRAIN_ARCHS)}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2 or self.lr_batch < 1:
            problems.append("batch_size must be at least 2 and lr_batch at least 1")
        if (
            not (math.isfinite(self.lr) and self.lr > 0)
            or not math.isfinite(self.weight_decay)
            or self.weight_decay < 0
        ):
            problems.append("lr must be a positive number and weight_decay a number >= 0")
        try:
            check_choices(self)  # loss, lr_schedule, bank_init
        except ValueError as exc:
            problems.append(str(exc))
        if self.negatives < 1 or self.feature_dim < 1 or self.knn_k < 1:
            problems.append("negatives, feature_dim and knn_k must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be a positive number, got {self.temperature}")
        if not 0 <= self.bank_momentum < 1:
            problems.append(f"bank_momentum must be in [0, 1), got {self.bank_momentum}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(
                f"crop_scale must be two numbers 0 < low <= high <= 1, got {list(self.crop_scale)}"
            )
        if min(self.input_size, self.eval_resize, self.eval_crop) < 8 or self.eval_crop > self.eval_resize:
            problems.append(
                "input_size, eval_resize and eval_crop must be >= 8 pixels, eval_crop <= eval_resize"
            )
        if not 0 <= self.grayscale <= 1 or self.color_jitter < 0:
            problems.append("grayscale must be a probability and color_jitter >= 0")
        if (
            self.pool_per_class < 0
            or self.save_every_steps < 0
            or not self.save_every_seconds >= 0
            or self.knn_every < 0
            or self.warmup_epochs < 0
        ):
            problems.append("pool_per_class, save_every_steps, save_every_seconds, knn_every and warmup_epochs must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def scaled_lr(self, global_batch: int) -> float:
        """The linear scaling rule: lr x global batch / lr_batch (recorded with the run)."""
        return self.lr * global_batch / self.lr_batch

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def differences(self, other: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if k not in ignore and mine[k] != theirs[k]
        ]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in preset_dir("pretrain").glob("*.toml"))


def default_recipe(data_root: Path | None) -> str:
    """The recipe used when none is named: the CPU-sized embedded one on the embedded data, the
    paper's on real data (the embedded recipe's 56 px, 32-image pool would silently undertrain a
    real ImageNet run)."""
    if data_root is None:
        return DEFAULT_RECIPE
    from npidbench.data import dataset_root

    _, synthetic = dataset_root(Recipe.dataset, Path(data_root))
    return DEFAULT_RECIPE if synthetic else PAPER_RECIPE


def load_recipe(name_or_path: str | None, set_options: list[str], data_root: Path | None = None) -> Recipe:
    """A recipe by shipped name or TOML path, with --set overrides applied; with no name, the
    default for the data at ``data_root`` (said on the console)."""
    name = name_or_path
    if name is None:
        name = default_recipe(data_root)
        where = "the embedded synthetic data" if name == DEFAULT_RECIPE else f"the real data in {data_root}"
        log(f"no recipe given: {name} for {where} (name one to choose: {', '.join(recipe_names())})")
    path = Path(name)
    if not (path.suffix == ".toml" and path.exists()):
        path = preset_dir("pretrain") / f"{name}.toml"
        if not path.exists():
            raise BadInput(
                f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())} or pass a .toml path"
            )
    data = {"name": path.stem, **read_toml(path)}
    recipe = build_config(Recipe, data, parse_set_options(set_options), source_names=[str(path), "--set"])
    written = data.get("arch", Recipe.arch)
    if recipe.arch != written:
        # e.g. npid_resnet18_synthetic+arch=vit_tiny_patch16: the name records and the report's
        # Config column show must not pass another network off as the recipe's own
        recipe = dataclasses.replace(recipe, name=f"{recipe.name}+arch={recipe.arch}")
    return recipe


# Settings added after files were written, with the value those files were made with: every
# run before norm_bias_decay existed kept BatchNorm weights and biases out of the decay.
_WRITTEN_BEFORE = {"norm_bias_decay": False}


def recipe_from_dict(data: dict[str, Any], set_options: list[str] | None = None) -> Recipe:
    """Rebuild a recorded recipe (resume files and checkpoints store it as plain data), with
    ``--set`` overrides applied."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    recorded = {**_WRITTEN_BEFORE, **{k: v for k, v in data.items() if k in known}}
    overrides = parse_set_options(set_options or [])
    return build_config(Recipe, recorded, overrides, source_names=["resume file", "--set"])


def resume_recipe(out_dir: Path, set_options: list[str]) -> Recipe:
    """``pretrain --out DIR --resume`` without a recipe: the one DIR's run was started with, read
    from ``last.pth``'s metadata (written every epoch; a fraction of ``resume.pth``, whose memory
    bank alone is 656 MB on ImageNet), or from ``resume.pth`` before the first epoch ended."""
    from npidbench.checkpoint.reading import read_checkpoint

    out_dir = Path(out_dir)
    if not (out_dir / "resume.pth").exists():
        raise BadInput(f"nothing to resume: {out_dir / 'resume.pth'} does not exist (start without --resume)")
    source = out_dir / "last.pth" if (out_dir / "last.pth").exists() else out_dir / "resume.pth"
    saved = read_checkpoint(source).obj
    settings = None
    if isinstance(saved, dict):
        meta = saved.get("meta")
        settings = meta.get("recipe_settings") if isinstance(meta, dict) else saved.get("recipe")
    if not isinstance(settings, dict):
        raise BadInput(f"{source} holds no npidbench recipe: name the recipe to resume with")
    recipe = recipe_from_dict(settings, set_options)
    log(f"resuming with the recipe the run in {out_dir} was started with: {recipe.name}")
    return recipe

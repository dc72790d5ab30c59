"""The pretraining entry point: writes ``OUT/last.pth`` in this project's checkpoint format.

``epochs = 0`` saves the seeded initial weights: the random-init baseline every comparison
needs, in exactly the format a trained checkpoint has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from npidbench.backbone import build_resnet
from npidbench.checkpoint.own import npidbench_checkpoint, save_npidbench_checkpoint
from npidbench.errors import BadInput
from npidbench.pretrain.recipe import Recipe


def pretrain(recipe: Recipe, out_dir: Path) -> Path:
    """Run ``recipe`` and return the path of the checkpoint to evaluate."""
    if recipe.epochs > 0:
        raise BadInput(
            "NPID training is not in this build yet; `--set epochs=0` writes the random-init "
            "baseline checkpoint"
        )
    torch.manual_seed(recipe.seed)
    model = build_resnet(recipe.arch)
    meta = {
        "recipe": recipe.name,
        "epochs": 0,
        "dataset": recipe.dataset,
        "seed": recipe.seed,
        "random_init": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_npidbench_checkpoint(out_dir / "last.pth", npidbench_checkpoint(model, recipe.arch, meta))

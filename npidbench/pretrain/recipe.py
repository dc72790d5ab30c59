"""Pretraining recipes: TOML files in the top-level ``pretrain/`` folder, typed by ``Recipe``.

Precedence as for tasks: dataclass defaults < recipe TOML < ``--set key=value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npidbench.checkpoint.arch import SUPPORTED_ARCHS
from npidbench.config import build_config, parse_set_options, read_toml
from npidbench.errors import BadInput
from npidbench.paths import preset_dir

DEFAULT_RECIPE = "npid_resnet18_synthetic"


@dataclass(frozen=True)
class Recipe:
    name: str = DEFAULT_RECIPE
    description: str = ""
    arch: str = "resnet18"
    dataset: str = "imagenet"  # embedded synthetic ImageNet layout unless --data-root is given
    epochs: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"arch {self.arch} is not supported; choose one of {', '.join(SUPPORTED_ARCHS)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in preset_dir("pretrain").glob("*.toml"))


def load_recipe(name_or_path: str | None, set_options: list[str]) -> Recipe:
    """A recipe by shipped name or TOML path, with --set overrides applied."""
    name = name_or_path or DEFAULT_RECIPE
    path = Path(name)
    if not (path.suffix == ".toml" and path.exists()):
        path = preset_dir("pretrain") / f"{name}.toml"
        if not path.exists():
            raise BadInput(
                f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())} or pass a .toml path"
            )
    data = {"name": path.stem, **read_toml(path)}
    return build_config(Recipe, data, parse_set_options(set_options), source_names=[str(path), "--set"])

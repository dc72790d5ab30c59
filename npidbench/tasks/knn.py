"""kNN: NPID's weighted k-nearest-neighbour classifier on frozen AvgPool features.

Protocol (PROTOCOLS.md "kNN"; lemniscate, mmselfsup): L2-normalised global-average-pooled
features of the training split (evaluation transform) are the memory; each validation image
votes with its k most cosine-similar training images, weighted exp(s / T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from npidbench.cache import CachedFeatures
from npidbench.config import check_choices
from npidbench.data import load_split
from npidbench.data.images import EvalTransform
from npidbench.errors import BadInput
from npidbench.solvers.knn import weighted_knn
from npidbench.tables import TableSpec, npid_reference
from npidbench.tasks.base import RunContext, TaskFamily, TaskOutput, split_record


@dataclass(frozen=True)
class Config:
    ks: tuple[int, ...] = (10, 20, 100, 200)  # mmselfsup; lemniscate reports k = 200
    temperature: float = 0.07  # NPID, Wu et al. 2018
    # The protocol's global feature: AvgPool of a ResNet, the CLS token after the final norm of
    # a ViT (DINO eval_knn.py), i.e. the backbone's default layer (recorded when it is not AvgPool).
    layer: Literal["AvgPool"] = "AvgPool"
    train_split: str = "train"
    test_split: str = "val"
    resize: int = 256  # evaluation transform: short side 256, center crop 224
    crop: int = 224

    def __post_init__(self) -> None:
        check_choices(self)  # the Literal fields, also when built in Python
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {list(self.ks)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.resize < 1 or self.crop < 1:
            raise ValueError(f"resize and crop must be at least 1 pixel, got {self.resize} and {self.crop}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) cannot exceed resize ({self.resize})")


def run(ctx: RunContext, config: Config) -> TaskOutput:
    dataset = ctx.preset.dataset
    train = load_split(dataset, config.train_split, ctx.data_root)
    test = load_split(dataset, config.test_split, ctx.data_root)
    if max(config.ks) > len(train):
        raise BadInput(
            f"k={max(config.ks)} needs at least that many training images; {train.display_name} "
            f"{config.train_split} has {len(train)}: lower it with --set ks=..."
        )
    if test.classes != train.classes:
        raise BadInput(
            f"{test.root / test.split} and {train.root / train.split} have different class folders"
        )
    backbone = ctx.model.backbone
    transform = EvalTransform(config.resize, config.crop, "center-crop", backbone.interpolation)
    layer = backbone.default_layer
    train_feats = ctx.features(train, transform, (layer,))[layer]
    test_feats = ctx.features(test, transform, (layer,))[layer]
    train_x, train_y = _readable(train_feats)
    test_x, test_y = _readable(test_feats)
    result = weighted_knn(
        train_x,
        train_y,
        test_x,
        test_y,
        ks=config.ks,
        temperature=config.temperature,
        num_classes=len(train.classes),
        device=ctx.extract.device,
    )
    return TaskOutput(
        metrics={
            "top1": {str(k): v for k, v in result.top1.items()},
            "top5": {str(k): v for k, v in result.top5.items()},
        },
        dataset=split_record(
            dataset, train, test, skipped=[s["path"] for s in train_feats.skipped + test_feats.skipped]
        ),
        protocol="npid-knn",
        details=_layer_details(ctx, layer, config),
    )


def _readable(entry: CachedFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels without the rows of images skipped with --skip-corrupt."""
    if not entry.skipped:
        return entry.features, entry.labels
    keep = entry.valid
    return np.asarray(entry.features)[keep], np.asarray(entry.labels)[keep]


KNN_COLUMNS = ("k=10", "k=20", "k=100", "k=200")


def _table_values(record: dict[str, Any]) -> dict[str, float | None]:
    top1 = record["metrics"].get("top1", {})
    return {column: top1.get(column[2:]) for column in KNN_COLUMNS}


def _k20(model: str, source: str, top1: float) -> dict[str, Any]:
    return {"Model": model, "Config": source, **dict.fromkeys(KNN_COLUMNS), "k=20": top1}


# PROTOCOLS-ARCH.md section 4: the same weighted vote (T = 0.07) on the CLS token, reported at
# k = 20 (DINO's and iBOT's README; DINOv2's README does not name its k: shown in the same column).
_OTHER_REFERENCES = [
    *(
        _k20(f"DINO {model}", "dino README (eval_knn, k=20)", top1)
        for model, top1 in (
            ("ViT-S/16", 74.5),
            ("ViT-S/8", 78.3),
            ("ViT-B/16", 76.1),
            ("ViT-B/8", 77.4),
            ("ResNet-50", 67.5),
        )
    ),
    *(
        _k20(f"DINOv2 ViT-{size}/14", "dinov2 README (eval/knn; k not stated)", top1)
        for size, top1 in (("S", 79.0), ("B", 82.1), ("L", 83.5), ("g", 83.5))
    ),
    *(
        _k20(f"DINOv2 ViT-{size}/14 reg4", "dinov2 README (eval/knn; k not stated)", top1)
        for size, top1 in (("S", 79.1), ("B", 82.0), ("L", 83.8), ("g", 83.7))
    ),
    _k20("iBOT ViT-S/16", "ibot README (DINO's eval_knn)", 75.2),
    _k20("iBOT ViT-B/16", "ibot README (DINO's eval_knn)", 77.1),
]

TABLE = TableSpec(
    key="knn",
    title="kNN",
    columns=KNN_COLUMNS,
    values=_table_values,
    default_protocol="npid-knn",
    references={"imagenet": [npid_reference(KNN_COLUMNS, (42.9, 44.0, 43.2, 42.2)), *_OTHER_REFERENCES]},
)
FAMILY = TaskFamily(
    name="knn",
    description="Weighted kNN (NPID) on L2-normalised AvgPool features; top-1/top-5 per k",
    config=Config,
    run=run,
    tables=(TABLE,),
    datasets=("imagenet", "places205", "inat18"),
)


def _layer_details(ctx: RunContext, layer: str, config: Config) -> dict[str, str]:
    """A ResNet record says nothing more; another backbone's names the feature it used and its
    resize (DINO / DINOv2 / ConvNeXt: bicubic, PROTOCOLS-ARCH.md section 2)."""
    backbone = ctx.model.backbone
    if backbone.family == "resnet":
        return {} if layer == config.layer else {"layer": layer}
    return {
        "layer": layer,
        "interpolation": backbone.interpolation,
        "protocol_note": f"NPID's kNN (as DINO's: T = 0.07, weighted votes) on the {backbone.family}'s "
        f"{layer}, resized {backbone.interpolation} as its framework evaluates",
    }

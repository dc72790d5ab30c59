"""Semi-supervised ImageNet by logistic regression on frozen features (``semisup``'s
``method=logreg``): iBOT's protocol (evaluation/eval_logistic_regression.py, PROTOCOLS-ARCH.md
section 2 "Semi-supervised"), which runs on every backbone.

Features: the class tokens of the last n blocks (``avgpool=cls``), or with the mean patch token
(``both``), from images resized 256 bicubic + center crop 224, L2-normalised
(a ResNet or ConvNeXt: its global feature). A multinomial logistic regression with an L2 penalty
and no intercept is fitted on the labelled 1% / 10% for each lambda in {0.01, 0.1, 1}; iBOT
prints the val accuracy of each, so the best on val is reported (test-selected, as the
fine-tuning grid; ``selection=heldout`` chooses on held-out labelled images and refits).

iBOT fits with cyanure (objective: mean loss + lambda / 2 ||W||^2); scikit-learn's
LogisticRegression minimises C * summed loss + 1 / 2 ||W||^2, the same optimum for
C = 1 / (n * lambda). Its L-BFGS solver replaces cyanure's catalyst-miso: same problem, its own
stopping rule (tol), so the optimum is matched to the solvers' tolerances, not bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from npidbench.backbones import Backbone
from npidbench.data.images import EvalTransform
from npidbench.data.splits import DatasetSplit
from npidbench.errors import BadInput
from npidbench.progress import log
from npidbench.solvers.linear import topk_correct
from npidbench.tasks.base import RunContext

if TYPE_CHECKING:
    from npidbench.tasks.semisup import Config

PROTOCOL = "semisup-logreg"


def feature_layers(backbone: Backbone, config: Config) -> tuple[str, ...]:
    """iBOT's ``n_last_blocks`` x ``avgpool_patchtokens`` (0: cls, 2: both) input."""
    if backbone.family != "vit":
        return (backbone.default_layer,)
    layers = backbone.linear_input(config.last_blocks, config.avgpool == "both")
    if layers is None:
        raise BadInput(
            f"last_blocks={config.last_blocks}: {backbone.arch} has {len(backbone.model.blocks)} blocks"
        )
    return layers


def lambda_name(lambd: float) -> str:
    return f"logreg-lambda{lambd:g}"


def normalised_features(
    ctx: RunContext, split: DatasetSplit, transform: EvalTransform, layers: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised concatenated features, labels) of the readable images (cached)."""
    entries = ctx.features(split, transform, layers)
    first = entries[layers[0]]
    keep = first.valid if first.skipped else slice(None)
    x = np.concatenate([np.asarray(entries[n].features, dtype=np.float32)[keep] for n in layers], axis=1)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # torch's F.normalize eps
    return x, np.asarray(first.labels)[keep].astype(np.int64)


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, lambd: float, max_iter: int) -> Any:
    """cyanure's multiclass-logistic, L2, no intercept (iBOT) as scikit-learn states it:
    mean loss + lambda / 2 ||W||^2 is C * summed loss + 1 / 2 ||W||^2 with C = 1 / (n lambda)."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=1.0 / (len(y) * lambd), fit_intercept=False, max_iter=max_iter)
    return classifier.fit(x, y)


def fit_and_score(
    train: tuple[np.ndarray, np.ndarray], judge: tuple[np.ndarray, np.ndarray], lambd: float, max_iter: int
) -> dict[str, float]:
    """Top-1 / top-5 (%) on ``judge`` of the logistic regression fitted on ``train``."""
    classifier = fit_logistic_regression(*train, lambd, max_iter)
    scores = torch.from_numpy(classifier.decision_function(judge[0]).astype(np.float64))
    if scores.ndim == 1:  # two classes: one margin
        scores = torch.stack([-scores, scores], dim=1)
    # columns follow classifier.classes_ (the labels seen in training): map back to labels
    known = torch.from_numpy(classifier.classes_.astype(np.int64))
    labels = torch.from_numpy(judge[1])
    position = {int(c): i for i, c in enumerate(known)}
    targets = torch.tensor([position.get(int(label), -1) for label in labels])
    hits = topk_correct(scores, targets, (1, 5))
    return {k: round(100 * hits[n] / len(labels), 3) for k, n in (("top1", 1), ("top5", 5))}


def select(
    ctx: RunContext, config: Config, labelled: DatasetSplit, test: DatasetSplit
) -> tuple[dict[str, dict[str, float]], str, dict[str, float], tuple[str, ...]]:
    """(every lambda's scores, the chosen one, its val scores, the layers read)."""
    from npidbench.tasks.semisup import choose_point, held_out

    backbone = ctx.model.backbone
    layers = feature_layers(backbone, config)
    transform = EvalTransform(config.resize, config.crop, "center-crop", "bicubic")  # iBOT: interpolation=3
    train_xy = normalised_features(ctx, labelled, transform, layers)
    test_xy = normalised_features(ctx, test, transform, layers)
    if config.selection == "test":
        scores = {
            lambda_name(lam): fit_and_score(train_xy, test_xy, lam, config.logreg_max_iter)
            for lam in config.lambdas
        }
        chosen = choose_point({name: s["top1"] for name, s in scores.items()})
        return scores, chosen, scores[chosen], layers
    fit_rows, held_rows = held_out(labelled, config.heldout_fraction, config.seed)
    fit_xy = normalised_features(ctx, labelled.subset(fit_rows, f"{labelled.split}-fit"), transform, layers)
    held = labelled.subset(held_rows, f"{labelled.split}-heldout")
    held_xy = normalised_features(ctx, held, transform, layers)
    scores = {
        lambda_name(lam): fit_and_score(fit_xy, held_xy, lam, config.logreg_max_iter)
        for lam in config.lambdas
    }
    chosen = choose_point({name: s["top1"] for name, s in scores.items()})
    lambd = {lambda_name(lam): lam for lam in config.lambdas}[chosen]
    log(f"semisup: {chosen} is best on the held-out images; refitting it on all {len(labelled)}")
    return scores, chosen, fit_and_score(train_xy, test_xy, lambd, config.logreg_max_iter), layers


def details(layers: tuple[str, ...]) -> dict[str, Any]:
    return {
        "layers": list(layers),
        "interpolation": "bicubic",
        "protocol_note": "iBOT eval_logistic_regression.py: L2-normalised frozen features, multinomial "
        "logistic regression (L2, no intercept) per lambda; scikit-learn L-BFGS with C = 1 / (n lambda)",
    }

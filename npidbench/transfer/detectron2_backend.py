"""The detectron2 backend of the detection presets (``--set backend=detectron2``): MoCo's C4
configs (and detectron2's Mask R-CNN FPN with SyncBN everywhere for ``head=fpn``), run by
detectron2 itself, used only where ``import detectron2`` works.

detectron2 is not installable from the package registry, so everything that can be checked
without it lives in pure functions: the config (``config_pairs``, detectron2 KEY VALUE pairs as
MoCo's yaml files set them) and the weight conversion (``npidbench convert --to detectron2``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from npidbench.errors import BadInput

INSTALL_HINT = (
    "detectron2 is not installed (it has no wheels on the package registry): build it from source with "
    "pip install 'git+https://github.com/facebookresearch/detectron2.git' (needs a C++ compiler and the "
    "CUDA toolkit of your torch), or leave out backend=detectron2 to use the built-in torchvision backend"
)

# torchvision's RGB mean / std in 0-255 units (MoCo's configs feed RGB with these).
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def require_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise BadInput(f"--set backend=detectron2: {INSTALL_HINT}") from exc


def config_pairs(
    config: Any,
    head: str,
    depth: int,
    classes: int,
    weights: Path,
    train: tuple[str, ...],
    test: tuple[str, ...],
    output: Path,
) -> list[str]:
    """detectron2 config overrides (``cfg.merge_from_list``) for a detection Config."""
    if depth < 50:
        raise BadInput(
            f"backend=detectron2 builds Bottleneck ResNets (depth 50 and up); this checkpoint is a ResNet-{depth}: "
            "use the default torchvision backend"
        )
    pairs: dict[str, Any] = {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.WEIGHTS": str(weights),
        "MODEL.PIXEL_MEAN": PIXEL_MEAN,
        "MODEL.PIXEL_STD": PIXEL_STD,
        "INPUT.FORMAT": "RGB",
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision's v1.5 stride placement
        "MODEL.RESNETS.NORM": "SyncBN",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.ROI_HEADS.NUM_CLASSES": classes,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": config.roi_batch,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": config.proposals_train,
        "MODEL.RPN.POST_NMS_TOPK_TEST": config.proposals_test,
        "INPUT.MIN_SIZE_TRAIN": tuple(config.min_sizes),
        "INPUT.MIN_SIZE_TEST": config.test_size,
        "INPUT.MAX_SIZE_TRAIN": config.max_size,
        "INPUT.MAX_SIZE_TEST": config.max_size,
        "DATASETS.TRAIN": train,
        "DATASETS.TEST": test,
        "SOLVER.IMS_PER_BATCH": config.batch_size,
        "SOLVER.BASE_LR": config.scaled_lr,
        "SOLVER.MOMENTUM": config.momentum,
        "SOLVER.WEIGHT_DECAY": config.weight_decay,
        "SOLVER.WEIGHT_DECAY_NORM": config.norm_weight_decay,  # detectron2's default 0.0 (MoCo)
        "SOLVER.MAX_ITER": config.iterations,
        "SOLVER.STEPS": tuple(config.milestones),
        "SOLVER.GAMMA": config.gamma,
        "SOLVER.WARMUP_ITERS": config.warmup,
        "SOLVER.WARMUP_FACTOR": config.warmup_factor,
        "SOLVER.CHECKPOINT_PERIOD": config.window,
        "TEST.PRECISE_BN.ENABLED": config.precise_bn > 0,
        "TEST.PRECISE_BN.NUM_ITER": max(config.precise_bn, 1),
        "SEED": config.seed,
        "OUTPUT_DIR": str(output),
    }
    if head == "c4":
        pairs.update(
            {
                "MODEL.BACKBONE.NAME": "build_resnet_backbone",
                "MODEL.RESNETS.OUT_FEATURES": ["res4"],
                "MODEL.RPN.IN_FEATURES": ["res4"],
                "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
                "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",  # MoCo: an extra BN after res5
                "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
                "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": config.roi_resolution,
                "MODEL.MASK_ON": False,
            }
        )
    else:
        pairs.update(
            {
                "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
                "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
                "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
                "MODEL.FPN.NORM": "SyncBN",
                "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
                "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
                "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
                "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
                "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
                "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
                "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
                "MODEL.ROI_BOX_HEAD.NUM_FC": 1,
                "MODEL.ROI_BOX_HEAD.NORM": "SyncBN",
                "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
                "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
                "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
                "MODEL.ROI_MASK_HEAD.NORM": "SyncBN",
                "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
                "MODEL.MASK_ON": True,
            }
        )
    out = []
    for key, value in pairs.items():
        out += [key, value]
    return out


def run_detectron2(
    config: Any,
    head: str,
    depth: int,
    weights: Path,
    dataset: str,
    data: dict[str, Any],
    output: Path,
    classes: list[str],
) -> dict[str, float]:
    """Train and test with detectron2 (its own periodic checkpoints make the run resumable).

    ``data``: for VOC, {"train": [(name, VOC year dir, split, year)], "test": [...]}; for COCO,
    {"train": [(name, json, image dir)], "test": [...]}. Returns the table's metrics.
    """
    require_detectron2()
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.pascal_voc import register_pascal_voc
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.utils import comm

    _register_extra_norm_head()
    names: dict[str, list[str]] = {"train": [], "test": []}
    for part, entries in data.items():
        for entry in entries:
            name = entry[0]
            names[part].append(name)
            if name in DatasetCatalog.list():
                continue
            if dataset == "coco":
                register_coco_instances(name, {}, str(entry[1]), str(entry[2]))
            else:
                register_pascal_voc(name, str(entry[1]), entry[2], int(entry[3]), class_names=classes)
    cfg = get_cfg()
    cfg.merge_from_list(
        config_pairs(
            config, head, depth, len(classes), weights, tuple(names["train"]), tuple(names["test"]), output
        )
    )
    cfg.freeze()
    if (
        comm.get_world_size() > 1
        and "LOCAL_WORLD_SIZE" in os.environ
        and hasattr(comm, "create_local_process_group")
    ):
        comm.create_local_process_group(int(os.environ["LOCAL_WORLD_SIZE"]))  # under torchrun

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):  # noqa: ANN001
            if dataset == "coco":
                return COCOEvaluator(dataset_name, output_dir=str(output / "eval"))
            return PascalVOCDetectionEvaluator(dataset_name)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)
    results = results.get(names["test"][0], results)
    if dataset == "coco":
        metrics = {f"{k}(Box)": float(results["bbox"][k]) for k in ("AP", "AP50", "AP75")}
        if "segm" in results:
            metrics.update({f"{k}(Mask)": float(results["segm"][k]) for k in ("AP", "AP50", "AP75")})
        return metrics
    box = results["bbox"]
    return {"mAP": float(box["AP"]), "AP50": float(box["AP50"]), "AP75": float(box["AP75"])}


def _register_extra_norm_head() -> None:
    """MoCo's Res5ROIHeadsExtraNorm: detectron2's Res5ROIHeads with a norm layer after res5."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        @classmethod
        def _build_res5_block(cls, cfg):  # noqa: ANN001, ANN206 - a classmethod in detectron2 >= 0.4
            block, channels = super()._build_res5_block(cfg)
            block.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return block, channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)

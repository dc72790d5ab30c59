"""The detectron2 backend of the detection presets (``--set backend=detectron2``): MoCo's C4
configs (and detectron2's Mask R-CNN FPN with SyncBN everywhere for ``head=fpn``), trained and
tested by detectron2's own DefaultTrainer and evaluators, used only where ``import detectron2``
works (CI installs the project's CPU wheel; tests/transfer/test_detectron2_backend.py runs it).

What npidbench adds around detectron2's trainer: the splits registered under names unique to
their files (the test split cut to ``test_images``), the converted backbone checked tensor for
tensor in the built model (detectron2's checkpointer loads by heuristics and only logs misses),
and an exact resume: the global RNG saved in detectron2's checkpoints and the data stream
fast-forwarded past the iterations already trained (detectron2 alone restarts both).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from npidbench.atomic import atomic_write_text
from npidbench.data.splits import DetectionSplit
from npidbench.errors import BadInput

INSTALL_HINT = (
    "detectron2 is not installed (it has no wheels on the package registry): build it from source with "
    "pip install 'git+https://github.com/facebookresearch/detectron2.git' --no-build-isolation, or "
    "pip install --no-build-isolation 'npidbench[detectron2]' for the commit this release is tested with "
    "(torch first; needs a C++ compiler, and for GPUs the CUDA toolkit of your torch), or leave out "
    "backend=detectron2 to use the built-in torchvision backend"
)

# torchvision's RGB mean / std in 0-255 units (MoCo's configs feed RGB with these).
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def require_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise BadInput(f"--set backend=detectron2: {INSTALL_HINT}") from exc


def _name(kind: str, source: Path, suffix: str) -> str:
    """A DatasetCatalog name unique to the files it reads (the catalog is process-wide, and one
    process may run on several data roots)."""
    digest = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:10]
    return f"npidbench_{kind}_{suffix}_{digest}"


def coco_entry(split: DetectionSplit, subset_folder: Path | None = None) -> tuple[str, Path, Path]:
    """register_coco_instances' arguments for ``split``: name, instances json, image folder. With
    ``subset_folder``, a split cut to its first images (``test_images=N``) is written there as its
    own instances json (the other images and their annotations left out) and registered so."""
    annotations = split.root / "annotations" / f"instances_{split.split}.json"
    images = split.root / split.split
    if subset_folder is None:
        return _name("coco", annotations, split.split), annotations, images
    everything = json.loads(annotations.read_text())
    if len(split.images) == len(everything["images"]):
        return _name("coco", annotations, split.split), annotations, images
    kept = {image.image_id for image in split.images}
    subset = {
        **everything,
        "images": [entry for entry in everything["images"] if entry["id"] in kept],
        "annotations": [entry for entry in everything["annotations"] if entry["image_id"] in kept],
    }
    path = atomic_write_text(
        subset_folder / f"instances_{split.split}_first{len(kept)}.json", json.dumps(subset)
    )
    return _name("coco", path, f"{split.split}_first{len(kept)}"), path, images


def voc_entry(
    year_dir: Path,
    split_name: str,
    year: str,
    split: DetectionSplit | None = None,
    subset_folder: Path | None = None,
) -> tuple[str, Path, str, str]:
    """register_pascal_voc's arguments: name, VOC year folder, split, year. With ``split`` cut to
    its first images (``test_images=N``), a VOC folder in ``subset_folder`` whose Annotations /
    JPEGImages link to the real ones and whose ImageSets list those images only: the evaluator
    (voc_eval) reads the image list to count the ground truth."""
    listed = year_dir / "ImageSets" / "Main" / f"{split_name}.txt"
    if split is None or subset_folder is None or len(split.images) == len(listed.read_text().split()):
        return _name(f"voc{year}", year_dir, split_name), year_dir, split_name, year
    shadow = subset_folder / f"VOC{year}_{split_name}_first{len(split.images)}"
    (shadow / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for part in ("Annotations", "JPEGImages"):
        if not (shadow / part).exists():
            (shadow / part).symlink_to((year_dir / part).resolve(), target_is_directory=True)
    ids = "".join(f"{Path(image.path).stem}\n" for image in split.images)
    atomic_write_text(shadow / "ImageSets" / "Main" / f"{split_name}.txt", ids)
    return _name(f"voc{year}", shadow, f"{split_name}_first{len(split.images)}"), shadow, split_name, year


def config_pairs(
    config: Any,
    head: str,
    depth: int,
    classes: int,
    weights: Path,
    train: tuple[str, ...],
    test: tuple[str, ...],
    output: Path,
    device: str = "cuda",
    workers: int = 4,
) -> list[str]:
    """detectron2 config overrides (``cfg.merge_from_list``) for a detection Config, trained on
    ``device`` ("cuda" or "cpu") with ``workers`` decoding processes (the CLI's --workers)."""
    if depth < 50 and head == "c4":
        # detectron2's Res5ROIHeads builds its res5 of BottleneckBlocks (roi_heads.py
        # _build_res5_block); its FPN backbone builds R18 / R34 of BasicBlocks (resnet.py).
        raise BadInput(
            f"backend=detectron2 builds the C4 head's res5 of Bottleneck blocks (ResNet-50 and up); this "
            f"checkpoint is a ResNet-{depth}: use the default torchvision backend, or head=fpn"
        )
    # SyncBN as the protocols have it; on CPUs (gloo) detectron2's all-reduce version of it, since
    # torch's SyncBatchNorm has no CPU kernel (one process: both are plain BatchNorm).
    norm = "SyncBN" if device == "cuda" else "naiveSyncBN"
    pairs: dict[str, Any] = {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.DEVICE": device,
        "DATALOADER.NUM_WORKERS": workers,
        "MODEL.WEIGHTS": str(weights),
        "MODEL.PIXEL_MEAN": PIXEL_MEAN,
        "MODEL.PIXEL_STD": PIXEL_STD,
        "INPUT.FORMAT": "RGB",
        "MODEL.RESNETS.DEPTH": depth,
        # R18 / R34: BasicBlocks whose res2 has 64 channels (detectron2 asserts it); 256 otherwise
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision's v1.5 stride placement
        "MODEL.RESNETS.NORM": norm,
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
                "MODEL.FPN.NORM": norm,
                "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
                "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
                "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
                "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
                "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
                "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
                "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
                "MODEL.ROI_BOX_HEAD.NUM_FC": 1,
                "MODEL.ROI_BOX_HEAD.NORM": norm,
                "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
                "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
                "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
                "MODEL.ROI_MASK_HEAD.NORM": norm,
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
    device: str = "cuda",
    workers: int = 4,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Train and test with detectron2 (its own periodic checkpoints make the run resumable).

    ``data``: for VOC, {"train": [(name, VOC year dir, split, year)], "test": [...]}; for COCO,
    {"train": [(name, json, image dir)], "test": [...]}. Returns the table's metrics and the
    training's history (iterations run in this process, seconds per iteration, last loss).
    """
    require_detectron2()
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.pascal_voc import register_pascal_voc
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

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
            config,
            head,
            depth,
            len(classes),
            weights,
            tuple(names["train"]),
            tuple(names["test"]),
            output,
            device,
            workers,
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

    seed_all_rng(cfg.SEED + comm.get_rank())  # what detectron2's default_setup does with SEED
    trainer = Trainer(cfg)
    trainer.register_hooks([_rng_hook()])
    # The data stream starts here in every run, before a resume restores the RNG: the workers'
    # seeds come from torch's global RNG when the iterator starts (torch DataLoader).
    batches = trainer._trainer._data_loader_iter  # noqa: SLF001 - SimpleTrainer's lazy iterator
    trainer.resume_or_load(resume=True)
    if trainer.start_iter == 0:  # a fresh run: the converted weights, not a resumed state
        check_backbone_loaded(trainer.model, weights)
    for _ in range(trainer.start_iter):  # a resumed run: the batches the saved iterations saw
        next(batches)
    start = time.perf_counter()
    trainer.train()
    history = _training_history(
        trainer.storage, cfg.SOLVER.MAX_ITER - trainer.start_iter, time.perf_counter() - start
    )
    results = Trainer.test(cfg, trainer.model)
    results = results.get(names["test"][0], results)
    if dataset == "coco":
        metrics = {f"{k}(Box)": float(results["bbox"][k]) for k in ("AP", "AP50", "AP75")}
        if "segm" in results:
            metrics.update({f"{k}(Mask)": float(results["segm"][k]) for k in ("AP", "AP50", "AP75")})
        return metrics, history
    box = results["bbox"]
    return {"mAP": float(box["AP"]), "AP50": float(box["AP50"]), "AP75": float(box["AP75"])}, history


def _rng_hook() -> Any:
    """A detectron2 hook whose state is torch's and Python's global RNG: detectron2's trainer saves
    every hook's state_dict in its checkpoints and loads it on resume, so a resumed run draws the
    RPN's and the box head's samples as the uninterrupted one (detectron2 alone restarts them)."""
    import random

    import torch
    from detectron2.engine import HookBase

    class GlobalRngState(HookBase):
        def state_dict(self) -> dict[str, Any]:
            state = {"torch": torch.get_rng_state(), "python": random.getstate()}
            if torch.cuda.is_available():
                state["cuda"] = torch.cuda.get_rng_state_all()
            return state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])

    return GlobalRngState()


def _training_history(storage: Any, iterations: int, seconds: float) -> list[dict[str, float]]:
    """The records' history of a detectron2 trial: the iterations this process ran, their wall
    time with the hooks (checkpoints, precise BN), detectron2's own seconds per iteration where its
    IterationTimer logged one (it skips the first 3), the last loss. None when nothing was left."""
    if iterations <= 0:
        return []
    histories = storage.histories()
    entry = {"iterations": iterations, "train_seconds": round(seconds, 2)}
    if "time" in histories:
        entry["seconds_per_iteration"] = round(histories["time"].global_avg(), 4)
    if "total_loss" in histories:
        entry["loss"] = round(histories["total_loss"].latest(), 5)
    return [entry]


def check_backbone_loaded(model: Any, weights: Path) -> None:
    """Every tensor of the converted backbone is in the built model, equal, and every backbone
    tensor of the model came from it. detectron2's checkpointer loads by matching heuristics and
    only logs what it could not match: a silent random layer is what this refuses. C4 keeps res5
    in its box head (``roi_heads.res5``)."""
    import pickle

    import torch

    def tensors(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    with open(weights, "rb") as handle:
        converted = tensors(pickle.load(handle)["model"])
    model = getattr(model, "module", model)  # DistributedDataParallel
    built = tensors(getattr(model.backbone, "bottom_up", model.backbone).state_dict())
    res5 = getattr(model.roi_heads, "res5", None)
    if res5 is not None:  # but MoCo's extra norm after res5 (Res5ROIHeadsExtraNorm): new
        built.update(
            {f"res5.{k}": v for k, v in tensors(res5.state_dict()).items() if not k.startswith("norm.")}
        )
    missing = sorted(set(built) - set(converted))
    unused = sorted(set(converted) - set(built))
    differing = sorted(
        k
        for k in set(built) & set(converted)
        if not torch.equal(built[k].cpu(), torch.as_tensor(converted[k]))
    )
    if missing or unused or differing:
        raise BadInput(
            "detectron2 did not load the checkpoint's backbone as converted "
            f"(not in the checkpoint: {missing[:3]}, not in detectron2's model: {unused[:3]}, "
            f"loaded differently: {differing[:3]}); use backend=torchvision"
        )


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

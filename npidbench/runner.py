"""Run one preset end to end: config, checkpoint, task, record. Usable without the CLI::

from npidbench.runner import RunRequest, run_task
record_path = run_task(RunRequest(task="knn", checkpoint="ckpt.pth"))
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from npidbench.backbones.vit import whole_patches
from npidbench.cache import FeatureCache
from npidbench.checkpoint import LoadedBackbone, load_backbone
from npidbench.config import build_config, config_to_dict, parse_set_options
from npidbench.data import reads_synthetic_data
from npidbench.distributed import check_shared_folder, distributed
from npidbench.errors import BadInput
from npidbench.features import ExtractOptions, ExtractStats
from npidbench.paths import feature_cache_dir, results_dir
from npidbench.precision import FP32
from npidbench.progress import log
from npidbench.results import ResultStore, check_results_folder, new_record
from npidbench.tasks import family_of, get_preset
from npidbench.tasks.base import Preset, RunContext, TaskOutput


@dataclass
class RunRequest:
    """Everything ``npidbench run`` accepts."""

    task: str
    checkpoint: str | Path | None = None
    features_dir: str | Path | None = None
    data_root: str | Path | None = None
    set_options: list[str] = field(default_factory=list)
    name: str | None = None
    results: str | Path | None = None
    device: str = "cpu"
    workers: int | None = None
    eval_batch_size: int | None = None  # images per forward pass (not the training batch: --set batch_size)
    cache: str | Path | None = None
    arch: str | None = None
    branch: str | None = None
    trust_pickle: bool = False
    skip_corrupt: bool = False  # explicit opt-in: unreadable images are left out and listed
    cache_dtype: str = "float32"  # feature-cache storage: float16 halves its bytes
    batch_size: int | None = None  # the old name of eval_batch_size (deprecated)

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            warnings.warn(
                "RunRequest(batch_size=...) is now eval_batch_size", DeprecationWarning, stacklevel=3
            )
            if self.eval_batch_size is None:
                self.eval_batch_size = self.batch_size
            self.batch_size = None


def default_workers(device: str = "cpu") -> int:
    """Image-decoding worker processes when --workers is not given.

    On a GPU the CPU cores are free for decoding. On a CPU they run the forward pass too: a
    worker process steals a core from torch's OpenMP threads, which then wait on each other at
    every barrier. Measured on 2 cores (ResNet-50, 500x375 JPEGs, benchmarks/
    extraction_throughput.py): in-process decoding ran at 0.94-1.02x the bare forward, one
    worker at 0.81-0.97x. So small CPUs decode in-process, larger ones use a few workers.
    """
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(8, cores - 1))
    return 0 if cores <= 4 else max(1, cores // 8)


def resolve_config(
    preset: Preset, synthetic: bool, set_options: list[str], protocol: Mapping[str, Any] | None = None
) -> Any:
    """Dataclass defaults < preset TOML < synthetic profile (+ its [synthetic_protocol.VALUE] for
    the protocol chosen) < --set (typed; unknown keys refused). ``protocol``: protocol-key
    values given as if by --set (the standard a run's variant is measured against)."""
    family = family_of(preset)
    overrides = {**(protocol or {}), **parse_set_options(set_options)}
    layers: list[Mapping[str, Any]] = [preset.config]
    names = [str(preset.path)]
    if synthetic:
        layers.append(preset.synthetic)
        names.append(f"{preset.path} [synthetic]")
        chosen = build_config(family.config, *layers, overrides, source_names=[*names, "--set"])
        for value in _chosen_protocols(preset, chosen):
            layers.append(preset.synthetic_protocol[value])
            names.append(f"{preset.path} [synthetic_protocol.{value}]")
    layers.append(overrides)
    names.append("--set")
    return build_config(family.config, *layers, source_names=names)


def _chosen_protocols(preset: Preset, config: Any) -> list[str]:
    """The [synthetic_protocol.VALUE] tables that ``config``'s protocol keys select."""
    values = (str(getattr(config, key)) for key in family_of(preset).protocol_keys)
    return [value for value in values if value in preset.synthetic_protocol]


def synthetic_profile(preset: Preset, config: Any) -> dict[str, Any]:
    """The synthetic settings a run of ``config`` applied (the record's "profile")."""
    profile = dict(preset.synthetic)
    for value in _chosen_protocols(preset, config):
        profile.update(preset.synthetic_protocol[value])
    return profile


# The image-size settings of the families (center crop; the SVM's squashed size).
_INPUT_SIZE_FIELDS = ("crop", "size", "image_size")


def fit_config_to_patches(config: Any, patch: int, synthetic: bool) -> Any:
    """``config`` with its input sizes fitted to a ViT's ``patch`` size: timm's patch embedding
    needs whole patches. The embedded data's small crops (56 px) are rounded up to whole patches
    (64 for patch 16; the resize grows with them); on real data (224 is whole for patch 8, 14
    and 16) another size is one line naming the fix."""
    if patch <= 1:
        return config
    changes: dict[str, int] = {}
    for name in _INPUT_SIZE_FIELDS:
        value = getattr(config, name, None)
        if not isinstance(value, int) or value % patch == 0:
            continue
        if not synthetic:
            raise BadInput(
                f"{name}={value} is not a whole number of {patch}-pixel patches for this ViT: "
                f"--set {name}={whole_patches(value, patch)} (or {value // patch * patch})"
            )
        changes[name] = whole_patches(value, patch)
    if "crop" in changes and getattr(config, "resize", changes["crop"]) < changes["crop"]:
        changes["resize"] = changes["crop"]
    return dataclasses.replace(config, **changes) if changes else config


def protocol_variant(preset: Preset, synthetic: bool, config: Any, patch: int = 1) -> str:
    """The settings that differ from the preset's (e.g. "temperature=1.0"): "" for the protocol
    as published. The report names variants, so changed settings never pass as the standard."""
    actual = config_to_dict(config)
    named = set(family_of(preset).protocol_keys)  # settings the protocol name says
    # The standard of the protocol the run chose (its synthetic_protocol profile included).
    chosen = {key: actual[key] for key in named}
    standard = config_to_dict(
        fit_config_to_patches(resolve_config(preset, synthetic, [], chosen), patch, synthetic)
    )
    changed = [
        f"{k}={actual[k]}".replace(" ", "")
        for k in sorted(actual)
        if actual[k] != standard.get(k) and k not in named
    ]
    return ",".join(changed)


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BadInput(f"--device {device} is not supported; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def model_names(backbone: LoadedBackbone, checkpoint: Path, name: str | None) -> tuple[str, str]:
    """(display name, config name): ``--name``, else for our own checkpoints recipe + epochs,
    else the file stem; the config is the recipe of our own checkpoints, else "-"."""
    meta = backbone.inspection.meta
    recipe = meta.get("recipe")
    if name:
        display = name
    elif recipe and meta.get("random_init"):
        display = f"{recipe} (random init)"
    elif recipe:
        display = f"{recipe} ({meta.get('epochs', '?')} ep)"
    else:
        display = checkpoint.name.split(".")[0] or checkpoint.stem
    return display, recipe or "-"


def run_task(request: RunRequest, backbone: LoadedBackbone | None = None) -> Path | None:
    """Run a preset and write its record. Returns the record's path (None on ranks other than
    0 under torchrun: only rank 0 writes the record). ``backbone``: the checkpoint already loaded
    from ``request.checkpoint`` with its options (``run all`` loads and hashes it once)."""
    preset = get_preset(request.task)
    data_root = Path(request.data_root) if request.data_root is not None else None
    check_inputs(request, preset)
    # The [synthetic] profile follows the data actually read: never for a user's --features-dir,
    # and also for a synthetic suite given as --data-root (npidbench data synth).
    synthetic = request.features_dir is None and reads_synthetic_data(preset.dataset, data_root)
    config = resolve_config(preset, synthetic, request.set_options)
    options = extract_options(request)
    store = ResultStore(check_results_folder(results_dir(request.results)))
    cache = FeatureCache(checked_cache_root(request.cache))
    if backbone is None and request.checkpoint is not None:
        backbone = load_backbone(
            request.checkpoint, arch=request.arch, branch=request.branch, trust_pickle=request.trust_pickle
        )
    patch = 1
    if backbone is not None:
        refusal = family_of(preset).refusal(config, backbone.backbone)
        if refusal is not None:
            raise BadInput(refusal)
        patch = backbone.backbone.patch_size
        config = fit_config_to_patches(config, patch, synthetic)
    with distributed(options.device) as world:
        # Ranks write their shards into the cache files rank 0 creates, and read the resume states
        # it saves there: with several nodes the cache must be on a shared filesystem.
        check_shared_folder(cache.root, world, "feature cache (--cache, NPIDBENCH_CACHE)")
        options = replace(options, device=world.device)
        ctx = RunContext(
            preset=preset,
            backbone=backbone,
            data_root=data_root,
            cache=cache,
            extract=options,
            features_dir=Path(request.features_dir) if request.features_dir is not None else None,
            previous_records=lambda: store.load()[0],
        )
        started = time.perf_counter()
        output = family_of(preset).run(ctx, config)
        total = time.perf_counter() - started
    if not world.is_main:
        return None
    if request.cache_dtype != "float32" and ctx.extract_stats.cache_dtype is None:
        # `run all --cache-dtype float16` passes it to every task: said, not refused.
        log(f"--cache-dtype {request.cache_dtype}: {preset.name} reads no cached features; it had no effect")
    record = new_record(
        task=preset.name,
        family=preset.family,
        table=preset.table,
        dataset=output.dataset,
        model=model_entry(request, backbone, output),
        metrics=output.metrics,
        protocol=output.protocol,
        variant=_with_cache_dtype(protocol_variant(preset, synthetic, config, patch), ctx.extract_stats),
        config=config_to_dict(config),
        seeds=output.seeds,
        timings=timings(total, ctx.extract_stats),
        details=record_details(
            output, preset, config if synthetic else None, options, world.world_size, ctx.extract_stats
        ),
    )
    return store.write(record)


def _with_cache_dtype(variant: str, stats: ExtractStats) -> str:
    """A run on float16-stored features is named so (``cache_dtype=float16``): its numbers may
    differ a little from float32 ones, so the report keeps its rows apart, as it does bf16's."""
    if stats.cache_dtype in (None, "float32"):
        return variant
    return ",".join(part for part in (variant, f"cache_dtype={stats.cache_dtype}") if part)


def check_inputs(request: RunRequest, preset: Preset) -> None:
    """What a request must get right before any work starts (each: one line, exit 2)."""
    if (request.checkpoint is None) == (request.features_dir is None):
        raise BadInput(f"give exactly one of CKPT and --features-dir to `run {preset.name}`")
    if request.features_dir is not None and not family_of(preset).accepts_features_dir:
        raise BadInput(f"{preset.name} needs a checkpoint (CKPT); --features-dir is for the SVM presets")


def extract_options(request: RunRequest) -> ExtractOptions:
    """The forward-pass options: device, decoding workers, eval batch (defaults per device)."""
    device = check_device(request.device)
    if request.eval_batch_size is not None and request.eval_batch_size < 1:
        raise BadInput(f"--eval-batch-size must be at least 1, got {request.eval_batch_size}")
    if request.workers is not None and request.workers < 0:
        raise BadInput(f"--workers must be 0 or more, got {request.workers}")
    return ExtractOptions(
        device=device,
        workers=default_workers(device) if request.workers is None else request.workers,
        batch_size=request.eval_batch_size or (256 if device.startswith("cuda") else 64),
        skip_corrupt=request.skip_corrupt,
        cache_dtype=request.cache_dtype,
    )


def checked_cache_root(explicit: str | Path | None) -> Path:
    root = feature_cache_dir(explicit)
    if root.exists() and not root.is_dir():
        raise BadInput(
            f"feature cache location {root} is a file; give a folder with --cache or NPIDBENCH_CACHE"
        )
    return root


def model_entry(request: RunRequest, backbone: LoadedBackbone | None, output: TaskOutput) -> dict[str, Any]:
    """The record's ``model``: the checkpoint's identity, or for --features-dir the features'
    (their sha256 stands for the checkpoint)."""
    if backbone is None:
        model = dict(output.model or {})
        if request.name:
            model["name"] = request.name
        return model
    display, config_name = model_names(backbone, Path(request.checkpoint), request.name)  # type: ignore[arg-type]
    return {
        "name": display,
        "config": config_name,
        "sha256": backbone.sha256,
        "branch": backbone.inspection.branch,
        "checkpoint": backbone.provenance(),
    }


def timings(total: float, stats: ExtractStats) -> dict[str, Any]:
    return {
        "total_s": round(total, 3),
        "extract_s": round(stats.seconds, 3),
        "extracted_images": stats.images,
        "images_per_s": round(stats.images_per_second, 1),
        "cache_hit": stats.cache_hit,
    }


def record_details(
    output: TaskOutput,
    preset: Preset,
    synthetic_config: Any | None,
    options: ExtractOptions,
    world_size: int,
    stats: ExtractStats | None = None,
) -> dict[str, Any]:
    """The record's details; ``synthetic_config``: the run's config when it read the embedded data."""
    cached = {"cache_dtype": stats.cache_dtype} if stats is not None and stats.cache_dtype else {}
    return {
        # Forward passes in fp32 unless the family says otherwise (bf16 autocast on CUDA).
        "precision": FP32,
        **output.details,
        # The embedded data runs each preset's scaled-down [synthetic] settings: say which.
        "profile": {"name": "synthetic", "settings": synthetic_profile(preset, synthetic_config)}
        if synthetic_config is not None and preset.synthetic
        else {"name": "protocol"},
        "device": options.device,
        "world_size": world_size,
        "workers": options.workers,
        "batch_size": options.batch_size,
        **cached,  # the storage dtype of the cached features the task read
    }

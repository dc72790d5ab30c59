"""The ``npidbench`` command line: thin, it parses, calls the library and formats output.

Every error ends as one line on stderr naming what is wrong and how to fix it: exit code 2 for
bad input (usage errors too), 1 for a failed run; ``npidbench --debug ...`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from npidbench import __version__
from npidbench.errors import BadInput, NpidbenchError, RunFailed
from npidbench.progress import console
from npidbench.report import FORMATS as REPORT_FORMATS

app = typer.Typer(
    help="Evaluate any self-supervised ResNet checkpoint on the standard transfer benchmarks.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)
cache_app = typer.Typer(help="The feature cache (NPIDBENCH_CACHE or --cache DIR).", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: check a layout, write the synthetic suite.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")

_state = {"debug": False}
stdout = console.__class__(highlight=False, soft_wrap=True)  # tables and paths go to stdout

CacheOpt = Annotated[Path | None, typer.Option("--cache", help="Feature cache folder.")]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Expected architecture, e.g. resnet50; a mismatch is refused.")
]
BranchOpt = Annotated[
    str | None,
    typer.Option("--branch", help="Which network of a multi-network file (e.g. teacher, encoder_k, ema)."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow running pickled code: ONLY for files you trust.")
]


def _print_version(value: bool) -> None:
    if value:
        stdout.print(f"npidbench {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    _state["debug"] = debug


@app.command("list")
def list_command(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Tasks (presets), benchmark families and datasets, with one-line descriptions."""
    from npidbench.data import DATASETS
    from npidbench.tasks import families, presets

    found = presets()
    if as_json:
        stdout.print_json(
            json.dumps(
                {
                    "tasks": {
                        n: {"family": p.family, "dataset": p.dataset, "description": p.description}
                        for n, p in found.items()
                    },
                    "families": {n: f.description for n, f in families().items()},
                    "datasets": {n: d.description for n, d in DATASETS.items()},
                }
            )
        )
        return
    table = Table(title="Tasks (npidbench run TASK CKPT)")
    for column in ("task", "family", "dataset", "description"):
        table.add_column(column)
    for name, preset in found.items():
        table.add_row(name, preset.family, preset.dataset, preset.description)
    stdout.print(table)
    datasets = Table(title="Datasets (under --data-root; synthetic when omitted)")
    for column in ("dataset", "sub-path", "layout", "description"):
        datasets.add_column(column)
    for info in DATASETS.values():
        datasets.add_row(info.name, info.subpath + "/", info.layout, info.description)
    stdout.print(datasets)


@app.command("inspect")
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    arch: ArchOpt = None,
    branch: BranchOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Detected format, architecture, branch, loaded / missing / ignored keys, sha256.

    Exits with code 2 when the backbone does not load completely; with --json a JSON object
    (with ``error``) is printed for every refusal, unreadable files included."""
    from npidbench.checkpoint import failed_inspection, inspect_checkpoint

    try:
        info, _ = inspect_checkpoint(checkpoint, arch=arch, branch=branch, trust_pickle=trust_pickle)
    except BadInput as exc:
        if not as_json:
            raise
        # What was found before the refusal (format, branches), or the bare file facts.
        info = getattr(exc, "inspection", None) or failed_inspection(checkpoint, _one_line(str(exc)))
        stdout.print_json(json.dumps(info.to_json(), default=str))
        raise
    if as_json:
        stdout.print_json(json.dumps(info.to_json(), default=str))
    else:
        _print_inspection(info)
    if not info.complete:
        raise BadInput(f"{checkpoint}: {info.error}")


def _print_inspection(info) -> None:
    rows = [
        ("file", info.path),
        ("sha256", info.sha256),
        ("container", info.container),
        ("format", info.format),
    ]
    vit = info.vit or {}
    if info.family != "resnet":
        rows += [("family", info.family), ("arch", info.arch or "?")]
        if vit:
            layer_scale = ", layer scale" if vit["init_values"] is not None else ""
            grid = vit["img_size"] // vit["patch_size"]
            rows += [
                (
                    "depth / width",
                    f"{vit['depth']} blocks x {vit['embed_dim']} ({vit['num_heads'] or '?'} heads: "
                    f"{vit['heads_from'] or 'unknown'}; mlp {vit['mlp_ratio']:g}x{layer_scale})",
                ),
                ("patch size", f"{vit['patch_size']}x{vit['patch_size']} pixels"),
                ("registers", str(vit["reg_tokens"]) if vit["reg_tokens"] else "none"),
                (
                    "resolution",
                    f"{vit['img_size']} px ({grid}x{grid} patches"
                    + (", class token without position" if vit["no_embed_class"] else "")
                    + "; other sizes interpolate the position embedding)",
                ),
            ]
            if vit["converted"]:
                rows.append(("converted", "; ".join(vit["converted"])))
    else:
        rows += [
            ("arch", (info.arch or "?") + (" (CIFAR stem)" if info.cifar_stem else "")),
            ("stem", info.stem if info.arch else "?"),
        ]
        width = info.width_multiplier
        if width > 1:
            rows.append(
                (
                    "width",
                    f"x{width}, every layer (stem {64 * width}, bottlenecks {64 * width}..{512 * width}, "
                    f"outputs {256 * width}..{2048 * width})",
                )
            )
    rows += [
        ("input", info.input),
        ("branch", f"{info.branch} (of {', '.join(info.branches) or 'none'})"),
        ("loaded", f"{len(info.loaded)} tensors"),
        ("missing", f"{len(info.missing)}" + (f": {', '.join(info.missing[:5])}" if info.missing else "")),
        (
            "unexpected",
            f"{len(info.unexpected)}" + (f": {', '.join(info.unexpected[:5])}" if info.unexpected else ""),
        ),
        (
            "defaulted",
            f"{len(info.defaulted)} (num_batches_tracked absent from the file)" if info.defaulted else "0",
        ),
        ("ignored", f"{len(info.ignored)}" + (f": {_summarise(info.ignored)}" if info.ignored else "")),
    ]
    if info.skipped_objects:
        rows.append(("not executed", ", ".join(info.skipped_objects)))
    if info.meta:
        rows.append(("meta", json.dumps({k: v for k, v in info.meta.items() if k != "versions"})))
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, str(value))
    stdout.print(table)


def _summarise(keys: list[str]) -> str:
    """Ignored keys grouped by their first two path parts, e.g. ``state_dict.module.fc (2)``."""
    groups: dict[str, int] = {}
    for key in keys:
        head = ".".join(key.split(".")[:3]) if key.count(".") >= 3 else key.rsplit(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    parts = [f"{name} ({count})" for name, count in list(groups.items())[:8]]
    more = len(groups) - 8
    return ", ".join(parts) + (f", +{more} more groups" if more > 0 else "")


@app.command("convert")
def convert_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    to: Annotated[str, typer.Option("--to", help="torchvision, detectron2 (ResNets) or timm (all).")],
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    arch: ArchOpt = None,
    branch: BranchOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Write the strictly loaded backbone as a plain torchvision state_dict (no fc), with
    detectron2 names, or as a state dict that timm's model loads strictly (ResNets, ViTs,
    ConvNeXts; prints the timm model name and create_model kwargs that load it)."""
    from npidbench.checkpoint import load_backbone
    from npidbench.checkpoint.own import CONVERT_TARGETS, export_backbone, timm_model_for

    if to not in CONVERT_TARGETS:
        raise BadInput(f"--to {to} is not supported; choose one of {', '.join(CONVERT_TARGETS)}")
    if out.is_dir():
        raise BadInput(f"--out {out} is a folder; give a file name")
    if out.exists() and not force:
        raise BadInput(f"{out} already exists; pass --force to replace it")
    if not out.parent.exists():
        raise BadInput(f"the folder of --out {out} does not exist")
    loaded = load_backbone(checkpoint, arch=arch, branch=branch, trust_pickle=trust_pickle)
    info = loaded.inspection
    if info.family != "resnet" and to != "timm":
        raise BadInput(
            f"convert writes ResNet names (torchvision, detectron2); {checkpoint} holds a "
            f"{info.family} ({loaded.arch}): use --to timm"
        )
    spec = info.vit_spec or info.convnext_spec
    export_backbone(
        loaded.model, to, out, input_normalised=loaded.input_normalised, arch=loaded.arch, spec=spec
    )
    # timm: the model that loads the file, e.g. "vit_small_patch16_224 (num_classes=0, img_size=224, ...)"
    line = str(timm_model_for(loaded.model, loaded.arch, spec)) if to == "timm" else str(out)
    stdout.print(line, markup=False)


@app.command("run")
def run_command(
    task: Annotated[str, typer.Argument(help="A task from `npidbench list`.")],
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint to evaluate.")] = None,
    features_dir: Annotated[
        Path | None, typer.Option("--features-dir", help="Precomputed features (SVM presets).")
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option("--data-root", help="Folder holding the datasets; synthetic data when omitted."),
    ] = None,
    set_options: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: key=value (repeatable).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name in the report.")] = None,
    results: Annotated[
        Path | None, typer.Option("--results", help="Results folder (default ./results).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    workers: Annotated[int | None, typer.Option("--workers", help="Image decoding workers.")] = None,
    eval_batch_size: Annotated[
        int | None,
        typer.Option(
            "--eval-batch-size",
            help="Images per forward pass (feature extraction, testing); the training batch is --set batch_size.",
        ),
    ] = None,
    old_batch_size: Annotated[
        int | None, typer.Option("--batch-size", hidden=True, help="Deprecated: --eval-batch-size.")
    ] = None,
    cache: CacheOpt = None,
    arch: ArchOpt = None,
    branch: BranchOpt = None,
    trust_pickle: TrustOpt = False,
    skip_corrupt: Annotated[
        bool,
        typer.Option(
            "--skip-corrupt", help="Leave out unreadable images (listed in the record) instead of stopping."
        ),
    ] = False,
    cache_dtype: Annotated[
        str,
        typer.Option(
            "--cache-dtype",
            help="Store cached features as float32 or float16 (half the disk; a separate cache entry).",
        ),
    ] = "float32",
) -> None:
    """Run one benchmark and print the path of the record it wrote (`run all CKPT`: every
    benchmark whose data is present, one record path per line, a summary on stderr)."""
    from npidbench.runner import RunRequest, run_task

    request = RunRequest(
        task=task,
        checkpoint=checkpoint,
        features_dir=features_dir,
        data_root=data_root,
        set_options=list(set_options or []),
        name=name,
        results=results,
        device=device,
        workers=workers,
        eval_batch_size=_eval_batch_size(eval_batch_size, old_batch_size),
        cache=cache,
        arch=arch,
        branch=branch,
        trust_pickle=trust_pickle,
        skip_corrupt=skip_corrupt,
        cache_dtype=cache_dtype,
    )
    if task == "all":
        _run_all(request)
        return
    path = run_task(request)
    if path is not None:  # under torchrun only rank 0 writes (and prints) the record
        stdout.print(str(path))


def _eval_batch_size(given: int | None, old_name: int | None) -> int | None:
    """--eval-batch-size, or its old name --batch-size (read, with a note saying the new one)."""
    if old_name is None:
        return given
    if given is not None:
        raise BadInput("give --eval-batch-size only (--batch-size is its old name)")
    if old_name < 1:
        raise BadInput(f"--batch-size must be at least 1, got {old_name}")
    if not _is_secondary_rank():
        console.print(
            "note: --batch-size is now --eval-batch-size (images per forward pass); "
            "the training batch is --set batch_size",
            markup=False,
        )
    return old_name


def _run_all(request) -> None:
    """Every preset whose data is present: the record paths on stdout, the summary on stderr."""
    from npidbench.suite import print_summary, run_all

    result = run_all(request)
    for outcome in result.outcomes:
        if outcome.record is not None:
            stdout.print(str(outcome.record))
    if not _is_secondary_rank():
        print_summary(result)
    if result.failed:
        raise RunFailed(
            f"{len(result.failed)} of {len(result.outcomes)} tasks failed ({', '.join(o.task for o in result.failed)}); "
            "the other records are written"
        )


@app.command("pretrain")
def pretrain_command(
    recipe: Annotated[
        str | None,
        typer.Argument(
            help="Recipe name (pretrain/*.toml) or a .toml path; default: the embedded CPU-sized one on the "
            "embedded data, the paper's (npid_resnet50_8xb32-steplr-200e_in1k) with a real --data-root."
        ),
    ] = None,
    set_options: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe setting: key=value (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder; the checkpoint is OUT/last.pth.")] = Path(
        "runs/npid"
    ),
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Folder holding the datasets; synthetic when omitted.")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="cpu or cuda (one GPU per process under torchrun).")
    ] = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in OUT.")] = False,
) -> None:
    """Pretrain NPID; `--set epochs=0` writes the random-init baseline in the same format."""
    from npidbench.pretrain.recipe import load_recipe, resume_recipe
    from npidbench.pretrain.train import pretrain
    from npidbench.runner import check_device

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a folder")
    if resume and recipe is None:
        chosen = resume_recipe(out, list(set_options or []))  # the run's own recipe
    else:
        chosen = load_recipe(recipe, list(set_options or []), data_root)
    path = pretrain(chosen, out, data_root, check_device(device), resume)
    if not _is_secondary_rank():
        stdout.print(str(path))


def _is_secondary_rank() -> bool:
    return int(os.environ.get("RANK", "0")) != 0


@app.command("report")
def report_command(
    results: Annotated[
        Path | None, typer.Option("--results", help="Results folder (default ./results).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(REPORT_FORMATS)}.")] = "markdown",
    out: Annotated[Path | None, typer.Option("--out", help="Write to a file instead of stdout.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only models matching this glob.")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Only this task / family / table (glob).")
    ] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset (glob).")] = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Add the published NPID rows (real datasets only).")
    ] = False,
    lowshot_plot: Annotated[
        Path | None,
        typer.Option(
            "--lowshot-plot", help="Also draw the low-shot curves (mAP vs k, min-max band): .png/.svg."
        ),
    ] = None,
    linear_plot: Annotated[
        Path | None,
        typer.Option("--linear-plot", help="Also draw the linear probes' top-1 per layer: .png/.svg."),
    ] = None,
) -> None:
    """Render the benchmark tables from the result records."""
    from npidbench.atomic import atomic_write_text
    from npidbench.paths import results_dir
    from npidbench.report import renderer, report, select
    from npidbench.results import ResultStore

    renderer(fmt)  # an unknown format is refused before anything is read
    folder = results_dir(results)
    if results is not None and not folder.is_dir():
        raise BadInput(f"--results {folder} is not a folder")
    records, problems = ResultStore(folder).load()
    for problem in problems:
        console.print(f"warning: skipped {problem}")
    plots = {kind: path for kind, path in (("lowshot", lowshot_plot), ("linear", linear_plot)) if path}
    text = report(
        select(records, model, task, dataset),
        fmt,
        reference=reference,
        plots=plots,
        out=out,
        source=str(folder),
    )
    if lowshot_plot is not None:
        console.print(f"low-shot curves: {lowshot_plot}")
    if linear_plot is not None:
        console.print(f"linear probes per layer: {linear_plot}")
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        atomic_write_text(out, text)
        stdout.print(str(out))


@cache_app.command("ls")
def cache_ls(cache: CacheOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List cached features (and interrupted extractions, which resume on the next run)."""
    from npidbench.cache import FeatureCache, _human
    from npidbench.paths import feature_cache_dir

    store = FeatureCache(feature_cache_dir(cache))
    entries = store.entries()
    if as_json:
        stdout.print_json(
            json.dumps([{"digest": e.digest, "bytes": e.bytes, "dtype": e.dtype, **e.meta} for e in entries])
        )
        return
    table = Table(title=f"Feature cache: {store.root}")
    for column in ("checkpoint", "arch", "dataset", "split", "layer", "rows x dim", "dtype", "size"):
        table.add_column(column)
    for entry in entries:
        key = entry.meta["key"]
        dataset = key["dataset"] + (" (synthetic)" if entry.meta.get("synthetic") else "")
        table.add_row(
            key["checkpoint_sha256"][:12],
            key["arch"],
            dataset,
            key["split"],
            key["layer"],
            f"{entry.meta['rows']:,} x {entry.meta['dim']:,}",
            entry.dtype,
            _human(entry.bytes),
        )
    stdout.print(table)
    partial = store.partial_jobs()
    if partial:
        stdout.print(f"{len(partial)} interrupted extraction(s) will resume on the next run")


@cache_app.command("clear")
def cache_clear(
    cache: CacheOpt = None,
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Only entries of checkpoints whose sha256 starts with this."),
    ] = None,
) -> None:
    """Delete cached features (all, or one checkpoint's)."""
    from npidbench.cache import FeatureCache, _human
    from npidbench.paths import feature_cache_dir

    if checkpoint is not None and not checkpoint.strip():
        raise BadInput(
            "--checkpoint needs a sha256 prefix (see `npidbench cache ls`); omit it to clear everything"
        )
    removed, freed = FeatureCache(feature_cache_dir(cache)).clear(checkpoint)
    stdout.print(f"removed {removed} entries, freed {_human(freed)}")


@data_app.command("synth")
def data_synth(
    root: Annotated[Path, typer.Option("--root", help="New folder to write the suite into (a --data-root).")],
    seed: Annotated[int, typer.Option("--seed", help="Generator seed.")] = 0,
) -> None:
    """Write the embedded synthetic suite (every dataset in its real layout) into a folder."""
    from npidbench.data.synthetic import SuiteSpec, write_suite

    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise BadInput(f"--root {root} already exists and is not an empty folder; choose a new one")
    path = write_suite(root, SuiteSpec(seed=seed))
    stdout.print(str(path))


@data_app.command("check")
def data_check(
    name: Annotated[
        str,
        typer.Argument(
            help="Dataset: imagenet, places205, inat18, voc07, voc12, voc12aug, coco, cityscapes, ade20k."
        ),
    ],
    root: Annotated[Path, typer.Option("--root", help="The dataset folder, or a data root holding it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Counts per split, and the first missing or unreadable file if any (exit 2)."""
    from npidbench.data.check import check_dataset, format_report

    report = check_dataset(name, root)
    if as_json:
        stdout.print_json(json.dumps(report.to_json()))
    else:
        stdout.print(format_report(report), markup=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the Typer app and turn every failure into one line."""
    args = sys.argv[1:] if argv is None else list(argv)
    # --debug is an option of npidbench itself, before the command (`npidbench --debug run ...`);
    # the same word later is a value (`--set --debug` is a bad setting, reported in one line)
    command_at = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
    debug = "--debug" in args[:command_at]
    try:
        result = app(args=args, prog_name="npidbench", standalone_mode=False)
    except NpidbenchError as exc:
        if debug:
            raise
        console.print(f"error: {_one_line(str(exc))}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: nothing escapes as a traceback
        if debug:
            raise
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # Typer/Click usage errors
            known = typer.main.get_command(app).commands  # type: ignore[attr-defined]
            command = next((a for a in args if not a.startswith("-")), "")
            hint = f"see npidbench {command} --help" if command in known else "see npidbench --help"
            console.print(f"error: {_one_line(exc.format_message())} ({hint})", markup=False, soft_wrap=True)
            sys.exit(2 if exc.exit_code == 2 else exc.exit_code or 2)
        if isinstance(exc, typer.Abort | EOFError):
            console.print("aborted", markup=False)
            sys.exit(1)
        console.print(
            f"error: {type(exc).__name__}: {_one_line(str(exc))[:300]} "
            "(rerun with --debug for the traceback)",
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()

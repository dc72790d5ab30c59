"""The README's main job, stage by stage, in machine-independent units (issue 20): per stage its
wall seconds and process CPU seconds (user + system, its DataLoader workers included), the
ratio to the bare compute it needs where that floor is well defined, and (``--profile``) the
top costs, sampled by py-spy (``pip install py-spy``) at 20 Hz from outside the process, so that
the CPU seconds stay the stage's own (cProfile's per-call hooks run inside it and add to them).

The stages are the main job's commands, with `run all` split into its tasks (one `npidbench
run TASK` each, the same presets in the same order) so that each task's CPU seconds are its own:

    npidbench pretrain --out W/runs/npid
    npidbench pretrain --set epochs=0 --out W/runs/random-init
    npidbench run TASK W/runs/npid/last.pth          for every task of `run all`
    npidbench run TASK W/runs/random-init/last.pth   for every task of `run all`
    npidbench report ...

Every stage runs in a fresh working folder with its own synthetic-data and feature-cache
folders, as on a fresh clone: the embedded data is generated inside the first stage that needs
it, and nothing is reused from an earlier run of this script.

Floors (the compute no implementation of the stage can avoid, timed here on the same threads):

- pretraining: the plain ResNet-18 forward + backward + SGD step with a 128-d linear head at the
  recipe's batch and input size, channels-last as the trainer runs it, best of three rounds, times
  the images the run processed (from its monitor.jsonl);
- voc-svm: its matrix products at this machine's fp32 matmul rate: per layer the basis (Gram
  matrix N^2 D, or covariance N D^2), the eigendecomposition (~9 r^3 for r = min(N, D + 1)) and
  4 N r flops per column per CG iteration (the iterations its record counts).

    python benchmarks/main_job_profile.py [--profile] [--only pretrain run-npid ...] \\
        [--out benchmarks/results/main-job-profile.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling import cpu_model  # noqa: E402  (the benchmarks' CPU name, as scaling.json records it)

STAGE_GROUPS = ("pretrain", "random-init", "run-npid", "run-random", "report")


SAMPLE_HZ = 20


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(name: str, args: list[str], work: Path, env: dict[str, str], profile: bool) -> dict[str, Any]:
    """One npidbench command in its own process: wall and CPU seconds (and its sampled top costs)."""
    command = [sys.executable, "-m", "npidbench.cli", *args]
    print(f"[{name}] npidbench {' '.join(args)}", file=sys.stderr, flush=True)
    cpu_before, started = cpu_children(), time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    spy, raw = None, work / "profiles" / f"{name.replace('/', '_')}.raw"
    if profile:
        # attached by pid: `py-spy record -- CMD` would drop the command's exit status
        raw.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(proc.pid), "-r", str(SAMPLE_HZ), "-f", "raw", "-o", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    proc.communicate()
    if spy is not None:
        spy.wait()
    wall, cpu = time.perf_counter() - started, cpu_children() - cpu_before
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); its messages are above")
    out: dict[str, Any] = {"stage": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    if profile and raw.exists():
        out["top"] = top_costs(raw)
    elif profile:
        print(f"[{name}] py-spy wrote no samples (could it attach? see `py-spy record --help`)", file=sys.stderr)
    print(f"[{name}] {wall:.1f} s wall, {cpu:.1f} CPU s", file=sys.stderr, flush=True)
    return out


def top_costs(raw: Path, count: int = 12) -> dict[str, list[dict[str, Any]]]:
    """From py-spy's raw output (one ``frame;frame;... count`` line per distinct stack): the
    leaf functions with the most samples ("self": a torch kernel shows up as the Python function
    that called it, Conv2d._conv_forward, the autograd engine's run_backward), and npidbench's own
    functions by the share of stacks they are on ("inclusive": where in the product that goes)."""
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        # "func (path/to/file.py:LINE)": the line is where the frame was, so drop it to merge
        frames = [f.rsplit(":", 1)[0] + ")" for f in stack.split(";")]
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for frame in set(frames):
            if "npidbench/" in frame and "npidbench/cli.py" not in frame:
                inclusive[frame] = inclusive.get(frame, 0) + n

    def top(counts: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:count]
        return [{"function": f, "share": round(n / max(total, 1), 3)} for f, n in ranked]

    return {"self": top(leaf), "inclusive": top(inclusive)}


def pretrain_floor(run_dir: Path, batch: int, size: int, threads: int) -> dict[str, Any]:
    """CPU seconds of the plain ResNet-18 step for the images the pretraining processed."""
    import torch
    import torch.nn.functional as F
    import torchvision

    lines = [json.loads(x) for x in (run_dir / "monitor.jsonl").read_text().splitlines() if x.strip()]
    images = sum(line["images_per_s"] * line["seconds"] for line in lines)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # channels-last, as the trainer runs it (distributed.prepare_for_training, normalize_batch)
    model = torchvision.models.resnet18(num_classes=128).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 128, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    for _ in range(3):
        step()
    # the best of three rounds: one round of 12 steps read 9.9 and 11.6 ms an image in two runs
    steps, rounds = 12, []
    for _ in range(3):
        started = time.process_time()
        for _ in range(steps):
            step()
        rounds.append((time.process_time() - started) / (steps * batch))
    per_image = min(rounds)
    return {
        "what": f"plain ResNet-18 forward + backward + SGD, channels-last, batch {batch}, {size} px, {threads} threads",
        "images": round(images),
        "cpu_s_per_image": round(per_image, 6),
        "floor_cpu_s": round(images * per_image, 1),
    }


def source_commit() -> str:
    """The commit the stages ran (``+changes`` when the work tree differs from it)."""
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def matmul_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(8):
            a @ b
        best = min(best, time.process_time() - started)
    return 8 * 2 * 1024**3 / best / 1e9  # per CPU second: the rate a CPU second buys


def svm_floor(record: dict[str, Any], cache: Path, gflops_per_cpu_s: float) -> dict[str, Any]:
    """The voc-svm record's matrix products (see the module docstring) at the matmul rate; each
    layer's rows and dims come from its trainval entry in the feature cache."""
    from npidbench.cache import FeatureCache

    shapes = {
        e.meta["key"]["layer"]: (e.meta["rows"], e.meta["dim"])
        for e in FeatureCache(cache).entries()
        if e.meta["key"]["split"] == "trainval"
    }
    flops, counted = 0.0, []
    for name, layer in record["metrics"].get("layers", {}).items():
        if name not in shapes or "cg_iterations" not in layer:
            continue
        n, dims = shapes[name]
        r = min(n, dims + 1)
        basis = 2 * n * n * dims if r == n else 2 * n * dims * dims
        columns = 4 * len(layer["ap"])  # per class: 3 folds + the refit, one CG batch
        flops += basis + 9 * r**3 + 4 * n * r * columns * sum(layer["cg_iterations"])
        counted.append(f"{name} {n}x{dims}")
    return {
        "what": "basis + eigendecomposition + CG products of " + ", ".join(counted),
        "gflop": round(flops / 1e9, 1),
        "floor_cpu_s": round(flops / 1e9 / gflops_per_cpu_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="sample each stage with py-spy (its top costs)")
    parser.add_argument("--work", type=Path, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "main-job-profile.json")
    parser.add_argument("--tasks", nargs="+", help="only these tasks of `run all` (a quick check of this script)")
    parser.add_argument(
        "--pretrain-set", nargs="+", default=[], metavar="KEY=VALUE", help="--set for the NPID pretraining"
    )
    args = parser.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile samples the stages with py-spy: pip install py-spy")
    commit = source_commit()  # before the stages: the code they ran

    sys.path.insert(0, str(HERE.parent))
    from npidbench.suite import suite_presets

    tasks = [p.name for p in suite_presets("resnet") if args.tasks is None or p.name in args.tasks]
    if args.tasks and len(tasks) != len(args.tasks):
        raise SystemExit(f"--tasks: not all of {args.tasks} are tasks of `run all` ({len(tasks)} found)")
    pretrain_sets = [part for item in args.pretrain_set for part in ("--set", item)]
    with tempfile.TemporaryDirectory(prefix="npidbench-main-job-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "NPIDBENCH_DATA": str(work / "data"),
            "NPIDBENCH_CACHE": str(work / "cache"),
            "NPIDBENCH_RESULTS": str(work / "results"),
        }
        stages = [
            run_stage("pretrain", ["pretrain", *pretrain_sets, "--out", "runs/npid"], work, env, args.profile),
            run_stage(
                "random-init", ["pretrain", "--set", "epochs=0", "--out", "runs/random-init"], work, env, args.profile
            ),
        ]
        for group, ckpt in (("run-npid", "runs/npid/last.pth"), ("run-random", "runs/random-init/last.pth")):
            for task in tasks:
                stages.append(run_stage(f"{group}/{task}", ["run", task, ckpt], work, env, args.profile))
        report = ["report"]
        if "voc-svm" in tasks:  # a partial job (--tasks) plots what it has
            report += ["--lowshot-plot", "report/lowshot.png"]
        if any(t.startswith("linear-") for t in tasks):
            report += ["--linear-plot", "report/linear.png"]
        stages.append(run_stage("report", [*report, "--out", "report/report.md"], work, env, args.profile))

        import torch

        threads = torch.get_num_threads()
        from npidbench.pretrain.recipe import load_recipe

        recipe = load_recipe(None, args.pretrain_set)  # the embedded default the stage trained
        floors = {"pretrain": pretrain_floor(work / "runs" / "npid", recipe.batch_size, recipe.input_size, threads)}
        gflops = matmul_gflops(threads)
        npid_checkpoint = (work / "runs" / "npid" / "last.pth").resolve()
        for record_path in sorted((work / "results").rglob("*.json")):
            record = json.loads(record_path.read_text())
            # the record keeps the checkpoint path as given (relative to the stage's folder)
            given = work / record["model"]["checkpoint"]["path"]
            if record.get("task") == "voc-svm" and given.resolve() == npid_checkpoint:
                floors["voc-svm"] = svm_floor(record, work / "cache", gflops)
        report_md = (work / "report" / "report.md").read_text()

    by_group: dict[str, dict[str, float]] = {}
    for stage in stages:
        group = stage["stage"].split("/")[0]
        totals = by_group.setdefault(group, {"wall_s": 0.0, "cpu_s": 0.0})
        totals["wall_s"] = round(totals["wall_s"] + stage["wall_s"], 2)
        totals["cpu_s"] = round(totals["cpu_s"] + stage["cpu_s"], 2)
    pretrain_cpu = next(s["cpu_s"] for s in stages if s["stage"] == "pretrain")
    floors["pretrain"]["ratio"] = round(pretrain_cpu / floors["pretrain"]["floor_cpu_s"], 2)
    if "voc-svm" in floors:
        svm_cpu = next(s["cpu_s"] for s in stages if s["stage"] == "run-npid/voc-svm")
        floors["voc-svm"]["ratio"] = round(svm_cpu / max(floors["voc-svm"]["floor_cpu_s"], 1e-9), 2)
    result = {
        "what": "the README main job per stage: wall and CPU seconds, floors, top costs",
        "profiled": args.profile,
        "partial": {"tasks": args.tasks, "pretrain_set": args.pretrain_set} if args.tasks or args.pretrain_set else None,
        "threads": threads,
        "matmul_gflop_per_cpu_s": round(gflops, 1),
        "total": {
            "wall_s": round(sum(s["wall_s"] for s in stages), 1),
            "cpu_s": round(sum(s["cpu_s"] for s in stages), 1),
        },
        "groups": by_group,
        "floors": floors,
        "stages": stages,
        "report_md": report_md,
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "cpu": cpu_model(),
        "commit": commit,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(result, indent=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

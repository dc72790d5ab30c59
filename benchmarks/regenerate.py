"""Run every speed comparison of the project and rewrite the table of benchmarks/README.md.

Each benchmark runs as its own process (the figures of one never feel another's memory), its
JSON output is kept in benchmarks/results/<name>.json together with the command and the machine,
and the table between the README's markers is rebuilt from all kept results. ``--only`` reruns
some benchmarks and rebuilds the table from the fresh and the kept results; ``--table-only``
just rebuilds the table.

    python benchmarks/regenerate.py                      # everything (the VOC SVM part: hours)
    python benchmarks/regenerate.py --only linear-heads knn-memory
    python benchmarks/regenerate.py --table-only

The VOC SVM comparison times the anchors' liblinear on 2 of 20 classes and extrapolates (see the
README notes); with its feature preparation it takes about 2.5 hours on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- regenerate.py table: start -->", "<!-- regenerate.py table: end -->"
SCALING_START, SCALING_END = "<!-- regenerate.py scaling: start -->", "<!-- regenerate.py scaling: end -->"
VOC_DIR = Path(os.environ.get("NPIDBENCH_VOC_FEATURES", "/tmp/voc-features"))


def _last_json(text: str) -> dict:
    """The last JSON document a script printed (some print progress lines before it)."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.lstrip().startswith("{") else start + 1
    return json.loads(text[start:])


@dataclass(frozen=True)
class Benchmark:
    name: str
    what: str
    against: str
    commands: list[list[str]]  # run in order; the JSON of each is kept (a list when several)
    figure: Callable[[list[dict]], str]


def _extraction(out: list[dict]) -> str:
    r = out[0]
    ours, bare = r["npidbench_extract_img_s"], r["bare_forward_img_s"]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return (
        f"{r['ratio_median_of_pairs']}x throughput (median of {len(ours)} paired runs; "
        f"{med(ours)} vs {med(bare)} img/s)"
    )


def _knn(out: list[dict]) -> str:
    r = out[0]
    ours, naive = r["npidbench"], r["naive_dense"]
    return (
        f"{'same' if r['same_accuracy'] else 'DIFFERENT'} accuracies; peak memory "
        f"{ours['peak_anon_mb_above_start'] / 1024:.2f} GB vs {naive['peak_anon_mb_above_start'] / 1024:.2f} GB "
        f"({r['memory_ratio_naive_over_ours']}x less); {ours['seconds']:.1f} s vs {naive['seconds']:.1f} s"
    )


def _learnability(out: list[dict]) -> str:
    r = out[0]
    return (
        f"{r['random_init_knn20_top1']:.2f}% vs {r['supervised_resnet18_val_top1']:.2f}% val top-1 (supervised "
        f"features' kNN {r['supervised_resnet18_knn20_top1']:.2f}%; chance {r['chance_top1']}%); "
        f"{r['supervised_minutes']} min of training"
    )


def _npid_step(out: list[dict]) -> str:
    r = out[0]
    parts = []
    for key, value in r.items():
        if key.startswith("K="):
            parts.append(f"{key}: {value['overhead_median_of_pairs']}")
    return "; ".join(parts) + " over the plain step"


def _linear_heads(out: list[dict]) -> str:
    r = out[0]
    ratio, steps = r["five_heads_over_single_head"], r["median_step_s"]
    return (
        f"{ratio['feature5']}x the Feature5 probe, {ratio['avgpool']}x the AvgPool probe "
        f"({steps['five-heads']} vs {steps['feature5']} / {steps['avgpool']} s per step); target at most 1.2x"
    )


def _voc_svm(out: list[dict]) -> str:
    batched = next(r for r in out if r.get("part") == "batched")
    anchors = next(r for r in out if r.get("part") == "sklearn")
    total, theirs = batched["total_s"], anchors["anchors_total_cpu_s_extrapolated"]
    return (
        f"full SVM {batched['full_s']} s + low-shot {batched['lowshot_s']} s = {total} s, peak "
        f"{batched['peak_anon_gb']} GB, against {theirs:,.0f} s extrapolated for the anchors: "
        f"{theirs / total:.0f}x less wall time than one process"
    )


def _scaling(out: list[dict]) -> str:
    stages = out[0]["stages"]
    worst = max((v["exponent"] for v in stages.values() if v["exponent"] is not None), default=None)
    svm = stages.get("svm", {}).get("exponent")
    return f"growth exponents up to {worst} (SVM {svm}); every stage in the scaling table below"


PY = sys.executable
BENCHMARKS = [
    Benchmark(
        "extraction",
        "feature extraction, ResNet-50 at 224, 500x375 JPEGs, Feature1..5 + AvgPool into the cache",
        "the bare backbone forward on the same batches, pre-decoded in memory",
        [[PY, str(HERE / "extraction_throughput.py"), "--images", "160", "--repeats", "5"]],
        _extraction,
    ),
    Benchmark(
        "knn-memory",
        "kNN, 100k x 2048 train, 10k queries, 1000 classes, k = 10/20/100/200",
        "naive dense (one 10k x 100k similarity matrix)",
        [[PY, str(HERE / "knn_memory.py")]],
        _knn,
    ),
    Benchmark(
        "learnability",
        "synthetic ImageNet learnability (10 classes, 1,600 / 400 images at 56 px)",
        "random-init ResNet-18 kNN (k=20) vs a short supervised ResNet-18",
        [[PY, str(HERE / "synthetic_learnability.py"), "--epochs", "10"]],
        _learnability,
    ),
    Benchmark(
        "npid-step",
        "NPID step (bank scores, loss, bank update), ResNet-18 56 px, batch 128, bank N = 50,000",
        "the same network's plain forward + backward with a linear head and cross-entropy",
        [[PY, str(HERE / "npid_step.py"), "--repeats", "10"]],
        _npid_step,
    ),
    Benchmark(
        "linear-heads",
        "linear probe step, the five Feature1..5 heads (1000 classes) on one frozen ResNet-50 forward at 224, batch 32",
        "one single-head probe over the same batches (Feature5 head alone; AvgPool head alone)",
        [[PY, str(HERE / "linear_heads.py"), "--rounds", "7"]],
        _linear_heads,
    ),
    Benchmark(
        "voc-svm",
        "VOC07 SVM + low-shot at VOC07 size (5,011 / 4,952 images, Feature1..5 of a random-init ResNet-50)",
        "the anchors' way: sklearn LinearSVC one fit at a time, 3-fold CV + refit per (class, cost)",
        [
            [PY, str(HERE / "voc_svm_speed.py"), "prepare", "--dir", str(VOC_DIR)],
            [PY, str(HERE / "voc_svm_speed.py"), "batched", "--dir", str(VOC_DIR)],
            [PY, str(HERE / "voc_svm_speed.py"), "sklearn", "--dir", str(VOC_DIR), "--classes", "0,10"],
        ],
        _voc_svm,
    ),
    Benchmark(
        "scaling",
        "every stage at real dataset sizes with generated stand-ins: index, feature cache, kNN, SVM, report",
        "its own growth: seconds and peak memory against N, fitted exponent",
        [[PY, str(HERE / "scaling.py"), "--plot", str(RESULTS / "scaling.png")]],
        _scaling,
    ),
]


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def run(bench: Benchmark) -> dict:
    outputs = []
    for command in bench.commands:
        print(f"[{bench.name}] {' '.join(command[1:])}", file=sys.stderr, flush=True)
        # stderr passes through: the long benchmarks print their progress there
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{bench.name} failed (exit {proc.returncode}; its messages are above)")
        outputs.append(_last_json(proc.stdout))
    kept = {
        "name": bench.name,
        "commands": [
            " ".join(Path(c[1]).name if i == 1 else c[i] for i in range(1, len(c))) for c in bench.commands
        ],
        "machine": machine(),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "outputs": outputs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{bench.name}.json").write_text(json.dumps(kept, indent=1) + "\n")
    return kept


HAND_MEASURED = " (measured before regenerate.py kept outputs; rerun: `--only {name}`)"


def _current_rows() -> list[str]:
    text = README.read_text()
    if START not in text:
        return []
    return [line for line in text.split(START, 1)[1].split(END, 1)[0].splitlines() if line.startswith("| ")]


def table() -> str:
    rows = ["| what | against | figure | machine | command |", "|---|---|---|---|---|"]
    previous = _current_rows()
    for bench in BENCHMARKS:
        path = RESULTS / f"{bench.name}.json"
        script = Path(bench.commands[0][1]).name
        if path.exists():
            kept = json.loads(path.read_text())
            figure, where = bench.figure(kept["outputs"]), kept["machine"]
            command = "; ".join(f"`python benchmarks/{c}`" for c in kept["commands"])
            rows.append(f"| {bench.what} | {bench.against} | {figure} | {where} | {command} |")
            continue
        # No kept output yet: keep the row measured by hand earlier, saying so.
        old = next((r for r in previous if script in r), None)
        if old is not None:
            note = HAND_MEASURED.format(name=bench.name)
            rows.append(old if note in old else old.rstrip(" |") + note + " |")
        else:
            rows.append(f"| {bench.what} | {bench.against} | not measured yet | - | `--only {bench.name}` |")
    return "\n".join(rows)


def scaling_table() -> str:
    """One row per stage of benchmarks/scaling.py: each size's seconds and peak memory, the
    exponent and the size it is fitted from."""
    path = RESULTS / "scaling.json"
    if not path.exists():
        return "not measured yet: `python benchmarks/regenerate.py --only scaling`"
    kept = json.loads(path.read_text())
    rows = [
        f"Measured {kept['measured_at'][:10]} on {kept['machine']}, {kept['outputs'][0].get('threads', 1)} torch "
        "thread(s) per point (`python benchmarks/regenerate.py --only scaling`).",
        "",
        "| stage | what | N: seconds, peak memory | exponent (fitted from N) |",
        "|---|---|---|---|",
    ]
    for name, stage in kept["outputs"][0]["stages"].items():
        added = set(stage.get("added", []))  # scaling.py --add-to: measured after the sweep
        points = "; ".join(
            f"{p['size']:,}{_added(p) if p['size'] in added else ''}: {p['seconds']:.2f} s, "
            f"{p['peak_anon_mb']:,.0f} MB"
            for p in stage["points"]
        )
        fit = "-" if stage["exponent"] is None else f"{stage['exponent']} (from {stage['fit_from']:,})"
        rows.append(f"| {name} | {stage['what']} | {points} | {fit} |")
    rows += ["", "![cost curves](results/scaling.png)"]
    return "\n".join(rows)


def _added(point: dict) -> str:
    """How the table marks a point measured after the sweep (scaling.py --add-to), with its CPU
    when it says which."""
    return f" (added, {point['cpu']})" if point.get("cpu") else " (added)"


def _replace_between(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{README} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def rewrite_readme() -> None:
    text = _replace_between(README.read_text(), START, END, table())
    if SCALING_START in text:  # benchmarks/README.md has it (a test checks); a trimmed copy may not
        text = _replace_between(text, SCALING_START, SCALING_END, scaling_table())
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS])
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from the kept results")
    args = parser.parse_args()
    if not args.table_only:
        for bench in BENCHMARKS:
            if args.only is None or bench.name in args.only:
                run(bench)
    rewrite_readme()
    print(README)


if __name__ == "__main__":
    main()

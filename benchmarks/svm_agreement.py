"""Agreement of two voc-svm records (e.g. the batched solver and ``--set solver=sklearn`` on the
same checkpoint and data): mAP difference per layer and per low-shot k, and the classes whose
chosen cost differs, with both costs' cross-validated AP to show whether it is a near-tie.

    python benchmarks/svm_agreement.py results/A.json results/B.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cv_gap(la: dict, lb: dict, i: int, record: dict) -> float | None:
    costs = record["details"].get("costs")
    if not costs or "cv_ap_by_cost" not in la:
        return None
    row = la["cv_ap_by_cost"][i]
    return round(row[costs.index(la["costs"][i])] - row[costs.index(lb["costs"][i])], 4)


def compare(a: dict, b: dict) -> dict:
    out: dict = {"layers": {}, "lowshot": {}}
    for layer, la in a["metrics"].get("layers", {}).items():
        lb = b["metrics"].get("layers", {}).get(layer)
        if lb is None:
            continue
        differ = [i for i, (x, y) in enumerate(zip(la["costs"], lb["costs"], strict=True)) if x != y]
        out["layers"][layer] = {
            "mAP": [la["mAP"], lb["mAP"]],
            "diff": round(la["mAP"] - lb["mAP"], 4),
            "classes_with_other_cost": len(differ),
            # class: (cost A, cost B, test AP A, test AP B, CV AP gap in A between its choice and B's)
            "which": {
                i: [la["costs"][i], lb["costs"][i], la["ap"][i], lb["ap"][i], _cv_gap(la, lb, i, a)]
                for i in differ
            },
        }
    ka = a["metrics"].get("lowshot", {}).get("k", {})
    kb = b["metrics"].get("lowshot", {}).get("k", {})
    for k in ka:
        if k in kb:
            out["lowshot"][k] = {
                "mAP": [ka[k]["mean"], kb[k]["mean"]],
                "diff": round(ka[k]["mean"] - kb[k]["mean"], 4),
                "cost": [ka[k]["cost"], kb[k]["cost"]],
            }
    layer_diffs = [abs(v["diff"]) for v in out["layers"].values()]
    k_diffs = [abs(v["diff"]) for v in out["lowshot"].values()]
    out["max_abs_diff"] = {"layers": max(layer_diffs, default=None), "lowshot": max(k_diffs, default=None)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    print(json.dumps(compare(json.loads(args.a.read_text()), json.loads(args.b.read_text())), indent=1))


if __name__ == "__main__":
    main()

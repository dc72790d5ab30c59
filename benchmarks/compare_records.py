"""Compare two results folders record by record, timings aside: the check that a refactor left
every number where it was (``run all`` on a fixed checkpoint before and after)::

    python benchmarks/compare_records.py results-before/ results-after/

Records are paired by task, protocol and protocol variant; what is left out of the comparison is what
changes between any two runs of the same code: timings (``timings``, ``*_s``, ``seconds``,
``images_per_s``), creation time, record id, code versions and the checkpoint file's path.
Prints one line per differing value and exits 1 when any differs (or a record has no partner).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_VOLATILE_KEYS = {"timings", "created_at", "id", "versions", "seconds", "images_per_s", "path", "git_sha"}


def _volatile(key: str) -> bool:
    return key in _VOLATILE_KEYS or key.endswith("_s")


def stable(value: Any) -> Any:
    """``value`` without the keys that differ between two runs of the same computation."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def differences(before: Any, after: Any, where: str = "") -> list[str]:
    """Every path at which ``before`` and ``after`` differ, with both values."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            if key not in after:
                out.append(f"{where}.{key}: only before ({json.dumps(before[key])[:80]})")
            elif key not in before:
                out.append(f"{where}.{key}: only after ({json.dumps(after[key])[:80]})")
            else:
                out.extend(differences(before[key], after[key], f"{where}.{key}"))
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [
            d
            for i, (b, a) in enumerate(zip(before, after, strict=True))
            for d in differences(b, a, f"{where}[{i}]")
        ]
    return [] if before == after else [f"{where}: {json.dumps(before)[:80]} -> {json.dumps(after)[:80]}"]


def load(folder: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    records = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        key = (record["task"], record.get("protocol", ""), record.get("variant", ""))
        records[key] = stable(record)  # the latest of a task, protocol and variant
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = load(args.before), load(args.after)
    failed = False
    for key in sorted(set(before) | set(after)):
        name = key[0] + "".join(f" [{part}]" for part in key[1:] if part)
        if key not in before or key not in after:
            print(f"{name}: only in {'after' if key in after else 'before'}")
            failed = True
            continue
        found = differences(before[key], after[key])
        for line in found:
            print(f"{name}{line}")
        print(f"{name}: {'identical' if not found else f'{len(found)} differences'}")
        failed = failed or bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

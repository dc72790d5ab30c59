"""Result records: one JSON file per run, written atomically, never overwritten.

A record carries everything needed to trust and regroup a number: task, table, dataset (synthetic
or real, with its root), model name and config, checkpoint sha256 and format, metrics, the full
protocol config, seeds, versions (npidbench, torch, git sha), host, timings and creation time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npidbench.atomic import atomic_create
from npidbench.errors import BadInput, RunFailed
from npidbench.provenance import host, versions

SCHEMA_VERSION = 1


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def new_record(
    *,
    task: str,
    family: str,
    table: str,
    dataset: dict[str, Any],
    model: dict[str, Any],
    metrics: dict[str, Any],
    protocol: str,
    config: dict[str, Any],
    variant: str = "",
    seeds: list[int],
    timings: dict[str, Any],
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete record, stamped with versions, host and time."""
    return {
        "schema": SCHEMA_VERSION,
        "id": uuid.uuid4().hex,
        "task": task,
        "family": family,
        "table": table,
        "dataset": dataset,
        "model": model,
        "metrics": metrics,
        "protocol": protocol,
        "variant": variant,
        "config": config,
        "seeds": seeds,
        "details": details or {},
        "versions": versions(),
        "host": host(),
        "timings": timings,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class ResultStore:
    """The folder of records (``--results DIR``, ``NPIDBENCH_RESULTS`` or ./results)."""

    root: Path

    def write(self, record: dict[str, Any]) -> Path:
        """Write a new record file; two concurrent writers both land (unique names, no
        overwrite). A failed write (e.g. a full disk) leaves no partial file behind."""
        stamp = record["created_at"].replace(":", "").replace("-", "").split("+")[0]
        name = f"{stamp}_{_slug(record['task'])}_{_slug(record['model']['name'])}_{record['id'][:8]}.json"
        text = json.dumps(record, indent=2, default=str)  # str(): e.g. version objects in meta
        try:
            return atomic_create(self.root / name, lambda handle: handle.write(text), binary=False)
        except FileExistsError:
            raise  # the same record written twice: a programming error, not a disk problem
        except OSError as exc:
            raise RunFailed(
                f"could not write the result record to {self.root} ({exc.strerror or exc}); "
                "earlier records are untouched: free space or choose --results DIR and rerun"
            ) from exc

    def load(self) -> tuple[list[dict[str, Any]], list[str]]:
        """All readable records, oldest first, and a note for each file that was not one."""
        records, problems = [], []
        if not self.root.is_dir():
            return records, problems
        for path in sorted(self.root.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                problems.append(f"{path}: not a readable record ({exc})")
                continue
            if not _is_record(record):
                problems.append(f"{path}: not an npidbench record (schema {SCHEMA_VERSION})")
                continue
            record["_path"] = str(path)
            records.append(record)
        records.sort(key=lambda r: r.get("created_at", ""))
        return records, problems


def _is_record(record: Any) -> bool:
    """The fields the report relies on are present with the right types."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA_VERSION:
        return False
    for key, kind in (
        ("task", str),
        ("table", str),
        ("created_at", str),
        ("dataset", dict),
        ("model", dict),
        ("metrics", dict),
    ):
        if not isinstance(record.get(key), kind):
            return False
    return isinstance(record["model"].get("name"), str)


def check_results_folder(folder: Path) -> Path:
    """Refuse a results location that cannot hold records, before any work is done."""
    if folder.exists() and not folder.is_dir():
        raise BadInput(
            f"results location {folder} is a file; give a folder with --results or NPIDBENCH_RESULTS"
        )
    return folder

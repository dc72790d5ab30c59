"""Result records: atomic, never overwritten, concurrent writers, a full disk."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from npidbench.errors import RunFailed
from npidbench.results import ResultStore, new_record


def make_record(
    task: str = "knn",
    name: str = "m",
    sha: str = "a" * 64,
    top1: float = 50.0,
    seeds: list[int] | None = None,
    synthetic: bool = True,
    config: str = "-",
    protocol: str = "npid-knn",
) -> dict:
    return new_record(
        task=task,
        family="knn",
        table="knn",
        dataset={
            "name": "imagenet",
            "display": "imagenet (synthetic)" if synthetic else "imagenet",
            "synthetic": synthetic,
            "root": "/data",
        },
        model={"name": name, "config": config, "sha256": sha, "checkpoint": {"sha256": sha}},
        metrics={"top1": {k: top1 + i for i, k in enumerate(("10", "20", "100", "200"))}, "top5": {}},
        protocol=protocol,
        config={"ks": [10, 20, 100, 200]},
        seeds=seeds or [],
        timings={"total_s": 1.0},
    )


def test_record_has_provenance_and_is_valid_json(tmp_path):
    path = ResultStore(tmp_path).write(make_record())
    record = json.loads(path.read_text())
    for key in (
        "task",
        "table",
        "dataset",
        "model",
        "metrics",
        "config",
        "seeds",
        "versions",
        "host",
        "timings",
        "created_at",
    ):
        assert key in record
    assert record["versions"]["npidbench"] and record["versions"]["torch"]


def test_records_are_never_overwritten(tmp_path):
    store = ResultStore(tmp_path)
    record = make_record()
    first = store.write(record)
    with pytest.raises(FileExistsError):
        store.write(record)  # same id and time: same name, refused
    assert json.loads(first.read_text())["id"] == record["id"]


def _write_many(folder: str, records: list[dict]) -> list[str]:
    store = ResultStore(Path(folder))
    return [str(store.write(record)) for record in records]


def test_concurrent_writers_all_land(tmp_path):
    # The records are made here: a worker that stamps its own versions imports torch (seconds each)
    batches = [[make_record(name=f"w{w}", top1=i) for i in range(10)] for w in range(4)]
    with mp.get_context("spawn").Pool(4) as pool:
        paths = sum(pool.starmap(_write_many, [(str(tmp_path), batch) for batch in batches]), [])
    assert len(set(paths)) == 40
    records, problems = ResultStore(tmp_path).load()
    assert len(records) == 40 and not problems
    assert not list(tmp_path.glob(".*.tmp"))


def test_full_disk_leaves_earlier_records_intact(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    earlier = store.write(make_record(name="before"))
    before = earlier.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("npidbench.atomic.os.fsync", disk_full)
    with pytest.raises(RunFailed, match="No space left on device.*earlier records are untouched"):
        store.write(make_record(name="after"))
    assert earlier.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [earlier.name]


def test_unreadable_files_are_reported_not_fatal(tmp_path):
    store = ResultStore(tmp_path)
    store.write(make_record())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    records, problems = store.load()
    assert len(records) == 1 and len(problems) == 2

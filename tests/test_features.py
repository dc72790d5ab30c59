"""Feature extraction and the on-disk cache: hits, resume after a crash, space checks, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from npidbench import cache as cache_module
from npidbench.backbones.resnet import MultiLayerFeatures
from npidbench.cache import FeatureCache
from npidbench.checkpoint import load_backbone
from npidbench.data.images import EvalTransform
from npidbench.errors import BadInput
from npidbench.features import ExtractOptions, ExtractStats, extract

from helpers import interrupt_extraction_at_third_write, tiny_imagefolder

TRANSFORM = EvalTransform(36, 32, "center-crop")
LAYERS = ("Feature2", "AvgPool")
OPTIONS = ExtractOptions(device="cpu", workers=0, batch_size=4)


@pytest.fixture()
def split(tmp_path):
    return tiny_imagefolder(tmp_path / "data")


@pytest.fixture(scope="module")
def backbone(random_checkpoint):
    return load_backbone(random_checkpoint)


def arrays(found):
    return {layer: (np.array(entry.features), np.array(entry.labels)) for layer, entry in found.items()}


def test_second_run_is_a_cache_hit_with_no_forward_pass(backbone, split, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    stats = ExtractStats()
    first = arrays(extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS, stats))
    assert not stats.cache_hit and stats.images == len(split)
    assert first["AvgPool"][0].shape == (len(split), 512)
    assert first["AvgPool"][1].tolist() == [label for _, label in split.samples]

    def no_forward(*args, **kwargs):
        raise AssertionError("a cache hit must not run the backbone")

    monkeypatch.setattr(MultiLayerFeatures, "forward", no_forward)
    stats = ExtractStats()
    second = arrays(extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS, stats))
    assert stats.cache_hit and stats.images == 0
    for layer in LAYERS:
        np.testing.assert_array_equal(first[layer][0], second[layer][0])
    # Each layer is its own entry: asking for one of them is a hit too.
    extract(backbone, split, TRANSFORM, ("AvgPool",), cache, OPTIONS)


def test_features_match_a_direct_forward_pass(backbone, split, tmp_path):
    found = extract(backbone, split, TRANSFORM, ("AvgPool",), FeatureCache(tmp_path / "c"), OPTIONS)
    from npidbench.data.images import decode_rgb, normalize_batch

    image = TRANSFORM(decode_rgb(split.samples[5][0]))[None]
    with torch.inference_mode():
        direct = backbone.model(normalize_batch(image)).numpy()
    np.testing.assert_allclose(found["AvgPool"].features[5], direct[0], rtol=1e-4, atol=1e-5)


def test_changed_transform_or_data_is_a_miss(backbone, split, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    extract(backbone, split, TRANSFORM, ("AvgPool",), cache, OPTIONS)
    stats = ExtractStats()
    extract(backbone, split, EvalTransform(36, 32, "squash"), ("AvgPool",), cache, OPTIONS, stats)
    assert not stats.cache_hit
    other = tiny_imagefolder(tmp_path / "data2", seed=1)
    stats = ExtractStats()
    extract(backbone, other, TRANSFORM, ("AvgPool",), cache, OPTIONS, stats)
    assert not stats.cache_hit
    assert len(cache.entries()) == 3


def test_interrupted_extraction_is_never_complete_and_resumes_identically(
    backbone, split, tmp_path, monkeypatch
):
    reference = arrays(extract(backbone, split, TRANSFORM, LAYERS, FeatureCache(tmp_path / "ref"), OPTIONS))
    cache = FeatureCache(tmp_path / "cache")
    undo = interrupt_extraction_at_third_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS)
    assert all(cache.lookup(k) is None for k in _keys(backbone, split))
    (job,) = cache.partial_jobs()
    assert json.loads((job / "progress-rank0.json").read_text())["done"] == 8

    undo()
    stats = ExtractStats()
    resumed = arrays(extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS, stats))
    assert stats.images == len(split) - 8  # only the rest was computed
    for layer in LAYERS:
        np.testing.assert_array_equal(resumed[layer][0], reference[layer][0])
        np.testing.assert_array_equal(resumed[layer][1], reference[layer][1])
    assert not cache.partial_jobs()


def _keys(backbone, split):
    from npidbench.features import feature_keys

    return feature_keys(backbone, split, TRANSFORM, LAYERS)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from npidbench import cache as cache_module
    from npidbench.cache import FeatureCache
    from npidbench.checkpoint import load_backbone
    from npidbench.data.imagenet import load_imagefolder
    from npidbench.data.images import EvalTransform, ImageList
    from npidbench.features import ExtractOptions, extract
    cache_module.COMMIT_EVERY_S = 0.0
    slow = ImageList.__getitem__
    def slow_getitem(self, index):
        time.sleep(0.15)
        return slow(self, index)
    ImageList.__getitem__ = slow_getitem
    ckpt, data, cache = sys.argv[1:4]
    split = load_imagefolder(Path(data), "train")
    extract(load_backbone(ckpt), split, EvalTransform(36, 32, "center-crop"), ("Feature2", "AvgPool"),
            FeatureCache(Path(cache)), ExtractOptions("cpu", 0, 4))
""")


def test_kill_9_during_extraction_then_rerun(backbone, random_checkpoint, split, tmp_path):
    reference = arrays(extract(backbone, split, TRANSFORM, LAYERS, FeatureCache(tmp_path / "ref"), OPTIONS))
    cache = FeatureCache(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(random_checkpoint), str(split.root), str(cache.root)], env=env
    )
    deadline = time.time() + 120
    progress_seen = 0
    while time.time() < deadline and proc.poll() is None:
        for path in cache.jobs_dir.glob("*/progress-rank0.json") if cache.jobs_dir.exists() else []:
            try:
                progress_seen = json.loads(path.read_text())["done"]
            except (json.JSONDecodeError, OSError):
                pass
        if progress_seen >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress_seen >= 8, "the child never got going"
    assert all(cache.lookup(k) is None for k in _keys(backbone, split))
    stats = ExtractStats()
    resumed = arrays(extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS, stats))
    assert stats.images < len(split)
    for layer in LAYERS:
        np.testing.assert_array_equal(resumed[layer][0], reference[layer][0])


def test_not_enough_disk_space_is_refused_before_extracting(backbone, split, tmp_path, monkeypatch):
    class Usage:
        free = 10 * 1024**2

    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: Usage)
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(
        BadInput,
        match=r"needs .* \(float32\) .* free; --cache-dtype float16 halves it .*, asking for fewer layers",
    ):
        extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS)
    assert not cache.partial_jobs() and not cache.entries()


def test_imagenet_sized_estimate_names_the_size(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    needed = 1_281_167 * (9216 + 9216 + 8192 + 9216 + 8192) * 4
    with pytest.raises(BadInput, match=r"needs 2\d\d\.\d GB"):
        cache.check_space(needed, "Feature1..5")


def test_corrupt_image_is_reported_by_path(backbone, split, tmp_path):
    bad = Path(split.samples[3][0])
    bad.write_bytes(bad.read_bytes()[:200])
    cache = FeatureCache(tmp_path / "cache")
    for workers in (0, 1):
        with pytest.raises(BadInput, match=rf"unreadable image {bad}"):
            extract(backbone, split, TRANSFORM, ("AvgPool",), cache, ExtractOptions("cpu", workers, 4))
    assert not cache.entries()


def _distributed_worker(rank: int, world: int, port: int, ckpt: str, data: str, cache_root: str) -> None:
    import torch.distributed as dist

    from npidbench.data.imagenet import load_imagefolder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        split = load_imagefolder(Path(data), "train")
        extract(load_backbone(ckpt), split, TRANSFORM, LAYERS, FeatureCache(Path(cache_root)), OPTIONS)
    finally:
        dist.destroy_process_group()


def test_two_ranks_extract_their_shards_into_one_entry(backbone, random_checkpoint, split, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache_root = tmp_path / "cache"
    mp.spawn(
        _distributed_worker,
        args=(2, port, str(random_checkpoint), str(split.root), str(cache_root)),
        nprocs=2,
        join=True,
    )
    cache = FeatureCache(cache_root)
    single = arrays(extract(backbone, split, TRANSFORM, LAYERS, FeatureCache(tmp_path / "single"), OPTIONS))
    stats = ExtractStats()
    shared = arrays(extract(backbone, split, TRANSFORM, LAYERS, cache, OPTIONS, stats))
    assert stats.cache_hit
    for layer in LAYERS:
        np.testing.assert_allclose(shared[layer][0], single[layer][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(shared[layer][1], single[layer][1])


def _slow_images(monkeypatch, seconds: float = 0.05) -> None:
    from npidbench.data.images import ImageList

    original = ImageList.__getitem__

    def slow(self, index):
        time.sleep(seconds)
        return original(self, index)

    monkeypatch.setattr(ImageList, "__getitem__", slow)


def test_concurrent_extractions_wait_and_share_the_work(backbone, split, tmp_path, monkeypatch):
    import threading

    _slow_images(monkeypatch)
    cache = FeatureCache(tmp_path / "cache")
    first, second, errors = ExtractStats(), ExtractStats(), []

    def run(layers, stats):
        try:
            extract(backbone, split, TRANSFORM, layers, cache, OPTIONS, stats)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    a = threading.Thread(target=run, args=(("AvgPool",), first))
    b = threading.Thread(target=run, args=(("Feature5", "AvgPool"), second))
    a.start()
    time.sleep(0.3)
    b.start()
    a.join()
    b.join()
    assert not errors
    assert first.layers == ["AvgPool"] and second.layers == ["Feature5"]  # overlap computed once
    assert len(cache.entries()) == 2
    third = ExtractStats()
    extract(backbone, split, TRANSFORM, ("Feature5", "AvgPool"), cache, OPTIONS, third)
    assert third.cache_hit


def test_cache_clear_leaves_a_running_extraction_alone(backbone, split, tmp_path, monkeypatch):
    import threading

    _slow_images(monkeypatch)
    monkeypatch.setattr(cache_module, "COMMIT_EVERY_S", 0.0)
    cache = FeatureCache(tmp_path / "cache")
    errors = []

    def run():
        try:
            extract(backbone, split, TRANSFORM, ("AvgPool",), cache, OPTIONS)
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 30
    while not cache.partial_jobs() and time.time() < deadline:
        time.sleep(0.02)
    assert cache.partial_jobs()
    cache.clear()
    worker.join()
    assert not errors and len(cache.entries()) == 1

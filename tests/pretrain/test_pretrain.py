"""The NPID training loop: outputs, exact resume, NaN stop, Ctrl-C, 2-process equivalence."""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from npidbench.checkpoint import load_backbone
from npidbench.distributed import DistInfo
from npidbench.errors import BadInput, RunFailed
from npidbench.pretrain import train as train_module
from npidbench.pretrain.recipe import Recipe
from npidbench.pretrain.train import pretrain

from helpers import tiny_imagefolder

TINY = Recipe(
    name="tiny",
    arch="resnet18",
    epochs=2,
    batch_size=8,
    lr=0.05,
    lr_batch=8,
    negatives=16,
    input_size=32,
    crop_scale=(0.5, 1.0),
    eval_resize=36,
    eval_crop=32,
    knn_k=5,
    save_every_steps=0,
    save_every_seconds=0,  # every epoch end saves: the resume tests crash between epochs
    workers=0,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain-data")
    tiny_imagefolder(root / "imagenet", classes=3, per_class=8, split="train")
    tiny_imagefolder(root / "imagenet", classes=3, per_class=3, split="val", seed=1)
    return root


def load_resume(out: Path) -> dict:
    return torch.load(out / "resume.pth", weights_only=True)


def test_run_writes_checkpoint_monitor_and_resume(data_root, tmp_path):
    path = pretrain(TINY, tmp_path / "run", data_root)
    assert path == tmp_path / "run" / "last.pth"
    loaded = load_backbone(path)
    meta = loaded.inspection.meta
    assert loaded.inspection.format == "npidbench" and loaded.arch == "resnet18"
    assert meta["recipe"] == "tiny" and meta["epochs"] == 2 and meta["lr_scaled"] == pytest.approx(0.05)
    assert meta["precision"] == "fp32"  # bf16 autocast only on CUDA with amp
    lines = [json.loads(line) for line in (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and all("knn_top1" in line for line in lines)
    state = load_resume(tmp_path / "run")
    assert state["epoch"] == 2 and state["z"] > 0 and state["bank"].shape == (24, 128)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["head"]) == {"head.weight", "head.bias"}  # the head is kept beside the backbone
    assert not any(k.startswith("fc.") for k in checkpoint["state_dict"])
    assert pretrain(TINY, tmp_path / "run", data_root) == path  # the finished run: a no-op
    with pytest.raises(BadInput, match="already holds a run"):
        pretrain(replace(TINY, lr=0.1), tmp_path / "run", data_root)


# 24 images at batch 8: 3 steps per epoch. Step 4 is inside epoch 2; step 3 ends epoch 1, so the
# resumed run starts with no step left in that epoch.
@pytest.mark.parametrize(("stop_at", "where"), [(4, "epoch 2 step 1"), (3, "epoch 1 step 3")])
def test_interrupted_and_resumed_run_is_bit_identical(data_root, tmp_path, monkeypatch, stop_at, where):
    pretrain(TINY, tmp_path / "straight", data_root)
    original = train_module._Trainer.step
    calls = {"n": 0}

    def ctrl_c_on_step(self, images, indices):
        calls["n"] += 1
        if calls["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops after this step
        return original(self, images, indices)

    monkeypatch.setattr(train_module._Trainer, "step", ctrl_c_on_step)
    with pytest.raises(RunFailed, match=f"interrupted at {where}.*--resume"):
        pretrain(TINY, tmp_path / "resumed", data_root)
    monkeypatch.setattr(train_module._Trainer, "step", original)
    pretrain(TINY, tmp_path / "resumed", data_root, resume=True)
    a, b = load_resume(tmp_path / "straight"), load_resume(tmp_path / "resumed")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert (
        torch.equal(a["bank"], b["bank"])
        and a["z"] == b["z"]
        and a["history"][-1]["loss"] == b["history"][-1]["loss"]
    )


@pytest.mark.parametrize(("every_seconds", "saves"), [(0, 3), (3600, 1)])
def test_epoch_ends_save_at_most_every_save_every_seconds(data_root, tmp_path, monkeypatch, every_seconds, saves):
    # 3 short epochs: with an hour between saves only the last epoch's end writes resume.pth and
    # last.pth (the monitor lines of the others are kept in it); with 0 every epoch end does.
    written = []
    original = train_module._Trainer.save_checkpoint

    def counting(self, epochs_done):
        written.append(epochs_done)
        return original(self, epochs_done)

    monkeypatch.setattr(train_module._Trainer, "save_checkpoint", counting)
    pretrain(replace(TINY, epochs=3, knn_every=0, save_every_seconds=every_seconds), tmp_path / "run", data_root)
    assert written == [1, 2, 3][-saves:]
    state = load_resume(tmp_path / "run")
    assert state["epoch"] == 3 and [line["epoch"] for line in state["history"]] == [1, 2, 3]


def test_resume_from_a_mid_epoch_save_after_a_crash(data_root, tmp_path, monkeypatch):
    recipe = replace(TINY, save_every_steps=2)
    pretrain(recipe, tmp_path / "straight", data_root)
    original = train_module._Trainer.step
    calls = {"n": 0}

    def crash_on_step_5(self, images, indices):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("simulated crash")
        return original(self, images, indices)

    monkeypatch.setattr(train_module._Trainer, "step", crash_on_step_5)
    with pytest.raises(MemoryError):
        pretrain(recipe, tmp_path / "crashed", data_root)
    assert load_resume(tmp_path / "crashed")["global_step"] == 4  # the last save before the crash
    monkeypatch.setattr(train_module._Trainer, "step", original)
    pretrain(recipe, tmp_path / "crashed", data_root, resume=True)
    a, b = load_resume(tmp_path / "straight"), load_resume(tmp_path / "crashed")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    recipe = replace(TINY, epochs=3, knn_every=0)
    original = train_module.nce_loss
    calls = {"n": 0}

    def nan_on_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_module, "nce_loss", nan_on_step_5)
    with pytest.raises(RunFailed, match="loss became nan at epoch 2 step 2.*last good checkpoints"):
        pretrain(recipe, tmp_path / "run", data_root)
    state = load_resume(tmp_path / "run")
    assert state["epoch"] == 1 and state["step"] == 0  # the end of epoch 1, untouched
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["meta"]["epochs"] == 1


def test_resume_refuses_a_changed_recipe(data_root, tmp_path):
    pretrain(replace(TINY, epochs=1, knn_every=0), tmp_path / "run", data_root)
    with pytest.raises(BadInput, match="different recipe.*lr"):
        pretrain(replace(TINY, epochs=2, lr=0.1, knn_every=0), tmp_path / "run", data_root, resume=True)
    with pytest.raises(BadInput, match="nothing to resume"):
        pretrain(TINY, tmp_path / "empty", data_root, resume=True)
    path = pretrain(
        replace(TINY, epochs=2, knn_every=0), tmp_path / "run", data_root, resume=True
    )  # more epochs
    assert torch.load(path, weights_only=True)["meta"]["epochs"] == 2


def _join_process_group_env(rank: int, world: int, port: int) -> None:
    """What torchrun sets for a rank: the process group meets on 127.0.0.1 (gloo on CPUs)."""
    os.environ.update(
        {
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def _rank_main(
    rank: int, world: int, port: int, recipe: Recipe, out: str, data_root: str, dtype: torch.dtype
) -> None:
    _join_process_group_env(rank, world, port)
    torch.set_num_threads(1)
    pretrain(recipe, Path(out), Path(data_root), dtype=dtype)


def test_two_processes_equal_one_process_with_twice_the_batch(data_root, tmp_path):
    """The runs are equivalent, not merely close: in float64 they agree to ~1e-15 on any CPU.

    In float32 they differ by the kernels' summation order (1 thread per rank vs 2 in one
    process, batch 4 vs 8 blocking): about 2e-7 relative on one AMD EPYC, beyond 1e-4 on another
    after 3 steps. float64 leaves that noise ~1e-16 and the bound can be tight everywhere."""
    # BatchNorm in eval mode: per-rank batch statistics would differ from one process's.
    # 16 px inputs keep float64 convolutions cheap (layer4 still sees a 1 x 1 map).
    recipe = replace(TINY, epochs=1, batch_size=8, knn_every=0, freeze_bn=True, input_size=16)
    single = tmp_path / "single"
    pretrain(recipe, single, data_root, dtype=torch.float64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _rank_main,
        args=(2, port, recipe, str(tmp_path / "double"), str(data_root), torch.float64),
        nprocs=2,
        join=True,
    )
    a, b = load_resume(single), load_resume(tmp_path / "double")
    assert a["global_step"] == b["global_step"] == 3 and b["world_size"] == 2
    assert a["bank"].dtype == torch.float64 and a["model"]["backbone.conv1.weight"].dtype == torch.float64
    assert a["z"] == pytest.approx(b["z"], rel=1e-12)
    torch.testing.assert_close(a["bank"], b["bank"], rtol=1e-9, atol=1e-12)
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-9, atol=1e-12, msg=key)


def test_weight_decay_covers_every_parameter_unless_the_recipe_excludes_norm_and_bias(data_root, tmp_path):
    """lemniscate and mmselfsup: SGD(model.parameters(), weight_decay=1e-4), BN and biases too."""
    world = DistInfo(rank=0, world_size=1, device="cpu")
    paper = train_module._Trainer(replace(TINY, knn_every=0), tmp_path / "a", data_root, world)
    groups = [g for g in paper.optimizer.param_groups if g["weight_decay"] > 0]
    assert sum(len(g["params"]) for g in groups) == len(list(paper.model.parameters()))
    assert replace(TINY).norm_bias_decay  # the paper's default
    excluded = train_module._Trainer(
        replace(TINY, knn_every=0, norm_bias_decay=False), tmp_path / "b", data_root, world
    )
    undecayed = [p for g in excluded.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert undecayed and all(p.ndim == 1 for p in undecayed)


@pytest.mark.gpu
def test_gpu_run_with_amp(data_root, tmp_path):
    path = pretrain(replace(TINY, epochs=1, amp=True), tmp_path / "gpu", data_root, device="cuda")
    assert torch.load(path, weights_only=True)["meta"]["epochs"] == 1


@pytest.mark.gpu
def test_two_gpu_ranks_with_sync_bn(data_root, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = replace(TINY, epochs=1, sync_bn=True, knn_every=0)
    mp.spawn(
        _rank_main_cuda, args=(2, port, recipe, str(tmp_path / "sync"), str(data_root)), nprocs=2, join=True
    )
    assert load_resume(tmp_path / "sync")["world_size"] == 2


def _rank_main_cuda(rank: int, world: int, port: int, recipe: Recipe, out: str, data_root: str) -> None:
    _join_process_group_env(rank, world, port)
    pretrain(recipe, Path(out), Path(data_root), device="cuda")


def test_no_recipe_on_real_data_is_the_papers_not_the_cpu_sized_one(data_root, tmp_path):
    from npidbench.cli import main
    from npidbench.data.synthetic import ensure_suite
    from npidbench.pretrain.recipe import DEFAULT_RECIPE, PAPER_RECIPE, load_recipe

    assert load_recipe(None, []).name == DEFAULT_RECIPE  # the embedded data
    assert load_recipe(None, [], ensure_suite()).name == DEFAULT_RECIPE  # a synthetic suite on disk
    assert load_recipe(None, [], data_root).name == PAPER_RECIPE  # real data
    assert load_recipe(DEFAULT_RECIPE, [], data_root).name == DEFAULT_RECIPE  # named: as asked
    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--data-root", str(data_root), "--set", "epochs=0", "--out", str(tmp_path / "r")])
    assert done.value.code in (0, None)
    meta = torch.load(tmp_path / "r" / "last.pth", weights_only=True)["meta"]
    assert meta["recipe"] == PAPER_RECIPE and torch.load(tmp_path / "r" / "last.pth")["arch"] == "resnet50"


def test_resume_without_a_recipe_continues_the_runs_own_and_old_files_keep_their_decay(data_root, tmp_path):
    from npidbench.cli import main
    from npidbench.pretrain.recipe import recipe_from_dict, resume_recipe

    out = tmp_path / "run"
    pretrain(replace(TINY, epochs=1, knn_every=0), out, data_root)
    assert resume_recipe(out, ["epochs=2"]) == replace(TINY, epochs=2, knn_every=0)
    early = tmp_path / "early"  # killed in its first epoch: only resume.pth holds the recipe
    early.mkdir()
    (early / "resume.pth").write_bytes((out / "resume.pth").read_bytes())
    assert resume_recipe(early, []) == replace(TINY, epochs=1, knn_every=0)
    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--out", str(out), "--resume", "--data-root", str(data_root), "--set", "epochs=2"])
    assert done.value.code in (0, None)
    assert torch.load(out / "last.pth", weights_only=True)["meta"]["epochs"] == 2
    # a resume file on other data is refused in one line, not a shape error
    with pytest.raises(BadInput, match="resume with the --data-root"):
        pretrain(replace(TINY, epochs=3, knn_every=0), out, None, resume=True)
    # files written before norm_bias_decay existed were made without decay on BN and biases
    recorded = {k: v for k, v in TINY.to_dict().items() if k != "norm_bias_decay"}
    assert recipe_from_dict(recorded).norm_bias_decay is False

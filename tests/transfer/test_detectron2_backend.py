"""The detectron2 backend (``--set backend=detectron2``) run for real where detectron2 is
installed (CI installs the project's CPU wheel from ../shared/wheels), and npidbench's COCO
evaluation against detectron2's COCOEvaluator on the same detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from npidbench.checkpoint.own import npidbench_checkpoint, save_npidbench_checkpoint
from npidbench.data import load_detection_split
from npidbench.data.voc import find_year_dir
from npidbench.errors import BadInput, RunFailed
from npidbench.metrics_dense import coco_metrics
from npidbench.runner import resolve_config
from npidbench.tasks import get_preset
from npidbench.transfer.detectron2_backend import coco_entry, config_pairs, voc_entry

from checkpoint_zoo import random_resnet
from helpers import run_preset


def _pairs(config, head: str, depth: int, tmp_path, device: str = "cuda") -> dict:
    flat = config_pairs(config, head, depth, 20, tmp_path / "w.pkl", ("a",), ("b",), tmp_path, device)
    return dict(zip(flat[::2], flat[1::2], strict=True))


def test_resnet18_and_34_build_detectron2s_basic_block_fpn_and_cpus_use_its_all_reduce_bn(tmp_path):
    config = resolve_config(get_preset("det-coco"), True, [])
    small = _pairs(config, "fpn", 18, tmp_path, "cpu")
    assert small["MODEL.RESNETS.DEPTH"] == 18 and small["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert small["MODEL.DEVICE"] == "cpu"
    norms = {small[k] for k in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM")}
    assert norms == {"naiveSyncBN"}  # torch's SyncBatchNorm has no CPU kernel
    large = _pairs(config, "fpn", 50, tmp_path)
    assert large["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 256 and large["MODEL.RESNETS.NORM"] == "SyncBN"
    with pytest.raises(BadInput, match="C4 head's res5 of Bottleneck blocks.*ResNet-34.*head=fpn"):
        _pairs(resolve_config(get_preset("det-voc0712"), True, []), "c4", 34, tmp_path)


def test_a_cut_test_split_is_registered_as_its_own_files(tmp_path):
    coco = load_detection_split("coco", "val2017", None)
    name, path, images = coco_entry(coco, tmp_path)
    assert path == coco.root / "annotations" / "instances_val2017.json"  # whole split: the real file
    coco.images = coco.images[:3]
    cut_name, cut_path, cut_images = coco_entry(coco, tmp_path)
    subset = json.loads(cut_path.read_text())
    ids = [image.image_id for image in coco.images]
    assert [entry["id"] for entry in subset["images"]] == ids and cut_images == images
    assert {entry["image_id"] for entry in subset["annotations"]} <= set(ids) and subset["annotations"]
    assert cut_name != name

    voc = load_detection_split("voc07", "test", None)
    year_dir = find_year_dir(voc.root, "2007")
    voc.images = voc.images[:5]
    _, shadow, split, year = voc_entry(year_dir, "test", "2007", voc, tmp_path)
    assert (split, year) == ("test", "2007")
    listed = (shadow / "ImageSets" / "Main" / "test.txt").read_text().split()
    assert listed == [Path(image.path).stem for image in voc.images]
    assert (shadow / "Annotations").resolve() == (year_dir / "Annotations").resolve()


def _detections(split, seed: int = 0) -> list[tuple[int, dict]]:
    """Detections near and far from the ground truth, with tied scores, and mask probabilities."""
    rng = np.random.default_rng(seed)
    outputs = []
    for index, image in enumerate(split.images):
        height, width = 84, 112
        boxes, labels, scores = [], [], []
        for box, label in zip(image.boxes, image.labels, strict=True):
            for _ in range(2):
                boxes.append(box + rng.normal(0, 3, 4))
                labels.append(label + 1 if rng.random() < 0.8 else rng.integers(1, len(split.classes) + 1))
                scores.append(round(float(rng.random()), 1))  # ties
        for _ in range(2):
            x0, y0 = rng.uniform(0, 80), rng.uniform(0, 60)
            boxes.append([x0, y0, x0 + rng.uniform(5, 30), y0 + rng.uniform(5, 20)])
            labels.append(rng.integers(1, len(split.classes) + 1))
            scores.append(float(rng.random()))
        box_tensor = torch.tensor(np.array(boxes), dtype=torch.float32)
        box_tensor[:, 0::2] = box_tensor[:, 0::2].clamp(0, width)
        box_tensor[:, 1::2] = box_tensor[:, 1::2].clamp(0, height)
        masks = torch.full((len(boxes), 1, height, width), 0.2)  # probabilities, as pasted
        for k, (x0, y0, x1, y1) in enumerate(box_tensor.round().int().tolist()):
            masks[k, 0, y0:y1, x0:x1] = 0.9
            masks[k, 0, y0:y1, x0] = 0.5  # kept: both binarise at >= 0.5
        outputs.append(
            (
                index,
                {
                    "boxes": box_tensor,
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "scores": torch.tensor(scores, dtype=torch.float32),
                    "masks": masks,
                },
            )
        )
    return outputs


def test_coco_ap_agrees_exactly_with_detectron2s_coco_evaluator(tmp_path):
    pytest.importorskip("detectron2.evaluation")
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    split = load_detection_split("coco", "val2017", None)
    split.images = split.images[:40]
    outputs = _detections(split)
    ours = coco_metrics(split, outputs, masks=True)

    name, annotations, images = coco_entry(split, tmp_path)
    register_coco_instances(name, {}, str(annotations), str(images))
    DatasetCatalog.get(name)  # loads the json: the metadata's category id mapping
    evaluator = COCOEvaluator(name, output_dir=None)
    evaluator.reset()
    for index, result in outputs:
        image = split.images[index]
        instances = Instances((84, 112))
        instances.pred_boxes = Boxes(result["boxes"])
        instances.scores = result["scores"]
        instances.pred_classes = result["labels"] - 1
        instances.pred_masks = result["masks"][:, 0] >= 0.5  # detectron2's paste_masks_in_image
        evaluator.process([{"image_id": image.image_id}], [{"instances": instances}])
    theirs = evaluator.evaluate()
    for task, suffix in (("bbox", "Box"), ("segm", "Mask")):
        for metric in ("AP", "AP50", "AP75"):
            assert ours[f"{metric}({suffix})"] == theirs[task][metric], (task, metric)
    assert 5 < ours["AP(Box)"] < 95  # a case that tests something


@pytest.fixture(scope="module")
def random_resnet50(tmp_path_factory: pytest.TempPathFactory):
    """A random-init ResNet-50 in this project's format: detectron2's C4 head is Bottleneck-only."""
    path = tmp_path_factory.mktemp("r50") / "random50.pth"
    meta = {"recipe": "test-random", "epochs": 0, "seed": 2}
    save_npidbench_checkpoint(path, npidbench_checkpoint(random_resnet("resnet50", seed=2), "resnet50", meta))
    return path


COCO_METRICS = {"AP(Box)", "AP50(Box)", "AP75(Box)", "AP(Mask)", "AP50(Mask)", "AP75(Mask)"}


@pytest.mark.parametrize(
    ("preset", "table", "metrics"),
    [
        ("det-coco", "detection-coco", COCO_METRICS),
        ("det-voc0712", "detection-voc", {"mAP", "AP50", "AP75"}),
    ],
)
def test_detectron2_backend_trains_and_tests_end_to_end_on_the_embedded_data(
    random_checkpoint, random_resnet50, tmp_path, preset, table, metrics
):
    """The backend really run: detectron2's own trainer and evaluator on the embedded data (COCO:
    a ResNet-18 Mask R-CNN FPN; VOC07+12: MoCo's R50-C4), a few iterations; the record lands in
    the table of the built-in backend's."""
    pytest.importorskip("detectron2.engine")
    checkpoint = random_checkpoint if preset == "det-coco" else random_resnet50
    options = [
        "backend=detectron2",
        "iterations=2",
        "milestones=[1]",
        "window=2",
        "test_images=3",
        "precise_bn=2",
    ]
    record = run_preset(preset, checkpoint, tmp_path, options)
    assert record["details"]["backend"] == "detectron2" and record["table"] == table
    assert set(record["metrics"]) - {"trials"} == metrics
    assert record["dataset"]["test"]["images"] == 3
    (speed,) = record["details"]["history"][0]  # detectron2's own timer, one entry per trial
    assert speed["iterations"] == 2 and speed["train_seconds"] > 0 and speed["loss"] > 0


def test_detectron2_backend_resumes_a_killed_run_to_the_same_metrics(
    random_checkpoint, tmp_path, monkeypatch
):
    """Killed right after detectron2's first periodic checkpoint and run again, the trial resumes
    there (model, optimizer, schedule, RNG, data stream) and ends with the uninterrupted run's
    metrics, exactly."""
    hooks = pytest.importorskip("detectron2.engine.hooks")
    options = [
        "backend=detectron2",
        "iterations=4",
        "milestones=[3]",
        "window=2",
        "test_images=3",
        "precise_bn=2",
    ]
    straight = run_preset("det-coco", random_checkpoint, tmp_path / "a", options)

    real_after_step, saved = hooks.PeriodicCheckpointer.after_step, []

    def killed_after_first_checkpoint(self):
        real_after_step(self)
        saved.append(self.trainer.iter)
        if self.trainer.iter == 1:  # model_0000001.pth is on disk: as kill -9 right after it
            raise KeyboardInterrupt

    monkeypatch.setattr(hooks.PeriodicCheckpointer, "after_step", killed_after_first_checkpoint)
    with pytest.raises((RunFailed, KeyboardInterrupt)):
        run_preset("det-coco", random_checkpoint, tmp_path / "b", options)
    resumed = run_preset("det-coco", random_checkpoint, tmp_path / "b", options)
    assert saved == [0, 1, 2, 3]  # the resumed run started at iteration 2
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["details"]["history"][0][0]["iterations"] == 2


def test_a_backbone_detectron2_did_not_load_as_converted_is_refused(tmp_path):
    """check_backbone_loaded: equal tensors pass; a tensor left at its initial value, one the
    built model lacks, or one the checkpoint lacks is one line (a silent random layer otherwise)."""
    import pickle
    from types import SimpleNamespace

    from torch import nn

    from npidbench.transfer.detectron2_backend import check_backbone_loaded

    bottom_up = nn.Module()
    bottom_up.stem = nn.Conv2d(3, 4, 3)
    model = SimpleNamespace(backbone=SimpleNamespace(bottom_up=bottom_up), roi_heads=nn.Module())
    converted = {k: v.numpy().copy() for k, v in bottom_up.state_dict().items()}

    def check(state: dict) -> None:
        path = tmp_path / "w.pkl"
        path.write_bytes(pickle.dumps({"model": state}))
        check_backbone_loaded(model, path)

    check(converted)
    with pytest.raises(BadInput, match=r"loaded differently: \['stem.weight'\]"):
        check({**converted, "stem.weight": converted["stem.weight"] + 1})
    with pytest.raises(BadInput, match=r"not in detectron2's model: \['res5.0.conv1.weight'\]"):
        check({**converted, "res5.0.conv1.weight": np.zeros(1)})
    with pytest.raises(BadInput, match=r"not in the checkpoint: \['stem.bias'\]"):
        check({"stem.weight": converted["stem.weight"]})

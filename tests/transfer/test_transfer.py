"""Detection and segmentation transfer: models built from the checkpoint, conversion, end to end."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from npidbench.backbones.resnet import build_resnet
from npidbench.checkpoint import load_backbone
from npidbench.checkpoint.formats import to_detectron2_name
from npidbench.errors import BadInput, RunFailed
from npidbench.report import build_tables, render
from npidbench.transfer.detection import build_detector
from npidbench.transfer.segmentation import FCNSegmenter, dilate_resnet, sliding_logits

from helpers import interrupt_after_first_window, run_preset


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d"])
def test_dilation_gives_output_stride_8_with_the_same_weights(arch):
    torch.manual_seed(0)
    model = build_resnet(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dilate_resnet(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))  # resnet50d: deep conv1, same relu
        res4 = model.layer3(model.layer2(model.layer1(x)))
        res5 = model.layer4(res4)
    assert res4.shape[-2:] == res5.shape[-2:] == (8, 8)
    # contract_dilation: the first block of layer4 at dilation 2, the others at 4
    first = model.layer4[0].conv2 if arch != "resnet18" else model.layer4[0].conv1
    later = model.layer4[1].conv2 if arch != "resnet18" else model.layer4[1].conv1
    assert first.dilation == (2, 2) and later.dilation == (4, 4) and first.stride == (1, 1)


@pytest.mark.parametrize(
    "arch, widths", [("resnet50", (2048, 512, 1024, 256)), ("resnet18", (512, 128, 256, 64))]
)
def test_fcn_heads_of_the_protocol(arch, widths):
    model = FCNSegmenter(build_resnet(arch), 21)
    main_in, main_width, aux_in, aux_width = widths
    assert model.head.convs[0][0].in_channels == main_in and model.head.convs[0][0].out_channels == main_width
    assert (
        len(model.head.convs) == 2 and model.head.fuse[0].in_channels == main_in + main_width
    )  # concat input
    assert model.aux_head.convs[0][0].in_channels == aux_in and model.aux_head.fuse is None
    assert model.head.classifier.out_channels == 21 and model.head.dropout.p == 0.1
    assert FCNSegmenter.AUX_WEIGHT == 0.4
    if arch == "resnet18":
        main, aux = model.train()(torch.randn(2, 3, 48, 40))
        assert main.shape == aux.shape == (2, 21, 48, 40)
        model.eval()
        image = torch.randn(1, 3, 40, 56)
        whole = model(image)[0]
        assert torch.allclose(sliding_logits(model, image, 64, 32, 21), whole)  # one window
        assert sliding_logits(model, image, 32, 16, 21).shape == whole.shape


def test_c4_detector_carries_the_checkpoint_weights_and_trains_every_bn(random_checkpoint):
    loaded = load_backbone(random_checkpoint)
    reference = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    model = build_detector(loaded.model, "c4", 20, (64, 80), 160, 80)
    res5 = model.roi_heads.box_head.res5.state_dict()
    assert res5.keys() and all(torch.equal(v, reference[f"layer4.{k}"]) for k, v in res5.items())
    trunk = model.backbone.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in trunk.items())
    assert len(trunk) + len(res5) == len(reference)  # every backbone tensor is used
    assert model.roi_heads.box_head.norm.num_features == 512  # MoCo's extra BN after res5
    assert not any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0
    assert model.rpn.head.conv[0][0].in_channels == 256  # res4 of a ResNet-18
    model.eval()
    assert model.transform.min_size == (80,)
    model.train()
    assert model.transform.min_size == (64, 80)


def test_fpn_detector_has_bn_in_neck_and_heads(random_checkpoint):
    loaded = load_backbone(random_checkpoint)
    reference = loaded.model.state_dict()
    model = build_detector(loaded.model, "fpn", 20, (64,), 160, 64)
    body = model.backbone.body.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in body.items())
    for part in (model.backbone.fpn, model.roi_heads.box_head, model.roi_heads.mask_head):
        assert any(isinstance(m, nn.BatchNorm2d) for m in part.modules())
    assert not any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in model.modules())


def test_detectron2_conversion_maps_every_key_to_the_known_layout():
    state = torchvision.models.resnet50(weights=None).state_dict()
    names = {to_detectron2_name(k): v.shape for k, v in state.items() if not k.startswith("fc.")}
    assert len(names) == len(state) - 2  # every backbone key, no two onto one name
    pattern = re.compile(
        r"^(stem\.conv1(\.norm)?|res[2-5]\.\d+\.(conv[1-3](\.norm)?|shortcut(\.norm)?))\.[a-z_]+$"
    )
    assert all(pattern.match(name) for name in names), [n for n in names if not pattern.match(n)][:3]
    assert names["stem.conv1.weight"] == (64, 3, 7, 7)
    assert names["stem.conv1.norm.running_var"] == (64,)
    assert names["res2.0.shortcut.weight"] == (256, 64, 1, 1)
    assert names["res2.0.shortcut.norm.bias"] == (256,)
    assert names["res5.2.conv3.weight"] == (2048, 512, 1, 1)
    assert names["res4.5.conv2.norm.weight"] == (256,)
    assert sum(n.startswith("res4.") and n.endswith("conv1.weight") for n in names) == 6


@pytest.mark.slow
def test_segmentation_runs_resumes_and_reports_trials(random_checkpoint, tmp_path, monkeypatch):
    options = ["iterations=4", "window=2", "batch_size=2", "test_images=8", "crop=48"]
    straight = run_preset("seg-voc12aug", random_checkpoint, tmp_path / "a", options)
    assert straight["dataset"]["test"]["images"] == 8
    assert 0 <= straight["metrics"]["mIoU"] <= 100 and len(straight["metrics"]["per_class_iou"]) == 21
    assert straight["details"]["lr_scaled"] == pytest.approx(0.02 * 2 / 8)  # the profile's lr at its batch 8
    assert "std" not in straight["metrics"] and "mIoU_std" not in straight["metrics"]  # one trial

    saves = interrupt_after_first_window(monkeypatch)
    with pytest.raises(RunFailed, match="interrupted after 1 of 2"):
        run_preset("seg-voc12aug", random_checkpoint, tmp_path / "b", options)
    resumed = run_preset("seg-voc12aug", random_checkpoint, tmp_path / "b", options)
    assert saves == [1, 2]
    assert resumed["metrics"] == straight["metrics"]

    monkeypatch.undo()
    trials = run_preset(
        "seg-voc12aug", random_checkpoint, tmp_path / "t", [*options[:-1], "crop=48", "trials=2"]
    )
    assert trials["seeds"] == [0, 1] and len(trials["metrics"]["trials"]) == 2
    assert all(isinstance(v, float) for v in trials["metrics"]["trials"])
    spread = trials["metrics"]["std"]  # detection's form: metric -> sample std over the trials
    assert set(spread) == {"mIoU"} and spread["mIoU"] == pytest.approx(
        float(np.std(trials["metrics"]["trials"], ddof=1))
    )
    (table,) = build_tables([trials])
    assert table.title == "Pascal VOC 2012 + Aug Segmentation (synthetic data)"
    assert "±" in table.frame["mIOU"].iloc[0]
    header = next(line for line in render([table], "markdown").splitlines() if line.startswith("| Model"))
    assert [cell.strip() for cell in header.strip().strip("|").split("|")] == ["Model", "Config", "mIOU"]


@pytest.mark.slow
def test_voc_detection_end_to_end(random_checkpoint, tmp_path):
    record = run_preset(
        "det-voc0712",
        random_checkpoint,
        tmp_path,
        ["iterations=2", "window=1", "batch_size=2", "test_images=4", "precise_bn=1"],
    )
    assert set(record["metrics"]) >= {"mAP", "AP50", "AP75", "trials"}
    assert all(0 <= record["metrics"][k] <= 100 for k in ("mAP", "AP50", "AP75"))
    assert record["dataset"]["test"]["images"] == 4 and record["protocol"] == "faster-rcnn-c4"
    schedule = record["details"]["schedule"]  # the iterations trained, stated in the record
    assert [schedule[k] for k in ("epochs", "iterations", "window", "warmup")] == [0, 2, 1, 5]
    assert record["details"]["weight_decay"] == {"default": 1e-4, "norm": 0.0}  # detectron2's default
    (table,) = build_tables([record])
    assert table.title == "Pascal VOC 2007 + 2012 Detection (synthetic data)"
    assert list(table.frame.columns) == ["Model", "Config", "mAP", "AP50"]


@pytest.mark.slow
def test_coco_mask_rcnn_end_to_end(random_checkpoint, tmp_path):
    record = run_preset(
        "det-coco",
        random_checkpoint,
        tmp_path,
        ["iterations=1", "window=1", "batch_size=2", "test_images=3", "precise_bn=1"],
    )
    keys = {"AP(Box)", "AP50(Box)", "AP75(Box)", "AP(Mask)", "AP50(Mask)", "AP75(Mask)"}
    assert keys <= set(record["metrics"])
    assert record["details"]["schedule"]["iterations"] == 1 and record["details"]["schedule"]["epochs"] == 0
    assert record["details"]["weight_decay"] == {"default": 1e-4, "norm": 1e-4}  # mmdetection decays all
    (table,) = build_tables([record])
    assert table.title == "COCO2017 Detection and Instance Segmentation (synthetic data)"
    assert list(table.frame.columns) == [
        "Model",
        "Config",
        "mAP(Box)",
        "AP50(Box)",
        "AP75(Box)",
        "mAP(Mask)",
        "AP50(Mask)",
        "AP75(Mask)",
    ]


def test_detectron2_config_follows_mocos_c4_config(tmp_path):
    from npidbench.runner import resolve_config
    from npidbench.tasks import get_preset
    from npidbench.transfer.detectron2_backend import config_pairs

    config = resolve_config(get_preset("det-voc0712"), False, [])
    flat = config_pairs(config, "c4", 50, 20, tmp_path / "w.pkl", ("a", "b"), ("c",), tmp_path)
    pairs = dict(zip(flat[::2], flat[1::2], strict=True))
    assert pairs["MODEL.RESNETS.STRIDE_IN_1X1"] is False and pairs["MODEL.RESNETS.NORM"] == "SyncBN"
    assert pairs["MODEL.BACKBONE.FREEZE_AT"] == 0 and pairs["INPUT.FORMAT"] == "RGB"
    assert pairs["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
    assert pairs["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert (pairs["SOLVER.MAX_ITER"], pairs["SOLVER.STEPS"], pairs["SOLVER.WARMUP_ITERS"]) == (
        24000,
        (18000, 22000),
        100,
    )
    assert (pairs["SOLVER.IMS_PER_BATCH"], pairs["SOLVER.BASE_LR"]) == (16, 0.02)
    assert pairs["INPUT.MIN_SIZE_TRAIN"] == tuple(range(480, 801, 32)) and pairs["INPUT.MIN_SIZE_TEST"] == 800
    assert pairs["TEST.PRECISE_BN.ENABLED"] is True and pairs["MODEL.MASK_ON"] is False
    assert pairs["SOLVER.WEIGHT_DECAY_NORM"] == 0.0  # MoCo's configs keep detectron2's default
    fpn = dict(
        zip(*[iter(config_pairs(config, "fpn", 50, 80, tmp_path, ("a",), ("b",), tmp_path))] * 2, strict=True)
    )
    assert (
        fpn["MODEL.FPN.NORM"] == fpn["MODEL.ROI_BOX_HEAD.NORM"] == fpn["MODEL.ROI_MASK_HEAD.NORM"] == "SyncBN"
    )
    assert fpn["MODEL.MASK_ON"] is True
    with pytest.raises(BadInput, match="ResNet-18.*torchvision backend"):
        config_pairs(config, "c4", 18, 20, tmp_path, ("a",), ("b",), tmp_path)


def test_asking_for_detectron2_without_it_says_how_to_install(random_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # as on a machine without it (CI has it)
    with pytest.raises(
        BadInput, match=r"backend=detectron2: detectron2 is not installed.*pip install 'git\+https"
    ):
        run_preset("det-voc0712", random_checkpoint, tmp_path, ["backend=detectron2"])
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))


def test_dense_families_record_the_spread_only_over_several_trials():
    from npidbench.tasks.dense import TrialResult, dataset_record, metrics_over_trials

    one = [TrialResult({"mAP": 40.0, "AP50": 60.0}, [])]
    assert metrics_over_trials(one, [t.metrics for t in one]) == {
        "mAP": 40.0,
        "AP50": 60.0,
        "trials": [{"mAP": 40.0, "AP50": 60.0}],
    }
    two = [*one, TrialResult({"mAP": 42.0, "AP50": 61.0}, [])]
    metrics = metrics_over_trials(two, [t.metrics["mAP"] for t in two])
    assert metrics["mAP"] == 41.0 and metrics["trials"] == [40.0, 42.0]
    assert metrics["std"] == pytest.approx({"mAP": 2**0.5, "AP50": 0.5**0.5})

    class Split(list):
        split, root, classes, synthetic = "val", Path("/d"), ["a", "b"], True

    record = dataset_record("voc12aug", Split([1, 2, 3]), Split([1]), "f", test_extra={"objects": 5})
    assert record == {
        "name": "voc12aug",
        "display": "voc12aug (synthetic)",
        "synthetic": True,
        "root": "/d",
        "fingerprint": "f",
        "train": {"split": "val", "images": 3},
        "test": {"split": "val", "images": 1, "objects": 5},
        "classes": 2,
    }


@pytest.mark.parametrize("head", ["c4", "fpn"])
def test_deep_stem_resnets_carry_every_tensor_into_both_detectors(head):
    """timm's ResNet-D (a Sequential deep stem, average-pool shortcuts) in the C4 and FPN
    detectors: every backbone tensor is the checkpoint's, and a forward pass runs."""
    torch.manual_seed(0)
    resnet = build_resnet("resnet18d")
    reference = {k: v.clone() for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    model = build_detector(resnet, head, 20, (64,), 96, 64)
    if head == "c4":
        used = {
            **model.backbone.state_dict(),
            **{f"layer4.{k}": v for k, v in model.roi_heads.box_head.res5.state_dict().items()},
        }
    else:
        used = {k: v for k, v in model.backbone.body.state_dict().items()}
    assert "conv1.0.weight" in used and "layer2.0.downsample.1.weight" in used  # deep stem, ResNet-D shortcut
    assert all(torch.equal(used[k], reference[k]) for k in used)
    assert set(used) == set(reference) if head == "c4" else set(used) <= set(reference)
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 80)])
    assert set(out) >= {"boxes", "labels", "scores"}

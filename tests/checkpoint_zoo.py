"""Checkpoints wrapped the way each framework saves them (USERS.md's table), built from a
random torchvision ResNet so that a test can check that the loaded tensors are identical."""

from __future__ import annotations

import argparse
import pickle
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from npidbench.checkpoint.formats import to_detectron2_name


def random_resnet(
    arch: str = "resnet18", seed: int = 0, cifar: bool = False, stem_padding: int = 1, **kwargs
) -> torch.nn.Module:
    """A torchvision ResNet with random weights and BN statistics; ``kwargs`` go to the builder."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if cifar:
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, stem_padding, bias=False)
        model.maxpool = torch.nn.Identity()
    _randomise_statistics(model)
    return model


def _randomise_statistics(model: torch.nn.Module) -> None:
    # Make BN statistics non-trivial so that a wrong buffer mapping is caught.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _prefixed(state: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state.items())


def _head(dim_in: int, dims: list[int], prefix: str) -> dict[str, torch.Tensor]:
    out, d = {}, dim_in
    for i, d_out in enumerate(dims):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(d_out, d)
        out[f"{prefix}{2 * i}.bias"] = torch.randn(d_out)
        d = d_out
    return out


def make_unimportable_module_object(tmp: Path, module_name: str, class_name: str, source: str):
    """An instance of a class from a module that is gone once the object exists."""
    pkg_root = tmp / f"gone_{module_name.replace('.', '_')}"
    mod_path = pkg_root / Path(*module_name.split("."))
    mod_path.parent.mkdir(parents=True, exist_ok=True)
    for parent in mod_path.parents:
        if parent == pkg_root:
            break
        (parent / "__init__.py").touch()
    mod_path.with_suffix(".py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(pkg_root))
    try:
        module = __import__(module_name, fromlist=[class_name])
        cls = getattr(module, class_name)
        return cls
    finally:
        sys.path.remove(str(pkg_root))


def _solo_learn_cfg(tmp: Path, method: str):
    """solo-learn's hyper_parameters hold an omegaconf DictConfig (not importable here)."""
    cls = make_unimportable_module_object(
        tmp,
        "omegaconf.dictconfig",
        "DictConfig",
        """
        class DictConfig:
            def __init__(self, content=None):
                self.content = content
    """,
    )
    return cls({"method": method})


def _sequential_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision names as in nn.Sequential(*resnet.children()[:-1]) (lightly's examples)."""
    seq_names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {seq_names[k.split(".")[0]] + k[len(k.split(".")[0]) :]: v for k, v in state.items()}


def _dino_head(
    dim: int, prefix: str, mlp: str, hidden: int = 64, bottleneck: int = 32
) -> dict[str, torch.Tensor]:
    """A DINO projection head: an MLP (``mlp`` in solo-learn, ``layers`` in lightly) then a
    weight-normed last layer (weight_g / weight_v)."""
    return {
        **_head(dim, [hidden, bottleneck], f"{prefix}{mlp}."),
        f"{prefix}last_layer.weight_g": torch.ones(100, 1),
        f"{prefix}last_layer.weight_v": torch.randn(100, bottleneck),
    }


def forget_module(module_name: str) -> None:
    for name in list(sys.modules):
        if name == module_name or name.startswith(module_name.split(".")[0] + "."):
            sys.modules.pop(name, None)
    sys.modules.pop(module_name.split(".")[0], None)


def build(fmt: str, model: torch.nn.Module, tmp: Path, other: torch.nn.Module | None = None) -> Path:
    """Save ``model`` as framework ``fmt`` would; returns the file path.

    ``other`` is a second network for the branch a format must NOT load by default
    (encoder_k, momentum encoders, DINO student, timm non-EMA weights).
    """
    other = other or random_resnet(seed=99)
    full = model.state_dict()
    bb = backbone_state(model)
    bb_other = backbone_state(other)
    dim = full["fc.weight"].shape[1]
    path = tmp / f"{fmt}.pth"
    saver: Callable = torch.save
    if fmt == "torchvision":
        obj = full
    elif fmt == "openselfsup":
        obj = {"state_dict": bb}
    elif fmt == "ddp":
        obj = {"state_dict": _prefixed(full, "module."), "epoch": 3}
    elif fmt == "timm":
        obj = {
            "epoch": 10,
            "arch": "resnet18",
            "version": 2,
            "state_dict": _prefixed(other.state_dict(), "module."),
            "state_dict_ema": full,
            "optimizer": {"state": {0: {"momentum_buffer": torch.randn(3)}}, "param_groups": []},
            "args": argparse.Namespace(model="resnet18", lr=0.1),
        }
    elif fmt == "lemniscate":
        cls = make_unimportable_module_object(
            tmp,
            "lib.NCEAverage",
            "NCEAverage",
            """
            import torch
            class NCEAverage(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.register_buffer("params", torch.tensor([4096, 0.07, -1, 0.5]))
                    self.register_buffer("memory", torch.randn(10, 128))
        """,
        )
        nce = cls()
        state = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
        state = {
            **{k: v for k, v in state.items() if not k.startswith("fc.")},
            "fc.weight": torch.randn(128, dim),
            "fc.bias": torch.randn(128),
        }
        obj = {
            "epoch": 200,
            "arch": "resnet18",
            "state_dict": _prefixed(state, "module."),
            "lemniscate": nce,
            "best_prec1": 42.0,
            "optimizer": {"state": {}, "param_groups": []},
        }
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        forget_module("lib.NCEAverage")
        return path
    elif fmt == "moco-v1":
        q = {**bb, "fc.weight": torch.randn(128, dim), "fc.bias": torch.randn(128)}
        k = {**bb_other, "fc.weight": torch.randn(128, dim), "fc.bias": torch.randn(128)}
        obj = {
            "epoch": 200,
            "arch": "resnet18",
            "optimizer": {},
            "state_dict": {
                **_prefixed(q, "module.encoder_q."),
                **_prefixed(k, "module.encoder_k."),
                "module.queue": torch.randn(128, 64),
                "module.queue_ptr": torch.zeros(1),
            },
        }
    elif fmt == "moco-v2":
        q = {**bb, **_head(dim, [dim, 128], "fc.")}
        k = {**bb_other, **_head(dim, [dim, 128], "fc.")}
        obj = {
            "epoch": 800,
            "arch": "resnet18",
            "optimizer": {},
            "state_dict": {
                **_prefixed(q, "module.encoder_q."),
                **_prefixed(k, "module.encoder_k."),
                "module.queue": torch.randn(128, 64),
                "module.queue_ptr": torch.zeros(1),
            },
        }
    elif fmt == "moco-v3":
        q = {**bb, **_head(dim, [256, 256], "fc.")}
        k = {**bb_other, **_head(dim, [256, 256], "fc.")}
        obj = {
            "epoch": 100,
            "arch": "resnet18",
            "optimizer": {},
            "scaler": {"scale": 1.0},
            "state_dict": {
                **_prefixed(q, "module.base_encoder."),
                **_prefixed(k, "module.momentum_encoder."),
                **_head(256, [256], "module.predictor."),
            },
        }
    elif fmt == "swav":
        obj = {
            **_prefixed(bb, "module."),
            **_head(dim, [256, 128], "module.projection_head."),
            "module.prototypes.weight": torch.randn(300, 128),
        }
    elif fmt == "dino":
        obj = {
            "student": {**_prefixed(bb_other, "module.backbone."), **_head(dim, [256], "module.head.mlp.")},
            "teacher": {**_prefixed(bb, "backbone."), **_head(dim, [256], "head.mlp.")},
            "optimizer": {},
            "epoch": 100,
            "args": argparse.Namespace(arch="resnet18"),
            "dino_loss": {"center": torch.zeros(1, 256)},
        }
    elif fmt == "dino-bare":
        obj = bb
    elif fmt == "vissl":
        obj = {
            "phase_idx": 3,
            "iteration": 100,
            "type": "checkpoint",
            "classy_state_dict": {
                "base_model": {
                    "model": {
                        "trunk": _prefixed(bb, "_feature_blocks."),
                        "heads": _head(dim, [128], "0.clf."),
                    }
                }
            },
        }
    elif fmt == "mmselfsup":
        obj = {
            "meta": {"epoch": 200, "mmselfsup_version": "0.x"},
            "state_dict": {
                **_prefixed(bb, "backbone."),
                "neck.fc.weight": torch.randn(128, dim),
                "memory_bank.feature_bank": torch.randn(10, 128),
            },
        }
    elif fmt == "mmselfsup-moco":  # 0.x: encoder_q = Sequential(backbone, neck), backbone aliased
        obj = {
            "meta": {},
            "state_dict": {
                **_prefixed(bb, "backbone."),
                **_prefixed(bb, "encoder_q.0."),
                **_prefixed(bb_other, "encoder_k.0."),
                "queue": torch.randn(128, 8),
            },
        }
    elif fmt == "solo-learn":
        hp = _solo_learn_cfg(tmp, "byol")
        obj = {
            "epoch": 400,
            "global_step": 1000,
            "pytorch-lightning_version": "1.9.0",
            "hyper_parameters": {"cfg": hp},
            "state_dict": {
                **_prefixed(bb, "backbone."),
                **_head(dim, [256, 128], "projector."),
                **_prefixed(bb_other, "momentum_backbone."),
                "classifier.weight": torch.randn(10, dim),
                "classifier.bias": torch.randn(10),
            },
        }
        torch.save(obj, path)
        forget_module("omegaconf.dictconfig")
        return path
    elif fmt == "solo-learn-dino":
        # solo-learn's DINO (solo/methods/dino.py): online backbone + head, momentum_backbone +
        # momentum_head, the online classifier; Lightning's top-level keys.
        obj = {
            "epoch": 400,
            "global_step": 1000,
            "pytorch-lightning_version": "2.0.0",
            "hyper_parameters": {"cfg": _solo_learn_cfg(tmp, "dino")},
            "state_dict": {
                **_prefixed(bb, "backbone."),
                **_dino_head(dim, "head.", "mlp"),
                **_prefixed(bb_other, "momentum_backbone."),
                **_dino_head(dim, "momentum_head.", "mlp"),
                "classifier.weight": torch.randn(10, dim),
                "classifier.bias": torch.randn(10),
            },
        }
        torch.save(obj, path)
        forget_module("omegaconf.dictconfig")
        return path
    elif fmt == "lightly-dino":
        # lightly's DINO example: student_backbone / teacher_backbone are each
        # nn.Sequential(*resnet.children()[:-1]), with student_head / teacher_head.
        obj = {
            "epoch": 100,
            "global_step": 500,
            "pytorch-lightning_version": "2.1.0",
            "hyper_parameters": {},
            "state_dict": {
                **_prefixed(_sequential_names(bb_other), "student_backbone."),
                **_dino_head(dim, "student_head.", "layers"),
                **_prefixed(_sequential_names(bb), "teacher_backbone."),
                **_dino_head(dim, "teacher_head.", "layers"),
            },
        }
    elif fmt == "lightly":
        seq = _sequential_names(bb)
        obj = {
            "epoch": 100,
            "pytorch-lightning_version": "2.1.0",
            "state_dict": {
                **_prefixed(seq, "backbone."),
                **_head(dim, [256, 128], "projection_head.layers."),
            },
        }
    elif fmt == "detectron2":
        converted = {to_detectron2_name(k): v.numpy() for k, v in bb.items()}
        converted["stem.fc.weight"] = torch.randn(128, dim).numpy()
        obj = {"model": converted, "__author__": "MOCO", "matching_heuristics": True}
        path = tmp / "detectron2.pkl"
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        return path
    elif fmt == "npidbench":
        obj = {
            "format": "npidbench",
            "version": 1,
            "arch": "resnet18",
            "state_dict": bb,
            "head": {"weight": torch.randn(128, dim)},
            "meta": {"recipe": "npid_resnet18_synthetic", "epochs": 0, "seed": 0},
        }
    elif fmt == "safetensors":
        return _save_safetensors(full, tmp / "model.safetensors")
    else:
        raise KeyError(fmt)
    saver(obj, path)
    return path


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    import json
    import struct

    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.int64: "I64"}
    for name, tensor in state.items():
        raw = tensor.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path


FORMATS = {
    # name: (expected detected format, expected default branch)
    "torchvision": ("torchvision", "main"),
    "openselfsup": ("torchvision", "main"),
    "ddp": ("ddp", "main"),
    "timm": ("timm", "ema"),
    "lemniscate": ("lemniscate", "main"),
    "moco-v1": ("moco-v1", "encoder_q"),
    "moco-v2": ("moco-v2", "encoder_q"),
    "moco-v3": ("moco-v3", "base_encoder"),
    "swav": ("swav", "main"),
    "dino": ("dino", "teacher"),
    "dino-bare": ("torchvision", "main"),
    "vissl": ("vissl", "main"),
    "mmselfsup": ("mmselfsup", "main"),
    "mmselfsup-moco": ("mmselfsup", "encoder_q"),
    "solo-learn": ("solo-learn", "main"),
    "solo-learn-dino": ("solo-learn", "main"),  # solo-learn evaluates the online backbone
    "lightly": ("lightly", "main"),
    "lightly-dino": ("lightly", "teacher"),  # DINO evaluates the teacher
    "detectron2": ("detectron2", "main"),
    "npidbench": ("npidbench", "main"),
    "safetensors": ("torchvision", "main"),
}


# ResNet variants that reuse torchvision's key names but are other networks. Each is built from
# torchvision modules renamed as the framework names them (key names checked against timm's
# resnet.py / layers/squeeze_excite.py and mmpretrain's models/backbones/resnet.py).


class _TimmSE(torch.nn.Module):
    """timm's SEModule parameters: fc1 / fc2 are 1x1 convs with bias (rd = channels / 16)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        reduced = max(8, int(channels / 16 + 4) // 8 * 8)  # timm make_divisible(channels / 16, 8)
        self.fc1 = torch.nn.Conv2d(channels, reduced, 1)
        self.fc2 = torch.nn.Conv2d(reduced, channels, 1)


class _ConvModule(torch.nn.Module):
    """mmcv's ConvModule as mmpretrain's deep stem uses it: ``conv`` then ``bn``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c_out)


def _mmpretrain_resnet(avg_down: bool, seed: int = 0) -> torch.nn.Module:
    """mmpretrain ResNetV1c (deep_stem) or ResNetV1d (deep_stem + avg_down), depth 50."""
    model = random_resnet("resnet50", seed=seed)
    del model.conv1, model.bn1
    # stem_channels=64: ConvModule(3, 32, s2), ConvModule(32, 32), ConvModule(32, 64)
    model.stem = torch.nn.Sequential(_ConvModule(3, 32), _ConvModule(32, 32), _ConvModule(32, 64))
    if avg_down:
        # ResLayer: an AvgPool before the 1x1 conv only where the stride is 2 (layer2..4).
        for layer in (model.layer2, model.layer3, model.layer4):
            conv, norm = layer[0].downsample
            pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
            layer[0].downsample = torch.nn.Sequential(pool, conv, norm)
    _randomise_statistics(model)
    return model


def build_variant(name: str, tmp: Path) -> Path:
    """Save one of VARIANTS as its framework does; returns the file path."""
    path = tmp / f"{name}.pth"
    if name == "timm-seresnet50":
        model = random_resnet("resnet50", seed=4)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                block.se = _TimmSE(block.conv3.out_channels)  # timm Bottleneck: self.se after bn3
        obj = {
            "epoch": 90,
            "arch": "seresnet50",
            "version": 2,
            "state_dict": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="seresnet50"),
        }
    elif name in ("mmpretrain-resnetv1d", "mmpretrain-resnetv1c"):
        model = _mmpretrain_resnet(avg_down=name.endswith("v1d"))
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
        obj = {
            "meta": {"mmpretrain_version": "1.0.0", "epoch": 100},
            "state_dict": {
                **_prefixed(state, "backbone."),
                "head.fc.weight": torch.randn(1000, 2048),
                "head.fc.bias": torch.randn(1000),
            },
        }
    elif name == "timm-resnet50-gn":
        # timm resnet50_gn: norm_layer=GroupNorm (32 groups): weight and bias, no statistics.
        model = random_resnet("resnet50", seed=5, norm_layer=lambda c: torch.nn.GroupNorm(32, c))
        obj = model.state_dict()
    elif name == "timm-resnet26":
        # timm resnet26: Bottleneck blocks (2, 2, 2, 2) with torchvision's stem and names.
        torch.manual_seed(6)
        model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [2, 2, 2, 2])
        _randomise_statistics(model)
        obj = model.state_dict()
    elif name == "timm-resnet18-blurpool":
        # timm aa_layer=BlurPool2d registers a fixed ``filt`` buffer as block.aa (anti-aliasing).
        model = random_resnet("resnet18", seed=7)
        blur = torch.nn.Module()
        blur.register_buffer("filt", torch.ones(128, 1, 3, 3) / 9)
        model.layer2[0].aa = blur
        obj = model.state_dict()
    else:
        raise KeyError(name)
    torch.save(obj, path)
    return path


VARIANTS = {
    # name: what the one-line refusal must say
    "timm-seresnet50": (
        "squeeze-excitation modules (layer1.0.se.*): a SE-ResNet such as timm seresnet50, not a torchvision ResNet"
    ),
    "mmpretrain-resnetv1d": "mmpretrain ResNetV1d (deep stem + average-pool shortcut",
    "mmpretrain-resnetv1c": "mmpretrain ResNetV1c (deep stem",
    "timm-resnet50-gn": "GroupNorm ResNet (no BatchNorm statistics; timm resnet50_gn)",
    "timm-resnet26": (
        "a Bottleneck ResNet with blocks (2, 2, 2, 2) (timm resnet26): no torchvision ResNet has this depth"
    ),
    "timm-resnet18-blurpool": "that a torchvision resnet18 does not have (layer2.0.aa.*)",
}

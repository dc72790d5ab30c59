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


def random_resnet(arch: str = "resnet18", seed: int = 0, cifar: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    if cifar:
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    # Make BN statistics non-trivial so that a wrong buffer mapping is caught.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    return model


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
        hp = cls({"method": "byol"})
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
    elif fmt == "lightly":
        seq_names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
        seq = {seq_names[k.split(".")[0]] + k[len(k.split(".")[0]) :]: v for k, v in bb.items()}
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
    "lightly": ("lightly", "main"),
    "detectron2": ("detectron2", "main"),
    "npidbench": ("npidbench", "main"),
    "safetensors": ("torchvision", "main"),
}

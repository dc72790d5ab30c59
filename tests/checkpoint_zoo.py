"""Checkpoints wrapped the way each framework saves them (USERS.md's table), built from a
random torchvision ResNet so that a test can check that the loaded tensors are identical."""

from __future__ import annotations

import argparse
import pickle
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def wide_resnet50(width: int, seed: int = 0, randomise: bool = True) -> torchvision.models.ResNet:
    """A ResNet-50 widened ``width`` times everywhere, stem included (SimCLR v1's width_mult
    [resnet_wider.py:111-135], SwAV's widen [src/resnet50.py:159-193]), with random weights and BN
    statistics. Built with torchvision's own ResNet._make_layer rather than npidbench's builder, so
    that the loader is checked against an independent construction of the same names and shapes."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    stem = 64 * width
    model.inplanes = stem
    model.conv1 = torch.nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(stem)
    block = torchvision.models.resnet.Bottleneck
    for index, blocks in enumerate((3, 4, 6, 3)):
        stage = model._make_layer(block, stem * 2**index, blocks, stride=1 if index == 0 else 2)
        setattr(model, f"layer{index + 1}", stage)
    model.fc = torch.nn.Linear(2048 * width, 1000)
    if randomise:
        _randomise_statistics(model)
    return model.eval()


def save_simclr_converter(model: torch.nn.Module, path: Path) -> Path:
    """As tonylins/simclr-converter writes it: ``{'state_dict': model.state_dict()}`` [convert.py:85]
    with fc (TF's supervised head; its bias the Linear's own) and the BN statistics written into
    fresh modules, so every num_batches_tracked is 0 [convert.py:74-82]."""
    state = OrderedDict(
        (k, torch.zeros_like(v) if k.endswith("num_batches_tracked") else v)
        for k, v in model.state_dict().items()
    )
    torch.save({"state_dict": state}, path)
    return path


def save_swav(model: torch.nn.Module, path: Path, hidden: int = 32, prototypes: int = 30) -> Path:
    """As SwAV releases it (swav_*_pretrain.pth.tar): a bare state dict of the DDP-wrapped model,
    ``module.`` prefix, the backbone without fc plus projection_head (Linear, BatchNorm1d, ReLU,
    Linear) and prototypes [src/resnet50.py:199-217; hubconf.py]."""
    dim = model.fc.in_features
    head = {
        "projection_head.0.weight": torch.randn(hidden, dim),
        "projection_head.0.bias": torch.randn(hidden),
        "projection_head.1.weight": torch.rand(hidden),
        "projection_head.1.bias": torch.randn(hidden),
        "projection_head.1.running_mean": torch.randn(hidden),
        "projection_head.1.running_var": torch.rand(hidden) + 0.5,
        "projection_head.1.num_batches_tracked": torch.tensor(100),
        "projection_head.3.weight": torch.randn(16, hidden),
        "projection_head.3.bias": torch.randn(16),
        "prototypes.weight": torch.randn(prototypes, 16),
    }
    torch.save(_prefixed({**backbone_state(model), **head}, "module."), path)
    return path


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


# Plain ViTs as each framework writes them (PROTOCOLS-ARCH.md section 1), built from a random timm
# VisionTransformer (DINO, MoCo v3, MAE, iBOT and DINOv2 use timm's names) or torchvision's own.


@dataclass
class ViTCase:
    """A written ViT file, the tensors a strict load must give (timm names) and the source
    network's CLS feature (after the final norm) for an image batch."""

    path: Path
    expected: dict[str, torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]
    img: int


def random_vit(seed: int = 0, embed_dim: int = 192, num_heads: int = 3, depth: int = 2, **kwargs):
    """A timm VisionTransformer without a head; every parameter random (LayerNorm weights around
    1) so that a swapped or dropped tensor changes the features."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kwargs = {"img_size": 32, "patch_size": 8, **kwargs}
    model = VisionTransformer(embed_dim=embed_dim, num_heads=num_heads, depth=depth, num_classes=0, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.2)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.add_(1.0)
    return model.eval()


def fixed_sincos(grid: int, width: int, row_first: bool) -> torch.Tensor:
    """(1, 1 + grid**2, width) fixed 2D sin-cos with a zero class row: MoCo v3 (row first, vits.py
    build_2d_sincos_position_embedding, meshgrid 'ij') or MAE (column first, util/pos_embed.py)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    index = torch.arange(grid * grid)
    rows, cols = (index // grid).float(), (index % grid).float()
    first, second = (rows, cols) if row_first else (cols, rows)
    out_1, out_2 = torch.outer(first, omega), torch.outer(second, omega)
    table = torch.cat([out_1.sin(), out_1.cos(), out_2.sin(), out_2.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), table])[None]


def _renamed(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    import re

    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _ssl_head(dim: int, prefix: str) -> dict[str, torch.Tensor]:
    """DINO's / iBOT's head: mlp.0/2/4 then a weight-normed last layer [dino vision_transformer.py DINOHead]."""
    return {
        **_head(dim, [64, 64, 32], f"{prefix}mlp."),
        f"{prefix}last_layer.weight_g": torch.ones(100, 1),
        f"{prefix}last_layer.weight_v": torch.randn(100, 32),
    }


def _moco_mlp(dim: int, prefix: str, layers: int) -> dict[str, torch.Tensor]:
    """MoCo v3's _build_mlp: Linear (no bias), BatchNorm1d, ReLU, ..., last BN without affine
    [moco-v3 moco/builder.py:36-50]."""
    out, d = {}, dim
    for i in range(layers):
        base = 3 * i
        out[f"{prefix}{base}.weight"] = torch.randn(64, d)
        bn = f"{prefix}{base + 1}."
        if i < layers - 1:
            out[bn + "weight"], out[bn + "bias"] = torch.randn(64), torch.randn(64)
        out[bn + "running_mean"], out[bn + "running_var"] = torch.randn(64), torch.rand(64) + 0.5
        out[bn + "num_batches_tracked"] = torch.tensor(3)
        d = 64
    return out


def _dinov2_reference(source, registers: torch.Tensor):
    """DINOv2's forward of the class token: pos_embed added to [cls, patches], registers inserted
    after the class token, blocks, norm [dinov2 models/vision_transformer.py prepare_tokens_with_masks]."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        tokens = source.patch_embed(images)
        batch = tokens.shape[0]
        tokens = torch.cat([source.cls_token.expand(batch, -1, -1), tokens], dim=1) + source.pos_embed
        tokens = torch.cat([tokens[:, :1], registers.expand(batch, -1, -1), tokens[:, 1:]], dim=1)
        for block in source.blocks:
            tokens = block(tokens)
        return source.norm(tokens)[:, 0]

    return forward


def _torchvision_vit(tmp: Path) -> ViTCase:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(11)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.eval()
    sd = model.state_dict()
    path = tmp / "torchvision_vit.pth"
    torch.save(sd, path)
    expected = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"]}
    expected["patch_embed.proj.weight"], expected["patch_embed.proj.bias"] = (
        sd["conv_proj.weight"],
        sd["conv_proj.bias"],
    )
    expected["norm.weight"], expected["norm.bias"] = sd["encoder.ln.weight"], sd["encoder.ln.bias"]
    for i in range(2):
        tv = f"encoder.layers.encoder_layer_{i}."
        for kind in ("weight", "bias"):
            expected[f"blocks.{i}.norm1.{kind}"] = sd[f"{tv}ln_1.{kind}"]
            expected[f"blocks.{i}.attn.qkv.{kind}"] = sd[f"{tv}self_attention.in_proj_{kind}"]
            expected[f"blocks.{i}.attn.proj.{kind}"] = sd[f"{tv}self_attention.out_proj.{kind}"]
            expected[f"blocks.{i}.norm2.{kind}"] = sd[f"{tv}ln_2.{kind}"]
            expected[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{tv}mlp.0.{kind}"]
            expected[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{tv}mlp.3.{kind}"]
    model.heads = torch.nn.Identity()  # the class token after encoder.ln
    return ViTCase(path, expected, model, 32)


def build_vit_file(fmt: str, tmp: Path) -> ViTCase:
    """Save a small ViT as framework ``fmt`` does (keys of VIT_FORMATS)."""
    if fmt == "torchvision-vit":
        return _torchvision_vit(tmp)
    path = tmp / f"{fmt}.pth"
    other = random_vit(seed=99)
    if fmt in ("dino-bare", "dino"):
        source = random_vit(seed=1, embed_dim=384, num_heads=6, patch_size=16)  # DINO ViT-S: 6 heads
        other = random_vit(seed=98, embed_dim=384, num_heads=6, patch_size=16)
    elif fmt in ("moco-v3", "moco-v3-deit"):
        source = random_vit(seed=2, embed_dim=384, num_heads=12, patch_size=16)  # MoCo v3 ViT-S: 12 heads
        other = random_vit(seed=97, embed_dim=384, num_heads=12, patch_size=16)
        with torch.no_grad():
            for model in (source, other):  # fixed, stored in the state dict [vits.py:25-41]
                model.pos_embed.copy_(fixed_sincos(2, 384, row_first=True))
    elif fmt in ("mae", "mae-full"):
        source = random_vit(seed=3)
        with torch.no_grad():
            source.pos_embed.copy_(fixed_sincos(4, 192, row_first=False))
    elif fmt in ("ibot", "dinov2", "dinov2-reg4", "mmpretrain"):
        source = random_vit(seed=4, init_values=1.0)
    elif fmt == "dinov2-train":
        source = random_vit(seed=5, init_values=1.0, depth=4)
    elif fmt == "timm-reg4":
        source = random_vit(seed=6, init_values=1e-5, reg_tokens=4, no_embed_class=True)  # vit_*_reg4_dinov2
    elif fmt == "timm-reg1":
        source = random_vit(seed=7, reg_tokens=1)  # registers with class-token position (timm allows it)
    else:
        source = random_vit(seed=8)
    sd = source.state_dict()
    expected = dict(sd)
    reference: Callable = source
    width = sd["cls_token"].shape[-1]
    if fmt in ("dino-bare", "dinov2", "timm-reg4", "timm-reg1", "timm-bare"):
        obj: Any = dict(sd)
        if fmt == "dinov2":
            obj["mask_token"] = torch.randn(1, width)  # (1, D) [dinov2 models/vision_transformer.py:96-233]
    elif fmt == "dino":
        # {student, teacher, optimizer, epoch, args, dino_loss, fp16_scaler} [main_dino.py:278-288]; the
        # ViT teacher is not DDP-wrapped, the student is [main_dino.py:195-206].
        obj = {
            "student": {
                **_prefixed(other.state_dict(), "module.backbone."),
                **_ssl_head(width, "module.head."),
            },
            "teacher": {**_prefixed(sd, "backbone."), **_ssl_head(width, "head.")},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": []},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
            "dino_loss": {"center": torch.zeros(1, 100)},
            "fp16_scaler": None,
        }
    elif fmt == "ibot":
        gamma = [(r"\.ls([12])\.gamma$", r".gamma_\1")]  # iBOT's Block [ibot models/vision_transformer.py]
        student = random_vit(seed=96, init_values=1.0).state_dict()
        obj = {
            "student": {
                **_prefixed(_renamed(student, gamma), "module.backbone."),
                "module.backbone.masked_embed": torch.randn(1, width),
                **_ssl_head(width, "module.head."),
                "module.head.last_layer2.weight_v": torch.randn(100, 32),
            },
            "teacher": {
                **_prefixed(_renamed(sd, gamma), "backbone."),
                **_ssl_head(width, "head."),
                "head.last_layer2.weight_v": torch.randn(100, 32),
            },
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny"),
            "ibot_loss": {"center": torch.zeros(1, 100)},
        }
    elif fmt in ("moco-v3", "moco-v3-deit"):
        if fmt == "moco-v3-deit":  # convert_to_deit.py: base_encoder without its head, under "model"
            obj = {"model": dict(sd)}
        else:  # {epoch, arch, state_dict, optimizer, scaler} [main_moco.py; builder.py:64-75]
            obj = {
                "epoch": 300,
                "arch": "vit_small",
                "state_dict": {
                    **_prefixed(sd, "module.base_encoder."),
                    **_moco_mlp(width, "module.base_encoder.head.", 3),
                    **_prefixed(other.state_dict(), "module.momentum_encoder."),
                    **_moco_mlp(width, "module.momentum_encoder.head.", 3),
                    **_moco_mlp(64, "module.predictor.", 2),
                },
                "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0},
            }
    elif fmt == "mae":
        obj = {"model": dict(sd)}  # mae_pretrain_vit_*.pth: the encoder only (mae#8)
    elif fmt == "mae-full":
        decoder = {  # models_mae.py:47-58, decoder width 64
            "mask_token": torch.randn(1, 1, 64),
            "decoder_embed.weight": torch.randn(64, width),
            "decoder_embed.bias": torch.randn(64),
            "decoder_pos_embed": torch.randn(1, 17, 64),
            "decoder_blocks.0.norm1.weight": torch.randn(64),
            "decoder_blocks.0.attn.qkv.weight": torch.randn(192, 64),
            "decoder_norm.weight": torch.randn(64),
            "decoder_pred.weight": torch.randn(192, 64),
        }
        obj = {
            "model": {**sd, **decoder},
            "optimizer": {},
            "epoch": 400,
            "scaler": {},
            "args": argparse.Namespace(),
        }
    elif fmt == "dinov2-reg4":
        registers = torch.randn(1, 4, width)
        obj = {**sd, "register_tokens": registers, "mask_token": torch.randn(1, width)}
        expected = {**sd, "reg_token": registers, "cls_token": sd["cls_token"] + sd["pos_embed"][:, :1]}
        expected["pos_embed"] = sd["pos_embed"][:, 1:]
        reference = _dinov2_reference(source, registers)
    elif fmt == "dinov2-train":
        # teacher_checkpoint.pth {"teacher": ...} with block_chunks=2: chunk 1 starts with Identity
        # padding, so its blocks keep their global index [dinov2 train/train.py:130; vision_transformer.py]
        chunked = _renamed(
            sd, [(r"^blocks\.([01])\.", r"blocks.0.\1."), (r"^blocks\.([23])\.", r"blocks.1.\1.")]
        )
        obj = {
            "teacher": {
                **_prefixed(chunked, "backbone."),
                "backbone.mask_token": torch.randn(1, width),
                **_ssl_head(width, "dino_head."),
                **_ssl_head(width, "ibot_head."),
            }
        }
    elif fmt == "timm":
        trained = {**sd, "head.weight": torch.randn(10, width), "head.bias": torch.randn(10)}
        obj = {
            "epoch": 10,
            "arch": "vit_tiny_patch8_32",
            "version": 2,
            "state_dict": _prefixed({**other.state_dict(), "head.weight": torch.randn(10, width)}, "module."),
            "state_dict_ema": trained,
            "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="vit_tiny_patch8_32"),
        }
    elif fmt == "mmpretrain":
        # mmpretrain VisionTransformer names [models/backbones/vision_transformer.py:16-108, 245-369]
        rules = [
            (r"^patch_embed\.proj\.", "patch_embed.projection."),
            (r"^norm\.", "ln1."),
            (r"^blocks\.(\d+)\.norm([12])\.", r"layers.\1.ln\2."),
            (r"^blocks\.(\d+)\.ls1\.gamma$", r"layers.\1.attn.gamma1.weight"),
            (r"^blocks\.(\d+)\.ls2\.gamma$", r"layers.\1.ffn.gamma2.weight"),
            (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
            (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
            (r"^blocks\.(\d+)\.attn\.", r"layers.\1.attn."),
        ]
        obj = {
            "meta": {"mmpretrain_version": "1.2.0", "epoch": 100},
            "state_dict": {
                **_prefixed(_renamed(sd, rules), "backbone."),
                "head.layers.head.weight": torch.randn(10, width),
            },
        }
    else:
        raise KeyError(fmt)
    torch.save(obj, path)
    return ViTCase(path, expected, reference, 32)


VIT_FORMATS = {
    # name: (detected format, default branch, arch, heads)
    "dino-bare": ("timm", "main", "vit_small_patch16_32_depth2", 6),
    "dino": ("dino", "teacher", "vit_small_patch16_32_depth2", 6),
    "ibot": ("ibot", "teacher", "vit_tiny_patch8_32_depth2", 3),
    "moco-v3": ("moco-v3", "base_encoder", "vit_small_patch16_32_depth2_heads12", 12),
    "moco-v3-deit": ("moco-v3", "main", "vit_small_patch16_32_depth2_heads12", 12),
    "mae": ("mae", "main", "vit_tiny_patch8_32_depth2", 3),
    "mae-full": ("mae", "main", "vit_tiny_patch8_32_depth2", 3),
    "dinov2": ("dinov2", "main", "vit_tiny_patch8_32_depth2", 3),
    "dinov2-reg4": ("dinov2", "main", "vit_tiny_patch8_reg4_32_depth2", 3),
    "dinov2-train": ("dinov2-train", "teacher", "vit_tiny_patch8_32_depth4", 3),
    "timm": ("timm", "ema", "vit_tiny_patch8_32_depth2", 3),
    "timm-bare": ("timm", "main", "vit_tiny_patch8_32_depth2", 3),
    "timm-reg4": ("timm", "main", "vit_tiny_patch8_reg4_32_depth2", 3),
    "timm-reg1": ("timm", "main", "vit_tiny_patch8_reg1_32_depth2", 3),
    "torchvision-vit": ("torchvision", "main", "vit_tiny_patch8_32_depth2", 3),
    "mmpretrain": ("mmpretrain", "main", "vit_tiny_patch8_32_depth2", 3),
}

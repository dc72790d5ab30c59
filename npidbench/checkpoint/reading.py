"""Turn a checkpoint file into Python objects, safely, whatever container it came in.

Containers seen in the wild (USERS.md): torch's zip format (torch >= 1.6), torch's legacy non-zip
pickle stream (lemniscate, 2018) and its older tar variant, a plain pickle of numpy arrays (MoCo's
detectron2 file) and safetensors (timm / Hugging Face hub weights). Loading never executes code
from the file unless the user passes the explicit opt-in for trusted files.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npidbench.checkpoint.safe_unpickle import (
    NeedsCode,
    legacy_torch_load,
    restricted_pickle_load,
    torch_load_with_placeholders,
)
from npidbench.errors import BadInput

TRUST_FLAG = "--trust-pickle"
# torch's legacy serialization starts with a pickled magic number (protocol 2).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


@dataclass
class RawCheckpoint:
    """The unpickled content of a checkpoint file and how it was read."""

    obj: Any
    container: str  # torch-zip | torch-legacy | pickle | safetensors
    sha256: str
    skipped: list[str] = field(default_factory=list)  # pickled globals replaced by placeholders


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> RawCheckpoint:
    """Read a checkpoint file without running any code from it.

    Raises:
        BadInput: the file is missing, empty, text, truncated, of an unknown format, or needs
            code execution to be read (then the message names the type and ``--trust-pickle``).
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"checkpoint not found: {path} (check the path)")
    if path.is_dir():
        raise BadInput(f"{path} is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{path} is empty (0 bytes): re-save or re-download the checkpoint")
    with open(path, "rb") as f:
        head = f.read(512)
    sha = file_sha256(path)

    if head.startswith(b"PK\x03\x04"):
        return _read_torch(path, "torch-zip", sha, trust_pickle)
    if head[257:262] == b"ustar":
        if trust_pickle:
            return RawCheckpoint(_load_trusted(path), "torch-tar", sha)
        raise BadInput(
            f"{path} is in torch's oldest (tar) format, which cannot be read without running code from it; "
            f"if you trust this file, pass {TRUST_FLAG}"
        )
    if head.startswith(_LEGACY_MAGIC):
        return _read_torch(path, "torch-legacy", sha, trust_pickle)
    if _looks_like_safetensors(head, size):
        return RawCheckpoint(_read_safetensors(path), "safetensors", sha)
    if head[:1] == b"\x80":
        return _read_plain_pickle(path, sha, trust_pickle)
    if _looks_like_text(head):
        raise BadInput(f"{path} is a text file, not a checkpoint: pass the .pth/.pt/.pkl/.safetensors file")
    raise BadInput(
        f"{path} is not a checkpoint npidbench can read (expected a torch.save file, a pickle of "
        "numpy arrays or safetensors)"
    )


def _read_torch(path: Path, container: str, sha: str, trust_pickle: bool) -> RawCheckpoint:
    if trust_pickle:
        return RawCheckpoint(_load_trusted(path), container, sha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return RawCheckpoint(torch.load(path, map_location="cpu", weights_only=True), container, sha)
        except pickle.UnpicklingError as exc:
            if not _unknown_global(exc):
                raise _truncated_or_unsafe(path, exc, []) from exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise _truncated(path, exc) from exc
        # Some global is not in torch's allow-list: read again with inert placeholders for it.
        try:
            if container == "torch-zip":
                obj, skipped = torch_load_with_placeholders(str(path))
            else:
                obj, skipped = legacy_torch_load(str(path))
        except NeedsCode as exc:
            raise _truncated_or_unsafe(path, exc, exc.skipped) from exc
        except Exception as exc:  # the scan itself failed: the pickle stream is damaged
            raise _truncated(path, exc) from exc
    return RawCheckpoint(obj, container, sha, skipped)


def _unknown_global(exc: BaseException) -> bool:
    return "Unsupported global" in str(exc) or "GLOBAL" in str(exc)


def _read_plain_pickle(path: Path, sha: str, trust_pickle: bool) -> RawCheckpoint:
    if trust_pickle:
        with open(path, "rb") as f:
            return RawCheckpoint(pickle.load(f, encoding="latin1"), "pickle", sha)
    try:
        obj, skipped = restricted_pickle_load(str(path))
    except NeedsCode as exc:
        raise _truncated_or_unsafe(path, exc, exc.skipped) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise _truncated(path, exc) from exc
    if isinstance(obj, int):
        # A torch legacy file written with a pickle protocol other than 2 starts with the magic
        # number too; let torch read the rest.
        return _read_torch(path, "torch-legacy", sha, trust_pickle)
    return RawCheckpoint(obj, "pickle", sha, skipped)


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _truncated(path, exc) from exc


def _truncated(path: Path, exc: BaseException | None = None) -> BadInput:
    detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})" if exc and str(exc) else ""
    return BadInput(f"{path} is truncated or corrupt and cannot be read{detail}: re-download or re-save it")


def _truncated_or_unsafe(path: Path, exc: BaseException, skipped: list[str]) -> BadInput:
    message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    lowered = message.lower()
    if isinstance(exc, EOFError) or any(
        w in lowered for w in ("truncated", "ran out of input", "eof", "corrupt")
    ):
        return _truncated(path, exc)
    offending = ", ".join(skipped[:4]) or message
    return BadInput(
        f"{path} cannot be read without running code from it: it pickles {offending} ({message}); "
        f"if you trust this file, pass {TRUST_FLAG}"
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len < size and head[8:9] == b"{"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors with the standard library: an 8-byte length, a JSON header, raw bytes.

    Written here rather than depending on the safetensors package for one file format.
    """
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise BadInput(f"{path} has a corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"{path}: safetensors entry {name!r} is malformed ({exc!r})") from exc
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (
            not 0 <= begin <= end
            or end - begin != itemsize * int(np.prod(shape))
            or min(shape, default=0) < 0
        ):
            raise BadInput(f"{path}: safetensors entry {name!r} has inconsistent offsets or shape")
        if base + end > len(data):
            raise _truncated(path)
        buffer = bytearray(data[base + begin : base + end])
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensors[name] = tensor.reshape(shape)
    return tensors

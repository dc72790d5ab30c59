"""Hand-crafted hostile pickles (from a review of the restricted reader): each must be refused or
read inertly, and must leave the process unharmed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from npidbench.checkpoint.reading import read_checkpoint
from npidbench.errors import BadInput


def _short(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _zip_with_pickle(tmp_path: Path, name: str, payload: bytes) -> Path:
    base = tmp_path / "base.pth"
    torch.save({}, base)
    out = tmp_path / name
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, payload if item.filename.endswith("data.pkl") else zin.read(item))
    return out


# NEWOBJ_EX on the allow-listed torch.Tensor with cdata=<int>: a raw pointer in disguise.
CDATA = (
    b"\x80\x04"
    + _short("torch")
    + _short("Tensor")
    + b"\x93"
    + b")"
    + b"}"
    + _short("cdata")
    + b"\x8a\x05\x41\x41\x41\x41\x41"
    + b"s"
    + b"\x92."
)


@pytest.mark.parametrize("container", ["zip", "plain"])
def test_tensor_cdata_pointer_is_refused_without_crashing(container, tmp_path):
    if container == "zip":
        path = _zip_with_pickle(tmp_path, "cdata.pth", CDATA)
    else:
        path = tmp_path / "cdata.pkl"
        path.write_bytes(CDATA)
    proc = subprocess.run(
        [sys.executable, "-m", "npidbench.cli", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NPIDBENCH_QUIET": "1"},
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])  # not a signal
    assert "Traceback" not in proc.stderr


def test_build_on_an_allowed_function_cannot_tamper_with_later_loads(tmp_path):
    # {'a': _rebuild_tensor_v2} with BUILD setting its __defaults__ so later tensors load negated.
    payload = (
        b"\x80\x02}"
        + _unicode("a")
        + b"ctorch._utils\n_rebuild_tensor_v2\n"
        + b"N}("
        + _unicode("__defaults__")
        + b"}"
        + _unicode("neg")
        + b"\x88s\x85u\x86b"
        + b"s."
    )
    evil = _zip_with_pickle(tmp_path, "tamper.pth", payload)
    honest = tmp_path / "honest.pth"
    torch.save({"w": torch.ones(3)}, honest)
    with pytest.raises(BadInput):
        read_checkpoint(evil)
    plain = tmp_path / "tamper.pkl"
    plain.write_bytes(
        payload.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    )
    with pytest.raises(BadInput):
        read_checkpoint(plain)
    assert read_checkpoint(honest).obj["w"].tolist() == [1.0, 1.0, 1.0]
    assert torch.load(honest, weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]


def test_legacy_module_source_check_cannot_write_files(tmp_path):
    target = tmp_path / "written_by_pickle"
    main = (
        b"\x80\x02("
        + _unicode("module")
        + b"ctorch._utils\n_rebuild_tensor\n"
        + b"N}("
        + _unicode("dump_patches")
        + b"\x88"
        + _unicode("__name__")
        + _unicode(str(target))
        + b"u\x86b"
        + _unicode("x.py")
        + _unicode("import os\n")
        + b"tQ."
    )
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        f.write(main)
        f.write(pickle.dumps([], protocol=2))
    with pytest.raises(BadInput):
        read_checkpoint(path)
    assert not list(tmp_path.glob("written_by_pickle*"))


def test_tar_format_is_refused_with_the_trust_flag(tmp_path):
    import tarfile

    path = tmp_path / "old.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("storages", "tensors", "pickle"):
            data = tmp_path / name
            data.write_bytes(pickle.dumps(0, protocol=2))
            tar.add(data, arcname=name)
    with pytest.raises(BadInput, match="oldest \\(tar\\) format.*--trust-pickle"):
        read_checkpoint(path)

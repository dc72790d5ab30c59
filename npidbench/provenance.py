"""What a record needs to be traced back: versions, git sha, host (timm's args.yaml habit)."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from pathlib import Path

import numpy as np

from npidbench import __version__

# torch and torchvision are imported where a record is made, not here: reading records
# (`npidbench report`, ResultStore) needs neither, and importing them costs seconds per process.


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the npidbench checkout in use, or None for an installed wheel."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str | None]:
    """Versions of the code that produced a number."""
    import torch
    import torchvision

    return {
        "npidbench": __version__,
        "git_sha": git_sha(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def host() -> dict[str, str | int | None]:
    """The machine a record was computed on."""
    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }

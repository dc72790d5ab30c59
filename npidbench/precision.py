"""Numeric precision is part of a protocol: bf16 autocast on CUDA changes the numbers a little,
so a record names the precision its forward passes ran in, and the report keeps bf16 rows apart
from fp32 ones (``[bf16]``). ``--set amp=false`` asks for fp32 on every device; on a CPU every
path is fp32 anyway (autocast is used only on CUDA, where bf16 is the speed-up worth having).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The names are read by the report, which stays free of torch (so does the CLI's --help).
FP32 = "fp32"
BF16 = "bf16-autocast"


def uses_bf16(device: torch.device | str, amp: bool) -> bool:
    return amp and str(device).split(":")[0] == "cuda"


def autocast(device: torch.device | str, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=uses_bf16(device, amp))


def precision_name(device: torch.device | str, amp: bool) -> str:
    """What a record says about the forward passes' precision."""
    return BF16 if uses_bf16(device, amp) else FP32

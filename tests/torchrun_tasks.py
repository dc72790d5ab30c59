"""Several ``npidbench run`` requests in one torchrun launch: ``torchrun ... tests/torchrun_tasks.py
REQUESTS.json`` (a list of RunRequest fields). One process group serves them all, so the tests of
the distributed paths start the interpreters and the group once instead of once per task; the CLI
under torchrun is covered by test_distributed_run's kNN test.

An entry ``{"pretrain": {"recipe": Recipe.to_dict(), "out": DIR, "data_root": DIR, "dtype":
"float64"}}`` runs ``pretrain`` in the same group instead (float64: the 2-process run equals the
1-process one to ~1e-15, see tests/pretrain/test_pretrain.py); rank 0 prints ``pretrain PATH``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from npidbench.runner import RunRequest, run_task


def _pretrain(fields: dict) -> Path:
    from npidbench.pretrain.recipe import recipe_from_dict
    from npidbench.pretrain.train import pretrain

    dtype = getattr(torch, fields.get("dtype", "float32"))
    recipe = recipe_from_dict(fields["recipe"])
    return pretrain(recipe, Path(fields["out"]), Path(fields["data_root"]), dtype=dtype)


def main(requests_file: str) -> None:
    requests = json.loads(Path(requests_file).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for fields in requests:
            if "pretrain" in fields:
                path = _pretrain(fields["pretrain"])
                if dist.get_rank() == 0:
                    print(f"pretrain {path}", flush=True)
                continue
            path = run_task(RunRequest(**fields))
            if path is not None:  # rank 0 writes the record
                print(path, flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

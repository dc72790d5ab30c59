"""Several ``npidbench run`` requests in one torchrun launch: ``torchrun ... tests/torchrun_tasks.py
REQUESTS.json`` (a list of RunRequest fields). One process group serves them all, so the tests of
the distributed paths start the interpreters and the group once instead of once per task; the CLI
under torchrun is covered by test_distributed_run's kNN test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from npidbench.runner import RunRequest, run_task


def main(requests_file: str) -> None:
    requests = json.loads(Path(requests_file).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for fields in requests:
            path = run_task(RunRequest(**fields))
            if path is not None:  # rank 0 writes the record
                print(path, flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

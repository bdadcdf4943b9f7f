"""Data parallelism without a scheduler of our own: torchrun (or ``accelerate launch``) starts one process per GPU
and sets RANK / WORLD_SIZE / LOCAL_RANK; this module turns that into a process group and a few helpers.

- generation stages give every rank a deterministic slice of the batches (batch ``b`` goes to rank
  ``b % world``); each rank appends to its own part file and rank 0 merges them in item order;
- ``distill`` splits every global batch across ranks and all-reduces the LoRA gradients, so the loss curve does not
  depend on the number of processes;
- everything else (curate, manifests, merges) runs on rank 0 while the others wait at a barrier.

A single process (no torchrun) is world size 1 and none of this costs anything.
"""

from __future__ import annotations

import os


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when launched by torchrun with more than one process (gloo on CPU, nccl on GPU)."""
    import torch

    if world() == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend)


def barrier() -> None:
    import torch

    if world() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t):
    import torch

    if world() > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def device_for_rank(requested: str) -> str:
    """Under torchrun each rank takes its own GPU."""
    import torch

    if requested == "auto" and world() > 1 and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return requested

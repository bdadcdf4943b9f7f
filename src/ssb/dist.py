"""Data parallelism without a scheduler of our own: torchrun (or ``accelerate launch``) starts one process per GPU
and sets RANK / WORLD_SIZE / LOCAL_RANK; this module turns that into a process group and a few helpers.

- generation stages give every rank a deterministic slice of the batches (batch ``b`` goes to rank
  ``b % world``); each rank appends to its own part file and rank 0 merges them in item order;
- ``distill`` splits every global batch across ranks and all-reduces the LoRA gradients, so the loss curve does not
  depend on the number of processes; with ``distill.fsdp`` the model is sharded instead (:func:`fsdp_shard`) and
  FSDP's reduce-scatter sums the gradients;
- everything else (curate, manifests, merges) runs on rank 0 while the others wait at a barrier.

A single process (no torchrun) is world size 1 and none of this costs anything.
"""

from __future__ import annotations

import contextlib
import os

_SOLO = False


def world() -> int:
    return 1 if _SOLO else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def solo():
    """Run a block on rank 0 alone (curate, grpo) as a single process: inside it ``world()`` is 1, so barriers and
    reductions are no-ops and nothing waits for ranks that are not there."""
    global _SOLO
    old, _SOLO = _SOLO, True
    try:
        yield
    finally:
        _SOLO = old


def init() -> None:
    """Join the process group when launched by torchrun with more than one process: gloo on CPU; on GPU nccl for
    CUDA tensors (gradients) and gloo beside it for the CPU tensors the stages reduce (token counts, step stats),
    which nccl alone refuses."""
    import torch

    if world() == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend)


def shutdown() -> None:
    """Leave the process group before the process exits. Left to interpreter teardown, gloo's threads can still be
    running when their objects are destroyed, and a rank aborts (SIGABRT, "terminate called without an active
    exception") instead of exiting with its status: a refused job then reported a crash instead of exit 2."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just to find there is nothing to leave
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def fsdp_shard(peft_model, device):
    """Shard a peft causal LM across all ranks with FSDP2: every decoder layer is one unit (its frozen base weights
    and LoRA weights together), and the root unit holds the rest (embeddings, final norm, lm_head).

    Returns the root: a module whose forward ``(input_ids, attention_mask)`` is the decoder's last hidden state (no
    logits). FSDP2 requires its root to be the first module to run forward, and the distill loss needs hidden states,
    not the model's logits, hence this wrapper instead of the peft model itself. The root keeps its parameters
    unsharded from its forward until the end of backward, so ``lm_head.weight`` is whole while the loss uses it.
    ``peft_model.disable_adapter()`` still works (it only toggles the LoRA layers). Gradients are *summed* over ranks
    (divide factor 1, SUM collectives), matching the loop's global normaliser. The module may sit on the CPU:
    FSDP moves each rank's shards to the mesh's device, so no rank ever holds the whole model on its GPU."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ssb.errors import SsbError

    decoder = peft_model.get_base_model().get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SsbError(f"distill.fsdp: {type(decoder).__name__} has no `layers` list of decoder layers to shard")

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def forward(self, input_ids, attention_mask):
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    mesh = init_device_mesh(torch.device(device).type, (world(),))
    units = [fully_shard(layer, mesh=mesh) for layer in layers] + [fully_shard(Root(), mesh=mesh)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return units[-1]

"""Multi-GPU under torchrun: plain torch.distributed; the gradients of the trainable parameters are
all-reduced each step (adapters of a few M parameters need no DDP bucketing)."""

from __future__ import annotations

import os

import torch


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> str | None:
    """Under torchrun (WORLD_SIZE > 1): init the process group (NCCL on CUDA, else gloo) and return
    this rank's device; None for a single process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def allreduce_grads(params) -> None:
    """Average gradients over ranks (what DDP does, without bucketing: the trainable sets here are
    adapters of a few M parameters)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def gather_objects(obj) -> list:
    import torch.distributed as dist

    _, world = dist_info()
    if world <= 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()

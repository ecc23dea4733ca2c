"""Data parallelism with torch.distributed, launched by `torchrun` (one process per device).

Every process reads the same global batch and trains on its own contiguous share of it;
after backward, gradients are averaged with one all-reduce per step (the gradient sync that
DistributedDataParallel performs, done explicitly because objectives call several methods of
the dictionary, not only `forward`, and DDP syncs only gradients that flow through its
`forward`). Every process then takes the same optimizer step, so weights stay identical
without ever being broadcast, and a run on N processes matches a run on one process up to
floating-point summation order. Firing counts are summed across processes, so dead-feature
windows count global tokens.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sae import devices


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shard(batch: Tensor, info: DistInfo) -> Tensor:
    """This process's contiguous share of a global batch (sizes must divide evenly)."""
    if not info.enabled:
        return batch
    if batch.shape[0] % info.world_size:
        raise ValueError(
            f"global batch of {batch.shape[0]} rows does not split over {info.world_size} processes"
        )
    return batch.chunk(info.world_size)[info.rank]


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average .grad over processes with one flat all-reduce."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is None:  # every process must contribute the same flat layout
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_(tensor: Tensor, info: DistInfo, op: str = "sum") -> Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    """`sae.devices.resolve_device` with this process's local rank, made the current CUDA
    device so that kernels and NCCL use it."""
    device = devices.resolve_device(name, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device

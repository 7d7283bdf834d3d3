"""Several processes (``torchrun``) as one run: who this process is, and the few collectives the trainer needs.

Under ``torchrun --nproc_per_node N -m lowmem_aasist fit ...`` every process trains a shard of each global batch
(the effective batch is kept: micro-batch x accumulation x world size), DistributedDataParallel sums gradients, and
only rank 0 writes files. Without torchrun this is a world of one and every call here is a cheap no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .models import family_of


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a copy; the value itself where there is one rank)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on one (stop requests must stop all ranks at the same step)."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=device)).item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def join_world(device: str) -> tuple[World, str]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU); return the world
    and the device this rank uses (its own GPU, ``cuda:LOCAL_RANK``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
        return world, f"cuda:{world.local_rank}"
    return world, "cpu"


def wrap_for_ranks(
    model: nn.Module,
    world: World,
    device: torch.device,
    sync_bn: bool = False,
    frozen: Callable[[str], bool] | None = None,
) -> nn.Module:
    """DistributedDataParallel around ``model`` (the model itself in a world of one).

    Parameters that never receive a gradient (``frozen``, by default the model family's ``never_trained``: in AASIST the
    ``bn1`` of blocks 1-5, which the published model computes and discards) are frozen first: DDP would otherwise
    wait for their gradients forever. They never change in a single-process run either, so this changes nothing
    else. BatchNorm keeps per-rank batch statistics as the reference code does on several GPUs, unless ``sync_bn``.
    """
    if not world.distributed:
        return model
    frozen = frozen or family_of(model).never_trained
    for name, p in model.named_parameters():
        if frozen(name):
            p.requires_grad_(False)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def leave_world(world: World) -> None:
    """Leave together: a rank that tore its process group down and exited while another was still at work
    (rank 0 writing files) aborted in gloo's teardown ("terminate called without an active exception"), about one
    run in three on a busy 2-core machine; after a barrier no rank leaves early."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

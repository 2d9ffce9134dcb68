"""Data parallelism under `torchrun`: process group set-up, DDP or FSDP2 wrapping, and small collectives.

Launch with `torchrun --nproc_per_node N -m oryx.cli train --parallel ddp|fsdp ...` (scripts/multigpu.sh). Without
torchrun's environment (`WORLD_SIZE` unset or 1) everything here is a no-op and the run is a single process.

Every rank takes its slice of each global batch (`PackedDataset(rank=, world_size=)`) and of the global batch's
modes, which are drawn from the shared seed, so N ranks compute exactly what one process computes on the global
batch (up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over ranks (a new tensor; the input is not modified)."""
        out = value.detach().clone()
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out /= self.world_size
        return out

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """The main rank's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (the same list on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup(device: str = "auto") -> Dist:
    """Join torchrun's process group if there is one (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        index = local_rank if world_size > 1 or device in ("auto", "cuda") else torch.device(device).index or 0
        chosen = torch.device("cuda", index)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=chosen if use_cuda else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: Dist, parallel: str) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every block, then on the whole model so the tied embedding is sharded
    once); a single process gets the model back unchanged."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The `OryxForCausalLM` inside DDP and/or torch.compile wrappers (FSDP2 modifies the model in place)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-steps before the last one of an accumulation (DDP and FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    inner = unwrap(model)
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(enabled)
    yield

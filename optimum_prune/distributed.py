"""Multi-process calibration on ``torch.distributed`` (``torchrun`` / ``accelerate launch``).

Unstructured pruning is layer-local and its statistics are sums over calibration tokens (input
norms, Hessians XᵀX, token counts). Each process therefore calibrates on its own share of the
windows (window i goes to rank i mod world size); before a layer's masks are chosen the sums
are all-reduced, so every process holds the statistics of the whole calibration set and prunes
identically — the result equals a single-process run on the same windows (up to the summation
order of floating-point sums). NCCL on GPUs, gloo on CPU: whatever process group is initialised.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import distributed as dist

from .calibration import CalibrationInputs


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_processes() -> int:
    """How many processes a launcher started (``WORLD_SIZE``), process group or not."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_zero_first(prepare: Callable[[], Any]) -> None:
    """Run ``prepare`` in the first process only, the others waiting for it: for a cache every
    process reads afterwards (concurrent writers would race on its atomic rename)."""
    if not is_distributed():
        prepare()
        return
    if world()[0] == 0:
        prepare()
    dist.barrier()


def init_from_launcher() -> torch.device | None:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (NCCL with one GPU per process where CUDA is available, else gloo) and return this
    process's device; None when not launched as several processes."""
    if launched_processes() <= 1:
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def is_distributed() -> bool:
    return world()[1] > 1


def shard(inputs: CalibrationInputs) -> CalibrationInputs:
    """This process's share of the calibration windows (or batches): every world-size-th, from its rank."""
    rank, size = world()
    if size == 1:
        return inputs
    if len(inputs) < size:
        raise ValueError(
            f"PruningConfig.num_calibration_samples ({len(inputs)}) is smaller than the {size} processes: "
            "every process needs at least one calibration window"
        )
    return inputs[rank::size]


def shard_positions(local_count: int) -> range:
    """The positions in the whole calibration set of the first ``local_count`` windows of this process's ``shard``."""
    rank, size = world()
    return range(rank, rank + size * local_count, size)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all processes, in place (no-op in a single process). NCCL reduces
    CUDA tensors only, so CPU-resident statistics travel through the current GPU there."""
    if not is_distributed():
        return
    staging = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for tensor in tensors:
        if staging is not None and tensor.device.type != "cuda":
            staged = tensor.to(staging)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

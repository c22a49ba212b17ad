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
from typing import Any, Callable, Mapping

import torch
from torch import distributed as dist

from .calibration import CalibrationInputs
from .calibration.engine import calibration_digest
from .calibration.sources import split_per_sample


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
    """This process's share of the calibration windows (or batches): every world-size-th, from its rank. Every process
    must pass the same calibration (each keeps its share of it); batches fewer than the processes (a tokenizer's one
    batch of several samples) are shared out per sample."""
    rank, size = world()
    if size == 1:
        return inputs
    _check_same_everywhere(inputs)
    if not isinstance(inputs, torch.Tensor) and len(inputs) < size:
        inputs = [sample for batch in inputs for sample in _samples(batch)]
    if len(inputs) < size:
        held = "window(s)" if isinstance(inputs, torch.Tensor) else "batch(es)"
        raise ValueError(
            f"the calibration holds {len(inputs)} {held} for {size} processes: every process needs at least one; give at "
            f"least {size} (PruningConfig.num_calibration_samples for text)"
        )
    return inputs[rank::size]


def _samples(batch: Mapping[str, torch.Tensor]) -> list[Mapping[str, torch.Tensor]]:
    """A batch as one batch per sample, where every tensor holds one entry per sample (else whole)."""
    ids = batch["input_ids"]
    samples = split_per_sample(batch, torch.ones_like(ids, dtype=torch.bool)) if ids.dim() == 2 else None
    return samples or [batch]


def _check_same_everywhere(inputs: CalibrationInputs) -> None:
    """Refuse calibration that differs between processes: each keeps only its share, so a process given its own data
    would drop the rest of it silently, and the report would count one process's tokens."""
    value = int(calibration_digest(inputs)[:14], 16)  # 56 bits: an int64 either sign
    extremes = torch.tensor([value, -value], dtype=torch.int64)
    _all_reduce(extremes, dist.ReduceOp.MAX)  # the largest digest and minus the smallest: equal everywhere
    if extremes[0] != -extremes[1]:
        raise ValueError(
            "the processes were given different calibration data: each keeps only its share of what it is given "
            "(window i goes to rank i mod world size), so give every process the same windows"
        )


def shard_positions(local_count: int) -> range:
    """The positions in the whole calibration set of the first ``local_count`` windows of this process's ``shard``."""
    rank, size = world()
    return range(rank, rank + size * local_count, size)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all processes, in place (no-op in a single process)."""
    if not is_distributed():
        return
    for tensor in tensors:
        _all_reduce(tensor, dist.ReduceOp.SUM)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> None:
    """``dist.all_reduce``; NCCL reduces CUDA tensors only, so CPU-resident ones travel through the current GPU there."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=op)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=op)

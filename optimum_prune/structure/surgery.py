"""Cutting linears in place, and building resized ones to load saved shapes into: the architecture-independent
half of structured surgery.

Which rows and columns belong together is the adapter's knowledge (and Torch-Pruning's
dependency graph's, for MLP blocks); this module only removes them and keeps each
``nn.Linear``'s ``in_features`` / ``out_features`` truthful, so the module object — and any
reference or hook held on it — stays valid.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import skip_init

# Classes made by ``mixed_class``, by (our class, the stock class it stands in as).
_MIXED_CLASSES: dict[tuple[type, type], type] = {}


def mixed_class(ours: type, stock: type) -> type:
    """A class that is both ``ours`` and ``stock`` (``ours`` first, so its methods win), made once per pair: a module
    converted to it stays an instance of the stock class, whose instances transformers hooks to collect outputs
    (``_can_record_outputs``). It pickles as the pair (``torch.save(model)``, a spawned process), not by a name no
    fresh process would know."""
    key = (ours, stock)
    if key not in _MIXED_CLASSES:
        name = re.sub(r"(Attention|DecoderLayer)$", "", ours.__name__) + stock.__name__  # RemovedLlamaAttention
        _MIXED_CLASSES[key] = type(name, key, {"__module__": ours.__module__, "__reduce_ex__": _reduce_mixed})
    return _MIXED_CLASSES[key]


def _reduce_mixed(module: nn.Module, protocol: int) -> tuple[Any, ...]:
    return _new_mixed, type(module).__bases__, module.__dict__


def _new_mixed(ours: type, stock: type) -> nn.Module:
    cls = mixed_class(ours, stock)
    return cls.__new__(cls)


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the dotted ``name`` (relative to ``root``) points."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def keep_output_features(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Keep only rows ``keep`` of ``linear`` (its outputs), with their bias entries."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, keep).clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, keep).clone(), linear.bias.requires_grad)
    linear.out_features = int(keep.numel())


def keep_input_features(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Keep only columns ``keep`` of ``linear`` (its inputs)."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, keep).clone(), linear.weight.requires_grad)
    linear.in_features = int(keep.numel())


def add_output_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Add ``bias`` to ``linear``'s output, creating the bias parameter if it had none (FLAP compensation)."""
    bias = bias.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.clone(), linear.weight.requires_grad)
    else:
        with torch.no_grad():
            linear.bias += bias


def coupled_linears(block: nn.Module, channel_linear: nn.Linear) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """The linears whose output rows (producers) and input columns (consumers) are the block's channels."""
    producers, consumers = [], []
    for dependency, _ in _channel_group(block, channel_linear, [0]):
        module = dependency.target.module
        if isinstance(module, nn.Linear):
            (producers if dependency.handler == tp.prune_linear_out_channels else consumers).append(module)
    return producers, consumers


def remove_block_channels(block: nn.Module, channel_linear: nn.Linear, remove: Sequence[int]) -> None:
    """Remove hidden channels ``remove`` of an MLP-like ``block`` whose channels ``channel_linear`` produces.

    Torch-Pruning traces the block once on a one-token input and finds every coupled slice
    (gate and up rows, down columns, biases) so no projection is listed by hand.
    """
    if len(remove):
        _channel_group(block, channel_linear, sorted(int(i) for i in remove)).prune()


def _channel_group(block: nn.Module, channel_linear: nn.Linear, indices: list[int]) -> tp.Group:
    from ..calibration.engine import evaluating  # here: the calibration engine imports the adapters, which import this

    example = torch.zeros(1, 1, channel_linear.in_features, device=channel_linear.weight.device, dtype=channel_linear.weight.dtype)
    frozen = [p for p in block.parameters() if not p.requires_grad]
    # The graph is traced through autograd nodes, so it needs gradients on even when pruning runs under no_grad;
    # the trace puts the block in eval mode and leaves it so (a model pruned while training came back in eval mode).
    with torch.enable_grad(), evaluating(block):
        for parameter in frozen:
            parameter.requires_grad_(True)
        try:
            graph = tp.DependencyGraph().build_dependency(block, example_inputs=example)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(False)
    return graph.get_pruning_group(channel_linear, tp.prune_linear_out_channels, idxs=indices)


def resized_linear(
    linear: nn.Linear, in_features: int | None = None, out_features: int | None = None, bias: bool | None = None
) -> nn.Linear:
    """A new, uninitialised linear like ``linear`` with other sizes (its weights are loaded next; ``skip_init``:
    initialising would take time and draw from the caller's random stream)."""
    return skip_init(
        nn.Linear,
        linear.in_features if in_features is None else in_features,  # 0 is a width (``or`` read it as "keep")
        linear.out_features if out_features is None else out_features,
        bias=(linear.bias is not None) if bias is None else bias,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def resize_norm(norm: nn.Module, width: int) -> None:
    """Give a scale-only norm (RMSNorm) an uninitialised ``width``-sized scale."""
    norm.weight = nn.Parameter(torch.empty(width, device=norm.weight.device, dtype=norm.weight.dtype))


def resize_embedding(embedding: nn.Embedding, width: int) -> None:
    """Give ``embedding`` an uninitialised ``width``-wide table (a sliced residual stream's, loaded next)."""
    weight = embedding.weight
    embedding.weight = nn.Parameter(torch.empty(weight.shape[0], width, device=weight.device, dtype=weight.dtype))
    embedding.embedding_dim = width

"""Compute cost of a model, measured with Torch-Pruning's operation counter."""

from __future__ import annotations

import sys
import threading

import torch
from torch import nn
from torch_pruning.utils import op_counter

from ..calibration.engine import evaluating
from .mpo import MPOLinear

_PROBE_TOKENS = 8
_COUNTING = threading.Lock()
# What Torch-Pruning's counter leaves on the model it counted (its hooks and per-module variables it removes itself).
_COUNTER_ATTRIBUTES = (
    "start_flops_count", "stop_flops_count", "reset_flops_count", "compute_average_flops_cost", "__batch_counter__",
)  # fmt: skip


def count_parameters(module: nn.Module) -> int:
    """Every parameter of ``module`` (a model's size, a decoder layer's)."""
    return sum(parameter.numel() for parameter in module.parameters())


def count_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of the model's linear layers (not the attention score products,
    which depend on context length) from one short forward pass.

    Torch-Pruning's counter runs on the model itself: its ``count_ops_and_params`` deep-copies the
    model first, which doubled the peak memory of every structured pruning run (measured: 3-layer
    Mixtral-8x7B-shaped model, 22.6 GiB peak for 8.6 GiB of weights); the counter's hooks and
    variables are removed afterwards."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device=device)
    with _COUNTING:  # the counter reads its module table, a global, when it adds its hooks and when it removes them
        custom = dict(op_counter.CUSTOM_MODULES_MAPPING)
        op_counter.CUSTOM_MODULES_MAPPING[nn.Linear] = _linear_macs
        # Not nn.Linear, so uncounted (MPOE reported its experts as free): each rebuilds its full weight and multiplies by it.
        op_counter.CUSTOM_MODULES_MAPPING[MPOLinear] = _linear_macs
        op_counter.add_flops_counting_methods(model)
        try:
            model.start_flops_count(ost=sys.stdout, verbose=False, ignore_list=[])
            with evaluating(model), torch.no_grad():
                model(ids)
            macs = model.compute_average_flops_cost()[0]
        finally:
            model.stop_flops_count()
            op_counter.CUSTOM_MODULES_MAPPING.clear()
            op_counter.CUSTOM_MODULES_MAPPING.update(custom)
            for name in _COUNTER_ATTRIBUTES:
                model.__dict__.pop(name, None)
    return int(macs) // _PROBE_TOKENS


def _linear_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """in × out per token: Torch-Pruning's linear hook also adds one bias term per call (not per token),
    which the division by the probe's tokens turned into out / 8 "MACs" per token."""
    module.__flops__ += inputs[0].numel() * output.shape[-1]

"""optimum-quanto weight-only quantization that keeps pruned weights exactly zero.

quanto's int8 and float8 map 0 to 0, but its int4/int2 quantizer is affine with a float shift,
which turns every pruned weight into a small non-zero value (measured: no zeros left after
int4). Those qtypes use quanto's own zero-point option instead (an integer shift, so 0 is
exactly representable), through ``ZeroPreservingOptimizer``. quanto packs int4 weights in groups
of 128 for kernels whose zero-point is a float (TinyGemm for bfloat16, on CPU as on CUDA; AWQ for
float16 on CUDA), which cannot keep those zeros (TinyGemm refuses an integer zero-point outright),
so ``check_packing`` refuses int4 there before anything runs, and every quantization ends with a
count of each layer's zeros. Imported only when a recipe quantizes: optimum-quanto is an optional
dependency (``optimum-prune[quanto]``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from optimum.quanto import MaxOptimizer, freeze, quantize
from torch import nn

from .adapters.base import qualified_name
from .quantized import dequantized_weight, refuse_recorded_structure

logger = logging.getLogger(__name__)

LOW_BIT_WEIGHTS = ("int4", "int2")
QTYPES = {"float8": "qfloat8", "int8": "qint8", "int4": "qint4", "int2": "qint2"}  # QuantoConfig.weights → quanto


class ZeroPreservingOptimizer(MaxOptimizer):
    """quanto's min/max affine optimizer with its integer zero-point, so 0 is represented exactly."""

    def __call__(self, base: torch.Tensor, qtype: Any, axis: int, group_size: int | None = None, zeropoint: bool = False):
        return super().__call__(base, qtype, axis, group_size, zeropoint=True)


def check_packing(model: nn.Module, config: Any, field: str) -> None:
    """Refuse int4 on the weights quanto would pack for a float zero-point kernel (see the module docstring)."""
    if config.weights != "int4":
        return
    for name, linear in _quantized_linears(model, config):
        dtype, device = linear.weight.dtype, linear.weight.device
        if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type == "cuda"):
            kernel = "TinyGemm" if dtype == torch.bfloat16 else "AWQ"
            raise ValueError(
                f"{field}: QuantoConfig(weights='int4') on {name} ({dtype} on {device.type}): optimum-quanto packs these "
                f"weights for its {kernel} kernel, whose float zero-point cannot keep pruned weights at exactly 0; quantize "
                "the model in float32 (model.float()), or use weights='int8' or GPTQConfig(bits=4)"
            )


def quantize_weights(model: nn.Module, config: Any) -> None:
    """Quantize every linear but the output embedding (``lm_head``) and ``config.modules_to_not_convert`` (a
    ``transformers.QuantoConfig``) in place, weights only, and freeze them."""
    refuse_recorded_structure(model, "optimum-quanto (its reload rebuilds the model from the plain config)")
    if config.weights == "int8" and any(linear.weight.dtype == torch.bfloat16 for _, linear in _quantized_linears(model, config)):
        logger.warning(
            "optimum-quanto int8 weights in a bfloat16 model: on the CPU its matmul (torch._weight_int8pack_mm) crashed "
            "the process (a segfault) on the weights optimum-quanto's reload gives (unaligned; seen with torch 2.13 and "
            "optimum-quanto 0.2.7); run the saved model on a GPU, or quantize a float16 or float32 model for the CPU"
        )
    zeros = {name: int((linear.weight == 0).sum()) for name, linear in _quantized_linears(model, config)}
    optimizer = ZeroPreservingOptimizer() if config.weights in LOW_BIT_WEIGHTS else None
    quantize(model, weights=QTYPES[config.weights], optimizer=optimizer, exclude=[f"*{name}*" for name in _kept_names(model, config)])
    freeze(model)
    modules = dict(model.named_modules())
    for name, before in zeros.items():
        after = int((dequantized_weight(modules[name]) == 0).sum())
        if after < before:  # a count, not a mask (a byte per weight): rounding may add zeros; losing any is the failure
            raise ValueError(
                f"optimum-quanto left {name} with {after} zeros of the {before} it had: this quanto version quantizes "
                f"{config.weights} weights in a way that moves pruned weights away from zero"
            )


def _kept_names(model: nn.Module, config: Any) -> list[str]:
    """What stays unquantized: the output embedding and ``modules_to_not_convert``."""
    head = model.get_output_embeddings()
    return ([qualified_name(model, head)] if head is not None else []) + list(config.modules_to_not_convert or [])


def _quantized_linears(model: nn.Module, config: Any) -> list[tuple[str, nn.Linear]]:
    """The linears quanto will quantize. transformers keeps a module unconverted when any entry is a substring of
    its name; quanto matches glob patterns against whole names, hence the wildcards in ``quantize_weights``."""
    kept = _kept_names(model, config)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not any(k in name for k in kept)]

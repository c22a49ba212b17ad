"""optimum-quanto weight-only quantization that keeps pruned weights exactly zero.

quanto's int8 and float8 map 0 to 0, but its int4/int2 quantizer is affine with a float shift,
which turns every pruned weight into a small non-zero value (measured: no zeros left after
int4). Those qtypes use quanto's own zero-point option instead (an integer shift, so 0 is
exactly representable), through ``ZeroPreservingOptimizer``. Imported only when a recipe
quantizes: optimum-quanto is an optional dependency (``optimum-prune[quanto]``).
"""

from __future__ import annotations

from typing import Any

import torch
from optimum.quanto import MaxOptimizer, freeze, quantize
from torch import nn

from .adapters.base import qualified_name

LOW_BIT_WEIGHTS = ("int4", "int2")
QTYPES = {"float8": "qfloat8", "int8": "qint8", "int4": "qint4", "int2": "qint2"}  # QuantoConfig.weights → quanto


class ZeroPreservingOptimizer(MaxOptimizer):
    """quanto's min/max affine optimizer with its integer zero-point, so 0 is represented exactly."""

    def __call__(self, base: torch.Tensor, qtype: Any, axis: int, group_size: int | None = None, zeropoint: bool = False):
        return super().__call__(base, qtype, axis, group_size, zeropoint=True)


def quantize_weights(model: nn.Module, config: Any) -> None:
    """Quantize every linear but the output embedding (``lm_head``) and ``config.modules_to_not_convert`` (a
    ``transformers.QuantoConfig``) in place, weights only, and freeze them."""
    structure = getattr(model.config, "quantization_config", None)
    if structure is not None:
        raise ValueError(
            f"the model's config already holds a quantization_config ({type(structure).__name__}): non-uniform "
            "structured results store their per-layer shapes there, and optimum-quanto's reload rebuilds the model "
            "from the plain config, so they cannot be quantized with quanto yet; prune uniformly (width with "
            "ranking='layer', layers) or quantize unstructured results"
        )
    # transformers keeps a module unconverted when any entry is a substring of its name; quanto
    # matches glob patterns against whole names, hence the wildcards.
    head = model.get_output_embeddings()
    kept = ([qualified_name(model, head)] if head is not None else []) + list(config.modules_to_not_convert or [])
    exclude = [f"*{name}*" for name in kept]
    optimizer = ZeroPreservingOptimizer() if config.weights in LOW_BIT_WEIGHTS else None
    quantize(model, weights=QTYPES[config.weights], optimizer=optimizer, exclude=exclude)
    freeze(model)

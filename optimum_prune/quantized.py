"""The dense values behind a quantized linear's weight, whichever quantizer made it, so that
pruned zeros can be counted after quantization (``verify_sparsity``); and, for the quantizers
whose codes are evenly spaced integers (GPTQ, optimum-quanto int8 / int4), the scales of that
grid, so that ``sparsify`` can repack the codes instead of quantizing twice (``integer_grid``).

- optimum-quanto: weights are tensor subclasses with ``dequantize()``;
- bitsandbytes (transformers' ``BitsAndBytesConfig``, load-time): 4-bit ``Params4bit`` carry a
  ``quant_state`` (block-wise absmax, NF4 / FP4 codes) that ``bitsandbytes.functional.dequantize_4bit``
  undoes, until a first forward on a CPU with AVX512-BF16 repacks them for its CPU kernel (then the
  weight is read through that kernel); 8-bit ``Int8Params`` hold int8 rows with one absmax per row
  (``SCB``, moved to the layer's ``state`` by its first forward): value = q · SCB / 127 (LLM.int8()'s
  vector-wise quantization);
- GPTQ (gptqmodel's quantized linears, which are not ``nn.Linear``): packed integer codes with per-group
  scales and zero-points that their ``dequantize_weight()`` undoes, laid out ``[in, out]``. gptqmodel's
  CPU default, ``TorchFusedQuantLinear``, repacks them in place into torch's private int4 layout at its
  first forward in eval mode (``transformed``); ``dequantize_weight()`` fails from then on, so the weight
  is read through the layer's own kernel instead (``repacked_in_place``).

bitsandbytes and GPTQ codes represent 0 exactly (NF4 and FP4 have a zero code, int8 rounds 0 to 0,
GPTQ's zero-point is an integer): bitsandbytes keeps every pruned weight pruned (NF4 may also turn a
few tiny weights into zeros); GPTQ does once its error compensation spares them (``optimum_prune.gptq``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn


def refuse_recorded_structure(model: nn.Module, quantizer: str) -> None:
    """Non-uniform structured results record their per-layer shapes as the config's ``quantization_config``
    (their loader reads it there); a quantizer writes its own config in that place, or reloads from the plain
    config, so the shapes would be lost and the saved model would reload at stock shapes, partly random. A
    model loaded quantized is refused too: its weights are codes already."""
    from .structure.loading import records_layer_shapes  # here: it imports the adapters, which import this module

    structure = getattr(model.config, "quantization_config", None)
    if structure is not None and not records_layer_shapes(structure):
        raise ValueError(
            f"the model was loaded quantized ({type(structure).__name__} in its config): {quantizer} quantizes float "
            "weights; quantize the unquantized checkpoint"
        )
    if structure is not None:
        raise ValueError(
            f"the model's config already holds a quantization_config ({type(structure).__name__}): non-uniform "
            f"structured results store their per-layer shapes there, which {quantizer} would replace or ignore, so "
            "they cannot be quantized with it yet; prune uniformly (width with ranking='layer', layers) or quantize "
            "unstructured results"
        )


def is_linear(module: nn.Module) -> bool:
    """A linear layer, quantized or not (GPTQ's quantized linears and ``sparsify``'s ``SparseLinear`` replace
    ``nn.Linear`` by another class)."""
    return isinstance(module, nn.Linear) or is_gptq_linear(module) or is_sparse_24(module)


def is_sparse_24(module: nn.Module) -> bool:
    """A ``SparseLinear``, whose weight ``sparsify`` holds in the compressed 2:4 format."""
    from .kernels.linear import SparseLinear  # here, not at the top: the kernels import this module

    return isinstance(module, SparseLinear)


def is_packed_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear, whose weight holds NF4 / FP4 codes packed two to a byte."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a plain ``[out, in]`` tensor (dequantized when quantized)."""
    if is_sparse_24(module):
        from .kernels.format import decompress

        return decompress(module.compressed)
    if is_gptq_linear(module):
        if repacked_in_place(module):
            return _weight_through_kernel(module._fused_op_forward, module.in_features, module.scales.dtype, module.scales.device)
        return module.dequantize_weight().T
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        import bitsandbytes

        if getattr(quant_state, "packing_format_for_cpu", False):  # repacked for its CPU kernel at its first forward

            def multiply(rows: torch.Tensor) -> torch.Tensor:
                return bitsandbytes.matmul_4bit(rows, weight, quant_state=quant_state)

            return _weight_through_kernel(multiply, module.in_features, module.compute_dtype or quant_state.dtype, weight.device)
        return bitsandbytes.functional.dequantize_4bit(weight.data, quant_state)
    if hasattr(weight, "SCB"):  # bitsandbytes 8-bit: its first forward moves the row scales to the layer's state
        row_scales = weight.SCB if weight.SCB is not None else module.state.SCB
        return weight.data.float() * (row_scales.float().unsqueeze(1) / 127)
    weight = weight.detach()
    return weight if type(weight) is torch.Tensor else weight.dequantize()  # optimum-quanto


def is_gptq_linear(module: nn.Module) -> bool:
    """A gptqmodel quantized linear (recognised without importing gptqmodel)."""
    return hasattr(module, "qweight") and hasattr(module, "dequantize_weight")


def repacked_in_place(module: nn.Module) -> bool:
    """A GPTQ layer whose codes its fused CPU / XPU kernel has repacked into torch's int4 layout (gptqmodel's
    ``TorchFusedQuantLinear`` does at its first forward in eval mode): GPTQ's own layout is gone."""
    return is_gptq_linear(module) and bool(getattr(module, "transformed", False))


def _weight_through_kernel(
    multiply: Callable[[torch.Tensor], torch.Tensor], size: int, dtype: torch.dtype, device: torch.device, rows: int = 1024
) -> torch.Tensor:
    """The ``[out, in]`` weight a layer whose own layout is gone computes with: its kernel's products
    (``multiply``, without bias) with the rows of the ``size``-wide identity, ``rows`` at a time (exact: one
    non-zero term per output). in² · out multiply-adds: a fraction of a second per layer at SmolLM2's sizes,
    longer for 8B-class layers."""
    with torch.no_grad():
        blocks = [
            multiply(torch.eye(min(rows, size - start), size, dtype=dtype, device=device).roll(start, dims=1))
            for start in range(0, size, rows)
        ]  # eye(n, size) rolled by start: ones at (i, start + i)
    return torch.cat(blocks).T


def is_quantized(module: nn.Module) -> bool:
    """A linear whose weight is held by a quantizer (GPTQ, optimum-quanto, bitsandbytes) or in the compressed 2:4
    format rather than as plain values."""
    if is_gptq_linear(module) or is_sparse_24(module):
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and (type(weight.detach()) is not torch.Tensor or hasattr(weight, "quant_state") or hasattr(weight, "SCB"))


class IntegerGrid(NamedTuple):
    """How a quantized linear's weight sits on an integer grid: ``dequantized = code × scales`` per row and
    ``group_size`` input columns (``scales`` ``[out, in / group_size]``), codes of ``bits`` bits."""

    scales: torch.Tensor
    group_size: int
    bits: int


def integer_grid(module: nn.Module, name: str) -> IntegerGrid:
    """The grid of a GPTQ (symmetric, columns in order) or optimum-quanto int8 / int4 linear; a clear error for
    quantizers whose codes are not evenly spaced integers (float8, NF4) or that ``name``'s layer cannot expose."""
    if is_gptq_linear(module):
        group_size = module.group_size if module.group_size > 0 else module.in_features
        g_idx = module.g_idx
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(module.in_features, device=g_idx.device) // group_size):
            raise ValueError(
                f"{name}: GPTQ groups its columns out of order (desc_act=True), which the 2:4 format's contiguous "
                "groups cannot hold; quantize with GPTQConfig(desc_act=False)"
            )
        return IntegerGrid(module.scales.T, group_size, module.bits)
    weight = module.weight
    if hasattr(weight, "quant_state") or hasattr(weight, "SCB"):
        raise ValueError(f"{name}: bitsandbytes weights are not repacked; sparsify the unquantized model (bits=4 or 8)")
    qtype = getattr(weight, "qtype", None)
    if qtype is None or qtype.is_floating_point or getattr(weight, "axis", 0) != 0:
        raise ValueError(
            f"{name}: {type(weight).__name__} ({qtype}) weights are not on a per-row integer grid; only GPTQ and "
            "optimum-quanto int8 / int4 weights are repacked (sparsify the unquantized model with bits= otherwise)"
        )
    out_features, in_features = weight.shape
    group_size = getattr(weight, "_group_size", None) or in_features
    return IntegerGrid(weight._scale.reshape(out_features, in_features // group_size), group_size, qtype.bits)

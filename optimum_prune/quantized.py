"""The dense values behind a quantized linear's weight, whichever quantizer made it, so that
pruned zeros can be counted after quantization (``verify_sparsity``).

- optimum-quanto: weights are tensor subclasses with ``dequantize()``;
- bitsandbytes (transformers' ``BitsAndBytesConfig``, load-time): 4-bit ``Params4bit`` carry a
  ``quant_state`` (block-wise absmax, NF4 / FP4 codes) that ``bitsandbytes.functional.dequantize_4bit``
  undoes; 8-bit ``Int8Params`` hold int8 rows with one absmax per row (``SCB``): value = q · SCB / 127
  (LLM.int8()'s vector-wise quantization);
- GPTQ (gptqmodel's quantized linears, which are not ``nn.Linear``): packed integer codes with per-group
  scales and zero-points that their ``dequantize_weight()`` undoes, laid out ``[in, out]``.

bitsandbytes and GPTQ codes represent 0 exactly (NF4 and FP4 have a zero code, int8 rounds 0 to 0,
GPTQ's zero-point is an integer): bitsandbytes keeps every pruned weight pruned (NF4 may also turn a
few tiny weights into zeros); GPTQ does once its error compensation spares them (``optimum_prune.gptq``).
"""

from __future__ import annotations

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """A linear layer, quantized or not (GPTQ's quantized linears replace ``nn.Linear`` by another class)."""
    return isinstance(module, nn.Linear) or is_gptq_linear(module)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a plain ``[out, in]`` tensor (dequantized when quantized)."""
    if is_gptq_linear(module):
        return module.dequantize_weight().T
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, quant_state)
    row_scales = getattr(weight, "SCB", None)
    if row_scales is not None:  # bitsandbytes 8-bit
        return weight.data.float() * (row_scales.float().unsqueeze(1) / 127)
    weight = weight.detach()
    return weight if type(weight) is torch.Tensor else weight.dequantize()  # optimum-quanto


def is_gptq_linear(module: nn.Module) -> bool:
    """A gptqmodel quantized linear (recognised without importing gptqmodel)."""
    return hasattr(module, "qweight") and hasattr(module, "dequantize_weight")

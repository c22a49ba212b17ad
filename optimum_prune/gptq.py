"""GPTQ (transformers' ``GPTQConfig``, run by optimum's ``GPTQQuantizer`` on gptqmodel) that keeps
pruned weights exactly zero.

GPTQ quantizes a weight matrix column by column and spreads each column's rounding error over the
columns not yet quantized (Frantar et al., 2022, Alg. 1: W[:, j:] -= err_i · H⁻¹[i, j:]). Pruned
weights receive those updates too; on a Wanda 2:4 model a few percent of them round to non-zero
codes (measured on a tiny model: 0.1–3.5 % per layer, tests/test_gptq.py), and the 2:4 pattern is lost.
Here every pruned weight is quantized to exactly 0 instead: what it had accumulated joins that
column's rounding error, which GPTQ then compensates in the later columns — SparseGPT's joint
prune-and-quantize step (Frantar & Alistarh, 2023, §3.5) with the mask fixed by the earlier pruning.
Every GPTQ code maps 0 to 0 (its zero-point is an integer), so the zeros survive packing.

gptqmodel quantizes inside one loop we do not copy: its per-column ``Quantizer.quantize`` call is
where the mask is applied, so optimum's ``GPTQ`` is swapped for a subclass only while
``quantize_model`` runs. Column reordering (``desc_act``, gptqmodel's ``act_group_aware``) would
break the column count, so it is refused or turned off; a final check refuses any result where a
pruned weight moved (e.g. a gptqmodel whose loop changed). Imported only when a recipe quantizes
with GPTQ: gptqmodel is an optional dependency (``optimum-prune[gptq]``).
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from transformers import GPTQConfig

from .dependencies import MissingDependency
from .quantized import is_gptq_linear, refuse_recorded_structure


def check_config(config: GPTQConfig, field: str) -> None:
    """Refuse what zero-preserving GPTQ cannot do, and a missing gptqmodel, before anything is pruned."""
    if config.desc_act:
        raise ValueError(
            f"{field}: GPTQConfig(desc_act=True) quantizes columns out of order, which keeping pruned weights at zero "
            "does not support; use desc_act=False"
        )
    if not config.sym:
        raise ValueError(
            f"{field}: GPTQConfig(sym=False) is not supported: transformers' loader reads GPTQ's v1 checkpoint layout, "
            "which stores asymmetric zero-points minus one and can underflow (gptqmodel's own warning); use sym=True"
        )
    if isinstance(config.dataset, str):
        raise ValueError(
            f"{field}: GPTQConfig(dataset={config.dataset!r}) downloads a dataset; leave dataset=None to calibrate "
            "on the recipe's calibration data, or give a list of texts"
        )
    from optimum.utils import is_gptqmodel_available

    if not is_gptqmodel_available():
        raise MissingDependency(f"{field}: GPTQConfig needs gptqmodel 5.6: pip install 'optimum-prune[gptq]' (see README, GPTQ)")


PACKING_WORD = 32  # gptqmodel packs codes into 32-bit words, 32 input columns and 32 output rows at a time


def check_widths(model: nn.Module, config: GPTQConfig, field: str) -> None:
    """Every decoder linear's widths must be whole multiples of gptqmodel's packing blocks (it fails mid-packing
    otherwise), and its input width must hold whole quantization groups (its CPU int4 kernel fails on SmolLM2's
    576-wide inputs with group_size=128, at the first forward)."""
    from .adapters import get_adapter

    adapter = get_adapter(model)
    every = [
        (prefix, name, m)
        for prefix, layer in zip(adapter.layer_names(), adapter.decoder_layers())
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    ]
    chosen = {name for names in config.modules_in_block_to_quantize or [] for name in names}  # empty: every linear
    held = {name for _, name, _ in every}
    if chosen - held:
        raise ValueError(
            f"{field}: GPTQConfig(modules_in_block_to_quantize=...) names {sorted(chosen - held)}, which no decoder layer "
            f"holds (optimum would fail on them after pruning); give names within a layer, e.g. {', '.join(sorted(held)[:4])}"
        )
    linears = {f"{prefix}.{name}": m for prefix, name, m in every if not chosen or name in chosen}
    unpackable = [
        f"{name} ({m.out_features}×{m.in_features})"
        for name, m in linears.items()
        if m.in_features % PACKING_WORD or m.out_features % PACKING_WORD
    ]
    if unpackable:
        shown = ", ".join(unpackable[:3]) + (f" and {len(unpackable) - 3} more" if len(unpackable) > 3 else "")
        raise ValueError(
            f"{field}: gptqmodel packs GPTQ codes in blocks of {PACKING_WORD} input columns and output rows; {shown} "
            f"{'is' if len(unpackable) == 1 else 'are'} not made of whole blocks: keep such linears out of "
            "GPTQConfig(modules_in_block_to_quantize=...), prune to widths in multiples of 32, or quantize with QuantoConfig"
        )
    group_size = config.group_size
    if group_size is None or group_size <= 0:
        return
    widths = sorted({m.in_features for m in linears.values()})
    uneven = [w for w in widths if w % group_size]
    if uneven:
        common = math.gcd(*widths)
        fitting = [g for g in (128, 64, 32, 16) if common % g == 0]
        hint = f"use group_size={fitting[0]}" if fitting else "use group_size=-1 (one group per row)"
        raise ValueError(
            f"{field}: GPTQConfig(group_size={group_size}) does not divide the decoder linears' input widths {uneven}; "
            f"GPTQ kernels quantize whole groups: {hint}"
        )


def quantize_weights(model: nn.Module, config: GPTQConfig, windows: torch.Tensor | None, tokenizer: Any) -> None:
    """Quantize ``model``'s decoder linears in place with GPTQ, keeping zeros; calibrate on ``windows`` (token
    ids ``[samples, seq_len]``), or on ``config.dataset`` (texts, tokenized by ``tokenizer``) when it is None."""
    from optimum.gptq import GPTQQuantizer

    refuse_recorded_structure(model, "GPTQ (it saves its own quantization_config)")
    check_widths(model, config, "GPTQConfig")  # again: structured pruning may have changed the widths
    options = config.to_dict_optimum()
    options["act_group_aware"] = False  # see the module docstring
    if windows is not None:
        options["dataset"] = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones_like(w).unsqueeze(0)} for w in windows]
        options["model_seqlen"] = windows.shape[1]
    quantizer = GPTQQuantizer.from_dict(options)
    if getattr(model, "hf_device_map", None) is None:  # optimum reads it; from_pretrained sets it, a model built in memory lacks it
        model.hf_device_map = {"": str(next(model.parameters()).device)}
    with _PATCHING, _zero_preserving_gptq(), _python_packing():  # one quantization at a time in a process (threads)
        quantizer.quantize_model(model, tokenizer)
    for module in model.modules():  # optimum quantizes in the v2 layout but leaves the layers flagged v1
        if is_gptq_linear(module):
            module.qzero_format(format=2)
    saved = quantizer.to_dict()
    if windows is not None:
        saved["dataset"] = None  # token tensors are calibration data, not configuration
    model.config.quantization_config = GPTQConfig.from_dict_optimum(saved)


@contextmanager
def v1_checkpoint_layout(model: nn.Module) -> Iterator[None]:
    """Hold the GPTQ layers in the v1 ("gptq") layout while ``model`` is saved.

    gptqmodel computes with v2 zero-points; v1 stores them minus one. transformers' ``GPTQConfig``
    keeps no layout field (it drops optimum's ``format``), so its loader assumes v1 and converts on
    load: a v2 checkpoint would reload with every zero-point off by one. optimum's own
    ``GPTQQuantizer.save`` converts the same way. (Layers whose codes their CPU kernel has repacked in place
    have no layout left to convert: ``save_pruned`` refuses them first.)
    """
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module

    in_v2 = [module for module in model.modules() if is_gptq_linear(module) and module.qzero_format() == 2]
    for module in in_v2:
        convert_gptq_v2_to_v1_format_module(module, QuantizeConfig(bits=module.bits))
    try:
        yield
    finally:
        for module in in_v2:
            convert_gptq_v1_to_v2_format_module(module, module.bits, module.pack_dtype)


# optimum's GPTQ class and gptqmodel's packer switch are process-wide: a quantization in another thread finished while
# this one ran restored the stock class for this one's later layers (its pruned weights quantized away, silently).
_PATCHING = threading.Lock()


@contextmanager
def _python_packing() -> Iterator[None]:
    """Pack codes with gptqmodel's Python packer unless ``GPTQMODEL_DISABLE_PACK_EXT`` is set.

    Its C++ packer is JIT-compiled in every new process (its loader clears the build cache first):
    two minutes on a 2-core CPU before the first layer is packed, against seconds in Python here.
    """
    if "GPTQMODEL_DISABLE_PACK_EXT" in os.environ:
        yield
        return
    os.environ["GPTQMODEL_DISABLE_PACK_EXT"] = "1"
    try:
        yield
    finally:
        del os.environ["GPTQMODEL_DISABLE_PACK_EXT"]


@contextmanager
def _zero_preserving_gptq() -> Iterator[None]:
    import optimum.gptq.quantizer as optimum_gptq

    stock = optimum_gptq.GPTQ
    optimum_gptq.GPTQ = _zero_preserving_class(stock)
    try:
        yield
    finally:
        optimum_gptq.GPTQ = stock


def _zero_preserving_class(gptq: type) -> type:
    from gptqmodel.quantization.quantizer import Quantizer

    class ZeroPreservingQuantizer(Quantizer):
        """gptqmodel's quantizer, returning 0 for the pruned weights of each successive column."""

        def __init__(self, pruned: torch.Tensor, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.pruned = pruned
            self.column = 0

        def quantize(self, x: torch.Tensor) -> torch.Tensor:
            quantized = super().quantize(x)
            if quantized.shape[-1] == 1:  # one column of GPTQ's loop
                quantized = quantized.masked_fill(self.pruned[:, self.column].unsqueeze(1).to(quantized.device), 0)
                self.column += 1
            return quantized

    class ZeroPreservingGPTQ(gptq):
        def create_quantizer(self, name: str) -> Quantizer:
            self.pruned = self.module.weight.detach() == 0
            return ZeroPreservingQuantizer(self.pruned, qcfg=self.qcfg, name=name)

        def hf_quantize(self, *args: Any, **kwargs: Any) -> Any:
            result = super().hf_quantize(*args, **kwargs)
            moved = int((self.module.weight.data[self.pruned.to(self.module.weight.device)] != 0).sum())
            if moved:
                raise RuntimeError(
                    f"GPTQ moved {moved} pruned weights away from zero: this gptqmodel version quantizes in a way "
                    "optimum_prune.gptq does not follow; install the gptqmodel version in constraints.txt"
                )
            return result

    return ZeroPreservingGPTQ

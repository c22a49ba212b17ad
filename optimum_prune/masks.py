"""Sparsity masks that survive fine-tuning and LoRA merging.

An optimizer with momentum moves zeroed weights off zero, and ``peft``'s ``merge_and_unload``
adds a dense ``B·A`` to every weight: both silently undo unstructured pruning (a plain merge
took a tiny 50 %-sparse model to 8 %). ``SparsityMasks`` remembers which weights of the
prunable linears must stay zero and puts the zeros back. It holds the linear modules
themselves, so one set of masks serves the plain model, the same model wrapped by peft (the
mask applies to ``get_base_layer().weight``) and the model after ``merge_and_unload``.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from torch import nn

from .adapters import get_adapter
from .dispatch import refuse_offloaded
from .ignoring import as_patterns, check_ignore_patterns, is_ignored
from .quantized import dequantized_weight, is_packed_4bit
from .wrappers import base_layer, unwrapped_modules


def prunable_linears(
    model: nn.Module, ignore: Iterable[str] = (), include_routers: bool = False, every_part: bool = False
) -> dict[str, nn.Linear]:
    """The decoder layers' linears by qualified name, minus ``ignore`` glob matches and, unless
    ``include_routers``, MoE routers (``prune`` leaves them dense unless asked). The language tower's,
    or with ``every_part`` a multimodal model's vision tower and projector too.

    Works through a peft wrapper: a tuner layer (e.g. LoRA) contributes its base linear under
    the name the unwrapped model gives it, and its own small adapter linears are skipped.
    """
    adapter = get_adapter(model)
    patterns = tuple(ignore)
    found: dict[str, nn.Linear] = {}
    for part in adapter.parts().values() if every_part else [adapter]:
        for prefix, layer in zip(part.layer_names(), part.decoder_layers()):
            routers = set() if include_routers else {id(base_layer(router)) for router in part.routers(layer)}
            for name, linear in unwrapped_modules(layer):
                qualified = f"{prefix}.{name}"
                if isinstance(linear, nn.Linear) and id(linear) not in routers and not is_ignored(qualified, patterns):
                    found[qualified] = linear
    return found


class SparsityMasks:
    """Which weights of each prunable linear are pruned (``True`` = must stay zero)."""

    def __init__(self, linears: dict[str, nn.Linear], pruned: dict[str, torch.Tensor], frozen: dict[str, tuple[int, int]] | None = None) -> None:
        self.linears = linears
        self.pruned = pruned
        # bitsandbytes 4-bit linears (a QLoRA base): codes packed two to a byte, which no optimizer changes and no
        # mask can be written into; only their (zeros, weights) counts are kept, for sparsity().
        self.frozen = frozen or {}

    @classmethod
    def from_zeros(cls, model: nn.Module, ignore: str | Iterable[str] = ()) -> "SparsityMasks":
        """Masks of the weights that are exactly zero now (a pruned checkpoint's zeros).

        Zeros the weights already had before pruning (e.g. ~0.03 % of a dequantised GGUF model)
        are kept too: every zero counts, as ``verify_sparsity`` counts them; so are a router's
        (``moe_options.prune_router``).
        """
        refuse_offloaded(model, "SparsityMasks hold each weight's mask in memory and zero the weights in place")
        ignore = as_patterns(ignore, "SparsityMasks.from_zeros ignore")
        check_ignore_patterns(get_adapter(model), ignore, "SparsityMasks.from_zeros ignore")
        linears = prunable_linears(model, ignore, include_routers=True, every_part=True)  # a pruned vision tower's too
        frozen = {name: _zeros_and_size(linear) for name, linear in linears.items() if is_packed_4bit(linear)}
        linears = {name: linear for name, linear in linears.items() if name not in frozen}
        return cls(linears, {name: dequantized_weight(linear).detach() == 0 for name, linear in linears.items()}, frozen)

    def packed(self) -> list[str]:
        """The linears whose weights are bitsandbytes 4-bit codes (``frozen``): their zeros cannot be written in place."""
        return list(self.frozen)

    def set(self, name: str, pruned: torch.Tensor) -> None:
        if name in self.frozen:
            raise ValueError(f"{name}'s weight is bitsandbytes 4-bit codes, packed two to a byte: it cannot be pruned in place")
        linear = self.linears[name]
        if pruned.shape != linear.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(pruned.shape)}, the weight {tuple(linear.weight.shape)}")
        self.pruned[name] = pruned.to(device=linear.weight.device, dtype=torch.bool)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight in place (cheap enough to run after each optimizer step)."""
        for name, pruned in self.pruned.items():
            weight = self.linears[name].weight
            if pruned.device != weight.device:  # the model moved (e.g. Trainer put it on the GPU)
                pruned = self.pruned[name] = pruned.to(weight.device)
            weight.masked_fill_(pruned, 0)

    def mask_gradients_in_backward(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Zero the masked weights' gradients as backward produces them (until the handles are removed),
        so what reads the gradients before the optimizer — gradient clipping's norm, DDP's all-reduce,
        the optimizer's state — sees the pruned model's; masks ``set`` later apply from then on."""
        return [
            linear.weight.register_hook(partial(self._masked_gradient, name))
            for name, linear in self.linears.items()
            if linear.weight.requires_grad
        ]

    def _masked_gradient(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.pruned[name].to(grad.device), 0)

    def sparsity(self) -> float:
        """Fraction of masked weights over all masked linears (and the zeros of frozen 4-bit ones)."""
        counts = [(int(mask.sum()), mask.numel()) for mask in self.pruned.values()] + list(self.frozen.values())
        total = sum(size for _, size in counts)
        return sum(zeros for zeros, _ in counts) / total if total else 0.0


def _zeros_and_size(linear: nn.Module) -> tuple[int, int]:
    weight = dequantized_weight(linear)
    return int((weight == 0).sum()), weight.numel()


def merge_lora_preserving_sparsity(peft_model: nn.Module) -> nn.Module:
    """``peft_model.merge_and_unload()`` without filling the pruned weights.

    The masks are read from the base weights before merging. Zeroing them after the plain merge
    equals adding only the masked update ``W + M ⊙ ΔW``, because ``W`` is zero wherever ``M`` is.
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError(f"expected a peft model with merge_and_unload(), got {type(peft_model).__name__}")
    refuse_offloaded(peft_model, "merging writes each adapter into its base weight in place")
    masks = SparsityMasks.from_zeros(peft_model)
    if masks.packed():
        raise ValueError(
            f"{masks.packed()[0]} (and {len(masks.packed()) - 1} more) holds bitsandbytes 4-bit codes: a merge into them "
            "requantizes every weight, so the zeros cannot be kept. Merge a QLoRA adapter into the unquantized pruned "
            "checkpoint: load it without quantization_config, PeftModel.from_pretrained(model, adapter_dir), then "
            "merge_lora_preserving_sparsity"
        )
    merged = peft_model.merge_and_unload()
    masks.apply()
    return merged

"""Sparsity metadata in the compressed-tensors format, so serving stacks can tell a checkpoint is sparse.

vLLM and the compressed-tensors loader read ``config.json``'s ``quantization_config`` with
``quant_method: "compressed-tensors"`` and its ``sparsity_config`` (compressed-tensors'
``SparsityCompressionConfig``): the storage ``format``, the ``targets`` (module classes or names)
minus ``ignore``, the ``global_sparsity`` fraction and the ``sparsity_structure`` (``"2:4"`` or
``"unstructured"``). Weights stay stored dense (``format: "dense"``), so the file is still an
ordinary checkpoint; loading it with transformers then needs the ``compressed-tensors`` package,
whose quantizer loads in float16 unless ``dtype=`` is given — which is why writing it is opt-in
(``save_pruned(..., compressed_tensors_metadata=True)``).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from accelerate.utils import align_module_device
from torch import nn

from .adapters import get_adapter
from .config import PruningConfig, as_pruning_config, readable_step, recorded_steps
from .dependencies import MissingDependency
from .dispatch import parameters_read
from .methods import METHODS
from .quantized import is_quantized
from .runs import planned_linears
from .sparsity import NMPattern, conforms_to

logger = logging.getLogger(__name__)


def sparsity_config(model: nn.Module, config: PruningConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The compressed-tensors ``sparsity_config`` of a model pruned by ``prune`` with ``config``
    (default: the last unstructured step the model records, e.g. the 2:4 step of "2:4, then remove
    layers": later structured steps leave fewer matrices, and what survives of its zeros is measured).

    The targets are the linears the config pruned, measured: with an N:M config, those whose
    weights conform to the pattern (an unrouted expert left dense, say, goes to ``ignore``).
    """
    config = as_pruning_config(config) if config is not None else _sparse_step(model)
    if METHODS.get(config.method).structured:
        raise ValueError(
            f"structured method {config.method!r} leaves smaller dense matrices, not sparse ones: there is no "
            "sparsity metadata to write"
        )
    pruned = planned_linears(get_adapter(model), config, checked=False)  # measured below instead
    pattern = config.shared_pattern()

    def still_pruned(linear: nn.Module) -> bool:
        """Not a linear the config named but left dense (e.g. MoE experts no calibration token reached); an
        offloaded weight is read through its accelerate hook."""
        with align_module_device(linear):
            weight = linear.weight.detach()
            return conforms_to(weight, pattern) if pattern is not None else bool((weight == 0).any())

    pruned = {name: linear for name, linear in pruned.items() if still_pruned(linear)}
    if not pruned:
        raise ValueError(
            f"no linear the {config.method} step pruned is still {pattern or 'sparse'} (a later step filled its zeros in): "
            "there is no sparsity metadata to write; save without compressed_tensors_metadata"
        )
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    zeros = total = 0
    for parameter in parameters_read(model):
        zeros, total = zeros + int((parameter == 0).sum()), total + parameter.numel()
    return {
        "format": "dense",
        "targets": ["Linear"],
        "ignore": [name for name in linears if name not in pruned],
        "global_sparsity": zeros / total,
        "sparsity_structure": str(pattern) if pattern is not None and pattern == NMPattern(2, 4) else "unstructured",
    }


def compressed_tensors_config(model: nn.Module, config: PruningConfig | Mapping[str, Any] | None = None) -> Any:
    """transformers' ``CompressedTensorsConfig`` carrying ``sparsity_config(model)``: set it as
    ``model.config.quantization_config`` before ``save_pretrained`` (needs ``compressed-tensors``)."""
    require_compressed_tensors()
    from transformers import CompressedTensorsConfig

    existing = getattr(model.config, "quantization_config", None)
    if existing is not None and not _sparsity_only(existing):  # earlier sparsity metadata is written anew
        raise ValueError(
            f"the model already carries a {type(existing).__name__} quantization config; compressed-tensors "
            "sparsity metadata replaces quantization_config, so it can only be written for an unquantized model "
            "with stock shapes"
        )
    quantized = next((name for name, module in model.named_modules() if is_quantized(module)), None)
    if quantized is not None:
        raise ValueError(
            f"{quantized} is quantized (e.g. by optimum-quanto, which records no quantization_config): compressed-tensors "
            "sparsity metadata describes dense weights, so it can only be written for an unquantized model; save the "
            "pruned model before quantizing it, or without compressed_tensors_metadata"
        )
    return CompressedTensorsConfig(sparsity_config=sparsity_config(model, config))


def drop_sparsity_metadata(model: nn.Module, because: str = "it describes its weights before this pruning") -> None:
    """Remove, with a warning saying ``because``, the compressed-tensors sparsity metadata (without quantization)
    that ``model`` was loaded with, and transformers' quantizer state for it, which makes the model pass for a
    quantized one. Pruning changes the weights it describes (a 2:4 checkpoint pruned on to 70 % kept saying 2:4):
    ``save_pruned(..., compressed_tensors_metadata=True)`` writes it anew."""
    existing = getattr(model.config, "quantization_config", None)
    if existing is None or not _sparsity_only(existing):
        return
    hf_quantizer = getattr(model, "hf_quantizer", None)
    if hf_quantizer is not None:
        hf_quantizer.remove_quantization_config(model)
    else:
        del model.config.quantization_config
    logger.warning(
        "the model's compressed-tensors sparsity metadata is dropped: %s (save with compressed_tensors_metadata=True to "
        "write it anew)", because,
    )


def _sparsity_only(quantization_config: Any) -> bool:
    """A compressed-tensors config that describes sparsity and quantizes nothing (no ``config_groups``)."""
    described = quantization_config if isinstance(quantization_config, dict) else getattr(quantization_config, "to_dict", dict)()
    return described.get("quant_method") == "compressed-tensors" and not described.get("config_groups")


def require_compressed_tensors() -> None:
    """transformers validates (and later loads) the sparsity config with the compressed-tensors package."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "compressed-tensors metadata needs the compressed-tensors package: pip install 'optimum-prune[compressed-tensors]'"
        ) from None


def _sparse_step(model: nn.Module) -> PruningConfig:
    """The last unstructured step the model records (or its last step, structured, for the error); steps
    another version wrote that this one cannot read are passed over."""
    steps = [step for step in map(readable_step, recorded_steps(model.config)) if step is not None]
    if not steps:
        raise ValueError("the model carries no pruning_config this version can read (prune it with optimum_prune.prune, or pass config=)")
    return next((step for step in reversed(steps) if not METHODS.get(step.method).structured), steps[-1])

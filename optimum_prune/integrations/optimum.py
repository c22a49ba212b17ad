"""Optimum's shapes for pruning: a configuration file, a pruner object and an ``optimum-cli`` command.

Thin layers over the core. ``PruningConfigFile`` lets Optimum's own configuration machinery
(``optimum.configuration_utils.BaseConfig``: local directories, Hub repositories and revisions,
version stamps) write and read ``pruning_config.json``; ``OptimumPruner`` mirrors
``optimum.quantization_base.OptimumQuantizer`` (``from_pretrained`` then one call that writes
the result). ``optimum-cli prune`` is registered by ``optimum/commands/register/optimum_prune.py``, which
this distribution installs in optimum-cli's plugin namespace (the documented extension point: nothing in
optimum is patched); it runs ``optimum_prune.cli``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from optimum.configuration_utils import BaseConfig

from ..config import CONFIG_NAME, PROVENANCE_KEYS, PruningConfig, as_pruning_config

if TYPE_CHECKING:
    from ..calibration import CalibrationSource
    from ..report import PruningReport


class PruningConfigFile(BaseConfig):
    """``pruning_config.json`` as an Optimum configuration: the fields of a ``PruningConfig`` plus
    the optimum / transformers / optimum-prune versions that wrote it."""

    CONFIG_NAME = CONFIG_NAME
    FULL_CONFIGURATION_FILE = CONFIG_NAME

    def to_dict(self) -> dict[str, Any]:
        # Only the pruning fields and the version stamps: none of the model-config attributes
        # PretrainedConfig would otherwise add.
        from .. import __version__

        data = {**super().to_dict(), "optimum_prune_version": __version__}
        keys = [*PruningConfig().to_dict(), *PROVENANCE_KEYS]
        return {key: data[key] for key in keys if key in data}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class OptimumPruner:
    """Prune a causal LM the way Optimum quantizers quantize one.

        pruner = OptimumPruner.from_pretrained("path/to/model")
        report = pruner.prune(PruningConfig(method="wanda", sparsity="2:4"), save_dir="pruned/")
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, processor: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, model_or_path: str | os.PathLike | torch.nn.Module, tokenizer: Any = None, dtype: torch.dtype | str = torch.float32,
        processor: Any = None,
    ) -> "OptimumPruner":
        """From a loaded model (pass its ``tokenizer`` for text calibration, a vision-language model's ``processor``
        for image-text pairs) or a local checkpoint directory (model, tokenizer and any processor loaded, the model in
        ``dtype``, a torch dtype or its name as ``load_model`` takes it; no hub access)."""
        from ..models import load_model, load_processor

        if isinstance(model_or_path, torch.nn.Module):
            return cls(model_or_path, tokenizer, processor)
        model, loaded_tokenizer = load_model(model_or_path, dtype)
        return cls(model, tokenizer or loaded_tokenizer, processor or load_processor(model_or_path))

    def prune(
        self,
        pruning_config: PruningConfig | Mapping[str, Any],
        save_dir: str | os.PathLike,
        calibration_dataset: "CalibrationSource" = None,
        device: str | torch.device | None = None,
    ) -> "PruningReport":
        """Prune the model in place with ``pruning_config``, save it (and the tokenizer, or the processor) to
        ``save_dir`` atomically, and return the report. ``calibration_dataset`` is anything
        ``prune`` takes: a ``datasets.Dataset`` with a ``text`` column, texts, a text file, token ids, image-text pairs."""
        from ..api import prune
        from ..atomic_files import check_replaceable
        from ..saving import save_pruned

        pruning_config = as_pruning_config(pruning_config, "pruning_config")  # save_pruned records a PruningConfig
        # before the model changes in place: a save_dir that cannot be replaced would leave it pruned and unsaved
        check_replaceable(Path(save_dir), getattr(self.model, "name_or_path", None) or None, "save_dir")
        report = prune(
            self.model, pruning_config, calibration=calibration_dataset, tokenizer=self.tokenizer, device=device, processor=self.processor
        )
        save_pruned(self.model, Path(save_dir), tokenizer=self.processor or self.tokenizer, config=pruning_config, report=report)
        return report


EXPORTABLE_HEADS = (
    "To export, prune heads with head_mode='query' and ranking='global' (the config keeps its head counts; the "
    "per-layer widths export), and remove no attention sublayer"
)


# What ``ORTModelForCausalLM.__init__`` (optimum-onnx 0.1.0) reads from the config of these model types; for
# the others it sizes the cache by num_attention_heads heads of hidden_size // num_attention_heads.
_ORT_HEAD_DIM_FROM_CONFIG = {"gemma", "gemma3_text"}
_ORT_KV_HEADS_FROM_CONFIG = {"gemma", "gemma3_text", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe"}


def _onnxruntime_cache_heads(config: Any) -> tuple[int, int]:
    """(key/value heads, head size) of the empty cache ``ORTModelForCausalLM`` starts generation with."""
    head_dim = config.head_dim if config.model_type in _ORT_HEAD_DIM_FROM_CONFIG else config.hidden_size // config.num_attention_heads
    heads = config.num_key_value_heads if config.model_type in _ORT_KV_HEADS_FROM_CONFIG else config.num_attention_heads
    return heads, head_dim


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike, task: str = "text-generation-with-past", **kwargs: Any) -> Path:
    """Export a pruned checkpoint with optimum-onnx's ``main_export`` (what ``optimum-cli export
    onnx`` runs; extra keyword arguments go to it), after checking that its shapes can export.
    ``output`` is replaced atomically: a failed export leaves no half-written directory.

    Per-layer query-head and MLP widths, removed MLPs and SliceGPT layers export and run in
    onnxruntime. Refused, because onnxruntime could not run them: layers whose key/value-head count
    differs from the config's (``head_mode="kv_group"``, removed attention): optimum-onnx's dummy inputs
    and onnxruntime's cache assume one count for every layer; a config whose ``head_dim`` is not
    ``hidden_size // num_attention_heads`` (heads removed alike in every layer, so the config was
    rewritten) where optimum-onnx's ``ORTModelForCausalLM`` sizes the cache by that quotient (all but
    Gemma and Gemma 3); and grouped-query Gemma 2, whose cache it gives one key/value head per query head.
    """
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as error:
        from ..dependencies import MissingDependency

        raise MissingDependency(f"ONNX export needs optimum-onnx ({error}): pip install 'optimum-prune[onnx]'") from None
    from transformers import AutoConfig

    from ..atomic_files import atomic_directory, check_replaceable
    from ..structure.loading import records_layer_shapes

    config = AutoConfig.from_pretrained(checkpoint)
    structure = getattr(config, "quantization_config", None)
    if isinstance(structure, dict) and records_layer_shapes(structure):
        odd = [
            f"layer {index} ({layer['num_key_value_heads']})"
            for index, layer in enumerate(structure["layers"])
            if layer["num_key_value_heads"] != config.num_key_value_heads
        ]
        if odd:
            raise ValueError(
                f"{checkpoint}: key/value heads differ from the config's {config.num_key_value_heads} in {', '.join(odd)}; "
                f"ONNX export and onnxruntime's cache assume one count for all layers. {EXPORTABLE_HEADS}"
            )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_heads, cache_head_dim = _onnxruntime_cache_heads(config)
    if cache_head_dim != head_dim:
        raise ValueError(
            f"{checkpoint}: head_dim {head_dim} is not hidden_size // num_attention_heads ({config.hidden_size} // "
            f"{config.num_attention_heads}), which optimum-onnx's ORTModelForCausalLM sizes the cache by for "
            f"{config.model_type}: the export would not run in onnxruntime. {EXPORTABLE_HEADS}"
        )
    if cache_heads != config.num_key_value_heads:
        raise ValueError(
            f"{checkpoint}: optimum-onnx's ORTModelForCausalLM gives {config.model_type} a cache of num_attention_heads "
            f"({config.num_attention_heads}) key/value heads, not its num_key_value_heads ({config.num_key_value_heads}): "
            "the export would not run in onnxruntime, pruned or not (an optimum-onnx limit)"
        )
    check_replaceable(Path(output), checkpoint, "output")  # the checkpoint itself would be replaced by its export
    with atomic_directory(output) as staging:
        main_export(os.fspath(checkpoint), output=staging, task=task, **kwargs)
    return Path(output)

"""Where LLaMA-Factory has no hook: its ``load_model``'s ``init_adapter`` wrapped while a block runs, so a pruned model
loads as the plain model it is and adapters merge into it keeping its zeros."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator

import torch

from optimum_prune import SparsityMasks
from optimum_prune.sparsity_metadata import drop_sparsity_metadata

logger = logging.getLogger(__name__)


InitAdapter = Callable[..., torch.nn.Module]


@contextmanager
def _wrapped_init_adapter(wrap: Callable[[InitAdapter], InitAdapter]) -> Iterator[None]:
    """While open, LLaMA-Factory's ``load_model`` calls ``wrap(init_adapter)`` where it calls ``init_adapter`` (which
    sets up and merges adapters). LLaMA-Factory has no hook there, so ``load_model``'s name for it is replaced for
    the duration and restored after."""
    from llamafactory.model import loader

    init_adapter = loader.init_adapter
    loader.init_adapter = wrap(init_adapter)
    try:
        yield
    finally:
        loader.init_adapter = init_adapter


def loading_sparsity_metadata_as_plain() -> ContextManager[None]:
    """While open, a checkpoint saved with compressed-tensors sparsity metadata (``compressed_tensors_metadata=True``)
    loads in LLaMA-Factory as the plain float model it is. transformers marks it quantized, so LLaMA-Factory would
    refuse full fine-tuning and merging an adapter for export, and serve an adapter unmerged in chat (filling the
    zeros); the metadata is dropped before ``init_adapter``."""

    def on_plain_model(init_adapter: InitAdapter) -> InitAdapter:
        def init_adapter_on_plain_model(config: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
            drop_sparsity_metadata(model, "LLaMA-Factory would take the model for a quantized one")
            return init_adapter(config, model, *args, **kwargs)

        return init_adapter_on_plain_model

    return _wrapped_init_adapter(on_plain_model)


def merges_keeping_zeros() -> ContextManager[None]:
    """While open, LLaMA-Factory's ``load_model`` merges adapters as ``merge_lora_preserving_sparsity`` does: the
    base's zeros are read before the merge and put back after."""

    def keeping_zeros(merge: InitAdapter) -> InitAdapter:
        def merge_keeping_zeros(config: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
            masks = SparsityMasks.from_zeros(model)
            merged = merge(config, model, *args, **kwargs)
            masks.apply()  # the masks hold the linears themselves, which the merged model keeps
            logger.info("merged the adapter keeping the pruned zeros (sparsity %.4f)", masks.sparsity())
            return merged

        return merge_keeping_zeros

    return _wrapped_init_adapter(keeping_zeros)

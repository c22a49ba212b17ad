"""``llamafactory-prune export``: LLaMA-Factory's ``export_model``, with a pruned model's zeros restored after an adapter
merges into it."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM

from optimum_prune import SparsityMasks
from optimum_prune.atomic_files import new_temporary

from .checkpoints import is_pruned_checkpoint, model_files
from .compat import import_llamafactory
from .config import model_loading_kwargs
from .patches import loading_sparsity_metadata_as_plain

logger = logging.getLogger(__name__)


def run_export(args: Mapping[str, Any]) -> None:
    """LLaMA-Factory's ``export_model``; when it merges a LoRA adapter into a pruned model, the
    pruned zeros are restored in the exported weights (plain merging fills them)."""
    import_llamafactory()
    from llamafactory.train.tuner import export_model

    pruned = bool(args.get("adapter_name_or_path") or args.get("export_quantization_bit")) and is_pruned_checkpoint(model_files(args))
    restoring = pruned and bool(args.get("adapter_name_or_path"))
    if restoring and args.get("export_legacy_format"):
        raise ValueError("export_legacy_format: true writes .bin weights, whose pruned zeros cannot be restored after the merge; remove it")
    if pruned and args.get("export_quantization_bit"):
        raise ValueError(
            f"export_quantization_bit: {args['export_quantization_bit']} on the pruned model {args['model_name_or_path']}: "
            "LLaMA-Factory's GPTQ export spreads each column's rounding error over the pruned weights, which come back "
            "non-zero; export without it, then quantize with optimum_prune.compress(model, [GPTQConfig(bits=...)]), "
            "which keeps them (README: GPTQ)"
        )
    if restoring and args.get("export_hub_model_id"):
        raise ValueError(
            "export_hub_model_id: LLaMA-Factory pushes the merged weights before their pruned zeros are restored; remove "
            "it, export locally, then upload export_dir (e.g. huggingface-cli upload REPO EXPORT_DIR)"
        )
    with loading_sparsity_metadata_as_plain():
        export_model(dict(args))
    if restoring:
        restore_zeros(args["model_name_or_path"], Path(args["export_dir"]), **model_loading_kwargs(args))


def restore_zeros(base: str | Path, exported_dir: Path, **from_pretrained: Any) -> None:
    """Zero, in ``exported_dir``'s safetensors shards, every weight that is zero in the model ``base``
    (a directory or a Hub id, loaded with ``from_pretrained``'s keyword arguments).

    Equal to merging only the masked update (``W + M ⊙ ΔW``), since the base is zero where the
    mask is. The shards are checked to hold every pruned weight before any is touched; each is then
    rewritten through a temporary file and renamed into place.
    """
    from safetensors import safe_open

    shards = sorted(exported_dir.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{exported_dir} has no .safetensors weights; export with export_legacy_format: false")
    base_model = AutoModelForCausalLM.from_pretrained(base, **{**from_pretrained, "dtype": torch.float32})
    masks = {f"{name}.weight": pruned for name, pruned in SparsityMasks.from_zeros(base_model).pruned.items()}
    keys_in = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            keys_in[shard] = [key for key in handle.keys() if key in masks]
            for key in keys_in[shard]:
                stored = list(handle.get_slice(key).get_shape())
                if stored != list(masks[key].shape):
                    raise ValueError(f"{shard} stores {key} as {stored}, not {base}'s {list(masks[key].shape)}; is it the same model?")
    restored = sum(len(keys) for keys in keys_in.values())
    if restored != len(masks):
        raise ValueError(f"{exported_dir} holds {restored} of the {len(masks)} pruned weights of {base}; is it the same model?")
    for shard in (shard for shard in shards if keys_in[shard]):
        try:
            with safe_open(shard, framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            for key in keys_in[shard]:
                tensors[key].masked_fill_(masks[key], 0)
            _rewrite_shard(shard, tensors, metadata)
        except BaseException as error:  # Ctrl-C and SIGTERM too: the user must know not to use export_dir as it is
            partly = f"{exported_dir} is only partly restored (the shards before it are)"
            if isinstance(error, OSError):
                raise OSError(
                    error.errno, f"restoring the pruned zeros stopped at {shard.name} ({error.strerror or error}): {partly}; "
                    "free the space and run the export again"
                ) from error
            error.add_note(f"restoring the pruned zeros was stopped at {shard.name}: {partly}; run the export again")
            raise
    logger.info("restored the pruned zeros of %d weights in %s", restored, exported_dir)


def _rewrite_shard(shard: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write ``tensors`` to a temporary file beside ``shard`` and rename it into place."""
    from safetensors.torch import save_file

    temporary, descriptor = new_temporary(shard)  # created exclusively: a link planted under its name is not followed
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=metadata)
        temporary.chmod(stat.S_IMODE(shard.stat().st_mode))  # the shard rewritten keeps its mode (safetensors 0.8: 0600)
        os.replace(temporary, shard)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a shard-sized leftover, on what may be a full disk
        raise

"""Saving pruned checkpoints: safetensors only, the pruning config recorded twice (``pruning_config.json`` and
``config.json``), and only models that reload as they are (no ``sparsify``'d modules, unmerged adapters or patched
MoE blocks). Written whole or not at all through ``atomic_files.atomic_directory``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from accelerate.utils import align_module_device
from torch import nn
from transformers import PreTrainedModel

from .atomic_files import SCORES_PLOT_NAME, atomic_directory, in_checkpoint_store, new_file_mode, shown_names
from .adapters import get_adapter
from .config import CONFIG_NAME, PruningConfig, as_pruning_config, readable_step, record_pruning, unreadable_reason
from .kernels.linear import SparseLinear
from .perp import MaskLoRALinear
from .methods import METHODS
from .quantized import is_gptq_linear, is_quantized, repacked_in_place
from .report import PruningReport
from .runs import planned_linears
from .skipping import PatchedMoEBlocks, moe_variant
from .sparsity import conforms_to
from .stopped_runs import check_not_stopped
from .structure.loading import offloaded, records_layer_shapes
from .wrappers import base_layer, is_peft_model, transformers_model

logger = logging.getLogger(__name__)

REPORT_NAME = "pruning_report.json"
DEFAULT_SHARD_SIZE = "5GB"  # save_pretrained's default, and optimum-quanto's only size
# This package's modules that hold a linear's weight under other names, and how to save their model instead.
WRAPPER_FIXES = {
    SparseLinear: "save the model before sparsify, and sparsify again after loading",
    MaskLoRALinear: "merge PERP's adapters first (merge_perp(model))",
}


def save_pruned(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    config: PruningConfig | Mapping[str, Any] | None = None,
    report: PruningReport | None = None,
    compressed_tensors_metadata: bool = False,
    max_shard_size: int | float | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Save ``model`` (and ``tokenizer``) with ``save_pretrained`` in safetensors, atomically.

    The pruning config (``config``, else the one ``prune`` recorded on the model) goes into
    ``config.json`` as ``pruning_config`` and into ``pruning_config.json``. A ``config`` other than the
    recorded one is the model's last pruning step, done outside ``prune`` (e.g. by ``PruningCallback``'s
    schedule): the checkpoint lists it after the recorded steps in ``pruning_history``, and the model in
    memory keeps its own record. Stock
    ``AutoModelForCausalLM.from_pretrained(output_dir)`` reloads unstructured and uniform structured
    results without this package; non-uniform structured ones need ``import optimum_prune`` first.
    A model quantized by ``compress`` (optimum-quanto) is saved in optimum-quanto's format and
    reloads with ``optimum.quanto.QuantizedModelForCausalLM.from_pretrained(output_dir)``; one
    quantized with GPTQ reloads with ``AutoModelForCausalLM.from_pretrained(output_dir)`` (gptqmodel installed). A ``report`` is
    written as ``pruning_report.json`` (``PruningReport.to_dict``); one with per-layer scores (the structured methods that score
    layers: depth, sublayers, mask search, ZipLM...) adds ``layer_scores.png``.
    ``compressed_tensors_metadata=True`` writes the compressed-tensors ``sparsity_config`` (see
    ``sparsity_metadata.py``) as the checkpoint's ``quantization_config`` for serving stacks.
    ``max_shard_size`` is ``save_pretrained``'s (optimum-quanto's format takes only the default).
    """
    _check_loadable(model)
    _check_shard_size(max_shard_size)
    if _quanto_quantized(model):
        _check_quanto_saves(model, max_shard_size)
    recorded = getattr(model.config, "pruning_config", None)
    if config is not None:  # as prune takes it
        config = as_pruning_config(config)
    if report is not None and not isinstance(report, PruningReport):
        raise TypeError(f"report must be the PruningReport prune returned, got {type(report).__name__}")
    if config is None:
        config = readable_step(recorded)
        if recorded and config is None:  # a method registered by a module this process did not import, another version
            logger.warning(
                "save_pruned: the model records a pruning step this process cannot read (%s); config.json keeps it as it "
                "is, and no %s is written", unreadable_reason(recorded), CONFIG_NAME,
            )  # fmt: skip
        recorded = config
    else:  # a record this version cannot read is another step than the one given
        recorded = readable_step(recorded)
    _warn_if_recorded_step_undone(model, config)
    output_dir = Path(output_dir)
    with _saving(model), _recorded_for_saving(model.config, config, recorded):
        loaded_with = vars(model.config).get("quantization_config", _ABSENT)  # a reloaded checkpoint's metadata
        if compressed_tensors_metadata:
            from .sparsity_metadata import compressed_tensors_config

            model.config.quantization_config = compressed_tensors_config(model)  # of the steps recorded just above
        try:
            with atomic_directory(output_dir) as staging:  # checks output_dir may be replaced
                if (output_dir / "config.json").is_file() and not (output_dir / CONFIG_NAME).is_file():  # e.g. an ONNX export
                    logger.warning(
                        "save_pruned: %s holds a checkpoint that records no pruning (%s); it is replaced by the pruned one",
                        output_dir, shown_names(sorted(path.name for path in output_dir.iterdir())),
                    )  # fmt: skip
                _write_checkpoint(model, staging, tokenizer, config, report, max_shard_size)
        finally:
            if compressed_tensors_metadata and loaded_with is _ABSENT:
                del model.config.quantization_config  # the in-memory model stays an ordinary one
            elif compressed_tensors_metadata:  # or the one it was loaded as (its hf_quantizer reads the config on saving)
                model.config.quantization_config = loaded_with
    return output_dir


def _warn_if_recorded_step_undone(model: nn.Module, config: PruningConfig | None) -> None:
    """The checkpoint records ``config`` as the model's last step: an unstructured one whose zeros a change since filled
    in (a LoRA adapter merged by peft's own merge, training without ``PruningCallback``) would be recorded as holding,
    silently. Its linears are measured: N:M conformity, or for a fraction at least half of it kept."""
    if config is None or METHODS.get(config.method).structured or _quanto_quantized(model):
        return
    model = transformers_model(model)
    if any(is_quantized(module) for module in model.modules()):  # quantized codes: measured by the quantizer's own save
        return
    targets, pattern = set(config.part_targets().values()), config.shared_pattern()
    if pattern is None and not all(isinstance(target, float) for target in targets):
        return
    adapter = get_adapter(model)
    left_dense = set()  # experts no calibration token reached, left dense as the config asked
    if config.build_moe_options().unrouted_experts == "dense":
        left_dense = {id(module) for layer in adapter.decoder_layers() for expert in adapter.experts(layer) for module in expert.modules()}
    undone, zeros, total = [], 0, 0
    for name, linear in planned_linears(adapter, config, checked=False).items():
        with align_module_device(linear):  # an offloaded weight, read through its hook
            weight = linear.weight.detach()
            held = int((weight == 0).sum())
            if held == 0 and id(linear) in left_dense:
                continue
            zeros, total = zeros + held, total + weight.numel()
            if pattern is not None and not conforms_to(weight, pattern):
                undone.append(name)
    if pattern is None and total and zeros / total < min(targets) / 2:
        undone = [f"{zeros / total:.2%} zeros where the step left {min(targets):.0%}"]
    if undone:
        held = f"{len(undone)} linears no longer conform to {pattern} (e.g. {undone[0]})" if pattern else undone[0]
        logger.warning(
            "save_pruned: the checkpoint records %s %s as the model's last pruning step, but %s: a change since filled its "
            "zeros in (merge LoRA with merge_lora_preserving_sparsity; train with PruningCallback to keep them); prune "
            "again to restore it", config.method, config.sparsity, held,
        )  # fmt: skip


RECORD_KEYS = ("pruning_config", "pruning_history")
_ABSENT = object()
# A save writes its records into the model's config while it runs: two saves of one model (threads) take turns.
_SAVES: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_SAVES_GUARD = threading.Lock()


def _saving(model: nn.Module) -> threading.Lock:
    with _SAVES_GUARD:
        return _SAVES.setdefault(model, threading.Lock())


@contextmanager
def _recorded_for_saving(model_config: Any, config: PruningConfig | None, recorded: PruningConfig | None) -> Iterator[None]:
    """``config`` as the model config's record while the checkpoint is written (a step after the recorded
    ones when it is another), put back as it was afterwards."""
    kept = {key: getattr(model_config, key) for key in RECORD_KEYS if hasattr(model_config, key)}
    if config is not None and config != recorded:
        record_pruning(model_config, config)
    elif config is not None:
        model_config.pruning_config = config.to_dict()  # written as this version writes it
    try:
        yield
    finally:
        for key in RECORD_KEYS:
            if key in kept:
                setattr(model_config, key, kept[key])
            elif hasattr(model_config, key):
                delattr(model_config, key)


def _check_loadable(model: nn.Module) -> None:
    """Refuse, before anything is written, a module that would not reload as it is in memory."""
    check_not_stopped(model, "save it (nothing was saved)")
    for name, module in model.named_modules():
        problem = _unloadable(module)
        if problem is not None:
            raise ValueError(f"{name}{problem} (nothing was saved)")
    if is_peft_model(model):  # without tuner layers (prompt tuning), so none of them was named above
        raise ValueError(
            f"the model is a peft {type(model).__name__}, whose save_pretrained writes the adapter only: the pruned weights "
            "would be lost; save the base model (save_pruned(model.get_base_model(), ...)) and the adapter "
            "(model.save_pretrained) apart (nothing was saved)"
        )


def _unloadable(module: nn.Module) -> str | None:
    """Why ``from_pretrained`` could not give ``module`` back, if it could not: this package's modules that
    hold a linear's weight under other names (transformers would initialise it at random, warning only), MoE
    blocks running an inference-time variant (expert skipping or folding), and GPTQ layers whose codes their CPU
    kernel has repacked out of GPTQ's layout."""
    for kind, fix in WRAPPER_FIXES.items():
        if isinstance(module, kind):
            return f" is a {type(module).__name__}, which transformers cannot load: the checkpoint would reload with random weights in its place; {fix}"
    if base_layer(module) is not module:
        return (
            " holds a peft adapter: a peft model's save_pretrained writes the adapter only, and the pruned weights would "
            "be lost; merge it first (merge_lora_preserving_sparsity(model) keeps the zeros) and save the merged model, "
            "or save the base model (model.unload()) and the adapter (model.save_pretrained) apart"
        )
    variant = moe_variant(module)
    if isinstance(variant, PatchedMoEBlocks):
        return (
            f" runs {type(variant).__name__} (skip_experts / fold_experts), a setting of this process, not of the "
            "weights: the checkpoint would reload as the exact mixture; call .remove() on it before saving, and "
            "apply it again after loading"
        )
    if repacked_in_place(module):
        return (
            f": gptqmodel's {type(module).__name__} repacked this layer's GPTQ codes in place for its CPU kernel when the "
            "model first ran in eval mode, so GPTQ's checkpoint layout cannot be written any more; save the model "
            "before running it on the CPU (compress, then save_pruned), or reload a saved checkpoint"
        )
    return None


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """``tokenizer.save_pretrained`` (of a tokenizer or a processor) without copies of files that are not the
    tokenizer's: one its config named from elsewhere (see ``_without_foreign_vocab_files``), a GGUF file (see
    ``drop_gguf_copy``)."""
    with _without_foreign_vocab_files(tokenizer):
        tokenizer.save_pretrained(directory)
    drop_gguf_copy(directory)


@contextmanager
def _without_foreign_vocab_files(tokenizer: Any) -> Iterator[None]:
    """A fast tokenizer's vocabulary files (``vocab_files_names``) that lie outside its folder, unset while it is saved.
    tokenizer_config.json may name any file as one (``vocab_file: /proc/self/environ``, an SSH key); a fast tokenizer
    never reads it, and its ``save_pretrained`` copies it whole into the output, which may be shared. (A slow tokenizer
    parsed its file as its vocabulary, or failed to load.)"""
    left_out: list[tuple[Any, str, Any]] = []
    for owner in (tokenizer, getattr(tokenizer, "tokenizer", None)):  # a processor saves the tokenizer it holds
        if not getattr(owner, "is_fast", False):
            continue
        folder = Path(owner.name_or_path)
        for attribute in owner.vocab_files_names:
            file = getattr(owner, attribute, None)
            if isinstance(file, (str, os.PathLike)) and os.path.isfile(file) and not in_checkpoint_store(Path(file), folder):
                resolved = Path(file).resolve()  # a link may be the file or a folder above it
                where = f"{file}, which links to {resolved}" if resolved != Path(os.path.abspath(file)) else file
                logger.warning(
                    "the tokenizer's %s is %s, outside its folder %s (its tokenizer_config.json, or a link, can name any "
                    "file, and saving would copy it whole): left out of the saved tokenizer; to keep it, put a copy of "
                    "the file in the folder", attribute, where, folder,
                )  # fmt: skip
                left_out.append((owner, attribute, file))
                setattr(owner, attribute, None)
    try:
        yield
    finally:
        for owner, attribute, file in left_out:
            setattr(owner, attribute, file)


def drop_gguf_copy(directory: Path) -> None:
    """Remove a ``tokenizer.model`` that is a GGUF file: a tokenizer read from a GGUF names that file as its
    sentencepiece model, and ``save_pretrained`` copied it whole under that name (every weight of the source model,
    98 MB for SmolLM2; no tokenizer can read it), and from there into each checkpoint saved with it."""
    copy = directory / "tokenizer.model"
    try:
        with open(copy, "rb") as file:
            is_gguf = file.read(4) == b"GGUF"
    except FileNotFoundError:
        return
    if is_gguf:
        copy.unlink()


def _write_checkpoint(
    model: nn.Module, staging: Path, tokenizer: Any, config: PruningConfig | None, report: PruningReport | None,
    max_shard_size: int | float | str,
) -> None:  # fmt: skip
    if _quanto_quantized(model):
        from optimum.quanto import QuantizedModelForCausalLM

        QuantizedModelForCausalLM(model).save_pretrained(staging)
        # huggingface_hub's generic model card, which no save_pretrained of transformers writes: left there, it made
        # the folder look like more than a checkpoint, and the next save_pruned to it was refused
        (staging / "README.md").unlink(missing_ok=True)
    elif any(is_gptq_linear(module) for module in model.modules()):
        from .gptq import v1_checkpoint_layout

        with v1_checkpoint_layout(model):
            model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
    else:
        inner = transformers_model(model)  # torch.compile's wrapper saves the model it holds
        recorded = isinstance(inner, PreTrainedModel) and records_layer_shapes(getattr(inner.config, "quantization_config", None))
        if recorded and offloaded(inner):
            logger.warning(
                "save_pruned: the model has offloaded modules, so the checkpoint is saved without stand-in tensors: loaded "
                "without import optimum_prune, its removed or factorised modules would get random weights"
            )
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
    for weights in staging.glob("*.safetensors"):  # safetensors 0.8 creates its files 0600; the rest are as the umask says
        weights.chmod(new_file_mode())
    if tokenizer is not None:
        save_tokenizer(tokenizer, staging)
    if config is not None:
        config.save_pretrained(staging)
    if report is not None:
        write_report(report, staging)
    if report is not None and report.layer_scores:
        try:
            report.plot_layer_scores(staging / SCORES_PLOT_NAME)
        except ImportError as error:
            logger.warning("%s; saved without %s", error, SCORES_PLOT_NAME)


def write_report(report: PruningReport, folder: Path) -> None:
    """``report`` as ``pruning_report.json`` in a checkpoint's folder: what the run measured, beside its recipe."""
    path = folder / REPORT_NAME
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    path.chmod(new_file_mode())


def _check_shard_size(max_shard_size: int | float | str) -> None:
    """Before anything is written: a size ``save_pretrained`` reads (its error names no field)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    if isinstance(max_shard_size, str):
        try:
            split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)  # reads the size as save_pretrained will
            number = float(max_shard_size.strip()[:-2])  # as it does: a number, then a two-letter unit
        except (ValueError, OverflowError):
            number = 0.0
    else:
        number = max_shard_size if isinstance(max_shard_size, (int, float)) and not isinstance(max_shard_size, bool) else 0.0
    if 0 < number < math.inf:
        return
    raise ValueError(f"max_shard_size {max_shard_size!r}: give bytes (a number) or a size such as '5GB', '1.5GB' or '500MB'")


def _check_quanto_saves(model: nn.Module, max_shard_size: int | float | str) -> None:
    """optimum-quanto writes one shard size only, and its checkpoints reload through ``QuantizedModelForCausalLM``,
    which builds the model with ``AutoModelForCausalLM`` from the plain config and requantizes the keys as
    stored: a model of another Auto class (LLaVA) does not build, one whose keys transformers renames when
    saving (``_checkpoint_conversion_mapping``) would get its weights under names the model no longer has, and
    a non-uniform structured result (shapes recorded as ``quantization_config``) would come back at stock shapes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils.hub import convert_file_size_to_int

    if convert_file_size_to_int(max_shard_size) != convert_file_size_to_int(DEFAULT_SHARD_SIZE):  # 5e9, "5000MB" alike
        raise ValueError(f"max_shard_size: optimum-quanto saves its models in {DEFAULT_SHARD_SIZE} shards; leave it at the default")
    if records_layer_shapes(getattr(model.config, "quantization_config", None)):
        raise ValueError(
            "optimum-quanto's reload rebuilds the model from the plain config, so this non-uniform structured model "
            "(per-layer shapes in its quantization_config) would come back at stock shapes: prune uniformly (width with "
            "ranking='layer', layers), or save before quantizing (nothing was saved)"
        )
    if type(model.config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(model, "_checkpoint_conversion_mapping", None):
        raise ValueError(
            f"optimum-quanto's checkpoint format reloads causal language models only (QuantizedModelForCausalLM), not a "
            f"{type(model).__name__}: save the pruned model before quantizing it (compress without the QuantoConfig step, "
            "then save_pruned), and quantize it again after loading (nothing was saved)"
        )


def _quanto_quantized(model: nn.Module) -> bool:
    """Whether optimum-quanto replaced some of the model's modules (checked without importing it)."""
    return any(type(module).__module__.startswith("optimum.quanto.") for module in model.modules())

"""``prune(model, config, calibration)``: the one call every integration builds on."""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from .adapters import DecoderAdapter, UnsupportedArchitecture, get_adapter
from .allocation import ALLOCATIONS, per_layer_allocations
from .calibration import (
    CalibrationInputs,
    CalibrationSource,
    as_token_windows,
    calibration_inputs,
    check_calibration_inputs,
    count_images,
    count_tokens,
)
from .calibration.engine import all_finite, evaluating
from .data.images import image_text_pairs
from .config import PruningConfig, as_pruning_config, readable_step, record_pruning, recorded_steps
from .devices import check_activation_device, check_device
from .dispatch import refuse_offloaded, refuse_spread
from .distributed import is_distributed, launched_processes, shard
from .ignoring import check_ignore_patterns
from .methods import METHODS, LayerPruner, per_layer_methods
from .options import MoEOptions
from .perp import MaskLoRALinear
from .quantized import is_quantized, is_sparse_24
from .report import PruningReport, process_peak_rss, reset_peak_rss
from .runs import LayerwiseRun, ModelRun, StructuredRun
from .sparsity_metadata import drop_sparsity_metadata
from .sparsity import PRUNED_SHARE, NMPattern, verify_sparsity
from .stopped_runs import ParameterVersions, check_not_stopped, note_stop
from .structure.mpo import MPOLinear
from .wrappers import is_peft_model, tuner_layers

if TYPE_CHECKING:
    from .streaming import LayerStream

logger = logging.getLogger(__name__)
Function = Callable[..., Any]


_INFERENCE_NOTE = (
    "the model's weights are inference tensors (it was made under torch.inference_mode()), which take no gradient: "
    "load it outside inference mode for methods that use gradients"
)


def outside_ambient_modes(function: Function) -> Function:
    """``function`` runs as if called outside any ``torch.inference_mode()`` or ``torch.autocast``: its statistics
    and solvers are float32 maths that an enclosing autocast ran in bfloat16 (SparseGPT's Cholesky failed, every
    other method gave other weights), and under inference mode gradient criteria failed and the parameters it
    made could never be trained. A model made under inference mode is pruned in it: its weights are inference
    tensors, which only inference mode may change in place. ``torch.no_grad()`` needs nothing: the methods enable
    gradients where they use them."""

    @functools.wraps(function)
    def outside(model: Any, *args: Any, **kwargs: Any) -> Any:
        made_for_inference = isinstance(model, nn.Module) and any(p.is_inference() for p in model.parameters())
        with ExitStack() as modes:
            modes.enter_context(torch.inference_mode(made_for_inference))
            for kind in ("cpu", "cuda", "xpu", "mps", "hpu"):
                if torch.is_autocast_enabled(kind):
                    modes.enter_context(torch.autocast(kind, enabled=False))
            try:
                return function(model, *args, **kwargs)
            except Exception as error:  # torch's and torch-pruning's own words
                if made_for_inference and _INFERENCE_NOTE not in getattr(error, "__notes__", ()):  # prune, then prune_loaded
                    error.add_note(_INFERENCE_NOTE)
                raise

    return outside


@outside_ambient_modes  # a checkpoint directory is read outside them too
def prune(
    model: nn.Module | str | os.PathLike,
    config: PruningConfig | Mapping[str, Any],
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    processor: Any = None,
    activation_device: str | torch.device | None = None,
    output_dir: str | os.PathLike | None = None,
) -> PruningReport:
    """Prune ``model`` in place as ``config`` says and return a report.

    ``model`` may also be a checkpoint directory: its layers are then read from disk and pruned one
    at a time into ``output_dir`` (``prune_checkpoint``, which resumes an interrupted run), so a
    model larger than memory never has to be loaded.

    ``calibration`` is used only by methods/allocations that need data; ``None`` means the
    bundled Wikipedia calibration split (which needs ``tokenizer``). Multimodal models also take
    image-text pairs (``[{"image": ..., "text": ...}]``, run through ``processor``). ``device`` is
    where layers are processed one at a time (default: where the model is); the model stays
    where it was. The config is recorded as ``model.config.pruning_config`` so
    ``save_pretrained`` keeps it; a model pruned more than once (a ``compress`` recipe of several steps, a
    pruned checkpoint pruned again) also lists every config in order as ``pruning_history``. Every check (config, architecture, parts, shapes, calibration
    data) runs before any weight changes. ``activation_device`` (e.g. ``"cpu"`` while ``device``
    is a GPU) keeps the calibration activations there between layers, so the compute device holds
    one layer, one batch of activations and the method's state at a time (per-layer methods: magnitude,
    wanda, sparsegpt);
    ``"disk"`` keeps them in files under ``$TMPDIR``, so host memory holds one batch too.
    """
    if isinstance(model, (str, os.PathLike)):
        if processor is not None:
            raise ValueError("a checkpoint directory is pruned as a causal LM read from disk: processor does not apply")
        return _prune_from_disk(model, config, calibration, tokenizer, device, activation_device, output_dir)
    if output_dir is not None:
        raise ValueError(
            "output_dir is where pruning a checkpoint directory from disk writes its layers; a model in memory is pruned "
            "in place: save it with save_pruned(model, output_dir)"
        )
    return prune_loaded(model, config, calibration, tokenizer, device, processor, activation_device)


def check_multi_process(config: PruningConfig) -> None:
    """Refuse a method that cannot prune as one of several processes (checked by ``compress`` and the CLI before any
    step or model load, as by ``prune``)."""
    spec = METHODS.get(config.method)
    if not spec.pruner:
        raise ValueError(
            f"multi-process calibration supports the per-layer methods ({per_layer_methods()}); run "
            f"{config.method!r} in a single process"
        )
    if spec.pruner.synchronize is LayerPruner.synchronize and spec.needs_calibration(config.build_method_options()):
        raise ValueError(  # each process would prune on its own share of the calibration data, differently
            f"method {config.method!r} gathers calibration statistics but does not sum them across processes "
            f"({spec.pruner.__name__}.synchronize); run it in a single process, or implement synchronize"
        )


@outside_ambient_modes
def prune_loaded(
    model: nn.Module,
    config: PruningConfig | Mapping[str, Any],
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    processor: Any = None,
    activation_device: str | torch.device | None = None,
    offload: "LayerStream | None" = None,
) -> PruningReport:
    """``prune`` of a model object. ``offload`` keeps its decoder layers on disk, read and written one at a time
    (``prune_checkpoint`` builds it)."""
    check_not_stopped(model, "prune it")
    config = as_pruning_config(config)
    spec = METHODS.get(config.method)
    adapter = get_adapter(model)
    if offload is None:  # a LayerStream holds the layers it has not read yet on the meta device itself
        _check_materialised(model, config)
        check_finite(model)
    _check_no_peft_adapters(model)
    device = next(model.parameters()).device if device is None else check_device(device)
    _check_unquantized(adapter, config)
    check_ignore_patterns(adapter, config.ignore, "PruningConfig.ignore")
    if offload is not None:
        check_offloadable(config, adapter)
    if is_distributed():
        check_multi_process(config)
    runs = _plan_runs(adapter, config, device, offload, check_activation_device(activation_device, config))
    if any(not isinstance(run, LayerwiseRun) and getattr(run.method, "changes_kept_weights", True) for run in runs):
        _check_layers_share_no_weights(adapter, config.method)
    inputs = _calibration(adapter, config, runs, calibration, tokenizer, processor)
    report = PruningReport(
        method=config.method,
        # what is removed: a structured method's count option (num_layers) overrides the config's sparsity
        sparsity=runs[0].method.sparsity if spec.structured
        else ", ".join(f"{part} {target}" for part, target in config.part_targets().items()) if config.parts else config.sparsity,
        allocation=config.allocation,
        device=str(device),
        calibration_tokens=count_tokens(inputs),
        calibration_images=count_images(inputs),
        multimodal=bool(adapter.upstream_parts),
    )
    if is_distributed() and inputs is not None:  # data-free methods (magnitude) prune alike in every process
        inputs = shard(inputs)
    earlier = _earlier_sparsity(model, config) if offload is None else None  # offloaded: layers are read one at a time
    zeros_held = _zeros_held(runs)
    started = time.perf_counter()
    peak_is_the_runs = device.type == "cuda" or reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    drop_sparsity_metadata(model)
    trainable, before = _TrainableFlags.of(model), ParameterVersions(model)
    try:
        with evaluating(model):  # calibration forwards must not apply dropout
            for run in runs:  # every part's allocation observes the dense model: one it cannot make fails before any part changes
                if isinstance(run, LayerwiseRun):
                    run.allocate(inputs)
            try:
                for run in runs:
                    run.execute(inputs, report)
            except BaseException as error:
                if offload is None:  # an offloaded run's finished layers are on disk: rerunning resumes
                    error.add_note(note_stop(model, before, report))
                raise
    finally:
        trainable.restore(model)
    report.seconds = time.perf_counter() - started
    report.warn_unrouted()
    report.warn_revived_zeros()
    _warn_if_nothing_removed(runs, zeros_held)
    report.peak_memory_bytes, report.peak_memory_kind = _peak_memory(device)
    if not peak_is_the_runs:  # where the high-water mark cannot be reset (macOS, Windows)
        report.peak_memory_kind += " since the process started"
    if earlier is not None:
        _warn_if_earlier_sparsity_lost(model, config, *earlier)
    record_pruning(model.config, config)
    logger.info("%s", report)
    return report


@dataclass
class _TrainableFlags:
    """Each parameter's ``requires_grad`` by its module and name there, and whether each module (by qualified name)
    held a trainable parameter: a structured method replaces parameters (torch-pruning's slices, SliceGPT's
    rotations) and modules (low_rank's factors) with new ones, which require grad whatever the user froze."""

    parameters: dict[tuple[nn.Module, str], bool]
    modules: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module) -> "_TrainableFlags":
        parameters = {
            (module, name): parameter.requires_grad
            for module in model.modules()
            for name, parameter in module._parameters.items()
            if parameter is not None
        }
        modules = {name: any(p.requires_grad for p in module.parameters()) for name, module in model.named_modules()}
        return cls(parameters, modules)

    def restore(self, model: nn.Module) -> None:
        """A replaced parameter takes the flag of the one it replaces; a new one is frozen where the nearest module
        that was there before held nothing trainable (a frozen linear's factors, any addition to a frozen model)."""
        for module_name, module in model.named_modules():
            for name, parameter in module._parameters.items():
                if parameter is None:
                    continue
                wanted = self.parameters.get((module, name))
                if wanted is None:
                    wanted = parameter.requires_grad and self._nearest_trainable(module_name)
                if parameter.requires_grad != wanted:
                    parameter.requires_grad_(wanted)

    def _nearest_trainable(self, module_name: str) -> bool:
        while module_name not in self.modules:
            module_name = module_name.rpartition(".")[0]
        return self.modules[module_name]


def _calibration(
    adapter: DecoderAdapter, config: PruningConfig, runs: list, calibration: CalibrationSource, tokenizer: Any, processor: Any
) -> CalibrationInputs | None:
    """The calibration windows or batches the config's method and allocation read (None: they read none), checked
    against the model and the parts they must reach."""
    if not config.requires_calibration:
        warn_unused_calibration(config, calibration)
        return None
    if calibration is None and processor is not None and any(run.part != "language" for run in runs):
        calibration = image_text_pairs("calibration")  # a vision tower or projector runs on images only
    inputs = calibration_inputs(calibration, tokenizer, processor, config.num_calibration_samples, config.calibration_seq_len, config.seed)
    if not _runs_layer_by_layer(config):
        inputs = as_token_windows(inputs)  # the whole-model passes calibrate on windows of token ids
    check_calibration_inputs(adapter.model, inputs)
    _check_calibration_reaches_parts(inputs, config, runs)
    return inputs


def warn_unused_calibration(config: PruningConfig, calibration: Any, given: str = "the calibration given") -> None:
    """Calibration given to a method (and allocation) that reads none is not used: say so, naming it as ``given``."""
    if calibration is not None and not config.requires_calibration:
        logger.warning("method %r reads no calibration data: %s is not used", config.method, given)


def _plan_runs(
    adapter: DecoderAdapter, config: PruningConfig, device: torch.device, offload: "LayerStream | None" = None,
    activation_device: torch.device | str | None = None,
) -> list["LayerwiseRun | StructuredRun | ModelRun"]:
    """The config's method bound to the model, with every check that needs no data; nothing changes yet."""
    spec = METHODS.get(config.method)
    if spec.structured:
        return [StructuredRun.plan(adapter, config, device)]
    _check_no_mpo_experts(adapter)  # methods that zero weights
    check_moe_options(adapter, config)
    if spec.model_pruner:
        return [ModelRun.plan(adapter, config, device)]
    return LayerwiseRun.plan_parts(adapter, config, device, offload, activation_device)


def check_moe_options(adapter: DecoderAdapter, config: PruningConfig) -> None:
    """``moe_options`` other than the defaults on a model without mixture-of-experts layers would do nothing."""
    if config.build_moe_options() != MoEOptions() and not any(adapter.moe_block(layer) is not None for layer in adapter.decoder_layers()):
        raise UnsupportedArchitecture(
            f"PruningConfig.moe_options {config.moe_options} tell how to prune mixture-of-experts layers, and "
            f"{type(adapter.model).__name__} has none: remove them"
        )
    moe_layers = [layer for layer in adapter.decoder_layers() if adapter.moe_block(layer) is not None]
    if config.build_moe_options().prune_router and moe_layers and not any(adapter.routers(layer) for layer in moe_layers):
        raise UnsupportedArchitecture(
            f"PruningConfig.moe_options.prune_router: {type(adapter.model).__name__}'s routers are no linears (their "
            "weight is a parameter of the router module), so they stay dense; remove prune_router"
        )


def check_architecture(model: nn.Module, config: PruningConfig) -> None:
    """Raise ``UnsupportedArchitecture`` if ``model``'s architecture can never take ``config``, whatever earlier
    steps change: ``compress`` asks this of every step before the first runs. The checks that depend on the
    model's current widths and layers run again when the step does, on what the earlier steps produced."""
    try:
        _plan_runs(get_adapter(model), config, torch.device("cpu"))
    except UnsupportedArchitecture:
        raise
    except ValueError:  # about the current state (widths, layer count, ignore matches), which earlier steps may change
        pass


def _earlier_sparsity(
    model: nn.Module, config: PruningConfig
) -> tuple[NMPattern | None, dict[str, dict], weakref.WeakKeyDictionary] | None:
    """The N:M pattern of the model's last recorded unstructured step (None: unstructured), every linear's
    measured sparsity, and each linear module's name now (experts are renumbered when some go), if the model
    records such a step this version can read and ``config``'s step could undo it: a structured one, or an
    unstructured one to another target after N:M (a weight update revives zeros the pattern needs)."""
    structured = METHODS.get(config.method).structured
    for step in reversed(recorded_steps(model.config)):
        recorded = readable_step(step)
        if recorded is None:  # written by another version: nothing to compare with
            return None
        if not METHODS.get(recorded.method).structured:
            pattern = next((target for target in recorded.part_targets().values() if isinstance(target, NMPattern)), None)
            if not structured and (pattern is None or all(target == pattern for target in config.part_targets().values())):
                return None
            before = verify_sparsity(model, pattern)["layers"]
            names = weakref.WeakKeyDictionary({module: name for name, module in model.named_modules() if name in before})
            return pattern, before, names
    return None


def _zeros_held(runs: list["LayerwiseRun | StructuredRun | ModelRun"]) -> dict[int, int]:
    """The zeros each unstructured run's linears hold before it runs (by run index; offloaded runs, whose layers are
    read one at a time, left out), for ``_warn_if_nothing_removed``."""
    return {
        index: _count_zeros(run) for index, run in enumerate(runs)
        if isinstance(run, LayerwiseRun) and not isinstance(run.target, NMPattern) and run.target
        and not any(weight.is_meta for weight in run.weights)
    }  # fmt: skip


def _count_zeros(run: "LayerwiseRun") -> int:
    return sum(int(torch.count_nonzero(weight == 0)) for weight in run.weights)


def _warn_if_nothing_removed(runs: list["LayerwiseRun | StructuredRun | ModelRun"], held: dict[int, int]) -> None:
    """An unstructured step at or below the zeros its linears already hold prunes nothing (existing zeros are kept,
    not revived) while the model records it as a step. Measured, not predicted from the overall share: a method that
    ranks per row (Wanda) or per block still removes weights where a row holds fewer zeros than the target."""
    for index, before in held.items():
        run = runs[index]
        if _count_zeros(run) > before:
            continue
        total = sum(weight.numel() for weight in run.weights)
        part = f" in the {run.part} part" if run.adapter.upstream_parts else ""
        if before / total < run.target:  # a dense model: the target is less than one weight of each row or block
            logger.warning(
                "sparsity %.2f%% removed no weight of the linears it prunes%s: it rounds to none in each row or block the "
                "method ranks within; give a higher sparsity", 100 * float(run.target), part,
            )  # fmt: skip
            continue
        logger.warning(
            "sparsity %.2f%%: the linears it prunes%s already held %.2f%% zeros, which are kept: it removed no further "
            "weight (a method that updates weights, such as SparseGPT, still refit the others); give a higher sparsity",
            100 * float(run.target), part, 100 * before / total,
        )  # fmt: skip


def _warn_if_earlier_sparsity_lost(
    model: nn.Module, config: PruningConfig, pattern: NMPattern | None, before: dict[str, dict], names: weakref.WeakKeyDictionary
) -> None:
    """Structured pruning after unstructured pruning can undo it (SliceGPT's rotations and low-rank factors fill
    every zero, merged experts keep only their common zeros, removing input channels shifts N:M groups): say so,
    since the recorded history implies both hold. Compared per linear, so that removing the sparsest units
    (experts, channels) is not taken for it."""
    measured = verify_sparsity(model, pattern)["layers"]
    earlier = {name: names.get(module, name) for name, module in model.named_modules() if name in measured}  # its name before
    after = {name: (entry, before.get(earlier[name])) for name, entry in measured.items()}
    sparse_before = any(entry["sparsity"] >= PRUNED_SHARE for entry in before.values())
    lost = {
        "lost most of their zeros": [
            name for name, (now, then) in after.items() if then and then["sparsity"] >= PRUNED_SHARE and now["sparsity"] < then["sparsity"] / 2
        ],
        "replaced by dense linears": [name for name, (now, then) in after.items() if not then and sparse_before and now["sparsity"] < PRUNED_SHARE],
        f"no longer {pattern}": [name for name, (now, then) in after.items() if then and then.get("conforming") and not now["conforming"]],
    }
    said = [f"{len(linears)} linears {what} (e.g. {linears[0]})" for what, linears in lost.items() if linears]
    if said:
        remedy = (
            "prune structurally first, then unstructured or N:M" if METHODS.get(config.method).structured
            else "its weight update revived zeros the pattern needs; keep them with PruningConfig.method_options.keep_zeros=True where the method has it"
        )  # fmt: skip
        logger.warning("method %r undid the model's earlier unstructured pruning: %s; %s", config.method, "; ".join(said), remedy)


def _check_unquantized(adapter: DecoderAdapter, config: PruningConfig) -> None:
    """Methods rewrite float weights; a quantizer's codes would be skipped or half-changed, so refuse up front
    (in every part the config prunes: a quantized vision tower was skipped without a word)."""
    parts = adapter.parts()
    named = [parts[name] for name in config.part_targets() if name in parts]  # planning names a missing part
    for linears in (layer for part in named for layer in part.qualified_prunable_linears(include_routers=True)):
        for name, linear in linears.items():
            if is_sparse_24(linear):
                raise ValueError(
                    f"{name} is already in the compressed 2:4 format ({type(linear).__name__}, from sparsify): prune the "
                    "dense model, then sparsify it"
                )
            if is_quantized(linear):
                raise ValueError(
                    f"{name} is already quantized ({type(linear).__name__}): prune the unquantized model, then quantize "
                    "(optimum_prune.compress(model, [PruningConfig(...), QuantoConfig(...) or GPTQConfig(...)]) does both)"
                )


def _check_no_mpo_experts(adapter: DecoderAdapter) -> None:
    """MPOE's experts rebuild their weights from shared tensor-network cores at each forward: no stored matrix has
    entries to zero, so methods that zero weights would skip them and report the other linears' sparsity."""
    for name, layer in zip(adapter.layer_names(), adapter.decoder_layers()):
        factorised = next((child for child, module in layer.named_modules() if isinstance(module, MPOLinear)), None)
        if factorised is not None:
            raise ValueError(
                f"{name}.{factorised} was factorised by mpoe and stores no weight matrix to zero: prune weights before "
                "mpoe, or remove whole experts (experts)"
            )


def _check_no_peft_adapters(model: nn.Module) -> None:
    """A peft adapter's linears sit inside the decoder layers beside the base linears: they would be pruned and counted
    as the model's own (and its structured budgets and sensitivity traces), and a trained adapter's dense update would
    fill the base's zeros at merge."""
    if any(isinstance(module, MaskLoRALinear) for module in model.modules()):
        raise ValueError("the model holds PERP adapters (prepare_perp): merge them first (merge_perp(model)), then prune")
    tuners = tuner_layers(model)
    if tuners:
        raise ValueError(
            f"{tuners[0]} holds a peft adapter ({len(tuners)} such layers): prune the model before get_peft_model "
            "(PruningCallback then keeps its zeros while the adapter trains), or merge the adapter first "
            "(merge_lora_preserving_sparsity(model) keeps a pruned base's zeros, model.merge_and_unload() otherwise)"
        )
    if is_peft_model(model):  # prompt / prefix tuning: virtual tokens as wide as the hidden states SliceGPT narrows
        raise ValueError(
            f"the model is a peft {type(model).__name__} (prompt or prefix tuning): its virtual tokens are not calibrated "
            "and would not follow a pruned hidden size; prune the model before get_peft_model"
        )


def _check_layers_share_no_weights(adapter: DecoderAdapter, method: str) -> None:
    """A weight two decoder layers hold (a module reused across layers) cannot lose rows in one and keep them in the
    other: a method that reshapes, factorises or updates weights layer by layer would break the other layer's
    shapes midway or untie it silently. Zeroing weights (the ``LayerPruner`` methods) and removing whole layers or
    sublayers keep the sharing."""
    holders: dict[int, str] = {}
    for layer_name, layer in zip(adapter.layer_names(), adapter.decoder_layers()):
        for name, parameter in layer.named_parameters():
            first = holders.setdefault(id(parameter), f"{layer_name}.{name}")
            if not first.startswith(f"{layer_name}."):
                raise ValueError(
                    f"{layer_name}.{name} is {first}: a weight shared by two decoder layers cannot be changed by {method} "
                    "in one alone; give each layer its own copy (copy.deepcopy of the shared module), or prune weights "
                    "(magnitude, wanda, sparsegpt), which keeps the sharing"
                )


def _check_materialised(model: nn.Module, config: PruningConfig) -> None:
    """Weights that accelerate offloaded are loaded only inside each forward: there is nothing to prune in
    place; layers it spread over several GPUs carry hooks that move each layer's inputs back to its own GPU.
    The way round names pruning from disk only where the config's method and allocation can run that way."""
    from_disk = (
        "prune the checkpoint directory layer by layer from disk: prune(path, config, output_dir=...) (optimum-cli prune "
        "--offload disk)" if _runs_layer_by_layer(config) else f"{config.method!r} with allocation {config.allocation!r} needs the whole "
        "model in memory, so load it on a machine with room for it"
    )  # fmt: skip
    refuse_spread(
        model, "prune moves one decoder layer at a time to one device",
        f" (device_map=None or 'cpu', then prune(..., device='cuda')); or {from_disk}",
    )  # fmt: skip
    refuse_offloaded(model, "pruning rewrites weights in place", f"; or {from_disk}")


def check_finite(model: nn.Module) -> None:
    """A NaN or inf weight (a corrupt checkpoint, an earlier float16 overflow) makes the model's outputs and every
    calibration statistic after it NaN, and a mask chosen from NaN scores is one by position: refused before any
    change. (Layers streamed from disk are checked as they run: ``calibration.engine.require_finite``.)"""
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.device.type != "meta" and not all_finite(parameter):
            raise ValueError(
                f"the model's parameter {name} holds NaN or inf, so its outputs and any scores computed from them are "
                "not numbers; load the model again from a sound checkpoint (in bfloat16 or float32 if it overflowed in float16)"
            )


def _runs_layer_by_layer(config: PruningConfig) -> bool:
    """Whether the config's method prunes each layer from its own activations and its allocation observes no
    whole-model loss: such a run can take padded or uneven batches, and hold one layer at a time (from disk)."""
    return bool(METHODS.get(config.method).pruner) and not ALLOCATIONS.get(config.allocation).allocation.observes_model


def check_offloadable(config: PruningConfig, adapter: DecoderAdapter) -> None:
    """Offloaded runs hold one layer at a time, of a language model in one process: anything else is refused."""
    check_offloadable_recipe(config)
    if adapter.upstream_parts or is_distributed() or launched_processes() > 1:  # torchrun's processes would share one output
        raise ValueError(
            "offloaded pruning runs in one process on a language model; multimodal parts and torch.distributed are "
            "not supported yet"
        )


def check_offloadable_recipe(config: PruningConfig) -> None:
    """The part of ``check_offloadable`` that needs no model: methods and allocations that hold more than one layer
    are refused (a YAML's ``offload: disk`` is checked with its section, before any data is read)."""
    if not METHODS.get(config.method).pruner:
        raise ValueError(
            f"offloaded pruning supports the per-layer methods ({per_layer_methods()}); {config.method!r} needs the "
            "whole model in memory"
        )
    if ALLOCATIONS.get(config.allocation).allocation.observes_model:
        raise ValueError(
            f"PruningConfig.allocation {config.allocation!r} needs gradients of the whole model; offloaded runs take "
            f"{per_layer_allocations()}"
        )


def _check_calibration_reaches_parts(inputs: CalibrationInputs, config: PruningConfig, runs: list) -> None:
    """Vision encoders and projectors only run on images; structured methods calibrate on token windows."""
    if not isinstance(inputs, torch.Tensor) and not METHODS.get(config.method).pruner:
        raise ValueError(
            f"method {config.method!r} calibrates on text token windows; pass text calibration (None, strings, a "
            "text file or a LongTensor), or samples of token ids of one length without padding (a tokenised Dataset "
            "of rows at least calibration_seq_len long), not image-text pairs or padded or uneven batches"
        )
    needing_images = [run.part for run in runs if run.part != "language"]
    if needing_images and not count_images(inputs):
        raise ValueError(
            f"PruningConfig.parts {', '.join(needing_images)} run only on images, but the calibration has none; "
            "calibrate with image-text pairs ([{'image': ..., 'text': ...}] and processor=...; calibration=None with "
            "processor= reads the bundled image-caption pairs), or prune those parts with a method that needs no "
            "calibration (e.g. magnitude)"
        )


def _prune_from_disk(
    source: str | os.PathLike,
    config: PruningConfig | Mapping[str, Any],
    calibration: CalibrationSource,
    tokenizer: Any,
    device: str | torch.device | None,
    activation_device: str | torch.device | None,
    output_dir: str | os.PathLike | None,
) -> PruningReport:
    from .streaming import prune_checkpoint

    if output_dir is None:
        raise ValueError(
            f"pruning the checkpoint {str(source)!r} from disk writes each pruned layer as it finishes: pass output_dir= "
            "(a new directory, or the one an interrupted run left, to resume)"
        )
    return prune_checkpoint(source, output_dir, config, calibration, tokenizer, device, activation_device=activation_device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocated"
    return process_peak_rss(), "process RSS"  # the process's high-water mark, model included

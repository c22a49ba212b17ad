"""Prune, then quantize, in one call: ``compress(model, [PruningConfig(...), QuantoConfig(...)])``.

In the spirit of llm-compressor's ``oneshot(recipe=[...])``, but every step is an object users
already know: a ``PruningConfig`` (or its dict), then transformers' ``QuantoConfig`` (applied with
optimum-quanto's own ``quantize`` / ``freeze``, weight-only) or ``GPTQConfig`` (optimum's
``GPTQQuantizer`` on gptqmodel, as ``from_pretrained(..., quantization_config=GPTQConfig(...))``
runs it). ``save_pruned`` writes quanto results in optimum-quanto's format (reload with
``optimum.quanto.QuantizedModelForCausalLM.from_pretrained``; causal LMs only, so a quantized LLaVA is
refused: save it before the quanto step) and GPTQ results as transformers does (reload with
``AutoModelForCausalLM.from_pretrained``).

Pruned weights stay exactly zero through quantization (see ``optimum_prune.quanto`` and
``optimum_prune.gptq``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import GPTQConfig, QuantoConfig

from .adapters import UnsupportedArchitecture
from .api import check_architecture, check_finite, check_multi_process, prune
from .calibration import CalibrationSource, calibration_windows
from .config import PruningConfig, as_pruning_config
from .dependencies import MissingDependency
from .distributed import is_distributed
from .methods import METHODS
from .report import PruningReport
from .sparsity_metadata import drop_sparsity_metadata

Step = PruningConfig | Mapping[str, Any] | QuantoConfig | GPTQConfig


def compress(
    model: nn.Module,
    recipe: Sequence[Step],
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    processor: Any = None,
) -> list[PruningReport]:
    """Apply ``recipe`` to ``model`` in place, in order; return the pruning steps' reports.

    Steps: any number of ``PruningConfig`` (or dicts of one), then at most one
    ``transformers.QuantoConfig`` (weight-only) or ``transformers.GPTQConfig``, which must come last:
    quantized weights are frozen, so nothing can be pruned after them. GPTQ calibrates on
    ``calibration`` (windows drawn as the last pruning step draws them) unless its config lists texts.
    The recipe's form, and whether the model's architecture can take each step, are checked before any step
    runs; a step that cannot apply to what the earlier steps produced fails before it changes anything.
    ``processor`` turns image-text calibration pairs into model inputs for a multimodal model's pruning steps,
    as in ``prune``.
    """
    if isinstance(recipe, str) or not isinstance(recipe, Sequence):  # one step (a config, a mapping) is not a Sequence
        raise TypeError(f"recipe is a list of steps, got a {type(recipe).__name__}: give one step as [step]")
    steps = [_check_step(step, index) for index, step in enumerate(recipe)]
    if not steps:
        raise ValueError("recipe is empty: give at least one PruningConfig, QuantoConfig or GPTQConfig")
    quantization = [i for i, step in enumerate(steps) if not isinstance(step, PruningConfig)]
    if quantization and quantization != [len(steps) - 1]:
        raise ValueError(
            f"recipe[{quantization[0]}]: quantization must be the single last step (quantized weights are frozen, "
            "nothing can be pruned after them)"
        )
    pruning = [(index, step) for index, step in enumerate(steps) if isinstance(step, PruningConfig)]
    for index, step in pruning:
        try:
            check_architecture(model, step)
        except UnsupportedArchitecture as error:
            raise UnsupportedArchitecture(f"recipe[{index}]: {error}") from None
        try:
            if is_distributed():  # as prune would refuse it, after the steps before it had run
                check_multi_process(step)
        except ValueError as error:
            raise ValueError(f"recipe[{index}]: {error}") from None
    structured = [METHODS.get(step.method).structured for _, step in pruning]
    reshaped = any(method is not None and method.changes_widths for method in structured)
    if isinstance(steps[-1], GPTQConfig) and not reshaped:  # else checked when it runs, on the pruned widths
        from .gptq import check_widths

        check_widths(model, steps[-1], f"recipe[{len(steps) - 1}]")
    if isinstance(steps[-1], QuantoConfig):
        from .quanto import check_packing

        check_packing(model, steps[-1], f"recipe[{len(steps) - 1}]")
    if not isinstance(steps[0], PruningConfig):  # prune checks its own; a quantizer would fail mid-way, layers rewritten
        check_finite(model)
    gptq_windows = _gptq_windows(model, steps, calibration, tokenizer)
    reports = []
    for index, step in enumerate(steps):
        try:
            if isinstance(step, PruningConfig):
                step_calibration = calibration if step.requires_calibration else None  # shared by the steps: no warning for one reading none
                reports.append(prune(model, step, calibration=step_calibration, tokenizer=tokenizer, processor=processor, device=device))
            else:
                _quantize(model, step, gptq_windows, tokenizer)
        except BaseException as error:
            if index:  # the model holds the earlier steps' result: calling compress again on it would apply them twice
                done = ", ".join(_describe(earlier) for earlier in steps[:index])
                error.add_note(f"compress stopped at recipe[{index}]; recipe[0:{index}] ({done}) had been applied to the model")
            raise
    return reports


def _quantize(model: nn.Module, step: QuantoConfig | GPTQConfig, gptq_windows: torch.Tensor | None, tokenizer: Any) -> None:
    drop_sparsity_metadata(model, "the quantizer's own quantization_config takes its place")
    if isinstance(step, GPTQConfig):
        from .gptq import quantize_weights

        quantize_weights(model, step, gptq_windows, tokenizer)
    else:
        from .quanto import quantize_weights

        quantize_weights(model, step)


def _describe(step: PruningConfig | QuantoConfig | GPTQConfig) -> str:
    return f"{step.method} {step.sparsity}" if isinstance(step, PruningConfig) else type(step).__name__


def _gptq_windows(model: nn.Module, steps: list, calibration: CalibrationSource, tokenizer: Any) -> torch.Tensor | None:
    """Token windows for a GPTQ step without texts of its own, drawn like the last pruning step's (or a
    default config's) calibration; resolved before any step runs, so a missing tokenizer changes nothing."""
    gptq = next((step for step in steps if isinstance(step, GPTQConfig)), None)
    if gptq is None:
        return None
    if gptq.dataset is not None:
        if tokenizer is None:
            raise ValueError("GPTQConfig(dataset=[texts]) needs tokenizer= to tokenize them; pass compress(..., tokenizer=...)")
        return None
    sampling = next((step for step in reversed(steps) if isinstance(step, PruningConfig)), PruningConfig())
    return calibration_windows(
        calibration, tokenizer, sampling.num_calibration_samples, sampling.calibration_seq_len, sampling.seed, model,
        "GPTQConfig without dataset=[texts]",
    )  # fmt: skip


def _check_step(step: Step, index: int) -> PruningConfig | QuantoConfig | GPTQConfig:
    if isinstance(step, (PruningConfig, Mapping)):
        return as_pruning_config(step, f"recipe[{index}]")
    if isinstance(step, GPTQConfig):
        from .gptq import check_config

        check_config(step, f"recipe[{index}]")
        return step
    if isinstance(step, QuantoConfig):
        if step.activations is not None:
            raise ValueError(
                f"recipe[{index}]: QuantoConfig(activations={step.activations!r}) is not supported; compress quantizes "
                "weights only (activation quantization needs its own calibration): leave activations=None"
            )
        require_quanto(f"recipe[{index}]")
        return step
    raise TypeError(
        f"recipe[{index}] is a {type(step).__name__}; steps are PruningConfig (or a dict of one), then "
        "transformers.QuantoConfig or transformers.GPTQConfig"
    )


def require_quanto(where: str) -> None:
    """optimum-quanto is optional (``optimum-prune[quanto]``): a recipe or grid that quantizes with it is refused
    before anything runs."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise MissingDependency(f"{where}: QuantoConfig needs optimum-quanto: pip install 'optimum-prune[quanto]'") from None

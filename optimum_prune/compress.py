"""Prune, then quantize, in one call: ``compress(model, [PruningConfig(...), QuantoConfig(...)])``.

In the spirit of llm-compressor's ``oneshot(recipe=[...])``, but every step is an object users
already know: a ``PruningConfig`` (or its dict) and transformers' ``QuantoConfig``, applied with
optimum-quanto's own ``quantize`` / ``freeze`` (weight-only). The result saves with
``save_pruned`` in optimum-quanto's format and reloads with
``optimum.quanto.QuantizedModelForCausalLM.from_pretrained``.

Pruned weights stay exactly zero through quantization (see ``optimum_prune.quanto``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import QuantoConfig

from .calibration import CalibrationSource
from .config import PruningConfig
from .report import PruningReport

Step = PruningConfig | Mapping[str, Any] | QuantoConfig


def compress(
    model: nn.Module,
    recipe: Sequence[Step],
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
) -> list[PruningReport]:
    """Apply ``recipe`` to ``model`` in place, in order; return the pruning steps' reports.

    Steps: any number of ``PruningConfig`` (or dicts of one), then at most one
    ``transformers.QuantoConfig`` (weight-only), which must come last: quantized weights are
    frozen, so nothing can be pruned after them. The recipe's form is checked before any step runs;
    a step that cannot apply to what the earlier steps produced fails before it changes anything.
    """
    from .api import prune

    steps = [_check_step(step, index) for index, step in enumerate(recipe)]
    if not steps:
        raise ValueError("recipe is empty: give at least one PruningConfig or QuantoConfig")
    quantization = [i for i, step in enumerate(steps) if not isinstance(step, PruningConfig)]
    if quantization and quantization != [len(steps) - 1]:
        raise ValueError(
            f"recipe[{quantization[0]}]: quantization must be the single last step (quantized weights are frozen, "
            "nothing can be pruned after them)"
        )
    reports = []
    for step in steps:
        if isinstance(step, PruningConfig):
            reports.append(prune(model, step, calibration=calibration, tokenizer=tokenizer, device=device))
        else:
            from .quanto import quantize_weights

            quantize_weights(model, step)
    return reports


def _check_step(step: Step, index: int) -> PruningConfig | QuantoConfig:
    if isinstance(step, PruningConfig):
        return step
    if isinstance(step, Mapping):
        return PruningConfig.from_dict(step)
    if isinstance(step, QuantoConfig):
        if step.activations is not None:
            raise ValueError(
                f"recipe[{index}]: QuantoConfig(activations={step.activations!r}) is not supported; compress quantizes "
                "weights only (activation quantization needs its own calibration): leave activations=None"
            )
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise ImportError(f"recipe[{index}]: QuantoConfig needs optimum-quanto: pip install 'optimum-prune[quanto]'") from None
        return step
    raise TypeError(
        f"recipe[{index}] is a {type(step).__name__}; steps are PruningConfig (or a dict of one) and "
        "transformers.QuantoConfig"
    )

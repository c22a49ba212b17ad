"""The ``perp:`` section of a LLaMA-Factory YAML: after pruning, retrain only PERP's tiny subset
(biases, norm scales and mask-preserving LoRA; Zimmer et al. 2024) in LLaMA-Factory's own
``pt`` / ``sft`` training.

    pruning: {method: wanda, sparsity: 0.5, ...}
    finetuning_type: full    # LLaMA-Factory adds no adapter of its own: PERP chooses what trains
    perp:
      lora: mask             # mask (MaskLoRA), scale (ScaleLoRA) or null (biases and norms only)
      rank: 16
      alpha: 32.0
      biases: true
      norms: true
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]

Its keys are ``optimum_prune.PERPConfig``'s fields; an unknown key is an error listing the valid
ones. The section becomes ``PruningCallback(perp=...)`` on LLaMA-Factory's trainer (on every rank
under torchrun): the model is prepared when the trainer is built and the adapters are merged when
training ends, so the ``output_dir`` LLaMA-Factory saves is an ordinary checkpoint with its zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from optimum_prune import PERPConfig

SECTION = "perp"
TRAINING_STAGES = ("pt", "sft")


def perp_config(section: Any, lf_args: Mapping[str, Any]) -> PERPConfig:
    """Validate ``section`` against the rest of the YAML (``lf_args``) before anything runs."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{SECTION}: must be a mapping of PERPConfig fields, got {type(section).__name__}")
    fields = [f.name for f in dataclasses.fields(PERPConfig)]
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ValueError(f"{SECTION}.{unknown[0]} is not a valid key; valid keys: {', '.join(sorted(fields))}")
    if lf_args.get("stage") not in TRAINING_STAGES:
        raise ValueError(f"a `{SECTION}:` section works with stage: pt or sft (training); got stage: {lf_args.get('stage')!r}")
    if lf_args.get("finetuning_type", "lora") != "full":
        raise ValueError(
            f"a `{SECTION}:` section needs finetuning_type: full (got {lf_args.get('finetuning_type', 'lora')!r}): "
            "LLaMA-Factory must not add adapters of its own, PERP chooses what trains"
        )
    values = dict(section)
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = tuple(values["target_modules"])
    try:
        return PERPConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{SECTION}: {error}") from None


def split_perp(args: Mapping[str, Any], validate: bool = True) -> tuple[dict[str, Any], PERPConfig | None]:
    """(the other arguments, the validated ``perp:`` section or ``None``). Commands other than ``train``
    pass ``validate=False``: they drop the section, so one YAML serves train and export."""
    rest = {key: value for key, value in args.items() if key != SECTION}
    if SECTION not in args or not validate:
        return rest, None
    return rest, perp_config(args[SECTION], rest)


def to_mapping(config: PERPConfig) -> dict[str, Any]:
    """The section as written in a YAML (for the torchrun workers)."""
    return {**dataclasses.asdict(config), "target_modules": list(config.target_modules)}

"""The YAML sections that change how LLaMA-Factory trains, besides ``pruning:``, read together and
turned into what its trainer runs with: ``distill:`` (see ``distill.py``), and

``perp:`` — after pruning, retrain only PERP's tiny subset (biases, norm scales, mask-preserving
LoRA; Zimmer et al. 2024). Keys: ``optimum_prune.PERPConfig``'s fields. It becomes
``PruningCallback(perp=...)``: the model is prepared when the trainer is built and the adapters are
merged when training ends, so ``output_dir`` receives an ordinary checkpoint with its zeros.

    finetuning_type: full    # LLaMA-Factory adds no adapter of its own: PERP chooses what trains
    perp: {lora: mask, rank: 16, alpha: 32.0}

``expert_dropping:`` — task-specific expert pruning of a mixture-of-experts model while it is
fine-tuned (Chen et al. 2022). Keys: ``optimum_prune.ExpertDroppingSchedule``'s fields. It becomes
``PruningCallback(ExpertDroppingSchedule(...))``: the least-routed experts leave on the schedule and
are removed when training ends, so ``output_dir`` receives the smaller MoE.

    finetuning_type: full    # the experts leave the model itself, not an adapter
    expert_dropping: {final_experts: 2, end_step: 600, every: 50}

Both need ``finetuning_type: full`` and stage ``pt`` or ``sft``, and they exclude each other (PERP
retrains an already pruned model); an unknown key is an error listing the valid ones. Under torchrun every rank gets the same callbacks (``to_mapping`` → the worker).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from transformers import TrainerCallback

from optimum_prune import ExpertDroppingSchedule, PERPConfig, PruningCallback

from .distill import SECTION as DISTILL
from .distill import DistillSection, split_distill
from .sections import check_section, typed_values

PERP = "perp"
EXPERT_DROPPING = "expert_dropping"


@dataclass(frozen=True)
class TrainingSections:
    distill: DistillSection | None = None
    perp: PERPConfig | None = None
    expert_dropping: ExpertDroppingSchedule | None = None

    @classmethod
    def split(cls, args: Mapping[str, Any], pruning: bool, validate: bool = True) -> tuple[dict[str, Any], "TrainingSections"]:
        """(the other arguments, the validated sections); ``pruning`` says whether the YAML prunes (the
        distillation teacher then defaults to the unpruned model). Commands other than ``train`` pass
        ``validate=False``: they drop the sections, so these never stop them."""
        rest, distill = split_distill(args, pruning=pruning, validate=validate)
        raw = {name: rest.pop(name) for name in (PERP, EXPERT_DROPPING) if name in rest}
        if not validate:
            return rest, cls()
        perp = _section(PERP, PERPConfig, raw[PERP], rest) if PERP in raw else None
        dropping = _section(EXPERT_DROPPING, ExpertDroppingSchedule, raw[EXPERT_DROPPING], rest) if EXPERT_DROPPING in raw else None
        if perp is not None and dropping is not None:
            raise ValueError(f"`{PERP}:` and `{EXPERT_DROPPING}:` cannot be combined: PERP retrains an already pruned model")
        return rest, cls(distill, perp, dropping)

    def callbacks(self, keep_masks: bool) -> list[TrainerCallback]:
        """``PruningCallback`` keeping a pruned model's zeros when ``keep_masks``, training only PERP's
        subset with ``perp`` and dropping experts with ``expert_dropping``."""
        if keep_masks or self.perp or self.expert_dropping:
            return [PruningCallback(self.expert_dropping, perp=self.perp)]
        return []

    def to_mapping(self) -> dict[str, Any]:
        """The sections as written in a YAML (for the torchrun workers)."""
        mapping: dict[str, Any] = {}
        if self.distill is not None:
            mapping[DISTILL] = self.distill.to_mapping()
        if self.perp is not None:
            mapping[PERP] = {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self.perp).items()}
        if self.expert_dropping is not None:
            mapping[EXPERT_DROPPING] = dataclasses.asdict(self.expert_dropping)
        return mapping


def _section(name: str, config_class: type, section: Any, lf_args: Mapping[str, Any]) -> Any:
    """``config_class`` from the YAML section ``name``, validated against the rest of the YAML."""
    check_section(name, section, [f.name for f in dataclasses.fields(config_class)], f"{config_class.__name__} fields", lf_args)
    if lf_args.get("finetuning_type", "lora") != "full":
        raise ValueError(
            f"the `{name}:` section needs finetuning_type: full (got {lf_args.get('finetuning_type', 'lora')!r}): "
            "LLaMA-Factory must not add adapters of its own"
        )
    values = typed_values(name, config_class, section)
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None

"""The ``distill:`` section of a LLaMA-Factory YAML: recover with knowledge distillation from the
dense teacher instead of (or besides) the labels, in LLaMA-Factory's own ``pt`` / ``sft`` training.

    pruning: {method: width, sparsity: 0.2, ...}
    distill:
      teacher: HuggingFaceTB/SmolLM2-135M-Instruct   # default with a pruning: section: the unpruned model
      temperature: 2.0
      kd_weight: 1.0
      label_weight: 0.5
      top_k: 64                # truncate the teacher's distribution (renormalised)
      teacher_device: cuda:1   # default: the student's device (the Trainer's)
      teacher_dtype: bfloat16  # default: float32

Its keys are ``optimum_prune.DistillationConfig``'s fields plus ``teacher``, ``teacher_device`` and
``teacher_dtype``; an unknown key is an error listing the valid ones. The loss is
``optimum_prune.DistillationMixin`` put in front of LLaMA-Factory's own trainer class, so LoRA or
full fine-tuning, its data pipeline, ``PruningCallback`` (masks) and its saving work unchanged.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from optimum_prune import DistillationConfig, DistillationMixin

SECTION = "distill"
TEACHER_KEYS = ("teacher", "teacher_device", "teacher_dtype")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISTILLING_STAGES = ("pt", "sft")


@dataclass(frozen=True)
class DistillSection:
    config: DistillationConfig
    teacher: str
    teacher_device: str | None = None
    teacher_dtype: str = "float32"

    @classmethod
    def from_mapping(cls, section: Any, lf_args: Mapping[str, Any], pruning: bool) -> "DistillSection":
        """Validate ``section`` against the YAML (``lf_args``); with a ``pruning:`` section (``pruning``)
        the teacher defaults to the model being pruned."""
        if not isinstance(section, Mapping):
            raise ValueError(f"{SECTION}: must be a mapping of DistillationConfig fields and teacher, got {type(section).__name__}")
        fields = [f.name for f in dataclasses.fields(DistillationConfig)]
        unknown = sorted(set(section) - set(fields) - set(TEACHER_KEYS))
        if unknown:
            raise ValueError(f"{SECTION}.{unknown[0]} is not a valid key; valid keys: {', '.join(sorted([*fields, *TEACHER_KEYS]))}")
        if lf_args.get("stage") not in DISTILLING_STAGES:
            raise ValueError(f"a `{SECTION}:` section works with stage: pt or sft (training); got stage: {lf_args.get('stage')!r}")
        teacher = section.get("teacher") or (lf_args.get("model_name_or_path") if pruning else None)
        if not teacher:
            raise ValueError(
                f"{SECTION}.teacher is required: without a `pruning:` section there is no unpruned model to default to; "
                "set it to the dense checkpoint's directory"
            )
        if not (Path(teacher) / "config.json").is_file():
            raise ValueError(f"{SECTION}.teacher {teacher!r} is not a local checkpoint directory (no config.json)")
        dtype = section.get("teacher_dtype", "float32")
        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"{SECTION}.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
        try:
            config = DistillationConfig(**{key: value for key, value in section.items() if key in fields})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{SECTION}: {error}") from None
        return cls(config, str(teacher), section.get("teacher_device"), dtype)

    def load_teacher(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        import optimum_prune  # noqa: F401  (a structured teacher reloads through its loader)

        return AutoModelForCausalLM.from_pretrained(self.teacher, dtype=TEACHER_DTYPES[self.teacher_dtype])

    def to_mapping(self) -> dict[str, Any]:
        """The section as written in a YAML (for the torchrun workers)."""
        return {**dataclasses.asdict(self.config), "teacher": self.teacher, "teacher_device": self.teacher_device,
                "teacher_dtype": self.teacher_dtype}


def split_distill(args: Mapping[str, Any], pruning: bool, validate: bool = True) -> tuple[dict[str, Any], DistillSection | None]:
    """(the other arguments, the validated ``distill:`` section or ``None``); ``pruning`` says
    whether the YAML prunes (the teacher then defaults to the unpruned model). Commands other than
    ``train`` pass ``validate=False``: they drop the section, so one YAML serves train and export."""
    rest = {key: value for key, value in args.items() if key != SECTION}
    if SECTION not in args or not validate:
        return rest, None
    return rest, DistillSection.from_mapping(args[SECTION], rest, pruning)


@contextmanager
def distilling_trainers(section: DistillSection | None) -> Iterator[None]:
    """While open, LLaMA-Factory's ``pt`` and ``sft`` workflows build their trainers with the
    distillation loss in front (``DistillationMixin``), the teacher loaded once.

    LLaMA-Factory has no hook for the trainer class, so its two workflow modules' names for it are
    pointed at the distilling subclasses for the duration and restored after; nothing else changes.
    """
    if section is None:
        yield
        return
    from llamafactory.train.pt import workflow as pt_workflow
    from llamafactory.train.sft import workflow as sft_workflow

    teacher = section.load_teacher()
    names = {pt_workflow: "CustomTrainer", sft_workflow: "CustomSeq2SeqTrainer"}
    originals = {module: getattr(module, name) for module, name in names.items()}

    def distilling(base: type) -> type:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            DistillationMixin.__init__(
                self, *args, teacher=teacher, distillation=section.config, teacher_device=section.teacher_device, **kwargs
            )
            if section.teacher_device is None:
                teacher.to(self.args.device)  # beside the student, wherever the Trainer put it

        return type(f"Distilling{base.__name__}", (DistillationMixin, base), {"__init__": __init__})

    for module, name in names.items():
        setattr(module, name, distilling(originals[module]))
    try:
        yield
    finally:
        for module, name in names.items():
            setattr(module, name, originals[module])

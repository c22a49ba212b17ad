"""The ``distill:`` section of a LLaMA-Factory YAML: recover with knowledge distillation from the
dense teacher instead of (or besides) the labels, in LLaMA-Factory's own ``pt`` / ``sft`` training.

    pruning: {method: width, sparsity: 0.2, ...}
    distill:
      teacher: models/SmolLM2-135M-Instruct   # a local checkpoint; default with a pruning: section: the unpruned model
      temperature: 2.0
      kd_weight: 1.0
      label_weight: 0.5
      top_k: 64                # truncate the teacher's distribution (renormalised)
      precompute_top_k: true   # store those top-k logits with the dataset first, then free the teacher
      teacher_device: cuda:1   # default: the student's device (the Trainer's)
      teacher_dtype: bfloat16  # default: float32
      teacher_quantization: int8   # or nf4: the teacher loaded through bitsandbytes (default: none)

Its keys are ``optimum_prune.DistillationConfig``'s fields plus ``teacher``, ``teacher_device``,
``teacher_dtype``, ``teacher_quantization`` and ``precompute_top_k``; an unknown key is an error
listing the valid ones. ``teacher_quantization`` loads the teacher with transformers'
``BitsAndBytesConfig`` (int8: LLM.int8(); nf4: 4-bit NormalFloat computing in ``teacher_dtype``),
straight onto its device: a quarter to an eighth of the float32 teacher's memory.
``precompute_top_k`` runs the teacher once over the training and evaluation sets before training, keeps its top-k
logits per position as dataset columns (``add_teacher_top_k``: Arrow files in the ``datasets``
cache) and frees it, so the teacher is not resident while the student trains. The loss is
``optimum_prune.DistillationMixin`` put in front of LLaMA-Factory's own trainer class, so LoRA or
full fine-tuning, its data pipeline, ``PruningCallback`` (masks) and its saving work unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from optimum_prune import DistillationConfig, DistillationMixin

from .config import model_loading_kwargs
from .sections import check_section, typed_values

SECTION = "distill"
TEACHER_KEYS = ("teacher", "teacher_device", "teacher_dtype", "teacher_quantization", "precompute_top_k")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEACHER_QUANTIZATIONS = ("int8", "nf4")


@dataclass(frozen=True)
class DistillSection:
    config: DistillationConfig
    teacher: str
    teacher_device: str | None = None
    teacher_dtype: str = "float32"
    precompute_top_k: bool = False
    teacher_quantization: str | None = None
    # The YAML's Hub revision, token, cache and remote-code setting, as LLaMA-Factory's reference models inherit them.
    loading: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mapping(cls, section: Any, lf_args: Mapping[str, Any], pruning: bool) -> "DistillSection":
        """Validate ``section`` against the YAML (``lf_args``); with a ``pruning:`` section (``pruning``)
        the teacher defaults to the model being pruned."""
        fields = [f.name for f in dataclasses.fields(DistillationConfig)]
        check_section(SECTION, section, [*fields, *TEACHER_KEYS], "DistillationConfig fields and teacher", lf_args)
        teacher = section.get("teacher") or (lf_args.get("model_name_or_path") if pruning else None)
        if teacher and not isinstance(teacher, (str, os.PathLike)):
            raise ValueError(f"{SECTION}.teacher must be one checkpoint (a local directory or a Hub id), got {teacher!r}")
        if not teacher:
            raise ValueError(
                f"{SECTION}.teacher is required: without a `pruning:` section there is no unpruned model to default to; "
                "set it to the dense checkpoint's directory"
            )
        if _is_local(teacher) and not (Path(teacher) / "config.json").is_file():
            raise ValueError(f"{SECTION}.teacher {teacher!r} is not a local checkpoint directory (no config.json)")
        dtype = section.get("teacher_dtype", "float32")
        if not isinstance(dtype, str) or dtype not in TEACHER_DTYPES:
            raise ValueError(f"{SECTION}.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
        values = {key: value for key, value in typed_values(SECTION, DistillationConfig, section).items() if key in fields}
        try:
            config = DistillationConfig(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{SECTION}: {error}") from None
        quantization = section.get("teacher_quantization")
        if quantization is not None:
            if quantization not in TEACHER_QUANTIZATIONS:
                raise ValueError(f"{SECTION}.teacher_quantization must be one of {', '.join(TEACHER_QUANTIZATIONS)}, got {quantization!r}")
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"{SECTION}.teacher_quantization loads the teacher through bitsandbytes, which is not installed: "
                    "pip install 'optimum-prune[bitsandbytes]', or remove the key"
                ) from None
        precompute = section.get("precompute_top_k", False)
        if not isinstance(precompute, bool):
            raise ValueError(f"{SECTION}.precompute_top_k must be true or false, got {precompute!r}")
        if precompute and (config.top_k is None or config.hidden_weight or config.exit_weight):
            raise ValueError(
                f"{SECTION}.precompute_top_k stores the teacher's top-k logits: set {SECTION}.top_k, and leave hidden_weight "
                "and exit_weight at 0 (hidden states need the live teacher)"
            )
        if precompute and (lf_args.get("do_predict") or lf_args.get("predict_with_generate")):
            raise ValueError(
                f"{SECTION}.precompute_top_k stores the teacher's logits with the training and evaluation sets, and the teacher "
                "is gone by the time LLaMA-Factory predicts (on other data, or generating): remove do_predict / "
                "predict_with_generate, or precompute_top_k"
            )
        loading = model_loading_kwargs(lf_args)
        if str(teacher) != str(lf_args.get("model_name_or_path")):
            _check_same_vocabulary(str(teacher), str(lf_args.get("model_name_or_path")), loading)
        return cls(config, str(teacher), section.get("teacher_device"), dtype, precompute, quantization, loading)

    def load_teacher(self, device: str | torch.device) -> torch.nn.Module:
        """The teacher on ``device``; quantized ones are placed while loading (bitsandbytes' 8-bit models cannot move)."""
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        import optimum_prune  # noqa: F401  (a structured teacher reloads through its loader)

        dtype = TEACHER_DTYPES[self.teacher_dtype]
        if self.teacher_quantization is None:
            return AutoModelForCausalLM.from_pretrained(self.teacher, dtype=dtype, **self.loading).to(device)
        quantization = (BitsAndBytesConfig(load_in_8bit=True) if self.teacher_quantization == "int8" else
                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(
            self.teacher, dtype=dtype, quantization_config=quantization, device_map={"": str(device)}, **self.loading
        )

    def to_mapping(self) -> dict[str, Any]:
        """The section as written in a YAML (for the torchrun workers)."""
        return {**dataclasses.asdict(self.config), "teacher": self.teacher, "teacher_device": self.teacher_device,
                "teacher_dtype": self.teacher_dtype, "teacher_quantization": self.teacher_quantization,
                "precompute_top_k": self.precompute_top_k}


def _is_local(name: str) -> bool:
    """Whether ``name`` means a local directory; otherwise it is a Hub id (``org/model``), which
    ``from_pretrained`` resolves as for ``model_name_or_path``."""
    return Path(name).exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1


def split_distill(args: Mapping[str, Any], pruning: bool, validate: bool = True) -> tuple[dict[str, Any], DistillSection | None]:
    """(the other arguments, the validated ``distill:`` section or ``None``); ``pruning`` says
    whether the YAML prunes (the teacher then defaults to the unpruned model). Commands other than
    ``train`` pass ``validate=False``: they drop the section, so it never stops them."""
    rest = {key: value for key, value in args.items() if key != SECTION}
    if SECTION not in args or not validate:
        return rest, None
    return rest, DistillSection.from_mapping(args[SECTION], rest, pruning)


@contextmanager
def distilling_trainers(section: DistillSection | None) -> Iterator[None]:
    """While open, LLaMA-Factory's ``pt`` and ``sft`` workflows build their trainers with the
    distillation loss in front (``DistillationMixin``), the teacher loaded once, by the first
    trainer, on ``teacher_device`` or else beside the student (the Trainer's device).

    LLaMA-Factory has no hook for the trainer class, so its two workflow modules' names for it are
    pointed at the distilling subclasses for the duration and restored after; nothing else changes.
    """
    if section is None:
        yield
        return
    from llamafactory.train.pt import workflow as pt_workflow
    from llamafactory.train.sft import workflow as sft_workflow

    loaded: dict[str, torch.nn.Module | None] = {}  # the teacher, dropped once its top-k logits are stored
    names = {pt_workflow: "CustomTrainer", sft_workflow: "CustomSeq2SeqTrainer"}
    originals = {module: getattr(module, name) for module, name in names.items()}

    def distilling(base: type) -> type:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if "teacher" not in loaded:  # LLaMA-Factory's workflows pass args= by keyword
                loaded["teacher"] = section.load_teacher(section.teacher_device or kwargs["args"].device)
            teacher = loaded["teacher"]
            DistillationMixin.__init__(self, *args, teacher=teacher, distillation=section.config, **kwargs)
            if section.precompute_top_k:
                self.precompute_teacher_top_k()
                loaded["teacher"] = None

        return type(f"Distilling{base.__name__}", (DistillationMixin, base), {"__init__": __init__})

    for module, name in names.items():
        setattr(module, name, distilling(originals[module]))
    try:
        yield
    finally:
        for module, name in names.items():
            setattr(module, name, originals[module])


def _check_same_vocabulary(teacher: str, student: str, loading: Mapping[str, Any]) -> None:
    """Distillation compares the teacher's and the student's logits token id by token id: a teacher whose
    tokenizer maps ids to other tokens (of the same count, e.g. Llama-2 and Mistral, 32,000 each) is refused.
    A teacher saved without a tokenizer is taken to share the student's."""
    from transformers import AutoTokenizer

    try:
        teacher_vocabulary = AutoTokenizer.from_pretrained(teacher, **loading).get_vocab()
    except (OSError, ValueError):
        return
    student_vocabulary = AutoTokenizer.from_pretrained(student, **loading).get_vocab()
    if teacher_vocabulary != student_vocabulary:
        differing = len(set(teacher_vocabulary.items()) ^ set(student_vocabulary.items())) // 2
        raise ValueError(
            f"{SECTION}.teacher {teacher!r} has another tokenizer than {student} (about {differing} token ids differ): "
            "distillation compares their logits id by id; give a teacher with the student's tokenizer"
        )

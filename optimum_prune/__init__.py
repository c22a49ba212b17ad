"""optimum-prune: LLM pruning as a first-class citizen of the Hugging Face ecosystem.

    from optimum_prune import PruningConfig, prune, load_default_model
    model, tokenizer = load_default_model()
    report = prune(model, PruningConfig(method="wanda", sparsity="2:4"), tokenizer=tokenizer)
"""

from typing import TYPE_CHECKING, Any

from .allocation import ALLOCATIONS, register_allocation
from .adapters import ADAPTERS, UnsupportedArchitecture, get_adapter, register_adapter
from .api import prune
from .callback import PruningCallback
from .compress import compress
from .config import PruningConfig
from .early_exit import choose_early_exit, early_exit_kwargs, enable_early_exit
from .expert_dropping import ExpertDroppingCallback, ExpertDroppingSchedule
from .expert_folding import FoldedExperts, fold_experts
from .evaluation import TooFewTokens, evaluate_image_text_loss, evaluate_perplexity
from .kernels import SparseLinear, sparsify
from .masks import SparsityMasks, merge_lora_preserving_sparsity
from .integrations.optimum import OptimumPruner, export_onnx
from .methods import METHODS, register_method, register_model_method, register_structured_method
from .models import load_default_model, load_model
from .perp import PERPConfig, merge_perp, prepare_perp
from .plugins import load_plugins
from .report import PruningReport
from .saving import save_pruned
from .schedules import GradualSchedule, IterativeSchedule
from .skipping import ExpertSkipping, skip_experts, skipping_thresholds
from .streaming import prune_checkpoint
from .sparsity import NMPattern, verify_sparsity
from .sparsity_metadata import compressed_tensors_config, sparsity_config
from .structure.loading import StructureConfig  # registers the loader of non-uniform checkpoints

if TYPE_CHECKING:
    from .distillation import DistillationConfig, DistillationMixin, DistillationTrainer, add_teacher_top_k

__version__ = "0.1.0"

# Distillation subclasses transformers' Trainer, whose import (datasets, aiohttp, ...) costs ~0.45 s of CPU that
# pruning, evaluation and the CLI never use: its names load on first use (PEP 562).
_DISTILLATION = ("DistillationConfig", "DistillationMixin", "DistillationTrainer", "add_teacher_top_k")


def __getattr__(name: str) -> Any:
    if name in _DISTILLATION:
        from . import distillation

        return getattr(distillation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_DISTILLATION})

__all__ = [
    "ADAPTERS",
    "ALLOCATIONS",
    "DistillationConfig",
    "DistillationMixin",
    "DistillationTrainer",
    "ExpertDroppingCallback",
    "ExpertDroppingSchedule",
    "ExpertSkipping",
    "FoldedExperts",
    "GradualSchedule",
    "IterativeSchedule",
    "METHODS",
    "NMPattern",
    "OptimumPruner",
    "PERPConfig",
    "PruningCallback",
    "PruningConfig",
    "PruningReport",
    "SparseLinear",
    "SparsityMasks",
    "StructureConfig",
    "TooFewTokens",
    "UnsupportedArchitecture",
    "add_teacher_top_k",
    "choose_early_exit",
    "compress",
    "compressed_tensors_config",
    "early_exit_kwargs",
    "enable_early_exit",
    "evaluate_image_text_loss",
    "evaluate_perplexity",
    "export_onnx",
    "fold_experts",
    "get_adapter",
    "load_default_model",
    "load_model",
    "merge_lora_preserving_sparsity",
    "merge_perp",
    "prepare_perp",
    "prune",
    "prune_checkpoint",
    "register_adapter",
    "register_allocation",
    "register_method",
    "register_model_method",
    "register_structured_method",
    "save_pruned",
    "skip_experts",
    "skipping_thresholds",
    "sparsify",
    "sparsity_config",
    "verify_sparsity",
]

load_plugins()  # last: a plugin imports this package's registries

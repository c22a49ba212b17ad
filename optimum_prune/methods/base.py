"""The two shapes of a pruning method.

Unstructured methods are one ``LayerPruner`` per linear, with two hooks: the calibration engine
creates a pruner for every linear of a decoder layer, feeds it the linear's inputs through
``add_batch`` while the layer runs on the calibration set, then calls ``prune`` once. Methods
therefore differ only in the statistics they keep and how they turn them into a mask (and, for
SparseGPT, a weight update).

Structured methods remove whole heads, channels, sublayers or layers, so they see the whole
model through its adapter: a ``StructuredMethod`` checks the request, scores the units, and asks
the adapter to cut them. The config rewrite and the report's before/after counts are shared.

Whole-model methods zero weights (unstructured or N:M) like the per-linear ones, but with a
criterion that compares weights across layers or is recomputed between shots (LLM Surgeon's
global threshold on K-FAC costs): a ``ModelPruner`` gets every target linear at once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import torch
from torch import nn

from ..adapters import DecoderAdapter
from ..calibration.engine import all_finite
from ..calibration.sharing import InputStatistics
from ..ignoring import kept_moe_layers
from ..options import MoEOptions, NoOptions, option_types
from ..registry import Registry, registered_name
from ..report import PruningReport
from ..sparsity import NMPattern, SparsityTarget

Options = TypeVar("Options")


class NonFiniteStatistics(ValueError):
    """A linear's calibration statistics hold NaN or inf, so ``LayerPruner.prune`` cannot choose its mask; the run
    adds the linear's name."""


def require_finite_statistics(statistics: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteStatistics`` where float32 sums over finite inputs (``what``) overflowed: scores from them
    would give a mask by position."""
    if not all_finite(statistics):
        raise NonFiniteStatistics(
            f"its {what} overflowed: an input channel is larger than ~1e19; prune this linear with magnitude, or list it "
            "in PruningConfig.ignore"
        )


class LayerPruner(ABC, Generic[Options]):
    # PruningConfig.seed mixed with this linear's module name (``linear_seed``), set after the constructor and before
    # ``add_batch``: a method that draws at random seeds its own ``torch.Generator`` with it, so a run repeats and each
    # linear draws its own.
    seed: int = 0
    # Zeros of an already pruned linear that ``prune``'s weight update made non-zero again: the run lists them in
    # ``PruningReport.revived_zeros`` with one warning (a warning per linear was a page on a large model, and Python's
    # warnings module showed it once per process only).
    revived_zeros: int = 0
    # Set by a method that keeps all it learns from the inputs here, a function of the inputs alone: the run then
    # adds to and synchronizes it itself, one object for the linears of a layer that read the same tensor
    # (``calibration.sharing``), and ``prune`` must ``release`` it before consuming it in place.
    statistics: InputStatistics | None = None

    def __init__(self, linear: nn.Linear, options: Options) -> None:
        self.linear = linear
        self.options = options

    @classmethod
    def needs_calibration(cls, options: Options) -> bool:
        """Whether ``add_batch`` must see calibration inputs before ``prune`` (False: data-free, e.g. magnitude)."""
        return True

    @classmethod
    def check_target(cls, options: Options, target: SparsityTarget, in_features: int) -> None:
        """Raise ``ValueError`` if this method cannot reach ``target`` on a linear with ``in_features``.

        ``prune`` calls it for every linear before touching any weight, so a bad combination
        never leaves a half-pruned model.
        """
        if isinstance(target, NMPattern):
            target.check_columns(in_features)
            cls.check_options_target(options, target)

    @classmethod
    def check_options_target(cls, options: Options, pattern: NMPattern) -> None:
        """Raise ``ValueError`` (naming ``PruningConfig.method_options``) if these options cannot reach the N:M
        ``pattern`` on any linear: checked when the config is built, before any model is seen."""

    @classmethod
    def zero_shares(cls, options: Options, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero fraction and size of each group of weights ``prune`` brings to the target on its own (here the
        whole linear), from the weight's zero mask ``zero``: on an already pruned model an allocation lowers the layer
        targets so that the groups past their share, which keep their zeros, still leave the mean at the target."""
        return zero.double().mean().reshape(1).cpu(), torch.tensor([float(zero.numel())], dtype=torch.float64)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate statistics from one batch of this linear's inputs (``[..., in_features]``)."""

    def synchronize(self) -> None:
        """Sum the statistics over all processes (multi-process calibration, ``optimum_prune.distributed``)."""

    @abstractmethod
    def prune(self, target: SparsityTarget) -> None:
        """Zero (and possibly update) ``self.linear.weight`` in place to reach ``target``."""

    def apply_mask(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.linear.weight.masked_fill_(mask.to(self.linear.weight.device), 0)


def zero_shares_per_row(zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``LayerPruner.zero_shares`` of a method that ranks within each output row."""
    return zero.double().mean(1).cpu(), torch.full((zero.shape[0],), float(zero.shape[1]), dtype=torch.float64)


class StructuredMethod(ABC, Generic[Options]):
    """Removes whole units (heads, channels, sublayers, layers) of a model seen through its adapter.

    ``sparsity`` is, unless a method's docstring says otherwise (SliceGPT: of the hidden dimension;
    layers: of the decoder layers; experts and merge_experts: of each layer's experts; ZipLM: of the
    decoder's time), the fraction of the decoder
    layers' linear parameters to remove, the denominator of unstructured sparsity; ``ignore`` holds
    glob patterns of module names to keep. A ``check`` that removes whole units (layers, experts) sets
    ``sparsity`` to what the count it settles on removes (from a count option such as ``num_layers``, or
    the rounded fraction), which the report states; the recorded config stays the recipe as given.
    """

    # Whether the method may change a linear's width (False: it removes or re-routes whole layers or sublayers),
    # which later steps' up-front checks of widths (GPTQ's groups) must then leave to when they run.
    changes_widths = True

    @property
    def changes_kept_weights(self) -> bool:
        """Whether it reshapes, factorises or updates weights it keeps (False: it only removes or re-routes whole
        layers or sublayers), which a module two layers share would carry into the other layer."""
        return True

    def __init__(
        self, adapter: DecoderAdapter, sparsity: float, ignore: list[str], options: Options, device: torch.device, seed: int = 0
    ) -> None:
        self.adapter = adapter
        self.sparsity = sparsity
        self.ignore = ignore
        self.options = options
        self.device = device
        self.seed = seed  # PruningConfig.seed: what the method draws at random (width's random control, ZipLM's search)

    @classmethod
    def needs_calibration(cls, options: Options) -> bool:
        return True

    def check(self) -> None:
        """Raise ``ValueError`` for a request that cannot be met, before anything is changed; plan what needs no
        data on the way (the units a width method may remove), which ``prune`` then uses."""

    def always_records_layer_shapes(self) -> bool:
        """Whether every result holds layers of their own shapes (per-layer ranks, sliced widths, removed sublayers),
        which reloading builds with the adapter's ``reshape_layer``: the hook is then required before anything runs.
        Any other method is refused for lack of it only when its result turns out non-uniform (``record_structure``),
        as a uniform one saves as a stock config."""
        return False

    def kept_moe_layers(self) -> set[int]:
        """The layers whose MoE block ``ignore`` keeps: expert methods leave those blocks as they are."""
        return kept_moe_layers(self.adapter, self.ignore, "PruningConfig.ignore")

    @abstractmethod
    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        """Score, select and cut; record per-layer scores and removed units in ``report``. Nothing that holds a
        module ``self.ignore`` names may go (``optimum_prune.ignoring.holds_ignored``)."""


class ModelPruner(ABC, Generic[Options]):
    """Zeros weights of all target linears together (``linears``: per decoder layer, qualified name → linear);
    ``moe_options`` say what to do with experts no calibration token reaches."""

    def __init__(
        self, adapter: DecoderAdapter, target: SparsityTarget, linears: list[dict[str, nn.Linear]], options: Options,
        device: torch.device, moe_options: MoEOptions | None = None,
    ) -> None:  # fmt: skip
        self.adapter = adapter
        self.target = target
        self.linears = linears
        self.options = options
        self.device = device
        self.moe_options = moe_options or MoEOptions()

    @classmethod
    def needs_calibration(cls, options: Options) -> bool:
        return True  # its costs are curvatures of the calibration loss

    def check(self) -> None:
        """Raise ``ValueError`` for a request that cannot be met, before anything is changed."""
        if isinstance(self.target, NMPattern):
            for layer in self.linears:
                for name, linear in layer.items():
                    try:
                        self.target.check_columns(linear.in_features)
                    except ValueError as error:
                        raise ValueError(f"PruningConfig.sparsity {str(self.target)!r} cannot be applied to {name}: {error}") from None

    @abstractmethod
    def prune(self, windows: torch.Tensor, report: PruningReport) -> None:
        """Zero (and update) the linears' weights; append one ``LinearReport`` per linear to ``report.linears``."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: type
    summary: str
    pruner: type[LayerPruner] | None = None
    structured: type[StructuredMethod] | None = None
    model_pruner: type[ModelPruner] | None = None

    def __post_init__(self) -> None:
        option_types(self.options)  # a registration with options PruningConfig cannot store fails here

    def create(self, linear: nn.Linear, options: Any, seed: int = 0) -> LayerPruner:
        pruner = self.pruner(linear, options)
        pruner.seed = seed
        return pruner

    def needs_calibration(self, options: Any) -> bool:
        return (self.pruner or self.structured or self.model_pruner).needs_calibration(options)


def linear_seed(seed: int, name: str) -> int:
    """A seed for the linear called ``name`` from the config's ``seed``: the same for every run and process, and
    independent between linears (one shared seed would draw the same pattern in every linear of a shape)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")


METHODS: Registry[MethodSpec] = Registry("pruning method", "PruningConfig.method")


def per_layer_methods() -> str:
    """The registered methods that prune one linear at a time from its own statistics (``LayerPruner``s), for the
    messages of what only they support."""
    return ", ".join(name for name in METHODS.names() if METHODS.get(name).pruner)


PrunerClass = TypeVar("PrunerClass", bound=type[LayerPruner])
StructuredClass = TypeVar("StructuredClass", bound=type[StructuredMethod])
ModelPrunerClass = TypeVar("ModelPrunerClass", bound=type[ModelPruner])
"""What the registering decorators give back: the class itself (a user's type checker keeps seeing it)."""


def register_method(name: str, *, options: type = NoOptions) -> Callable[[PrunerClass], PrunerClass]:
    """Class decorator: make a ``LayerPruner`` available as ``PruningConfig(method=name)``.

    Whether it needs calibration data depends on its options (``needs_calibration``).
    """
    name = registered_name(name, "register_method")

    def decorator(pruner: PrunerClass) -> PrunerClass:
        METHODS.add(name, MethodSpec(name, options, _summary(pruner), pruner=pruner), pruner)
        return pruner

    return decorator


def register_structured_method(name: str, *, options: type = NoOptions) -> Callable[[StructuredClass], StructuredClass]:
    """Class decorator: make a ``StructuredMethod`` available as ``PruningConfig(method=name)``.

    Whether it needs calibration data depends on its options (``needs_calibration``).
    """
    name = registered_name(name, "register_structured_method")

    def decorator(method: StructuredClass) -> StructuredClass:
        METHODS.add(name, MethodSpec(name, options, _summary(method), structured=method), method)
        return method

    return decorator


def register_model_method(name: str, *, options: type = NoOptions) -> Callable[[ModelPrunerClass], ModelPrunerClass]:
    """Class decorator: make a ``ModelPruner`` available as ``PruningConfig(method=name)`` (always calibrated)."""
    name = registered_name(name, "register_model_method")

    def decorator(method: ModelPrunerClass) -> ModelPrunerClass:
        METHODS.add(name, MethodSpec(name, options, _summary(method), model_pruner=method), method)
        return method

    return decorator


def _summary(cls: type) -> str:
    """The docstring's first paragraph on one line (``optimum-cli prune --help`` lists it)."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

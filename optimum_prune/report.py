"""``PruningReport``: what ``prune`` did, per linear and overall, printable as a table."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .atomic_files import write_bytes_atomic
from .dependencies import MissingDependency
from .structure.shapes import LayerShape

logger = logging.getLogger(__name__)


def process_peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` on Linux, where ``ru_maxrss``
    survives ``exec`` (a process started by a larger one would report its parent's peak), else
    ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Start this process's ``VmHWM`` afresh from its current resident memory (Linux: ``/proc/self/clear_refs``), so
    that the peak a run reports is the run's, not that of whatever the process did before; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def bare_figure(purpose: str, **options: Any) -> Any:
    """A matplotlib ``Figure`` without pyplot: it renders with Agg by itself, where ``pyplot`` with
    ``matplotlib.use("Agg")`` switched the caller's backend (a notebook's inline plots)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # not installed (the [plot] extra), or an old one that does not import beside this numpy
        raise MissingDependency(f"{purpose} needs matplotlib ({error}): pip install 'optimum-prune[plot]'") from error
    return Figure(**options)


def save_figure(figure: Any, path: str | os.PathLike, dpi: int) -> None:
    """``figure`` written whole (``write_bytes_atomic``) in the format its suffix names, as ``savefig(path)`` would,
    and PNG for a suffix that names none (``scores.v2``): savefig opens ``path`` as it is, writing through a link
    planted under its name into the file it points to."""
    suffix = os.path.splitext(path)[1][1:].lower()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix if suffix in figure.canvas.get_supported_filetypes() else "png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())


@dataclass
class LinearReport:
    name: str
    layer_index: int
    target_sparsity: float
    sparsity: float
    numel: int
    part: str = "language"


def _checked_part(part: str) -> str:
    """A misspelled part would read as one left dense (0.0, no layers)."""
    from .config import MODEL_PARTS  # config imports the methods, which import this module

    if part not in MODEL_PARTS:
        raise ValueError(f"part {part!r} is no model part; parts: {', '.join(MODEL_PARTS)}")
    return part


@dataclass
class PruningReport:
    """What a ``prune`` run did, measured: per-linear sparsities of a method that zeros weights, sizes, MACs and
    per-layer shapes of one that changes shapes, calibration tokens and images, time and peak memory. ``sparsity``
    is what was asked (or what a count option made of it): a fraction, an ``"N:M"`` pattern, or each part's."""

    method: str
    sparsity: float | str
    allocation: str
    device: str
    calibration_tokens: int
    calibration_images: int = 0
    multimodal: bool = False  # the model has parts besides the language tower
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    linears: list[LinearReport] = field(default_factory=list)
    # Structured methods: sizes before/after, per-layer shapes, scores and what was removed.
    parameters_before: int = 0
    parameters_after: int = 0
    # Of the decoder layers alone: what a structured method's sparsity counts (for most; see each method).
    decoder_parameters_before: int = 0
    decoder_parameters_after: int = 0
    macs_per_token_before: int = 0
    macs_per_token_after: int = 0
    shapes: list[LayerShape] = field(default_factory=list)
    layer_scores: dict[str, list[float]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a method predicts or measured besides sizes (ZipLM's speed-up)
    # MoE: expert linears that received no calibration token, and what was done with them.
    unrouted: list[str] = field(default_factory=list)
    unrouted_policy: str = ""
    # Zeros of an already pruned model that the method's weight update made non-zero again, per linear (SparseGPT
    # without keep_zeros).
    revived_zeros: dict[str, int] = field(default_factory=dict)

    @property
    def overall_sparsity(self) -> float:
        """Measured zeros over all pruned linears (pre-existing zeros included)."""
        total = sum(r.numel for r in self.linears)
        return sum(r.sparsity * r.numel for r in self.linears) / total if total else 0.0

    @property
    def parts(self) -> list[str]:
        """The model parts that were pruned, in the order they were visited."""
        return list(dict.fromkeys(r.part for r in self.linears))

    def part_sparsity(self, part: str) -> float:
        """Measured zeros over the pruned linears of one model part (0.0 for a part left dense)."""
        rows = [r for r in self.linears if r.part == _checked_part(part)]
        total = sum(r.numel for r in rows)
        return sum(r.sparsity * r.numel for r in rows) / total if total else 0.0

    def layer_sparsities(self, part: str = "language") -> dict[int, tuple[float, float]]:
        """Layer index (within ``part``) → (target, measured) sparsity over its pruned linears."""
        result: dict[int, tuple[float, float]] = {}
        linears = [r for r in self.linears if r.part == _checked_part(part)]
        for index in sorted({r.layer_index for r in linears}):
            rows = [r for r in linears if r.layer_index == index]
            numel = sum(r.numel for r in rows)
            result[index] = (
                sum(r.target_sparsity * r.numel for r in rows) / numel,
                sum(r.sparsity * r.numel for r in rows) / numel,
            )
        return result

    def plot_layer_scores(self, path: str | os.PathLike) -> None:
        """Save a plot of the per-layer scores that chose what to remove, in the format the path's suffix names (PNG
        for a suffix that names none; needs matplotlib)."""
        if not self.layer_scores:
            raise ValueError(f"method {self.method!r} recorded no per-layer scores to plot")
        figure = bare_figure("plotting layer scores", figsize=(8, 2.6 * len(self.layer_scores)))
        axes = figure.subplots(len(self.layer_scores), 1, squeeze=False)
        for axis, (name, scores) in zip(axes[:, 0], self.layer_scores.items()):
            axis.bar(range(len(scores)), scores, color="tab:blue")
            axis.set_title(name)
            axis.set_xlabel("decoder layer (of the model before pruning)")
        figure.suptitle(f"{self.method}: removed {', '.join(self.removed) or 'nothing'}", fontsize=8, wrap=True)
        figure.tight_layout()
        save_figure(figure, path, dpi=100)

    @property
    def request(self) -> str:
        """What was pruned, in words: the method, what it removed and, for methods that zero weights, the allocation."""
        sparsity = _short_fraction(self.sparsity) if isinstance(self.sparsity, float) else self.sparsity
        return f"{self.method} {sparsity}" + ("" if self.shapes else f" ({self.allocation})")

    def __str__(self) -> str:
        lines = [f"Pruning report: {self.request}, on {self.device}"]
        lines += self._structure_lines() if self.shapes else self._sparsity_lines()
        lines += [
            f"calibration tokens: {self.calibration_tokens:,}{self._calibration_kind()}",
            f"time: {self.seconds:.1f} s   peak memory ({self.peak_memory_kind}): {self.peak_memory_bytes / 2**20:,.0f} MiB",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values, with the measured sparsities the properties compute (``json.dumps`` it to
        keep a run's report beside its checkpoint); a step that pruned no linear (structured) measured none: null, and
        one that changed no shape (zeroing weights) measured no sizes: null parameters and MACs, not 0."""
        data = dataclasses.asdict(self)
        if not self.shapes:
            data.update(dict.fromkeys(_SIZE_FIELDS))
        return {
            **data,
            "request": self.request,
            "overall_sparsity": self.overall_sparsity if self.linears else None,
            "part_sparsity": {part: self.part_sparsity(part) for part in self.parts},
        }

    def removed_lines(self) -> list[str]:
        """What was removed, the first ``_REMOVED_SHOWN`` items (``removed`` holds two per layer of a width cut)."""
        lines = [f"removed: {item}" for item in self.removed[:_REMOVED_SHOWN]]
        if len(self.removed) > _REMOVED_SHOWN:
            lines.append(f"removed: ... {len(self.removed) - _REMOVED_SHOWN} more (PruningReport.removed lists them)")
        return lines

    def record_unrouted(self, names: list[str], policy: str) -> None:
        """Expert linears no calibration token reached, and what ``moe_options.unrouted_experts`` did with them."""
        self.unrouted += names
        self.unrouted_policy = policy

    def warn_unrouted(self) -> None:
        """One warning for the run (``unrouted`` names them all): a line per layer listing each linear was a page
        on a 32-layer MoE."""
        if self.unrouted:
            logger.warning(
                "%d expert linears received no calibration token (%s); PruningReport.unrouted names them, e.g. %s",
                len(self.unrouted), self.unrouted_policy, self.unrouted[0],
            )  # fmt: skip

    def warn_revived_zeros(self) -> None:
        """One warning for the run, in every run (``revived_zeros`` names the linears)."""
        if self.revived_zeros:
            logger.warning(
                "%s: the model was already sparse (pruned before, or a quantizer's exact zeros), and the update made %s of "
                "its zeros non-zero again in %d linears (PruningReport.revived_zeros); set PruningConfig.method_options.keep_zeros=True "
                "to keep them pruned", self.method, f"{sum(self.revived_zeros.values()):,}", len(self.revived_zeros),
            )  # fmt: skip

    def _calibration_kind(self) -> str:
        if not self.multimodal or not self.calibration_tokens:
            return ""
        return f" (image-text, {self.calibration_images} images)" if self.calibration_images else " (text only, no images)"

    def _sparsity_lines(self) -> list[str]:
        lines = [f"{'part':>9}  {'layer':>5}  {'target':>7}  {'measured':>8}" if self.multimodal else f"{'layer':>5}  {'target':>7}  {'measured':>8}"]
        for part in self.parts:
            for index, (target, measured) in self.layer_sparsities(part).items():
                prefix = f"{part:>9}  " if self.multimodal else ""
                lines.append(f"{prefix}{index:>5}  {target:>7.2%}  {measured:>8.2%}")
        lines.append(f"overall sparsity of pruned linears: {self.overall_sparsity:.2%} ({len(self.linears)} linears)")
        if self.unrouted:  # named in full by PruningReport.unrouted: thousands on a large MoE
            action = "pruned by magnitude" if self.unrouted_policy == "magnitude" else "left dense"
            lines.append(
                f"{len(self.unrouted)} expert linears got no calibration token ({action}), e.g. {self.unrouted[0]} "
                "(PruningReport.unrouted lists them)"
            )
        return lines + self.notes

    def _structure_lines(self) -> list[str]:
        columns = _shape_columns(self.shapes)
        lines = ["  ".join(f"{name:>{width}}" for name, width in [("layers", 7), *((name, width) for name, width, _ in columns)])]
        for first, last, shape in _runs_of_equal_shapes(self.shapes, columns):
            layers = str(first) if first == last else f"{first}-{last}"
            lines.append("  ".join([f"{layers:>7}", *(f"{cell(shape):>{width}}" for _, width, cell in columns)]))
        for name, scores in self.layer_scores.items():
            lines.append(f"{name} per layer: " + " ".join(f"{s:.4g}" for s in scores))
        lines += self.removed_lines()
        lines += self.notes
        lines += [
            f"decoder layers' parameters: {_change(self.decoder_parameters_before, self.decoder_parameters_after)}",
            f"parameters: {_change(self.parameters_before, self.parameters_after)}",
            f"{self.macs_label}: {_change(self.macs_per_token_before, self.macs_per_token_after)}",
        ]
        return lines

    @property
    def macs_label(self) -> str:
        """What the MAC counts cover: a text token's pass through the language model (a vision tower's run per image
        is not in them, where the parameter counts hold it)."""
        return "MACs per text token (language model)" if self.multimodal else "MACs per token"


_REMOVED_SHOWN = 10

# A structure table's columns: name, width, the cell of a layer's shape. Experts, residual widths and low-rank factors
# (an empty cell where a layer has none) only where some layer has them.
_BASE_COLUMNS = [
    ("heads", 5, lambda shape: str(shape.num_attention_heads)),
    ("kv", 3, lambda shape: str(shape.num_key_value_heads)),
    ("mlp", 6, lambda shape: str(shape.intermediate_size)),
]
_SIZE_FIELDS = (
    "parameters_before", "parameters_after", "decoder_parameters_before", "decoder_parameters_after",
    "macs_per_token_before", "macs_per_token_after",
)  # measured by the methods that change shapes

_OPTIONAL_COLUMNS = [
    ("experts", 7, lambda shape: "" if shape.num_experts is None else str(shape.num_experts)),
    ("residual in/mid/out", 19, lambda shape: "/".join(map(str, shape.residual_widths or ()))),
    ("low-rank linears", 16, lambda shape: _low_rank_cell(shape.low_rank)),
    ("rerouted", 14, lambda shape: ",".join(shape.rerouted)),  # a removed sublayer a linear map stands in for
]


def _shape_columns(shapes: list[LayerShape]) -> list[tuple[str, int, Callable[[LayerShape], str]]]:
    return [*_BASE_COLUMNS, *(column for column in _OPTIONAL_COLUMNS if any(column[2](shape) for shape in shapes))]


def _runs_of_equal_shapes(shapes: list[LayerShape], columns: list) -> list[tuple[int, int, LayerShape]]:
    """Consecutive layers whose table rows read alike, as (first, last, shape): a uniform cut of 80 layers is one row."""
    runs: list[tuple[int, int, LayerShape]] = []
    for index, shape in enumerate(shapes):
        if runs and all(cell(runs[-1][2]) == cell(shape) for _, _, cell in columns):
            runs[-1] = (runs[-1][0], index, runs[-1][2])
        else:
            runs.append((index, index, shape))
    return runs


def _low_rank_cell(low_rank: tuple[tuple[str, int], ...]) -> str:
    if not low_rank:
        return ""
    ranks = sorted(rank for _, rank in low_rank)
    return f"{len(ranks)}, rank {ranks[0]}" + (f"-{ranks[-1]}" if ranks[-1] != ranks[0] else "")


def _change(before: int, after: int) -> str:
    return f"{before:,} -> {after:,} ({after / before if before else 1.0:.1%})"


def _short_fraction(value: float) -> str:
    """``value`` in 4 significant digits, or as many more as keep a fraction below 1 below 1 (0.99995 is not '1')."""
    digits = 4
    while digits < 17 and float(f"{value:.{digits}g}") >= 1 > value:
        digits += 1
    return f"{value:.{digits}g}"

"""The runs ``prune`` plans from a config, one per model part: ``LayerwiseRun`` (unstructured methods, one decoder
layer at a time, with the allocation's per-layer targets), ``StructuredRun`` (methods that remove units and rewrite
the config) and ``ModelRun`` (methods that need the whole model at once, such as LLM Surgeon)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .adapters import DecoderAdapter, UnsupportedArchitecture
from .adapters.base import STRUCTURE_RECORDING_HOOKS
from .allocation import ALLOCATIONS, Allocation, shifted_for_existing_zeros
from .calibration import (
    CalibrationInputs,
    LayerInputs,
    feed_layer,
    feeding_inputs,
    observe_layers,
    walk_layers,
)
from .calibration.engine import moving_to, on_device
from .calibration.sharing import InputsChangedInPlace, SharedStatistics
from .config import PruningConfig, readable_step, recorded_steps
from .distributed import all_reduce_sum, is_distributed
from .ignoring import check_kept, is_ignored, kept_modules
from .methods import METHODS, LayerPruner, MethodSpec, ModelPruner, StructuredMethod
from .methods.base import NonFiniteStatistics, linear_seed
from .methods.magnitude import MagnitudeOptions
from .options import MoEOptions
from .report import LinearReport, PruningReport
from .sparsity import NMPattern, SparsityTarget
from .statistics import ColumnNorms, mean_ranks
from .structure.counting import count_macs_per_token, count_parameters
from .structure.loading import check_shape_hooks, record_structure

if TYPE_CHECKING:
    from .streaming import LayerStream

logger = logging.getLogger(__name__)
MAX_EXPERT_SPARSITY = 0.99  # router hints never empty an expert: it keeps at least 1 % of its weights


@dataclass
class LayerwiseRun:
    """Everything resolved from a config for one part of a model: adapter, method, allocation, target linears."""

    config: PruningConfig
    part: str
    target: SparsityTarget
    adapter: DecoderAdapter
    method: MethodSpec
    method_options: Any
    moe_options: MoEOptions
    allocation: Allocation
    targets: list[dict[str, nn.Linear]]
    device: torch.device
    offload: "LayerStream | None" = None
    activation_device: torch.device | str | None = None  # where calibration activations wait between layers ("disk": files)
    layer_targets: list[SparsityTarget] | None = None  # set by allocate
    notes: list[str] = field(default_factory=list)  # for the report: what allocate decided besides the targets

    @property
    def weights(self) -> list[torch.Tensor]:
        """The weight of every linear the run prunes."""
        return [linear.weight for layer in self.targets for linear in layer.values()]

    @classmethod
    def plan_parts(
        cls, adapter: DecoderAdapter, config: PruningConfig, device: torch.device, offload: "LayerStream | None" = None,
        activation_device: torch.device | str | None = None,
    ) -> list["LayerwiseRun"]:
        """One run per part the config names, in the order the model executes them."""
        available = adapter.parts()
        targets = config.part_targets()
        missing = sorted(set(targets) - set(available))
        if missing:
            raise ValueError(
                f"PruningConfig.parts names {', '.join(missing)}, but {type(adapter.model).__name__} has only the part(s) "
                f"{', '.join(available)}; remove the policy for {', '.join(missing)}"
            )
        return [
            cls.plan(part, part_adapter, config, targets[part], device, offload, activation_device)
            for part, part_adapter in available.items()
            if part in targets
        ]

    @classmethod
    def plan(
        cls, part: str, adapter: DecoderAdapter, config: PruningConfig, target: SparsityTarget, device: torch.device,
        offload: "LayerStream | None" = None, activation_device: torch.device | str | None = None,
    ) -> "LayerwiseRun":
        method = METHODS.get(config.method)
        options = config.build_method_options()
        moe_options = config.build_moe_options()
        targets = _target_linears(adapter, config.ignore, include_routers=moe_options.prune_router)
        _check_some_target(targets, part, adapter, config)
        for linears in targets:
            for name, linear in linears.items():
                try:
                    method.pruner.check_target(options, target, linear.in_features)
                except ValueError as error:
                    field = "PruningConfig.sparsity" if not config.parts else f"PruningConfig.parts[{part!r}].sparsity"
                    remedy = _width_remedy(adapter, name, linear, target)
                    raise ValueError(f"{field} {str(target)!r} cannot be applied to {name}: {error}{remedy}") from None
        if moe_options.expert_sparsity == "load":  # a fractional target (the config refuses N:M) with room for ±λ
            _check_expert_spread(target, moe_options.expert_deviation, "sparsity")
        allocation = ALLOCATIONS.get(config.allocation).create(config.build_allocation_options(), config.seed)
        return cls(config, part, target, adapter, method, options, moe_options, allocation, targets, device, offload, activation_device)

    def allocate(self, windows: CalibrationInputs | None) -> None:
        """Each decoder layer's sparsity target, from the allocation (which may observe the layers first)."""
        self.layer_targets = self._layer_targets(windows)

    def execute(self, windows: CalibrationInputs | None, report: PruningReport) -> None:
        if self.layer_targets is None:
            self.allocate(windows)
        layer_targets = self.layer_targets
        report.notes += self.notes
        residency = self.offload.resident if self.offload else moving_to(self.device)
        if self.method.needs_calibration(self.method_options):
            walk_layers(
                self.adapter, windows, self.device, self._pruning_visitor(layer_targets, report), self._description("Pruning"),
                residency=residency, activation_device=self.activation_device,
            )  # fmt: skip
            return
        layers = self.adapter.decoder_layers()
        for index in tqdm(range(len(self.targets)), desc=self._description("Pruning")):
            with residency(index, layers[index]):
                if not self._resumed(index, layer_targets[index], report):
                    pruners = self._pruners(self.targets[index])
                    with self._noting(index, report):
                        _finish(pruners, self.part, index, dict.fromkeys(pruners, layer_targets[index]), report)

    def _pruners(self, linears: dict[str, nn.Linear]) -> dict[str, LayerPruner]:
        return {name: self.method.create(linear, self.method_options, linear_seed(self.config.seed, name)) for name, linear in linears.items()}

    @contextmanager
    def _noting(self, index: int, report: PruningReport) -> Iterator[None]:
        """Offloaded: what pruning layer ``index`` adds to ``report`` goes into its shard, for a resumed run."""
        linears, unrouted, revived = len(report.linears), len(report.unrouted), set(report.revived_zeros)
        yield
        if self.offload is not None:
            rows = [asdict(row) for row in report.linears[linears:]]
            revived_here = {name: count for name, count in report.revived_zeros.items() if name not in revived}
            self.offload.note(
                index,
                {"linears": rows, "unrouted": report.unrouted[unrouted:], "policy": report.unrouted_policy, "revived_zeros": revived_here},
            )  # fmt: skip

    def _resumed(self, index: int, target: SparsityTarget, report: PruningReport) -> bool:
        """Whether layer ``index`` was pruned by an earlier, interrupted offloaded run (then it is
        reported as that run reported it, not pruned again)."""
        if self.offload is None or not self.offload.finished(index):
            return False
        noted = self.offload.noted(index)
        if noted is not None:
            report.linears.extend(LinearReport(**row) for row in noted["linears"])
            report.revived_zeros.update(noted.get("revived_zeros", {}))  # absent from shards written before it was noted
            if noted["unrouted"]:
                report.record_unrouted(noted["unrouted"], noted["policy"])
            return True
        for name, linear in self.targets[index].items():  # a shard written before notes were kept: measured
            report.linears.append(_linear_report(name, index, target, linear.weight, self.part))
        return True

    def _description(self, action: str) -> str:
        part = "" if self.part == "language" and not self.adapter.upstream_parts else f" {self.part}"
        return f"{action}{part} ({self.config.method})"

    def _layer_targets(self, windows: CalibrationInputs | None) -> list[SparsityTarget]:
        if isinstance(self.target, NMPattern):
            return [self.target] * len(self.targets)
        # The allocation spreads the target over the layers that have linears to prune: a layer that
        # ``ignore`` keeps whole takes no share (its own allocation index is its rank among these).
        active = [index for index, linears in enumerate(self.targets) if linears]
        zeros: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # each layer's existing zeros, seen with its weights
        if self.allocation.observes_model:  # the whole model's loss, on the compute device
            with on_device([self.adapter.model], self.device):
                self.allocation.observe_model(self.adapter.model, windows, [self.targets[index] for index in active])
            zeros = {index: self._zeros_per_group(self.targets[index]) for index in active}
        elif self.allocation.requires_calibration:
            observe_layers(
                self.adapter, windows, self.device, self._allocation_observer(active, zeros), self._description("Allocating sparsity"),
                residency=self.offload.reading if self.offload else None, activation_device=self.activation_device,
            )  # fmt: skip
        targets: list[SparsityTarget] = [self.target] * len(self.targets)
        sizes = [sum(linear.weight.numel() for linear in self.targets[index].values()) for index in active]
        try:
            allocated = self.allocation.allocate(self.target, sizes)
        except ValueError as error:
            raise ValueError(f"the {self.part} part: {error}" if self.config.parts else str(error)) from None
        if self.moe_options.expert_sparsity == "load" and self.allocation.varies_per_layer:
            layers = self.adapter.decoder_layers()
            for index, sparsity in zip(active, allocated):  # the allocation moved layer targets: each must leave room for ±λ
                if len(self.adapter.experts(layers[index])) > 1:
                    source = f"layer {index}'s sparsity from allocation {self.config.allocation!r}"
                    _check_expert_spread(sparsity, self.moe_options.expert_deviation, source)
        if zeros:  # the allocation's promise is the weighted mean: a group past its share keeps it, the others give way
            # (after the spread check: a lowered target's experts below 0 keep their zeros, _linear_targets)
            shifted = shifted_for_existing_zeros(allocated, [zeros[index] for index in active], sizes, float(self.target))
            self._note_shift(allocated, shifted, active)
            allocated = shifted
        for index, sparsity in zip(active, allocated):
            targets[index] = sparsity
        return targets

    def _note_shift(self, allocated: list[float], shifted: list[float], active: list[int]) -> None:
        """Says why layer targets are below the allocation's (a report row of "target 0.00 %" beside a layer
        that ends well above it is otherwise a puzzle)."""
        if shifted == allocated:
            return
        drop = max(a - s for a, s in zip(allocated, shifted))
        note = (
            f"allocation {self.config.allocation!r}: the model already holds zeros past some layers' shares (kept, not "
            f"revived), so layer targets were lowered by up to {drop:.2%} for the pruned linears to end at {float(self.target):.2%}"
        )
        zeroed = [str(index) for index, (a, s) in zip(active, zip(allocated, shifted)) if s == 0.0 < a]
        if zeroed:
            note += f"; layer(s) {', '.join(zeroed)} only keep the zeros they had (target 0.00 %)"
        logger.info("%s", note)
        self.notes.append(note)

    def _zeros_per_group(self, linears: dict[str, nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero fraction and size of each group of weights the method prunes to the target on its own
        (``LayerPruner.zero_shares``: a linear, an output row, a column block), over the layer's linears."""
        shares = [self.method.pruner.zero_shares(self.method_options, linear.weight.detach() == 0) for linear in linears.values()]
        return torch.cat([fractions for fractions, _ in shares]), torch.cat([counts for _, counts in shares])

    def _allocation_observer(self, active: list[int], zeros: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        """Shows the allocation each dense layer's weights and input norms; notes in ``zeros`` each layer's existing
        zeros per comparison group (an offloaded layer is only here while it is observed)."""
        rank = {index: position for position, index in enumerate(active)}

        @contextmanager
        def observe(index: int, layer: nn.Module) -> Iterator[None]:
            if index not in rank:
                yield
                return
            linears = self.targets[index]
            norms = {name: ColumnNorms(linear.in_features, linear.weight.device) for name, linear in linears.items()}
            with self._feeding(layer, linears, lambda name, x: norms[name].add(x)):
                yield
            all_reduce_sum(*(n.squared for n in norms.values()))
            self.allocation.observe(rank[index], {name: linear.weight for name, linear in linears.items()}, norms)
            zeros[index] = self._zeros_per_group(linears)

        return observe

    def _pruning_visitor(self, layer_targets: list[SparsityTarget], report: PruningReport):
        """Feeds each linear's pruner the layer's calibration inputs, then prunes them all."""

        def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            if self._resumed(index, layer_targets[index], report):
                return
            linears = self.targets[index]
            try:
                pruners, tokens = self._fed_pruners(layer, inputs, linears, share=True)
            except InputsChangedInPlace as error:
                logger.info("%s: the layer is fed again, a statistic for each linear", error)
                pruners, tokens = self._fed_pruners(layer, inputs, linears, share=False)
            with self._noting(index, report):
                left_dense = self._handle_unrouted(pruners, [name for name, count in tokens.items() if count == 0], report)
                targets = self._linear_targets(layer, linears, tokens, layer_targets[index])
                _finish(pruners, self.part, index, targets, report)
                for name, linear in left_dense.items():  # counted at the target they were left dense under, as measured
                    report.linears.append(_linear_report(name, index, targets[name], linear.weight, self.part))

        return visit

    def _fed_pruners(
        self, layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear], share: bool
    ) -> tuple[dict[str, LayerPruner], dict[str, int]]:
        """The linears' pruners fed the layer's calibration inputs (summed over all processes), and the tokens each
        linear received; with ``share``, linears that read the same tensor hold one ``statistics`` object."""
        pruners = self._pruners(linears)
        shared = SharedStatistics({name: pruner.statistics for name, pruner in pruners.items() if pruner.statistics is not None})

        def sink(name: str, x: torch.Tensor) -> None:
            if share and name in shared:
                shared.receive(name, x)
            else:
                pruners[name].add_batch(x)

        with self._feeding(layer, linears, sink) as tokens:
            feed_layer(self.adapter, layer, inputs, shared.end_batch)
        if is_distributed():
            tokens = _summed_counts(tokens)
            shared.synchronize()
            for name, pruner in pruners.items():
                if name not in shared:
                    pruner.synchronize()
        for name, statistics in shared.statistics.items():
            pruners[name].statistics = statistics
        return pruners, tokens

    def _linear_targets(
        self, layer: nn.Module, linears: dict[str, nn.Linear], tokens: dict[str, int], target: SparsityTarget
    ) -> dict[str, SparsityTarget]:
        """Each linear's target: the layer's, or with router hints (``expert_sparsity="load"``) one
        per expert, linear in its load rank: target + λ·(1 − 2·rank/(E − 1)), rank 0 the least loaded, equal loads
        sharing their mean rank (the experts' mean stays the layer's target)."""
        targets = dict.fromkeys(linears, target)
        experts = self.adapter.experts(layer)
        if self.moe_options.expert_sparsity != "load" or len(experts) < 2:
            return targets
        expert_of = {id(module): e for e, expert in enumerate(experts) for module in expert.modules()}
        load = [0] * len(experts)
        for name, linear in linears.items():
            if id(linear) in expert_of:
                load[expert_of[id(linear)]] = max(load[expert_of[id(linear)]], tokens[name])
        ranks = mean_ranks(torch.tensor(load)).tolist()  # equal loads (experts no token reached, often several) alike
        deviation = self.moe_options.expert_deviation
        for name, linear in linears.items():
            if id(linear) in expert_of:
                # at least 0: on a pruned model pruned again the layer's target may be lowered below λ (its zeros stay)
                targets[name] = max(target + deviation * (1 - 2 * ranks[expert_of[id(linear)]] / (len(experts) - 1)), 0.0)
        return self._shifted_for_layer_zeros(linears, targets, float(target))

    def _shifted_for_layer_zeros(self, linears: dict[str, nn.Linear], targets: dict[str, float], target: float) -> dict[str, float]:
        """On a pruned model pruned again each linear keeps its zeros past its target, so experts spread to target ± λ
        end the layer above where the layer's one target would (the end ``_layer_targets`` counted on when it lowered
        the targets for existing zeros): one common shift of the linears' targets brings the layer back to it."""
        names = list(linears)
        groups = [self._zeros_per_group({name: linears[name]}) for name in names]
        sizes = [linears[name].weight.numel() for name in names]
        uniform_end = sum(float((fractions.clamp(min=target) * counts).sum()) for fractions, counts in groups) / sum(sizes)
        shifted = shifted_for_existing_zeros([targets[name] for name in names], groups, sizes, uniform_end)
        return dict(zip(names, shifted))

    @contextmanager
    def _feeding(
        self, layer: nn.Module, linears: dict[str, nn.Linear], sink: Callable[[str, torch.Tensor], None]
    ) -> Iterator[dict[str, int]]:
        """While active, each run of ``layer`` passes each linear's input to ``sink`` (MoE expert inputs scaled by
        routing weight unless disabled); gives the tokens each linear received."""
        tokens = dict.fromkeys(linears, 0)
        weighted = self.moe_options.routing_weighted
        with self.adapter.routed_tokens(layer) as routing:

            def receive(name: str, x: torch.Tensor) -> None:
                tokens[name] += x.numel() // x.shape[-1]
                sink(name, routing.scale(linears[name], x) if weighted else x)

            with feeding_inputs(linears, receive):
                yield tokens

    def _handle_unrouted(self, pruners: dict[str, LayerPruner], unrouted: list[str], report: PruningReport) -> dict[str, nn.Linear]:
        """Experts the router never chose on the calibration set: prune data-free or leave dense (returned), and report."""
        if not unrouted:
            return {}
        policy = self.moe_options.unrouted_experts
        report.record_unrouted(unrouted, policy)
        left_dense = {}
        for name in unrouted:
            linear = pruners.pop(name).linear
            if policy == "magnitude":
                pruners[name] = METHODS.get("magnitude").create(linear, MagnitudeOptions())
            else:
                left_dense[name] = linear
        return left_dense


@dataclass
class StructuredRun:
    """A structured method bound to a model; sizes are measured around it and the config rewritten after."""

    adapter: DecoderAdapter
    method: StructuredMethod
    name: str  # PruningConfig.method
    part: str = "language"

    @classmethod
    def plan(cls, adapter: DecoderAdapter, config: PruningConfig, device: torch.device) -> "StructuredRun":
        spec = METHODS.get(config.method)
        target = config.part_targets()["language"]
        method = spec.structured(adapter, target, config.ignore, config.build_method_options(), device, config.seed)
        try:  # the hooks the result is recorded and reloaded with: before the method changes any weight
            adapter.require(*STRUCTURE_RECORDING_HOOKS)
            check_shape_hooks(adapter)
            method.check()
            if method.always_records_layer_shapes():
                adapter.require("reshape_layer")
        except UnsupportedArchitecture as error:
            raise UnsupportedArchitecture(f"method {config.method!r}: {error}") from None
        return cls(adapter, method, config.method)

    def execute(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        model = self.adapter.model
        report.parameters_before, report.decoder_parameters_before = count_parameters(model), self._decoder_parameters()
        report.macs_per_token_before = count_macs_per_token(model)
        kept = kept_modules(model, self.method.ignore)
        self.method.prune(windows, report)
        check_kept(model, kept, self.name)
        report.shapes = record_structure(self.adapter)
        report.parameters_after, report.decoder_parameters_after = count_parameters(model), self._decoder_parameters()
        report.macs_per_token_after = count_macs_per_token(model)

    def _decoder_parameters(self) -> int:
        return sum(count_parameters(layer) for layer in self.adapter.decoder_layers())


def _width_remedy(adapter: DecoderAdapter, name: str, linear: nn.Linear, target: SparsityTarget) -> str:
    """The ways out for an N:M target that a linear's input width refuses, for the error: leaving such linears dense,
    and, where the model's record holds a structured step that chose this MLP width (its ``round_to`` not a multiple
    of M), running it again with one. ``round_to`` sets MLP widths only (heads go whole): an attention width, or the
    model's own, is only offered ``ignore``."""
    if not isinstance(target, NMPattern):
        return ""
    ignore = f"leave these linears dense: add '*.{name.rsplit('.', 1)[-1]}' to PruningConfig.ignore"
    step = _step_choosing_widths(adapter, target)
    mlps = [adapter.mlp(layer) for layer in adapter.decoder_layers()]  # the step removed units: the adapter has them
    if step is None or not any(linear is module for mlp in mlps if mlp is not None for module in mlp.block.modules()):
        return f"; {ignore}"
    return (
        f"; the model's recorded {step.method!r} step (sparsity {step.sparsity}, round_to={step.method_options['round_to']}) "
        f"chose this width: run it again with PruningConfig.method_options.round_to={target.m} (or a multiple of "
        f"{target.m}), or {ignore}"
    )


def _step_choosing_widths(adapter: DecoderAdapter, target: NMPattern) -> PruningConfig | None:
    """The model's last recorded structured step that chose MLP widths with a ``round_to`` not a multiple of M."""
    for step in reversed(recorded_steps(getattr(adapter.model, "config", None))):
        recorded = readable_step(step)
        if recorded is None:
            return None
        round_to = recorded.method_options.get("round_to")
        chose_mlp_widths = recorded.method_options.get("components") != "attention"
        if METHODS.get(recorded.method).structured and isinstance(round_to, int) and round_to % target.m and chose_mlp_widths:
            return recorded
    return None


def _check_some_target(targets: list[dict[str, nn.Linear]], part: str, adapter: DecoderAdapter, config: PruningConfig) -> None:
    if config.ignore and not any(targets):
        raise ValueError(f"PruningConfig.ignore {config.ignore!r} leaves no linear of the {part} part to prune")
    if not any(targets):  # e.g. Gemma 3's projector, a bare weight matrix
        raise ValueError(
            f"the {part} part of {type(adapter.model).__name__} holds no linear to prune; remove it from PruningConfig.parts"
        )


@dataclass
class ModelRun:
    """A whole-model method (LLM Surgeon) bound to the linears the config targets."""

    method: ModelPruner
    part: str = "language"

    @classmethod
    def plan(cls, adapter: DecoderAdapter, config: PruningConfig, device: torch.device) -> "ModelRun":
        spec = METHODS.get(config.method)
        target = config.part_targets()["language"]
        moe_options = config.build_moe_options()
        linears = _target_linears(adapter, config.ignore, include_routers=moe_options.prune_router)
        _check_some_target(linears, "language", adapter, config)
        method = spec.model_pruner(adapter, target, linears, config.build_method_options(), device, moe_options)
        method.check()
        return cls(method)

    def execute(self, windows: torch.Tensor, report: PruningReport) -> None:
        self.method.prune(windows, report)


def planned_linears(adapter: DecoderAdapter, config: PruningConfig, checked: bool = True) -> dict[str, nn.Linear]:
    """The linears an unstructured ``config`` prunes in the adapter's model, by qualified name. ``checked``: after
    the method's checks of each (N:M widths), which an earlier step's config may fail on a model reshaped since."""
    routers = config.build_moe_options().prune_router  # as the runs take them
    if METHODS.get(config.method).model_pruner:
        parts = [adapter]
    elif checked:
        runs = LayerwiseRun.plan_parts(adapter, config, torch.device("cpu"))
        return {name: linear for run in runs for layer in run.targets for name, linear in layer.items()}
    else:
        parts = [part for name, part in adapter.parts().items() if name in config.part_targets()]
    return {name: linear for part in parts for layer in _target_linears(part, config.ignore, routers) for name, linear in layer.items()}


def _target_linears(adapter: DecoderAdapter, ignore: list[str], include_routers: bool = False) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, the linears to prune keyed by qualified name, minus ``ignore`` matches."""
    return [
        {name: linear for name, linear in linears.items() if not is_ignored(name, ignore)}
        for linears in adapter.qualified_prunable_linears(include_routers)
    ]


def _summed_counts(tokens: dict[str, int]) -> dict[str, int]:
    """Each linear's calibration tokens over all processes (an expert may be routed on another rank only)."""
    counts = torch.tensor(list(tokens.values()), dtype=torch.float64)
    all_reduce_sum(counts)
    return dict(zip(tokens, (int(c) for c in counts.tolist())))


def _check_expert_spread(target: float, deviation: float, source: str) -> None:
    """Router hints give experts target ± λ; all of them must be sparsities a linear can have, or the experts'
    mean would no longer be the target."""
    if target - deviation < 0 or target + deviation > MAX_EXPERT_SPARSITY:
        raise ValueError(
            f"PruningConfig.moe_options.expert_sparsity='load': {source} {target:.4g} ± expert_deviation {deviation} leaves "
            f"[0, {MAX_EXPERT_SPARSITY}]; lower expert_deviation (or the allocation's spread of layer sparsities)"
        )


def _finish(
    pruners: dict[str, LayerPruner], part: str, index: int, targets: dict[str, SparsityTarget], report: PruningReport
) -> None:
    for name, pruner in pruners.items():
        try:
            pruner.prune(targets[name])
        except NonFiniteStatistics as error:
            raise NonFiniteStatistics(f"{name}: {error}") from None
        if pruner.revived_zeros:
            report.revived_zeros[name] = pruner.revived_zeros
        report.linears.append(_linear_report(name, index, targets[name], pruner.linear.weight, part))


def _linear_report(name: str, index: int, target: SparsityTarget, weight: torch.Tensor, part: str) -> LinearReport:
    """A linear's line in the report: its target as a fraction, and the sparsity its weight now has."""
    fraction = target.sparsity if isinstance(target, NMPattern) else target
    return LinearReport(name, index, fraction, int((weight == 0).sum()) / weight.numel(), weight.numel(), part)

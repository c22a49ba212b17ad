"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers": Fisher-based mask
search, mask rearrangement and mask tuning, without retraining — adapted to decoder LLMs.

Every attention head and MLP channel gets a mask variable m = 1. With the empirical Fisher of the
masks, I = E_x[g gᵀ] with g = ∂L/∂m on one calibration sample, zeroing a set Z of masks raises
the loss by about ½ m_Zᵀ I m_Z (the gradient term vanishes at a trained model; Eq. 3–5):

1. Mask search (Alg. 1): with the diagonal of I as each unit's importance, for every number of
   heads removed (least important first) remove the least important channels until the budget is
   met, and keep the split that removes the least importance.
2. Mask rearrangement (Sec. 4.2): within each layer the full block of I counts the interactions
   between its masks; the layer's removed set, its size fixed, is improved by swapping a removed
   and a kept unit while that lowers m_Zᵀ I_l m_Z: a swap local search on the paper's objective (the
   authors' code makes one greedy pass, adding the next unit and dropping the one that helps most; the
   swaps reach the optimum more often on random blocks, and never end worse than the diagonal choice).
3. Mask tuning (Sec. 4.3): layer by layer, the kept units' masks become real numbers fitted by
   least squares so that the pruned sublayer reproduces the dense sublayer's output on calibration
   data (the paper solves with LSMR; here the normal equations, ridge-damped), then are folded
   into the output projection's columns.

Adaptation to decoders (the paper prunes BERT and DistilBERT):
- The constraint is the fraction of decoder-layer parameters, as for every structured method here;
  per token, a head's or channel's FLOPs are proportional to its parameters (the attention-score
  FLOPs, which grow with context length, are not counted).
- A head unit is a key/value group with its query heads — a single head when the model has no
  grouped-query attention: the only removal that keeps a valid GQA layout with free per-layer counts.
- L is the causal-LM loss of one calibration window, so each window is one Fisher sample; only the
  masks take gradients (no weight gradient is stored), with full-vocabulary logits for one window
  at a time. Rearrangement keeps each window's mask gradients (windows × n per component, I = GᵀG / windows)
  and forms one layer's n × n block at a time (a block per layer held at once was 6 GiB per layer in float64 for
  a 70B model's 28,672 channels: 490 GiB).
- Mask tuning runs in the sequential engine on the inputs of the already-pruned model: attention
  first, then the MLP on what the tuned attention feeds it; the target is the dense sublayer's
  output on those same inputs. The authors' code fits instead the dense model's residual stream after
  the sublayer minus the pruned model's stream before it (so each layer also corrects the error of the
  layers below, as K-prune's tuning here does), with a free bias for attention, no tuning of the first
  layer's attention, and a stop when a scale leaves ±10; this keeps each sublayer's own output, ridge-damped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration import LayerInputs, feed_layer, walk_layers
from ..calibration.engine import on_device
from ..calibration.gradients import grad_only, overflowed, window_losses, with_loss_scale
from ..options import check_choice, check_round_to, option
from ..report import PruningReport
from .base import StructuredMethod, register_structured_method
from .units import (
    COMPONENTS, Component, components_option, group_columns, group_units, layer_parameters, output_projection,
    round_to_option,
)


def tune_option() -> Any:
    """The ``tune`` option of the methods that finish with Kwon et al.'s mask tuning (``MaskSearch._tuned_scales``)."""
    return option(True, "Mask tuning: least-squares scales of the kept units so each sublayer reproduces its dense output.")


def tuning_damping_option() -> Any:
    """The ``damping`` of that mask tuning's least squares."""
    return option(
        1e-3, "Ridge damping of the mask-tuning least squares, relative to the mean of their diagonal.", applies_when={"tune": (True,)}
    )


@dataclass(frozen=True)
class MaskSearchOptions:
    components: str = components_option()
    round_to: int = round_to_option()
    rearrange: bool = option(True, "Mask rearrangement: re-choose each layer's removed units with its full Fisher block.")
    tune: bool = tune_option()
    damping: float = tuning_damping_option()

    def __post_init__(self) -> None:
        check_choice("components", self.components, COMPONENTS)
        check_round_to(self.round_to)
        if self.damping < 0:
            raise ValueError(f"method_options.damping must be >= 0, got {self.damping}")


@register_structured_method("mask_search", options=MaskSearchOptions)
class MaskSearch(StructuredMethod[MaskSearchOptions]):
    """Kwon et al.'s Fisher mask search, rearrangement and least-squares mask tuning of heads and MLP channels."""

    importance_name = "Fisher importance"

    def check(self) -> None:
        self.units = group_units(self, self.options.components, self.options.round_to)
        self.units.plan_counts()  # raises for a budget the units cannot reach

    def unit_importance(self, windows: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per component, each unit's importance (the loss its removal adds) and what rearrangement refines the
        choice with: the per-window gradients G whose GᵀG is the layer's Fisher block (a vector: no rearrangement)."""
        with on_device([self.adapter.model], self.device):  # whole-model gradients run on the compute device
            fisher = mask_fisher(self.adapter, self.units.components, windows, per_window=self.options.rearrange)
        home = next(self.adapter.model.parameters()).device
        fisher = [f.to(home) for f in fisher]
        return [(f.square().sum(0) / 2).float() if f.dim() == 2 else f / 2 for f in fisher], fisher

    def unit_counts(self, importance: list[torch.Tensor]) -> list[int]:
        """Units to remove per component: Alg. 1's search over the whole model's budget."""
        components = self.units.components
        budget = self.sparsity * sum(layer_parameters(self.adapter, layer) for layer in self.adapter.decoder_layers())
        return search_counts(importance, [c.unit_parameters for c in components], [c.removable for c in components],
                             [c.kind for c in components], budget)  # fmt: skip

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        components = self.units.components
        importance, fisher = self.unit_importance(windows)
        layers = self.adapter.decoder_layers()
        counts = self.unit_counts(importance)
        for component, gradients, count in zip(components, fisher, counts):
            count = self.units.rounded(component, count)
            removed = rearranged(gradients.T @ gradients if gradients.dim() == 2 else gradients, count)  # one block at a time
            component.removed = count
            component.scores = torch.ones(gradients.shape[-1])
            component.scores[removed.cpu()] = 0  # the cut removes the lowest-scored units
        for kind in ("attention", "mlp"):
            report.layer_scores[f"removed {self.importance_name} ({kind})"] = [
                float(sum(s[c.scores == 0].sum() for c, s in zip(components, importance) if c.layer == i and c.kind == kind))
                for i in range(len(layers))
            ]
        names = self.adapter.layer_names()

        def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            for component in (c for c in components if c.layer == index and c.removed):
                scales = self._tuned_scales(layer, component, inputs) if self.options.tune else None
                described = self.units.cut(layer, component)
                if scales is not None:
                    _scale_units(output_projection(self.adapter, layer, component), group_columns(self.adapter, layer, component), scales)
                report.removed.append(f"{names[index]} {component.kind}: {described}")

        walk_layers(self.adapter, windows, self.device, visit, "Mask tuning" if self.options.tune else "Removing units")

    # --- mask tuning -------------------------------------------------------------------------

    def _tuned_scales(self, layer: nn.Module, component: Component, inputs: LayerInputs) -> torch.Tensor:
        """Least-squares scales of the kept units: min_m ‖Σ_u m_u X_u W_uᵀ − X Wᵀ‖² over calibration tokens.

        The normal equations need no unit's output over the tokens: ⟨X_u W_uᵀ, X_v W_vᵀ⟩ is the sum of
        (XᵀX ⊙ WᵀW) over u's and v's columns (stacking the outputs was [units, tokens, hidden] per batch for heads).
        MLP channels (one column each) accumulate the kept block directly; heads accumulate XᵀX (hidden × hidden)."""
        consumer = output_projection(self.adapter, layer, component)
        width = group_columns(self.adapter, layer, component)  # unit u: the output projection's columns u·width ... (u+1)·width − 1
        kept = torch.nonzero(component.scores).flatten().tolist()
        weight = consumer.weight.detach().float()
        gram = torch.zeros(len(kept), len(kept), dtype=torch.float64, device=weight.device)
        cross = torch.zeros(len(kept), dtype=torch.float64, device=weight.device)
        inputs_gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device) if component.kind != "mlp" else None

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, weight.shape[1])
            if inputs_gram is not None:
                inputs_gram.add_((x.T @ x).double())
                return
            xk, wk = x[:, kept], weight[:, kept]
            gram.add_(((xk.T @ xk) * (wk.T @ wk)).double())
            cross.add_((((x @ weight.T) @ wk) * xk).sum(0).double())

        handle = consumer.register_forward_pre_hook(record)
        try:
            feed_layer(self.adapter, layer, inputs)
        finally:
            handle.remove()
        if inputs_gram is not None:
            products = inputs_gram.mul_(weight.T.double() @ weight.double())  # [i, j]: ⟨column i's output, column j's⟩
            index = (torch.tensor(kept, device=weight.device)[:, None] * width + torch.arange(width, device=weight.device)).flatten()
            gram = products[index][:, index].reshape(len(kept), width, len(kept), width).sum((1, 3))
            cross = products[index].reshape(len(kept), width, -1).sum((1, 2))
        diagonal = torch.arange(len(kept), device=gram.device)
        gram[diagonal, diagonal] += self.options.damping * gram.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.solve(gram, cross).float()


def _masking(mask: torch.Tensor, repeat: int):
    """A pre-hook multiplying a consumer's input by ``mask`` (each entry over ``repeat`` columns), in the
    input's dtype: the fp32 mask would make a half model's input fp32."""
    return lambda _module, args: ((args[0] * mask.repeat_interleave(repeat)).to(args[0].dtype),)


def mask_fisher(adapter: Any, components: list[Component], windows: torch.Tensor, per_window: bool) -> list[torch.Tensor]:
    """Per component, the mean over windows of g² for the gradient g of the window's LM loss with respect to the
    masks of its units (all 1: the model's output is unchanged), or (``per_window``) every window's g / √windows as
    the rows of G, so that GᵀG is the mean of g gᵀ (windows × units floats, not units²)."""
    layers = adapter.decoder_layers()
    masks, handles = [], []
    for component in components:
        layer = layers[component.layer]
        if component.kind == "attention":
            layout = adapter.attention(layer)
            consumer, repeat = layout.output, layout.heads_per_group * layout.head_dim
        else:
            consumer, repeat = component.consumers[0], 1
        units = consumer.in_features // repeat
        mask = torch.ones(units, device=consumer.weight.device, dtype=torch.float32, requires_grad=True)
        handles.append(consumer.register_forward_pre_hook(_masking(mask, repeat)))
        masks.append(mask)

    def run(scale: float) -> list[torch.Tensor] | None:
        squares = [torch.zeros(len(m), dtype=torch.float64, device=m.device) for m in masks]
        gradients: list[list[torch.Tensor]] = [[] for _ in masks]
        with grad_only(adapter.model, []):
            for loss in window_losses(adapter.model, windows, "Mask Fisher information"):
                for square, rows, gradient in zip(squares, gradients, torch.autograd.grad(loss * scale, masks)):
                    g = gradient.detach().double()
                    if per_window:
                        rows.append(g.cpu())
                    else:
                        square.add_(g.square())
        if per_window:
            stacked = [torch.stack(rows) / (scale * len(windows) ** 0.5) for rows in gradients]
            return None if overflowed(stacked) else stacked
        return None if overflowed(squares) else [(square / (scale**2 * len(windows))).float().cpu() for square in squares]

    try:
        return with_loss_scale(adapter.model, run)
    finally:
        for handle in handles:
            handle.remove()


def search_counts(
    importance: list[torch.Tensor], costs: list[int], caps: list[int], kinds: list[str], budget: float
) -> list[int]:
    """Kwon et al.'s Alg. 1 on a parameter budget: for every number of head units removed (least
    important first, across layers), remove the least important channels until ``budget`` is met;
    return each component's removed count for the split that removes the least importance.
    ``caps`` keeps at least one unit of every component."""
    ranked: dict[str, list[tuple[float, int]]] = {"attention": [], "mlp": []}
    for index, (scores, cap, kind) in enumerate(zip(importance, caps, kinds)):
        ranked[kind] += [(float(s), index) for s in torch.sort(scores).values[:cap]]
    heads, channels = (sorted(ranked[kind]) for kind in ("attention", "mlp"))
    channel_cost = torch.tensor([0.0] + [costs[i] for _, i in channels]).cumsum(0)
    channel_loss = torch.tensor([0.0] + [s for s, _ in channels]).cumsum(0)
    best, removed_heads, head_cost, head_loss = None, 0, 0.0, 0.0
    while True:
        needed = budget - head_cost
        fitting = int(torch.searchsorted(channel_cost, torch.tensor(needed)))  # fewest channels reaching the budget
        if needed <= 0:
            fitting = 0
        if fitting < len(channel_cost):
            loss = head_loss + float(channel_loss[fitting])
            if best is None or loss < best[0]:
                best = (loss, removed_heads, fitting)
        if needed <= 0 or removed_heads == len(heads):
            break
        head_cost += costs[heads[removed_heads][1]]
        head_loss += heads[removed_heads][0]
        removed_heads += 1
    if best is None:
        raise ValueError(
            f"PruningConfig.sparsity: the budget of {budget:,.0f} parameters cannot be met while keeping one unit per "
            "component; lower the sparsity"
        )
    counts = [0] * len(importance)
    for _, index in heads[: best[1]] + channels[: best[2]]:
        counts[index] += 1
    return counts


def rearranged(block: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` units to remove, improved from the diagonal choice by swaps that lower m_Zᵀ I m_Z
    (Kwon et al. Sec. 4.2); ``block`` is one layer's Fisher block (a vector: no rearrangement)."""
    if block.dim() == 1 or count == 0 or count == block.shape[0]:
        return torch.argsort(block if block.dim() == 1 else block.diagonal(), stable=True)[:count]
    fisher = block.double()
    diagonal = fisher.diagonal()
    removed = torch.zeros(fisher.shape[0], dtype=torch.bool)
    removed[torch.argsort(diagonal, stable=True)[:count]] = True
    tolerance = -1e-12 * diagonal.abs().max()
    for _ in range(fisher.shape[0]):
        inside, outside = torch.nonzero(removed).flatten(), torch.nonzero(~removed).flatten()
        coupling = fisher @ removed.to(fisher.device, fisher.dtype)  # s_x = Σ_{z∈Z} I_xz, without copying Z's columns
        # Swapping i ∈ Z for j ∉ Z changes the objective by I_ii − 2 s_i + I_jj + 2 s_j − 2 I_ij: one |Z| × (n − |Z|)
        # buffer, built in place (the expression form held four such, 6.5 GB per swap at 28,672 channels).
        leave = diagonal[inside] - 2 * coupling[inside]
        enter = diagonal[outside] + 2 * coupling[outside]
        change = fisher[inside[:, None], outside[None, :]].mul_(-2).add_(leave[:, None]).add_(enter[None, :])
        best = int(torch.argmin(change))
        if change.view(-1)[best] >= tolerance:
            break
        removed[inside[best // len(outside)]] = False
        removed[outside[best % len(outside)]] = True
    return torch.nonzero(removed).flatten()


def _scale_units(consumer: nn.Linear, width: int, scales: torch.Tensor) -> None:
    """Fold tuned masks into the output projection: unit u's ``width`` input columns times m_u."""
    with torch.no_grad():
        consumer.weight.mul_(scales.to(consumer.weight.device).repeat_interleave(width))

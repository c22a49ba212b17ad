"""KCM, Kernelized Convex Masking (Nova, Dai & Schuurmans, "Gradient-Free Structured Pruning with
Unlabeled Data", ICML 2023, arXiv 2303.04185): heads and MLP channels ranked without labels or
gradients, by R2D2 — a weight-only representative rank (R2) combined with a data-driven rank (D2)
— then removed under a parameter budget, with Kwon et al.'s least-squares mask tuning.

Sources. The authors released no code and the body of the paper (Algorithms 1–2) could not be read
here; what follows is its abstract and Figure 1 ("R2D2 combines the ranks of the Representative
Ranking (R2) and Data-Driven (D2) rank"), read together with a public third-party reimplementation
built on Kwon et al.'s code. Where that reimplementation makes a choice, it is followed and named:

- R2 (Alg. 2, "Representative Ranking"). A unit is the vector of its output-projection column (a
  down_proj column for an MLP channel; an o_proj column for each dimension of a head). With the
  Gaussian kernel K_ij = exp(−‖w_i − w_j‖² / σ²), the kernelized convex (self-expressive)
  approximation min_{C ≥ 0} ‖Φ − ΦC‖²_F = tr K − 2 tr KC + tr CᵀKC is solved by the damped
  multiplicative update C ← C ⊙ √(K ⊘ KC) from C = 1/n. Its optimum is the trivial C = I, so the
  update is stopped early (relative change < ``tolerance``): units that the others cannot express
  (isolated in kernel space, on the hull) have grown their self-coefficient C_uu fastest, while
  redundant units are explained by their neighbours. R2(u) = C_uu. The reimplementation measures
  the change as |Σ(C' − C)| / Σ|C|, which cancels signs; here it is Σ|C' − C| / Σ|C|. On SmolLM2's
  MLPs the ranking at tolerance 1e-2 matches that at 1e-3 (Spearman ρ = 0.999).
- D2 ("Data-Driven rank"). ‖x_u‖₂, the norm over all calibration tokens of the unit's input to
  the output projection (the MLP's gated activation, a head's context vector) in the dense model.
- A head's R2 and D2 are the means over its dimensions (a key/value group's: over its query heads'
  dimensions). R2D2 combines them within each layer and component: by default the mean of their
  normalised ranks (the paper's caption: "combines the ranks"), or with ``combine="product"`` the
  product of their min–max normalised values (the reimplementation's). On SmolLM2 (20 %, quick
  protocol) the ranks gave perplexity 184 and the product 254: activation norms are heavy-tailed, so
  after min–max a few units take the whole D2 range and the product of the rest is near zero.
- Masking under a budget, then Kwon et al.'s least-squares mask tuning, layer by layer against the
  dense sublayer's output (as in ``mask_search``, which the reimplementation also borrows).

Adaptation to decoders (the paper prunes BERT and DistilBERT): the budget is the fraction of the
decoder layers' parameters, and a head unit is a key/value group with its query heads, as in
``mask_search``. The reimplementation spreads the budget with Kwon et al.'s Alg. 1 over R2D2 across
the model (``allocation="global"``), but scores normalised per layer compare neither across layers
nor between a head and a channel: every layer has a unit at 0, and a head removed at the same
score saves far more parameters than a channel. On SmolLM2 at 20 % that search removes 55 of the
90 key/value groups and all but 4 channels of one MLP (perplexity 2,391 on the quick protocol). The default,
``allocation="layer"``, removes the same fraction of every layer's parameters (key/value groups
first, by rounding; MLP channels make up the rest), as LLM-Pruner and Wanda-sp do, and R2D2 picks
the units within each layer. Memory: one n × n kernel and coefficient matrix per component on the calibration
device (n = intermediate size: 1,536 for SmolLM2, 11,008 for Llama-2-7B — 0.5 GB each in fp32);
each multiplicative step is one n³ product. No gradient is taken and no logits are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager

import torch
from torch import nn

from ..calibration import feeding_inputs, observe_layers
from ..options import check_choice, check_round_to, option
from ..statistics import ColumnNorms, mean_ranks
from .base import register_structured_method
from .mask_search import MaskSearch, tune_option, tuning_damping_option
from .units import COMPONENTS, components_option, group_columns, output_projection, round_to_option


@dataclass(frozen=True)
class KCMOptions:
    components: str = components_option()
    round_to: int = round_to_option()
    kernel_width: float = option(0.0, "σ of the Gaussian kernel over output-projection columns; 0: the layer's median pairwise distance.")
    tolerance: float = option(1e-2, "Stop the multiplicative updates of R2 when the relative change of C falls below this.")
    max_iterations: int = option(100, "At most this many multiplicative updates of R2 per component.")
    combine: str = option("rank", "R2D2: 'rank' (the mean of the normalised ranks of R2 and D2) or 'product' of their min–max normalised values.")
    allocation: str = option("layer", "'layer': every layer loses the same fraction; 'global': Kwon et al.'s search across the model.")
    tune: bool = tune_option()
    damping: float = tuning_damping_option()

    def __post_init__(self) -> None:
        check_choice("components", self.components, COMPONENTS)
        check_round_to(self.round_to)
        check_choice("combine", self.combine, ("product", "rank"))
        check_choice("allocation", self.allocation, ("layer", "global"))
        for name in ("kernel_width", "damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"method_options.{name} must be >= 0, got {getattr(self, name)}")
        if self.tolerance <= 0:
            raise ValueError(f"method_options.tolerance must be > 0, got {self.tolerance}")
        if self.max_iterations < 1:
            raise ValueError(f"method_options.max_iterations must be >= 1, got {self.max_iterations}")


@register_structured_method("kcm", options=KCMOptions)
class KernelizedConvexMasking(MaskSearch):
    """KCM: heads and MLP channels ranked by R2D2 from weights and unlabeled data, removed per layer (or by
    Kwon et al.'s search) and compensated by their mask tuning."""

    importance_name = "R2D2 importance"

    def check(self) -> None:
        super().check()
        if self.options.allocation == "layer":
            self.units.layer_counts(option="allocation")  # raises for a layer that would lose every unit

    def unit_counts(self, importance: list[torch.Tensor]) -> list[int]:
        if self.options.allocation == "global":
            return super().unit_counts(importance)
        return [component.removed for component in self.units.components]

    def unit_importance(self, windows: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        components = self.units.components
        norms = self._activation_norms(windows)
        layers = self.adapter.decoder_layers()
        importance = []
        for component, column_norms in zip(components, norms):
            layer = layers[component.layer]
            weight = output_projection(self.adapter, layer, component).weight.detach().to(self.device, torch.float32)
            width = group_columns(self.adapter, layer, component)
            representative = representative_rank(weight.T, self.options.kernel_width, self.options.tolerance, self.options.max_iterations)
            r2 = _normalised(representative.cpu().reshape(-1, width).mean(1))
            d2 = _normalised(column_norms.cpu().reshape(-1, width).mean(1))
            r2d2 = (_normalised(_ranks(r2)) + _normalised(_ranks(d2))) / 2 if self.options.combine == "rank" else r2 * d2
            # a unit whose output-projection columns are all zero adds nothing: removing it is free, so it goes first
            dead = (weight == 0).all(0).cpu().reshape(-1, width).all(1)
            importance.append(r2d2.masked_fill(dead, -1.0))
        return importance, importance

    def _activation_norms(self, windows: torch.Tensor | None) -> list[torch.Tensor]:
        """D2: ‖x_c‖₂ over the calibration tokens of every output-projection input column, in the dense model."""
        components = self.units.components
        statistics: dict[int, ColumnNorms] = {}

        def observe(index: int, layer: nn.Module) -> ContextManager[None]:
            consumers = {i: output_projection(self.adapter, layer, c) for i, c in enumerate(components) if c.layer == index}
            for i, consumer in consumers.items():
                statistics[i] = ColumnNorms(consumer.in_features, consumer.weight.device)
            return feeding_inputs(consumers, lambda i, x: statistics[i].add(x))

        observe_layers(self.adapter, windows, self.device, observe, "KCM activation norms (D2)")
        return [statistics[i].norms() for i in range(len(components))]


def representative_rank(units: torch.Tensor, kernel_width: float, tolerance: float, max_iterations: int) -> torch.Tensor:
    """R2: the diagonal of the early-stopped kernelized convex self-expression C ← C ⊙ √(K ⊘ KC),
    one score per row of ``units``; ``kernel_width`` 0 takes the median pairwise distance."""
    distances = torch.cdist(units, units)
    if kernel_width == 0:
        off_diagonal = distances[~torch.eye(len(units), dtype=torch.bool, device=units.device)]
        kernel_width = float(off_diagonal.median()) if off_diagonal.numel() else 1.0
    kernel = torch.exp(-(distances / max(kernel_width, 1e-12)).square())  # not / width²: a float overflows past 1e154
    coefficients = torch.full_like(kernel, 1.0 / len(units))
    for _ in range(max_iterations):
        # K_ij underflows to 0 between distant units, and with it (KC)_ij: 0/0 must stay 0.
        updated = coefficients * torch.sqrt(kernel / (kernel @ coefficients).clamp_min(torch.finfo(kernel.dtype).tiny))
        change = float((updated - coefficients).abs().sum() / coefficients.abs().sum())
        coefficients = updated
        if change < tolerance:
            break
    return coefficients.diagonal()


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    """Min–max normalisation to [0, 1] (all equal: all 1)."""
    low, high = scores.min(), scores.max()
    return (scores - low) / (high - low) if high > low else torch.ones_like(scores)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    return mean_ranks(scores).float()  # tied scores (dead channels: R2 0) rank alike, not by position


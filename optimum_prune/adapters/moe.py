"""Sparse mixture-of-experts decoders with a softmax top-k router: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Each of these transformers classes runs its MoE block the same way: router logits → softmax →
top-k (renormalised when the config says so) → every expert gets only the tokens routed to it,
and its output is scaled by their routing weights. Calibration statistics for an expert must
therefore come from its routed tokens only, and the pruning error that matters is the error
*after* that scaling. ``routed_tokens`` gives both: expert linears already see only their tokens
(the block indexes them), and ``TokenRouting.scale`` multiplies each token's input by its
routing weight, so Wanda's ‖X‖ and SparseGPT's Hessian weigh tokens as the block output does
(Qwen2-MoE's always-on shared expert: by its per-token sigmoid gate).

Routers (and Qwen2-MoE's shared-expert gate) stay dense unless ``moe_options.prune_router``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    MixtralForCausalLM,
    MixtralModel,
    OlmoeForCausalLM,
    OlmoeModel,
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
)

from ..quantized import is_linear
from ..structure.shapes import LayerShape
from ..structure.surgery import keep_output_features
from ..tensors import tensor_identity
from .base import DecoderStackAdapter, TokenRouting, UnsupportedArchitecture, register_adapter


def _is_moe_layer(config: Any, index: int) -> bool:
    """Whether layer ``index`` of a stock model has a sparse MoE block: Qwen-MoE configs can make
    some layers dense (``mlp_only_layers``, ``decoder_sparse_step``), as their decoder layers decide."""
    if index in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (index + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0


def top_k_routing(logits: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, selected experts), each [tokens, top_k], as these blocks route: softmax, top-k, renormalise."""
    probabilities = F.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1, dtype=torch.float)
    weights, selected = torch.topk(probabilities, top_k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, selected


def expert_tokens(selected: torch.Tensor, expert: int, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, token) of each token routed to ``expert``, in the order these blocks hand them over
    (``torch.where`` over [top_k, tokens]); ``kept`` masks out skipped selections."""
    chosen = selected.T == expert
    return torch.where(chosen if kept is None else chosen & kept.T)


@dataclass
class _BlockRouting:
    """The last routing decision of one MoE block, for the tokens it just received."""

    weights: torch.Tensor | None = None  # [tokens, top_k]
    selected: torch.Tensor | None = None  # [tokens, top_k]


@dataclass
class _SharedGate:
    """Qwen2-MoE's shared-expert gate, sigmoid(shared_expert_gate(x)) per token, for the tokens it just received."""

    values: torch.Tensor | None = None  # [tokens]


@dataclass
class _Scaled:
    """The last input scaled: kept alive with its identity (so the identity stays meaningful), with the routing
    weights it was scaled by (the block's, or the shared gate's) and its expert (None: the shared expert)."""

    inputs: torch.Tensor
    identity: Hashable
    source: torch.Tensor
    expert: int | None
    scaled: torch.Tensor


@dataclass
class ExpertRouting(TokenRouting):
    """Routing weights of the tokens each expert linear receives, captured from the routers; the
    shared expert's tokens are weighted by its sigmoid gate, which scales its output the same way.

    An expert's linears that read one tensor in turn (Mixtral's w1, then w3) get one scaled tensor: statistics that
    depend on the inputs alone are then shared between them (``calibration.sharing``)."""

    expert_of: dict[nn.Linear, tuple[_BlockRouting, int]] = field(default_factory=dict)
    shared_of: dict[nn.Linear, _SharedGate] = field(default_factory=dict)
    _last: _Scaled | None = field(default=None, init=False, repr=False)

    def scale(self, linear: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        if linear in self.shared_of:
            source, expert = self.shared_of[linear].values, None
        elif linear in self.expert_of:
            routing, expert = self.expert_of[linear]
            source = routing.weights
        else:
            return inputs
        identity, last = tensor_identity(inputs), self._last
        if last is not None and last.identity == identity and last.source is source and last.expert == expert:
            return last.scaled
        scaled = self._weighted(linear, inputs)
        self._last = _Scaled(inputs, identity, source, expert, scaled)
        return scaled

    def _weighted(self, linear: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, inputs.shape[-1])
        if linear in self.shared_of:
            return flat * self.shared_of[linear].values.to(flat.dtype).unsqueeze(1)
        routing, expert = self.expert_of[linear]
        weights = self.token_weights(routing, expert)
        if flat.shape[0] != weights.shape[0]:
            raise RuntimeError(
                f"expert {expert} received {flat.shape[0]} tokens but its router selected {weights.shape[0]}; "
                "this MoE block routes differently from the softmax top-k layout the adapter assumes"
            )
        return flat * weights.to(flat.dtype).unsqueeze(1)

    def positions(self, linear: nn.Linear) -> torch.Tensor | None:
        if linear not in self.expert_of:
            return None
        routing, expert = self.expert_of[linear]
        return self.handover(routing.selected, expert)[1]

    def token_weights(self, routing: _BlockRouting, expert: int) -> torch.Tensor:
        """Routing weights of the expert's tokens, in the order the block hands them over."""
        rank, token = self.handover(routing.selected, expert)
        return routing.weights[token, rank]

    def handover(self, selected: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank, token) of the tokens routed to ``expert``, in the order the block hands them to it."""
        return expert_tokens(selected, expert)


@register_adapter(
    MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM,
    MixtralModel, Qwen2MoeModel, Qwen3MoeModel, OlmoeModel,  # as language towers of multimodal models
)
class MoEAdapter(DecoderStackAdapter):
    """Each layer: attention and a sparse MoE block."""

    routing_class: type[ExpertRouting] = ExpertRouting  # how the block hands each expert its tokens

    def _no_structure(self, *hooks: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(
            f"{type(self).__name__} ({type(self.model).__name__}) cannot apply this structured method, which is written "
            "for dense decoder layers; use an unstructured method such as wanda or sparsegpt, or remove or merge whole "
            f"experts (method='experts' or 'merge_experts') ({self._lacking(hooks)})"
        )

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse MoE block (Mixtral: ``block_sparse_moe``; the others: ``mlp``), or None for a dense MLP."""
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        return block if hasattr(block, "experts") and hasattr(block, "gate") else None

    def router(self, block: nn.Module) -> nn.Linear:
        return block.gate

    def block_experts(self, block: nn.Module) -> nn.ModuleList:
        return block.experts

    def experts_per_token(self, block: nn.Module) -> int:
        return block.top_k

    def routers(self, layer: nn.Module) -> list[nn.Linear]:
        block = self.moe_block(layer)
        if block is None:
            return []
        extra = getattr(block, "shared_expert_gate", None)
        return [block.gate] + ([extra] if isinstance(extra, nn.Linear) else [])

    def prunable_linears(self, layer: nn.Module, include_routers: bool = False) -> dict[str, nn.Linear]:
        routers = set(self.routers(layer))
        return {
            name: module
            for name, module in layer.named_modules()
            if is_linear(module) and (include_routers or module not in routers)
        }

    def expert_projections(self, expert: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        """(input projections, whose rows are the intermediate neurons; the output projection, whose columns are)."""
        if hasattr(expert, "w2"):  # Mixtral: w1 gate, w3 up, w2 down
            return [expert.w1, expert.w3], expert.w2
        return [expert.gate_proj, expert.up_proj], expert.down_proj

    def expert_activation(self, expert: nn.Module) -> Any:
        """The expert's activation between its gate projection and the product with its up projection."""
        return expert.act_fn

    def shared_expert_output(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's always-on shared expert, gated per token; None for blocks without one."""
        shared = getattr(block, "shared_expert", None)
        if shared is None:
            return None
        return F.sigmoid(block.shared_expert_gate(tokens)) * shared(tokens)

    def renormalises(self, block: nn.Module) -> bool:
        """Whether the block rescales each token's top-k routing weights to sum to one (Mixtral always does)."""
        return getattr(block, "norm_topk_prob", True)

    def router_logits(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The router's logits ([tokens, experts]) for ``tokens`` ([tokens, hidden])."""
        return self.router(block)(tokens)

    def route(self, block: nn.Module, logits: torch.Tensor, experts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's routing (weights, selected columns) of tokens with these router logits; ``experts``: the
        router rows the columns are, when they are a subset (scoring what keeping only those experts would route)."""
        return top_k_routing(logits, self.experts_per_token(block), self.renormalises(block))

    def weights_depend_on_other_rows(self, block: nn.Module) -> bool:
        """Whether a token's routing weights depend on router rows it did not choose (a softmax over all rows, its
        top-k not renormalised), so that removing rows rescales the kept experts' weights."""
        return not self.renormalises(block)

    def require_softmax_router(self, purpose: str) -> None:
        """Raise ``UnsupportedArchitecture`` where the router is not a module returning logits that a softmax top-k
        routes, which ``purpose`` (skipping, folding, dropping experts) reads and rewrites."""

    def expert_groups(self, block: nn.Module) -> list[list[int]]:
        """The groups the router chooses experts in (one group: all of them); removing experts must leave every
        group the same size, or the kept experts' routing changes."""
        return [list(range(len(self.block_experts(block))))]

    def fewest_experts(self, block: nn.Module) -> int:
        """The fewest experts the block's router can route among (its top-k here)."""
        return self.experts_per_token(block)

    def check_expert_count(self, block: nn.Module, count: int) -> None:
        """Raise ``ValueError`` where the block's router cannot route among ``count`` experts (besides its top-k)."""

    def placeholder_experts(self, block: nn.Module, count: int) -> list[int]:
        """The experts a freshly built layer keeps to take a checkpoint's ``count`` experts (whose weights load next)."""
        return list(range(count))

    def keep_experts(self, layer: nn.Module, indices: list[int], experts: list[nn.Module] | None = None) -> None:
        """Keep only router rows ``indices`` (in that order) with their experts, or with ``experts``
        in their place (merged experts)."""
        block = self.moe_block(layer)
        top_k, router = self.experts_per_token(block), self.router(block)
        if len(indices) < top_k:
            raise ValueError(f"cannot keep {len(indices)} experts: the router picks top-{top_k} of them, so keep at least {top_k}")
        rows = torch.tensor(indices, dtype=torch.long, device=router.weight.device)
        block.experts = nn.ModuleList(experts if experts is not None else [block.experts[i] for i in indices])
        keep_output_features(router, rows)
        block.num_experts = len(indices)
        counts = {len(b.experts) for b in map(self.moe_block, self.decoder_layers()) if b is not None}
        if len(counts) == 1 and hasattr(self.model, "num_experts"):
            # The router load-balancing loss (output_router_logits=True) reads the model-level count.
            # With per-layer counts that loss cannot be computed (transformers stacks all routers' logits).
            self.model.num_experts = counts.pop()

    # --- shapes (expert pruning changes the expert count; widths stay stock) ---------------
    def layer_shape(self, layer: nn.Module) -> LayerShape:
        attention, block = layer.self_attn, self.moe_block(layer)
        expert = block.experts[0] if block is not None else layer.mlp
        return LayerShape(
            num_attention_heads=attention.q_proj.out_features // attention.head_dim,
            num_key_value_heads=attention.k_proj.out_features // attention.head_dim,
            intermediate_size=(self.expert_projections(expert)[0][0] if block is not None else layer.mlp.gate_proj).out_features,
            attention_output_bias=attention.o_proj.bias is not None,
            num_experts=len(block.experts) if block is not None else None,
        )

    def stock_shape(self, config: Any, index: int = 0) -> LayerShape:
        moe = _is_moe_layer(config, index)
        return LayerShape(
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            intermediate_size=(getattr(config, "moe_intermediate_size", None) if moe else None) or config.intermediate_size,
            attention_output_bias=bool(getattr(config, "attention_bias", False)),
            num_experts=(getattr(config, "num_local_experts", None) or config.num_experts) if moe else None,
        )

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        current = self.layer_shape(layer)
        if shape == current:  # e.g. a dense MLP layer of Qwen-MoE (mlp_only_layers, decoder_sparse_step)
            return
        if shape.num_experts is None or current.num_experts is None or replace(shape, num_experts=current.num_experts) != current:
            raise ValueError(
                f"only the expert count of a MoE layer can differ from the config here; got {shape.to_dict()} "
                f"for a layer built as {current.to_dict()}. The checkpoint's config.json is corrupt"
            )
        if shape.num_experts > current.num_experts:  # the placeholders would index experts the layer was not built with
            raise ValueError(
                f"the layer records {shape.num_experts} experts, more than the {current.num_experts} of a layer built from "
                "the config (pruning only removes experts). The checkpoint's config.json is corrupt"
            )
        if shape.num_experts != current.num_experts:
            self.keep_experts(layer, self.placeholder_experts(self.moe_block(layer), shape.num_experts))

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        if shape.num_experts:
            setattr(config, "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts", shape.num_experts)

    def routing_decision(self, block: nn.Module, router_output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, selected), each [tokens, top_k], of the tokens the block just routed, from what its router
        returned (logits, which the block routes as ``route`` does)."""
        return self.route(block, router_output.detach())

    @contextmanager
    def routed_tokens(self, layer: nn.Module) -> Iterator[TokenRouting]:
        block = self.moe_block(layer)
        routing = self.routing_class()
        if block is None:
            yield routing
            return
        decision = _BlockRouting()

        def record(_module: nn.Module, _args: tuple, output: Any) -> None:
            decision.weights, decision.selected = self.routing_decision(block, output)

        for index, expert in enumerate(block.experts):
            for linear in expert.modules():
                if isinstance(linear, nn.Linear):
                    routing.expert_of[linear] = (decision, index)
        handles = [block.gate.register_forward_hook(record)]
        shared, shared_gate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
        if shared is not None and isinstance(shared_gate, nn.Linear):
            gate = _SharedGate()

            def gate_values(_module: nn.Module, args: tuple) -> None:  # the block applies the gate after the expert runs
                tokens = args[0].reshape(-1, args[0].shape[-1])
                gate.values = F.sigmoid(shared_gate(tokens).float()).flatten().detach()

            handles.append(shared.register_forward_pre_hook(gate_values))
            routing.shared_of.update((linear, gate) for linear in shared.modules() if isinstance(linear, nn.Linear))
        try:
            yield routing
        finally:
            for handle in handles:
                handle.remove()

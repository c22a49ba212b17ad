"""Per-layer shapes of a structurally pruned decoder, and the config that reproduces them.

Structured pruning can leave every layer with its own width. A ``LayerShape`` records what one
decoder layer looks like after surgery; the adapter rewrites the model config from the list of
shapes, and the shapes that the rewritten config cannot reproduce on its own are saved as
loading metadata (see ``optimum_prune.structure.loading``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer holds. 0 heads / 0 channels means that sublayer was removed.

    ``num_experts`` is set for mixture-of-experts layers (``intermediate_size`` is then each
    expert's). ``residual_widths`` is set for layers whose residual stream was rotated and sliced (SliceGPT):
    the stream's width at the layer input, between attention and MLP, and at the output. Such a
    layer carries shortcut matrices that carry the residual from one basis to the next.
    ``rerouted`` names removed sublayers ("attention", "mlp") that a linear map of their
    normalised input stands in for (residual re-routing). ``low_rank`` lists (name inside the layer,
    rank) of linears stored as two low-rank factors. ``mpo`` lists (expert linear name, row factors,
    column factors, central bonds) of MoE experts stored as matrix product operators sharing their
    central tensor (MPOE).
    """

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    attention_output_bias: bool = False
    mlp_output_bias: bool = False
    residual_widths: tuple[int, int, int] | None = None
    num_experts: int | None = None  # MoE layers: experts kept (None: a dense MLP)
    rerouted: tuple[str, ...] = ()
    low_rank: tuple[tuple[str, int], ...] = ()
    mpo: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, int]], ...] = ()

    @property
    def has_attention(self) -> bool:
        return self.num_attention_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size > 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Shapes stay as they were before MoE support and re-routing unless those are used.
        if data["num_experts"] is None:
            del data["num_experts"]
        if not data["rerouted"]:
            del data["rerouted"]
        else:
            data["rerouted"] = list(data["rerouted"])
        if not data["low_rank"]:
            del data["low_rank"]
        else:
            data["low_rank"] = dict(data["low_rank"])
        if not data["mpo"]:
            del data["mpo"]
        else:
            data["mpo"] = {name: {"rows": list(rows), "columns": list(columns), "central_bonds": list(bonds)} for name, rows, columns, bonds in self.mpo}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "LayerShape":
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a layer shape is a mapping of sizes, got {data!r:.60}; the checkpoint's config.json is corrupt")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted({"num_attention_heads", "num_key_value_heads", "intermediate_size"} - set(data))
        if unknown or missing:
            raise ValueError(
                f"{where}: layer shape has unknown keys {unknown} or misses {missing}; "
                f"expected keys: {', '.join(sorted(known))}. The checkpoint's config.json is corrupt."
            )
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if isinstance(data[name], bool) or not isinstance(data[name], int):
                raise ValueError(f"{where}: {name} must be an integer, got {data[name]!r}")
        for name in ("attention_output_bias", "mlp_output_bias"):
            if not isinstance(data.get(name, False), bool):
                raise ValueError(f"{where}: {name} must be true or false, got {data[name]!r}")
        widths = data.get("residual_widths")
        if widths is not None:
            if not isinstance(widths, (list, tuple)) or len(widths) != 3 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
                raise ValueError(f"{where}: residual_widths must be three positive integers, got {widths!r}")
            data = {**data, "residual_widths": tuple(widths)}
        experts = data.get("num_experts")
        if experts is not None and (isinstance(experts, bool) or not isinstance(experts, int) or experts <= 0):
            raise ValueError(f"{where}: num_experts must be a positive integer, got {experts!r}")
        rerouted = data.get("rerouted", ())
        if (
            not isinstance(rerouted, (list, tuple))
            or not all(isinstance(kind, str) for kind in rerouted)  # set() of a list entry was a bare TypeError
            or not set(rerouted) <= {"attention", "mlp"}
            or len(set(rerouted)) != len(rerouted)
        ):
            raise ValueError(f"{where}: rerouted must list distinct sublayers among 'attention' and 'mlp', got {rerouted!r}")
        low_rank = data.get("low_rank", {})
        if not isinstance(low_rank, dict) or not all(
            isinstance(name, str) and isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 for name, rank in low_rank.items()
        ):
            raise ValueError(f"{where}: low_rank must map linear names to positive ranks, got {low_rank!r}")
        data = {**data, "rerouted": tuple(rerouted), "low_rank": tuple(sorted(low_rank.items())), "mpo": _mpo_layout(data.get("mpo", {}), where)}
        shape = cls(**data)
        if ("attention" in shape.rerouted and shape.has_attention) or ("mlp" in shape.rerouted and shape.has_mlp):
            raise ValueError(f"{where}: only removed sublayers (0 heads or 0 channels) can be rerouted, got {data}")
        if widths is not None and not (shape.has_attention and shape.has_mlp):
            raise ValueError(f"{where}: a layer with a sliced residual stream must keep both its attention and its MLP")
        if shape.num_attention_heads < 0 or shape.num_key_value_heads < 0 or shape.intermediate_size < 0:
            raise ValueError(f"{where}: negative sizes in {data}")
        if shape.has_attention and (
            shape.num_key_value_heads == 0 or shape.num_attention_heads % shape.num_key_value_heads
        ):
            raise ValueError(
                f"{where}: {shape.num_attention_heads} query heads cannot share {shape.num_key_value_heads} "
                "key/value heads evenly (grouped-query attention needs a whole number of query heads per group)"
            )
        return shape


def _mpo_layout(data: Any, where: str) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, int]], ...]:
    def positive(values: Any, count: int | None) -> bool:
        return isinstance(values, list) and (count is None or len(values) == count) and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
        )

    layout = []
    for name, entry in (data.items() if isinstance(data, dict) else [(None, None)]):
        if not isinstance(entry, dict) or set(entry) != {"rows", "columns", "central_bonds"} or not (
            positive(entry["rows"], 5) and positive(entry["columns"], 5) and positive(entry["central_bonds"], 2)
        ):
            raise ValueError(f"{where}: mpo must map expert linear names to five rows, five columns and two central_bonds, got {data!r}")
        layout.append((name, tuple(entry["rows"]), tuple(entry["columns"]), tuple(entry["central_bonds"])))
    return tuple(sorted(layout))

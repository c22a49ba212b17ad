import pytest
import torch

from optimum_prune import get_adapter
from optimum_prune.structure.surgery import coupled_linears, remove_block_channels

from ..conftest import tiny_model


def test_dependency_graph_finds_the_coupled_mlp_projections():
    mlp = tiny_model().model.layers[0].mlp
    producers, consumers = coupled_linears(mlp, mlp.gate_proj)
    assert producers == [mlp.gate_proj, mlp.up_proj] or producers == [mlp.up_proj, mlp.gate_proj]
    assert consumers == [mlp.down_proj]
    before = {name: p.detach().clone() for name, p in mlp.named_parameters()}
    with torch.no_grad():
        remove_block_channels(mlp, mlp.gate_proj, [0, 5])
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (126, 126, 126)
    kept = [c for c in range(128) if c not in (0, 5)]
    assert torch.equal(mlp.gate_proj.weight, before["gate_proj.weight"][kept])
    assert torch.equal(mlp.up_proj.weight, before["up_proj.weight"][kept])
    assert torch.equal(mlp.down_proj.weight, before["down_proj.weight"][:, kept])
    assert all(p.requires_grad for p in mlp.parameters())


def test_head_removal_that_breaks_grouped_query_attention_is_refused():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2)
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match="breaks grouped-query attention"):
        adapter.keep_heads(model.model.layers[0], torch.tensor([0, 1, 2, 4, 5]), torch.tensor([0, 1]))

"""OLMo 2: sublayers read the raw stream and add their post-normalised output; q/k norms span all heads.

The unstructured matrix runs OLMo 2 with the other families (tests/adapters/test_adapters.py); these check what its
layer changes: the term a sublayer adds, which structured pruning is exact (and reloads) and which is refused.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import Olmo2Model

from optimum_prune import PruningConfig, get_adapter, prune
from optimum_prune.adapters.llama import LlamaAdapter
from optimum_prune.adapters.olmo2 import Olmo2Adapter

from ..conftest import (
    assert_prunes_and_reloads, assert_uniform_result_reloads_with_stock_transformers, logit_error, observed_residual_terms,
    sublayer_removal_logits, tiny_model,
    token_windows, zeroed_reference,
)  # fmt: skip


def test_each_olmo2_class_has_its_adapter():
    model = tiny_model("olmo2")
    assert type(get_adapter(model)) is Olmo2Adapter
    assert type(get_adapter(Olmo2Model(model.config))) is Olmo2Adapter


def test_observed_residual_terms_are_the_post_normalised_sublayer_outputs():
    """Block influence, K-prune and ZipLM read each sublayer's term of the stream, and re-routing fits its stand-in to
    the sublayer's contribution: post_norm(f(x)), from the raw stream x (OLMo 2 has no pre-norm)."""
    adapter, layer, hidden, arguments, observed, _output = observed_residual_terms(tiny_model("olmo2"))
    with torch.no_grad():
        attention = adapter.sublayer_contribution(layer, "attention")(hidden_states=hidden, **arguments)[0]
        mlp = adapter.sublayer_contribution(layer, "mlp")(observed["mlp"][0])
    torch.testing.assert_close(attention, observed["attention"][1] - hidden)
    torch.testing.assert_close(mlp, observed["mlp"][1] - observed["mlp"][0])


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_a_removed_sublayer_drops_exactly_its_term(kind):
    """Removing a sublayer equals the dense model without its term. Llama's adapter reads post_attention_layernorm as
    the MLP's input norm: removing the MLP, it would drop the attention's post-norm too."""
    dense = tiny_model("olmo2")
    ids = token_windows(samples=2, seq_len=12, seed=3)
    expected, removed = sublayer_removal_logits(dense, Olmo2Adapter, 1, kind, ids)
    torch.testing.assert_close(removed, expected)
    if kind == "mlp":
        assert not torch.allclose(sublayer_removal_logits(dense, LlamaAdapter, 1, kind, ids)[1], expected, atol=1e-3)


def test_an_mlp_channel_cut_equals_the_dense_model_with_the_channels_zeroed():
    """The post-norm normalises the MLP's hidden-size output, so removing channels stays a plain cut."""
    dense = tiny_model("olmo2")
    model = copy.deepcopy(dense)
    config = PruningConfig(method="width", sparsity=0.25, method_options={"components": "mlp", "criterion": "magnitude_l2"})
    prune(model, config)
    assert model.model.layers[0].mlp.gate_proj.out_features < dense.config.intermediate_size
    ids = token_windows(samples=2, seq_len=16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed_reference(dense, model)(ids).logits, rtol=1e-4, atol=1e-5)


MLP = {"components": "mlp"}


@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(method="wanda", sparsity=0.5, allocation="owl"),
        PruningConfig(method="llm_surgeon", sparsity=0.5),
        PruningConfig(method="layers", sparsity=0.34, method_options={"reroute": True}),
        PruningConfig(method="layers", sparsity=0.34, method_options={"merge": True}),
        PruningConfig(method="sublayers", sparsity=0.2),
        PruningConfig(method="sublayers", sparsity=0.2, method_options={"reroute": True}),
        PruningConfig(method="width", sparsity=0.2, method_options={**MLP, "ranking": "global"}),  # FLAP adds down_proj biases
        PruningConfig(method="kprune", sparsity=0.2, method_options=MLP),
        PruningConfig(method="kcm", sparsity=0.2, method_options=MLP),
        PruningConfig(method="mask_search", sparsity=0.2, method_options=MLP),
        PruningConfig(method="llm_surgeon_structured", sparsity=0.2, method_options=MLP),
        PruningConfig(method="ziplm", sparsity=0.2, method_options={**MLP, "target": "parameters"}),
        PruningConfig(method="low_rank", sparsity=0.2),
    ],
    ids=["wanda owl", "llm_surgeon", "layers reroute", "layers merge", "sublayers", "sublayers reroute", "width flap global",
         "kprune", "kcm", "mask_search", "llm_surgeon_structured", "ziplm", "low_rank"],  # fmt: skip
)
def test_every_applicable_method_prunes_and_reloads_exactly(config, tmp_path):
    assert_prunes_and_reloads(tiny_model("olmo2"), config, tmp_path / "pruned")


@pytest.mark.parametrize("method,options", [("width", {**MLP, "criterion": "magnitude_l2"}), ("layers", {"num_layers": 1})])
def test_a_uniform_olmo2_result_reloads_with_stock_transformers(method, options, tmp_path):
    assert_uniform_result_reloads_with_stock_transformers(tiny_model("olmo2"), method, options, tmp_path)


def test_fitted_terms_reproduce_the_post_normalised_output():
    """K-prune's weight tuning asks output_target for the down_proj output whose post-norm gives the missing term; a
    re-routed sublayer maps the raw stream to its post-normalised term (0.53× and 0.005× the error measured here)."""
    dense, windows = tiny_model("olmo2"), token_windows(samples=16, seq_len=48)
    assert logit_error(dense, windows, "kprune", **MLP, tune=True) < 0.8 * logit_error(dense, windows, "kprune", **MLP, tune=False)
    assert logit_error(dense, windows, "sublayers", reroute=True) < 0.1 * logit_error(dense, windows, "sublayers")


def test_removing_heads_would_change_the_kept_heads_queries():
    """Why heads are refused: q_norm divides every query by the RMS over all heads; after a cut it would divide the kept
    heads' by their own RMS, a factor that varies token by token, so no weight can make up for it."""
    attention = tiny_model("olmo2").model.layers[0].self_attn
    hidden = torch.randn(2, 8, attention.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    kept = torch.arange(2 * attention.head_dim)  # the first two of four query heads
    with torch.no_grad():
        queries = attention.q_proj(hidden)
        over_all_heads = attention.q_norm(queries)[..., kept]
        cut = copy.deepcopy(attention.q_norm)
        cut.weight = nn.Parameter(cut.weight[kept])
        over_kept_heads = cut(queries[..., kept])
    factor = (over_kept_heads / over_all_heads).mean(-1)  # one per token (elementwise the same)
    torch.testing.assert_close(over_kept_heads, over_all_heads * factor.unsqueeze(-1))
    assert float(factor.max() - factor.min()) > 0.1


@pytest.mark.parametrize(
    "method,options",
    [("width", {}), ("width", {"components": "attention"}), ("kprune", {}), ("kcm", {}), ("mask_search", {}),
     ("llm_surgeon_structured", {}), ("ziplm", {})],  # fmt: skip
)
def test_head_removal_is_refused_before_any_weight_changes(method, options):
    model = tiny_model("olmo2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"over all heads at once \(self_attn.q_norm, self_attn.k_norm\).*components='mlp'"):
        prune(model, PruningConfig(method=method, sparsity=0.2, method_options=options), calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_mlp_channels_are_cut_when_ignore_keeps_every_attention_with_components_all():
    """With every attention ignored there are no heads to score: components='all' cut MLP channels only, as
    components='mlp' does (it was refused for the heads it would never have touched)."""
    model = tiny_model("olmo2")
    config = PruningConfig(method="width", sparsity=0.2, ignore=["*.self_attn.*"])
    prune(model, config, calibration=token_windows())
    assert all(layer.self_attn.q_proj.out_features == model.config.num_attention_heads * model.config.head_dim for layer in model.model.layers)
    assert sum(layer.mlp.gate_proj.out_features for layer in model.model.layers) < model.config.intermediate_size * len(model.model.layers)


def test_slicegpt_is_refused_before_any_weight_changes():
    model = tiny_model("olmo2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="post_attention_layernorm, post_feedforward_layernorm.*SliceGPT does not apply"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())

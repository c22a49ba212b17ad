"""StableLM: LayerNorms with biases, parallel sublayers (use_parallel_residual) and per-head q/k LayerNorms (qk_layernorm).

The unstructured matrix runs StableLM with the other families (tests/adapters/test_adapters.py), and so does width's
exactness matrix (tests/methods/test_width.py); these check what its layer changes, for both flags: the terms a sublayer
adds, which structured pruning is exact (and reloads) and which is refused.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, StableLmModel
from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

from optimum_prune import PruningConfig, get_adapter, prune, prune_checkpoint
from optimum_prune.adapters.llama import LlamaAdapter
from optimum_prune.adapters.stablelm import StableLmAdapter
from optimum_prune.structure.loading import records_layer_shapes

from ..conftest import (
    assert_prunes_and_reloads,
    assert_uniform_result_reloads_with_stock_transformers,
    kept_rows,
    logit_error,
    observed_residual_terms,
    sublayer_removal_logits,
    tiny_model,
    token_windows,
    zeroed_reference,
)
from ..test_streaming import assert_same_weights, pruned_in_memory

VARIANTS = ["sequential", "parallel", "qk_norms", "parallel_qk_norms"]


def tiny_stablelm(variant: str = "sequential", **overrides) -> nn.Module:
    """The tiny StableLM of ``variant``, with LayerNorm weights and biases and q/k/v biases drawn away from their
    initial ones and zeros, so that a norm or bias left with the wrong head shows.

    transformers 4.57 cannot build a StableLM with ``qk_layernorm`` from its config (``_init_weights`` zeroes every
    LayerNorm's bias, and the per-head ones have none; checkpoints load, their weights being present): those norms are
    added to a model built without them."""
    model = tiny_model("stablelm", use_parallel_residual=variant.startswith("parallel"), **overrides)
    if variant.endswith("qk_norms"):
        model.config.qk_layernorm = True
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.qk_layernorm = True
            attention.q_layernorm = StableLmLayerNormPerHead(attention.head_dim, attention.num_heads, model.config.layer_norm_eps)
            attention.k_layernorm = StableLmLayerNormPerHead(attention.head_dim, attention.num_key_value_heads, model.config.layer_norm_eps)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight") or name.endswith("bias"):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_each_stablelm_class_has_its_adapter():
    model = tiny_stablelm()
    assert type(get_adapter(model)) is StableLmAdapter
    assert type(get_adapter(StableLmModel(model.config))) is StableLmAdapter


@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_observed_residual_terms_add_up_to_the_layer_output(variant):
    """Block influence and K-prune read the stream around each sublayer: in a parallel layer the MLP reads the
    input_layernorm of the layer's input, and its term still follows the attention's on the way to the output."""
    adapter, layer, hidden, arguments, observed, _output = observed_residual_terms(tiny_stablelm(variant))
    norm = layer.input_layernorm(hidden) if variant == "parallel" else layer.post_attention_layernorm(observed["mlp"][0])
    with torch.no_grad():
        attention = adapter.sublayer_contribution(layer, "attention")(hidden_states=layer.input_layernorm(hidden), **arguments)[0]
        mlp = adapter.sublayer_contribution(layer, "mlp")(norm)
    torch.testing.assert_close(attention, observed["attention"][1] - hidden)
    torch.testing.assert_close(mlp, observed["mlp"][1] - observed["mlp"][0])


@pytest.mark.parametrize("kind", ["attention", "mlp"])
@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_a_removed_sublayer_drops_exactly_its_term(variant, kind):
    """Removing a sublayer equals the dense model without its term. In a parallel layer both sublayers read
    input_layernorm: Llama's adapter takes it away with the attention, leaving the MLP reading the raw stream."""
    dense = tiny_stablelm(variant)
    ids = token_windows(samples=2, seq_len=12, seed=3)
    expected, removed = sublayer_removal_logits(dense, StableLmAdapter, 1, kind, ids)
    torch.testing.assert_close(removed, expected)
    if (variant, kind) == ("parallel", "attention"):
        assert not torch.allclose(sublayer_removal_logits(dense, LlamaAdapter, 1, kind, ids)[1], expected, atol=1e-3)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_head_and_channel_cut_equals_the_dense_model_with_them_zeroed(variant, attention):
    """Whole key/value groups go with their query heads, their q/k/v biases and their per-head q/k norms; the
    config keeps its head counts (they set head_dim) and the shapes are recorded per layer."""
    dense = tiny_stablelm(variant, num_attention_heads=8, num_key_value_heads=4, attn_implementation=attention)
    model = copy.deepcopy(dense)
    options = {"criterion": "magnitude_l2", "head_mode": "kv_group"}
    report = prune(model, PruningConfig(method="width", sparsity=0.25, method_options=options))
    assert [(shape.num_attention_heads, shape.num_key_value_heads) for shape in report.shapes] == [(6, 3)] * 3
    assert model.config.num_attention_heads == 8 and records_layer_shapes(model.config.quantization_config)
    ids = token_windows(samples=2, seq_len=16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed_reference(dense, model)(ids).logits, rtol=1e-4, atol=1e-5)
    if variant.endswith("qk_norms"):  # each kept head keeps its own norm
        for before, after in zip(dense.model.layers, model.model.layers):
            head_dim = before.self_attn.head_dim
            for projection, norms in (("q_proj", "q_layernorm"), ("k_proj", "k_layernorm")):
                rows = kept_rows(getattr(before.self_attn, projection).weight, getattr(after.self_attn, projection).weight)
                heads = [row // head_dim for row in rows[::head_dim]]
                kept, original = getattr(after.self_attn, norms), getattr(before.self_attn, norms)
                assert kept.num_heads == len(kept.norms) == len(heads)
                assert all(torch.equal(norm.weight, original.norms[head].weight) for norm, head in zip(kept.norms, heads))


MLP, HEADS = {"components": "mlp"}, {"components": "attention"}


@pytest.mark.parametrize("variant", ["sequential", "parallel_qk_norms"])
@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(method="wanda", sparsity=0.5, allocation="owl"),
        PruningConfig(method="sparsegpt", sparsity="2:4"),
        PruningConfig(method="llm_surgeon", sparsity=0.5),
        PruningConfig(method="layers", sparsity=0.34, method_options={"reroute": True}),
        PruningConfig(method="layers", sparsity=0.34, method_options={"merge": True}),
        PruningConfig(method="sublayers", sparsity=0.2),
        PruningConfig(method="sublayers", sparsity=0.2, method_options={"reroute": True}),
        PruningConfig(method="width", sparsity=0.2, method_options={"ranking": "global"}),  # FLAP adds down_proj biases
        PruningConfig(method="width", sparsity=0.1, method_options={**HEADS, "ranking": "global"}),  # and o_proj biases
        PruningConfig(method="kprune", sparsity=0.1, method_options=HEADS),
        PruningConfig(method="kcm", sparsity=0.1, method_options=HEADS),
        PruningConfig(method="mask_search", sparsity=0.1, method_options=HEADS),
        PruningConfig(method="llm_surgeon_structured", sparsity=0.1, method_options=HEADS),
        PruningConfig(method="ziplm", sparsity=0.2, method_options={"target": "parameters"}),
        PruningConfig(method="low_rank", sparsity=0.2),
    ],
    ids=["wanda owl", "sparsegpt 2:4", "llm_surgeon", "layers reroute", "layers merge", "sublayers", "sublayers reroute",
         "width flap global", "width flap global heads", "kprune heads", "kcm heads", "mask_search heads",
         "llm_surgeon_structured heads", "ziplm", "low_rank"],  # fmt: skip
)
def test_every_applicable_method_prunes_reloads_and_generates_exactly(config, variant, tmp_path):
    """Eight heads in four key/value groups: at these sparsities every method that removes heads removes some."""
    model = tiny_stablelm(variant, num_attention_heads=8, num_key_value_heads=4)
    report = assert_prunes_and_reloads(model, config, tmp_path / "pruned")
    if config.method_options.get("components") == "attention":
        assert any(shape.num_attention_heads < 8 for shape in report.shapes)


@pytest.mark.parametrize("method,options", [("width", {**MLP, "criterion": "magnitude_l2"}), ("layers", {"num_layers": 1})])
def test_a_uniform_stablelm_result_reloads_with_stock_transformers(method, options, tmp_path):
    assert_uniform_result_reloads_with_stock_transformers(tiny_stablelm("parallel_qk_norms"), method, options, tmp_path)


def test_fitted_terms_reproduce_a_parallel_layers_output():
    """A re-routed sublayer of a parallel layer maps the shared input_layernorm's output to its term, and K-prune's
    weight tuning fits each output projection to the stream it leaves."""
    dense, windows = tiny_stablelm("parallel"), token_windows(samples=16, seq_len=48)
    assert logit_error(dense, windows, "sublayers", reroute=True) < 0.5 * logit_error(dense, windows, "sublayers")
    assert logit_error(dense, windows, "kprune", tune=True) < 0.8 * logit_error(dense, windows, "kprune", tune=False)


@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_slicegpt_is_refused_before_any_weight_changes(variant):
    model = tiny_stablelm(variant)
    before = copy.deepcopy(model.state_dict())
    refusal = r"normalises with LayerNorm, which subtracts each token's mean and adds a bias.*SliceGPT does not apply"
    with pytest.raises(ValueError, match=refusal):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_a_checkpoint_with_per_head_qk_norms_prunes_from_disk_as_in_memory(tmp_path):
    """Pruning from disk builds the model from its config on the meta device, where transformers' _init_weights
    failed on the per-head norms (they have no bias) before any layer was read."""
    tiny_stablelm("parallel_qk_norms").save_pretrained(tmp_path / "source")
    config, windows = PruningConfig(method="wanda", sparsity=0.5), token_windows()
    prune_checkpoint(tmp_path / "source", tmp_path / "out", config, calibration=windows)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_weights(reloaded.state_dict(), pruned_in_memory(tmp_path / "source", config, windows))

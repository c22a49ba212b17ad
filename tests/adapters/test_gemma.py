"""What the Gemma adapters add to Llama's: ``1 + weight`` norms, sandwich norms, soft-capped logits.

The method × family matrices (unstructured, width, sublayers, re-routing, SliceGPT, non-uniform
reloads) run Gemma through the shared tests; these check what only Gemma has.
"""

import copy
import json

import pytest
import torch

from optimum_prune import PruningConfig, get_adapter, prune, save_pruned
from optimum_prune.adapters.gemma import GemmaAdapter, SandwichNormAdapter
from optimum_prune.early_exit import exit_logits

from ..conftest import assert_reloads_exactly, assert_stock_reload_matches, output_errors, tiny_model, token_windows


def test_each_gemma_class_has_its_adapter():
    assert type(get_adapter(tiny_model("gemma"))) is GemmaAdapter
    for family in ("gemma2", "gemma3"):
        adapter = get_adapter(tiny_model(family))
        assert type(adapter) is SandwichNormAdapter
        assert adapter.decoder is adapter.model.model  # Gemma3ForCausalLM is its own base_model


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_bare_decoders_are_their_own_decoder_and_prune(family):
    """Gemma2Model / Gemma3TextModel hold their layers themselves (the adapter looked for a .model inside them)."""
    decoder = tiny_model(family).model
    assert get_adapter(decoder).decoder is decoder
    report = prune(decoder, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows())
    assert report.overall_sparsity == pytest.approx(0.5)


def test_a_non_uniform_gemma2_checkpoint_loads_as_a_bare_decoder(tmp_path):
    """(transformers 4.57 loads no Gemma3ForCausalLM checkpoint into Gemma3TextModel, pruned or not: key prefixes differ.)"""
    from transformers import AutoModel

    model = tiny_model("gemma2")
    prune(model, PruningConfig(method="sublayers", sparsity=0.15, method_options={"sublayers": "attention"}), calibration=token_windows())
    decoder = AutoModel.from_pretrained(save_pruned(model, tmp_path / "pruned")).eval()
    ids = token_windows(samples=2, seq_len=12)
    with torch.no_grad():
        torch.testing.assert_close(decoder(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_slicegpt_is_refused_before_touching_a_sandwich_norm_model(family):
    model = tiny_model(family)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="post_attention_layernorm, post_feedforward_layernorm.*SliceGPT does not apply"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    "family,cap", [("gemma2", 30.0), ("gemma2", None), ("gemma3", None), ("granite", None), ("olmo2", None)]
)  # Granite scales its logits; OLMo 2 takes the base hook
def test_logits_from_a_hidden_state_are_the_models_own(family, cap):
    """Early exits and K-prune compute logits outside the model's forward: with Gemma 2's soft-capping too."""
    model = tiny_model(family, final_logit_softcapping=cap)
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.update(hidden=args[0]))
    ids = token_windows(samples=2, seq_len=16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        handle.remove()
        torch.testing.assert_close(exit_logits(model, captured["hidden"]), logits)
    if cap is not None:
        assert float(logits.abs().max()) < cap


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_observed_residual_terms_add_up_to_the_layers_output(family):
    """Block influence, K-prune and ZipLM read each sublayer's term of the stream: Gemma 2 adds it after its post-norm,
    Granite times its residual_multiplier."""
    model = tiny_model(family)
    adapter, layer = get_adapter(model), model.model.layers[0]
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand(2, -1)
    observed = {}
    with torch.no_grad(), adapter.observing_residuals(layer, lambda kind, before, after: observed.update({kind: (before, after)})):
        output = layer(hidden, position_embeddings=model.model.rotary_emb(hidden, positions), attention_mask=None, position_ids=positions)
    output = output[0] if isinstance(output, tuple) else output
    assert torch.equal(observed["attention"][0], hidden)
    assert torch.equal(observed["attention"][1], observed["mlp"][0])
    torch.testing.assert_close(observed["mlp"][1], output)
    # Residual re-routing fits its stand-in to the sublayer's contribution: the same term, from the normalised input,
    # before the layer scales it.
    before, after = observed["mlp"]
    with torch.no_grad():
        term = adapter.sublayer_contribution(layer, "mlp")(getattr(layer, adapter.pre_norms["mlp"])(before))
    torch.testing.assert_close(term * adapter.residual_scale(layer), after - before)


@pytest.mark.parametrize("kind,kept", [("attention", "mlp"), ("mlp", "self_attn")])
def test_a_removed_sublayer_takes_both_its_norms(kind, kept):
    model = tiny_model("gemma2")
    layer = model.model.layers[0]
    get_adapter(model).remove_sublayer(layer, kind)
    norms = {"input_layernorm", "post_attention_layernorm"} if kind == "mlp" else {"pre_feedforward_layernorm", "post_feedforward_layernorm"}
    assert {name.split(".")[0] for name, _ in layer.named_parameters()} == {kept, *norms}


def test_gemma3_without_layers_reloads_with_stock_transformers(tmp_path):
    """The kept layers keep their sliding / full attention (config.layer_types) and their rotary embedding."""
    model = tiny_model("gemma3", num_hidden_layers=4)
    kinds = list(model.config.layer_types)
    report = prune(model, PruningConfig(method="layers", sparsity=0.25), calibration=token_windows())
    (removed,) = [int(name.rsplit(".", 1)[1]) for name in report.removed]
    assert model.config.layer_types == [kind for index, kind in enumerate(kinds) if index != removed]
    output = save_pruned(model, tmp_path / "pruned")
    assert_stock_reload_matches(model, output, token_windows(samples=2, seq_len=16, seed=4), tmp_path)


def test_slicegpt_on_bfloat16_gemma_keeps_every_weight_in_bfloat16():
    """Gemma's fused scale 1 + w is computed in float32 (as its norm does); the weights it lands in keep their dtype."""
    model = tiny_model("gemma", tie_word_embeddings=False).to(torch.bfloat16)
    ids = token_windows(samples=2, seq_len=16, seed=3)
    prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def _trained_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm scales away from their initial value, as in a trained checkpoint (zero-initialised Gemma norms hide the post-norm)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_the_output_target_of_the_current_term_is_the_current_output(kind):
    """Weight tuning fits the output projection to output_target: asked for the term it already adds, a dense layer keeps its weights."""
    model = _trained_norms(tiny_model("gemma2"))
    adapter, layer = get_adapter(model), model.model.layers[1]
    output = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        term = getattr(layer, adapter.post_norms[kind])(output)
        torch.testing.assert_close(adapter.output_target(layer, kind, term, output), output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_kprune_weight_tuning_helps_through_the_post_norms(family):
    """It fitted the projections' raw output to the normalised term, so tuning made the pruned model worse."""
    errors = output_errors("kprune", 0.2, "tune", windows=token_windows(samples=16, seq_len=48), dense=_trained_norms(tiny_model(family)))
    assert errors[True] < 0.8 * errors[False]


@pytest.mark.parametrize("layers, pattern, removed, period", [(6, 6, 2, 5), (6, 6, 5, 6), (4, 2, 0, None)])
def test_gemma3s_sliding_window_pattern_follows_the_kept_layers(tmp_path, layers, pattern, removed, period):
    """``sliding_window_pattern`` (layer i is global iff (i + 1) % p == 0, Gemma 3's older spelling of ``layer_types``,
    still in its config.json) stayed 6 after a layer went: read from it, the only global layer slid. It is now the
    kept layers' period, or None where none describes them; the reload is exact either way."""
    model = tiny_model("gemma3", num_hidden_layers=layers, sliding_window_pattern=pattern)
    kept = "".join(str(i) for i in range(layers) if i != removed)
    config = PruningConfig(method="layers", sparsity=0.0, ignore=[f"model.layers.[{kept}]"], method_options={"num_layers": 1})
    prune(model, config, calibration=token_windows())
    save_pruned(model, tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (saved["sliding_window_pattern"], saved["_sliding_window_pattern"]) == (period, period)
    if period is not None:
        assert saved["layer_types"] == ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers - 1)]
    assert_reloads_exactly(model, tmp_path / "pruned")

"""Granite: Llama's layout with scaled sublayer terms (residual_multiplier) and scaled logits (logits_scaling)."""

import math

import pytest
import torch
from transformers import CLIPVisionConfig, GraniteModel, LlamaConfig, LlamaForCausalLM, LlavaNextConfig, LlavaNextForConditionalGeneration

from optimum_prune import PruningConfig, get_adapter, prune
from optimum_prune.adapters.granite import GraniteAdapter

from ..conftest import TINY, assert_uniform_result_reloads_with_stock_transformers, output_errors, tiny_model, token_windows


def test_each_granite_class_has_its_adapter():
    model = tiny_model("granite")
    assert isinstance(get_adapter(model), GraniteAdapter)
    assert isinstance(get_adapter(GraniteModel(model.config)), GraniteAdapter)  # the language tower of Granite Vision


def test_kprune_weight_tuning_fits_the_term_before_the_residual_multiplier():
    """Weight tuning fits the output projection to the stream's missing term over residual_multiplier: fitted to the
    term itself (0.22 times too large here), the tuned model was worse than the untuned one."""
    errors = output_errors("kprune", 0.2, "tune", windows=token_windows(samples=16, seq_len=48), dense=tiny_model("granite"))
    assert errors[True] < 0.8 * errors[False]


@pytest.mark.parametrize("method,options", [("width", {}), ("layers", {"num_layers": 1})])
def test_a_uniform_granite_result_reloads_with_stock_transformers(method, options, tmp_path):
    """A uniform result records head_dim in the config, which Granite's attention and RoPE read."""
    options = {**options, **({"ranking": "layer"} if method == "width" else {})}
    assert_uniform_result_reloads_with_stock_transformers(tiny_model("granite"), method, options, tmp_path)


def equivalent_llama(granite: torch.nn.Module) -> torch.nn.Module:
    """A Llama computing the same function as ``granite``: residual_multiplier folded into o_proj and down_proj,
    embedding_multiplier into the embeddings, 1/logits_scaling into lm_head and attention_multiplier into q_proj."""
    c = granite.config
    llama = LlamaForCausalLM(LlamaConfig(**{**TINY, "head_dim": c.head_dim})).eval()
    state = {name: tensor.clone() for name, tensor in granite.state_dict().items()}
    state["model.embed_tokens.weight"] *= c.embedding_multiplier
    state["lm_head.weight"] /= c.logits_scaling
    for i in range(c.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.o_proj.weight"] *= c.residual_multiplier
        state[f"model.layers.{i}.mlp.down_proj.weight"] *= c.residual_multiplier
        state[f"model.layers.{i}.self_attn.q_proj.weight"] *= c.attention_multiplier * math.sqrt(c.head_dim)
    llama.load_state_dict(state)
    return llama


def test_kprune_removes_the_same_units_from_granite_and_its_equivalent_llama():
    """K-prune's representational score is the energy a unit adds to the residual stream: on Granite the output
    projection's term times residual_multiplier² (as the term itself it weighed 1/0.22² = 21× too much against the
    predictive score: SmolLM2 as a Granite lost perplexity 80.0 where its Llama form lost 45.9)."""
    granite = tiny_model("granite")
    llama = equivalent_llama(granite)
    with torch.no_grad():
        ids = token_windows(samples=2, seq_len=16, seed=3)
        torch.testing.assert_close(granite(input_ids=ids).logits, llama(input_ids=ids).logits)
    windows, config = token_windows(samples=4), PruningConfig(method="kprune", sparsity=0.2)
    assert prune(granite, config, calibration=windows).removed == prune(llama, config, calibration=windows).removed


def test_a_granite_towers_exit_logits_are_its_hosts():
    """Granite Vision is LLaVA-NeXT around a GraniteModel, whose head does not divide by logits_scaling: logits an
    early exit, K-prune's student or distillation's exit term computes were 8× too small there."""
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    config = LlavaNextConfig(
        vision_config=vision, text_config=tiny_model("granite").config, image_token_id=TINY["vocab_size"] - 1, image_grid_pinpoints=[[32, 32]]
    )
    torch.manual_seed(0)
    ids = token_windows(samples=2, seq_len=16, seed=3, vocab=TINY["vocab_size"] - 1)
    for model in (LlavaNextForConditionalGeneration(config).eval(), tiny_model("granite")):  # the causal LM does divide
        adapter, captured = get_adapter(model), []
        handle = adapter.decoder_layers()[-1].register_forward_hook(lambda _m, _a, output: captured.append(output[0]))
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            handle.remove()
            torch.testing.assert_close(adapter.output_logits(captured[0]), expected)


def test_a_sliced_granite_model_returns_its_attentions():
    """Granite's model reads each layer's attention weights from its output tuple: SliceGPT's layers returned none."""
    model = tiny_model("granite", attn_implementation="eager")
    prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    with torch.no_grad():
        attentions = model(token_windows(samples=2, seq_len=16, seed=3), output_attentions=True).attentions
    assert len(attentions) == 3 and attentions[0].shape == (2, 4, 16, 16)

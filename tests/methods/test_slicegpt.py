import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from optimum_prune import PruningConfig, prune, save_pruned

from ..conftest import assert_reloads_exactly, tiny_model, token_windows

HIDDEN, KEPT = 64, 48


def confined_model(family: str, tied: bool) -> torch.nn.Module:
    """A model whose residual stream only ever spans the first KEPT coordinates, with random norm
    scales: PCA finds that subspace, so slicing to KEPT must not change the logits. (ε is made
    negligible: a norm over fewer coordinates weighs it differently.)"""
    model = tiny_model(family, tie_word_embeddings=tied, rms_norm_eps=1e-12)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, KEPT:] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[KEPT:] = 0
            layer.mlp.down_proj.weight[KEPT:] = 0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def slicegpt(sparsity: float = 1 - KEPT / HIDDEN, **options) -> PruningConfig:
    return PruningConfig(method="slicegpt", sparsity=sparsity, method_options=options)


@pytest.mark.parametrize(
    "family,tied",
    [("llama", False), ("mistral", False), ("qwen2", True), ("qwen3", True), ("llama", True), ("gemma", True), ("gemma", False), ("granite", False)],
)
def test_rotation_and_slicing_preserve_a_stream_that_fits_the_width(family, tied):
    model = confined_model(family, tied)
    ids = token_windows(samples=2, seq_len=16, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    report = prune(model, slicegpt(), calibration=token_windows())

    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    ends = HIDDEN if tied else KEPT
    assert [shape.residual_widths for shape in report.shapes] == [(ends, KEPT, KEPT), (KEPT, KEPT, KEPT), (KEPT, KEPT, ends)]
    assert model.get_input_embeddings().embedding_dim == ends
    assert model.get_output_embeddings().in_features == ends
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    # The stream has no energy outside KEPT coordinates: every slice keeps all of its variance.
    for name, kept in report.layer_scores.items():
        assert name.startswith("variance kept") and kept == pytest.approx([1.0] * 3, abs=1e-9)


def test_sliced_widths_shrink_every_linear_that_touches_the_stream():
    model = tiny_model()
    dense = copy.deepcopy(model)
    report = prune(model, slicegpt(0.3, round_to=8), calibration=token_windows())
    width = 40  # 64 × 0.7 = 44.8 → rounded down to a multiple of 8
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert {attention.q_proj.in_features, attention.k_proj.in_features, attention.v_proj.in_features} == {width}
        assert attention.o_proj.out_features == mlp.gate_proj.in_features == mlp.down_proj.out_features == width
        assert layer.attention_shortcut.weight.shape == layer.mlp_shortcut.weight.shape == (width, width)
        assert layer.input_layernorm.weight.shape == (width,)
    assert report.parameters_after < report.parameters_before
    assert report.macs_per_token_after < report.macs_per_token_before
    assert report.removed == ["residual stream width 64 → 40"]
    # Sliced output approximates, not equals, the dense one: random weights spread energy evenly over the
    # principal components, so slicing 30 % of them costs much (0.67 relative error here), yet less than nothing.
    ids = token_windows(samples=2, seq_len=16, seed=9)
    with torch.no_grad():
        sliced, reference = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert 0 < float((sliced - reference).norm() / reference.norm()) < 0.8
    assert json.loads(model.config.to_json_string())["quantization_config"]["layers"][1]["residual_widths"] == [40] * 3


def test_a_width_that_is_whole_in_exact_arithmetic_is_kept_whole():
    """320 × (1 − 0.8) = 63.999999999999986 in floating point: floored, it dropped a whole round_to block."""
    model = tiny_model(hidden_size=320, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    report = prune(model, slicegpt(0.8, round_to=8), calibration=token_windows(samples=2))
    assert report.removed == ["residual stream width 320 → 64"]


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen3", False), ("llama", False), ("gemma", False), ("granite", True)])
def test_sliced_model_reloads_bit_exact_generates_with_cache_and_takes_lora(family, tied, tmp_path):
    model = tiny_model(family, tie_word_embeddings=tied)
    prune(model, slicegpt(0.25), calibration=token_windows())
    reloaded = assert_reloads_exactly(model, save_pruned(model, tmp_path / "sliced"))

    ids = token_windows(samples=2, seq_len=16)
    for sliced in (model, reloaded):  # transformers records hidden states by the stock layer class
        hidden = sliced(input_ids=ids, output_hidden_states=True).hidden_states
        assert hidden is not None and len(hidden) == model.config.num_hidden_layers + 1

    peft_model = get_peft_model(reloaded, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)


def test_impossible_requests_fail_before_touching_the_model():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    windows = token_windows()
    with pytest.raises(ValueError, match="less than PruningConfig.method_options.round_to=8; lower the sparsity"):
        prune(model, slicegpt(0.95), calibration=windows)
    with pytest.raises(ValueError, match="slices nothing"):
        prune(model, slicegpt(0.0), calibration=windows)
    with pytest.raises(ValueError, match="no module can be left out"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25, ignore=["*.o_proj"]), calibration=windows)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())

    prune(model, slicegpt(0.25), calibration=windows)
    with pytest.raises(ValueError, match="already sliced"):
        prune(model, slicegpt(0.25), calibration=windows)

    model = tiny_model()
    prune(model, PruningConfig(method="sublayers", sparsity=0.3, method_options={"sublayers": "mlp"}), calibration=windows)
    with pytest.raises(ValueError, match="has a removed sublayer; SliceGPT needs whole layers"):
        prune(model, slicegpt(0.25), calibration=windows)


@pytest.mark.parametrize(
    "config, message",
    [
        (PruningConfig(method="layers", sparsity=0.4), "was sliced by SliceGPT, .*remove layers before slicing"),
        (PruningConfig(method="sublayers", sparsity=0.2), "SliceGPT needs whole layers, so it and sublayer removal cannot be combined"),
    ],
)
def test_depth_pruning_after_slicing_is_refused_before_any_change(config, message):
    """Each layer's stream has its own basis after SliceGPT: dropping a layer would join two bases."""
    model = tiny_model(num_hidden_layers=4)
    windows = token_windows()
    prune(model, slicegpt(0.25), calibration=windows)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune(model, config, calibration=windows)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_slicing_factorised_linears_is_refused_before_any_change():
    model = tiny_model()
    prune(model, PruningConfig(method="low_rank", sparsity=0.2, method_options={"weighting": "none"}))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="holds a LowRankLinear where SliceGPT rotates plain linears; apply SliceGPT before"):
        prune(model, slicegpt(0.25), calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_an_untied_sliced_checkpoint_loads_as_a_bare_decoder(tmp_path):
    from transformers import AutoModel

    model = tiny_model(tie_word_embeddings=False)
    prune(model, slicegpt(0.25), calibration=token_windows())
    decoder = AutoModel.from_pretrained(save_pruned(model, tmp_path / "sliced"))  # no LM head to resize
    ids = token_windows(samples=1, seq_len=8)
    with torch.no_grad():
        torch.testing.assert_close(decoder(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state)


HIDDEN, KEPT = 64, 48


def test_slicing_keeps_the_output_of_writers_with_a_bias():
    """Llama with attention_bias / mlp_bias: o_proj and down_proj write a bias into the stream, which must be
    rotated with their rows."""
    model = tiny_model("llama", attention_bias=True, mlp_bias=True, rms_norm_eps=1e-12)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, KEPT:] = 0
        for layer in model.model.layers:
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight[KEPT:] = 0
                writer.bias.uniform_(-0.5, 0.5)
                writer.bias[KEPT:] = 0
    ids = token_windows(samples=2, seq_len=16, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    prune(model, PruningConfig(method="slicegpt", sparsity=1 - KEPT / HIDDEN), calibration=token_windows())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["granite", "llama"])
def test_an_adapter_wrong_about_what_its_layer_returns_is_refused_before_any_rotation(family, scratch_adapters):
    """A Granite plugin subclassing LlamaAdapter (the README said Llama's layer returns a tuple) left the model half
    rotated and failing on a shape; a Llama one claiming a tuple likewise."""
    from optimum_prune import UnsupportedArchitecture, register_adapter
    from optimum_prune.adapters import get_adapter
    from optimum_prune.adapters.llama import LlamaAdapter

    base = tiny_model(family)

    class Plugged(type(base)):
        pass

    @register_adapter(Plugged)
    class Wrong(type(get_adapter(base))):
        layer_returns_tuple = family == "llama"  # Granite's layer returns a tuple, Llama's the tensor

    model = Plugged(base.config).eval()
    model.load_state_dict(base.state_dict())
    assert issubclass(type(get_adapter(model)), LlamaAdapter)
    says, returns = ("True", "a tensor") if family == "llama" else ("False", "a tuple")
    with pytest.raises(UnsupportedArchitecture, match=f"Wrong.layer_returns_tuple is {says}, but .* returns {returns}"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(tensor, base.state_dict()[name]) for name, tensor in model.state_dict().items())


def test_a_ratio_whose_shortcuts_outweigh_the_slicing_is_warned_of(caplog):
    """Tied ends at 10 %: 110,976 decoder parameters became 120,929, and only a percentage above 100 said so."""
    import logging

    model = tiny_model(tie_word_embeddings=True)
    before = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.1, method_options={"round_to": 1}), calibration=token_windows(4, 16))
    after = sum(p.numel() for p in model.parameters())
    assert after > before
    assert f"left the model with {after:,} parameters, {100 * (after / before - 1):.1f}% more than its {before:,} before" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(tiny_model(tie_word_embeddings=True), PruningConfig(method="slicegpt", sparsity=0.5), calibration=token_windows(4, 16))
    assert "more than its" not in caplog.text

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from optimum_prune import ADAPTERS, PruningConfig, get_adapter, prune, verify_sparsity
from optimum_prune.adapters.base import DecoderAdapter, register_adapter
from optimum_prune.adapters.llama import LlamaAdapter

from ..conftest import FAMILIES, tiny_model, token_windows


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_every_method_on_every_family(family, method, sparsity):
    model = tiny_model(family)
    ids = token_windows(samples=2, seq_len=16)
    report = prune(model, PruningConfig(method=method, sparsity=sparsity), calibration=token_windows())
    per_layer = 4 if family == "phi3" else 7  # q, k, v, o, gate, up, down (Phi-3: qkv, o, gate_up, down)
    assert len(report.linears) == 3 * per_layer
    result = verify_sparsity(model, sparsity if isinstance(sparsity, str) else None)
    assert result["overall_sparsity"] == pytest.approx(0.5)
    if isinstance(sparsity, str):
        assert result["conforming"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_registry_covers_llama_family():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(ADAPTERS.names())
    for family in ("qwen2", "qwen3"):
        assert isinstance(get_adapter(tiny_model(family)), LlamaAdapter)


def test_subclass_inherits_adapter():
    class MyLlama(LlamaForCausalLM):
        pass

    model = MyLlama(tiny_model().config)
    assert isinstance(get_adapter(model), LlamaAdapter)


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported model classes: .*LlamaForCausalLM"):
        prune(model, PruningConfig(method="magnitude"))


def test_an_adapter_without_the_shape_hooks_is_refused_before_a_structured_method_changes_weights(scratch_adapters):
    """low_rank factorised the model, then failed recording its shapes: the refusal now comes first and names them."""
    from optimum_prune.adapters.base import DecoderStackAdapter

    class Bare(LlamaForCausalLM):
        pass

    class BareAdapter(DecoderStackAdapter):
        pass

    register_adapter(Bare)(BareAdapter)
    model = Bare(tiny_model().config)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="BareAdapter lacks layer_shape, stock_shape, write_uniform_config"):
        prune(model, PruningConfig(method="low_rank", sparsity=0.2), calibration=token_windows())
    assert model.state_dict().keys() == before.keys() and all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_an_adapter_that_removes_whole_layers_needs_no_reshape_hook(scratch_adapters):
    """Removing layers records a uniform result, which reloads without reshape_layer."""
    class Shallow(LlamaForCausalLM):
        pass

    class ShallowAdapter(LlamaAdapter):
        reshape_layer = DecoderAdapter.reshape_layer

    register_adapter(Shallow)(ShallowAdapter)
    model = Shallow(tiny_model().config)
    prune(model, PruningConfig(method="layers", method_options={"num_layers": 1}), calibration=token_windows())
    assert model.config.num_hidden_layers == len(model.model.layers) == tiny_model().config.num_hidden_layers - 1

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

from optimum_prune import ADAPTERS, PruningConfig, UnsupportedArchitecture, get_adapter, prune, verify_sparsity
from optimum_prune.adapters.base import DecoderAdapter, DecoderStackAdapter, MLPLayout, register_adapter
from optimum_prune.adapters.llama import LlamaAdapter
from optimum_prune.structure.shapes import LayerShape

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


def _model_of_an_adapter_without_reshape_layer() -> torch.nn.Module:
    """A tiny Llama of a class whose registered adapter (``ShallowAdapter``) lacks ``reshape_layer``."""

    class Shallow(LlamaForCausalLM):
        pass

    class ShallowAdapter(LlamaAdapter):
        reshape_layer = DecoderAdapter.reshape_layer

    register_adapter(Shallow)(ShallowAdapter)
    return Shallow(tiny_model().config)


def test_an_adapter_that_removes_whole_layers_needs_no_reshape_hook(scratch_adapters):
    """Removing layers records a uniform result, which reloads without reshape_layer."""
    model = _model_of_an_adapter_without_reshape_layer()
    prune(model, PruningConfig(method="layers", method_options={"num_layers": 1}), calibration=token_windows())
    assert model.config.num_hidden_layers == len(model.model.layers) == tiny_model().config.num_hidden_layers - 1


def _starcoder2() -> torch.nn.Module:
    """Starcoder2: Llama's attention, a non-gated MLP c_fc -> act -> c_proj, biases everywhere; no built-in adapter."""
    torch.manual_seed(0)
    config = Starcoder2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
    )
    return Starcoder2ForCausalLM(config).eval()


def test_register_adapter_needs_the_model_classes_and_takes_their_names(scratch_adapters):
    with pytest.raises(TypeError, match=r"register_adapter takes the model classes the adapter serves: @register_adapter\("):

        @register_adapter  # used bare, it replaced the adapter by its inner function and registered nothing
        class Bare(LlamaAdapter):
            pass

    with pytest.raises(TypeError, match="register_adapter takes the model classes"):
        register_adapter()  # registered nothing
    register_adapter("Starcoder2ForCausalLM")(LlamaAdapter)  # a name: AttributeError
    assert type(get_adapter(_starcoder2())) is LlamaAdapter


def test_a_llama_subclass_for_other_mlp_names_is_refused_naming_the_hook_before_any_cut(scratch_adapters):
    """A plugin overriding mlp() for c_fc/c_proj but inheriting Llama's layer_shape (reads mlp.down_proj): width cut
    the MLPs first and then stopped at an AttributeError recording the result."""

    @register_adapter(Starcoder2ForCausalLM)
    class Starcoder2Adapter(LlamaAdapter):
        def mlp(self, layer):
            return MLPLayout(layer.mlp, layer.mlp.c_fc)

    model = _starcoder2()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = PruningConfig(method="width", sparsity=0.25, method_options={"components": "mlp", "criterion": "magnitude_l1"})
    with pytest.raises(UnsupportedArchitecture, match=r"method 'width': Starcoder2Adapter.layer_shape fails on model.layers.0 \(AttributeError: .*down_proj"):
        prune(model, config)
    assert model.state_dict().keys() == before.keys() and all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_a_method_recording_per_layer_shapes_is_refused_where_the_adapter_cannot_reload_them(scratch_adapters):
    """low_rank's factors are recorded per layer; without reshape_layer the saved checkpoint could not be loaded."""
    model = _model_of_an_adapter_without_reshape_layer()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for config in (
        PruningConfig(method="low_rank", sparsity=0.2),
        PruningConfig(method="layers", method_options={"num_layers": 1, "reroute": True}),
    ):
        with pytest.raises(UnsupportedArchitecture, match=f"method '{config.method}': ShallowAdapter lacks reshape_layer"):
            prune(model, config, calibration=token_windows())
    assert model.state_dict().keys() == before.keys() and all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(UnsupportedArchitecture, match="lacks reshape_layer .*the checkpoint's config.json records") as error:
        get_adapter(model).reshape_layer(model.model.layers[0], LayerShape(2, 1, 64))
    assert "unstructured" not in str(error.value)  # a user loading a checkpoint has no method to change


def test_a_uniform_result_needs_no_reshape_layer_and_a_non_uniform_one_names_it(scratch_adapters):
    """Width and expert removal at one fraction per layer save as a stock config: reshape_layer was required of them
    up front; a non-uniform result is refused when recorded, naming the hook, not the family's reasons to cut."""
    from transformers import MixtralForCausalLM

    from optimum_prune.adapters.moe import MoEAdapter

    from .test_moe import tiny_moe

    model = _model_of_an_adapter_without_reshape_layer()
    prune(model, PruningConfig(method="width", sparsity=0.25), calibration=token_windows())
    assert getattr(model.config, "quantization_config", None) is None

    class PluginMixtral(MixtralForCausalLM):
        pass

    class NoReshapeMoE(MoEAdapter):
        reshape_layer = DecoderAdapter.reshape_layer

    register_adapter(PluginMixtral)(NoReshapeMoE)
    dense = tiny_moe("mixtral")
    for ignore, uniform in (([], True), (["model.layers.0.*"], False)):  # layer 0 keeping its experts: 4 and 3
        model = PluginMixtral(copy.deepcopy(dense.config)).eval()  # pruning rewrites its config
        model.load_state_dict(dense.state_dict())
        config = PruningConfig(method="experts", sparsity=0.25, ignore=ignore)
        if uniform:
            prune(model, config, calibration=token_windows(2, 16))
            assert model.config.num_local_experts == 3 and getattr(model.config, "quantization_config", None) is None
            continue
        with pytest.raises(UnsupportedArchitecture, match="NoReshapeMoE lacks reshape_layer, which reloading this result needs") as error:
            prune(model, config, calibration=token_windows(2, 16))
        assert "method='experts'" not in str(error.value)


def test_a_missing_structured_hook_is_named_with_the_method_that_needs_it(scratch_adapters):
    """'does not support structured pruning; use an unstructured method' was wrong where removing layers works."""

    class DepthOnly(LlamaForCausalLM):
        pass

    @register_adapter(DepthOnly)
    class DepthOnlyAdapter(DecoderStackAdapter):
        keep_layers = LlamaAdapter.keep_layers
        layer_shape = LlamaAdapter.layer_shape
        stock_shape = LlamaAdapter.stock_shape
        write_uniform_config = LlamaAdapter.write_uniform_config
        attention = LlamaAdapter.attention
        mlp = LlamaAdapter.mlp

    prune(DepthOnly(tiny_model().config), PruningConfig(method="layers", sparsity=0.25), calibration=token_windows())
    with pytest.raises(UnsupportedArchitecture, match=r"^method 'sublayers': DepthOnlyAdapter lacks sublayer \(DepthOnly\)") as error:
        prune(DepthOnly(tiny_model().config), PruningConfig(method="sublayers", sparsity=0.25), calibration=token_windows())
    assert "does not support structured pruning" not in str(error.value)

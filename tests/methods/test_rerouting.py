import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.adapters import get_adapter
from optimum_prune.methods.rerouting import DAMPING, NormalEquations, Reroute, fit_reroutes
from optimum_prune.structure.modules import RemovedAttention, ReroutedAttention, ReroutedMLP
from optimum_prune.structure.shapes import LayerShape

from ..conftest import assert_reloads_exactly, tiny_model, token_windows


def _logit_error(model: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - dense(ids).logits).square().mean())


def test_normal_equations_recover_an_affine_map():
    inputs = torch.randn(4, 50, 6, generator=torch.Generator().manual_seed(0))
    weight, bias = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    equations = NormalEquations(6, torch.device("cpu"))
    for chunk in inputs:  # accumulated batch by batch, as calibration streams them
        equations.add(chunk, chunk.double() @ weight.T + bias)
    fitted_weight, fitted_bias = equations.solve(damping=0.0)
    torch.testing.assert_close(fitted_weight, weight)
    torch.testing.assert_close(fitted_bias, bias)
    damped, _ = equations.solve()
    assert damped.norm() < weight.norm()  # ridge shrinks towards plain removal


def _prune_layers(reroute: bool, family: str = "llama") -> tuple[torch.nn.Module, object]:
    model = tiny_model(family, num_hidden_layers=6)
    options = {"criterion": "angular", "num_layers": 2, "reroute": reroute}
    report = prune(model, PruningConfig(method="layers", sparsity=0.3, method_options=options), calibration=token_windows())
    return model, report


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_a_removed_run_of_layers_becomes_one_fitted_map(family):
    dense = tiny_model(family, num_hidden_layers=6)
    plain, _ = _prune_layers(reroute=False, family=family)
    model, report = _prune_layers(reroute=True, family=family)

    assert len(report.removed) == 2 and len(model.model.layers) == 5  # the run of two left one stub
    stubs = [layer for layer in model.model.layers if isinstance(layer.mlp, ReroutedMLP)]
    assert len(stubs) == 1 and isinstance(stubs[0].self_attn, RemovedAttention)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(5))
    hidden = model.config.hidden_size
    assert report.parameters_after - plain.num_parameters() == hidden * hidden + hidden + hidden  # map + kept norm
    windows = token_windows()
    assert _logit_error(model, dense, windows) < _logit_error(plain, dense, windows)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_rerouted_layers_reload_exactly_and_generate_with_cache(family, tmp_path):
    model, report = _prune_layers(reroute=True, family=family)
    shapes = model.config.quantization_config.layers
    assert sum(1 for shape in shapes if shape.get("rerouted") == ["mlp"]) == 1
    reloaded = assert_reloads_exactly(model, save_pruned(model, tmp_path / "rerouted", report=report))
    assert sum(isinstance(layer.mlp, ReroutedMLP) for layer in reloaded.model.layers) == 1


def test_a_plugin_layer_shape_reporting_only_widths_records_rerouted_layers_that_reload(scratch_adapters, tmp_path):
    """The README's shape fields are widths; a plugin's layer_shape from them alone recorded a re-routed layer as
    removed, and the saved checkpoint then failed to reload: the stand-ins are now read from the layer itself."""
    from transformers import LlamaForCausalLM

    from optimum_prune import register_adapter
    from optimum_prune.adapters.llama import LlamaAdapter

    class MyLlama(LlamaForCausalLM):
        pass

    @register_adapter(MyLlama)
    class WidthsOnly(LlamaAdapter):
        def layer_shape(self, layer):
            attention, mlp = self.attention(layer), self.mlp(layer)
            return LayerShape(
                attention.num_heads if attention else 0, attention.num_kv_heads if attention else 0,
                mlp.channel_linear.out_features if mlp else 0,
            )  # fmt: skip

    model = MyLlama(tiny_model(num_hidden_layers=6).config).eval()
    options = {"criterion": "angular", "num_layers": 2, "reroute": True}
    report = prune(model, PruningConfig(method="layers", sparsity=0.3, method_options=options), calibration=token_windows())
    assert sum(1 for shape in model.config.quantization_config.layers if shape.get("rerouted") == ["mlp"]) == 1
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "rerouted", report=report))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "granite"])
def test_rerouted_sublayers_fit_each_block_within_the_budget(family, tmp_path):
    dense = tiny_model(family, num_hidden_layers=4)
    config = PruningConfig(method="sublayers", sparsity=0.3, method_options={"reroute": True})
    model = copy.deepcopy(dense)
    report = prune(model, config, calibration=token_windows())

    stand_ins = [m for m in model.modules() if isinstance(m, (ReroutedAttention, ReroutedMLP))]
    assert len(stand_ins) == len(report.removed) > 0
    linears = sum(l.weight.numel() for layer in dense.model.layers for l in layer.modules() if isinstance(l, torch.nn.Linear))
    assert report.parameters_before - report.parameters_after <= 0.3 * linears  # the maps count against the budget
    windows = token_windows()
    assert _logit_error(model, dense, windows) < _logit_error(dense_without(dense, report.removed), dense, windows)
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "rerouted-sublayers", report=report))


def dense_without(dense: torch.nn.Module, removed: list[str]) -> torch.nn.Module:
    """The dense model with the same blocks removed plainly (their output projections zeroed)."""
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for item in removed:
            name, kind = item.split()
            layer = reference.model.layers[int(name.rsplit(".", 1)[1])]
            (layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj).weight.zero_()
    return reference


def test_reroute_errors_name_the_option():
    with pytest.raises(ValueError, match="method_options.merge and reroute are alternatives"):
        PruningConfig(method="layers", sparsity=0.2, method_options={"merge": True, "reroute": True})
    with pytest.raises(ValueError, match="only removed sublayers"):
        LayerShape.from_dict({"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 0, "rerouted": ["attention"]}, "layer 0")
    with pytest.raises(ValueError, match="rerouted must list"):
        LayerShape.from_dict({"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 0, "rerouted": ["ffn"]}, "layer 0")
    with pytest.raises(ValueError, match="rerouted must list"):  # was a bare "unhashable type: 'list'"
        LayerShape.from_dict({"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 0, "rerouted": [["mlp"]]}, "layer 0")
    with pytest.raises(ValueError, match="residual_widths must be three positive integers"):  # true was a width of 1
        LayerShape.from_dict({"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 8, "residual_widths": [True, 1, 1]}, "layer 0")


def test_the_bias_is_not_damped():
    """A constant contribution is fitted exactly by the bias whatever the ridge on the weight."""
    inputs = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(0))
    constant = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0], dtype=torch.float64)
    equations = NormalEquations(6, torch.device("cpu"))
    for chunk in inputs:
        equations.add(chunk, constant.expand(40, 6))
    weight, bias = equations.solve(damping=0.5)
    torch.testing.assert_close(bias, constant)
    torch.testing.assert_close(weight, torch.zeros(6, 6, dtype=torch.float64))


def test_a_run_map_is_the_ridge_fit_of_the_runs_contribution_to_the_stream():
    dense, windows = tiny_model(num_hidden_layers=6), token_windows()
    model = tiny_model(num_hidden_layers=6)
    options = {"criterion": "angular", "num_layers": 2, "reroute": True}
    report = prune(model, PruningConfig(method="layers", sparsity=0.3, method_options=options), calibration=windows)
    removed = sorted(int(item.split()[0].rsplit(".", 1)[1]) for item in report.removed)
    assert removed[1] == removed[0] + 1  # one run of two: the stream entering the stub is the dense one
    stub = next(layer for layer in model.model.layers if isinstance(layer.mlp, ReroutedMLP))
    captured = []
    handle = stub.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=windows)
        hidden = dense(input_ids=windows, output_hidden_states=True).hidden_states  # hidden[i]: the stream entering layer i
    handle.remove()
    equations = NormalEquations(dense.config.hidden_size, torch.device("cpu"))
    equations.add(captured[0], hidden[removed[1] + 1] - hidden[removed[0]])
    weight, bias = equations.solve()
    torch.testing.assert_close(stub.mlp.map.weight.detach().double(), weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(stub.mlp.map.bias.detach().double(), bias, rtol=1e-3, atol=1e-4)


def test_ridge_is_the_damping_times_the_mean_weight_diagonal_written_out():
    """λ = DAMPING × mean diag(XᵀX) over the weight features only (not the bias's token count)."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(200, 5, generator=g, dtype=torch.float64)  # small features: the bias diagonal (200) dominates a mean over all
    t = torch.randn(200, 5, generator=g, dtype=torch.float64)
    equations = NormalEquations(5, torch.device("cpu"))
    equations.add(x, t)
    weight, bias = equations.solve()
    z = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    gram = z.T @ z
    ridge = torch.diag(torch.cat([torch.full((5,), DAMPING * float((x * x).sum(0).mean())), torch.zeros(1, dtype=torch.float64)]))
    solution = torch.linalg.solve(gram + ridge, z.T @ t)
    torch.testing.assert_close(weight, solution[:5].T)
    torch.testing.assert_close(bias, solution[5])


def test_a_layers_mlp_map_is_fitted_on_the_stream_its_fitted_attention_map_feeds():
    """Both sublayers of one layer re-routed: the MLP's map is the ridge fit of the original MLP on the inputs it gets
    from the pruned model, i.e. after the attention map was fitted (fit attention first)."""
    model, windows = tiny_model(num_hidden_layers=3), token_windows()
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[1]
    original_mlp = copy.deepcopy(adapter.sublayer_contribution(layer, "mlp"))
    reroutes = {1: []}
    for kind in ("attention", "mlp"):
        original = adapter.sublayer_contribution(layer, kind)
        adapter.reroute_sublayer(layer, kind)
        reroutes[1].append(Reroute(kind, [original]))
    fit_reroutes(adapter, windows, torch.device("cpu"), reroutes)
    stand_in = adapter.sublayer(layer, "mlp")
    captured = []
    handle = stand_in.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=windows)
        handle.remove()
        equations = NormalEquations(model.config.hidden_size, torch.device("cpu"))
        for x in captured:
            equations.add(x, original_mlp(x))
    weight, bias = equations.solve()
    torch.testing.assert_close(stand_in.map.weight.detach().double(), weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(stand_in.map.bias.detach().double(), bias, rtol=1e-3, atol=1e-4)

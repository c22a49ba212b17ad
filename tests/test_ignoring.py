"""`ignore` keeps what a pattern names and everything inside it, in every method: a module's name
(`model.layers.0.self_attn`, `*.mlp`) keeps its linears; a whole layer or block holding a kept module
is never removed."""

from __future__ import annotations

import pytest
import torch

from optimum_prune import PruningConfig, prune, verify_sparsity
from optimum_prune.ignoring import check_kept, holds_ignored, is_ignored, kept_modules

from .conftest import tiny_model, token_windows


def test_a_pattern_keeps_the_module_it_names_and_everything_inside():
    assert is_ignored("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn"])
    assert is_ignored("model.layers.2.mlp.up_proj", ["*.mlp"])
    assert not is_ignored("model.layers.10.mlp.up_proj", ["model.layers.1"])
    layer = tiny_model().model.layers[0]
    assert holds_ignored("model.layers.0", layer, ["model.layers.0.*"])
    assert holds_ignored("model.layers.0.mlp", layer.mlp, ["*.down_proj"])
    assert not holds_ignored("model.layers.0.mlp", layer.mlp, ["*.o_proj"])


@pytest.mark.parametrize("pattern", ["model.layers.0.self_attn", "model.layers.0"])
def test_unstructured_pruning_leaves_the_linears_of_an_ignored_module(pattern):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5, ignore=[pattern]))
    assert not (model.model.layers[0].self_attn.q_proj.weight == 0).any()
    assert (model.model.layers[1].self_attn.q_proj.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    kept = verify_sparsity(model, ignore=["lm_head", pattern])["layers"]
    assert not any(name.startswith(pattern + ".") for name in kept)


def test_layer_removal_keeps_a_layer_whose_modules_are_ignored():
    model = tiny_model(num_hidden_layers=4)
    report = prune(model, PruningConfig(method="layers", sparsity=0.0, ignore=["model.layers.0.*", "model.layers.1.mlp.*"],
                                        method_options={"num_layers": 2}), calibration=token_windows())  # fmt: skip
    assert report.removed == ["model.layers.2", "model.layers.3"]


def test_sublayer_removal_keeps_a_block_holding_an_ignored_linear():
    model = tiny_model(num_hidden_layers=4)
    ignore = [f"model.layers.{index}.mlp.down_proj" for index in (1, 2, 3)]  # without them, layer 3's MLP goes
    report = prune(model, PruningConfig(method="sublayers", sparsity=0.2, ignore=ignore, method_options={"sublayers": "mlp"}),
                   calibration=token_windows())  # fmt: skip
    assert report.removed == ["model.layers.0 mlp"]


@pytest.mark.parametrize(
    "family, sublayers, norm, reroute",
    [("llama", "mlp", "post_attention_layernorm", False), ("llama", "attention", "input_layernorm", False),
     ("gemma2", "mlp", "post_feedforward_layernorm", False), ("gemma2", "mlp", "post_feedforward_layernorm", True),
     ("gemma2", "attention", "post_attention_layernorm", False)],
)  # fmt: skip
def test_sublayer_removal_keeps_a_block_whose_norm_is_ignored(family, sublayers, norm, reroute):
    """Removing a block also replaces its norms: it went ahead and was stopped only after (the model already cut)."""
    model = tiny_model(family, num_hidden_layers=4)
    kept = f"model.layers.1.{norm}"
    config = PruningConfig(method="sublayers", sparsity=0.6, ignore=[kept], method_options={"sublayers": sublayers, "reroute": reroute})
    report = prune(model, config, calibration=token_windows())
    assert report.removed and f"model.layers.1 {sublayers}" not in report.removed
    assert isinstance(model.get_submodule(kept), torch.nn.Module) and not isinstance(model.get_submodule(kept), torch.nn.Identity)


def test_width_pruning_keeps_the_width_of_an_ignored_block():
    model = tiny_model()
    prune(model, PruningConfig(method="width", sparsity=0.1, ignore=["*.mlp"], method_options={"criterion": "magnitude_l1"}))
    assert all(layer.mlp.gate_proj.out_features == 128 for layer in model.model.layers)
    assert any(layer.self_attn.q_proj.out_features < 64 for layer in model.model.layers)


@pytest.mark.parametrize(
    ("method", "sparsity", "options"),
    [("experts", 0.5, {"criterion": "frequency"}), ("experts", 0.5, {"criterion": "frequency", "ranking": "global"}),
     ("merge_experts", 0.5, {}), ("mpoe", 0.2, {})],
)  # fmt: skip
def test_expert_methods_leave_a_kept_moe_block_as_it_is(method, sparsity, options, tmp_path):
    from transformers import AutoModelForCausalLM

    from .adapters.test_moe import tiny_moe

    model = tiny_moe()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = PruningConfig(method=method, sparsity=sparsity, ignore=["model.layers.0.block_sparse_moe.experts.1"], method_options=options)
    prune(model, config, calibration=token_windows(4, 16))
    state = model.state_dict()
    layer0 = [name for name in before if name.startswith("model.layers.0.block_sparse_moe.")]
    assert all(torch.equal(state[name], before[name]) for name in layer0)
    assert any(name not in state or not torch.equal(state[name], tensor) for name, tensor in before.items() if name.startswith("model.layers.1."))
    model.save_pretrained(tmp_path / "moe")
    ids = token_windows(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()(ids).logits, model(ids).logits)


def test_keeping_every_moe_block_is_an_error_naming_ignore():
    from .adapters.test_moe import tiny_moe

    with pytest.raises(ValueError, match=r"PruningConfig.ignore \['\*.block_sparse_moe'\] keeps every MoE block"):
        prune(tiny_moe(), PruningConfig(method="experts", sparsity=0.5, ignore=["*.block_sparse_moe"]), calibration=token_windows(4, 16))


@pytest.mark.parametrize(
    "change, message", [("scale", "changed the parameters of"), ("permute", "changed the parameters of"), ("replace", "removed or replaced")]
)
def test_a_structured_method_that_changes_a_kept_module_is_stopped_naming_it(scratch_methods, change, message):
    """Each built-in keeps what ignore names by asking holds_ignored; a plugin's structured method that does not is
    caught after it runs (by identity, so a kept module renumbered by a removed layer still counts as kept)."""
    from optimum_prune import register_structured_method
    from optimum_prune.methods import StructuredMethod

    @register_structured_method("careless")
    class Careless(StructuredMethod):
        """Changes layer 1's output projection whatever ignore says (a plugin's bug)."""

        @classmethod
        def needs_calibration(cls, options):
            return False

        def prune(self, windows, report):
            attention = self.adapter.model.model.layers[1].self_attn
            with torch.no_grad():
                if change == "scale":
                    attention.o_proj.weight.mul_(0.5)
                elif change == "permute":  # the same values in other places
                    attention.o_proj.weight.copy_(attention.o_proj.weight.flip(0))
                else:
                    attention.o_proj = torch.nn.Linear(attention.o_proj.in_features, attention.o_proj.out_features, bias=False)

    with pytest.raises(RuntimeError, match=rf"structured method 'careless' {message} model.layers.1.self_attn.o_proj, which PruningConfig.ignore keeps"):
        prune(tiny_model(), PruningConfig(method="careless", sparsity=0.2, ignore=["*.o_proj"]))
    prune(tiny_model(), PruningConfig(method="careless", sparsity=0.2, ignore=["*.q_proj"]))  # what it changes is not kept


def test_a_kept_module_holding_nan_that_stays_as_it_was_is_kept():
    """NaN never equals itself: a kept module with a NaN weight was reported as changed, after the method had run.
    (``prune`` now refuses a model holding NaN before any method runs, so the check is called directly.)"""
    model = tiny_model(num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    kept = kept_modules(model, ["model.layers.0.*"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()  # a change outside what ignore keeps
    check_kept(model, kept, "layers")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 1] += 1
    with pytest.raises(RuntimeError, match="'layers' changed the parameters of model.layers.0.self_attn.o_proj, which"):
        check_kept(model, kept, "layers")

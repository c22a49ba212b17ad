"""Granite: Llama's layout with scaled sublayer terms (residual_multiplier) and scaled logits (logits_scaling)."""

import pytest
from transformers import GraniteModel

from optimum_prune import PruningConfig, get_adapter, prune, save_pruned
from optimum_prune.adapters.granite import GraniteAdapter

from ..conftest import assert_stock_reload_matches, output_errors, tiny_model, token_windows


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
    model = tiny_model("granite")
    config = PruningConfig(method=method, sparsity=0.25, method_options={**options, **({"ranking": "layer"} if method == "width" else {})})
    report = prune(model, config, calibration=token_windows())
    assert report.parameters_after < report.parameters_before
    directory = save_pruned(model, tmp_path / method, report=report)
    assert assert_stock_reload_matches(model, directory, token_windows(samples=2, seq_len=16, seed=3), tmp_path) == method

import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.methods.layers import CRITERIA

from ..conftest import tiny_model, token_windows


@pytest.mark.parametrize("criterion", CRITERIA)
def test_removed_layers_act_as_identity(criterion):
    dense = tiny_model(num_hidden_layers=6)
    model = copy.deepcopy(dense)
    report = prune(model, PruningConfig(method="layers", sparsity=0.0, method_options={"criterion": criterion, "num_layers": 2}), calibration=token_windows())

    removed = [int(name.rsplit(".", 1)[1]) for name in report.removed]
    assert len(removed) == 2 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert len(report.layer_scores[criterion]) == (5 if criterion == "angular" else 6)
    if criterion == "angular":
        assert removed[1] == removed[0] + 1  # n consecutive layers
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for index in removed:  # a layer whose output projections are zero adds nothing to the residual
            reference.model.layers[index].self_attn.o_proj.weight.zero_()
            reference.model.layers[index].mlp.down_proj.weight.zero_()
        ids = token_windows(samples=2, seq_len=16, seed=3)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert not hasattr(model.config, "quantization_config")  # uniform: a stock config describes it


def test_block_influence_removes_the_layers_closest_to_identity():
    model = tiny_model(num_hidden_layers=4)
    with torch.no_grad():
        for index in (1, 2):
            model.model.layers[index].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[index].mlp.down_proj.weight.mul_(1e-3)
    report = prune(model, PruningConfig(method="layers", sparsity=0.5), calibration=token_windows())
    assert report.removed == ["model.layers.1", "model.layers.2"]


def test_angular_distance_removes_the_closest_run_measured_at_the_last_token():
    """Gromov et al.: d(l, l+n) = arccos(cos(x_l, x_l+n)) / pi at each window's last token, the run with the least
    removed. Only "the removed layers are consecutive" was checked: the farthest run, a span one short, or the first
    token all passed."""
    import math

    from optimum_prune.methods.layers import angular_distances

    one_hot = list(torch.eye(4)[[0, 0, 1, 1]].unsqueeze(1))  # x0 = x1, x2 = x3, orthogonal to them
    assert angular_distances(one_hot, 2) == [0.5, 0.5]
    model, windows = tiny_model(num_hidden_layers=6), token_windows()
    with torch.no_grad():
        for index in (3, 4):
            model.model.layers[index].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[index].mlp.down_proj.weight.mul_(1e-3)
        states = [h[:, -1] for h in model(windows, output_hidden_states=True).hidden_states[:6]]
    expected = [float(torch.arccos(torch.cosine_similarity(states[s], states[s + 2], dim=-1).clamp(-1, 1)).mean() / math.pi) for s in range(4)]
    options = {"criterion": "angular", "num_layers": 2}
    report = prune(model, PruningConfig(method="layers", sparsity=0.3, method_options=options), calibration=windows)
    assert report.layer_scores["angular"][:4] == pytest.approx(expected, abs=1e-5)
    assert report.removed == ["model.layers.3", "model.layers.4"]


def test_taylor_scores_each_layer_by_its_first_order_loss_change():
    """Shortened LLaMA's Taylor score: Σ|θ·∂L/∂θ| over a layer's parameters, L the mean calibration loss (the absolute
    value of the summed products, which cancel, passed every test)."""
    dense, windows = tiny_model(num_hidden_layers=4), token_windows(4, 16)
    reference = copy.deepcopy(dense)
    loss = sum(reference(input_ids=window[None], labels=window[None]).loss for window in windows) / len(windows)
    loss.backward()
    expected = [sum(float((p.detach() * p.grad).abs().sum()) for p in layer.parameters()) for layer in reference.model.layers]
    options = {"criterion": "taylor", "num_layers": 1}
    report = prune(dense, PruningConfig(method="layers", sparsity=0.25, method_options=options), calibration=windows)
    assert report.layer_scores["taylor"] == pytest.approx(expected, rel=1e-3)


def test_block_influence_is_one_minus_the_mean_token_cosine_across_each_layer():
    from optimum_prune import get_adapter
    from optimum_prune.methods.layers import block_influence

    model, windows = tiny_model(num_hidden_layers=4), token_windows()
    scores = block_influence(get_adapter(model), windows, torch.device("cpu"))
    with torch.no_grad():  # hidden_states[i] enters layer i; the last entry is after the final norm
        states = [model(window[None], output_hidden_states=True).hidden_states for window in windows]
    for index in range(3):
        cosines = torch.cat([torch.nn.functional.cosine_similarity(s[index], s[index + 1], dim=-1).flatten() for s in states])
        assert scores[index] == pytest.approx(1 - float(cosines.mean()), abs=1e-5)
    assert len(scores) == 4


def test_sparsity_rounds_to_whole_layers_and_ignore_protects():
    model = tiny_model(num_hidden_layers=5)
    report = prune(model, PruningConfig(method="layers", sparsity=0.4, ignore=["model.layers.[0-2]"]), calibration=token_windows())
    assert report.removed == ["model.layers.3", "model.layers.4"]


def test_merge_adds_parameter_differences_into_the_previous_layer():
    dense = tiny_model(num_hidden_layers=4)
    model = copy.deepcopy(dense)
    report = prune(model, PruningConfig(method="layers", sparsity=0.0, method_options={"num_layers": 2, "merge": True}), calibration=token_windows())
    removed = [int(name.rsplit(".", 1)[1]) for name in report.removed]
    kept = [i for i in range(4) if i not in removed]
    weight = [layer.mlp.up_proj.weight for layer in dense.model.layers]
    for position, target in enumerate(kept):  # LaCo: θ_t + Σ (θ_r − θ_t) over the removed layers after t (before the first kept)
        merged = [r for r in removed if max([k for k in kept if k < r], default=kept[0]) == target]
        expected = weight[target] + sum((weight[r] - weight[target] for r in merged), torch.zeros_like(weight[target]))
        torch.testing.assert_close(model.model.layers[position].mlp.up_proj.weight, expected)


def test_merge_into_a_layer_ignore_keeps_is_refused_before_any_change():
    """It merged into the kept layer all the same, changing what ignore keeps."""
    model = tiny_model(num_hidden_layers=4)
    before = copy.deepcopy(model.state_dict())
    config = PruningConfig(method="layers", sparsity=0.0, ignore=["model.layers.0", "model.layers.3"], method_options={"num_layers": 2, "merge": True})
    with pytest.raises(ValueError, match=r"merge would add model.layers.1, model.layers.2 into model.layers.0, which PruningConfig.ignore"):
        prune(model, config, calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    "sparsity, options, message",
    [(0.0, {"num_layers": 3}, "the model has 3"), (0.1, {}, "rounds to 0"), (0.0, {"num_layers": 5}, "the model has 3")],
)
def test_impossible_layer_counts(sparsity, options, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny_model(), PruningConfig(method="layers", sparsity=sparsity, method_options=options), calibration=token_windows())


def test_layer_scores_plot(tmp_path):
    report = prune(tiny_model(num_hidden_layers=4), PruningConfig(method="layers", sparsity=0.25), calibration=token_windows())
    for name, magic in (("scores.png", b"\x89PNG\r\n\x1a\n"), ("scores.svg", b"<?xml"), ("scores.PDF", b"%PDF"), ("scores.v2", b"\x89PNG")):
        report.plot_layer_scores(tmp_path / name)  # the format its suffix names, as savefig(path) writes it (all were PNG)
        assert (tmp_path / name).read_bytes().startswith(magic)
    assert "block_influence per layer" in str(report)


def test_rerouting_layers_after_a_sublayer_was_removed_is_refused():
    model = tiny_model(num_hidden_layers=4)
    windows = token_windows()
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "mlp"}), calibration=windows)
    with pytest.raises(ValueError, match="method_options.reroute .* has already lost a sublayer"):
        prune(model, PruningConfig(method="layers", sparsity=0.25, method_options={"reroute": True}), calibration=windows)


def test_qwen2s_sliding_window_threshold_follows_the_kept_layers(tmp_path):
    """max_window_layers (layers from this index on slide; vLLM reads it) kept its old value after removal."""
    from transformers import AutoConfig

    model = tiny_model("qwen2", num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, sliding_window=8)
    prune(model, PruningConfig(method="layers", sparsity=0.0, ignore=["model.layers.[1-3]"], method_options={"num_layers": 1}),
          calibration=token_windows())  # fmt: skip
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoConfig.from_pretrained(tmp_path / "pruned")
    rebuilt = type(reloaded)(**{**reloaded.to_dict(), "layer_types": None})  # derived from max_window_layers alone
    assert rebuilt.layer_types == reloaded.layer_types


def test_a_layer_count_is_reported_as_the_sparsity_it_removes():
    """``num_layers`` overrides ``sparsity``: the report says what was removed; the record is the recipe as given."""
    config = PruningConfig(method="layers", method_options={"num_layers": 2})
    model = tiny_model(num_hidden_layers=6)
    report = prune(model, config, calibration=token_windows())
    assert report.sparsity == pytest.approx(2 / 6) and str(report).startswith("Pruning report: layers 0.3333, on cpu")
    assert PruningConfig.from_dict(model.config.pruning_config) == config
    rounded = prune(tiny_model(num_hidden_layers=3), PruningConfig(method="layers", sparsity=0.5), calibration=token_windows())
    assert rounded.sparsity == pytest.approx(1 / 3)  # 0.5 of 3 layers: 1.5 keeps the larger count, 2 layers


@pytest.mark.parametrize(("layers", "removed"), [(3, 1), (5, 2), (7, 3), (4, 2)])
def test_half_a_layer_keeps_the_layer_whatever_the_count(layers, removed):
    """round() took halves to even: sparsity 0.5 removed 2 of 3 layers, 2 of 5 and 4 of 7."""
    model = tiny_model(num_hidden_layers=layers)
    prune(model, PruningConfig(method="layers", sparsity=0.5), calibration=token_windows(2, 16))
    assert model.config.num_hidden_layers == layers - removed


def test_merge_of_two_removed_layers_into_one_target_adds_both_differences():
    """LaCo: layers 2 and 3 merge into layer 1, the kept layer just before them (not the first kept one), each adding
    its difference from layer 1's original weights."""
    dense = tiny_model(num_hidden_layers=4)
    with torch.no_grad():
        for index in (2, 3):  # the two closest to identity: block influence removes them, both merge into layer 1
            dense.model.layers[index].self_attn.o_proj.weight.mul_(1e-3)
            dense.model.layers[index].mlp.down_proj.weight.mul_(1e-3)
    model = copy.deepcopy(dense)
    report = prune(model, PruningConfig(method="layers", sparsity=0.0, method_options={"num_layers": 2, "merge": True}), calibration=token_windows())
    assert report.removed == ["model.layers.2", "model.layers.3"]
    w = [layer.mlp.up_proj.weight for layer in dense.model.layers]
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, w[1] + (w[2] - w[1]) + (w[3] - w[1]))


def test_the_perplexity_criterion_shows_its_progress(capsys):
    """A full-model pass over the calibration set per layer ran without a bar."""
    config = PruningConfig(method="layers", method_options={"num_layers": 1, "criterion": "perplexity"})
    prune(tiny_model(), config, calibration=token_windows())
    assert "Perplexity without each layer" in capsys.readouterr().err

"""K-prune: the coarsened knowledge KL, the budgeted threshold, knowledge-preserving tuning, reload."""

import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.adapters import get_adapter
from optimum_prune.calibration import capture_first_layer_inputs
from optimum_prune.methods.kprune import MIN_TOKENS_PER_COLUMN, KPrune, KPruneOptions, TeacherTargets, threshold_removal

from ..conftest import assert_reloads_exactly, decoder_linear_parameters, output_errors, tiny_model, token_windows


def test_threshold_keeps_the_best_scored_units_that_fit_and_cuts_only_the_target():
    target, above = torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 2.0])
    # Budget 3 units of cost 1: 5, 4, 3 fit; the threshold is 2, so the target loses only unit 1.
    assert threshold_removal([target, above], [1, 1], [2, 1], budget=3).tolist() == [1]
    # Costlier units above: 5 (cost 1) and 4 (cost 2) fill the budget; 3 and 1 go.
    assert threshold_removal([target, above], [1, 2], [2, 1], budget=3).tolist() == [1, 2]
    assert threshold_removal([target, above], [1, 1], [2, 1], budget=10).tolist() == []  # everything fits
    assert threshold_removal([target, above], [1, 1], [2, 1], budget=0).tolist() == [1, 2]  # one unit is always kept
    # Each component's best unit is kept anyway, so it is charged first: with budget 2, the target keeps 5 and
    # the later component its 0.5 (ranked with the rest, 3 took that place and the model ended above budget).
    assert threshold_removal([target, torch.tensor([0.5])], [1, 1], [2, 0], budget=2).tolist() == [1, 2]

    # Units tied at the threshold (dead ones) go only as far as the budget needs: two of seven, not all of them.
    tied = threshold_removal([torch.tensor([0.0] * 7 + [1.0])], [10], [7], budget=60.0)
    assert len(tied) == 2 and 7 not in tied


def test_a_target_where_every_component_keeps_only_one_unit_is_reached():
    """Near the most a model can lose, later components' one kept unit was not budgeted: 0.75 ended at 0.717."""
    model = tiny_model()
    before = decoder_linear_parameters(model)
    prune(model, PruningConfig(method="kprune", sparsity=0.75), calibration=token_windows(samples=8, seq_len=32))
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.75, abs=0.005)


def test_every_seed_the_config_takes_runs():
    model = tiny_model()
    before = decoder_linear_parameters(model)
    prune(model, PruningConfig(method="kprune", sparsity=0.2, seed=2**64 - 1), calibration=token_windows(samples=4, seq_len=16))
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.2, abs=0.01)


def test_coarsened_kl_is_zero_for_the_teacher_and_exact_with_the_whole_vocabulary():
    model, windows = tiny_model(), token_windows(samples=2)
    vocabulary = model.config.vocab_size
    teacher = TeacherTargets.of(model, windows, torch.device("cpu"), k=vocabulary - 1, temperature=2.0)
    with torch.no_grad():
        logits = model(input_ids=windows[:1]).logits
        assert float(teacher.kl(0, logits)) == pytest.approx(0.0, abs=1e-6)
        other = logits + torch.randn_like(logits)
        p, q = (logits / 2).log_softmax(-1), (other / 2).log_softmax(-1)
        exact = (p.exp() * (p - q)).sum(-1).mean() * 4
        torch.testing.assert_close(teacher.kl(0, other), exact, rtol=1e-4, atol=1e-6)
        coarse = TeacherTargets.of(model, windows, torch.device("cpu"), k=4, temperature=2.0)
        assert 0 < float(coarse.kl(0, other)) < float(exact)  # coarsening never adds divergence


def test_sampled_gradient_is_an_unbiased_estimate_of_the_kl_gradient_and_informative_at_the_teacher():
    model, windows = tiny_model(), token_windows(samples=1)
    teacher = TeacherTargets.of(model, windows, torch.device("cpu"), k=8, temperature=2.0)
    with torch.no_grad():
        dense = model(input_ids=windows).logits
    noise = torch.randn(dense.shape, generator=torch.Generator().manual_seed(0))
    student = (dense + 5 * noise).requires_grad_(True)  # far enough from the teacher for the KL gradient to stand out
    (kl_gradient,) = torch.autograd.grad(teacher.kl(0, student), student)
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([torch.autograd.grad(teacher.sampled_nll(0, student, generator), student)[0] for _ in range(1000)])
    # The mean's squared error over all logits is, in expectation, the summed variance over the draws.
    squared_error, expected = (samples.mean(0) - kl_gradient).square().sum(), samples.var(0).sum() / len(samples)
    assert squared_error < 2 * expected < 0.1 * kl_gradient.square().sum()
    at_teacher = dense.clone().requires_grad_(True)
    assert float(torch.autograd.grad(teacher.kl(0, at_teacher), at_teacher)[0].abs().max()) < 1e-6  # the KL's: zero
    assert float(torch.autograd.grad(teacher.sampled_nll(0, at_teacher, generator), at_teacher)[0].abs().max()) > 1e-3


def test_hits_the_budget_keeps_a_valid_gqa_layout_and_reloads(tmp_path):
    model = tiny_model()
    before = decoder_linear_parameters(model)
    report = prune(model, PruningConfig(method="kprune", sparsity=0.3, method_options={"head_weight": 1.0}), calibration=token_windows())
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.3, abs=0.02)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features % layer.self_attn.k_proj.out_features == 0
    assert report.removed and "removed knowledge score (mlp)" in report.layer_scores
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def test_weight_tuning_brings_the_output_closer_to_the_dense_model():
    windows = token_windows(samples=MIN_TOKENS_PER_COLUMN * 4)  # 32 tokens per window: enough for every kept column
    errors = output_errors("kprune", 0.3, "tune", windows=windows)
    assert errors[True] < 0.8 * errors[False], errors


def test_under_determined_weight_tuning_is_skipped_and_reported():
    """With fewer than MIN_TOKENS_PER_COLUMN calibration tokens per kept column the least squares would
    overfit: the cut stays, the refit is skipped, and the report says so."""
    windows = token_windows(samples=2, seq_len=16)  # 32 tokens against ~100 kept MLP columns
    tuned, untuned = tiny_model(), tiny_model()
    report = prune(tuned, PruningConfig(method="kprune", sparsity=0.3), calibration=windows)
    prune(untuned, PruningConfig(method="kprune", sparsity=0.3, method_options={"tune": False}), calibration=windows)
    assert any("weight tuning skipped" in note and "mlp" in note for note in report.notes)
    down = lambda model: model.model.layers[2].mlp.down_proj.weight  # noqa: E731
    assert torch.equal(down(tuned), down(untuned))  # the last layer's MLP: cut, not refitted


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PruningConfig(method="kprune", method_options={"temperature": 0})
    with pytest.raises(ValueError, match="teacher_top_k"):
        PruningConfig(method="kprune", method_options={"teacher_top_k": 0})
    # Options that change nothing where they were accepted: every candidate is a head, or no predictive score
    with pytest.raises(ValueError, match=r"head_weight applies only with components='all', not components='attention'"):
        PruningConfig(method="kprune", method_options={"components": "attention", "head_weight": 8.0})
    with pytest.raises(ValueError, match=r"temperature applies only with predictive_weight != 0, not predictive_weight=0.0"):
        PruningConfig(method="kprune", method_options={"predictive_weight": 0.0, "temperature": 1.0})
    with pytest.raises(ValueError, match="can remove at most"):
        prune(tiny_model(), PruningConfig(method="kprune", sparsity=0.99), calibration=token_windows())


def _scores(options, windows):
    model = tiny_model()
    method = KPrune(get_adapter(model), 0.2, [], options, torch.device("cpu"), seed=3)
    method.check()
    inputs = capture_first_layer_inputs(method.adapter, windows, torch.device("cpu"))
    teacher = TeacherTargets.of(model, windows, torch.device("cpu"), options.teacher_top_k, options.temperature)
    components = method.units.components
    return model, components, teacher, method._knowledge_scores(0, components, inputs, teacher)


def _consumers(model, components):
    return [model.model.layers[c.layer].self_attn.o_proj if c.kind == "attention" else model.model.layers[c.layer].mlp.down_proj for c in components]


def test_representational_score_is_the_column_energy_per_parameter_heads_weighted():
    """Z_rep(u) = mean over u's columns c of E_tokens[x_c²] · mean_i W[i, c]²; score = λ_rep·Z_rep·(μ for heads)/cost."""
    windows = token_windows(samples=2, seq_len=16)
    options = KPruneOptions(predictive_weight=0.0, representational_weight=2.0, head_weight=8.0)
    model, components, _, scores = _scores(options, windows)
    consumers = _consumers(model, components)
    energy = {}
    handles = [c.register_forward_pre_hook(lambda m, args: energy.__setitem__(m, energy.get(m, 0) + args[0].double().square().sum((0, 1))))
               for c in consumers]
    with torch.no_grad():
        for window in windows:
            model(input_ids=window.unsqueeze(0))
    for handle in handles:
        handle.remove()
    for component, consumer, score in zip(components, consumers, scores):
        per_column = energy[consumer] / windows.numel() * consumer.weight.detach().double().square().mean(0)
        units = component.removable + 1
        expected = 2.0 * per_column.reshape(units, -1).mean(1) * (8.0 if component.kind == "attention" else 1.0) / component.unit_parameters
        torch.testing.assert_close(score.double(), expected, rtol=1e-4, atol=0)


def test_predictive_score_is_the_mean_over_windows_of_half_the_squared_mask_gradient():
    """Z_pred(u) = mean over windows of ½ (∂ℓ/∂m_c)², averaged over u's columns, ℓ the sampled T²-scaled NLL."""
    windows = token_windows(samples=3, seq_len=16)
    options = KPruneOptions(predictive_weight=1.0, representational_weight=0.0, head_weight=1.0)
    model, components, teacher, scores = _scores(options, windows)
    consumers = _consumers(model, components)
    masks = [torch.ones(c.in_features, requires_grad=True) for c in consumers]
    handles = [c.register_forward_pre_hook(lambda _m, args, mask=mask: (args[0] * mask,)) for c, mask in zip(consumers, masks)]
    generator = torch.Generator().manual_seed(3)  # seed + first layer
    squared = [torch.zeros(c.in_features, dtype=torch.float64) for c in consumers]
    for index, window in enumerate(windows):
        logits = model(input_ids=window.unsqueeze(0)).logits
        for total, gradient in zip(squared, torch.autograd.grad(teacher.sampled_nll(index, logits, generator), masks)):
            total += gradient.double().square() / 2
    for handle in handles:
        handle.remove()
    for component, total, score in zip(components, squared, scores):
        expected = (total / len(windows)).reshape(component.removable + 1, -1).mean(1) / component.unit_parameters
        torch.testing.assert_close(score.double(), expected, rtol=1e-3, atol=1e-12)


def test_weight_tuning_of_a_biased_output_projection_fits_around_its_bias():
    """o_proj / down_proj with a bias: the least squares fit the target minus the bias, so tuning helps there too."""
    dense = tiny_model(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for layer in dense.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.bias.copy_(0.5 * torch.randn(linear.bias.shape, generator=generator))
    errors = output_errors("kprune", 0.3, "tune", windows=token_windows(samples=MIN_TOKENS_PER_COLUMN * 4), dense=dense)
    assert errors[True] < 0.8 * errors[False], errors


def test_without_tuning_no_sublayer_is_reported_as_left_untuned_for_too_few_tokens():
    """tune=False asks for no refit: the note about too few calibration tokens must not appear."""
    report = prune(tiny_model(), PruningConfig(method="kprune", sparsity=0.3, method_options={"tune": False}),
                   calibration=token_windows(samples=2, seq_len=16))
    assert report.removed and not any("weight tuning skipped" in note for note in report.notes)


def test_a_sublayer_that_loses_no_unit_is_left_as_it_is():
    dense, model = tiny_model(), tiny_model()
    prune(model, PruningConfig(method="kprune", sparsity=0.05), calibration=token_windows(samples=MIN_TOKENS_PER_COLUMN * 4))
    untouched = 0
    for before, after in zip(dense.model.layers, model.model.layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            old, new = before.get_submodule(name), after.get_submodule(name)
            if new.in_features == old.in_features:
                untouched += 1
                assert torch.equal(new.weight, old.weight), name
    assert untouched




def _streams_after_attention(model, windows):
    streams, entering = [], {}
    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args, kwargs: entering.update(x=(args[0] if args else kwargs["hidden_states"])), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(lambda m, args, output: streams.append(entering["x"] + output[0])))
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return streams


def test_attention_refit_reproduces_the_dense_stream_after_the_attention():
    """The first sublayer that loses heads is refitted so that the stream leaving it matches the dense one
    (least squares on the calibration tokens): closer than the cut alone, whatever the MLP after it adds."""
    windows = token_windows(samples=MIN_TOKENS_PER_COLUMN * 4)
    dense = tiny_model()
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.down_proj.weight.mul_(30)  # an MLP whose output is not negligible next to the attention's
    reference = _streams_after_attention(dense, windows)
    errors = {}
    for tune in (False, True):
        model = copy.deepcopy(dense)
        prune(model, PruningConfig(method="kprune", sparsity=0.15, method_options={"tune": tune, "components": "attention"}),
              calibration=windows)
        first = next(i for i, layer in enumerate(model.model.layers) if layer.self_attn.k_proj.out_features < 32)
        errors[tune] = float((_streams_after_attention(model, windows)[first] - reference[first]).square().mean())
    assert errors[True] < errors[False], errors


def test_the_damping_option_shrinks_the_refit():
    """A heavier ridge gives a different, smaller refit of the kept columns."""
    windows = token_windows(samples=MIN_TOKENS_PER_COLUMN * 4)
    norms = {}
    for damping in (0.0, 10.0):
        model = tiny_model()
        prune(model, PruningConfig(method="kprune", sparsity=0.3, method_options={"damping": damping}), calibration=windows)
        norms[damping] = sum(float(layer.mlp.down_proj.weight.norm()) for layer in model.model.layers)
    assert norms[10.0] < 0.9 * norms[0.0], norms


def test_the_kl_gradient_is_zero_while_the_model_is_dense():
    """predictive_gradient='kl' (the official code's): at the dense model K_pred is at its minimum, so Z_pred = 0."""
    options = KPruneOptions(predictive_weight=1.0, representational_weight=0.0, head_weight=1.0, predictive_gradient="kl")
    _, _, _, scores = _scores(options, token_windows(samples=2, seq_len=16))
    assert max(float(score.abs().max()) for score in scores) < 1e-10


def test_round_to_leaves_mlp_widths_a_multiple_of_it():
    model = tiny_model()
    prune(model, PruningConfig(method="kprune", sparsity=0.3, method_options={"round_to": 8}), calibration=token_windows())
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(width % 8 == 0 for width in widths) and sum(widths) < 3 * 128, widths

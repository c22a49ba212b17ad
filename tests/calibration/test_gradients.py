"""Calibration gradients, Hutchinson Hessian traces and the calibration perplexity, each against its definition
written out (the loss-scale tests compare each with itself in float32, where a normalisation error cancels)."""

import math

import torch

from optimum_prune.calibration.gradients import calibration_gradients, calibration_perplexity, hessian_traces, math_attention

from ..conftest import tiny_model, token_windows


def test_calibration_gradients_are_the_mean_of_the_windows_gradients():
    model = tiny_model()
    windows = token_windows(samples=3, seq_len=8)
    parameters = [model.model.layers[0].mlp.down_proj.weight, model.model.layers[2].self_attn.q_proj.weight]
    per_window = [torch.autograd.grad(model(input_ids=w[None], labels=w[None]).loss, parameters) for w in windows]
    expected = [sum(grads[i] for grads in per_window) / len(windows) for i in range(len(parameters))]
    with calibration_gradients(model, windows, parameters):
        got = [p.grad.clone() for p in parameters]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_hessian_traces_average_each_windows_own_probes():
    """Hutchinson: the mean over windows and probes of vᵀHv, window i's Rademacher probes drawn from seed + i."""
    model = tiny_model()
    windows = token_windows(samples=2, seq_len=8)
    weight = model.model.layers[0].input_layernorm.weight
    expected = []
    with math_attention():
        for index, window in enumerate(windows):
            generator = torch.Generator().manual_seed(5 + index)
            loss = model(input_ids=window[None], labels=window[None]).loss
            (gradient,) = torch.autograd.grad(loss, [weight], create_graph=True)
            for _probe in range(3):
                vector = torch.randint(0, 2, weight.shape, generator=generator).to(weight.dtype) * 2 - 1
                (product,) = torch.autograd.grad(gradient, [weight], grad_outputs=[vector], retain_graph=True)
                expected.append(float((vector * product).sum()))
    (trace,) = hessian_traces(model, windows, [[weight]], probes=3, seed=5)
    assert abs(trace - sum(expected) / len(expected)) <= 1e-4 * max(1.0, abs(trace))


def test_calibration_perplexity_is_the_exp_of_the_mean_window_loss():
    model = tiny_model()
    windows = token_windows(samples=3, seq_len=8)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert math.isclose(calibration_perplexity(model, windows), math.exp(sum(losses) / 3), rel_tol=1e-6)


def test_an_moe_model_s_calibration_loss_leaves_out_its_routers_load_balancing_term():
    """A Mixtral saved with output_router_logits (LLaMA-Factory's MoE fine-tunes) adds router_aux_loss_coef · aux to
    its loss: calibration perplexity, and every gradient and curvature criterion, measured that sum."""
    from torch.nn import functional as F

    from ..adapters.test_moe import tiny_moe

    model = tiny_moe("mixtral", output_router_logits=True, router_aux_loss_coef=1.0)
    windows = token_windows(samples=3, seq_len=8)
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:])) for w in windows]
    assert math.isclose(calibration_perplexity(model, windows), math.exp(sum(losses) / 3), rel_tol=1e-6)
    assert model.config.output_router_logits  # the model's own setting is left as it was

"""LLM Surgeon: K-FAC factors, Kronecker costs and correlated updates, the global threshold, N:M, shots."""

import pytest
import torch
from torch import nn

from optimum_prune import PruningConfig, prune, verify_sparsity
from optimum_prune.methods import llm_surgeon
from optimum_prune.methods.llm_surgeon import correlated_update, damped_inverse, element_costs, kfac_factors, nm_masks, threshold_masks
from optimum_prune.sparsity import NMPattern

from ..conftest import tiny_model, token_windows


def _spd(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size * 3, size, generator=generator, dtype=torch.float64)
    return x.T @ x / (size * 3) + 0.1 * torch.eye(size, dtype=torch.float64)


def _linear(rows=5, columns=6, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(columns, rows, bias=False).double()


def test_correlated_update_is_the_constrained_optimum_of_the_kronecker_quadratic():
    """Δθ = −F⁻¹E_Kᵀ(E_K F⁻¹ E_Kᵀ)⁻¹θ_K with F⁻¹ = G⁻¹ ⊗ A⁻¹, computed with the explicit Kronecker product."""
    linear = _linear()
    g_inverse, a_inverse = torch.linalg.inv(_spd(5, 1)), torch.linalg.inv(_spd(6, 2))
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[0, 1] = mask[0, 4] = mask[2, 2] = mask[4, 0] = True
    theta = linear.weight.detach().clone().flatten()
    inverse = torch.kron(g_inverse, a_inverse)  # row-major vec(W)
    chosen = torch.nonzero(mask.flatten()).flatten()
    expected = theta - inverse[:, chosen] @ torch.linalg.solve(inverse[chosen][:, chosen], theta[chosen])
    correlated_update(linear, mask, g_inverse, a_inverse, max_correlate=100)
    torch.testing.assert_close(linear.weight.detach().flatten(), expected)
    assert (linear.weight[mask] == 0).all()
    # The single-weight cost is the same quadratic: ½ θ_q² / [F⁻¹]_qq.
    costs = element_costs(_linear().weight, g_inverse, a_inverse)
    torch.testing.assert_close(costs.flatten().double(), 0.5 * theta.square() / inverse.diagonal(), rtol=1e-5, atol=1e-8)


def test_a_group_costs_touched_rows_times_in_squared_not_out_times_in_squared():
    """(G⁻¹·X)·A⁻¹ multiplied an out × in matrix by A⁻¹ for every group (days per 70B down_proj); G⁻¹·(X·A⁻¹) does not."""
    from torch.utils.flop_counter import FlopCounterMode

    out_features, in_features = 64, 512
    linear = nn.Linear(in_features, out_features, bias=False)
    g_inverse, a_inverse = torch.linalg.inv(_spd(out_features, 1)), torch.linalg.inv(_spd(in_features, 2))
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[0, :32] = True  # one group of one row
    with FlopCounterMode(display=False) as counter:
        correlated_update(linear, mask, g_inverse, a_inverse, max_correlate=32)
    assert counter.get_total_flops() < out_features * in_features * in_features / 4


def test_row_groups_split_the_solve_and_still_remove_exactly_the_mask():
    linear = _linear(rows=8, columns=8)
    g_inverse, a_inverse = torch.linalg.inv(_spd(8, 3)), torch.linalg.inv(_spd(8, 4))
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(5)) < 0.5
    before = linear.weight.detach().clone()
    correlated_update(linear, mask, g_inverse, a_inverse, max_correlate=3)
    after = linear.weight.detach()
    assert (after[mask] == 0).all() and (after[~mask] != before[~mask]).any()
    # Compensation lowers the quadratic loss ½ ΔθᵀFΔθ against simply zeroing the mask.
    fisher = torch.kron(torch.linalg.inv(g_inverse), torch.linalg.inv(a_inverse))
    zeroed = before.masked_fill(mask, 0)
    loss = lambda w: float((w - before).flatten() @ fisher @ (w - before).flatten())  # noqa: E731
    assert loss(after) < loss(zeroed)


def computed(costs: dict[str, torch.Tensor]) -> dict:
    """Costs as LLM Surgeon passes them: a function per linear computing them."""
    return {name: (lambda values=values: values) for name, values in costs.items()}


def test_global_threshold_and_nm_groups():
    costs = {"a": torch.tensor([[1.0, 5.0], [2.0, 6.0]]), "b": torch.tensor([[3.0, 4.0, 7.0, 8.0]])}
    masks = dict(threshold_masks(computed(costs), 0.5))
    assert masks["a"].tolist() == [[True, False], [True, False]] and masks["b"].tolist() == [[True, True, False, False]]
    tied = dict(threshold_masks(computed({"a": torch.zeros(2, 2), "b": torch.tensor([[0.0, 0.0, 1.0, 2.0]])}), 0.5))  # six zeros tie
    assert sum(int(m.sum()) for m in tied.values()) == 4 and tied["a"].all()
    grouped = {"w": torch.tensor([[1.0, 9.0, 2.0, 8.0, 5.0, 6.0, 7.0, 0.5]])}
    half = dict(nm_masks(computed(grouped), NMPattern(2, 4), 0.5))["w"]  # group costs 3 and 5.5: only the first loses its 2 cheapest
    assert half.tolist() == [[True, False, True, False, False, False, False, False]]
    full = dict(nm_masks(computed(grouped), NMPattern(2, 4), 1.0))["w"]
    assert full.reshape(-1, 4).sum(-1).tolist() == [2, 2] and full[0, 7] and full[0, 4]
    # N of every M kept, so M − N pruned: 1:4 and 3:4 pruned the complement (1:4 kept 3 of 4)
    one = dict(nm_masks(computed(grouped), NMPattern(1, 4), 1.0))["w"]
    assert one.tolist() == [[True, False, True, True, True, True, False, True]]
    three = dict(nm_masks(computed(grouped), NMPattern(3, 4), 1.0))["w"]
    assert three.tolist() == [[True, False, False, False, False, False, False, True]]


def sorted_threshold_masks(costs: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The global threshold by concatenating every cost and taking the k-th value (what the radix select avoids)."""
    flat = torch.cat([c.flatten() for c in costs.values()])
    count = round(fraction * flat.numel())
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if count:
        threshold = torch.kthvalue(flat, count).values
        chosen = flat < threshold
        chosen[(flat == threshold).nonzero().flatten()[: count - int(chosen.sum())]] = True
    return {name: part.reshape(c.shape) for (name, c), part in zip(costs.items(), chosen.split([c.numel() for c in costs.values()]))}


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_the_radix_selected_threshold_picks_what_sorting_every_cost_picks(fraction):
    generator = torch.Generator().manual_seed(int(fraction * 100))
    for trial in range(20):
        # costs over 16 orders of magnitude, or few distinct values (ties at the threshold, taken in order)
        scale = 10.0 ** torch.randint(-8, 8, (3,), generator=generator)
        costs = {f"linear{i}": torch.rand(3 + i, 8, generator=generator) ** 4 * scale[i] for i in range(3)}
        if trial % 2:
            costs = {name: torch.randint(0, 4, c.shape, generator=generator).float() for name, c in costs.items()}
        masks = dict(threshold_masks(computed(costs), fraction))
        expected = sorted_threshold_masks(costs, fraction)
        assert all(torch.equal(masks[name], expected[name]) for name in costs)
        assert sum(int(m.sum()) for m in masks.values()) == round(fraction * sum(c.numel() for c in costs.values()))


def test_a_negative_cost_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        dict(threshold_masks(computed({"w": torch.tensor([[1.0, -2.0]])}), 0.5))


def test_kfac_factors_are_the_token_means_of_input_and_output_gradient_outer_products():
    model, windows = tiny_model(), token_windows(samples=2)
    linear = model.model.layers[1].mlp.down_proj
    g, a = kfac_factors(model, windows, [linear])[linear]
    inputs, gradients = [], []

    def record(_module, args, output):
        inputs.append(args[0].detach())
        output.register_hook(gradients.append)

    linear.register_forward_hook(record)
    for window in windows:
        ids = window.unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
    x = torch.cat([i.reshape(-1, linear.in_features) for i in inputs])
    y = torch.cat([d.reshape(-1, linear.out_features) for d in gradients])
    a_direct, g_direct = x.T @ x / x.shape[0], y.T @ y / y.shape[0]
    torch.testing.assert_close(torch.kron(g, a), torch.kron(g_direct, a_direct), rtol=1e-4, atol=1e-12)
    assert g.norm() == pytest.approx(float(a.norm()), rel=1e-5)  # balanced
    model.zero_grad()


def test_prunes_to_the_target_with_the_pattern_and_records_per_layer_sparsity():
    windows = token_windows()
    model = tiny_model()
    report = prune(model, PruningConfig(method="llm_surgeon", sparsity=0.5, method_options={"shots": 2}), calibration=windows)
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    measured = [r.sparsity for r in report.linears]
    assert max(measured) - min(measured) > 0.05  # one global threshold: layers differ
    model = tiny_model()
    prune(model, PruningConfig(method="llm_surgeon", sparsity="2:4", method_options={"shots": 2}), calibration=windows)
    assert verify_sparsity(model, "2:4")["conforming"]
    model = tiny_model()
    prune(model, PruningConfig(method="llm_surgeon", sparsity="1:4"), calibration=windows)
    assert verify_sparsity(model, "1:4")["conforming"] and verify_sparsity(model)["overall_sparsity"] == pytest.approx(0.75, abs=1e-3)


def routed_experts(model, windows) -> set[int]:
    """The experts layer 0's router picks for some calibration token."""
    block = model.model.layers[0].block_sparse_moe
    logits = []
    handle = block.gate.register_forward_hook(lambda _module, _args, output: logits.append(output))
    with torch.no_grad():
        for window in windows:
            model(input_ids=window.unsqueeze(0))
    handle.remove()
    return set(torch.cat(logits).topk(block.top_k, dim=-1).indices.flatten().tolist())


@pytest.mark.parametrize("policy", ["magnitude", "dense"])
def test_on_experts_unrouted_ones_follow_the_moe_policy_and_routers_prune_on_request(policy):
    """An expert no calibration token reaches has A = 0: its weights cost nothing, so all of them went."""
    from ..adapters.test_moe import tiny_moe

    model = tiny_moe(num_local_experts=8)
    windows = token_windows(samples=1, seq_len=4)  # 4 tokens × top-2: at most 8 routings per layer
    unrouted = sorted(set(range(8)) - routed_experts(model, windows))
    assert unrouted
    config = PruningConfig(method="llm_surgeon", sparsity=0.5, method_options={"shots": 1},
                           moe_options={"unrouted_experts": policy, "prune_router": True})  # fmt: skip
    report = prune(model, config, calibration=windows)
    sparsity = verify_sparsity(model)["layers"]
    for expert in unrouted:
        name = f"model.layers.0.block_sparse_moe.experts.{expert}.w1"
        assert name in report.unrouted
        assert sparsity[name]["sparsity"] == (pytest.approx(0.5, abs=0.01) if policy == "magnitude" else 0.0)
    assert sparsity["model.layers.0.block_sparse_moe.gate"]["sparsity"] > 0


def test_damped_inverse_skips_dead_rows():
    factor = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    inverse = damped_inverse(factor, 0.0)
    torch.testing.assert_close(inverse, torch.diag(torch.tensor([0.5, 0.0, 0.25])))


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        PruningConfig(method="llm_surgeon", method_options={"shots": 0})
    with pytest.raises(ValueError, match="allocation='uniform'"):
        PruningConfig(method="llm_surgeon", allocation="owl")
    with pytest.raises(ValueError, match="cannot be applied to"):
        prune(tiny_model(hidden_size=66), PruningConfig(method="llm_surgeon", sparsity="4:8"), calibration=token_windows())


def test_each_shot_targets_its_share_of_the_final_sparsity(monkeypatch):
    """α_t = t·α/T: with T = 2 shots to 50 %, the first shot's threshold takes 25 % of the weights, the second 50 %."""
    fractions, original = [], llm_surgeon.threshold_masks
    monkeypatch.setattr(llm_surgeon, "threshold_masks", lambda costs, fraction: fractions.append(fraction) or original(costs, fraction))
    prune(tiny_model(), PruningConfig(method="llm_surgeon", sparsity=0.5, method_options={"shots": 2}), calibration=token_windows(samples=2, seq_len=16))
    assert fractions == [pytest.approx(0.25), pytest.approx(0.5)]


def test_each_factor_is_damped_with_its_own_option(monkeypatch):
    kinds, calls = {}, []
    original_factors, original_inverse = llm_surgeon.kfac_factors, llm_surgeon.damped_inverse

    def factors(*args, **kwargs):
        result = original_factors(*args, **kwargs)
        for g, a in result.values():
            kinds[id(g)], kinds[id(a)] = "g", "a"
        return result

    monkeypatch.setattr(llm_surgeon, "kfac_factors", factors)
    monkeypatch.setattr(llm_surgeon, "damped_inverse", lambda factor, damping: calls.append((kinds[id(factor)], damping)) or original_inverse(factor, damping))
    options = {"shots": 1, "damp_g": 0.3, "damp_a": 0.02}
    prune(tiny_model(), PruningConfig(method="llm_surgeon", sparsity=0.3, method_options=options), calibration=token_windows(samples=2, seq_len=16))
    assert calls and set(calls) == {("g", 0.3), ("a", 0.02)}


def test_damping_is_relative_to_the_mean_diagonal():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50
    factor = x.T @ x
    expected = torch.linalg.inv(factor + 0.1 * factor.diagonal().mean() * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(damped_inverse(factor, 0.1).double(), expected, rtol=1e-4, atol=1e-12)


def test_weights_removed_by_an_earlier_shot_are_held_at_zero_inside_the_solve():
    """A later shot's update is the constrained optimum over its whole mask (Eq. 13; the official pruner.py solves over
    every weight under the threshold, earlier shots' zeros included), not the new removals' update, whose change to
    the earlier zeros was then cut off (5 shots: 3× the output error of the official code on a tiny Llama)."""
    g_inverse, a_inverse = torch.linalg.inv(_spd(5, 1)), torch.linalg.inv(_spd(6, 2))
    earlier = torch.zeros(5, 6, dtype=torch.bool)
    earlier[1, 3] = earlier[3, 0] = earlier[0, 5] = True
    new = torch.zeros(5, 6, dtype=torch.bool)
    new[0, 1] = new[2, 2] = new[4, 5] = True
    linear = _linear()
    with torch.no_grad():
        linear.weight[earlier] = 0
    theta = linear.weight.detach().clone().flatten()
    inverse = torch.kron(g_inverse, a_inverse)  # row-major vec(W)
    chosen = torch.nonzero((earlier | new).flatten()).flatten()
    expected = theta - inverse[:, chosen] @ torch.linalg.solve(inverse[chosen][:, chosen], theta[chosen])
    correlated_update(linear, earlier | new, g_inverse, a_inverse, max_correlate=100)
    torch.testing.assert_close(linear.weight.detach().flatten(), expected)


def test_each_nm_shot_gives_its_share_of_the_groups_the_pattern(monkeypatch):
    """N:M over T = 2 shots: the first shot gives half of the groups the pattern (fraction 1/2), the last all of them."""
    from optimum_prune import PruningConfig, prune
    from optimum_prune.methods import llm_surgeon

    from tests.conftest import tiny_model, token_windows

    fractions, original = [], llm_surgeon.nm_masks
    monkeypatch.setattr(llm_surgeon, "nm_masks", lambda costs, pattern, fraction: fractions.append(fraction) or original(costs, pattern, fraction))
    prune(tiny_model(), PruningConfig(method="llm_surgeon", sparsity="2:4", method_options={"shots": 2}), calibration=token_windows(samples=2, seq_len=16))
    assert fractions == [0.5, 1.0]


def test_a_weight_whose_input_never_fires_costs_nothing():
    """Eq. 10 with a dead input column (A's row and column zero, so [A⁻¹]_cc = 0): its weights cost 0 (they do not touch
    the loss), not W² / 0."""
    from optimum_prune.methods.llm_surgeon import damped_inverse, element_costs

    a = _spd(6, 2)
    a[2], a[:, 2] = 0, 0
    g_inverse, a_inverse = damped_inverse(_spd(5, 1), 0.01), damped_inverse(a, 0.01)
    costs = element_costs(_linear().weight, g_inverse, a_inverse)
    assert (costs[:, 2] == 0).all() and (costs[:, [0, 1, 3, 4, 5]] > 0).all()

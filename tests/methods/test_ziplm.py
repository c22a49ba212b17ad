"""ZipLM: the greedy structured OBS pass, the level program, latency and parameter targets, reload."""

import itertools
import re

import pytest
import torch

import optimum_prune.methods.ziplm as ziplm
from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.adapters import get_adapter
from optimum_prune.methods.ziplm import ZipLM, ZipLMOptions, _Levels, choose_levels, greedy_obs, stitched_weight

from ..conftest import assert_reloads_exactly, decoder_linear_parameters, tiny_model, token_windows


def _problem(rows=6, columns=8, tokens=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    mixing = torch.eye(columns, dtype=torch.float64) + 0.5 * torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    inputs = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ mixing  # correlated, well conditioned
    return weight, inputs, 2 * inputs.T @ inputs / tokens


@pytest.mark.parametrize("width", [1, 2])
def test_each_step_is_the_least_squares_optimum_and_the_errors_add(width):
    weight, inputs, hessian = _problem()
    compensated, order, losses = greedy_obs(weight, hessian, width, 0.0, count=3, with_losses=True)
    removed = torch.zeros(weight.shape[1], dtype=torch.bool)
    for block in order.tolist():
        removed[block * width : (block + 1) * width] = True
    kept = ~removed
    # The kept columns solve min ‖W X − W' X_kept‖², and the dropped ones are zero.
    optimum = torch.linalg.lstsq(inputs[:, kept], inputs @ weight.T).solution.T
    torch.testing.assert_close(compensated[:, kept], optimum)
    assert compensated[:, removed].abs().max() == 0
    delta = compensated - weight
    error = torch.einsum("ij,jk,ik->", delta, hessian, delta)
    torch.testing.assert_close(losses.sum(), error)  # ρ's add up to the output error
    # The first choice is the block whose removal (with compensation) costs least.
    blocks = weight.shape[1] // width
    costs = []
    for block in range(blocks):
        keep = torch.ones(weight.shape[1], dtype=torch.bool)
        keep[block * width : (block + 1) * width] = False
        fit = torch.linalg.lstsq(inputs[:, keep], inputs @ weight.T).solution.T
        costs.append(float((inputs @ weight.T - inputs[:, keep] @ fit.T).square().sum() * 2 / inputs.shape[0]))
    assert order[0] == min(range(blocks), key=costs.__getitem__)
    assert losses[0] == pytest.approx(min(costs), rel=1e-6)


def test_the_level_program_finds_the_least_error_within_the_budget():
    generator = torch.Generator().manual_seed(3)
    levels = [
        _Levels(removed=list(range(4)), costs=sorted(torch.rand(4, generator=generator).tolist(), reverse=True),
                errors=sorted(torch.rand(4, generator=generator).tolist()))  # fmt: skip
        for _ in range(4)
    ]
    budget = 0.6 * sum(level.costs[0] for level in levels)
    chosen = choose_levels(levels, budget)
    feasible = [
        combination for combination in itertools.product(range(4), repeat=4)
        if sum(level.costs[c] for level, c in zip(levels, combination)) <= budget
    ]  # fmt: skip
    best = min(sum(level.errors[c] for level, c in zip(levels, combination)) for combination in feasible)
    assert sum(level.costs[c] for level, c in zip(levels, chosen)) <= budget * 1.001  # rounding to 10,000 buckets
    assert sum(level.errors[c] for level, c in zip(levels, chosen)) == pytest.approx(best, abs=1e-3)
    with pytest.raises(ValueError, match="cannot be met"):
        choose_levels(levels, 0.5 * sum(min(level.costs) for level in levels))


@pytest.mark.parametrize("width", [1, 2])
def test_a_level_is_rebuilt_from_the_removal_order_and_the_hessian(width):
    """SPDY stitches levels without storing weights: the least-squares optimum on the kept columns is
    what the greedy pass leaves after removing the same structures (damping included)."""
    weight, _, hessian = _problem()
    count = 3 if width == 1 else 2
    blocks = weight.shape[1] // width
    _, order, _ = greedy_obs(weight, hessian, width, 0.01, count=blocks - 1, with_losses=True)
    level = _Levels(removed=[0, count, blocks], costs=[3.0, 2.0, 0.0], order=order, hessian=hessian.float())
    greedy, _ = greedy_obs(weight, hessian, width, 0.01, count=count)
    torch.testing.assert_close(stitched_weight(weight, level, 1, width, 0.01), greedy, rtol=1e-4, atol=1e-5)
    assert stitched_weight(weight, level, 0, width, 0.01) is weight
    assert stitched_weight(weight, level, 2, width, 0.01).abs().max() == 0  # the whole sublayer


def test_error_weights_steer_the_program():
    levels = [_Levels(removed=[0, 1], costs=[2.0, 1.0], errors=[0.0, 1.0]), _Levels(removed=[0, 1], costs=[2.0, 1.0], errors=[0.0, 2.0])]
    assert choose_levels(levels, 3.0) == [1, 0]  # one of them must shrink: the cheaper error
    assert choose_levels(levels, 3.0, coefficients=[1.0, 0.1]) == [0, 1]


def test_levels_of_equal_error_resolve_to_the_one_closest_to_the_budget():
    """Dead units remove at no error: the most pruned of the equal solutions removed 50 % for a 15 % target."""
    level = _Levels(removed=[0, 1, 2, 3], costs=[400.0, 300.0, 200.0, 100.0], errors=[0.0, 0.0, 0.0, 0.0])
    assert choose_levels([level], 250.0) == [2]


def test_spdy_search_keeps_the_best_weighting_and_restores_the_dense_weights(monkeypatch):
    import optimum_prune.methods.ziplm as ziplm

    measured: dict[tuple[int, ...], float] = {}  # level choice → calibration perplexity of the stitched model
    searched = []
    choices = []

    def choosing(*args, **kwargs):
        choices.append(tuple(choose_levels(*args, **kwargs)))
        return list(choices[-1])

    def measuring(model, windows):
        measured[choices[-1]] = perplexity(model, windows)
        return measured[choices[-1]]

    def checked(self, components, levels, windows, report):
        before = {name: value.clone() for name, value in self.adapter.model.state_dict().items()}
        chosen = original(self, components, levels, windows, report)
        after = self.adapter.model.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before)  # stitching left no trace
        searched.append(tuple(chosen))
        return chosen

    original, perplexity = ZipLM._search, ziplm.calibration_perplexity
    monkeypatch.setattr(ZipLM, "_search", checked)
    monkeypatch.setattr(ziplm, "choose_levels", choosing)
    monkeypatch.setattr(ziplm, "calibration_perplexity", measuring)
    options = {"target": "parameters", "round_to": 8, "search_restarts": 4, "search_steps": 4}
    report = prune(tiny_model(), PruningConfig(method="ziplm", sparsity=0.3, method_options=options), calibration=token_windows())
    assert len(searched) == 1 and len(measured) > 1  # the weightings gave several programs to compare
    assert measured[searched[0]] == min(measured.values())  # the program kept is the best one measured
    note = next(note for note in report.notes if "SPDY" in note)
    plain, best = (float(note.split(" model ")[1].split(" ")[0]), float(note.split(", ")[1].split(" ")[0]))
    assert best == pytest.approx(measured[searched[0]], abs=1e-3) and best <= plain


def test_parameter_target_hits_the_budget_keeps_gqa_and_reloads(tmp_path):
    model = tiny_model()
    linears = lambda: decoder_linear_parameters(model)  # noqa: E731
    before = linears()
    options = {"target": "parameters", "round_to": 8}
    report = prune(model, PruningConfig(method="ziplm", sparsity=0.3, method_options=options), calibration=token_windows())
    assert 0.299 <= 1 - linears() / before <= 0.36  # the level grid is coarse: at least the budget, never far past it
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features % layer.self_attn.k_proj.out_features == 0
    assert report.removed and "relative output error (mlp)" in report.layer_scores
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def test_whole_blocks_go_when_the_budget_needs_them(tmp_path):
    # Attention is a third of the tiny model's linears and every layer keeps one of its two groups
    # unless the whole block may go: a quarter of the linears can only come from removing blocks.
    options = {"target": "parameters", "components": "attention"}
    with pytest.raises(ValueError, match=r"decoder layers keep at least .* \(remove_sublayers=True would allow whole blocks to go\)"):
        prune(tiny_model(), PruningConfig(method="ziplm", sparsity=0.25, method_options={**options, "remove_sublayers": False}), calibration=token_windows())
    model = tiny_model()
    report = prune(model, PruningConfig(method="ziplm", sparsity=0.25, method_options=options), calibration=token_windows())
    assert any("the whole block" in line for line in report.removed)
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def test_latency_target_measures_a_table_and_stays_within_it():
    model = tiny_model()
    options = {"round_to": 16, "latency_tokens": 32, "latency_repeats": 2}
    report = prune(model, PruningConfig(method="ziplm", sparsity=0.3, method_options=options), calibration=token_windows())
    assert report.parameters_after < report.parameters_before
    tables = [note for note in report.notes if "latency table" in note]
    assert len(tables) == 2  # one attention and one MLP table: every layer has the same shapes
    for table in tables:
        times = [float(entry.split(": ")[-1]) for entry in table.split("ms): ")[1].split(", ")]
        assert times == sorted(times)  # fewer units are never slower
    kept = [note for note in report.notes if "predicted speed-up" in note][0]
    decoder, whole = (float(share) for share in re.findall(r"(\d+\.\d)%", kept))
    assert decoder <= 70.1 and decoder <= whole < 100  # the unpruned output head dilutes the decoder's saving (timed: at 0.1% it may not show)


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="target must be one of"):
        PruningConfig(method="ziplm", method_options={"target": "flops"})
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        PruningConfig(method="ziplm", method_options={"round_to": 0})
    with pytest.raises(ValueError, match="search_steps must be >= 0"):
        PruningConfig(method="ziplm", method_options={"search_steps": -1})
    with pytest.raises(ValueError, match=r"round_to \(256\) is above the narrowest MLP's 128 channels"):  # all or nothing
        prune(tiny_model(), PruningConfig(method="ziplm", sparsity=0.3, method_options={"target": "parameters", "round_to": 256}), calibration=token_windows())
    with pytest.raises(ValueError, match="round_to applies only with components='all' or 'mlp'"):  # it sets MLP widths only
        PruningConfig(method="ziplm", method_options={"components": "attention", "round_to": 8})
    with pytest.raises(ValueError, match=r"dampening must be in \(0, 1\)"):  # undamped, Cholesky failed on few tokens
        PruningConfig(method="ziplm", method_options={"dampening": 0.0})


def test_a_latency_budget_that_removes_every_block_is_reported_so():
    model = tiny_model()
    options = {"latency_tokens": 16, "latency_repeats": 1}
    report = prune(model, PruningConfig(method="ziplm", sparsity=0.999, method_options=options), calibration=token_windows())
    kept = next(note for note in report.notes if note.startswith("ZipLM: the decoder layers keep"))
    assert "keep 0.0% of their measured time" in kept and "(every block removed)" in kept  # a ZeroDivisionError before


def test_level_errors_are_the_running_obs_losses_relative_to_the_dense_output_energy():
    """error(level) = Σ of the first r greedy ρ's / ‖W X‖²_H on the dense inputs (H = 2XXᵀ/n); the whole sublayer: 1."""
    model, windows = tiny_model(), token_windows()
    method = ZipLM(get_adapter(model), 0.3, [], ZipLMOptions(target="parameters", round_to=8, search_restarts=0, search_steps=0), torch.device("cpu"))
    method.check()
    components = method.units.components
    levels = method._levels(components)
    method._measure_errors(components, levels, windows, keep_database=False)
    index = next(i for i, c in enumerate(components) if c.layer == 2 and c.kind == "mlp")
    component, level = components[index], levels[index]
    down = model.model.layers[2].mlp.down_proj
    inputs = []
    handle = down.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().double().reshape(-1, down.in_features)))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    x = torch.cat(inputs)
    hessian = 2 * x.T @ x / x.shape[0]
    _, _, losses = greedy_obs(down.weight.detach(), hessian, 1, 0.01, component.removable, with_losses=True)
    w = down.weight.detach().double()
    energy = float(torch.einsum("ij,jk,ik->", w, hessian, w))
    assert level.removed[-1] == component.removable + 1 and level.errors[-1] == 1.0
    for removed, error in zip(level.removed[:-1], level.errors[:-1]):
        assert abs(error - float(losses[:removed].sum()) / energy) <= 1e-4 * max(error, 1e-6), (removed, error)


def test_dampening_is_relative_to_the_mean_hessian_diagonal():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64) * 30
    hessian = 2 * x.T @ x / 40
    damped = hessian + 0.05 * hessian.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    for width in (1, 2):
        ours, order = greedy_obs(weight, hessian, width, 0.05, count=2)
        reference, reference_order = greedy_obs(weight, damped, width, 1e-12, count=2)
        assert order.tolist() == reference_order.tolist()
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-8)


def test_the_stitched_model_of_a_removed_sublayer_adds_no_bias(monkeypatch):
    """SPDY scores a level that removes a whole block as the model without that block: its output projection's
    bias goes with its weight (remove_sublayer drops both)."""
    model = tiny_model(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.bias.normal_(0, 0.5)
    seen = []
    original = ziplm.calibration_perplexity

    def measuring(stitched, windows):
        for layer in stitched.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if not linear.weight.any():
                    seen.append(bool(linear.bias.any()))
        return original(stitched, windows)

    monkeypatch.setattr(ziplm, "calibration_perplexity", measuring)
    options = {"target": "parameters", "round_to": 8, "search_restarts": 4, "search_steps": 0}
    prune(model, PruningConfig(method="ziplm", sparsity=0.85, method_options=options), calibration=token_windows(samples=4, seq_len=16))
    assert seen and not any(seen)


def test_random_restarts_alone_try_several_weightings(monkeypatch):
    """search_steps=0: the restarts' random weightings reach level choices other than the plain program's."""
    chosen = []
    original = ziplm.choose_levels

    def choosing(*args, **kwargs):
        chosen.append(tuple(original(*args, **kwargs)))
        return list(chosen[-1])

    monkeypatch.setattr(ziplm, "choose_levels", choosing)
    options = {"target": "parameters", "round_to": 8, "search_restarts": 6, "search_steps": 0}
    prune(tiny_model(), PruningConfig(method="ziplm", sparsity=0.3, method_options=options), calibration=token_windows(samples=4, seq_len=16))
    assert len(set(chosen)) > 1


def test_the_level_keeping_one_structure_is_rebuilt_not_zeroed():
    """SPDY stitches every level short of the whole sublayer from the order and H, the last one (one unit kept) included."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    inputs = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    hessian = 2 * inputs.T @ inputs / 64
    for width in (1, 2):
        blocks = 8 // width
        _, order, _ = greedy_obs(weight, hessian, width, 0.01, count=blocks - 1, with_losses=True)
        level = _Levels(removed=[0, blocks - 1, blocks], costs=[2.0, 1.0, 0.0], order=order, hessian=hessian.float())
        greedy, _ = greedy_obs(weight, hessian, width, 0.01, count=blocks - 1)
        rebuilt = stitched_weight(weight, level, 1, width, 0.01)
        assert rebuilt.abs().max() > 0
        torch.testing.assert_close(rebuilt, greedy, rtol=1e-4, atol=1e-5)

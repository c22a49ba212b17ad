"""LLM Surgeon, structured: row/column costs and correlated updates, coupled units, budget, reload."""

import types

import pytest
import torch
from torch import nn

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.adapters import get_adapter
from optimum_prune.methods import llm_surgeon, llm_surgeon_structured
from optimum_prune.methods.llm_surgeon_structured import (
    LLMSurgeonStructured, LLMSurgeonStructuredOptions, _correlated_structure_update, _Costs, _Part,
)  # fmt: skip

from ..conftest import assert_reloads_exactly, decoder_linear_parameters, tiny_model, token_windows
from .test_llm_surgeon import _linear, _spd


@pytest.mark.parametrize("indices", [[1, 3], [2]], ids=["block", "single"])
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "columns"])
def test_structure_update_is_the_kronecker_optimum_and_its_cost_the_quadratic_increase(rows, indices):
    linear = _linear(rows=5, columns=6)
    g, a = _spd(5, 1), _spd(6, 2)
    inverses = (torch.linalg.inv(g), torch.linalg.inv(a))
    part = _Part(linear, rows, torch.tensor(indices))
    mask = torch.zeros(5, 6, dtype=torch.bool)
    if rows:
        mask[indices] = True
    else:
        mask[:, indices] = True
    theta = linear.weight.detach().clone().flatten()
    fisher, inverse = torch.kron(g, a), torch.kron(*inverses)
    chosen = torch.nonzero(mask.flatten()).flatten()
    expected = theta - inverse[:, chosen] @ torch.linalg.solve(inverse[chosen][:, chosen], theta[chosen])
    cost = _Costs({linear: (g, a)}, {linear: inverses}).of(part)  # single indices take the vectorised path
    _correlated_structure_update(part, *inverses)
    torch.testing.assert_close(linear.weight.detach().flatten(), expected)
    delta = expected - theta
    assert cost == pytest.approx(0.5 * float(delta @ fisher @ delta), rel=1e-6)


@pytest.mark.parametrize("coupling", ["output", "all"])
def test_hits_the_budget_keeps_a_valid_gqa_layout_and_reloads(tmp_path, coupling):
    model = tiny_model()
    linears = lambda: decoder_linear_parameters(model)  # noqa: E731
    before = linears()
    report = prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.4, method_options={"shots": 2, "coupling": coupling}), calibration=token_windows())
    assert 1 - linears() / before == pytest.approx(0.4, abs=0.02)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features % layer.self_attn.k_proj.out_features == 0
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features
    assert report.removed and "units removed (mlp)" in report.layer_scores
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def test_inverses_are_held_for_one_components_linears_at_a_time(monkeypatch):
    """Every linear's damped inverses were held at once beside the factors (610 GiB at 70B): at most a unit's
    linears' (coupling='all', attention: o_proj and q/k/v) are held, and the result is the same."""
    held = []
    original = llm_surgeon_structured._DampedInverses.__missing__

    def missing(self, linear):
        inverses = original(self, linear)
        held.append(len(self))
        return inverses

    monkeypatch.setattr(llm_surgeon_structured._DampedInverses, "__missing__", missing)
    prune(tiny_model(), PruningConfig(method="llm_surgeon_structured", sparsity=0.3, method_options={"shots": 1, "coupling": "all"}),
          calibration=token_windows(samples=2, seq_len=16))
    assert held and max(held) <= 4 < 7 * len(tiny_model().model.layers)


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="damp_a must be > 0"):
        PruningConfig(method="llm_surgeon_structured", method_options={"damp_a": 0})
    with pytest.raises(ValueError, match="damp_g applies only with coupling='all'"):  # G is inverted for rows only: ignored
        PruningConfig(method="llm_surgeon_structured", method_options={"damp_g": 0.5})
    with pytest.raises(ValueError, match="can remove at most"):
        prune(tiny_model(), PruningConfig(method="llm_surgeon_structured", sparsity=0.99), calibration=token_windows())


def test_dead_columns_cost_nothing_and_need_no_compensation():
    """A column whose input is always zero has a zero row and column in A, left zero in the damped inverse:
    removing it costs 0 (as for single weights), and a block holding it costs what its live part costs."""
    linear = _linear(rows=5, columns=6)
    g, a = _spd(5, 1), _spd(6, 2)
    a[2], a[:, 2] = 0, 0
    alive = torch.tensor([0, 1, 3, 4, 5])
    a_inverse = torch.zeros_like(a)
    a_inverse[alive.unsqueeze(1), alive] = torch.linalg.inv(a[alive][:, alive])
    inverses = (torch.linalg.inv(g), a_inverse)
    costs = _Costs({linear: (g, a)}, {linear: inverses})
    assert costs.of(_Part(linear, False, torch.tensor([2]))) == 0.0
    assert costs.of(_Part(linear, False, torch.tensor([1, 2]))) == pytest.approx(costs.of(_Part(linear, False, torch.tensor([1]))))
    both, live_only = _linear(rows=5, columns=6), _linear(rows=5, columns=6)
    _correlated_structure_update(_Part(both, False, torch.tensor([1, 2])), *inverses)
    _correlated_structure_update(_Part(live_only, False, torch.tensor([1])), *inverses)
    expected = live_only.weight.detach().clone()
    expected[:, 2] = 0
    torch.testing.assert_close(both.weight.detach(), expected)


def test_structured_shots_remove_their_share_of_the_budget(monkeypatch):
    """The curvature of shot 2 is estimated on a model that lost half the target (one of two shots), not all of it."""
    model = tiny_model()
    before, seen, original = decoder_linear_parameters(model), [], llm_surgeon_structured.kfac_factors
    monkeypatch.setattr(llm_surgeon_structured, "kfac_factors", lambda *a, **k: seen.append(decoder_linear_parameters(model)) or original(*a, **k))
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.4, method_options={"shots": 2}), calibration=token_windows(samples=2, seq_len=16))
    assert seen[0] == before and 1 - seen[1] / before == pytest.approx(0.2, abs=0.02)


def test_structured_removes_the_cheapest_units(monkeypatch):
    costs, removed = [], {}
    original_of, original_remove = llm_surgeon_structured._Costs.of, llm_surgeon_structured.LLMSurgeonStructured._remove

    def of(self, part):
        costs.append(original_of(self, part))
        return costs[-1]

    def remove(self, layer, component, units, indices, inverses):
        removed[id(component)] = list(indices)
        return original_remove(self, layer, component, units, indices, inverses)

    monkeypatch.setattr(llm_surgeon_structured._Costs, "of", of)
    monkeypatch.setattr(llm_surgeon_structured.LLMSurgeonStructured, "_remove", remove)
    model = tiny_model()
    method = LLMSurgeonStructured(get_adapter(model), 0.1, [], LLMSurgeonStructuredOptions(shots=1, components="mlp"), torch.device("cpu"))
    method.check()
    components = list(method.units.components)
    counts = [c.removable + 1 for c in components]
    method.prune(token_windows(samples=2, seq_len=16), types.SimpleNamespace(removed=[], layer_scores={}))
    chosen, kept, offset = [], [], 0
    for component, count in zip(components, counts):
        gone = set(removed.get(id(component), []))
        for index in range(count):
            (chosen if index in gone else kept).append(costs[offset + index])
        offset += count
    assert chosen and max(chosen) <= min(kept)


def test_structured_compensates_the_kept_columns():
    dense, windows = tiny_model(), token_windows(samples=2, seq_len=16)
    model = tiny_model()
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.2, method_options={"shots": 1, "components": "mlp"}), calibration=windows)
    pruned, original = model.model.layers[1].mlp, dense.model.layers[1].mlp
    kept = [int(torch.nonzero((original.up_proj.weight == row).all(1))[0]) for row in pruned.up_proj.weight]
    assert len(kept) < original.up_proj.out_features
    assert not torch.allclose(pruned.down_proj.weight, original.down_proj.weight[:, kept])  # the update moved them


def test_a_component_whose_units_are_all_cheapest_keeps_one():
    """Every channel of layer 1's MLP is among the cheapest: one stays (a 0-channel MLP is a removed sublayer, not a width)."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)  # every channel of this MLP costs next to nothing
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.4, method_options={"shots": 1, "components": "mlp"}),
          calibration=token_windows(samples=2, seq_len=16))
    assert model.model.layers[1].mlp.up_proj.out_features == 1
    assert all(layer.mlp.down_proj.in_features >= 1 for layer in model.model.layers)


def test_the_cut_removes_exactly_the_units_the_threshold_chose(monkeypatch):
    """One shot, MLP channels, output coupling: gate/up rows are never updated, so the rows that survive must be
    the original rows of the units the threshold did not choose."""
    chosen, original_remove = {}, llm_surgeon_structured.LLMSurgeonStructured._remove

    def remove(self, layer, component, units, indices, inverses):
        chosen[component.layer] = sorted(indices)
        return original_remove(self, layer, component, units, indices, inverses)

    monkeypatch.setattr(llm_surgeon_structured.LLMSurgeonStructured, "_remove", remove)
    dense, model = tiny_model(), tiny_model()
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.2, method_options={"shots": 1, "components": "mlp"}),
          calibration=token_windows(samples=2, seq_len=16))
    assert chosen
    for index, layer in enumerate(model.model.layers):
        original = dense.model.layers[index].mlp.up_proj.weight
        kept = [i for i in range(original.shape[0]) if i not in chosen.get(index, [])]
        torch.testing.assert_close(layer.mlp.up_proj.weight, original[kept])


def test_structured_factors_are_damped_with_their_own_options(monkeypatch):
    """G by damp_g, A by damp_a: equal defaults hid A damped by damp_g."""
    kinds, calls = {}, []
    original_factors, original_inverse = llm_surgeon_structured.kfac_factors, llm_surgeon_structured.damped_inverse

    def factors(*args, **kwargs):
        result = original_factors(*args, **kwargs)
        for g, a in result.values():
            kinds[id(g)], kinds[id(a)] = "g", "a"
        return result

    monkeypatch.setattr(llm_surgeon_structured, "kfac_factors", factors)
    monkeypatch.setattr(llm_surgeon_structured, "damped_inverse", lambda f, d: calls.append((kinds[id(f)], d)) or original_inverse(f, d))
    options = {"shots": 1, "coupling": "all", "damp_g": 0.3, "damp_a": 0.02}
    prune(tiny_model(), PruningConfig(method="llm_surgeon_structured", sparsity=0.2, method_options=options), calibration=token_windows(samples=2, seq_len=16))
    assert calls and set(calls) == {("g", 0.3), ("a", 0.02)}


def test_reported_units_are_what_every_shot_removed_together():
    """The report's per-layer unit counts sum every shot's removals, per kind."""
    dense, model = tiny_model(), tiny_model()
    report = prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.4, method_options={"shots": 2}),
                   calibration=token_windows(samples=2, seq_len=16))
    mlp = report.layer_scores["units removed (mlp)"]
    attention = report.layer_scores["units removed (attention)"]
    for index, (before, after) in enumerate(zip(dense.model.layers, model.model.layers)):
        assert mlp[index] == before.mlp.up_proj.out_features - after.mlp.up_proj.out_features
        head_dim = before.self_attn.head_dim
        assert attention[index] == (before.self_attn.k_proj.out_features - after.self_attn.k_proj.out_features) // head_dim


def test_cut_linears_report_their_true_widths():
    """A cut linear's in_features / out_features follow its weight (K-FAC factors reshape by them)."""
    model = tiny_model()
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.1, method_options={"shots": 1, "components": "attention"}),
          calibration=token_windows(samples=2, seq_len=16))
    assert model.model.layers[0].self_attn.o_proj.in_features < 64 or model.model.layers[1].self_attn.o_proj.in_features < 64 \
        or model.model.layers[2].self_attn.o_proj.in_features < 64
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)


def test_coupling_all_keeps_the_kept_groups_key_value_rows_alive():
    """A removed key/value group's rows are zeroed by its update; the kept group's must stay non-zero."""
    model = tiny_model()
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.1,
                               method_options={"shots": 1, "coupling": "all", "components": "attention"}),
          calibration=token_windows(samples=2, seq_len=16))
    cut = 0
    for layer in model.model.layers:
        attention = layer.self_attn
        head_dim = attention.head_dim
        cut += attention.k_proj.out_features < 32
        for projection in (attention.k_proj, attention.v_proj):
            for group in projection.weight.reshape(-1, head_dim, projection.in_features):
                assert group.abs().sum() > 0
    assert cut


def test_one_shot_updates_each_linear_for_all_its_removed_units_together(monkeypatch):
    """Several units of one component removed in a shot: the correlated update sees all their columns at once
    (the paper's max_correlate=0), not only the first unit's."""
    from optimum_prune.methods import llm_surgeon_structured

    seen, original_remove = [], llm_surgeon_structured.LLMSurgeonStructured._remove
    original_update = llm_surgeon_structured._correlated_structure_update

    def remove(self, layer, component, units, indices, inverses):
        width = len(units[0][0].indices)
        seen.append(("removed", len(indices) * width))
        return original_remove(self, layer, component, units, indices, inverses)

    def update(part, g_inverse, a_inverse):
        seen.append(("updated", len(part.indices)))
        return original_update(part, g_inverse, a_inverse)

    monkeypatch.setattr(llm_surgeon_structured.LLMSurgeonStructured, "_remove", remove)
    monkeypatch.setattr(llm_surgeon_structured, "_correlated_structure_update", update)
    prune(tiny_model(), PruningConfig(method="llm_surgeon_structured", sparsity=0.2, method_options={"shots": 1, "components": "mlp"}),
          calibration=token_windows(samples=2, seq_len=16))
    pairs = list(zip(seen[::2], seen[1::2]))  # output coupling: one update (the down_proj columns) per _remove
    assert pairs and any(r[1] > 1 for r, _ in pairs)
    for (kind_r, columns), (kind_u, updated) in pairs:
        assert kind_r == "removed" and kind_u == "updated" and updated == columns


@pytest.mark.parametrize(("component", "block", "producers"), [("mlp", "mlp", ("gate_proj", "up_proj")), ("attention", "self_attn", ("q_proj",))])
def test_coupling_all_updates_the_kept_rows_of_the_removed_units_producers(component, block, producers):
    """With 'all' the removed units' producer rows (MLP gate/up rows, a removed group's query rows) take part in the
    correlated update, so the kept rows move (with 'output' they are left exactly as they were)."""
    dense, model = tiny_model(), tiny_model()
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.1,
                               method_options={"shots": 1, "coupling": "all", "components": component}),
          calibration=token_windows(samples=2, seq_len=16))
    moved = 0
    for before, after in zip(dense.model.layers, model.model.layers):
        for name in producers:
            original, now = getattr(getattr(before, block), name).weight, getattr(getattr(after, block), name).weight
            if now.shape[0] == original.shape[0]:
                continue
            # every kept row differs from every original row: nothing is a plain copy
            moved += int((~(now[:, None, :] == original[None, :, :]).all(-1).any(-1)).sum())
    assert moved > 0


@pytest.mark.parametrize("module,method", [(llm_surgeon, "llm_surgeon"), (llm_surgeon_structured, "llm_surgeon_structured")], ids=["unstructured", "structured"])
def test_factors_on_cpu_reaches_the_curvature_and_changes_nothing_on_the_cpu(monkeypatch, module, method):
    """Both LLM Surgeon methods take ``factors_on_cpu`` (the structured one held its factors on the calibration
    device only: 305 GiB beside a 70B model); on a CPU model the result is the same either way."""
    placed = []
    original = module.kfac_factors

    def spy(model, windows, linears, on_cpu=False):
        placed.append(on_cpu)
        return original(model, windows, linears, on_cpu)

    monkeypatch.setattr(module, "kfac_factors", spy)
    models = []
    for on_cpu in (False, True):
        model = tiny_model()
        config = PruningConfig(method=method, sparsity=0.3, method_options={"shots": 1, "factors_on_cpu": on_cpu})
        prune(model, config, calibration=token_windows(samples=2, seq_len=16))
        models.append(model)
    assert placed == [False, True]
    for dense, hosted in zip(*(model.state_dict().items() for model in models)):
        assert dense[0] == hosted[0] and torch.equal(dense[1], hosted[1])


def test_round_to_leaves_mlp_widths_a_multiple_of_it_after_every_shot():
    model = tiny_model()
    options = {"shots": 2, "round_to": 8}
    prune(model, PruningConfig(method="llm_surgeon_structured", sparsity=0.3, method_options=options), calibration=token_windows())
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(width % 8 == 0 for width in widths) and sum(widths) < 3 * 128, widths

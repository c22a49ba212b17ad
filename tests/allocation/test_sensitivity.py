import pytest
import torch
from torch import nn

from optimum_prune import ALLOCATIONS, PruningConfig, prune
from optimum_prune.allocation.sensitivity import SensitivityAllocation, SensitivityOptions
from optimum_prune.calibration.gradients import hessian_traces

from ..conftest import tiny_model, token_windows


class Quadratic(nn.Module):
    """loss = ½ Σ_g c_g ‖θ_g‖²: the Hessian trace of group g is c_g × its size, known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(5))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool):
        loss = 0.5 * (2.0 * self.first.square().sum() + 7.0 * self.second.square().sum())
        return type("Output", (), {"loss": loss})()


def test_hutchinson_estimates_the_hessian_trace_per_group():
    model = Quadratic()
    traces = hessian_traces(model, torch.zeros(3, 2, dtype=torch.long), [[model.first], [model.second]], probes=2)
    assert traces == pytest.approx([2.0 * 12, 7.0 * 5])  # Rademacher probes are exact for diagonal Hessians


def test_parameters_outside_the_graph_add_nothing_instead_of_failing():
    """An MoE expert no token of a window reached is not in that window's graph: autograd refused it."""
    model = Quadratic()
    unused = nn.Parameter(torch.ones(2))
    traces = hessian_traces(model, torch.zeros(3, 2, dtype=torch.long), [[model.first, unused], [unused], [model.second]], probes=2)
    assert traces == pytest.approx([2.0 * 12, 0.0, 7.0 * 5])


def test_a_bfloat16_models_traces_are_not_summed_in_bfloat16():
    """Each tensor's vᵀHv was summed in the parameter dtype: 8 bits in bf16, which swapped two real SmolLM2 layers'
    sensitivity ranks 0.5 % apart (and so their sparsities). Here group a's trace is 3 × 1003, b's 3010."""

    class HalfQuadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ParameterList([nn.Parameter(torch.ones(1003, dtype=torch.bfloat16)) for _ in range(3)])
            self.b = nn.Parameter(torch.ones(3010, dtype=torch.bfloat16))

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool):
            return type("Output", (), {"loss": 0.5 * (sum(p.square().sum() for p in self.a) + self.b.square().sum())})()

    model = HalfQuadratic()
    assert hessian_traces(model, torch.zeros(1, 2, dtype=torch.long), [list(model.a), [model.b]]) == pytest.approx([3009.0, 3010.0], rel=1e-6)


def test_sensitivity_allocation_on_moe_windows_that_leave_experts_unrouted():
    from ..adapters.test_moe import tiny_moe

    model = tiny_moe("mixtral")
    config = PruningConfig(method="wanda", sparsity=0.5, allocation="sensitivity", allocation_options={"windows": 2})
    report = prune(model, config, calibration=token_windows(samples=2, seq_len=4, seed=0))  # 4 tokens: some expert unrouted
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_densities_follow_the_sensitivity_ranking_and_average_to_the_target():
    allocation = SensitivityAllocation(SensitivityOptions(max_deviation=0.1))
    allocation.sensitivities = [5.0, 1.0, 9.0, 3.0]
    sparsities = allocation.allocate(0.5, [100] * 4)
    assert sum(sparsities) / 4 == pytest.approx(0.5)
    assert sparsities[2] == pytest.approx(0.4) and sparsities[1] == pytest.approx(0.6)  # most sensitive keeps most
    assert sparsities[3] > sparsities[0]


def test_equally_sensitive_layers_get_equal_sparsities():
    """Ranked by position, equal layers got 0.6, 0.533, 0.467 (and all-equal ones no uniform 0.5)."""
    allocation = SensitivityAllocation(SensitivityOptions(max_deviation=0.1))
    allocation.sensitivities = [0.0, 0.0, 0.0, 5.0]
    assert allocation.allocate(0.5, [100] * 4) == pytest.approx([0.5 + 0.1 / 3] * 3 + [0.4])
    allocation.sensitivities = [3.0] * 4
    assert allocation.allocate(0.5, [100] * 4) == pytest.approx([0.5] * 4)


def test_sensitivity_with_isc_sparsegpt_on_a_model():
    model = tiny_model(num_hidden_layers=4)
    config = PruningConfig(
        method="sparsegpt", sparsity=0.6, allocation="sensitivity", allocation_options={"windows": 2},
        method_options={"saliency": "isc"},
    )  # fmt: skip
    report = prune(model, config, calibration=token_windows())
    targets = [target for target, _ in report.layer_sparsities().values()]
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    assert len({round(t, 6) for t in targets}) == 4
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.01)


def test_isc_changes_the_masks_of_sparsegpt_and_errors_name_the_option():
    masks = {}
    for saliency in ("obs", "isc"):
        model = tiny_model()
        prune(model, PruningConfig(method="sparsegpt", sparsity=0.5, method_options={"saliency": saliency}), calibration=token_windows())
        masks[saliency] = model.model.layers[0].mlp.down_proj.weight == 0
    assert not torch.equal(masks["obs"], masks["isc"])
    with pytest.raises(ValueError, match="saliency must be one of"):
        PruningConfig(method="sparsegpt", method_options={"saliency": "obd"})
    with pytest.raises(ValueError, match="max_deviation"):
        PruningConfig(method="wanda", sparsity=0.5, allocation="sensitivity", allocation_options={"max_deviation": 0.6})


def test_more_windows_than_the_calibration_holds_are_warned_of(caplog):
    allocation = SensitivityAllocation(SensitivityOptions(windows=1000))
    model = tiny_model(num_hidden_layers=2)
    layers = [{"up": layer.mlp.up_proj} for layer in model.model.layers]
    with caplog.at_level("WARNING", logger="optimum_prune.allocation.sensitivity"):
        allocation.observe_model(model, token_windows(samples=3, seq_len=16), layers)
    assert "allocation_options.windows is 1000 but the calibration holds 3 windows" in caplog.text


def test_the_probes_are_drawn_from_the_configs_seed():
    """Every seed gave the probes of seed 0: the ranking depended on a draw the user could not vary."""
    model, windows = tiny_model(num_hidden_layers=4), token_windows(2, 16)
    layers = [{"down": layer.mlp.down_proj} for layer in model.model.layers]

    def traces(seed: int) -> list[float]:
        allocation = PruningConfig(method="wanda", sparsity=0.5, allocation="sensitivity", seed=seed)
        spec = ALLOCATIONS.get("sensitivity")
        observed = spec.create(allocation.build_allocation_options(), allocation.seed)
        observed.observe_model(model, windows, layers)
        return observed.sensitivities

    assert traces(0) == traces(0) != traces(1)
    groups = [[linear.weight for linear in linears.values()] for linears in layers]
    assert traces(7) == pytest.approx(hessian_traces(model, windows, groups, seed=7))


def test_unpadded_processed_batches_are_taken_as_the_token_windows_they_hold():
    """Refused ("needs token windows"), while the structured methods took the same batches."""
    windows = token_windows(4, 16)
    config = PruningConfig(method="wanda", sparsity=0.5, allocation="sensitivity", allocation_options={"windows": 4})
    expected, model = tiny_model(), tiny_model()
    prune(expected, config, calibration=windows)
    prune(model, config, calibration=[{"input_ids": windows[:2]}, {"input_ids": windows[2:]}])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_overlapping_passes_share_the_math_attention_switch():
    """torch's SDPA kernel flags are process-wide: pass A leaving while pass B ran turned the fused kernels back on
    under B's double backward (a RuntimeError), and B leaving last restored A's flags: the fused kernels stayed off."""
    import threading

    from optimum_prune.calibration.gradients import math_attention

    fused = torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled
    before = [enabled() for enabled in fused]
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen_by_b = []

    def pass_a():
        with math_attention():
            a_entered.set()
            b_entered.wait()
        a_left.set()

    def pass_b():
        a_entered.wait()
        with math_attention():
            b_entered.set()
            a_left.wait()
            seen_by_b.append([enabled() for enabled in fused])  # A has left: still math only for B

    threads = [threading.Thread(target=pass_a), threading.Thread(target=pass_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen_by_b == [[False, False]]
    assert [enabled() for enabled in fused] == before  # both left: the caller's flags are back


def test_the_traces_are_those_of_the_first_windows_the_options_name():
    model, windows = tiny_model(num_hidden_layers=2), token_windows(4, 16)
    layers = [{"down": layer.mlp.down_proj} for layer in model.model.layers]
    allocation = SensitivityAllocation(SensitivityOptions(windows=2))
    allocation.observe_model(model, windows, layers)
    groups = [[layer.mlp.down_proj.weight] for layer in model.model.layers]
    assert allocation.sensitivities == pytest.approx(hessian_traces(model, windows[:2], groups, 1, 0, window_indices=[0, 1]))


@pytest.mark.parametrize(("target", "sensitivities"), [(0.8, [1.0, 2.0]), (0.1, [2.0, 1.0])])
def test_sensitivity_refuses_layer_sparsities_outside_0_1(target, sensitivities):
    allocation = SensitivityAllocation(SensitivityOptions(max_deviation=0.3))
    allocation.sensitivities = sensitivities
    with pytest.raises(ValueError, match="lower PruningConfig.allocation_options.max_deviation"):
        allocation.allocate(target, [100, 100])

import itertools
import logging
import unittest.mock

import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.methods.magnitude import MagnitudeOptions, MagnitudePruner
from optimum_prune.methods.sparsegpt import SparseGPTOptions, SparseGPTPruner
from optimum_prune.sparsity import NMPattern, conforms_to

from ..adapters.test_moe import tiny_moe
from ..conftest import tiny_model, token_windows


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    scales = torch.logspace(-1, 1, features)
    return torch.randn(tokens, features, generator=generator) @ mixing * scales


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4), 0.7])
def test_reconstruction_error_below_magnitude(target):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    X = _correlated_inputs(512, 64)
    reference = dense(X).detach()

    errors = {}
    for name, pruner_cls, options in (
        ("sparsegpt", SparseGPTPruner, SparseGPTOptions(block_size=16)),
        ("magnitude", MagnitudePruner, MagnitudeOptions()),
    ):
        linear = torch.nn.Linear(64, 32, bias=False)
        linear.load_state_dict(dense.state_dict())
        pruner = pruner_cls(linear, options)
        pruner.add_batch(X.reshape(4, 128, 64))
        pruner.prune(target)
        fraction = target.sparsity if isinstance(target, NMPattern) else target
        # SparseGPT picks its mask per 16-column block, so truncation may cost one weight per block.
        assert 0 <= int(linear.weight.numel() * fraction) - int((linear.weight == 0).sum()) <= 64 // 16
        if isinstance(target, NMPattern):
            assert conforms_to(linear.weight, target)
        errors[name] = (linear(X) - reference).norm().item()
    assert errors["sparsegpt"] < errors["magnitude"], errors


def _reference_sparsegpt(weight: torch.Tensor, inputs: torch.Tensor, target, block: int, dampening: float = 0.01) -> torch.Tensor:
    """The paper's algorithm (fasterprune of IST-DASLab/sparsegpt) written out, the unstructured mask by the
    library's exact-count selection (the reference's threshold may take one more on ties) and H from all the
    inputs at once: an independent statement of what SparseGPTPruner must compute."""
    from optimum_prune.sparsity import prune_lowest

    W = weight.detach().clone()
    X = inputs.reshape(-1, inputs.shape[-1])
    H = 2 * X.T @ X / X.shape[0]  # the scale of H cancels: dampening is relative to its mean diagonal
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, Q1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        if isinstance(target, NMPattern):  # chosen group by group, on the columns as updated so far
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = prune_lowest(W1**2 / torch.diag(Hinv1)[None] ** 2, target, per_row=False)
        for i in range(i2 - i1):
            if isinstance(target, NMPattern) and i % target.m == 0:
                saliency = W1[:, i : i + target.m] ** 2 / torch.diag(Hinv1)[i : i + target.m][None] ** 2
                mask1.scatter_(1, i + torch.topk(saliency, target.m - target.n, dim=1, largest=False).indices, True)
            q = W1[:, i].masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            Err1[:, i] = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= Err1[:, i : i + 1] @ Hinv1[i : i + 1, i:]
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)])
def test_the_update_is_the_papers_algorithm(target):
    """Only "below magnitude's error" was checked: an update missing within or across blocks, another dampening or
    saliency, or batches weighted unequally in H all passed it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    batches = [_correlated_inputs(128, 64, seed=seed).reshape(8, 16, 64) for seed in range(4)]
    expected = _reference_sparsegpt(linear.weight, torch.cat(batches), target, block=16)
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=16))
    for batch in batches:
        pruner.add_batch(batch)
    pruner.prune(target)
    assert torch.equal(linear.weight == 0, expected == 0)
    torch.testing.assert_close(linear.weight.detach(), expected, rtol=1e-4, atol=1e-4)


def test_isc_prunes_the_weights_of_lowest_obs_plus_obd_saliency():
    """ISC (Shao et al.): w²/[H⁻¹]_qq + w²·H_qq over the dampened Hessian; one block, so the mask is chosen once
    (a test that ISC's masks differ from OBS's passed a wrong sign and |w|)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    inputs = torch.randn(64, 16) * torch.linspace(0.1, 3, 16)
    weight = linear.weight.detach().clone().double()
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=16, saliency="isc"))
    pruner.add_batch(inputs)
    pruner.prune(0.5)
    hessian = 2 * inputs.double().T @ inputs.double() / inputs.shape[0]
    hessian += 0.01 * hessian.diag().mean() * torch.eye(16, dtype=torch.float64)
    inverse_diagonal = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True).diag().square()
    saliency = weight.square() / inverse_diagonal + weight.square() * hessian.diag()
    expected = torch.zeros(weight.numel(), dtype=torch.bool)
    expected[saliency.flatten().argsort()[: weight.numel() // 2]] = True
    assert torch.equal(linear.weight.detach() == 0, expected.view_as(weight))


def test_nm_needs_block_multiple():
    linear = torch.nn.Linear(64, 8, bias=False)
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=6))
    pruner.add_batch(torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"block_size 6: SparseGPT's 2:4 pattern needs a multiple of 4 \(e.g. 4\)"):
        pruner.prune(NMPattern(2, 4))


def test_a_block_size_its_pattern_cannot_tile_is_refused_by_the_config():
    """It was accepted, saved, and refused only by prune, naming a linear rather than the option."""
    with pytest.raises(ValueError, match=r"^PruningConfig.method_options.block_size 6: SparseGPT's 2:4 pattern needs a multiple of 4"):
        PruningConfig(method="sparsegpt", sparsity="2:4", method_options={"block_size": 6})
    with pytest.raises(ValueError, match=r"block_size 130: SparseGPT's 4:8 pattern needs a multiple of 8 \(e.g. 128\)"):
        PruningConfig(method="sparsegpt", sparsity=0.5, parts={"language": {"sparsity": "4:8"}}, method_options={"block_size": 130})
    PruningConfig(method="sparsegpt", sparsity=0.5, method_options={"block_size": 6})  # a fraction has no groups


def test_dead_inputs_are_zeroed():
    """With nothing to prune by saliency, only the never-active input's column goes."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4, bias=False)
    X = torch.randn(32, 8)
    X[:, 3] = 0  # a feature never active: its Hessian row is zero
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=4))
    pruner.add_batch(X)
    pruner.prune(0.0)
    zero = linear.weight == 0
    assert bool(zero[:, 3].all()) and not zero[:, [0, 1, 2, 4, 5, 6, 7]].any()


def _pruned_again(target, keep_zeros: bool, earlier: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(earlier zeros, weight, revived zeros counted) of a linear magnitude-pruned to ``earlier``, then pruned by
    SparseGPT to ``target``."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    MagnitudePruner(linear, MagnitudeOptions()).prune(earlier)
    zeros = linear.weight.detach() == 0
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=16, keep_zeros=keep_zeros))
    pruner.add_batch(_correlated_inputs(512, 64).reshape(4, 128, 64))
    pruner.prune(target)
    return zeros, linear.weight.detach(), pruner.revived_zeros


@pytest.mark.parametrize("target", [NMPattern(2, 4), 0.6, 0.3])
def test_keep_zeros_keeps_an_already_pruned_linear_s_zeros_pruned(target):
    zeros, weight, revived = _pruned_again(target, keep_zeros=True)
    assert (weight[zeros] == 0).all() and revived == 0
    if isinstance(target, NMPattern):  # the kept zeros count towards each group's m - n, no more is taken
        in_groups = (weight == 0).reshape(weight.shape[0], -1, target.m).sum(-1)
        assert torch.equal(in_groups, zeros.reshape(weight.shape[0], -1, target.m).sum(-1).clamp(min=target.m - target.n))
    else:  # the target fraction at least, per 16-column block (one weight of rounding per block)
        assert int((weight == 0).sum()) >= int(weight.numel() * max(target, 0.5)) - 64 // 16


def test_without_keep_zeros_the_update_revives_earlier_zeros_and_counts_them():
    zeros, weight, revived = _pruned_again(NMPattern(2, 4), keep_zeros=False)
    assert revived == int((weight[zeros] != 0).sum()) > 0  # the paper's algorithm: the mask is chosen among all weights


def test_every_run_that_revives_zeros_says_so_once(caplog):
    """Python's warnings module showed the warning in the first run of a process only, and per linear there."""
    messages = []
    for seed in (0, 1):
        model = tiny_model(seed=seed)
        prune(model, PruningConfig(method="magnitude", sparsity=0.5))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="optimum_prune"):
            report = prune(model, PruningConfig(method="sparsegpt", sparsity="2:4"), calibration=token_windows(4, 32))
        messages.append([record.getMessage() for record in caplog.records if "keep_zeros" in record.getMessage()])
        assert len(report.revived_zeros) == len(report.linears)
        assert messages[-1] == [
            f"sparsegpt: the model was already sparse (pruned before, or a quantizer's exact zeros), and the update made "
            f"{sum(report.revived_zeros.values()):,} of its zeros non-zero again in {len(report.linears)} linears "
            "(PruningReport.revived_zeros); set PruningConfig.method_options.keep_zeros=True to keep them pruned"
        ]


def test_an_unstructured_step_that_breaks_an_earlier_n_m_pattern_says_so(caplog):
    """The history [2:4, 0.6] implies both hold; the generic revived-zeros warning did not say the pattern was gone."""
    from optimum_prune import verify_sparsity

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="sparsegpt", sparsity=0.6, method_options={"block_size": 16}), calibration=token_windows(4, 32))
    assert not verify_sparsity(model, "2:4")["conforming"]
    assert "undid the model's earlier unstructured pruning" in caplog.text and "no longer 2:4" in caplog.text
    assert "keep_zeros=True" in caplog.text
    caplog.clear()
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):  # kept: nothing undone, nothing said
        prune(model, PruningConfig(method="sparsegpt", sparsity=0.6, method_options={"block_size": 16, "keep_zeros": True}), calibration=token_windows(4, 32))
    assert verify_sparsity(model, "2:4")["conforming"] and "undid" not in caplog.text


def test_a_dense_linear_with_a_few_exact_zeros_is_not_taken_for_a_pruned_one():
    assert _pruned_again(NMPattern(2, 4), keep_zeros=False, earlier=0.005)[2] == 0


def test_an_allocation_on_a_model_whose_zeros_fill_column_blocks_still_ends_at_the_target():
    """SparseGPT brings each column block to the target: a block already all zero keeps them all, so a linear whose
    zeros fill its first block ends above the target though it holds less than the target overall. The allocation
    lowers the other layer targets for that (zeros counted per block, not per linear: 54.4 % for 50 % before)."""
    model, windows = tiny_model(), token_windows()
    for linear in (m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)):
        linear.weight.data[:, :16] = 0
    options = {"block_size": 16, "keep_zeros": True}
    report = prune(model, PruningConfig(method="sparsegpt", sparsity=0.5, allocation="owl", method_options=options), windows)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.003)


@pytest.fixture
def unshared(monkeypatch):
    """Makes every input look like a tensor of its own: each linear keeps its own Hessian, as before sharing."""
    from optimum_prune.calibration import sharing

    calls = itertools.count()
    monkeypatch.setattr(sharing, "tensor_identity", lambda inputs: (next(calls), inputs._version))


def _pruned_weights(model: torch.nn.Module, moe_options: dict | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """(the weights SparseGPT leaves, how many Hessian updates it computed)."""
    from optimum_prune.methods.sparsegpt import InputHessian

    updates = []
    add = InputHessian.add
    with unittest.mock.patch.object(InputHessian, "add", lambda self, inputs: (updates.append(self), add(self, inputs))):
        config = PruningConfig(method="sparsegpt", sparsity=0.5, moe_options=moe_options or {})
        prune(model, config, calibration=token_windows(4, 32))
    return {name: weight.clone() for name, weight in model.state_dict().items()}, len(updates)


@pytest.mark.parametrize(
    "build, moe_options, shared_per_batch",
    [
        (lambda: tiny_model("llama"), None, 3 * 3),  # per layer, q/k/v and gate/up: 4 Hessian updates, not 7
        (lambda: tiny_model("olmo2"), None, 3 * 3),  # post-norms: q/k/v still read one tensor
        # each expert's w1 and w3 read its tokens (scaled by their routing weights once for both): shared too, one
        # update per expert that received tokens
        (lambda: tiny_moe("mixtral"), {"routing_weighted": True}, None),
        (lambda: tiny_moe("mixtral"), {"routing_weighted": False}, None),
    ],
    ids=["llama", "olmo2", "mixtral-weighted", "mixtral-unweighted"],
)
def test_linears_reading_one_tensor_share_a_hessian_and_prune_bit_for_bit_as_alone(build, moe_options, shared_per_batch, request):
    weights, updates = _pruned_weights(build(), moe_options)
    request.getfixturevalue("unshared")
    alone, updates_alone = _pruned_weights(build(), moe_options)
    for name, weight in alone.items():
        assert torch.equal(weights[name], weight), name
    batches = 4
    if shared_per_batch is None:
        assert updates < updates_alone - 2 * 2 * batches  # q/k/v, and experts' w1/w3
    else:
        assert updates_alone - updates == shared_per_batch * batches


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])  # qwen2_moe: a gated shared expert too
def test_scaling_by_routing_weight_keeps_an_expert_s_input_projections_on_one_hessian(family):
    """Scaled once for both, an expert's two input projections (Mixtral's w1, w3) share as they do unscaled."""
    _, weighted = _pruned_weights(tiny_moe(family), {"routing_weighted": True})
    _, unweighted = _pruned_weights(tiny_moe(family), {"routing_weighted": False})
    assert weighted == unweighted


def test_a_layer_whose_input_was_written_in_place_is_fed_again_with_a_hessian_per_linear(monkeypatch):
    """Held until the batch ends, such an input no longer holds what its linear read."""
    from optimum_prune.calibration.sharing import InputsChangedInPlace, SharedStatistics

    expected, _ = _pruned_weights(tiny_model())
    end_batch = SharedStatistics.end_batch

    def written_in_place(self):
        if self._pending:  # the shared feeding holds inputs; the feeding again passes each to its pruner at once
            raise InputsChangedInPlace("model.layers.0.self_attn.q_proj's input was written in place")
        end_batch(self)

    monkeypatch.setattr(SharedStatistics, "end_batch", written_in_place)
    weights, updates = _pruned_weights(tiny_model())
    assert updates == 3 * 7 * 4
    for name, weight in expected.items():
        assert torch.equal(weights[name], weight), name

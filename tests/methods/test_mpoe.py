"""MPOE: the MPO decomposition, the shared-central fit, the sparsity-driven bond, save and reload."""

import json
import math

import pytest
import torch

from optimum_prune import PruningConfig, get_adapter, prune, save_pruned
from optimum_prune.methods.mpoe import fit_shared_central
from optimum_prune.structure.mpo import MPOLinear, contract, factorize, full_central_bonds, split_left, split_right, unfold

from ..adapters.test_moe import tiny_moe
from ..conftest import assert_reloads_exactly, loaded_with_layer_1_on_disk, tiny_model, token_windows


def _cores(left, central, right, rows, columns):
    return [*split_left(left, rows, columns), central.reshape(left.shape[1], rows[2], columns[2], right.shape[0]), *split_right(right, rows, columns)]


@pytest.mark.parametrize("dimension", [96, 768, 3072, 14336, 7])
def test_factorisation_multiplies_back_with_the_largest_factor_in_the_middle(dimension):
    factors = factorize(dimension)
    assert len(factors) == 5 and math.prod(factors) == dimension and factors[2] == max(factors)


def test_one_expert_with_full_bonds_is_decomposed_exactly():
    rows, columns = factorize(96), factorize(64)
    weight = torch.randn(96, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = unfold(weight, rows, columns)
    (left,), (right,), central = fit_shared_central([target], *full_central_bonds(rows, columns), sweeps=0)
    torch.testing.assert_close(contract(_cores(left, central, right, rows, columns), rows, columns), weight)


def test_experts_sharing_a_central_tensor_are_recovered_and_sweeps_never_hurt():
    rows, columns = factorize(96), factorize(64)
    d2, d3 = 6, 5
    generator = torch.Generator().manual_seed(1)
    left_size, middle, right_size = unfold(torch.zeros(96, 64), rows, columns).shape
    central = torch.randn(d2, middle, d3, dtype=torch.float64, generator=generator)
    orthonormal = lambda n, k: torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q  # noqa: E731
    targets = [torch.einsum("lp,pmq,qr->lmr", orthonormal(left_size, d2), central, orthonormal(right_size, d3).T) for _ in range(3)]

    def error(sweeps):
        lefts, rights, fitted = fit_shared_central(targets, d2, d3, sweeps)
        return sum(float((x - torch.einsum("lp,pmq,qr->lmr", l, fitted, r)).square().sum()) for x, l, r in zip(targets, lefts, rights))

    errors = [error(sweeps) for sweeps in (0, 1, 5, 50)]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6 * sum(float(x.square().sum()) for x in targets)


def test_prunes_to_the_target_shares_one_central_tensor_and_reloads(tmp_path):
    model = tiny_moe()
    adapter = get_adapter(model)
    decoder_linears = sum(linear.weight.numel() for layer in adapter.decoder_layers() for linear in adapter.prunable_linears(layer).values())
    parameters = lambda: sum(p.numel() for p in model.model.layers.parameters())  # noqa: E731
    before = parameters()
    report = prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    removed = before - parameters()
    # Untruncated bonds already remove more than asked (4 experts keep one central tensor): they are kept.
    assert removed >= 0.3 * decoder_linears and "central bonds (24, 16)" in report.removed[0]
    truncated = tiny_moe()
    prune(truncated, PruningConfig(method="mpoe", sparsity=0.6))
    kept = sum(p.numel() for p in truncated.model.layers.parameters())
    assert 0.6 * decoder_linears <= before - kept < 0.65 * decoder_linears  # the largest bond that meets the target
    block = model.model.layers[0].block_sparse_moe
    first, second = block.experts[0].w1, block.experts[1].w1
    assert isinstance(first, MPOLinear) and first.shared is second.shared is block.expert_mpo
    assert "mpo" in report.shapes[0].to_dict()
    assert report.macs_per_token_after == report.macs_per_token_before  # fewer parameters, the same compute
    windows = token_windows()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=windows).logits).all()
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def _bonds_past_full(layer):
    for entry in layer["mpo"].values():
        entry["central_bonds"] = [1000, 1000]


def _more_experts_than_built(layer):
    del layer["mpo"]
    layer["num_experts"] = 9


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [  # bonds size the shared central core (1000 x 1000 x i3 x j3 each), which transformers allocates where it is missing
        (_bonds_past_full, r"mpo gives 'w\d' central bonds \[1000, 1000\], past the full ones \[\d+, \d+\]"),
        (_more_experts_than_built, "the layer records 9 experts, more than the 4 of a layer built from the config"),  # was: IndexError
    ],
)
def test_an_edited_config_is_refused_as_corrupt_before_the_experts_are_built(tmp_path, corrupt, message):
    from transformers import AutoModelForCausalLM

    model = tiny_moe()
    prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    save_pruned(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for layer in config["quantization_config"]["layers"]:
        corrupt(layer)
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{message}.* config.json is corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_a_decomposed_checkpoint_loaded_with_offloaded_layers_runs_as_loaded_whole(tmp_path):
    """accelerate hooks the cores' parameter containers, which have no forward to load them: the contraction read
    meta / uninitialised cores (NaN logits, other ones at each call) from a layer offloaded to disk."""
    from transformers import AutoModelForCausalLM

    model = tiny_moe()
    prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    save_pruned(model, tmp_path / "out")
    offloaded = loaded_with_layer_1_on_disk(tmp_path / "out", tmp_path)
    assert offloaded.model.layers[1].block_sparse_moe.expert_mpo.central["w1"].is_meta
    windows = token_windows(samples=2, seq_len=12)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=windows).logits
        assert torch.equal(offloaded(input_ids=windows).logits, expected)


def test_the_decomposed_experts_train_with_one_shared_central_tensor():
    """MPOE fine-tunes after decomposing: the shared central tensor and each expert's auxiliary
    tensors receive gradients, and a few optimizer steps lower the loss."""
    model = tiny_moe()
    prune(model, PruningConfig(method="mpoe", sparsity=0.6))
    model.train()
    windows = token_windows(samples=4, seq_len=16)
    block = model.model.layers[0].block_sparse_moe
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=windows, labels=windows).loss
        loss.backward()
        if not losses:
            assert list(block.expert_mpo.parameters()) and all(p.grad is not None for p in block.expert_mpo.parameters())
            assert all(p.grad is not None for p in block.experts[0].w1.auxiliary)
        optimizer.step(), optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["wanda", "llm_surgeon"])
def test_zeroing_weights_of_experts_factorised_by_mpoe_is_refused(method):
    """Wanda skipped the factorised experts (no nn.Linear) and reported 50 % for the attention linears alone."""
    model = tiny_moe()
    prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    with pytest.raises(ValueError, match=r"model.layers.0.block_sparse_moe.experts.0.w1 was factorised by mpoe and stores no weight matrix"):
        prune(model, PruningConfig(method=method, sparsity=0.5), calibration=token_windows())


def test_merging_experts_factorised_by_mpoe_is_refused():
    """Their weight is rebuilt at each read: the average was written to a temporary and lost, and the other
    members of each group were removed with the report saying "merged"."""
    model = tiny_moe()
    prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    with pytest.raises(ValueError, match=r"model.layers.0: merge_experts averages the experts' weight matrices, which MPOLinear does not store"):
        prune(model, PruningConfig(method="merge_experts", sparsity=0.5), calibration=token_windows())


def test_decomposing_decomposed_experts_again_says_so():
    model = tiny_moe()
    prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    with pytest.raises(ValueError, match="already decomposed this model's experts"):  # it said "use a Mixtral-style model"
        prune(model, PruningConfig(method="mpoe", sparsity=0.3))


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="bond_dimension must be >= 0"):
        PruningConfig(method="mpoe", method_options={"bond_dimension": -1})
    with pytest.raises(ValueError, match="mixture-of-experts layers"):
        prune(tiny_model(), PruningConfig(method="mpoe", sparsity=0.3))
    with pytest.raises(ValueError, match="can remove at most"):
        prune(tiny_moe(), PruningConfig(method="mpoe", sparsity=0.95))


def test_every_expert_starts_from_its_own_procrustes_factors():
    """An expert whose weight is another's with its left factor rotated is recovered without any sweep."""
    rows, columns = factorize(96), factorize(64)
    generator = torch.Generator().manual_seed(1)
    left_size, middle, right_size = unfold(torch.zeros(96, 64), rows, columns).shape
    orthonormal = lambda n, k: torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q  # noqa: E731
    central = torch.randn(6, middle, 5, dtype=torch.float64, generator=generator)
    first = torch.einsum("lp,pmq,qr->lmr", orthonormal(left_size, 6), central, orthonormal(right_size, 5).T)
    rotation = orthonormal(left_size, left_size)
    targets = [first, torch.einsum("kl,lmr->kmr", rotation, first)]
    lefts, rights, fitted = fit_shared_central(targets, 6, 5, sweeps=0)
    error = sum(float((x - torch.einsum("lp,pmq,qr->lmr", l, fitted, r)).square().sum()) for x, l, r in zip(targets, lefts, rights))
    assert error < 1e-12 * sum(float(x.square().sum()) for x in targets)


def test_without_sweeps_the_central_tensor_is_still_the_least_squares_centre_of_the_fitted_factors():
    """sweeps=0: after each expert's Procrustes factors, C is the mean of L_eᵀ X_e R_eᵀ (the optimum for those factors),
    not the first expert's own centre."""
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(12, 4, 10, dtype=torch.float64, generator=generator) for _ in range(3)]
    lefts, rights, central = fit_shared_central(targets, 5, 4, sweeps=0)
    mean = sum(torch.einsum("lp,lmr,qr->pmq", l, x, r) for x, l, r in zip(targets, lefts, rights)) / len(targets)
    torch.testing.assert_close(central, mean)

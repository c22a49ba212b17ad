import pytest
import torch

from optimum_prune import NMPattern, verify_sparsity
from optimum_prune.sparsity import conforms_to, prune_lowest, prune_lowest_nm

from .conftest import tiny_model


def test_exact_count_with_ties():
    scores = torch.zeros(4, 16)  # every score ties: a threshold would prune everything
    assert int(prune_lowest(scores, 0.5, per_row=False).sum()) == 32
    per_row = prune_lowest(scores, 0.25, per_row=True)
    assert per_row.sum(dim=1).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("per_row", [True, False])
def test_the_cut_is_the_first_entries_of_a_stable_sort(per_row):
    """The k-th value cut picks exactly what a stable sort's first entries pick: ties in order of position
    (already-pruned zeros, quantized scores), NaN scores last."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        scores = torch.randint(0, 4, (7, 24), generator=generator).float()  # many ties
        if trial % 2:
            scores[torch.rand(scores.shape, generator=generator) < 0.2] = float("nan")
            scores[0, 5:8] = float("inf")  # after some NaNs: a sort puts +inf before every NaN
        for sparsity in (0.1, 0.5, 0.8, 0.99):
            rows = scores if per_row else scores.reshape(1, -1)
            count = int(rows.shape[1] * sparsity)
            expected = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, torch.argsort(rows, dim=1, stable=True)[:, :count], True)
            assert torch.equal(prune_lowest(scores, sparsity, per_row), expected.view_as(scores))


@pytest.mark.parametrize("per_row", [True, False])
def test_a_few_ties_are_taken_in_order_of_position_as_many_are(per_row):
    """Few ties at the cut (most weights distinct, some repeated: bf16-born scores) take the index path; it must
    pick what the stable sort picks, as the many-ties path does."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        scores = torch.randint(0, 2000, (6, 64), generator=generator).float()
        for sparsity in (0.1, 0.5, 0.9):
            rows = scores if per_row else scores.reshape(1, -1)
            count = int(rows.shape[1] * sparsity)
            expected = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, torch.argsort(rows, dim=1, stable=True)[:, :count], True)
            assert torch.equal(prune_lowest(scores, sparsity, per_row), expected.view_as(scores))


def test_counts_computed_in_floating_point_are_not_one_short():
    """100 × 0.29 = 28.999999999999996: flooring it pruned 28 weights a row, not 29."""
    scores = torch.rand(3, 100, generator=torch.Generator().manual_seed(0))
    assert prune_lowest(scores, 0.29, per_row=True).sum(dim=1).tolist() == [29, 29, 29]
    assert int(prune_lowest(scores, 0.29, per_row=False).sum()) == 87


def test_prunes_the_lowest():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    assert prune_lowest(scores, 0.5, per_row=True).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert prune_lowest_nm(scores, NMPattern(2, 4)).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_nm_mask_every_group():
    scores = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    for pattern in (NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)):
        mask = prune_lowest_nm(scores, pattern)
        pruned_per_group = mask.reshape(8, -1, pattern.m).sum(dim=2)
        assert bool((pruned_per_group == pattern.m - pattern.n).all())
        assert conforms_to(scores.masked_fill(mask, 0), pattern)


def test_a_group_with_one_zero_too_few_does_not_conform_and_n_m_counts_what_goes():
    """Only fully dense weights were refused (a check loosened by one passed), and only n = m/2 patterns counted."""
    three_of_four = torch.tensor([[1.0, 2.0, 0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])
    assert not conforms_to(three_of_four, NMPattern(2, 4)) and conforms_to(three_of_four, NMPattern(3, 4))
    assert (NMPattern(1, 4).sparsity, NMPattern(3, 4).sparsity, NMPattern(2, 8).sparsity) == (0.75, 0.25, 0.75)
    from optimum_prune import PruningConfig, prune

    report = prune(tiny_model(), PruningConfig(method="magnitude", sparsity="1:4"))
    assert {(line.target_sparsity, line.sparsity) for line in report.linears} == {(0.75, 0.75)}


def test_masks_sparsity_weights_each_linear_by_its_size():
    """What PruningCallback logs: the zeros over all weights, as verify_sparsity counts (not a mean of fractions)."""
    from optimum_prune import SparsityMasks

    model = tiny_model()
    for index, layer in enumerate(model.model.layers):  # unequal sparsities over linears of unequal sizes
        for name, linear in (("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj)):
            with torch.no_grad():
                linear.weight[: linear.weight.shape[0] // (2 + index + (name == "q"))] = 0
    assert SparsityMasks.from_zeros(model).sparsity() == pytest.approx(verify_sparsity(model)["overall_sparsity"], abs=1e-12)


def test_nm_needs_divisible_columns():
    with pytest.raises(ValueError, match="in_features=6 is not a multiple of M=4"):
        prune_lowest_nm(torch.rand(2, 6), NMPattern(2, 4))


def test_verify_sparsity_counts_real_zeros():
    model = tiny_model()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q_proj[:, 1::2] = 0  # 2:4-conforming half
    result = verify_sparsity(model, "2:4")
    entry = result["layers"]["model.layers.0.self_attn.q_proj"]
    assert entry["sparsity"] == 0.5 and entry["conforming"]
    assert not result["layers"]["model.layers.0.mlp.up_proj"]["conforming"]
    assert result["conforming"] is False
    assert "lm_head" not in result["layers"]
    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert result["overall_sparsity"] == zeros / sum(m.weight.numel() for m in linears)


def test_report_sparsities_weigh_each_linear_by_its_size():
    from optimum_prune.report import LinearReport, PruningReport

    report = PruningReport(
        method="magnitude", sparsity=0.5, allocation="owl", device="cpu", calibration_tokens=0,
        linears=[LinearReport("a", 0, 0.4, 0.5, 100), LinearReport("b", 0, 0.8, 0.9, 300), LinearReport("c", 1, 0.2, 0.1, 400)],
    )  # fmt: skip
    assert report.overall_sparsity == pytest.approx((50 + 270 + 40) / 800)
    assert report.layer_sparsities() == {0: (pytest.approx((40 + 240) / 400), pytest.approx((50 + 270) / 400)), 1: (pytest.approx(0.2), pytest.approx(0.1))}


def test_a_sparsity_just_below_one_keeps_a_weight_per_row():
    """whole_count rounded n·s to 6 decimals before the floor: 1000 × 0.9999999996 became 1000, a whole row."""
    assert prune_lowest(torch.randn(4, 1000), 0.9999999996, per_row=True).sum(dim=1).tolist() == [999] * 4
    assert prune_lowest(torch.randn(2, 100), 0.29, per_row=True).sum(dim=1).tolist() == [29, 29]  # 28.999999999999996


def test_nearest_count_rounds_every_half_up():
    """round() took halves to even (2.5 → 2, 5.5 → 6), and 15 × (1 − 0.9) = 1.4999999999999996 is a half too."""
    from optimum_prune.sparsity import nearest_count

    assert [nearest_count(v) for v in (2.5, 5.5, 15 * (1 - 0.9), 60 * (1 - 0.675), 2.4999, 2.0)] == [3, 6, 2, 20, 2, 2]


def test_verify_sparsity_checks_its_arguments():
    from optimum_prune import verify_sparsity

    model = tiny_model()
    with pytest.raises(TypeError, match="pattern"):  # was: AttributeError 'float' object has no attribute 'm'
        verify_sparsity(model, 0.5)
    # a single glob given as a string means that glob, as the default ("lm_head",): it was split into characters
    # and lm_head was counted silently (22 linears instead of 21)
    assert verify_sparsity(model, ignore="lm_head")["layers"].keys() == verify_sparsity(model)["layers"].keys()


@pytest.mark.parametrize(("n", "m"), [(4, 2), (2, 2), (2, 0), (0, 4)])
def test_an_nm_pattern_is_refused_as_parse_refuses_its_text(n, m):
    with pytest.raises(ValueError, match=r"needs 0 < N < M") as built:
        NMPattern(n, m)  # NMPattern(4, 2) was built, and a dense model conformed to it; (2, 0) divided by zero
    with pytest.raises(ValueError, match=r"needs 0 < N < M") as parsed:
        NMPattern.parse(f"{n}:{m}")
    assert str(built.value).partition(" needs ")[2] == str(parsed.value).partition(" needs ")[2]


@pytest.mark.parametrize(("n", "m"), [("2", "4"), (2.0, 4), (True, 4)])
def test_an_nm_pattern_of_other_types_is_a_type_error(n, m):
    with pytest.raises(TypeError, match="whole numbers"):
        NMPattern(n, m)


def test_masks_from_zeros_read_one_string_as_one_pattern_and_refuse_one_matching_nothing():
    from optimum_prune import PruningConfig, SparsityMasks, prune

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    as_string = SparsityMasks.from_zeros(model, ignore="*.o_proj")  # was 0 masks: '*', one character, matched every module
    assert set(as_string.pruned) == set(SparsityMasks.from_zeros(model, ignore=["*.o_proj"]).pruned)
    assert set(SparsityMasks.from_zeros(model, ignore={"*.o_proj"}).pruned) == set(as_string.pruned)  # any iterable
    assert verify_sparsity(model, ignore=(name for name in ["lm_head"]))["layers"].keys() == verify_sparsity(model)["layers"].keys()
    assert as_string.pruned and not any(name.endswith("o_proj") for name in as_string.pruned)
    with pytest.raises(ValueError, match=r"SparsityMasks.from_zeros ignore pattern\(s\) '\*.o_prj' match no module"):
        SparsityMasks.from_zeros(model, ignore=["*.o_prj"])
    with pytest.raises(TypeError, match="SparsityMasks.from_zeros ignore must be a glob pattern or a list of them"):
        SparsityMasks.from_zeros(model, ignore=[None])

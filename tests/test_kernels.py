"""The compressed 2:4 format, its reference path and ``sparsify`` (CPU; GPU kernels are tested where CUDA is)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import optimum_prune
from optimum_prune import PruningConfig, prune
from optimum_prune.kernels import Compressed24, SparseLinear, compress, decompress, sparsify
from optimum_prune.kernels.format import repack
from optimum_prune.quantized import dequantized_weight
from optimum_prune.sparsity import NMPattern, prune_lowest_nm

from .conftest import TINY, tiny_model, token_windows


def random_24(rows: int, columns: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).to(dtype)
    weight[prune_lowest_nm(weight.float().abs(), NMPattern(2, 4))] = 0
    weight[0, :4] = 0  # a group with fewer than two non-zeros
    weight[1, 4:8] = torch.tensor([0, 0, 0, 3.0], dtype=dtype)
    return weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 16), (24, 136), (3, 8)])
def test_compress_round_trips_exactly(dtype, shape):
    weight = random_24(*shape, dtype=dtype)
    compressed = compress(weight)
    assert compressed.values.shape == (shape[0], shape[1] // 2) and compressed.metadata.shape == (shape[0], shape[1] // 8)
    assert torch.equal(decompress(compressed), weight)
    assert compressed.num_bytes() == weight.numel() * weight.element_size() // 2 + weight.numel() // 8


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_values_stay_within_half_a_step_and_keep_the_zeros(bits):
    weight = random_24(16, 256)
    compressed = compress(weight, bits=bits, group_size=64)
    restored = decompress(compressed)
    assert torch.equal(restored == 0, (weight == 0) | (restored == 0)) and bool((restored[weight == 0] == 0).all())
    step = compressed.scales.float().repeat_interleave(64, dim=1)  # one scale per 64 input columns
    assert bool(((restored - weight).abs() <= step / 2 + 1e-6).all())
    # bytes per weight: values (bits/2 per weight, half are kept) + 2-bit metadata per kept value + fp32 scales per 64
    assert compressed.num_bytes() / weight.numel() == pytest.approx(bits / 16 + 0.125 + 4 / 64)


def test_sparse_linear_matches_the_masked_dense_layer_on_ragged_inputs():
    linear = nn.Linear(136, 24)
    with torch.no_grad():
        linear.weight.copy_(random_24(24, 136))
    sparse = SparseLinear.from_linear(linear)
    for tokens in (1, 3, 17):
        inputs = torch.randn(2, tokens, 136)
        torch.testing.assert_close(sparse(inputs), linear(inputs))


def test_non_24_weights_are_refused_by_name():
    linear = nn.Linear(16, 4)
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj is not 2:4 sparse: row 0"):
        SparseLinear.from_linear(linear, "model.layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        compress(torch.zeros(2, 12))


@pytest.mark.parametrize("bits", [None, 8])
def test_sparsify_swaps_the_24_linears_and_keeps_the_logits(bits):
    model = tiny_model()
    prune(model, PruningConfig(method="wanda", sparsity="2:4", ignore=["*.o_proj"]), calibration=token_windows())
    dense = copy.deepcopy(model)
    report = sparsify(model, bits=bits, group_size=32 if bits else None)
    layers = len(model.model.layers)
    assert len(report.swapped) == 6 * layers and report.left_dense == [f"model.layers.{i}.self_attn.o_proj" for i in range(layers)]
    assert report.bytes_after < report.bytes_before * (0.6 if bits is None else 0.35) and "sparsify:" in str(report)
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    ids = token_windows(samples=2, seq_len=8, seed=4)
    with torch.no_grad():
        if bits is None:
            torch.testing.assert_close(model(ids).logits, dense(ids).logits)
        else:
            assert (model(ids).logits - dense(ids).logits).abs().max() < 0.05 * dense(ids).logits.abs().max()
    with pytest.raises(ValueError, match="bits must be"):
        sparsify(model, bits=3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"group_size": 64}, "group_size sets the scales of the weights sparsify quantizes"),
        ({"bits": 4, "group_size": 0}, "group_size must be a positive integer"),
        ({"backend": "triton"}, "backend=.triton. runs the Triton kernel, which takes float16 or bfloat16 inputs; model.layers.0.self_attn.q_proj gets torch.float32"),
    ],
)
def test_sparsify_options_it_would_not_use_or_could_not_run_are_refused(options, message):
    """Ignored before (group_size without bits), a ZeroDivisionError (group_size=0), a failure at the first forward (triton on float32)."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with pytest.raises(ValueError, match=message):
        sparsify(model, **options)
    assert not any(isinstance(module, SparseLinear) for module in model.modules())


def test_a_group_with_three_nonzeros_is_refused():
    """compress would keep two of the three and drop one silently (sparsify checks first; direct callers do not)."""
    weight = torch.zeros(2, 8)
    weight[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="is not 2:4 sparse: row 0, columns 0–3 hold 3 non-zeros"):
        compress(weight)


def test_int8_codes_of_a_float16_group_with_a_subnormal_scale_keep_their_sign():
    """A float16 scale in the subnormal range rounds far from amax / 127: codes stay clamped to ±127, not
    wrapped around int8 (a sign flip)."""
    weight = (random_24(4, 16) / random_24(4, 16).abs().max() * 1e-5).half()  # group maxima ~1e-5: scales subnormal
    restored = decompress(compress(weight, bits=8, group_size=16)).float()
    assert bool((restored * weight.float() >= 0).all())
    assert bool((restored.abs() <= weight.float().abs().amax(-1, keepdim=True) * 1.01).all())


def test_quantized_scales_are_stored_in_the_weights_dtype():
    """The layer's dtype, the mma path's scale check and the bytes all read the scales' dtype."""
    for dtype in (torch.bfloat16, torch.float16):
        linear = nn.Linear(64, 8, bias=False).to(dtype)
        with torch.no_grad():
            linear.weight.copy_(random_24(8, 64, dtype))
        layer = SparseLinear.from_linear(linear, bits=4, group_size=32)
        assert layer.scales.dtype == dtype and layer.dtype == dtype


def test_sparsify_leaves_dense_a_24_linear_whose_inputs_are_not_a_multiple_of_8():
    """132 input features are 2:4 (33 groups of four) but not packable (pairs of groups): left dense, no error."""
    model = tiny_model(intermediate_size=132)
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    assert sparsify(model).left_dense == [f"model.layers.{i}.mlp.down_proj" for i in range(len(model.model.layers))]


def test_sparsify_warns_only_when_nothing_is_2_4(caplog):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4", ignore=["*.o_proj"]))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        report = sparsify(model)
    assert report.swapped and report.left_dense and "is exactly 2:4" not in caplog.text


def test_sparsify_counts_weight_bytes_without_the_biases():
    """bytes_before are the swapped linears' weights (Qwen2's q / k / v biases stay as they are)."""
    model = tiny_model("qwen2")
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    weights = sum(
        module.weight.numel() * module.weight.element_size()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    )
    assert sparsify(model).bytes_before == weights


def test_triton_on_quantized_linears_of_a_float32_model_is_refused_before_any_swap():
    """A quantized linear's inputs are the model's activations, float32 here, whatever its codes are."""
    from transformers import QuantoConfig

    from optimum_prune import compress

    model = tiny_model()
    compress(model, [PruningConfig(method="magnitude", sparsity="2:4"), QuantoConfig(weights="int8")])
    with pytest.raises(ValueError, match="q_proj gets torch.float32"):
        sparsify(model, backend="triton")
    assert not any(isinstance(module, SparseLinear) for module in model.modules())


def on_grid_24(
    rows: int, columns: int, codes: tuple[int, int], group_size: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 weight that is integer codes in [low, high] times one positive scale per row and group (a quantizer's
    dequantization), and those scales."""
    generator = torch.Generator().manual_seed(rows + columns)
    grid = torch.randint(codes[0], codes[1] + 1, (rows, columns), generator=generator).float()
    grid[prune_lowest_nm(torch.rand(rows, columns, generator=generator), NMPattern(2, 4))] = 0
    scales = (torch.rand(rows, columns // group_size, generator=generator) + 0.5).to(dtype) / 64
    return (grid * scales.float().repeat_interleave(group_size, dim=1)).to(dtype), scales


def affine_24(rows: int, columns: int, bits: int, group_size: int, dtype: torch.dtype = torch.float16) -> Compressed24:
    """16-bit 2:4 codes of an affine quantizer (spanning 2^bits levels off centre), repacked with zero-points."""
    levels = 2**bits
    return repack(*on_grid_24(rows, columns, (-3, levels - 4), group_size, dtype), group_size, bits)


def test_repack_keeps_a_scale_group_whose_scale_is_zero():
    """A quantizer gives an all-zero group the scale 0: its codes are 0, not 0 / 0."""
    weight, scales = on_grid_24(8, 32, (-7, 7), 8)
    weight[:, :8], scales[:, 0] = 0, 0
    assert torch.equal(decompress(repack(weight, scales, 8, 4)), weight)


def test_the_bytes_of_a_format_with_zero_points_count_them():
    """num_bytes (sparsify's bytes_after) counts every stored tensor, zero-points too."""
    compressed = affine_24(16, 256, 4, 64)
    stored = (compressed.values, compressed.metadata, compressed.scales, compressed.zero_points)
    assert compressed.zero_points is not None
    assert compressed.num_bytes() == sum(tensor.numel() * tensor.element_size() for tensor in stored)


@pytest.mark.parametrize("bits", [8, 4])
def test_repack_keeps_a_quantizers_codes_exactly_and_shifts_only_the_groups_that_need_it(bits):
    symmetric, scales = on_grid_24(16, 256, (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), 64)
    compressed = repack(symmetric, scales, 64, bits)
    assert compressed.zero_points is None and torch.equal(decompress(compressed), symmetric)
    assert compressed.num_bytes() / symmetric.numel() == pytest.approx(bits / 16 + 0.125 + 4 / 64)

    affine = affine_24(16, 256, bits, 64)
    assert affine.zero_points is not None and affine.zero_points.dtype == torch.int8
    assert torch.equal(decompress(affine), on_grid_24(16, 256, (-3, 2**bits - 4), 64, torch.float16)[0])

    with pytest.raises(ValueError, match="up_proj: the dequantized weight is not its scales times integers"):
        repack(symmetric + 1e-3 * (symmetric != 0), scales, 64, bits, "up_proj")
    too_wide, wide_scales = on_grid_24(16, 256, (-(2**bits), 2**bits), 64)
    with pytest.raises(ValueError, match=f"codes span more than the {2**bits} levels"):
        repack(too_wide, wide_scales, 64, bits)


@pytest.mark.parametrize(
    ("package", "bits", "affine"),
    [("optimum.quanto", 8, False), ("optimum.quanto", 4, True), ("gptqmodel", 4, False), ("gptqmodel", 8, False)],
    ids=["quanto-int8", "quanto-int4", "gptq-int4", "gptq-int8"],
)
def test_sparsify_repacks_quantized_linears_without_changing_a_logit(package, bits, affine, monkeypatch):
    """The Optimum path's int8 / int4 weights move into the 2:4 format code for code: same logits, bit for bit.
    optimum-quanto's int4 is affine (an integer zero-point per group), so only it needs zero-points."""
    pytest.importorskip(package)
    from transformers import GPTQConfig, QuantoConfig

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # gptqmodel's 8-bit CPU layers would torch.compile (see test_gptq)
    config = QuantoConfig(weights=f"int{bits}") if package == "optimum.quanto" else GPTQConfig(bits=bits, group_size=32)
    model = tiny_model(hidden_size=128, intermediate_size=256)  # multiples of quanto's int4 group size (128)
    optimum_prune.compress(model, [PruningConfig(method="wanda", sparsity="2:4"), config], calibration=token_windows())
    linears = {name: module for name, module in model.named_modules() if name.startswith("model.layers.") and name.endswith("proj")}
    dequantized = {name: dequantized_weight(module).detach().clone() for name, module in linears.items()}
    ids = token_windows(samples=2, seq_len=8, seed=4)
    with torch.no_grad():
        quantized_logits = model(ids).logits

    report = sparsify(model, bits=8)  # bits= is for unquantized linears: quantized ones keep their own codes
    modules = dict(model.named_modules())
    assert sorted(report.repacked) == sorted(report.swapped) == sorted(linears) and not report.left_dense
    assert "21 of them repacked" in str(report)
    for name, weight in dequantized.items():
        assert modules[name].bits == bits and torch.equal(decompress(modules[name].compressed), weight), name
    assert any(modules[name].zero_points is not None for name in linears) == affine
    with torch.no_grad():
        assert torch.equal(model(ids).logits, quantized_logits)


def test_a_model_with_no_2_4_linear_is_left_dense_with_a_warning(caplog):
    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        report = sparsify(model)
    assert not report.swapped and len(report.left_dense) == 7 * TINY["num_hidden_layers"]
    assert f"none of the {7 * TINY['num_hidden_layers']} decoder linears is exactly 2:4" in caplog.text and "sparsity='2:4'" in caplog.text


def test_quantized_weights_that_cannot_be_repacked_are_refused_or_left_dense():
    quanto = pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    pruned = tiny_model(hidden_size=128, intermediate_size=256)
    prune(pruned, PruningConfig(method="magnitude", sparsity="2:4"))
    quanto.quantize(pruned, weights=quanto.qfloat8, exclude=["lm_head"])
    quanto.freeze(pruned)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: WeightQBytesTensor \(quanto.qfloat8.*not on a per-row integer grid"):
        sparsify(pruned)

    dense = tiny_model(hidden_size=128, intermediate_size=256)
    optimum_prune.compress(dense, [QuantoConfig(weights="int8")])
    report = sparsify(dense)
    assert not report.swapped and len(report.left_dense) == 21


def test_sparsify_refuses_gptq_columns_out_of_order(monkeypatch):
    pytest.importorskip("gptqmodel")
    from transformers import GPTQConfig

    model = tiny_model(hidden_size=128, intermediate_size=256)
    optimum_prune.compress(model, [PruningConfig(method="wanda", sparsity="2:4"), GPTQConfig(bits=4, group_size=32)], calibration=token_windows())
    down = model.model.layers[1].mlp.down_proj
    down.g_idx = down.g_idx.flip(0)  # what desc_act=True's reordering leaves
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: GPTQ groups its columns out of order \(desc_act=True\)"):
        sparsify(model)


def test_prune_refuses_an_already_quantized_model():
    pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    model = tiny_model(hidden_size=128, intermediate_size=256)
    optimum_prune.compress(model, [QuantoConfig(weights="int8")])
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is already quantized \(QLinear\): prune the unquantized"):
        prune(model, PruningConfig(method="magnitude", sparsity=0.5))


# --- the Triton kernel, run by Triton's interpreter on CPU (a subprocess: the interpreter is chosen at import) ---

INTERPRETED_KERNEL_CHECKS = r"""
import copy, torch
from optimum_prune import PruningConfig, prune
from optimum_prune.kernels import SparseLinear, compress, decompress, sparsify
from optimum_prune.kernels.format import repack
from optimum_prune.kernels.triton_24 import DECODE_CONFIGS, DECODE_MAX_ROWS, DECODE_ROWS, sparse24_decode, sparse24_expand, sparse24_matmul
from torch.nn import functional as F
from tests.conftest import tiny_model, token_windows
from tests.test_kernels import affine_24, on_grid_24, random_24


def check(result, x, compressed, *context, tolerance=2e-3):
    reference = x.float() @ decompress(compressed).float().T
    error = float((result.float() - reference).abs().max())
    assert error <= tolerance * float(reference.abs().max()), (*context, error)


# Every tile the autotuner may pick, on 1-4 token rows, output rows not a multiple of the tile and input
# dimensions that end inside a tile, for every value format and scale group (smaller than, equal to and
# larger than a tile's columns); zero-points as optimum-quanto's affine int4 codes get them from repack.
formats = [(bits, group_size, compress(random_24(37, in_features, torch.float16, seed=bits or 0), bits=bits, group_size=group_size))
           for bits, group_size, in_features in ((None, 128, 136), (None, 128, 1024), (8, 8, 136), (4, 8, 136), (4, 136, 136),
                                                 (4, 256, 1024), (8, 64, 1024))]
formats += [(f"{bits}, zero-points", group_size, affine_24(37, in_features, bits, group_size))
            for bits, group_size, in_features in ((4, 8, 136), (8, 136, 136), (4, 64, 1024))]
for bits, group_size, compressed in formats:
    assert torch.equal(sparse24_expand(compressed, torch.float16), decompress(compressed).half()), (bits, group_size)
    for rows in range(1, DECODE_MAX_ROWS + 1):
        x = torch.randn(rows, compressed.in_features, generator=torch.Generator().manual_seed(rows)).half()
        for config in DECODE_CONFIGS:
            check(sparse24_decode(x, compressed, config.kwargs), x, compressed, bits, group_size, rows, config)
    batched = torch.randn(2, 3, compressed.in_features).half()
    assert sparse24_matmul(batched, compressed).shape == (2, 3, compressed.out_features)

# Scale groups of several tiles' columns (one scale per 256- or 512-column tile), zero-points that change from one
# group to the next (affine_24's are alike in every group).
def shifted_zero_points(group_size):
    low, high = (on_grid_24(8, 512, codes, group_size, torch.float16) for codes in ((-3, 12), (-1, 14)))
    compressed = repack(torch.cat([low[0], high[0]], 1), torch.cat([low[1], high[1]], 1), group_size, 4)
    assert len(set(compressed.zero_points[0].tolist())) > 1
    return compressed


for compressed in (compress(random_24(8, 1024, torch.float16, seed=5), bits=4, group_size=512), shifted_zero_points(256),
                   shifted_zero_points(512)):
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(1)).half()
    for config in (DECODE_CONFIGS[0], DECODE_CONFIGS[4]):  # 256 and 512 columns a tile
        check(sparse24_decode(x, compressed, config.kwargs), x, compressed, "tile scales", compressed.group_size, config)

# A SparseLinear on the kernel adds its bias; inputs of another 16-bit dtype than its values take the reference path.
linear = torch.nn.Linear(136, 24).half()
with torch.no_grad():
    linear.weight.copy_(random_24(24, 136, torch.float16))
layer = SparseLinear.from_linear(linear, backend="triton")
with torch.no_grad():
    for rows in (1, 7):  # the decode kernel, the rebuilt weight
        x = torch.randn(rows, 136).half()
        expected = x.float() @ decompress(layer.compressed).float().T + linear.bias.float()
        assert float((layer(x).float() - expected).abs().max()) <= 2e-3 * float(expected.abs().max()), ("bias", rows)
    x = torch.randn(3, 136).bfloat16()
    torch.testing.assert_close(layer(x), F.linear(x, decompress(layer.compressed).bfloat16(), linear.bias.bfloat16()))

# bfloat16: the interpreter truncates float32 -> bfloat16 casts where a GPU (and torch) rounds, so dequantized
# values and results agree within one bfloat16 step (16-bit values are only loaded: exact).
for bits, group_size, in_features in ((None, 128, 136), (8, 8, 136), (4, 64, 1024), ("4, zero-points", 64, 1024)):
    compressed = (affine_24(37, in_features, 4, group_size, torch.bfloat16) if isinstance(bits, str)
                  else compress(random_24(37, in_features, torch.bfloat16, seed=3), bits=bits, group_size=group_size))
    expanded, reference = sparse24_expand(compressed, torch.bfloat16).float(), decompress(compressed).float()
    step = 0.0 if bits is None else 2**-7  # a bfloat16 step, relative to each value
    assert bool(((expanded - reference).abs() <= step * reference.abs()).all()), (bits, group_size)
    for rows in (1, DECODE_MAX_ROWS):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
        check(sparse24_decode(x, compressed), x, compressed, "bfloat16", bits, rows, tolerance=1e-2)

# sparse24_matmul takes the decode kernel up to DECODE_ROWS token rows, the rebuilt weight through cuBLAS above.
for rows in (1, DECODE_ROWS, DECODE_ROWS + 1):
    x = torch.randn(rows, compressed.in_features).half()
    chosen = sparse24_decode(x, compressed) if rows <= DECODE_ROWS else F.linear(x, sparse24_expand(compressed, x.dtype))
    assert torch.equal(sparse24_matmul(x, compressed), chosen), rows
try:
    sparse24_decode(torch.randn(DECODE_MAX_ROWS + 1, compressed.in_features).half(), compressed)
except ValueError as error:
    assert f"at most {DECODE_MAX_ROWS} token rows" in str(error)
else:
    raise AssertionError("too many rows were accepted by the decode kernel")

# A sparsified model on the kernel gives the reference backend's logits.
model = tiny_model().half()
prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
on_kernel, on_reference = copy.deepcopy(model), model
sparsify(on_kernel, bits=4, group_size=32, backend="triton")
sparsify(on_reference, bits=4, group_size=32, backend="reference")
ids = token_windows(samples=2, seq_len=8, seed=4)
with torch.no_grad():
    kernel_logits, reference_logits = on_kernel(ids).logits.float(), on_reference(ids).logits.float()
assert float((kernel_logits - reference_logits).abs().max()) <= 1e-2 * float(reference_logits.abs().max())
try:
    sparse24_matmul(torch.randn(2, 136), compress(random_24(8, 136)))
except ValueError as error:
    assert "float16 or bfloat16" in str(error)
else:
    raise AssertionError("float32 inputs were accepted")
# No rows (an MoE expert no token reached): zeros of the right shape, no launch.
empty = sparse24_matmul(torch.randn(0, 136).half(), compress(random_24(8, 136, torch.float16)))
assert empty.shape == (0, 8) and empty.dtype == torch.float16
# 16-bit values of another dtype than the inputs would be read bit for bit in the wrong format.
try:
    sparse24_matmul(torch.randn(2, 136).half(), compress(random_24(8, 136, torch.float32)))
except ValueError as error:
    assert "cast one to the other" in str(error)
else:
    raise AssertionError("float32 values with float16 inputs were accepted")
print("kernel checks passed")
"""


def test_triton_kernel_matches_the_reference_in_the_interpreter():
    """The kernels' indexing, dequantization and masking, checked on CPU, in float16 and bfloat16 (whose
    float32 casts Triton's interpreter truncates: bfloat16 is checked within one step there)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETED_KERNEL_CHECKS], cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and "kernel checks passed" in result.stdout, result.stderr[-3000:]


def test_a_sparse_linear_cast_to_another_dtype_follows_it():
    """.to(dtype) casts the values (or the scales): the layer's dtype must follow, or decompress fails."""
    for bits in (None, 8):
        linear = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(random_24(8, 16, torch.bfloat16))
        layer = SparseLinear.from_linear(linear, bits=bits, group_size=8).float()
        assert layer.dtype == torch.float32
        inputs = torch.randn(3, 16)
        torch.testing.assert_close(layer(inputs), inputs @ decompress(layer.compressed).T)
        assert layer(torch.zeros(0, 16)).shape == (0, 8)  # no rows, as an unrouted MoE expert gets


def test_a_sparsified_model_is_counted_and_not_pruned_again():
    """SparseLinear was no linear to the library: verify_sparsity saw 0 % in 0 layers, and prune pruned nothing."""
    from optimum_prune import verify_sparsity

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    before = verify_sparsity(model, "2:4")
    sparsify(model)
    after = verify_sparsity(model, "2:4")
    assert after["conforming"] and after["overall_sparsity"] == before["overall_sparsity"] and after["layers"] == before["layers"]
    assert sparsify(model).swapped == []  # sparsified already
    with pytest.raises(ValueError, match=r"q_proj is already in the compressed 2:4 format \(SparseLinear, from sparsify\): prune the dense"):
        prune(model, PruningConfig(method="magnitude", sparsity=0.7))


def test_loading_a_state_dict_replaces_what_the_weights_derive():
    """The dtype and cuSPARSELt's packed copy were refreshed only by .to(): loaded weights of another dtype
    (assign=True) crashed the forward, and a layer that had run a cuSPARSELt prefill kept the old weights."""
    linear = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(random_24(8, 16))
    layer = SparseLinear.from_linear(linear)
    other = SparseLinear.from_linear(linear.to(torch.bfloat16))
    layer._cusparselt = object()  # as after a prefill on the GPU
    layer.load_state_dict(other.state_dict(), assign=True)
    assert layer._cusparselt is None and layer.dtype == torch.bfloat16
    inputs = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(inputs), inputs @ decompress(other.compressed).T)


def test_sparsify_refusing_one_layer_leaves_the_model_whole():
    model = tiny_model(intermediate_size=136)  # down_proj: 136 inputs, which group_size 32 does not divide
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with pytest.raises(ValueError, match="down_proj: group_size 32 must be a multiple of 8 that divides the 136 input features: group_size=8 does$"):
        sparsify(model, bits=4, group_size=32)
    assert not any(isinstance(module, SparseLinear) for module in model.modules())


def test_16_bit_scales_quantize_against_their_rounded_values():
    """Codes computed against the float32 scale but stored with its bfloat16 rounding would be off by
    up to a quarter step near the ends of the int8 range."""
    weight = random_24(16, 256, torch.bfloat16)
    compressed = compress(weight, bits=8, group_size=64)
    kept = compress(weight).values.float()  # the kept values, in stored order
    scales = compressed.scales.float().repeat_interleave(32, dim=1)  # 64 columns keep 32 values
    assert torch.equal(compressed.values.float(), torch.round(kept / scales).clamp(-127, 127))


def test_auto_backend_keeps_the_reference_path_off_gpu():
    weight = random_24(8, 16, torch.float16)
    linear = nn.Linear(16, 8, bias=False).half()
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = SparseLinear.from_linear(linear)
    assert layer.backend == "auto" and not layer._uses_kernel(torch.zeros(1, 16, dtype=torch.float16))  # CPU tensors
    with pytest.raises(ValueError, match="backend must be one of auto, triton, reference"):
        sparsify(tiny_model(), backend="cuda")


def test_calls_needing_the_inputs_gradient_take_the_reference_path_and_triton_elsewhere_is_named():
    """The Triton decode kernel has no backward: up to 4 token rows the output came back without a grad_fn (the
    gradient silently lost), above them with one. Outside a GPU (and Triton's interpreter) the kernel failed
    with Triton's "0 active drivers"."""
    linear = nn.Linear(16, 8, bias=False).half()
    with torch.no_grad():
        linear.weight.copy_(random_24(8, 16, torch.float16))
    layer = SparseLinear.from_linear(linear, backend="triton")
    inputs = torch.randn(1, 16, dtype=torch.float16, requires_grad=True)
    layer(inputs).float().pow(2).sum().backward()
    expected = inputs.detach().clone().requires_grad_()
    linear(expected).float().pow(2).sum().backward()
    assert torch.equal(inputs.grad, expected.grad)
    with pytest.raises(ValueError, match=r"backend='triton'\) runs Triton's kernels on a CUDA GPU, and got inputs on cpu: move"):
        layer(inputs.detach())


def test_quantized_codes_of_16_bit_weights_near_the_largest_value_stay_finite():
    """The scale 65504 / 127 rounds up to 516 in float16, and 127 × 516 is past float16's largest value."""
    weight = (random_24(4, 16) * 60000).clamp(-65504, 65504).half()
    for bits in (8, 4):
        restored = decompress(compress(weight, bits=bits, group_size=16))
        assert bool(restored.isfinite().all()) and bool((restored[weight == 0] == 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size"), [(None, 128), (8, 128), (4, 128), ("4, zero-points", 128)])
def test_triton_kernel_matches_the_reference_on_gpu(dtype, bits, group_size):
    pytest.importorskip("triton")
    from dataclasses import replace

    from optimum_prune.kernels.triton_24 import sparse24_decode, sparse24_expand, sparse24_matmul

    if bits == "4, zero-points":
        shifted = affine_24(4096 + 64, 1024, 4, group_size)
        compressed = replace(
            shifted, dtype=dtype, values=shifted.values.cuda(), metadata=shifted.metadata.cuda(),
            scales=shifted.scales.cuda(), zero_points=shifted.zero_points.cuda(),
        )  # fmt: skip
    else:
        compressed = compress(random_24(4096 + 64, 1024, dtype).cuda(), bits=bits, group_size=group_size)
    assert torch.equal(sparse24_expand(compressed, dtype), decompress(compressed).to(dtype))
    kernels = [(sparse24_matmul, (1, 16, 300, 4096)), (sparse24_decode, (1, 2, 3, 4))]
    for kernel, token_rows in kernels:
        for rows in token_rows:
            x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
            reference = x.float() @ decompress(compressed).float().T
            error = (kernel(x, compressed).float() - reference).abs().max()
            assert error <= 1e-2 * reference.abs().max(), (kernel.__name__, rows, float(error))


def test_the_prefill_choice_is_timed_once_per_key_and_the_winner_kept(monkeypatch):
    from optimum_prune.kernels import prefill

    monkeypatch.setattr(prefill, "CHOICES", {})
    x, weight = torch.randn(64, 256), torch.randn(256, 256)
    calls = {"slow": 0, "fast": 0}
    timings = []

    def slow():
        calls["slow"] += 1
        return sum(x @ weight.T for _ in range(40)) / 40

    def fast():
        calls["fast"] += 1
        return x @ weight.T

    def timer(call):  # a fixed timing: wall-clock times under load once picked 'slow'
        timings.append(call)
        call()
        return {slow: 2.0, fast: 1.0}[call]

    result = prefill.fastest(("shape", 64), {"slow": slow, "fast": fast}, timer)
    torch.testing.assert_close(result, x @ weight.T)
    assert prefill.CHOICES == {("shape", 64): "fast"} and len(timings) == 2 and calls == {"slow": 1, "fast": 2}
    prefill.fastest(("shape", 64), {"slow": slow, "fast": fast}, timer)
    assert len(timings) == 2 and calls == {"slow": 1, "fast": 3}  # known key: no timing, the winner only
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    prefill.fastest(("shape", 128), {"slow": slow, "fast": fast}, timer)  # traced: the first candidate, nothing recorded
    assert len(timings) == 2 and calls["slow"] == 2 and ("shape", 128) not in prefill.CHOICES
    assert [prefill.row_bucket(rows) for rows in (1, 5, 8, 9, 4096, 4097)] == [1, 8, 8, 16, 4096, 8192]


def test_cusparselt_prefill_is_validated_and_keeps_the_reference_path_off_gpu():
    model = tiny_model(intermediate_size=136)  # gate / up have 136 outputs: not a multiple of 16
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    dense = copy.deepcopy(model)
    with pytest.raises(ValueError, match="prefill must be one of expand, cusparselt, got 'cuda'"):
        sparsify(model, prefill="cuda")
    assert not any(isinstance(module, SparseLinear) for module in model.modules())  # refused before any swap
    report = sparsify(model, prefill="cusparselt")
    layers = len(model.model.layers)
    unfit = {f"model.layers.{i}.mlp.{name}" for i in range(layers) for name in ("gate_proj", "up_proj", "down_proj")}
    assert set(report.without_cusparselt) == unfit and f"{len(unfit)} without cuSPARSELt" in str(report)
    query = model.model.layers[0].self_attn.q_proj
    assert "prefill=cusparselt" in repr(query)
    query._cusparselt = "a packed copy on another device"
    model.cpu()
    assert query._cusparselt is None  # a moved layer rebuilds cuSPARSELt's copy from its buffers
    ids = token_windows(samples=2, seq_len=8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 4])
def test_cusparselt_prefill_matches_the_reference_on_gpu(dtype, bits):
    pytest.importorskip("triton")
    from optimum_prune.kernels import prefill

    if not prefill.cusparselt_available():
        pytest.skip("this machine: its torch build has no cuSPARSELt")
    linear = nn.Linear(1024, 4096 + 64, dtype=dtype, device="cuda")
    with torch.no_grad():
        linear.weight.copy_(random_24(4096 + 64, 1024, dtype).cuda())
    layer = SparseLinear.from_linear(linear, bits=bits, prefill="cusparselt")
    weight = decompress(layer.compressed).float()
    packed = layer._packed_like(torch.empty(0, 1024, dtype=dtype, device="cuda"))
    for shape in ((5, 1024), (300, 1024), (4096, 1024), (2, 1000, 1024)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        reference = x.float() @ weight.T + linear.bias.float()
        for name, output in (("layer", layer(x)), ("cuSPARSELt", packed.matmul(x.reshape(-1, 1024)).reshape(reference.shape) + linear.bias)):
            error = (output.float() - reference).abs().max()
            assert output.shape == reference.shape and error <= 1e-2 * reference.abs().max(), (name, shape, float(error))
    chosen = {key[3]: name for key, name in prefill.CHOICES.items() if key[:3] == (4096 + 64, 1024, dtype)}
    assert set(chosen) == {8, 512, 4096, 2048} and set(chosen.values()) <= {"expand", "cusparselt"}
    assert packed.num_bytes() >= layer.out_features * layer.in_features  # cuSPARSELt's own copy: half the weights in 16 bits, and more


def test_mma_decode_is_validated_and_keeps_the_reference_path_off_gpu(caplog):
    from optimum_prune.kernels.mma_24 import mma_available, sparse24_mma

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    dense = copy.deepcopy(model)
    with pytest.raises(ValueError, match="decode must be one of triton, mma, got 'tensor cores'"):
        sparsify(model, decode="tensor cores")
    assert not any(isinstance(module, SparseLinear) for module in model.modules())  # refused before any swap
    sparsify(model, decode="mma")
    assert "decode=mma" in repr(model.model.layers[0].self_attn.q_proj)
    assert mma_available() or "needs a CUDA GPU of compute capability 8.0+ and NVRTC" in caplog.text
    ids = token_windows(samples=2, seq_len=8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits)
    with pytest.raises(ValueError, match="at most 64 token rows, 16-bit values .input features a multiple of 64. or int8 / int4"):
        sparse24_mma(torch.randn(1, 64, dtype=torch.float16), compress(random_24(16, 64, torch.float16)))
    from torch._subclasses.fake_tensor import FakeTensorMode

    compressed = compress(random_24(24, 128, torch.bfloat16))
    with FakeTensorMode() as fake:  # what torch.compile traces: the op's output shape, without a launch
        x, values, metadata = (fake.from_tensor(t) for t in (torch.randn(3, 128, dtype=torch.bfloat16), compressed.values, compressed.metadata))
        traced = torch.ops.optimum_prune.sparse24_mma(x, values, metadata, values, values, 16, False, 0, 0, 0)
    assert traced.shape == (3, 24) and traced.dtype == torch.bfloat16


MMA_VARIANTS = [  # (dtype, value bits, zero-points, warps, 8-token tiles): each value format, both dtypes, the widest tiles
    (torch.bfloat16, 16, False, 4, 1), (torch.float16, 16, False, 8, 1), (torch.bfloat16, 16, False, 8, 8),
    (torch.bfloat16, 8, False, 4, 1), (torch.float16, 8, True, 8, 2),
    (torch.bfloat16, 4, False, 4, 1), (torch.float16, 4, True, 8, 2), (torch.bfloat16, 4, True, 8, 8),
]  # fmt: skip


@pytest.mark.parametrize("arch", ["80", "90"])
def test_the_mma_kernel_compiles_to_sparse_tensor_core_instructions_without_spills(arch, tmp_path):
    """What NVRTC compiles at run time, compiled offline by nvcc (where CUDA's compiler is installed,
    as on this project's machines): every variant builds, keeps its registers (no spill, no stack),
    and its machine code holds the sparse tensor-core instruction (HMMA.SP), read with the cuobjdump
    that Triton ships."""
    import shutil
    import subprocess
    from pathlib import Path

    from optimum_prune.kernels.mma_24 import _Variant, source

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("this machine: no nvcc (CUDA's compiler) to build the kernel without a GPU")
    triton = pytest.importorskip("triton")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this machine: no cuobjdump (Triton ships one) to read the machine code")
    for dtype, bits, zeros, warps, tiles, ordered in [*((*variant, True) for variant in MMA_VARIANTS), (torch.bfloat16, 4, True, 4, 1, False)]:
        text, cubin = tmp_path / "kernel.cu", tmp_path / "kernel.cubin"
        text.write_text(source(_Variant(dtype, bits, zeros, tiles), warps, ordered))  # not ordered: NVRTC before CUDA 12.5
        built = subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-o", str(cubin), str(text)],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert built.returncode == 0, built.stderr[-3000:]
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in built.stderr, built.stderr
        sass = subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)], capture_output=True, text=True, timeout=120).stdout
        instruction = "HMMA.SP.16832.F32.BF16 " if dtype == torch.bfloat16 else "HMMA.SP.16832.F32 "  # fp16 carries no suffix
        wide_load = "LDG.E.64" if bits == 4 else "LDG.E.128"
        assert instruction in sass and wide_load in sass, (dtype, bits, warps, tiles)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "zero_points"), [(None, False), (8, False), (8, True), (4, False), (4, True)])
def test_mma_decode_matches_the_reference_on_gpu(dtype, bits, zero_points):
    from dataclasses import replace

    from optimum_prune.kernels import prefill
    from optimum_prune.kernels.mma_24 import WINDOW_COLUMNS, _configs, mma_available, sparse24_mma

    if not mma_available():
        pytest.skip("this machine: the GPU lacks compute capability 8.0+ or NVRTC")
    for outputs, columns in ((4096 + 40, 1024), (24, 128), (1000, 4096)):  # ragged outputs: rows past N are masked
        if zero_points:  # an affine quantizer's codes, repacked
            shifted = affine_24(outputs, columns, bits, 128)
            compressed = replace(
                shifted, dtype=dtype, values=shifted.values.cuda(), metadata=shifted.metadata.cuda(),
                scales=shifted.scales.to(dtype).cuda(), zero_points=shifted.zero_points.cuda(),
            )  # fmt: skip
        else:
            compressed = compress(random_24(outputs, columns, dtype, seed=outputs).cuda(), bits=bits, group_size=128)
        weight = decompress(compressed).float()
        windows = columns // WINDOW_COLUMNS[compressed.bits or 16]
        configs = [None, *_configs(outputs, windows), (4, 1), (8, 3)]
        for rows in (1, 3, 8, 9, 33, 64):
            x = torch.randn(rows, columns, device="cuda", dtype=dtype)
            reference = x.float() @ weight.T
            for config in configs:
                poison = torch.full((rows, outputs), float("nan"), device="cuda", dtype=dtype)
                del poison  # the output takes the block just freed: what the kernel does not write stays NaN
                output = sparse24_mma(x, compressed, config)
                error = (output.float() - reference).abs().max()
                assert error <= 1e-2 * reference.abs().max(), (outputs, columns, rows, config, float(error))
    assert any(key[0] == "mma.sp" for key in prefill.CHOICES)  # the unpinned calls measured their configuration
    linear = nn.Linear(1024, 4096 + 64, dtype=dtype, device="cuda")
    with torch.no_grad():
        linear.weight.copy_(random_24(4096 + 64, 1024, dtype).cuda())
    layer = SparseLinear.from_linear(linear, bits=bits, decode="mma")
    for shape in ((1, 1024), (2, 3, 1024), (65, 1024), (300, 1024)):  # above 64 rows: the Triton / cuBLAS paths
        x = torch.randn(shape, device="cuda", dtype=dtype)
        reference = x.float() @ decompress(layer.compressed).float().T + linear.bias.float()
        output = layer(x)
        assert output.shape == reference.shape and (output.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
    compiled = torch.compile(layer, fullgraph=True)  # the custom op keeps the launch whole under torch.compile
    x = torch.randn(4, 1024, device="cuda", dtype=dtype)
    torch.testing.assert_close(compiled(x), layer(x))


def test_group_sizes_that_are_not_multiples_of_8_are_refused():
    weight = torch.zeros(4, 16)
    weight[:, 0::4] = 1.0
    with pytest.raises(ValueError, match="group_size 4 must be a multiple of 8 that divides the 16 input features"):
        compress(weight, bits=4, group_size=4)


def test_the_mma_source_without_ordered_metadata_asks_for_none():
    """NVRTC before CUDA 12.5 cannot compile mma.sp::ordered_metadata: ordered=False must reach the source."""
    from optimum_prune.kernels.mma_24 import _Variant, source

    variant = _Variant(torch.bfloat16, 4, True, 1)
    assert "#define ORDERED 0\n" in source(variant, 4, ordered=False) and "#define ORDERED 1\n" in source(variant, 4)


def test_mma_tiles_round_up_to_a_power_of_two():
    """Fewer kernel variants to compile: 8-token tiles rounded up to 1, 2, 4 or 8."""
    from optimum_prune.kernels.mma_24 import _tiles

    assert [_tiles(rows) for rows in (1, 8, 9, 17, 33, 64)] == [1, 1, 2, 4, 8, 8]


def test_mma_fits_takes_up_to_64_token_rows():
    """Checked on fake CUDA tensors (no GPU needed): 64 rows go to the mma kernel, 65 do not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from optimum_prune.kernels.mma_24 import MAX_ROWS, mma_fits

    with FakeTensorMode():
        values = torch.empty(16, 64, dtype=torch.float16, device="cuda")  # a 2:4 weight [16, 128]: kept values, metadata
        on_gpu = Compressed24(values, torch.empty(16, 16, dtype=torch.uint8, device="cuda"), 128, torch.float16)
        fits = [mma_fits(torch.empty(rows, 128, dtype=torch.float16, device="cuda"), on_gpu) for rows in (1, MAX_ROWS, MAX_ROWS + 1)]
    assert MAX_ROWS == 64 and fits == [True, True, False]

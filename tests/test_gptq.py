"""Prune → GPTQ (transformers' GPTQConfig on optimum + gptqmodel, here on CPU) in one call, saved and
reloaded with stock ``AutoModelForCausalLM.from_pretrained``."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTQConfig

from optimum_prune import PruningConfig, compress, save_pruned, sparsify, verify_sparsity
from optimum_prune.quantized import dequantized_weight, is_gptq_linear, repacked_in_place

from .conftest import TINY, tiny_model, token_windows

pytest.importorskip("gptqmodel")

WIDE = dict(hidden_size=128, intermediate_size=256)  # multiples of the GPTQ group size below
GROUP = 32


def pruned_positions(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight == 0 for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name}


@pytest.mark.parametrize(("sparsity", "bits"), [("2:4", 4), (0.5, 8)])
def test_pruned_weights_stay_exactly_zero_through_gptq_save_and_reload(sparsity, bits, tmp_path, monkeypatch):
    # gptqmodel's 8-bit CPU layers torch.compile their dequantisation (a minute of inductor builds here); eager is the same arithmetic.
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    model = tiny_model(**WIDE)
    config = PruningConfig(method="wanda", sparsity=sparsity)
    compress(model, [config, GPTQConfig(bits=bits, group_size=GROUP)], calibration=token_windows())

    assert "QuantLinear" in type(model.model.layers[0].mlp.down_proj).__name__
    assert type(model.lm_head) is torch.nn.Linear  # GPTQ leaves lm_head in full precision
    measured = verify_sparsity(model, "2:4" if sparsity == "2:4" else None)  # counted on the dequantized codes
    assert measured["overall_sparsity"] >= 0.5 and len(measured["layers"]) == 3 * 7
    assert measured["conforming"] in (True, None)

    save_pruned(model, tmp_path / "gptq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32).eval()  # transformers' own GPTQ loading
    assert reloaded.config.quantization_config.bits == bits
    assert PruningConfig.from_pretrained(tmp_path / "gptq") == config
    reloaded_layers = verify_sparsity(reloaded)["layers"]
    assert {name: entry["zeros"] for name, entry in reloaded_layers.items()} == {name: entry["zeros"] for name, entry in measured["layers"].items()}
    ids = token_windows(samples=2, seq_len=12, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


def test_after_the_cpu_kernel_repacks_its_codes_weights_still_read_and_saving_is_refused(tmp_path):
    """gptqmodel's CPU kernel (TorchFusedQuantLinear) repacks GPTQ codes in place at the model's first forward in
    eval mode: verify_sparsity and sparsify then read the weights through the kernel, and save_pruned refuses
    instead of writing a checkpoint that no longer loads (it did: qweight's shape had changed)."""
    model = tiny_model(**WIDE)
    compress(model, [PruningConfig(method="wanda", sparsity="2:4"), GPTQConfig(bits=4, group_size=GROUP)], calibration=token_windows())
    before = {name: dequantized_weight(module) for name, module in model.named_modules() if is_gptq_linear(module)}
    save_pruned(model, tmp_path / "saved")  # before any inference
    saved_files = sorted(path.name for path in (tmp_path / "saved").iterdir())
    ids = token_windows(samples=2, seq_len=12, seed=4)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    repacked = [name for name, module in model.named_modules() if repacked_in_place(module)]
    assert sorted(repacked) == sorted(before)

    for name, module in model.named_modules():
        if name in before:  # the kernel's float32 products, where dequantize_weight() rounded them to float16
            weight = dequantized_weight(module)
            assert torch.equal(weight == 0, before[name] == 0), name
            torch.testing.assert_close(weight, before[name].to(weight.dtype), rtol=1e-3, atol=1e-6)
    assert verify_sparsity(model, "2:4")["conforming"]

    with pytest.raises(ValueError, match=rf"{repacked[0]}: gptqmodel's TorchFusedQuantLinear repacked .*nothing was saved"):
        save_pruned(model, tmp_path / "saved")
    assert [path.name for path in tmp_path.iterdir()] == ["saved"]  # no staging directory left behind
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == saved_files

    assert len(sparsify(model).repacked) == len(before)  # codes recovered from the kernel's weights
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-3, atol=1e-3)


def test_every_pruned_weight_is_still_zero_and_gptq_still_compensates():
    """The mask holds weight by weight, and the kept weights are GPTQ's, not plain rounding (they absorb the error)."""
    model = tiny_model(**WIDE)
    windows = token_windows()
    compress(model, [PruningConfig(method="wanda", sparsity="2:4")], calibration=windows)
    pruned = pruned_positions(model)
    before = {name: module.weight.detach().clone() for name, module in model.named_modules() if name in pruned}
    compress(model, [GPTQConfig(bits=4, group_size=GROUP)], calibration=windows)

    for name, module in model.named_modules():
        if name in pruned:
            weight = dequantized_weight(module).float()
            assert not weight[pruned[name]].any(), name
            # Symmetric 4-bit rounding moves a weight by at most half a step, max|w| / 15 of its group;
            # GPTQ's error compensation moves some kept weights further.
            change = (weight - before[name])[~pruned[name]].abs().max()
            assert change > before[name].abs().max() / 15, name


def test_quantizations_in_two_threads_keep_their_zeros_and_leave_optimum_as_it_was():
    """optimum's GPTQ class is swapped process-wide: the shorter run restored the stock class under the longer one,
    whose later layers then quantized their pruned weights away, and whichever ended last could leave ours in place."""
    import threading

    import optimum.gptq.quantizer as optimum_gptq

    stock = optimum_gptq.GPTQ
    models = [tiny_model(**WIDE, num_hidden_layers=1), tiny_model(**WIDE, num_hidden_layers=4)]
    windows = token_windows()
    for model in models:
        compress(model, [PruningConfig(method="wanda", sparsity="2:4")], calibration=windows)
    pruned = [pruned_positions(model) for model in models]
    errors = []

    def quantize(model):
        try:
            compress(model, [GPTQConfig(bits=4, group_size=GROUP)], calibration=windows)
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=quantize, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and optimum_gptq.GPTQ is stock
    for model, positions in zip(models, pruned):
        for name, module in model.named_modules():
            if name in positions:
                assert not dequantized_weight(module).float()[positions[name]].any(), name


def test_stock_gptq_moves_pruned_weights(monkeypatch):
    """Why compress masks GPTQ: optimum's quantizer as it stands spreads rounding errors into pruned weights."""
    from optimum.gptq import GPTQQuantizer

    model = tiny_model(**WIDE)
    windows = token_windows()
    compress(model, [PruningConfig(method="wanda", sparsity="2:4")], calibration=windows)
    pruned = pruned_positions(model)
    dataset = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones_like(w).unsqueeze(0)} for w in windows]
    model.hf_device_map = {"": "cpu"}
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")  # see optimum_prune.gptq._python_packing
    GPTQQuantizer(bits=4, group_size=GROUP, dataset=dataset, model_seqlen=windows.shape[1]).quantize_model(model, None)
    moved = sum(int((dequantized_weight(module) != 0)[pruned[name]].sum()) for name, module in model.named_modules() if name in pruned)
    assert moved > 0
    assert not verify_sparsity(model, "2:4")["conforming"]


def test_non_uniform_structure_is_refused_before_quantizing():
    """GPTQ saves its own quantization_config where the per-layer shapes were: the reload came back at stock shapes."""
    model = tiny_model("qwen2", num_hidden_layers=4, **WIDE)
    with pytest.raises(ValueError, match="non-uniform structured results store their per-layer shapes there, which GPTQ"):
        compress(
            model,
            [PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), GPTQConfig(bits=4, group_size=GROUP)],
            calibration=token_windows(),
        )
    assert not any(is_gptq_linear(module) for module in model.modules())


def test_linears_kept_out_of_gptq_are_not_checked(monkeypatch):
    """A tiny Mixtral's routers (4 experts: 4 output rows) cannot be packed; quantizing attention only leaves them out."""
    from .adapters.test_moe import tiny_moe

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    attention = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    recipe = [PruningConfig(method="wanda", sparsity=0.5), GPTQConfig(bits=4, group_size=32, modules_in_block_to_quantize=attention)]
    model = tiny_moe(hidden_size=64, intermediate_size=96)
    compress(model, recipe, calibration=token_windows())
    assert all(is_gptq_linear(model.model.layers[0].self_attn.get_submodule(name)) for name in ("q_proj", "o_proj"))
    misnamed = GPTQConfig(bits=4, group_size=32, modules_in_block_to_quantize=[["q_proj"]])
    with pytest.raises(ValueError, match=r"recipe\[1\]: .*names \['q_proj'\], which no decoder layer holds .* e.g. block_sparse_moe"):
        compress(tiny_moe(hidden_size=64, intermediate_size=96), [recipe[0], misnamed], calibration=token_windows())
    with pytest.raises(ValueError, match=r"recipe\[1\]: .*; model.layers.0.block_sparse_moe.gate \(4×64\), .* are not made of whole blocks"):
        compress(tiny_moe(hidden_size=64, intermediate_size=96), [recipe[0], GPTQConfig(bits=4, group_size=32)], calibration=token_windows())


def test_removing_whole_layers_keeps_the_widths_checked_before_pruning():
    model = tiny_model(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4)
    recipe = [PruningConfig(method="layers", method_options={"num_layers": 1}), GPTQConfig(bits=4, group_size=64)]
    with pytest.raises(ValueError, match=r"recipe\[1\]: GPTQConfig\(group_size=64\) does not divide"):
        compress(model, recipe, calibration=token_windows())
    assert len(model.model.layers) == TINY["num_hidden_layers"]  # nothing was removed


def test_a_group_size_that_splits_input_widths_is_refused_before_pruning():
    model = tiny_model(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"recipe\[1\]: GPTQConfig\(group_size=64\) does not divide .*\[96\].*use group_size=32"):
        compress(model, [PruningConfig(method="magnitude", sparsity=0.5), GPTQConfig(bits=4, group_size=64)], calibration=token_windows())
    assert verify_sparsity(model)["overall_sparsity"] < 0.01  # nothing was pruned


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"desc_act": True}, r"recipe\[1\]: GPTQConfig\(desc_act=True\).*use desc_act=False"),
        ({"dataset": "c4"}, r"recipe\[1\]: GPTQConfig\(dataset='c4'\) downloads a dataset; leave dataset=None"),
        ({"sym": False}, r"recipe\[1\]: GPTQConfig\(sym=False\) is not supported.*use sym=True"),
        ({}, "tokenizer is required to tokenise text calibration data"),  # GPTQ's windows are drawn before pruning
        ({"dataset": ["Some calibration text."]}, r"GPTQConfig\(dataset=\[texts\]\) needs tokenizer="),
    ],
)
def test_unsupported_gptq_options_fail_before_pruning(options, message):
    model = tiny_model(**WIDE)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        compress(model, [PruningConfig(method="magnitude", sparsity=0.5), GPTQConfig(bits=4, **options)])
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_processed_batches_which_gptq_cannot_take_fail_before_pruning():
    """prune takes processed batches of any length; GPTQ's windows cannot be drawn from uneven ones (unpadded ones of
    one length are windows)."""
    model = tiny_model(**WIDE)
    batches = [{"input_ids": window[None, :length]} for window, length in zip(token_windows(2, 16), (16, 12))]
    with pytest.raises(ValueError, match=r"GPTQConfig without dataset=\[texts\] calibrates on windows of token ids of one length"):
        compress(model, [PruningConfig(method="wanda", sparsity=0.5), GPTQConfig(bits=4, group_size=GROUP)], calibration=batches)
    assert not any(is_gptq_linear(module) for module in model.modules()) and verify_sparsity(model)["overall_sparsity"] < 0.01


def test_widths_gptqmodel_cannot_pack_are_refused_before_pruning():
    model = tiny_model(hidden_size=128, intermediate_size=176)  # down_proj: 176 input columns, 5.5 blocks of 32
    with pytest.raises(ValueError, match=r"recipe\[1\]: gptqmodel packs GPTQ codes in blocks of 32 input columns and output rows; model.layers.0.mlp.gate_proj \(176×128\), model.layers.0.mlp.up_proj \(176×128\), model.layers.0.mlp.down_proj \(128×176\) and \d+ more are not made of whole blocks"):
        compress(model, [PruningConfig(method="magnitude", sparsity=0.5), GPTQConfig(bits=4, group_size=16)], calibration=token_windows())
    assert verify_sparsity(model)["overall_sparsity"] < 0.01  # nothing was pruned


def test_after_structured_pruning_the_widths_are_checked_as_pruned(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    mlp_width = {"components": "mlp", "criterion": "magnitude_l2"}
    model = tiny_model(hidden_size=128, intermediate_size=258)  # 258 MLP channels: gptqmodel cannot pack them
    recipe = [PruningConfig(method="width", sparsity=0.17, method_options=mlp_width), GPTQConfig(bits=4, group_size=GROUP)]
    compress(model, recipe, calibration=token_windows())  # width keeps 192 channels
    assert model.model.layers[0].mlp.down_proj.in_features == 192
    assert all(is_gptq_linear(module) for name, module in model.named_modules() if name.endswith("down_proj"))
    model = tiny_model(hidden_size=128, intermediate_size=258)
    recipe = [PruningConfig(method="width", sparsity=0.2, method_options=mlp_width), GPTQConfig(bits=4, group_size=GROUP)]
    with pytest.raises(ValueError, match=r"^GPTQConfig: gptqmodel packs GPTQ codes .*; model.layers.0.mlp.gate_proj \(181×128\), .* and \d+ more are not"):
        compress(model, recipe, calibration=token_windows())  # 181 channels are left


def test_weights_read_through_a_kernel_cover_every_column_block():
    """Layers wider than one block of identity rows (1,024 by default, wider than every test model) are read block
    by block: each block must hold its own columns."""
    from optimum_prune.quantized import _weight_through_kernel

    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    read = _weight_through_kernel(lambda rows: rows @ weight.T, 7, torch.float32, torch.device("cpu"), rows=3)
    assert torch.equal(read, weight)


def test_gptq_without_texts_calibrates_on_windows_drawn_like_the_last_pruning_steps(bpe_tokenizer, monkeypatch):
    from optimum_prune.data import wikipedia_articles

    pytest.importorskip("gptqmodel")
    seen = []
    monkeypatch.setattr("optimum_prune.gptq.quantize_weights", lambda model, config, windows, tokenizer: seen.append(windows))
    steps = [
        PruningConfig(method="magnitude", sparsity=0.3, num_calibration_samples=2, calibration_seq_len=8),
        PruningConfig(method="magnitude", sparsity=0.5, num_calibration_samples=3, calibration_seq_len=16),
        GPTQConfig(bits=4, group_size=32),
    ]
    compress(tiny_model(hidden_size=128, intermediate_size=256), steps, calibration=wikipedia_articles("calibration")[:3], tokenizer=bpe_tokenizer)
    assert seen[0].shape == (3, 16)


def test_triton_on_gptq_linears_of_a_float32_model_is_refused_before_any_swap(monkeypatch):
    """GPTQ dequantizes to float16 whatever the model's dtype: the Triton check reads the activations' dtype."""
    from optimum_prune.kernels import SparseLinear

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    model = tiny_model(**WIDE)
    compress(model, [PruningConfig(method="wanda", sparsity="2:4"), GPTQConfig(bits=4, group_size=GROUP)], calibration=token_windows())
    with pytest.raises(ValueError, match="gets torch.float32"):
        sparsify(model, backend="triton")
    assert not any(isinstance(module, SparseLinear) for module in model.modules())

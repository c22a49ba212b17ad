"""Pruned checkpoints through bitsandbytes' load-time quantization (transformers' ``BitsAndBytesConfig``,
on the CPU backend bitsandbytes ships): the zeros survive, counted on the dequantized weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerControl, TrainerState, TrainingArguments

from optimum_prune import PruningConfig, prune, save_pruned, verify_sparsity
from optimum_prune.quantized import dequantized_weight

from .conftest import tiny_model, token_windows

pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
}


def pruned_checkpoint(directory, config: PruningConfig) -> torch.nn.Module:
    model = tiny_model()
    prune(model, config, calibration=token_windows())
    save_pruned(model, directory)
    return model


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_pruned_zeros_survive_load_time_quantization(quantization, sparsity, tmp_path):
    pruned = pruned_checkpoint(tmp_path / "pruned", PruningConfig(method="wanda", sparsity=sparsity))
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", quantization_config=QUANTIZATIONS[quantization])

    assert "bitsandbytes" in type(quantized.model.layers[0].mlp.up_proj).__module__
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            zeros = module.weight == 0
            assert bool((dequantized_weight(quantized.get_submodule(name))[zeros] == 0).all()), name
    measured = verify_sparsity(quantized, "2:4" if sparsity == "2:4" else None)
    assert measured["overall_sparsity"] >= verify_sparsity(pruned)["overall_sparsity"]
    if sparsity == "2:4":
        assert measured["conforming"]
    ids = token_windows(samples=1, seq_len=8, seed=3)
    with torch.no_grad():
        dense, low_bit = pruned(ids).logits, quantized(ids).logits
    assert (low_bit - dense).abs().max() < (0.05 if quantization == "int8" else 0.25) * dense.abs().max()


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_dequantized_weights_are_within_the_quantizers_step(quantization, tmp_path):
    """verify_sparsity counts the real values: the dequantized weight is the original up to the quantizer's error."""
    pruned = pruned_checkpoint(tmp_path / "pruned", PruningConfig(method="magnitude", sparsity=0.5))
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", quantization_config=QUANTIZATIONS[quantization])
    original = pruned.model.layers[1].self_attn.q_proj.weight.detach()
    restored = dequantized_weight(quantized.model.layers[1].self_attn.q_proj).float()
    assert restored.shape == original.shape
    row_max = original.abs().amax(dim=1, keepdim=True)
    # int8: within one step, the row's absmax / 127 (bitsandbytes rounds to about half a step: 0.52 measured);
    # NF4: at most half the widest code gap (≈ 0.28 of the block's absmax).
    bound = row_max / 127 if quantization == "int8" else 0.15 * original.abs().max()
    assert bool(((restored - original).abs() <= bound).all())


def test_uniform_structured_result_loads_in_8_bit_with_its_shapes(tmp_path):
    config = PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "wanda_sp"})
    pruned = pruned_checkpoint(tmp_path / "narrow", config)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", quantization_config=QUANTIZATIONS["int8"])
    assert quantized.config.intermediate_size == pruned.config.intermediate_size < tiny_model().config.intermediate_size
    ids = token_windows(samples=1, seq_len=8, seed=2)
    with torch.no_grad():
        assert (quantized(ids).logits - pruned(ids).logits).abs().max() < 0.05 * pruned(ids).logits.abs().max()


def test_non_uniform_structured_result_is_refused_by_transformers_with_the_reason(tmp_path):
    """Per-layer shapes occupy ``quantization_config``: transformers refuses a second quantizer by name."""
    config = PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "wanda_sp", "ranking": "global"})
    pruned_checkpoint(tmp_path / "non-uniform", config)
    with pytest.raises(ValueError, match="quantized with StructureConfig but you are passing a BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "non-uniform", quantization_config=QUANTIZATIONS["int8"])


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_weights_read_the_same_after_the_model_has_run(quantization, tmp_path):
    """A first forward moves int8 row scales into the layer's state, and on a CPU with AVX512-BF16 repacks
    4-bit weights for its kernel: the codes were read as values (int8) or scrambled (NF4 / FP4: 2:4 lost)."""
    pruned_checkpoint(tmp_path / "pruned", PruningConfig(method="magnitude", sparsity="2:4"))
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", quantization_config=QUANTIZATIONS[quantization]).eval()
    before = {name: dequantized_weight(module).float() for name, module in quantized.named_modules() if "bitsandbytes" in type(module).__module__}
    with torch.no_grad():
        quantized(token_windows(samples=1, seq_len=8, seed=3))
    for name, weight in before.items():
        after = dequantized_weight(quantized.get_submodule(name)).float()
        assert torch.equal(after == 0, weight == 0) and torch.allclose(after, weight, rtol=1e-2, atol=1e-3 * weight.abs().max()), name
    assert verify_sparsity(quantized, "2:4")["conforming"]


def test_a_qlora_base_gives_masks_of_its_zeros_and_a_merge_into_its_codes_is_refused(tmp_path):
    """Masks were read from the packed 4-bit bytes (sparsity logged 0.0003 for a 50 % model), and the 'preserving'
    merge kept no zero, then wrote 0 bytes into the codes (decoded as -absmax)."""
    from peft import LoraConfig, get_peft_model

    from optimum_prune import GradualSchedule, PruningCallback, SparsityMasks, merge_lora_preserving_sparsity

    pruned_checkpoint(tmp_path / "pruned", PruningConfig(method="magnitude", sparsity=0.5))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", quantization_config=QUANTIZATIONS["nf4"])
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    masks = SparsityMasks.from_zeros(peft_model)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01) and len(masks.packed()) == 7 * base.config.num_hidden_layers and not masks.pruned  # counts only
    codes = {name: linear.weight.detach().clone() for name, linear in masks.linears.items()}
    masks.apply()  # frozen codes are left as they are
    assert all(torch.equal(linear.weight, codes[name]) for name, linear in masks.linears.items())
    with pytest.raises(ValueError, match="holds bitsandbytes 4-bit codes: a merge into them requantizes every weight"):
        merge_lora_preserving_sparsity(peft_model)
    callback = PruningCallback(GradualSchedule(final_sparsity=0.7, end_step=4))
    with pytest.raises(ValueError, match="schedule prunes weights in place, but .* holds bitsandbytes 4-bit codes"):
        callback.on_train_begin(TrainingArguments(tmp_path / "run", report_to=[]), TrainerState(max_steps=8), TrainerControl(), model=peft_model)

"""Pruned models through GPTQ and bitsandbytes on CUDA, their usual home (skipped without a GPU).

The CPU tests (test_gptq.py, test_bitsandbytes.py) cover the logic; these run the same recipes
through the CUDA kernels the libraries pick there, which quantize and pack with different code.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig

from optimum_prune import PruningConfig, compress, prune, save_pruned, verify_sparsity
from optimum_prune.quantized import dequantized_weight

from .conftest import tiny_model, token_windows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

WIDE = dict(hidden_size=128, intermediate_size=256)  # multiples of the GPTQ group size below


def pruned_positions(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.weight == 0).cpu() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in name}


def assert_zeros_kept(quantized: torch.nn.Module, pruned: dict[str, torch.Tensor]) -> None:
    for name, zeros in pruned.items():
        assert not dequantized_weight(quantized.get_submodule(name)).float().cpu()[zeros].any(), name
    assert verify_sparsity(quantized, "2:4")["conforming"]


def test_gptq_on_cuda_keeps_2_4_zeros_through_save_and_reload(tmp_path):
    pytest.importorskip("gptqmodel")
    model = tiny_model(**WIDE).cuda()
    windows = token_windows()
    compress(model, [PruningConfig(method="wanda", sparsity="2:4")], calibration=windows)
    pruned = pruned_positions(model)
    ids = token_windows(samples=2, seq_len=12, seed=4).cuda()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    compress(model, [GPTQConfig(bits=4, group_size=32)], calibration=windows)

    assert "QuantLinear" in type(model.model.layers[0].mlp.down_proj).__name__
    assert_zeros_kept(model, pruned)
    save_pruned(model, tmp_path / "gptq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", device_map="cuda", dtype=torch.float16).eval()
    assert_zeros_kept(reloaded, pruned)
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits.float()
    assert (after - before).abs().max() < 0.25 * before.abs().max()


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_bitsandbytes_on_cuda_keeps_2_4_zeros(quantization, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = tiny_model()
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())
    save_pruned(model, tmp_path / "pruned")
    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if quantization == "int8"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    )
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", quantization_config=config, device_map="cuda")

    assert quantized.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert_zeros_kept(quantized, pruned_positions(model))
    ids = token_windows(samples=1, seq_len=8, seed=3)
    with torch.no_grad():
        dense, low_bit = model(ids).logits, quantized(ids.cuda()).logits.float().cpu()
    assert (low_bit - dense).abs().max() < (0.05 if quantization == "int8" else 0.25) * dense.abs().max()

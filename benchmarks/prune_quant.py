"""Prune × quantize on SmolLM2-135M: SparseGPT pruning composed with optimum-quanto weight-only int8/int4,
GPTQ int4 and bitsandbytes' load-time int8 / NF4.

Protocol (the core issue's): calibration = 32 windows × 512 tokens (seed 0) from the bundled
Wikipedia calibration split; perplexity over the first 65,536 tokens of the evaluation split in
512-token windows. Each row loads the dense fp32 checkpoint and applies its recipe with
``optimum_prune.compress`` (pruning first, quantization last; GPTQ calibrates on the same windows),
then saves it with ``save_pruned`` (quanto's format for quanto rows, GPTQ's v1 layout for GPTQ rows) and
counts the bytes of the saved weight files. bitsandbytes
rows save the pruned model and load it again with transformers' ``BitsAndBytesConfig``, as a user
would (on its CPU backend here). Zeros are counted on the dequantized weights of every linear but
``lm_head`` (which every quantizer here leaves in full precision). Finished rows are cached; a rerun resumes.

    python benchmarks/prune_quant.py            # full protocol, writes benchmarks/PRUNE_QUANT.md
    python benchmarks/prune_quant.py --quick    # 8×128 calibration, 4,096 eval tokens
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig, QuantoConfig

from common import measured, measured_with, quick_or_full, save_rows, table_header
from optimum_prune import PruningConfig, compress, evaluate_perplexity, load_default_model, save_pruned, verify_sparsity
from optimum_prune.calibration import calibration_windows
from optimum_prune.quantized import dequantized_weight, is_gptq_linear
from optimum_prune.atomic_files import write_text_atomic

QUANTO = ("int8", "int4")  # optimum-quanto weight types, through compress
BITSANDBYTES = {  # load-time quantization of the saved pruned model
    "bnb int8": BitsAndBytesConfig(load_in_8bit=True),
    "bnb nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}
# through compress, zeros kept (optimum_prune.gptq); groups of 64: SmolLM2's 576-wide inputs hold no whole groups of 128
GPTQ = {"gptq int4": GPTQConfig(bits=4, group_size=64)}
# (row, pruning sparsity or None, quantization: a QUANTO weight type, a GPTQ or BITSANDBYTES key, or None)
ROWS = [
    ("dense", None, None),
    ("int8", None, "int8"),
    ("int4", None, "int4"),
    ("SparseGPT 2:4", "2:4", None),
    ("SparseGPT 50 %", 0.5, None),
    ("SparseGPT 2:4 + int8", "2:4", "int8"),
    ("SparseGPT 2:4 + int4", "2:4", "int4"),
    ("SparseGPT 50 % + int4", 0.5, "int4"),
    ("GPTQ int4", None, "gptq int4"),
    ("SparseGPT 2:4 + GPTQ int4", "2:4", "gptq int4"),
    ("SparseGPT 50 % + GPTQ int4", 0.5, "gptq int4"),
    ("bitsandbytes int8", None, "bnb int8"),
    ("bitsandbytes NF4", None, "bnb nf4"),
    ("SparseGPT 2:4 + bitsandbytes int8", "2:4", "bnb int8"),
    ("SparseGPT 2:4 + bitsandbytes NF4", "2:4", "bnb nf4"),
]


# Ablation rows for the GPTQ note: round-to-nearest int4 on groups of 64, on GPTQ's own grid and on an asymmetric one
# (the weights quantized and dequantized in place: a measurement of the grids, not a storage format).
RTN = {"rtn int4 sym": True, "rtn int4 asym": False}
ROWS += [
    ("round-to-nearest int4, groups of 64, symmetric (GPTQ's grid)", None, "rtn int4 sym"),
    ("round-to-nearest int4, groups of 64, asymmetric", None, "rtn int4 asym"),
]


def round_to_nearest(model: torch.nn.Module, symmetric: bool, bits: int = 4, group_size: int = 64) -> None:
    """Quantize every decoder linear's weight to ``bits`` on groups of ``group_size`` inputs, as GPTQ's
    quantizer grids it (range widened to include 0; symmetric: zero-point in the middle), and dequantize."""
    levels = 2**bits - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
                continue
            weight = module.weight.view(module.out_features, -1, group_size)
            low, high = weight.amin(-1, keepdim=True).clamp(max=0), weight.amax(-1, keepdim=True).clamp(min=0)
            if symmetric:
                high = torch.maximum(-low, high)
                low = -high
            scale = ((high - low) / levels).clamp(min=1e-12)
            zero = torch.full_like(scale, (levels + 1) / 2) if symmetric else torch.round(-low / scale)
            codes = torch.clamp(torch.round(weight / scale) + zero, 0, levels)
            weight.copy_(scale * (codes - zero))


def notes(done: dict) -> list[str]:
    """What the GPTQ rows show, worded from the measured values."""
    gptq, quanto, symmetric, asymmetric = (done.get(row, {}).get("perplexity") for row in (
        "GPTQ int4", "int4", *(row for row, _, quantization in ROWS if quantization in RTN)))  # fmt: skip
    if None in (gptq, quanto, symmetric, asymmetric):
        return []
    compensation = "improves on" if gptq < symmetric else "does not improve on"
    return [
        f"- GPTQ int4 ({gptq:.2f}) against quanto's int4 ({quanto:.2f}): round-to-nearest on GPTQ's symmetric group-64 grid "
        f"gives {symmetric:.2f} and on an asymmetric group-64 grid {asymmetric:.2f}, so the symmetric grid costs "
        f"{symmetric - asymmetric:.2f}, and GPTQ's error compensation {compensation} round-to-nearest on that grid "
        f"({gptq - symmetric:+.2f}) with this protocol's calibration. transformers' GPTQ loader reads the v1 layout, "
        "which needs `sym=True`.",
    ]


def measure(sparsity: float | str | None, quantization: str | None, calibration: tuple[int, int], eval_tokens: int) -> dict:
    model, tokenizer = load_default_model()
    samples, seq_len = calibration
    windows = calibration_windows(None, tokenizer, samples, seq_len, seed=0)  # what PruningConfig(seed=0) draws
    recipe: list = []
    if sparsity is not None:
        recipe.append(PruningConfig(method="sparsegpt", sparsity=sparsity, num_calibration_samples=samples, calibration_seq_len=seq_len))
    if quantization in QUANTO:
        recipe.append(QuantoConfig(weights=quantization))
    if quantization in GPTQ:
        recipe.append(GPTQ[quantization])
    if recipe:
        compress(model, recipe, calibration=windows, tokenizer=tokenizer)
    if quantization in RTN:
        round_to_nearest(model, symmetric=RTN[quantization])
    if quantization in BITSANDBYTES:
        with tempfile.TemporaryDirectory() as directory:
            save_pruned(model, Path(directory) / "pruned")
            model = AutoModelForCausalLM.from_pretrained(Path(directory) / "pruned", quantization_config=BITSANDBYTES[quantization])
    pattern = sparsity if isinstance(sparsity, str) else None
    check = verify_sparsity(model, pattern)
    with tempfile.TemporaryDirectory() as directory:
        save_pruned(model, Path(directory) / "checkpoint")
        stored = sum(f.stat().st_size for f in (Path(directory) / "checkpoint").glob("*.safetensors"))
    if quantization in GPTQ:
        dequantize_gptq_layers(model)
    return {
        "perplexity": evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=eval_tokens),
        "stored_bytes": None if quantization in RTN else stored,  # stored in fp32: not a format
        "zeros": check["overall_sparsity"],
        "conforming": check.get("conforming") if pattern else None,
    }


def dequantize_gptq_layers(model: torch.nn.Module) -> None:
    """Replace GPTQ's quantized linears by fp32 ``nn.Linear``s holding their dequantized weights.

    GPTQ rows are evaluated so: gptqmodel's CPU kernels (without the optional ``kernels`` package) took
    50 s per 512-token window here, 1.8 h for the protocol's 128 windows. The weights are the codes'
    exact values; only the matmul's arithmetic may differ (quick protocol, SparseGPT 2:4 + GPTQ int4:
    perplexity 208.805 so, 208.797 through gptqmodel's kernel).
    """
    for name, module in list(model.named_modules()):
        if is_gptq_linear(module):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantized_weight(module).float())
                if module.bias is not None:
                    linear.bias.copy_(module.bias.float())
            model.set_submodule(name, linear)


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "PRUNE_QUANT", "8×128 calibration, 4,096 evaluation tokens")
    calibration, eval_tokens = ((8, 128), 4096) if quick else ((32, 512), 65536)
    cache = output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    for row, sparsity, quantization in ROWS:
        if row not in done:
            done[row] = measured(measure(sparsity, quantization, calibration, eval_tokens))
            save_rows(cache, done)
        print(row, done[row], flush=True)
        write_table(done, quick, calibration, eval_tokens, output)


def write_table(done: dict, quick: bool, calibration: tuple[int, int], eval_tokens: int, output: Path) -> None:
    """The table of the rows measured so far (rewritten after each one), the others listed as unfinished."""
    dense = done["dense"]
    command = "python benchmarks/prune_quant.py" + (" --quick" if quick else "")
    lines = [
        *table_header(
            "Prune × quantize: SmolLM2-135M-Instruct (CPU)",
            command,
            f"Protocol: SparseGPT calibration {calibration[0]} × {calibration[1]} tokens (seed 0); perplexity over the first "
            f"{eval_tokens:,} tokens of the Wikipedia evaluation split in 512-token windows. Quantization: optimum-quanto "
            "weight-only (`compress`: pruning first, then `QuantoConfig`; int4 with quanto's integer zero-point so zeros "
            "stay zero); GPTQ int4 (group size 64, `compress` with `GPTQConfig`, optimum + gptqmodel on CPU, calibrated "
            "on the same windows; pruned weights are quantized to exactly zero and their error compensated; perplexity computed "
            "on the dequantized weights in fp32, as gptqmodel's CPU kernels take 50 s a window here); bitsandbytes at load time (`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` of the "
            "saved pruned model, with transformers' defaults: the unquantized weights — embeddings, norms — load in fp16, int8 "
            "matmuls run in fp16, NF4's compute dtype is set to fp32; hence their smaller files). Stored bytes: the saved `*.safetensors` files (tied embeddings once; pruned weights are stored "
            "dense — sparse storage formats are a separate step). Zeros: exact zeros of the dequantized weights of every "
            "linear except `lm_head`.",
        ),
        "| recipe | perplexity | stored bytes | of dense | zeros in linears | N:M holds |",
        "|---|---|---|---|---|---|",
    ]
    for row, _, _ in ROWS:
        if row not in done:
            continue
        r = done[row]
        holds = "" if r["conforming"] is None else ("yes" if r["conforming"] else "**no**")
        lines.append(
            f"| {row} | {r['perplexity']:.2f} | {_bytes(r['stored_bytes'], dense['stored_bytes'])} | "
            f"{r['zeros']:.2%} | {holds} |"
        )
    unfinished = [row for row, _, _ in ROWS if row not in done]
    if unfinished:
        lines += ["", f"Not measured yet (the next run resumes): {', '.join(unfinished)}."]
    lines += ["", measured_with(done[row] for row, _, _ in ROWS if row in done)]
    written = notes(done)
    if written:
        lines += ["", "Notes:", *written]
    write_text_atomic(output, "\n".join(lines) + "\n")


def _bytes(stored: int | None, dense: int) -> str:
    return "— | —" if stored is None else f"{stored:,} | {stored / dense:.1%}"


if __name__ == "__main__":
    main()

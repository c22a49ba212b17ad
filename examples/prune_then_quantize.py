"""Prune, then quantize, in one call (``compress``), save in the quantizer's own format, reload with
its own loader, and repack the quantized 2:4 model into the compressed 2:4 format (``sparsify``)
without quantizing again.

The pruned weights stay exactly zero through quantization (``compress`` checks every layer), so the
quantized model still follows 2:4; ``sparsify`` moves its integer codes and scales into the format
unchanged, so the repacked model gives the quantized model's logits.

    python examples/prune_then_quantize.py                                 # SparseGPT 2:4 + optimum-quanto int8
    python examples/prune_then_quantize.py --quantization quanto-int4      # compiles quanto's C++ extension once (~2 min)
    python examples/prune_then_quantize.py --quantization gptq-int4 --eval-tokens 1024  # optimum-prune[gptq]; slow on CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTQConfig, QuantoConfig

from optimum_prune import PruningConfig, compress, evaluate_perplexity, load_default_model, load_model, save_pruned, sparsify, verify_sparsity

# Group size 64 for GPTQ: SmolLM2's 576-wide inputs hold no whole groups of 128.
QUANTIZERS = {
    "quanto-int8": lambda: QuantoConfig(weights="int8"),
    "quanto-int4": lambda: QuantoConfig(weights="int4"),
    "gptq-int4": lambda: GPTQConfig(bits=4, group_size=64),
}


def reload(directory: Path, quantization: str) -> torch.nn.Module:
    """The checkpoint through its quantizer's loader: optimum-quanto's, or transformers' GPTQ loader."""
    if quantization.startswith("quanto"):
        from optimum.quanto import QuantizedModelForCausalLM

        return QuantizedModelForCausalLM.from_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", type=Path, help="local checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--quantization", default="quanto-int8", choices=sorted(QUANTIZERS))
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (pruning and GPTQ)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens (512-token windows)")
    parser.add_argument("--output", type=Path, default=Path("pruned-quantized"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model) if args.model else load_default_model()
    pruning = PruningConfig(method=args.method, sparsity="2:4", num_calibration_samples=args.samples, calibration_seq_len=args.seq_len)
    compress(model, [pruning, QUANTIZERS[args.quantization]()], tokenizer=tokenizer)
    measured = verify_sparsity(model, "2:4")  # counted on the dequantized weights
    print(f"{args.method} 2:4 + {args.quantization}: zeros in linears {measured['overall_sparsity']:.1%}, "
          f"2:4 everywhere: {measured['conforming']}")  # fmt: skip
    # Saved before the model first runs: on the CPU, gptqmodel's kernel repacks GPTQ codes in place at the
    # first forward, after which GPTQ's checkpoint layout cannot be written (save_pruned says so).
    save_pruned(model, args.output, tokenizer=tokenizer)

    ids = tokenizer("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        quantized_logits = model.eval()(ids).logits
        identical = torch.equal(reload(args.output, args.quantization)(ids).logits, quantized_logits)
    print(f"saved to {args.output}; reloaded with the quantizer's loader, logits identical: {identical}")
    print(f"perplexity: {evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens):.2f}")

    print(sparsify(model))  # repacks the quantized codes: no second quantization
    with torch.no_grad():
        difference = float((model(ids).logits - quantized_logits).abs().max())
    print(f"repacked into the 2:4 format: largest logit difference to the quantized model {difference:.1e}")


if __name__ == "__main__":
    main()

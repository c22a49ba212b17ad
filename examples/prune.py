"""Prune a causal LM in one call, measure it, save it, and reload it with stock transformers.

Runs on CPU with no model hub: the default model is the embedded SmolLM2-135M-Instruct, calibration
and evaluation text the bundled Wikipedia splits (disjoint).

    python examples/prune.py                                        # SparseGPT 2:4 (perplexity 24.6 → 91.3; 2 min on 2 CPU cores)
    python examples/prune.py --method wanda --sparsity 0.5 --allocation owl
    python examples/prune.py --method width --sparsity 0.2          # structured: the matrices shrink
    python examples/prune.py --model path/to/llama --output pruned/ # any local Llama-family checkpoint
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from optimum_prune import PruningConfig, evaluate_perplexity, load_default_model, load_model, prune, save_pruned, verify_sparsity


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", type=Path, help="local checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", default="2:4", help="a fraction such as 0.5, or an N:M pattern")
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens (512-token windows)")
    parser.add_argument("--output", type=Path, default=Path("pruned"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model) if args.model else load_default_model()
    config = PruningConfig(method=args.method, sparsity=args.sparsity, allocation=args.allocation,
                           num_calibration_samples=args.samples, calibration_seq_len=args.seq_len)  # fmt: skip
    dense_perplexity = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens)
    parameters = sum(p.numel() for p in model.parameters())

    report = prune(model, config, tokenizer=tokenizer)  # calibration=None: the bundled Wikipedia split
    print(report)
    pruned_perplexity = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens)
    measured = verify_sparsity(model, config.sparsity if isinstance(config.sparsity, str) else None)
    pattern = f", {measured['pattern']} everywhere: {measured['conforming']}" if measured["pattern"] else ""
    print(f"perplexity: dense {dense_perplexity:.2f} → pruned {pruned_perplexity:.2f}")
    print(f"parameters: {parameters:,} → {sum(p.numel() for p in model.parameters()):,}; "
          f"zeros in linears: {measured['overall_sparsity']:.1%}{pattern}")  # fmt: skip

    save_pruned(model, args.output, tokenizer=tokenizer, report=report)
    # Uniform results reload without optimum_prune; non-uniform shapes need `import optimum_prune` first.
    reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()
    ids = tokenizer("The history of the city", return_tensors="pt").input_ids
    # The weights reload bit for bit; the logits to float precision (weights read from disk may sit at other
    # memory alignments, for which the CPU's matrix kernels can sum in another order).
    saved, loaded = model.state_dict(), reloaded.state_dict()
    identical = saved.keys() == loaded.keys() and all(torch.equal(tensor, loaded[key]) for key, tensor in saved.items())
    with torch.no_grad():
        difference = float((reloaded(ids).logits - model(ids).logits).abs().max())
    print(f"saved to {args.output}; reloaded weights identical: {identical}, largest logit difference {difference:.1e}")
    if not identical or difference > 1e-4:
        raise SystemExit("the reloaded checkpoint does not reproduce the pruned model")


if __name__ == "__main__":
    main()

"""Mixture-of-experts models: keep r of n experts per layer, or merge them, then skip low-weight
experts at inference, and save a checkpoint that stock transformers reloads.

``--model`` names a local Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint. No small MoE
checkpoint is installable here, so ``--random-mixtral`` builds a small randomly initialised
``MixtralForCausalLM`` (8 experts, top-2) with the embedded SmolLM2 tokenizer instead: the same code
runs, but its numbers show the mechanics only (a random router spreads its weight evenly and has
nothing to preserve; ``benchmarks/moe.py`` compares the criteria on a Mixtral trained on real text).

    python examples/moe_experts.py --model path/to/mixtral                        # keep 4 of 8, reconstruction search
    python examples/moe_experts.py --model path/to/mixtral --criterion reap --keep 6 --beta 0.3   # one beta for all layers
    python examples/moe_experts.py --random-mixtral --method merge_experts        # MC-SMoE merging instead
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from optimum_prune import PruningConfig, evaluate_perplexity, load_model, prune, save_pruned, skip_experts
from optimum_prune.models import default_model_path, fix_default_tokenizer


def small_random_mixtral() -> tuple[MixtralForCausalLM, object]:
    tokenizer = fix_default_tokenizer(AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True))
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="local MoE checkpoint directory")
    source.add_argument("--random-mixtral", action="store_true", help="a small randomly initialised Mixtral (mechanics only)")
    parser.add_argument("--method", default="experts", choices=["experts", "merge_experts"])
    parser.add_argument("--criterion", default="reconstruction", choices=["reconstruction", "frequency", "reap"],
                        help="how --method experts chooses the experts to keep")  # fmt: skip
    parser.add_argument("--keep", type=int, default=4, help="experts kept per layer")
    parser.add_argument("--beta", type=float, help="skip an expert whose routing weight is below beta × the top one's "
                        "(default: each layer's median second-to-top weight ratio on the calibration data, as Lu et al.)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--output", type=Path, default=Path("moe-pruned"))
    args = parser.parse_args()

    model, tokenizer = small_random_mixtral() if args.random_mixtral else load_model(args.model)
    options = {"num_experts": args.keep} | ({"criterion": args.criterion} if args.method == "experts" else {})
    config = PruningConfig(method=args.method, method_options=options, num_calibration_samples=args.samples,
                           calibration_seq_len=args.seq_len)  # fmt: skip
    dense_perplexity = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens)
    report = prune(model, config, tokenizer=tokenizer)  # routing statistics from the bundled Wikipedia split
    print(report)
    pruned_perplexity = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens)
    print(f"perplexity: all experts {dense_perplexity:.2f} → {args.keep} per layer {pruned_perplexity:.2f}")

    # Dynamic skipping (Lu et al.), on top of the pruned model.
    skipping = skip_experts(model, args.beta, tokenizer=tokenizer, num_samples=args.samples, seq_len=args.seq_len)
    skipped_perplexity = evaluate_perplexity(model, tokenizer, max_tokens=args.eval_tokens)
    betas = ", ".join(f"{beta:.2f}" for beta in skipping.betas)
    print(f"skipping at beta {betas}: {skipping.skip_rate:.1%} of expert calls skipped, perplexity {skipped_perplexity:.2f}")
    skipping.remove()  # an inference-time option: the saved model routes as before

    save_pruned(model, args.output, tokenizer=tokenizer, report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()  # a stock config: fewer experts, no plugin
    ids = tokenizer("The history of the city", return_tensors="pt").input_ids
    # The weights reload bit for bit; the logits to float precision (weights read from disk may sit at other
    # memory alignments, for which the CPU's matrix kernels can sum in another order).
    saved, loaded = model.state_dict(), reloaded.state_dict()
    identical = saved.keys() == loaded.keys() and all(torch.equal(tensor, loaded[key]) for key, tensor in saved.items())
    with torch.no_grad():
        difference = float((reloaded(ids).logits - model(ids).logits).abs().max())
    experts = getattr(reloaded.config, "num_local_experts", None) or reloaded.config.num_experts
    print(f"saved to {args.output} with {experts} experts per layer; reloaded weights identical: {identical}, largest logit difference {difference:.1e}")
    if not identical or difference > 1e-4:
        raise SystemExit("the reloaded checkpoint does not reproduce the pruned model")


if __name__ == "__main__":
    main()

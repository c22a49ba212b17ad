"""LoRA recovery of a 2:4 Wanda-pruned SmolLM2-135M through LLaMA-Factory: dense / pruned /
recovered perplexity, and the sparsity after merging (which must equal the sparsity before).

The recovery is the product path a user runs: ``llamafactory_ext.run_train`` with a
``pruning:`` section — Wanda 2:4 calibrated through LLaMA-Factory's data pipeline on
``wiki_pt`` (the bundled Wikipedia calibration split), LLaMA-Factory's ``run_exp`` (stage
``pt``, LoRA on every linear) with ``PruningCallback``, then the sparsity-preserving merge.
Perplexity follows the core protocol: the first 65,536 tokens of the disjoint evaluation split
in 512-token windows.

    python benchmarks/recovery.py            # full protocol, writes benchmarks/RECOVERY.md
    python benchmarks/recovery.py --quick    # 8×128 calibration, 8 steps, 4,096 eval tokens
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import table_header
from llamafactory_ext import PruningSection, run_train
from llamafactory_ext.datasets import write_wikipedia_datasets
from optimum_prune import SparsityMasks, evaluate_perplexity, load_model, verify_sparsity
from optimum_prune.models import default_model_path

HERE = Path(__file__).resolve().parent


def perplexity(directory: Path, eval_tokens: int) -> tuple[float, torch.nn.Module]:
    model, tokenizer = load_model(directory)
    return evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=eval_tokens), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8×128 calibration, 8 training steps, 4,096 eval tokens")
    parser.add_argument("--steps", type=int, help="LoRA training steps (default 60; 8 with --quick)")
    parser.add_argument("--workdir", type=Path, help="where the pruned, adapter and merged models go (default: a temp dir)")
    parser.add_argument("--output", type=Path, help="markdown table (default: benchmarks/RECOVERY.md or RECOVERY-quick.md)")
    args = parser.parse_args()
    samples, seq_len, eval_tokens, steps = (8, 128, 4096, 8) if args.quick else (32, 512, 65536, 60)
    steps = args.steps or steps
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recovery-"))
    output = args.output or HERE / ("RECOVERY-quick.md" if args.quick else "RECOVERY.md")

    dense_path = default_model_path()
    dense_ppl, _ = perplexity(dense_path, eval_tokens)
    print(f"dense perplexity {dense_ppl:.2f}", flush=True)

    lf_args = {
        "model_name_or_path": str(dense_path),
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 16,
        "lora_alpha": 32,
        "dataset": "wiki_pt",
        "dataset_dir": str(write_wikipedia_datasets(workdir / "data")),
        "template": "smollm2",
        "cutoff_len": 256,
        "output_dir": str(workdir / "run"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "learning_rate": 3.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "max_steps": steps,
        "logging_steps": max(1, steps // 10),
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
    }
    pruning = {"method": "wanda", "sparsity": "2:4", "num_calibration_samples": samples, "calibration_seq_len": seq_len}
    started = time.perf_counter()
    run_train(lf_args, PruningSection.from_mapping(pruning, lf_args))
    seconds = time.perf_counter() - started

    run = workdir / "run"
    pruned_ppl, pruned = perplexity(run / "pruned", eval_tokens)
    recovered_ppl, merged = perplexity(run / "merged", eval_tokens)
    before, after = SparsityMasks.from_zeros(pruned), SparsityMasks.from_zeros(merged)
    same_zeros = all(torch.equal(before.pruned[name], after.pruned[name]) for name in before.pruned)
    conforming = verify_sparsity(merged, pattern="2:4")["conforming"]

    command = "python benchmarks/recovery.py" + (" --quick" if args.quick else "")
    lines = [
        *table_header(
            "LoRA recovery after 2:4 Wanda: SmolLM2-135M-Instruct (fp32, CPU) through LLaMA-Factory",
            command,
            f"Pruning: Wanda 2:4, calibration {samples} × {seq_len} tokens (seed 0) from `wiki_pt` through LLaMA-Factory's "
            f"data pipeline. Recovery: LLaMA-Factory `run_exp`, stage pt on `wiki_pt` (Wikipedia calibration split), LoRA "
            f"r=16 α=32 on all linears, {steps} steps × 4 × 256 tokens, lr 3e-4 cosine; merged keeping sparsity. Perplexity: "
            f"first {eval_tokens:,} tokens of the evaluation split in 512-token windows. Prune + train + merge took {seconds:.0f} s.",
        ),
        "| model | perplexity | sparsity of pruned linears |",
        "|---|---|---|",
        f"| dense | {dense_ppl:.2f} | — |",
        f"| Wanda 2:4 | {pruned_ppl:.2f} | {before.sparsity():.4%} |",
        f"| Wanda 2:4 + LoRA, merged | {recovered_ppl:.2f} | {after.sparsity():.4%} |",
        "",
        f"Zeros after the merge identical to before: {'yes' if same_zeros else 'NO'}; 2:4 pattern holds after the merge: "
        f"{'yes' if conforming else 'NO'}. Recovered ÷ pruned perplexity: {recovered_ppl / pruned_ppl:.3f}.",
    ]
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not (same_zeros and conforming):
        raise SystemExit("the merge changed the sparsity pattern")


if __name__ == "__main__":
    main()

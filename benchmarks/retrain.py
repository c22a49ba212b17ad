"""Retraining after pruning on SmolLM2-135M (issue 11, items 4 and 9): PERP's tiny trainable
subsets against full retraining after one-shot Wanda, and Han et al.'s iterative prune-retrain
against one-shot magnitude pruning followed by the same training.

Every recovery row trains the same steps on the same windows, through ``transformers.Trainer``
with ``PruningCallback`` (PERP: ``PruningCallback(perp=...)``; iterative: ``IterativeSchedule``),
and reports the fraction of the parameters trained, the perplexity on the core protocol (the first
65,536 tokens of the evaluation split in 512-token windows) and the share of the perplexity lost
to pruning that training won back. Finished rows are cached; a rerun resumes.

    python benchmarks/retrain.py            # full protocol, writes benchmarks/RETRAIN.md
    python benchmarks/retrain.py --quick    # 8×128 calibration, 4 steps, 4,096 eval tokens
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from common import measured, measured_with, quick_or_full, save_rows, table_header
from optimum_prune import (
    IterativeSchedule, PERPConfig, PruningCallback, PruningConfig, evaluate_perplexity, load_default_model, prune, verify_sparsity,
)  # fmt: skip
from optimum_prune.calibration import calibration_windows
from optimum_prune.atomic_files import write_text_atomic

SPARSITY = 0.5
TRAINING_SEQ_LEN = 256
# name: (one-shot pruning before training or None, PruningCallback keyword arguments, learning rate)
ROWS = {
    "Wanda 50 %": ("wanda", None, None),
    "Wanda 50 % + PERP norms (biases, RMSNorm scales)": ("wanda", {"perp": PERPConfig(lora=None)}, 2e-4),
    "Wanda 50 % + PERP norms + MaskLoRA r16": ("wanda", {"perp": PERPConfig(lora="mask", rank=16)}, 2e-4),
    "Wanda 50 % + PERP norms + ScaleLoRA r16": ("wanda", {"perp": PERPConfig(lora="scale", rank=16)}, 2e-4),
    "Wanda 50 % + full retraining (zeros kept)": ("wanda", {}, 5e-5),
    "magnitude 50 %": ("magnitude", None, None),
    "magnitude 50 % one-shot + retraining (1 round)": (None, {"schedule": IterativeSchedule(SPARSITY, iterations=1)}, 5e-5),
    "magnitude iterative prune-retrain (4 rounds)": (None, {"schedule": IterativeSchedule(SPARSITY, iterations=4)}, 5e-5),
}

ONE_COSINE = "magnitude iterative prune-retrain (4 rounds, one cosine over the run)"
ROWS[ONE_COSINE] = (None, {"schedule": IterativeSchedule(SPARSITY, iterations=4)}, 5e-5)
"""Ablation: the 4 rounds under the Wanda rows' schedule (one cosine, 10 % warm-up) instead of a restart per round."""


def notes(done: dict, setup: dict) -> list[str]:
    """What the rows show, worded from the measured values."""
    lines = []
    one_shot, rounds, one_cosine = (done.get(name, {}).get("perplexity") for name in (
        "magnitude 50 % one-shot + retraining (1 round)", "magnitude iterative prune-retrain (4 rounds)", ONE_COSINE))  # fmt: skip
    steps = setup["steps"]
    last_cut = 1 - (1 - SPARSITY) ** (3 / 4)
    if rounds is not None and one_cosine is not None:
        lines.append(
            f"- Under one cosine decay over the whole run (10 % warm-up, as the Wanda rows) 4 rounds reach {one_cosine:.2f}: the "
            f"last round's cut ({last_cut * 100:.1f} % → {SPARSITY * 100:.0f} %) meets a decayed learning rate with a quarter of the steps left. "
            f"Han et al. retrain after every pruning step; restarting the cosine at each round gives {rounds:.2f}."
        )
    if rounds is not None and one_shot is not None:
        verdict = "behind" if rounds > one_shot else "ahead of"
        lines.append(
            f"- 4 rounds with restarts ({rounds:.2f}) are {verdict} one-shot pruning + retraining ({one_shot:.2f}) at equal steps: "
            f"each round has {steps // 4} of the {steps} steps, so the model recovers from the last cut in {steps // 4} steps "
            f"while the one-shot model trains at {SPARSITY * 100:.0f} % for all {steps} ({steps * 4 * TRAINING_SEQ_LEN:,} training tokens "
            "in all). Han et al. retrain to convergence after every round."
        )
    lines.append(
        "- PERP's trained fractions count the parameters its optimizer sees (adapters included); full retraining trains every "
        "parameter, with the pruned weights' gradients masked so the zeros stay."
    )
    return lines


def settings(quick: bool) -> dict:
    if quick:
        return {"calibration": (8, 128), "steps": 4, "eval_tokens": 4096}
    return {"calibration": (32, 512), "steps": 60, "eval_tokens": 65536}


def retrain(
    model: torch.nn.Module, windows: torch.Tensor, steps: int, learning_rate: float, callback: PruningCallback, restarts: bool
) -> float:
    """Train ``steps`` steps of 4 windows; return the seconds it took."""
    data = Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
    schedule = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.1}
    if restarts and isinstance(callback.schedule, IterativeSchedule):
        # Han et al. retrain after every round: the cosine restarts at each pruning step (no warm-up,
        # so the cycles line up with the rounds) instead of leaving the last round a decayed rate.
        schedule = {"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": callback.schedule.iterations}}
    with tempfile.TemporaryDirectory() as directory:
        args = TrainingArguments(
            output_dir=directory, max_steps=steps, per_device_train_batch_size=4, learning_rate=learning_rate,
            weight_decay=0.0, logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], seed=0, use_cpu=True,
            disable_tqdm=True, **schedule,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        started = time.perf_counter()
        trainer.train()
    model.eval()
    return time.perf_counter() - started


def measure(name: str, setup: dict, tokenizer, training_windows: torch.Tensor) -> dict:
    method, callback_options, learning_rate = ROWS[name]
    model, _ = load_default_model()
    samples, seq_len = setup["calibration"]
    if method is not None:
        config = PruningConfig(method=method, sparsity=SPARSITY, num_calibration_samples=samples, calibration_seq_len=seq_len)
        prune(model, config, tokenizer=tokenizer)
    row = {"trained_fraction": 0.0, "seconds": 0.0}
    if callback_options is not None:
        callback = PruningCallback(**callback_options)
        row["seconds"] = retrain(model, training_windows, setup["steps"], learning_rate, callback, restarts=name != ONE_COSINE)
        summary = callback.perp_summary  # PERP: what its optimizer saw; otherwise every parameter trains
        row["trained_fraction"] = summary.fraction if summary is not None else 1.0
    row["sparsity"] = verify_sparsity(model)["overall_sparsity"]
    row["perplexity"] = evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=setup["eval_tokens"])
    return row


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "RETRAIN", "8×128 calibration, 4 training steps, 4,096 eval tokens")
    setup = settings(quick)
    cache = output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    dense, tokenizer = load_default_model()
    if "dense" not in done:
        done["dense"] = measured({"perplexity": evaluate_perplexity(dense, tokenizer, seq_len=512, max_tokens=setup["eval_tokens"])})
        save_rows(cache, done)
    del dense
    training_windows = calibration_windows(None, tokenizer, 4 * setup["steps"], TRAINING_SEQ_LEN, seed=1)
    for name in ROWS:
        if name not in done:
            done[name] = measured(measure(name, setup, tokenizer, training_windows))
            save_rows(cache, done)
        print(f"{name:<55} {json.dumps(done[name])}", flush=True)
    write_table(done, setup, output, "python benchmarks/retrain.py" + (" --quick" if quick else ""))


def write_table(done: dict, setup: dict, output: Path, command: str) -> None:
    samples, seq_len = setup["calibration"]
    dense = done["dense"]["perplexity"]
    lines = [
        *table_header(
            "Retraining after pruning: SmolLM2-135M-Instruct (fp32, CPU)",
            command,
            f"Pruning: {SPARSITY:.0%} of every decoder linear, calibration {samples} × {seq_len} tokens (seed 0). Training: "
            f"{setup['steps']} steps × 4 windows of {TRAINING_SEQ_LEN} tokens from the calibration split (seed 1, disjoint from the evaluation "
            "split), AdamW without weight decay, cosine schedule with 10 % warm-up; learning rate 2e-4 for PERP's subsets and "
            "5e-5 for full retraining; `PruningCallback` keeps every zero. Iterative rows prune by magnitude inside the run "
            "(`IterativeSchedule`: 1 round = one-shot then all the training; 4 rounds of a quarter each, the same fraction of "
            f"the remaining weights per round) and restart the cosine, without warm-up, at every round (but the one-cosine ablation). Perplexity: first {setup['eval_tokens']:,} tokens of the evaluation split in "
            f"512-token windows; dense {dense:.2f}. Recovered: the share of the perplexity lost to pruning (in log space, "
            "against the row's one-shot model) that training won back.",
        ),
        "| row | parameters trained | perplexity | recovered | sparsity | training s |",
        "|---|---|---|---|---|---|",
    ]
    one_shot = {"Wanda": done.get("Wanda 50 %"), "magnitude": done.get("magnitude 50 %")}
    for name in ROWS:
        if name not in done:
            continue
        row = done[name]
        base = one_shot["Wanda" if name.startswith("Wanda") else "magnitude"]
        recovered = ""
        if base is not None and row is not base and base["perplexity"] > dense:
            lost = math.log(base["perplexity"]) - math.log(dense)
            recovered = f"{(math.log(base['perplexity']) - math.log(row['perplexity'])) / lost:.0%}"
        lines.append(
            f"| {name} | {row['trained_fraction']:.3%} | {row['perplexity']:.2f} | {recovered} | {row['sparsity']:.1%} | {row['seconds']:.0f} |"
        )
    lines += ["", measured_with(done[name] for name in ["dense", *ROWS] if name in done), "", "Notes:", *notes(done, setup)]
    write_text_atomic(output, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

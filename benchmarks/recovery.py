"""Recovery of a pruned SmolLM2-135M through LLaMA-Factory: LoRA on labels vs LoRA + knowledge
distillation from the dense model vs full fine-tuning with distillation (and LoRA with distillation
and labels mixed), after Wanda 2:4, width pruning (20 %) and depth pruning (8 layers), at equal
steps and tokens.

Every row is the product path a user runs: the model is pruned once per pruning row with
``llamafactory_ext.run_train`` (``stage: prune``, calibrated through LLaMA-Factory's data pipeline
on ``wiki_pt``), then LLaMA-Factory's ``run_exp`` trains it (stage ``pt`` on ``wiki_pt``, the zeros
kept by ``PruningCallback``) with or without a ``distill:`` section whose teacher is the dense
model; LoRA adapters are merged keeping the sparsity. Each training row runs in its own process,
so its peak resident memory is its own. Perplexity follows the core protocol: the first 65,536
tokens of the disjoint evaluation split in 512-token windows. Finished rows are cached; a rerun
resumes.

    python benchmarks/recovery.py            # full protocol, writes benchmarks/RECOVERY.md
    python benchmarks/recovery.py --quick    # 8×128 calibration, 8 steps, 4,096 eval tokens
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from common import measured, measured_with, save_rows, table_header
from llamafactory_ext import PruningSection, merge_adapter, run_train
from llamafactory_ext.datasets import write_wikipedia_datasets
from llamafactory_ext.training import TrainingSections
from optimum_prune import PruningConfig, SparsityMasks, evaluate_perplexity, load_model, verify_sparsity
from optimum_prune.models import cache_root, default_model_path
from optimum_prune.report import process_peak_rss
from optimum_prune.atomic_files import write_text_atomic

HERE = Path(__file__).resolve().parent
# Structured rows first: they carry the claim (distillation beats labels at equal steps).
PRUNINGS = {
    "width 20 %": {"method": "width", "sparsity": 0.2, "method_options": {"criterion": "wanda_sp", "ranking": "layer"}},
    "depth −8 layers": {"method": "layers", "method_options": {"criterion": "block_influence", "num_layers": 8}},
    "Wanda 2:4": {"method": "wanda", "sparsity": "2:4"},
}
KD = {"temperature": 2.0, "kd_weight": 1.0, "label_weight": 0.0}
# Separates two reasons KD alone can lose to labels here: its temperature, and not seeing the labels.
KD_AND_LABELS = {"temperature": 1.0, "kd_weight": 0.5, "label_weight": 0.5}
# (finetuning type, learning rate, distill section or None)
RECOVERIES = {
    "LoRA, labels": ("lora", 3.0e-4, None),
    "LoRA, KD": ("lora", 3.0e-4, KD),
    "full, KD": ("full", 5.0e-5, KD),
    "LoRA, KD + labels (T=1)": ("lora", 3.0e-4, KD_AND_LABELS),
}


def protocol(quick: bool) -> dict:
    samples, seq_len, eval_tokens, steps = (8, 128, 4096, 8) if quick else (32, 512, 65536, 60)
    return {"samples": samples, "seq_len": seq_len, "eval_tokens": eval_tokens, "steps": steps}


def training_args(workdir: Path, model: Path, output: Path, finetuning: str, learning_rate: float, steps: int) -> dict:
    return {
        "model_name_or_path": str(model),
        "stage": "pt",
        "do_train": True,
        "finetuning_type": finetuning,
        "lora_target": "all",
        "lora_rank": 16,
        "lora_alpha": 32,
        "dataset": "wiki_pt",
        "dataset_dir": str(workdir / "data"),
        "template": "smollm2",
        "cutoff_len": 256,
        "output_dir": str(output),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "max_steps": steps,
        "logging_steps": max(1, steps // 10),
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def pruned_model(workdir: Path, name: str, settings: dict) -> Path:
    """Prune once per pruning row (``stage: prune``); later rows reuse the checkpoint while its
    recorded pruning config is this row's."""
    target = workdir / "pruned" / slug(name)
    args = {"model_name_or_path": str(default_model_path()), "stage": "prune", "dataset": "wiki_pt",
            "dataset_dir": str(workdir / "data"), "template": "smollm2", "output_dir": str(target)}  # fmt: skip
    pruning = {**PRUNINGS[name], "num_calibration_samples": settings["samples"], "calibration_seq_len": settings["seq_len"]}
    section = PruningSection.from_mapping(pruning, args)
    if not (target / "pruning_config.json").is_file() or PruningConfig.from_pretrained(target).to_dict() != section.config.to_dict():
        run_train(args, section)
    return target


def train_row(workdir: Path, pruning: str, recovery: str, settings: dict) -> dict:
    """One training row (run in its own process by ``main``, so stamped with the library that process imported):
    train, merge, evaluate."""
    pruned = pruned_model(workdir, pruning, settings)
    finetuning, learning_rate, distill = RECOVERIES[recovery]
    output = workdir / "runs" / slug(f"{pruning} {recovery}")
    args = training_args(workdir, pruned, output, finetuning, learning_rate, settings["steps"])
    if distill is not None:
        args["distill"] = {**distill, "teacher": str(default_model_path())}
    args, training = TrainingSections.split(args, pruning=False)
    run_train(args, None, training)
    seconds = json.loads((output / "train_results.json").read_text())["train_runtime"]  # the optimisation alone
    trained = merge_adapter(pruned, output, output / "merged") if finetuning == "lora" else output
    model, tokenizer = load_model(trained)
    before, after = SparsityMasks.from_zeros(load_model(pruned)[0]), SparsityMasks.from_zeros(model)
    return measured({
        "perplexity": evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=settings["eval_tokens"]),
        "seconds": seconds,
        "peak_rss_bytes": process_peak_rss(),
        "same_zeros": all(torch.equal(before.pruned[n], after.pruned[n]) for n in before.pruned),
    })


def pruned_row(workdir: Path, pruning: str, settings: dict) -> dict:
    model, tokenizer = load_model(pruned_model(workdir, pruning, settings))
    return measured({
        "perplexity": evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=settings["eval_tokens"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsity": verify_sparsity(model)["overall_sparsity"],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8×128 calibration, 8 training steps, 4,096 eval tokens")
    parser.add_argument("--workdir", type=Path, help="pruned models and runs (default: the optimum-prune cache)")
    parser.add_argument("--output", type=Path, help="markdown table (default: benchmarks/RECOVERY.md or RECOVERY-quick.md)")
    parser.add_argument("--row", nargs=2, metavar=("PRUNING", "RECOVERY"), help=argparse.SUPPRESS)  # one row, in a child process
    args = parser.parse_args()
    settings = protocol(args.quick)
    workdir = args.workdir or cache_root() / f"recovery{'-quick' if args.quick else ''}"
    write_wikipedia_datasets(workdir / "data")
    if args.row:
        print(json.dumps(train_row(workdir, *args.row, settings)))
        return
    output = args.output or HERE / ("RECOVERY-quick.md" if args.quick else "RECOVERY.md")
    cache = output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    command = "python benchmarks/recovery.py" + (" --quick" if args.quick else "")
    if "dense" not in done:
        model, tokenizer = load_model(default_model_path())
        done["dense"] = measured({"perplexity": evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=settings["eval_tokens"]),
                                  "parameters": sum(p.numel() for p in model.parameters())})  # fmt: skip
        save_rows(cache, done)
    for pruning in PRUNINGS:
        if pruning not in done:
            done[pruning] = pruned_row(workdir, pruning, settings)
            save_rows(cache, done)
        for recovery in RECOVERIES:
            key = f"{pruning} / {recovery}"
            if key not in done:
                child = [sys.executable, __file__, "--row", pruning, recovery, "--workdir", str(workdir)]
                result = subprocess.run(child + (["--quick"] if args.quick else []), capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f"row {key!r} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
                done[key] = json.loads(result.stdout.strip().splitlines()[-1])
                save_rows(cache, done)
                write_table(done, settings, output, command)  # a cut-off run still leaves its finished rows in the table
            print(key, done[key], flush=True)
    print(write_table(done, settings, output, command))
    if not all(done[f"{p} / {r}"]["same_zeros"] for p in PRUNINGS for r in RECOVERIES):
        raise SystemExit("a recovery changed the pruned zeros")


LOSING_KD = (  # formatted with the protocol's settings and KD's temperature
    "Where distillation alone (T={temperature:g}, no label loss) loses to labels: the perplexity is measured on held-out text of "
    "the same Wikipedia distribution the label loss trains on, so that loss optimises the metric directly, while KD "
    "alone pulls the student towards the teacher's softened distribution (an instruction-tuned model, itself at the "
    "dense perplexity above on this text); and {steps} steps × 1,024 tokens is far below the token budgets Minitron-style "
    "distillation is reported at. The `KD + labels (T=1)` rows keep the label signal and drop the softening: where "
    "they beat label-only LoRA, the teacher's signal adds to the labels' and KD alone lost through its softened, "
    "label-free objective, not through the teacher."
)


def write_table(done: dict, settings: dict, output: Path, command: str) -> str:
    """Write the markdown table of the finished rows (the unfinished ones listed below it) and
    return it; each pruning row group ends with how distillation compares with labels."""
    lines = [
        *table_header(
            "Recovery after pruning: SmolLM2-135M-Instruct (fp32, CPU) through LLaMA-Factory, labels vs distillation",
            command,
            f"Pruning (once per row group, `stage: prune`): calibration {settings['samples']} × {settings['seq_len']} tokens "
            "(seed 0) from `wiki_pt` through LLaMA-Factory's data pipeline; Wanda 2:4; width 20 % of parameters by Wanda-sp "
            "with the same width in every layer; depth: the 8 layers of lowest Block Influence. Recovery: LLaMA-Factory "
            f"`run_exp`, stage pt on `wiki_pt` (Wikipedia calibration split), {settings['steps']} steps × 4 × 256 tokens, "
            "cosine schedule, seed 0; LoRA r=16 α=32 on all linears at lr 3e-4 (merged keeping the zeros), full fine-tuning "
            "at lr 5e-5. KD: a `distill:` section with the dense model as teacher, T=2, the KD loss alone (kd_weight 1, "
            f"label_weight 0); KD + labels: T=1, kd_weight 0.5, label_weight 0.5. Perplexity: first {settings['eval_tokens']:,} tokens of the evaluation split in 512-token "
            "windows. Time: the Trainer's `train_runtime` (the optimisation steps; each row in its own process); peak memory: that process's peak RSS.",
        ),
        "| pruning | recovery | perplexity | vs label-only LoRA | training s | peak RSS (GiB) | zeros kept |",
        "|---|---|---|---|---|---|---|",
        f"| dense ({done['dense']['parameters']:,} parameters) | — | {done['dense']['perplexity']:.2f} | | | | |",
    ]
    verdicts, missing, kd_alone_loses = [], [], False
    for pruning in PRUNINGS:
        if pruning not in done:
            missing.append(pruning)
            continue
        before = done[pruning]
        lines.append(
            f"| {pruning} ({before['parameters']:,} parameters, {before['sparsity']:.1%} zeros) | none | {before['perplexity']:.2f} | | | | |"
        )
        labels = done.get(f"{pruning} / LoRA, labels", {}).get("perplexity")
        for recovery in RECOVERIES:
            row = done.get(f"{pruning} / {recovery}")
            if row is None:
                missing.append(f"{pruning} / {recovery}")
                continue
            versus = f"{row['perplexity'] / labels:.2f}×" if labels else ""
            lines.append(
                f"| | {recovery} | {row['perplexity']:.2f} | {versus} | {row['seconds']:.0f} | "
                f"{row['peak_rss_bytes'] / 2**30:.2f} | {'yes' if row['same_zeros'] else '**no**'} |"
            )
        distilled = {r: done[f"{pruning} / {r}"]["perplexity"] for r in RECOVERIES if RECOVERIES[r][2] and f"{pruning} / {r}" in done}
        if labels and distilled:
            best = min(distilled, key=distilled.get)
            verdict = "beats" if distilled[best] < labels else "does not beat"
            verdicts.append(f"- {pruning}: the best distillation ({best}, {distilled[best]:.2f}) {verdict} label-only LoRA ({labels:.2f}) at equal steps.")
            kd_alone_loses |= any(distilled[r] > labels for r in distilled if not RECOVERIES[r][2]["label_weight"])
    if verdicts:
        lines += ["", *verdicts]
    if kd_alone_loses:
        lines += ["", LOSING_KD.format(temperature=KD["temperature"], steps=settings["steps"])]
    if missing:
        lines += ["", "Not measured yet (a rerun resumes from `RECOVERY.json`): " + ", ".join(missing) + "."]
    keys = ["dense", *PRUNINGS, *(f"{p} / {r}" for p in PRUNINGS for r in RECOVERIES)]
    lines += ["", measured_with(done[key] for key in keys if key in done)]
    table = "\n".join(lines) + "\n"
    write_text_atomic(output, table)
    return table


if __name__ == "__main__":
    main()

"""MoE pruning on a tiny Mixtral trained on real text: expert pruning criteria vs random dropping,
dynamic expert skipping, and merging vs pruning at equal expert count.

No small real MoE checkpoint is installable, and a randomly initialised one routes arbitrarily,
so no criterion can beat another on it. This benchmark first trains a tiny ``MixtralForCausalLM``
(8 experts, top-2, with the router load-balancing loss) on the bundled Wikipedia calibration split
with a BPE tokenizer trained on the same text — a few minutes on CPU, cached — so that routing is
learned. Perplexity is measured on the disjoint evaluation split; calibration windows come from
the calibration split (seed 0).

    python benchmarks/moe.py            # writes benchmarks/MOE.md
    python benchmarks/moe.py --quick    # fewer training steps and evaluation tokens

Finished rows are cached in ``MOE.json`` (``MOE-quick.json``) beside the table with the trained model's
fingerprint; a rerun resumes, and measures again the rows of another trained model (a retrained cache
is another model: its training is not bit-reproducible across machines).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from datasets import Dataset
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from common import cached_training_seconds, measured, measured_with, quick_or_full, save_rows, save_training, table_header, training_cache
from optimum_prune import (
    ExpertDroppingCallback, ExpertDroppingSchedule, PruningConfig, evaluate_perplexity, fold_experts, get_adapter, prune, skip_experts,
)  # fmt: skip
from optimum_prune.calibration import calibration_windows, tokenize_stream
from optimum_prune.data import wikipedia_articles, wikipedia_text

MODEL = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256, output_router_logits=True,
    router_aux_loss_coef=0.02, tie_word_embeddings=True,
)  # fmt: skip
VOCAB, SEQ_LEN, BATCH = 4096, 128, 16


def train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    tokenizer.train_from_iterator(wikipedia_articles("calibration"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def trained_model(steps: int) -> tuple[MixtralForCausalLM, PreTrainedTokenizerFast, float, str]:
    """The tiny Mixtral after ``steps`` AdamW steps (cached by configuration); returns training seconds and
    the fingerprint of the cached weights."""
    directory = training_cache("tiny-mixtral-wiki", [MODEL, VOCAB, SEQ_LEN, BATCH, steps])
    if cached_training_seconds(directory) is None:
        train(directory, steps)
    model = MixtralForCausalLM.from_pretrained(directory).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(directory), cached_training_seconds(directory), weights_fingerprint(directory)


def weights_fingerprint(directory: Path) -> str:
    """SHA-256 (12 hex digits) of the saved weights, which cached rows must share to be reused."""
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:12]


def train(directory: Path, steps: int) -> None:
    """Train the tiny Mixtral and its tokenizer from scratch and cache both in ``directory``."""
    tokenizer = train_tokenizer()
    tokens = tokenize_stream(tokenizer, [wikipedia_text("calibration")])
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), **MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, tokens.numel() - SEQ_LEN, (BATCH,), generator=generator)
        batch = torch.stack([tokens[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # includes the router load-balancing loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % max(1, steps // 10) == 0:
            print(f"training step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    save_training(directory, steps, time.perf_counter() - started, model.eval(), tokenizer)


def fine_tune(model: MixtralForCausalLM, windows: torch.Tensor, steps: int, callbacks: list) -> None:
    """``steps`` AdamW steps of batch ``BATCH`` on ``windows`` through ``transformers.Trainer``."""
    data = Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
    with tempfile.TemporaryDirectory() as directory:
        args = TrainingArguments(
            output_dir=directory, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3, lr_scheduler_type="cosine",
            warmup_ratio=0.1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True, logging_steps=steps,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    model.eval()


def random_dropping(model: MixtralForCausalLM, keep: int, seed: int) -> None:
    adapter, generator = get_adapter(model), random.Random(seed)
    for layer in adapter.decoder_layers():
        adapter.keep_experts(layer, sorted(generator.sample(range(len(adapter.experts(layer))), keep)))


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "MOE", "300 training steps, 16,384 evaluation tokens")
    steps, eval_tokens = (300, 16384) if quick else (1500, 65536)
    cache = output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}

    dense, tokenizer, train_seconds, fingerprint = trained_model(steps)
    windows = calibration_windows(None, tokenizer, 64, SEQ_LEN, seed=0)

    def perplexity(model) -> float:
        return evaluate_perplexity(model, tokenizer, seq_len=SEQ_LEN, max_tokens=eval_tokens)

    rows: list[tuple[str, str, float, str]] = []
    keys: list[str] = []

    def row(name: str, experts_kept: str, measure: Callable[[], tuple[float, str]]) -> None:
        """Measure a row (perplexity, note) unless the cache holds it for this trained model; finished rows
        are saved at once."""
        key = f"{name} / {experts_kept}"
        if done.get(key, {}).get("model") != fingerprint:
            ppl, note = measure()
            done[key] = measured({"perplexity": ppl, "note": note, "model": fingerprint})
            save_rows(cache, done)
        rows.append((name, experts_kept, done[key]["perplexity"], done[key]["note"]))
        keys.append(key)
        print(rows[-1], flush=True)

    experts = MODEL["num_local_experts"]
    row("dense", f"{experts} of {experts}", lambda: (perplexity(dense), ""))
    for keep in (experts * 3 // 4, experts // 2):
        kept = f"{keep} of {experts}"
        for criterion in ("reconstruction", "frequency", "reap"):
            def pruned(criterion: str = criterion, keep: int = keep) -> tuple[float, str]:
                model = copy.deepcopy(dense)
                report = prune(model, PruningConfig(method="experts", method_options={"criterion": criterion, "num_experts": keep}), calibration=windows)
                return perplexity(model), f"pruned in {report.seconds:.1f} s"

            row(f"prune: {criterion}", kept, pruned)

        def dropped_at_random(keep: int = keep) -> tuple[float, str]:
            values = []
            for seed in range(3):
                model = copy.deepcopy(dense)
                random_dropping(model, keep, seed)
                values.append(perplexity(model))
            return sum(values) / 3, f"range {min(values):.2f}–{max(values):.2f}"

        row("prune: random (mean of 3 seeds)", kept, dropped_at_random)
        for align in (False, True):
            def merged(align: bool = align, keep: int = keep) -> tuple[float, str]:
                model = copy.deepcopy(dense)
                prune(model, PruningConfig(method="merge_experts", method_options={"num_experts": keep, "align": align}), calibration=windows)
                return perplexity(model), ""

            row(f"merge (MC-SMoE){' + neuron alignment' if align else ''}", kept, merged)
    # Task-specific expert dropping (issue 12, item 2): fine-tuning that drops the least-routed experts
    # down to `keep` by half-way, against pruning to `keep` by routing frequency first and then the same
    # fine-tuning. The "task" is the same Wikipedia language modelling (no downstream task is bundled).
    tuning_steps = 40 if quick else 200
    tuning = calibration_windows(None, tokenizer, BATCH * tuning_steps, SEQ_LEN, seed=2)
    for keep in (experts // 2, experts // 4):
        def dropping(keep: int = keep) -> tuple[float, str]:
            model = copy.deepcopy(dense)
            schedule = ExpertDroppingSchedule(final_experts=keep, end_step=tuning_steps // 2, every=max(1, tuning_steps // 20))
            fine_tune(model, tuning, tuning_steps, [ExpertDroppingCallback(schedule)])
            return perplexity(model), f"{tuning_steps} steps, dropped by step {tuning_steps // 2}"

        def pruned_then_tuned(keep: int = keep) -> tuple[float, str]:
            model = copy.deepcopy(dense)
            prune(model, PruningConfig(method="experts", method_options={"criterion": "frequency", "num_experts": keep}), calibration=windows)
            fine_tune(model, tuning, tuning_steps, [])
            return perplexity(model), f"{tuning_steps} steps"

        row("fine-tune dropping experts (Chen et al.)", f"{keep} of {experts}", dropping)
        row("prune: frequency, then fine-tune", f"{keep} of {experts}", pruned_then_tuned)

    def tuned() -> tuple[float, str]:
        model = copy.deepcopy(dense)
        fine_tune(model, tuning, tuning_steps, [])
        return perplexity(model), f"{tuning_steps} steps"

    row("fine-tune, no dropping (control)", f"{experts} of {experts}", tuned)
    for expert_sparsity in ("uniform", "load"):  # router hints for dense pruning (issue 12, item 4)
        def hinted(expert_sparsity: str = expert_sparsity) -> tuple[float, str]:
            model = copy.deepcopy(dense)
            options = {"expert_sparsity": "load", "expert_deviation": 0.2} if expert_sparsity == "load" else {}
            prune(model, PruningConfig(method="wanda", sparsity=0.6, moe_options=options), calibration=windows)
            return perplexity(model), "experts 0.4–0.8 by routed-token rank" if expert_sparsity == "load" else ""

        row(f"wanda 60 %, {expert_sparsity} expert sparsity", f"{experts} of {experts}", hinted)
    dense_parameters = sum(p.numel() for p in dense.parameters())
    for bond in (0, 16):  # MPOE (issue 12, item 3): one shared central tensor per layer; 0 = untruncated bonds
        label = "untruncated" if bond == 0 else f"central bonds ≤ {bond}"
        decomposed: dict[str, torch.nn.Module] = {}

        def decomposition(bond: int = bond) -> tuple[float, str]:
            model = decomposed["model"] = copy.deepcopy(dense)
            report = prune(model, PruningConfig(method="mpoe", sparsity=0.0, method_options={"bond_dimension": bond}))
            share = sum(p.numel() for p in model.parameters()) / dense_parameters
            errors = report.layer_scores["relative expert weight error (mean over linears)"]
            return perplexity(model), f"{share:.1%} of the parameters; expert weights {sum(errors) / len(errors):.1%} off"

        def decomposition_tuned(bond: int = bond) -> tuple[float, str]:
            if "model" not in decomposed:  # the decomposition's row came from the cache
                decomposition(bond)
            fine_tune(decomposed["model"], tuning, tuning_steps, [])  # MPOE trains its tensors after the decomposition
            return perplexity(decomposed["model"]), f"{tuning_steps} steps"

        row(f"MPOE ({label})", f"{experts} of {experts}", decomposition)
        row(f"MPOE ({label}), then fine-tune", f"{experts} of {experts}", decomposition_tuned)
    for level in ("token", "sequence"):  # MEO (issue 12, item 1): merged experts against the exact mixture
        def folded(level: str = level) -> tuple[float, str]:
            folding = fold_experts(dense, level, measure_error=True)
            ppl, note = perplexity(dense), f"expert outputs {folding.relative_error:.1%} off the exact mixture"
            folding.remove()
            return ppl, note

        row(f"MEO fold: {level}", f"{experts} of {experts}", folded)
    for beta in (0.1, 0.2, 0.3, 0.5, 0.7):
        def skipped(beta: float = beta) -> tuple[float, str]:
            skipping = skip_experts(dense, beta)
            ppl, note = perplexity(dense), f"{skipping.skip_rate:.1%} of expert calls skipped"
            skipping.remove()
            return ppl, note

        row(f"skip: beta={beta}", f"{experts} of {experts}", skipped)

    def skipped_at_medians() -> tuple[float, str]:
        skipping = skip_experts(dense, calibration=windows)  # Lu et al.: each layer's median w1 / w0 on calibration
        ppl, note = perplexity(dense), f"{skipping.skip_rate:.1%} of expert calls skipped; beta {min(skipping.betas):.2f}–{max(skipping.betas):.2f}"
        skipping.remove()
        return ppl, note

    row("skip: beta per layer = median w1 / w0", f"{experts} of {experts}", skipped_at_medians)

    command = "python benchmarks/moe.py" + (" --quick" if quick else "")
    lines = [
        *table_header(
            "MoE pruning: tiny Mixtral trained on Wikipedia (fp32, CPU)",
            command,
            f"Model: MixtralForCausalLM, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
            f"{experts} experts (intermediate {MODEL['intermediate_size']}), top-{MODEL['num_experts_per_tok']}, BPE vocabulary "
            f"{VOCAB} trained on the calibration split; trained {steps} steps × {BATCH} × {SEQ_LEN} tokens with the router "
            f"load-balancing loss ({train_seconds:.0f} s, cached; weights {fingerprint}). Calibration: 64 × {SEQ_LEN} tokens (seed 0) from the "
            f"calibration split. Perplexity: first {eval_tokens:,} tokens of the evaluation split in {SEQ_LEN}-token windows. "
            f"Fine-tuning rows: {tuning_steps} steps × {BATCH} × {SEQ_LEN} tokens of the calibration split (seed 2) through "
            "`transformers.Trainer`, AdamW lr 1e-3 cosine, with the load-balancing loss.",
        ),
        "| row | experts per layer | perplexity | note |",
        "|---|---|---|---|",
        *[f"| {name} | {experts_kept} | {ppl:.2f} | {note} |" for name, experts_kept, ppl, note in rows],
        "",
        measured_with(done[key] for key in keys),
    ]
    output.write_text("\n".join(lines) + "\n")  # kept even when a row failed, to see which
    print("\n".join(lines))
    if any(math.isnan(r[2]) for r in rows):
        raise SystemExit("a perplexity is NaN")


if __name__ == "__main__":
    main()

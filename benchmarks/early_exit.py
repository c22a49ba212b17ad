"""Self-speculative decoding with an early exit (LayerSkip-style) on SmolLM2-135M: for several exit
layers k, the measured agreement, tokens per full-model pass and tokens/s of ``generate`` with the
exit and draft length ``choose_early_exit`` picks (``enable_early_exit`` + ``early_exit_kwargs``)
against plain ``generate``, timed side by side in one run, with a check that the greedy output is
the full model's; once with transformers' default draft length instead; then the effect of
recovering the exit path (self-distillation of layer k's logits, ``DistillationConfig(exit_weight=1)``)
against the same training without the exit term, and early exit on top of a Wanda 2:4 model.

    python benchmarks/early_exit.py            # full protocol, writes benchmarks/EARLY_EXIT.md
    python benchmarks/early_exit.py --quick    # fewer prompts, tokens and training steps
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments

from common import measured, measured_with, quick_or_full, save_rows, table_header
from optimum_prune import (
    DistillationConfig, DistillationTrainer, PruningConfig, choose_early_exit, early_exit_kwargs, enable_early_exit, evaluate_perplexity,
    load_default_model, prune,
)  # fmt: skip
from optimum_prune.adapters import get_adapter
from optimum_prune.calibration import calibration_windows, sample_windows, tokenize_stream
from optimum_prune.data import wikipedia_text

EXITS = (6, 12, 18, 24)  # of 30 decoder layers
RECOVERED_EXIT = 12
TRANSFORMERS_DRAFT = 20  # transformers' default num_assistant_tokens (its drafts also stop below 0.4 confidence)
AGREEMENT_SPLIT = "evaluation"
"""Where agreement is measured, recorded with each row: recovery trains on the calibration split, so
agreement there would score the recovered rows partly on their training text. Rows cached without it
(agreement on calibration windows) are measured again."""


def settings(quick: bool) -> dict:
    if quick:
        return {"prompts": 2, "prompt_len": 32, "new_tokens": 16, "steps": 4, "eval_tokens": 4096, "agreement": (4, 128)}
    return {"prompts": 8, "prompt_len": 64, "new_tokens": 64, "steps": 60, "eval_tokens": 16384, "agreement": (8, 512)}


class PassCounter:
    """Counts forward calls of the first and last decoder layers: every pass runs the first, only
    full-model passes (plain steps and verifications) run the last."""

    def __init__(self, model: torch.nn.Module) -> None:
        layers = get_adapter(model).decoder_layers()
        self.first = self.last = 0
        self.hooks = [layers[0].register_forward_hook(self._count_first), layers[-1].register_forward_hook(self._count_last)]

    def _count_first(self, *_: object) -> None:
        self.first += 1

    def _count_last(self, *_: object) -> None:
        self.last += 1

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def measure_decoding(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, drafts: dict[str, tuple[int, int]]) -> dict:
    """Greedy generation of every prompt, plainly and with each (exit layer, draft length) of ``drafts``,
    alternating per prompt after one untimed call of each."""
    modes = {"plain": None, **drafts}
    seconds = dict.fromkeys(modes, 0.0)
    tokens, full_passes, draft_passes = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0), dict.fromkeys(modes, 0)
    identical = dict.fromkeys(modes, True)

    def generate(ids: torch.Tensor, mode: str, max_new_tokens: int) -> torch.Tensor:
        kwargs = {}
        if modes[mode] is not None:
            enable_early_exit(model, *modes[mode])
            kwargs = early_exit_kwargs(model)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, **kwargs)

    for mode in modes:
        generate(prompts[0][None], mode, 4)
    for prompt in prompts:
        ids = prompt[None]
        reference = None
        for mode in modes:
            counter = PassCounter(model)
            started = time.perf_counter()
            output = generate(ids, mode, new_tokens)
            seconds[mode] += time.perf_counter() - started
            counter.remove()
            tokens[mode] += output.shape[1] - ids.shape[1]
            full_passes[mode] += counter.last
            draft_passes[mode] += counter.first - counter.last
            reference = output if reference is None else reference
            identical[mode] &= torch.equal(output, reference)
    return {
        mode: {
            "draft_length": modes[mode][1] if modes[mode] else None,
            "generated": tokens[mode],
            "tokens_per_second": tokens[mode] / seconds[mode],
            "tokens_per_full_pass": tokens[mode] / full_passes[mode],
            "draft_passes": draft_passes[mode],
            "identical": identical[mode],
            "speedup": seconds["plain"] / seconds[mode],
        }
        for mode in modes
    }


def recover(
    model: torch.nn.Module, windows: torch.Tensor, steps: int, exit_weight: float, learning_rate: float = 5e-5, layer_dropout: float = 0.0
) -> None:
    """Full fine-tuning on the calibration split: label loss, plus the exit term when ``exit_weight``
    (and LayerSkip's layer dropout with ``layer_dropout``)."""
    data = Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
    config = DistillationConfig(
        kd_weight=0.0, label_weight=1.0, exit_weight=exit_weight, exit_layer=RECOVERED_EXIT if exit_weight else None,
        layer_dropout=layer_dropout,
    )
    with tempfile.TemporaryDirectory() as directory:
        args = TrainingArguments(
            output_dir=directory, max_steps=steps, per_device_train_batch_size=4, learning_rate=learning_rate, lr_scheduler_type="cosine",
            warmup_ratio=0.1, logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], seed=0, use_cpu=True,
        )  # fmt: skip
        DistillationTrainer(model=model, distillation=config, args=args, train_dataset=data).train()
    model.eval()


def measure_model(
    model: torch.nn.Module,
    tokenizer,
    prompts: torch.Tensor,
    agreement_windows: torch.Tensor,
    setup: dict,
    exits: tuple[int, ...],
    transformers_draft: bool = False,
) -> dict:
    """Each exit at the draft length ``choose_early_exit`` picks from its agreement on ``agreement_windows``
    (and, with ``transformers_draft``, the middle exit at transformers' default draft length too)."""
    report = choose_early_exit(model, calibration=agreement_windows, tokenizer=tokenizer, candidates=list(exits))
    chosen = {f"exit {c.layer}, γ = {c.draft_length}": c for c in report.candidates}
    drafts = {mode: (c.layer, c.draft_length) for mode, c in chosen.items()}
    if transformers_draft:
        drafts[f"exit {RECOVERED_EXIT}, transformers' γ ≤ {TRANSFORMERS_DRAFT}"] = (RECOVERED_EXIT, TRANSFORMERS_DRAFT)
    decoding = measure_decoding(model, prompts, setup["new_tokens"], drafts)
    for mode, candidate in chosen.items():
        decoding[mode].update(agreement=candidate.agreement, draft_cost=candidate.draft_cost, expected_speedup=candidate.expected_speedup)
    return {
        "perplexity": evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=setup["eval_tokens"]),
        "decoding": decoding,
        "agreement_split": AGREEMENT_SPLIT,
    }


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "EARLY_EXIT", "2 prompts, 16 new tokens, 4 training steps")
    setup = settings(quick)
    torch.manual_seed(0)
    cache = output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    _, tokenizer = load_default_model()
    evaluation = tokenize_stream(tokenizer, [wikipedia_text("evaluation")])
    prompts = sample_windows(evaluation, setup["prompts"], setup["prompt_len"], seed=1)
    agreement_windows = sample_windows(evaluation, *setup["agreement"], seed=0)
    training_windows = calibration_windows(None, tokenizer, 4 * setup["steps"], 256, seed=0)
    variants = {  # name: (sparsity, recovery recipe)
        "dense": (None, None),
        "recovered exit 12 (exit term)": (None, {"exit_weight": 1.0}),
        "control: same training, labels only": (None, {"exit_weight": 0.0}),
        "Wanda 2:4": ("2:4", None),
        "recovered exit 12 (exit term, lr 3e-4, layer dropout 0.2)": (None, {"exit_weight": 1.0, "learning_rate": 3e-4, "layer_dropout": 0.2}),
    }
    for name, (sparsity, recipe) in variants.items():
        if done.get(name, {}).get("agreement_split") == AGREEMENT_SPLIT:
            continue
        model, _ = load_default_model()
        if sparsity is not None:
            prune(model, PruningConfig(method="wanda", sparsity=sparsity, num_calibration_samples=32, calibration_seq_len=512), tokenizer=tokenizer)
        if recipe is not None:
            recover(model, training_windows, setup["steps"], **recipe)
        exits = (RECOVERED_EXIT,) if recipe is not None else EXITS
        row = measure_model(model, tokenizer, prompts, agreement_windows, setup, exits, transformers_draft=name == "dense")
        done[name] = measured(row)
        save_rows(cache, done)
        print(name, json.dumps(done[name]), flush=True)
    write_table(done, setup, output, "python benchmarks/early_exit.py" + (" --quick" if quick else ""))


def write_table(done: dict, setup: dict, output: Path, command: str) -> None:
    samples, seq_len = setup["agreement"]
    lines = [
        *table_header(
            "Early exit (self-speculative decoding): SmolLM2-135M-Instruct (fp32, CPU)",
            command,
            f"Decoding: {setup['prompts']} prompts of {setup['prompt_len']} tokens from the Wikipedia evaluation split, "
            f"greedy, up to {setup['new_tokens']} new tokens each, batch 1, KV cache; transformers' "
            "`generate(assistant_early_exit=k)` (drafts with the first k of 30 layers, verifies with all) at the draft "
            "length γ `choose_early_exit` picks, set with `enable_early_exit` (transformers also ends a draft early "
            f"when its token's probability is below 0.4), and on the dense model once at transformers' default γ ≤ "
            f"{TRANSFORMERS_DRAFT}; against plain `generate`, alternating per prompt in one process after one untimed call "
            "of each. Agreement: teacher-forced share of "
            f"positions where layer k's greedy token is the full model's, on {samples} × {seq_len} tokens (seed 0) given to "
            "`choose_early_exit` as its calibration. Agreement is measured on the evaluation split, not on the calibration "
            "split the recovery trains on. Draft cost: bytes of weights a draft step reads (first k layers and the LM head) "
            "relative to a full step; expected speed-up: the Leviathan et al. estimate from both. Draft passes per token: "
            "forward passes that stop at layer k ÷ generated tokens; tokens per full pass: generated "
            "tokens ÷ forward passes that reach the last layer. Recovery: full fine-tuning on the calibration split, "
            f"{setup['steps']} steps × 4 × 256 tokens, lr 5e-5 cosine, label loss + the exit term "
            f"(`DistillationConfig(exit_weight=1, exit_layer={RECOVERED_EXIT})`) vs the label loss alone, and the exit term at "
            "lr 3e-4 with LayerSkip's layer dropout (`layer_dropout=0.2`). Perplexity: first "
            f"{setup['eval_tokens']:,} tokens of the evaluation split (full model). Wanda 2:4: calibration 32 × 512.",
        ),
        "| model | perplexity | decoding | agreement | draft cost | expected × | draft passes per token | tokens per full pass | tokens/s "
        "| measured × vs plain | greedy output identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in done.items():
        for mode, result in row["decoding"].items():
            agreement = f"{result['agreement']:.1%}" if "agreement" in result else ""
            cost = f"{result['draft_cost']:.2f}" if "draft_cost" in result else ""
            expected = f"{result['expected_speedup']:.2f}" if "expected_speedup" in result else ""
            first = mode == "plain"
            lines.append(
                f"| {name if first else ''} | {format(row['perplexity'], '.2f') if first else ''} | {mode} | {agreement} | {cost} | "
                f"{expected} | {result['draft_passes'] / result['generated']:.2f} | {result['tokens_per_full_pass']:.2f} | "
                f"{result['tokens_per_second']:.1f} | {result['speedup']:.2f} | "
                f"{'yes' if result['identical'] else '**no**'} |"
            )
    lines += ["", measured_with(done.values())]
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(result["identical"] for row in done.values() for result in row["decoding"].values()):
        raise SystemExit("an early-exit generation differed from the full model's greedy output")


if __name__ == "__main__":
    main()

"""GPTQ against round-to-nearest on SmolLM2-135M, linear by linear and for the whole model.

PRUNE_QUANT.md measured GPTQ int4 worse than round-to-nearest on GPTQ's own grid. This asks where:
does GPTQ's error compensation (through ``compress``, the product's path) lower each linear's
output error on held-out text, and does that carry over to perplexity? Rows: round-to-nearest on
GPTQ's symmetric group-64 grid, and GPTQ at three dampings (optimum's default 0.1, the GPTQ
paper's 0.01, and 0.5, closer to round-to-nearest). A linear's output error is
‖X(Ŵ − W)ᵀ‖² / ‖XWᵀ‖², X the dense model's inputs to it on held-out tokens (the evaluation
split's first windows), the same X for every row. Finished rows are cached; a rerun resumes.

    python benchmarks/gptq_layers.py            # 32 × 512 calibration, 65,536 evaluation tokens
    python benchmarks/gptq_layers.py --quick    # 8 × 128 calibration, 4,096 evaluation tokens
"""

from __future__ import annotations

import json
import statistics
from functools import cache

import torch
from transformers import GPTQConfig

from common import measured, measured_with, quick_or_full, save_rows, table_header
from optimum_prune import compress, evaluate_perplexity, load_default_model
from optimum_prune.calibration import calibration_windows
from optimum_prune.calibration.sources import tokenize_stream
from optimum_prune.data import wikipedia_text
from optimum_prune.masks import prunable_linears
from optimum_prune.atomic_files import write_text_atomic
from prune_quant import dequantize_gptq_layers, round_to_nearest

RTN = "round-to-nearest, GPTQ's grid"
ROWS = {RTN: None, "GPTQ, damping 0.1 (optimum's default)": 0.1, "GPTQ, damping 0.01": 0.01, "GPTQ, damping 0.5": 0.5}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@cache
def held_out_grams(windows: int) -> dict[str, torch.Tensor]:
    """Per decoder linear, XᵀX of the dense model's inputs to it on ``windows`` × 512 evaluation tokens."""
    model, tokenizer = load_default_model()
    ids = tokenize_stream(tokenizer, [wikipedia_text("evaluation")])[: windows * 512].reshape(windows, 512)
    linears = prunable_linears(model)
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def accumulate(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name].add_(x.T @ x)

        return hook

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
    with torch.no_grad():
        for window in ids:
            model(input_ids=window[None])
    for handle in handles:
        handle.remove()
    return grams


def measure(damping: float | None, calibration: tuple[int, int], eval_tokens: int, held_out_windows: int) -> dict:
    model, tokenizer = load_default_model()
    dense = {name: m.weight.detach().double().clone() for name, m in prunable_linears(model).items()}
    if damping is None:
        round_to_nearest(model, symmetric=True)
    else:
        windows = calibration_windows(None, tokenizer, *calibration, seed=0)
        compress(model, [GPTQConfig(bits=4, group_size=64, damp_percent=damping)], calibration=windows, tokenizer=tokenizer)
        dequantize_gptq_layers(model)
    grams = held_out_grams(held_out_windows)
    errors = {}
    for name, linear in prunable_linears(model).items():
        W, gram = dense[name], grams[name]
        delta = linear.weight.detach().double() - W
        errors[name] = float(torch.trace(delta @ gram @ delta.T) / torch.trace(W @ gram @ W.T))
    return {"perplexity": evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=eval_tokens), "errors": errors}


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "GPTQ_LAYERS", "8×128 calibration, 4,096 eval tokens, 2 held-out windows")
    calibration, eval_tokens, held_out = ((8, 128), 4096, 2) if quick else ((32, 512), 65536, 8)
    cache_file = output.with_suffix(".json")
    done = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for row, damping in ROWS.items():
        if row not in done:
            done[row] = measured(measure(damping, calibration, eval_tokens, held_out))
            save_rows(cache_file, done)
        print(row, done[row]["perplexity"], flush=True)
        write_table(done, quick, calibration, eval_tokens, held_out, output)


def write_table(done: dict, quick: bool, calibration: tuple[int, int], eval_tokens: int, held_out: int, output) -> None:
    reference = done.get(RTN)
    lines = [
        *table_header(
            "GPTQ against round-to-nearest, linear by linear: SmolLM2-135M-Instruct (CPU)",
            "python benchmarks/gptq_layers.py" + (" --quick" if quick else ""),
            f"Protocol: int4, groups of 64, symmetric (GPTQ's grid). GPTQ through `compress` with `GPTQConfig(bits=4, "
            f"group_size=64, damp_percent=…)` (optimum + gptqmodel on CPU), calibrated on {calibration[0]} × {calibration[1]} "
            f"tokens (seed 0), evaluated on its dequantized weights. Output error of a linear: ‖X(Ŵ − W)ᵀ‖² / ‖XWᵀ‖², X the "
            f"dense model's inputs to it on the evaluation split's first {held_out} × 512 tokens (held out from calibration). "
            f"Perplexity: first {eval_tokens:,} evaluation tokens in 512-token windows.",
        ),
        "| recipe | perplexity | linears with a lower output error than round-to-nearest | median error ÷ round-to-nearest's | "
        + " | ".join(KINDS) + " |",
        "|---|---|---|---|" + "---|" * len(KINDS),
    ]
    for row in ROWS:
        if row not in done:
            continue
        r = done[row]
        if reference is None or row == RTN:
            lines.append("| " + " | ".join([row, f"{r['perplexity']:.2f}", *[""] * (2 + len(KINDS))]) + " |")
            continue
        ratios = {name: error / reference["errors"][name] for name, error in r["errors"].items()}
        lower = sum(ratio < 1 for ratio in ratios.values())
        per_kind = [statistics.median(v for name, v in ratios.items() if name.endswith(kind)) for kind in KINDS]
        lines.append(
            f"| {row} | {r['perplexity']:.2f} | {lower} of {len(ratios)} | {statistics.median(ratios.values()):.2f} | "
            + " | ".join(f"{v:.2f}" for v in per_kind) + " |"
        )
    unfinished = [row for row in ROWS if row not in done]
    if unfinished:
        lines += ["", f"Not measured yet (the next run resumes): {', '.join(unfinished)}."]
    lines += ["", measured_with(done[row] for row in ROWS if row in done), *notes(done)]
    write_text_atomic(output, "\n".join(lines) + "\n")


def notes(done: dict) -> list[str]:
    """What the rows show, worded from the measured values."""
    if any(row not in done for row in ROWS):
        return []
    reference = done[RTN]
    gptq = {row: r for row, r in done.items() if row != RTN}
    lowered = all(
        statistics.median(r["errors"][name] / reference["errors"][name] for name in r["errors"]) < 1 for r in gptq.values()
    )
    better = [row for row, r in gptq.items() if r["perplexity"] < reference["perplexity"]]
    by_damping = sorted(gptq.items(), key=lambda item: ROWS[item[0]])
    return [
        "",
        "Notes:",
        f"- GPTQ {'lowers' if lowered else 'does not lower'} the typical linear's held-out output error against round-to-nearest "
        f"at every damping; its perplexity is {'lower at damping ' + ', '.join(str(ROWS[row]) for row in better) if better else 'higher at every damping'} "
        f"(round-to-nearest {reference['perplexity']:.2f}; dampings "
        + ", ".join(f"{ROWS[row]}: {r['perplexity']:.2f}" for row, r in by_damping)
        + "). Each linear's error is measured on the dense model's inputs; the whole model's perplexity adds how the errors "
        "interact through the layers.",
    ]


if __name__ == "__main__":
    main()

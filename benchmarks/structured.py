"""Structured pruning of SmolLM2-135M (fp32): width, depth and sublayer pruning side by side.

Protocol (the core issue's): calibration = 32 windows × 512 tokens (seed 0) from the bundled
Wikipedia calibration split; perplexity over the first 65,536 tokens of the evaluation split in
512-token windows. Each row loads the dense checkpoint, prunes it while keeping a dense copy,
and times forward passes of one 512-token window on the two models alternately in the same
process, so the latency ratio is measured side by side; run it on an otherwise idle machine.
Finished rows are cached with the pruned model's config (per-layer shapes included); a rerun
resumes, and ``--retime`` re-measures every latency on models rebuilt from those shapes with
random weights (a structured model's forward time depends on its shapes only), so a whole table
retimes in minutes on a quiet machine.

    python benchmarks/structured.py             # full protocol, writes benchmarks/STRUCTURED.md
    python benchmarks/structured.py --quick     # 8×128 calibration, 4,096 eval tokens
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common import measured, measured_with, save_rows, table_header
from optimum_prune import PruningConfig, evaluate_perplexity, load_default_model, prune
from optimum_prune.adapters import get_adapter
from optimum_prune.structure.loading import StructureConfig

LAYERS = 30  # SmolLM2-135M
Row = tuple[str, float, dict]
ROWS: list[Row] = [
    *[("width", ratio, {"criterion": c}) for c in ("magnitude_l1", "magnitude_l2", "random", "taylor", "wanda_sp", "flap") for ratio in (0.1, 0.2, 0.3)],
    *[("width", 0.2, {"criterion": c, "ranking": "global"}) for c in ("wanda_sp", "flap")],
    ("width", 0.2, {"criterion": "flap", "head_mode": "kv_group"}),
    *[("slicegpt", ratio, {}) for ratio in (0.1, 0.2, 0.3)],
    *[("layers", n / LAYERS, {"criterion": c, "num_layers": n}) for c in ("block_influence", "angular", "perplexity", "taylor") for n in (4, 8)],
    *[("sublayers", n / LAYERS, {"criterion": "block_influence"}) for n in (4, 8)],
    # Residual re-routing (issue 11, item 10) against the plain removals above, same budgets.
    *[("layers", n / LAYERS, {"criterion": "block_influence", "num_layers": n, "reroute": True}) for n in (4, 8)],
    *[("sublayers", n / LAYERS, {"criterion": "block_influence", "reroute": True}) for n in (4, 8)],
    # Low-rank factorisation (issue 11, item 5): FWSVD against plain SVD, beside width at 20 %.
    *[("low_rank", 0.2, {"weighting": w}) for w in ("fisher", "none")],
    # Kwon et al.'s mask search (issue 11, item 6), with and without least-squares mask tuning.
    *[("mask_search", ratio, {}) for ratio in (0.1, 0.2, 0.3)],
    ("mask_search", 0.2, {"tune": False}),
    # KCM (issue 11, item 7): gradient-free R2D2 ranking with the same search and mask tuning.
    *[("kcm", ratio, {}) for ratio in (0.1, 0.2, 0.3)],
    # ZipLM (issue 11, item 3) at the same parameter budget, and at its own target: 20 % / 30 % of the
    # decoder layers' time measured on this CPU at 512 tokens (speed-ups 1.25× / 1.43× predicted).
    ("ziplm", 0.2, {"target": "parameters"}),
    *[("ziplm", ratio, {"target": "latency"}) for ratio in (0.2, 0.3)],
    # LLM Surgeon's structured removal on coupled units (issue 11, item 2), five shots.
    ("llm_surgeon_structured", 0.2, {}),
    # K-prune (issue 11, item 8): one backward pass per sublayer from it to the top (the slowest row).
    ("kprune", 0.2, {}),
]
HERE = Path(__file__).resolve().parent


def row_key(row: Row | None) -> str:
    if row is None:
        return "dense"
    method, ratio, options = row
    return "/".join([method, f"{ratio:.4f}", *(f"{k}={v}" for k, v in options.items())])


def latency_ratio(pruned: torch.nn.Module, dense: torch.nn.Module, repeats: int) -> float:
    """Fastest pruned ÷ fastest dense forward time over one 512-token window.

    The two models are timed alternately, so load that comes and goes affects both alike, and
    the minimum (as ``timeit`` reports) is the run least disturbed by other work on the machine.
    """
    ids = torch.randint(0, dense.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    times: dict[int, list[float]] = {id(pruned): [], id(dense): []}
    with torch.no_grad():
        for model in (dense, pruned):
            model(ids, use_cache=False)  # warm-up
        for _ in range(repeats):
            for model in (dense, pruned):
                started = time.perf_counter()
                model(ids, use_cache=False)
                times[id(model)].append(time.perf_counter() - started)
    return min(times[id(pruned)]) / min(times[id(dense)])


def rebuilt(config: dict) -> torch.nn.Module:
    """A randomly initialised model of a pruned model's recorded config and per-layer shapes."""
    config = dict(config)
    structure = config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32).eval()
    if structure is not None:
        get_adapter(model).reshape(StructureConfig(**structure).shapes)
    return model


def retimed(result: dict, args: argparse.Namespace) -> dict:
    """``result`` with its latency measured again on a model rebuilt from its recorded config."""
    dense, _ = load_default_model()
    pruned = rebuilt(result["config"]) if result["row"] != "dense" else copy.deepcopy(dense)
    if sum(p.numel() for p in pruned.parameters()) != result["parameters"]:
        raise RuntimeError(f"{result['row']}: the rebuilt model's parameter count differs from the pruned one's")
    return {**result, "latency_ratio": latency_ratio(pruned, dense, args.repeats)}


def measure(row: Row | None, args: argparse.Namespace, perplexity: bool = True) -> dict:
    """Prune one row and time it against the dense model; ``perplexity=False`` skips the evaluation."""
    model, tokenizer = load_default_model()
    dense = copy.deepcopy(model)
    dense_parameters = sum(p.numel() for p in model.parameters())
    result = {"row": "dense", "removed": "", "prune_seconds": 0.0}
    if row is not None:
        method, ratio, options = row
        config = PruningConfig(
            method=method,
            sparsity=ratio,
            method_options=options,
            num_calibration_samples=args.calibration_samples,
            calibration_seq_len=args.calibration_seq_len,
        )
        report = prune(model, config, tokenizer=tokenizer)
        result.update(
            row=row_key(row), removed="; ".join(report.removed) if method != "width" else "", prune_seconds=report.seconds,
            notes=report.notes,  # e.g. ZipLM's predicted speed-up, to set beside the measured latency
        )
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["parameter_ratio"] = result["parameters"] / dense_parameters
    result["config"] = model.config.to_dict()
    result["latency_ratio"] = latency_ratio(model, dense, args.repeats)
    del dense
    if perplexity:
        result["perplexity"] = evaluate_perplexity(model, tokenizer, seq_len=512, max_tokens=args.eval_tokens)
    return result


def markdown(results: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        *table_header(
            "Structured pruning benchmark: SmolLM2-135M-Instruct (fp32, CPU)",
            command,
            f"Protocol: calibration {args.calibration_samples} × {args.calibration_seq_len} tokens (seed 0); perplexity over "
            f"the first {args.eval_tokens:,} tokens of the evaluation split in 512-token windows. `ratio` is the requested "
            "fraction of decoder-layer linear parameters (for slicegpt: of the hidden dimension); `parameters` counts the whole model (tied embeddings once). "
            f"Latency: fastest of {args.repeats} forward passes of one 512-token window, pruned ÷ dense, timed alternately in the same process.",
        ),
        "| row | parameters | of dense | latency vs dense | perplexity | pruning time (s) | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['parameters']:,} | {r['parameter_ratio']:.1%} | {r['latency_ratio']:.2f} | "
            f"{r['perplexity']:.2f} | {r['prune_seconds']:.1f} | {r['removed']} |"
        )
    lines += ["", measured_with(results)]
    noted = [r for r in results if r.get("notes")]
    if noted:
        lines += ["", "What the methods reported besides sizes (the rows that record it):", ""]
        lines += [f"- `{r['row']}`: " + " ".join(note.rstrip(".") + "." for note in r["notes"]) for r in noted]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8×128 calibration and 4,096 eval tokens")
    parser.add_argument("--only", help="measure (or retime) only rows whose key contains this text; the table keeps every finished row")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    parser.add_argument("--output", type=Path, help="markdown table (default: benchmarks/STRUCTURED.md or STRUCTURED-quick.md)")
    parser.add_argument("--cache", type=Path, help="JSON file of finished rows (default: beside the output)")
    parser.add_argument(
        "--retime", action="store_true",
        help="measure the latency of the finished rows again on models rebuilt from their recorded shapes "
        "(rows cached before shapes were recorded are pruned again) and list the unfinished ones; run it on an otherwise idle machine",
    )
    args = parser.parse_args()
    args.calibration_samples, args.calibration_seq_len, args.eval_tokens = (8, 128, 4096) if args.quick else (32, 512, 65536)
    output = args.output or HERE / ("STRUCTURED-quick.md" if args.quick else "STRUCTURED.md")
    cache = args.cache or output.with_suffix(".json")
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    command = "python benchmarks/structured.py" + (" --quick" if args.quick else "")

    results, pending = [], []
    for row in [None, *ROWS]:
        key = row_key(row)
        selected = not args.only or (row is not None and args.only in key)
        if key not in done and (args.retime or not (selected or row is None)):  # dense is measured whenever missing
            pending.append(key)
            continue
        if key not in done:
            done[key] = measured(measure(row, args))
            save_rows(cache, done)
        elif args.retime and selected:
            done[key] = retimed(done[key], args) if "config" in done[key] else {**done[key], **measure(row, args, perplexity=False)}
            save_rows(cache, done)
        results.append(done[key])
        r = done[key]
        print(f"{key:<48} ppl {r['perplexity']:>9.2f}  params {r['parameter_ratio']:.1%}  latency {r['latency_ratio']:.2f}", flush=True)
    table = markdown(results, args, command)
    if pending:
        table += "\nNot measured yet (a run without `--retime` or `--only` adds them): " + ", ".join(f"`{key}`" for key in pending) + ".\n"
    output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()

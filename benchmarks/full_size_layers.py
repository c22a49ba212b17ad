"""Pruning time per layer and peak memory on full-size layer shapes (random weights), projected to
whole models: Llama-3-70B-shaped decoder layers (issue 13) and Mixtral-8x7B-shaped MoE layers
(issue 7), on a GPU or on the CPU.

Each row prunes two models of the real layer shape with a small vocabulary (the embeddings are
not pruned and do not change the per-layer time), one with 1 and one with 3 decoder layers, held
on the CPU in bf16 while ``prune(..., device=...)`` brings one layer at a time to the compute
device, as a 70B model is pruned, after an untimed prune of a tiny model of the same kind (first-use
costs). Per-layer time = (t₃ − t₁) / 2, the rest (capturing the first layer's inputs) is fixed;
projected whole-model time = fixed + depth × per layer (80 layers for Llama-3-70B, 32 for
Mixtral-8x7B). Peak memory of the 3-layer run: on a GPU the CUDA allocator's peak (with
``activation_device="cpu"`` the calibration activations wait on the host); on the CPU the
process's peak resident memory during ``prune`` (the model's weights included). Calibration:
128 windows × 2048 random tokens (the Wanda / SparseGPT papers' count).

    python benchmarks/full_size_layers.py                 # GPU: writes benchmarks/GPU_LAYERS.md
    python benchmarks/full_size_layers.py --device cpu    # CPU (bf16): writes benchmarks/CPU_LAYERS.md
    python benchmarks/full_size_layers.py --quick         # 16 × 512 calibration tokens: writes GPU_LAYERS-quick.md
    python benchmarks/full_size_layers.py --only Mixtral  # the rows of one model
    python benchmarks/full_size_layers.py --smoke         # tiny shapes on the CPU: checks the script, writes nothing
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PretrainedConfig

from common import table_header
from optimum_prune import PruningConfig, prune

MODELS = {  # name: (model class, layer shape, real depth)
    "Llama-3-70B": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                                       num_key_value_heads=8, rope_theta=500000.0), 80),  # fmt: skip
    "Mixtral-8x7B": (MixtralForCausalLM, MixtralConfig, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                           num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2), 32),  # fmt: skip
}
SMOKE_SHAPES = {
    "Llama-3-70B": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "Mixtral-8x7B": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=8, num_experts_per_tok=2),  # fmt: skip
}
# (model, row label, pruning config, activation device)
ROWS = [
    ("Llama-3-70B", "Wanda 50 %", {"method": "wanda", "sparsity": 0.5}, None),
    ("Llama-3-70B", "SparseGPT 50 %", {"method": "sparsegpt", "sparsity": 0.5}, None),
    ("Llama-3-70B", "SparseGPT 2:4, activations on the CPU", {"method": "sparsegpt", "sparsity": "2:4"}, "cpu"),
    ("Mixtral-8x7B", "Wanda 50 % (experts: routed tokens)", {"method": "wanda", "sparsity": 0.5}, None),
    ("Mixtral-8x7B", "experts: reconstruction search, keep 6 of 8", {"method": "experts", "method_options": {"num_experts": 6}}, None),
    ("Mixtral-8x7B", "experts: reconstruction search, keep 4 of 8", {"method": "experts", "method_options": {"num_experts": 4}}, None),
]
VOCABULARY = 32000
TABLES = {"cuda": "GPU_LAYERS.md", "cpu": "CPU_LAYERS.md"}


def model_of(name: str, layers: int, args: argparse.Namespace) -> torch.nn.Module:
    """A bf16 model of ``name``'s layer shape with ``layers`` layers, random weights, on the CPU."""
    model_class, config_class, shape, _ = MODELS[name]
    config: PretrainedConfig = config_class(**(SMOKE_SHAPES[name] if args.smoke else shape), num_hidden_layers=layers, vocab_size=VOCABULARY)
    torch.manual_seed(layers)
    with torch.device(args.device):  # random initialisation is quicker on the GPU
        model = model_class._from_config(config, dtype=torch.bfloat16).eval()
    return model.to("cpu")


def timed_run(name: str, layers: int, settings: dict, activation_device: str | None, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds, peak bytes on the compute device) of pruning a ``layers``-layer model."""
    model = model_of(name, layers, args)
    calibration = torch.randint(VOCABULARY, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = PruningConfig(**settings, num_calibration_samples=args.samples, calibration_seq_len=args.seq_len)
    report = prune(  # on CPU its peak is the run's: prune starts VmHWM afresh (not an earlier, larger model's)
model, config, calibration=calibration, device=args.device, activation_device=activation_device)
    return report.seconds, report.peak_memory_bytes


def warm_up(name: str, settings: dict, activation_device: str | None, args: argparse.Namespace) -> None:
    """An untimed prune of a tiny 1-layer model of the row's kind on the same device, so that one-time
    first-use costs (CUDA context, library handles, the method's first kernels) do not land in the row's
    1-layer time and bias its per-layer difference."""
    timed_run(name, 1, settings, activation_device, argparse.Namespace(**{**vars(args), "smoke": True, "samples": 4, "seq_len": 32}))


def measure(args: argparse.Namespace, progress: Callable[[list[str]], None]) -> list[str]:
    """Table rows, ``progress`` called with all rows so far after each (a stopped run keeps what it measured)."""
    lines = []
    for name, label, settings, activation_device in selected_rows(args):
        warm_up(name, settings, activation_device, args)
        (one, _), (three, peak) = (timed_run(name, layers, settings, activation_device, args) for layers in (1, 3))
        per_layer = (three - one) / 2
        fixed = one - per_layer
        depth = MODELS[name][3]
        line = (f"| {name} | {label} | {per_layer:.1f} | {fixed:.1f} | {(fixed + depth * per_layer) / 60:.1f} | "
                f"{peak / 2**30:.1f} |")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
        progress(lines)
    return lines


def selected_rows(args: argparse.Namespace) -> list[tuple]:
    return [row for row in ROWS if args.only.lower() in row[0].lower()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 × 512 calibration tokens")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script; writes nothing)")
    parser.add_argument("--device", choices=sorted(TABLES), default="cuda", help="where layers are pruned (default: cuda)")
    parser.add_argument("--only", default="", help="rows whose model name contains this (e.g. Mixtral)")
    parser.add_argument(
        "--output", type=Path, help="markdown table (default: benchmarks/GPU_LAYERS.md or CPU_LAYERS.md, -NAME with --only, -quick with --quick)"
    )
    args = parser.parse_args()
    args.samples, args.seq_len = (4, 32) if args.smoke else (16, 512) if args.quick else (128, 2048)
    args.device = "cpu" if args.smoke else args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is available here: use --device cpu, or --smoke to check the script with tiny shapes")
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("--device cpu reads each run's peak memory, which prune resets through /proc/self/clear_refs (Linux only)")
    if not selected_rows(args):
        sys.exit(f"--only {args.only!r} matches no model; the models are {', '.join(MODELS)}")
    if args.smoke:
        measure(args, lambda rows: None)
        return
    if not args.output:  # a partial run (--only) gets its own table beside the complete one; a quick one NAME-quick.md
        name = TABLES[args.device].removesuffix(".md") + (f"-{args.only.lower()}" if args.only else "") + ("-quick" if args.quick else "")
        args.output = Path(__file__).resolve().parent / f"{name}.md"
    command = " ".join(["python benchmarks/full_size_layers.py", *sys.argv[1:]])
    measure(args, lambda rows: args.output.write_text(table(rows, command, args)))
    print(args.output.read_text())


def table(rows: list[str], command: str, args: argparse.Namespace) -> str:
    on_gpu = args.device == "cuda"
    placement = "one layer at a time on the GPU" if on_gpu else "pruned there one layer at a time"
    peak = "CUDA allocator peak" if on_gpu else "the process's peak resident memory during `prune` (model weights included)"
    lines = [
        *table_header(
            f"Pruning time per layer and peak memory on full-size layers (random weights, {'GPU' if on_gpu else 'CPU'})", command,
            f"Device: {device_name(args.device)}. Models in bf16 on the CPU, {placement}; calibration {args.samples} × "
            f"{args.seq_len} random tokens; each row after an untimed prune of a tiny model of its kind (first-use costs). "
            "Per layer: (3-layer time − 1-layer time) / 2; fixed: the rest of the 1-layer run; "
            f"projected: fixed + depth × per layer (Llama-3-70B 80 layers, Mixtral-8x7B 32), which is t₁ + (depth − 1) × per "
            "layer, so a negative fixed time (the 1-layer run's layer took less than the later layers' mean) does not bias it. "
            f"Peak: {peak} of the 3-layer run.",
        ),  # fmt: skip
        f"| model | method | s per layer | fixed s | projected whole model (min) | peak {'GPU memory' if on_gpu else 'RSS'} (GiB) |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]
    unfinished = len(selected_rows(args)) - len(rows)
    return "\n".join(lines + ([f"\n{unfinished} row(s) not measured yet (the run stopped or is still going)."] if unfinished else [])) + "\n"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu_info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpu_info.read_text().splitlines() if line.startswith("model name")] if cpu_info.exists() else []
    return f"{names[0] if names else platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()

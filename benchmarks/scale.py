"""Peak memory and time against model depth: in-memory ``prune`` vs ``prune_checkpoint`` (layers on
disk), on random-weight Llama checkpoints of increasing depth (CPU).

Each model shares one layer shape (hidden 1024, MLP 2816, 16 heads / 4 KV heads, vocabulary
8,192) and is saved once in safetensors shards. Each run (Wanda 2:4 on the same calibration
windows) happens in its own process, so its peak resident memory (``VmHWM``) is its own: the
in-memory run loads the whole model first, the offloaded run builds it on the meta device and
holds one layer at a time. Both outputs are compared weight by weight.

    python benchmarks/scale.py            # depths 4, 8, 16, 32; writes benchmarks/SCALE.md
    python benchmarks/scale.py --quick    # depths 2, 4, 8
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from common import quick_or_full, table_header
from optimum_prune import PruningConfig, prune, prune_checkpoint
from optimum_prune.models import cache_root
from optimum_prune.report import process_peak_rss

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, vocab_size=8192,
             max_position_embeddings=512)  # fmt: skip
CONFIG = PruningConfig(method="wanda", sparsity="2:4", num_calibration_samples=8, calibration_seq_len=256)


def checkpoint(depth: int) -> Path:
    """A random-weight Llama of ``depth`` layers, saved once in 200 MB shards."""
    directory = cache_root() / "scale" / f"llama-{depth}"
    if not (directory / "config.json").is_file():
        torch.manual_seed(depth)
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=depth, **SHAPE)).save_pretrained(directory, max_shard_size="200MB")
    return directory


def windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, SHAPE["vocab_size"], (CONFIG.num_calibration_samples, CONFIG.calibration_seq_len), generator=generator)


def run(mode: str, source: Path, output: Path) -> dict:
    """One run in this process (``--run``): prune, save, report peak RSS and seconds."""
    started = time.perf_counter()
    if mode == "memory":
        model = AutoModelForCausalLM.from_pretrained(source)
        loaded = process_peak_rss()  # prune starts VmHWM afresh: the load's peak is read first
        prune(model, CONFIG, calibration=windows())
        model.save_pretrained(output)
    else:
        loaded = 0
        prune_checkpoint(source, output, CONFIG, calibration=windows())
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": max(loaded, process_peak_rss())}


def same_weights(first: Path, second: Path) -> bool:
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (first, second))
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        print(json.dumps(run(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
        return
    quick, output = quick_or_full(__doc__.splitlines()[0], "SCALE", "depths 2, 4, 8")
    depths = (2, 4, 8) if quick else (4, 8, 16, 32)
    rows = []
    for depth in depths:
        source = checkpoint(depth)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        with tempfile.TemporaryDirectory() as scratch:
            results = {}
            for mode in ("memory", "disk"):
                command = [sys.executable, __file__, "--run", mode, str(source), str(Path(scratch) / mode)]
                child = subprocess.run(command, capture_output=True, text=True, check=False)
                if child.returncode != 0:
                    raise SystemExit(f"{mode} run of {depth} layers failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
                results[mode] = json.loads(child.stdout.splitlines()[-1])
            identical = same_weights(Path(scratch) / "memory", Path(scratch) / "disk")
        rows.append((depth, size, results, identical))
        print(depth, size, results, identical, flush=True)

    command = "python benchmarks/scale.py" + (" --quick" if quick else "")
    lines = [
        *table_header(
            "Pruning past memory: peak RSS and time against depth (random-weight Llama, CPU)",
            command,
            f"Models: Llama with hidden 1024, MLP 2816, 16/4 heads, vocabulary 8,192, random weights (fp32), saved in 200 MB "
            f"shards. Pruning: Wanda 2:4 on {CONFIG.num_calibration_samples} × {CONFIG.calibration_seq_len} random-token "
            "windows, then saved. In memory: `from_pretrained` + `prune` + `save_pretrained`; offloaded: `prune_checkpoint` "
            "(layers read from the shards and written one at a time). Each run in its own process; peak RSS is that "
            "process's `VmHWM` (Python, torch and the calibration activations included).",
        ),
        "| layers | checkpoint (MiB) | in memory: peak RSS (MiB) | offloaded: peak RSS (MiB) | in memory (s) | offloaded (s) | same weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for depth, size, results, identical in rows:
        memory, disk = results["memory"], results["disk"]
        lines.append(
            f"| {depth} | {size / 2**20:.0f} | {memory['peak_rss_bytes'] / 2**20:.0f} | {disk['peak_rss_bytes'] / 2**20:.0f} | "
            f"{memory['seconds']:.1f} | {disk['seconds']:.1f} | {'yes' if identical else '**no**'} |"
        )
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

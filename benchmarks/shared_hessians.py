"""SparseGPT's Hessians of one decoder layer, a Hessian per linear vs one per distinct input tensor (q/k/v_proj
read one tensor, gate/up_proj another): the memory they hold and the time to accumulate them, side by side.

One Llama decoder layer of random float32 weights (hidden 1,024, intermediate 2,816, 16 heads, 4 key-value heads)
on the CPU, fed calibration windows of random tokens the way ``prune`` feeds it (``LayerwiseRun``'s feeding,
``share`` on and off); the pruning itself is not timed, as it is the same either way. Hessian bytes: the distinct
float32 matrices the layer holds once fed (all at once until the first linear is pruned; pruning adds one copy at a
time). Held inputs: the most that the shared feeding held until a batch ended (distinct tensors, one layer
forward's). Time: process CPU time of the Hessian updates (x·xᵀ) and of the whole feeding (layer forwards
included), the median of the repeats after one warm-up. Both feedings' Hessians are checked equal bit for bit before anything is timed.

    python benchmarks/shared_hessians.py            # 16 windows × 512 tokens, 5 repeats: writes benchmarks/SHARED_HESSIANS.md
    python benchmarks/shared_hessians.py --quick    # 4 windows × 256 tokens, 2 repeats
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import quick_or_full, table_header
from optimum_prune import PruningConfig, get_adapter
from optimum_prune.atomic_files import write_text_atomic
from optimum_prune.calibration import capture_first_layer_inputs
from optimum_prune.calibration.sharing import SharedStatistics
from optimum_prune.methods.sparsegpt import InputHessian
from optimum_prune.runs import LayerwiseRun

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=1, vocab_size=1000)


def fed(run: LayerwiseRun, inputs, share: bool) -> tuple[dict, float, float, int, float, int]:
    """(pruners fed, process CPU seconds of the feeding, of its Hessian updates, how many updates, their x·xᵀ
    FLOPs, most bytes of inputs held until a batch ended)."""
    updates, flops, held = [0, 0.0], [0.0], [0]
    add, end_batch = InputHessian.add, SharedStatistics.end_batch

    def timed_add(hessian: InputHessian, batch: torch.Tensor) -> None:
        started = time.process_time()
        add(hessian, batch)
        updates[0] += 1
        updates[1] += time.process_time() - started
        flops[0] += 2 * batch[..., 0].numel() * batch.shape[-1] ** 2

    def measuring(shared: SharedStatistics) -> None:
        storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for received in shared._pending.values() for x, _ in received}
        held[0] = max(held[0], sum(storages.values()))
        end_batch(shared)

    InputHessian.add, SharedStatistics.end_batch = timed_add, measuring
    try:
        layer = run.adapter.decoder_layers()[0]
        started = time.process_time()
        pruners, _ = run._fed_pruners(layer, inputs, run.targets[0], share=share)
        return pruners, time.process_time() - started, updates[1], updates[0], flops[0], held[0]
    finally:
        InputHessian.add, SharedStatistics.end_batch = add, end_batch


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "SHARED_HESSIANS", "4 windows × 256 tokens, 2 repeats")
    windows, seq_len, repeats = (4, 256, 2) if quick else (16, 512, 5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    adapter = get_adapter(model)
    (run,) = LayerwiseRun.plan_parts(adapter, PruningConfig(method="sparsegpt", sparsity=0.5), torch.device("cpu"))
    calibration = torch.randint(SHAPE["vocab_size"], (windows, seq_len), generator=torch.Generator().manual_seed(1))
    inputs = capture_first_layer_inputs(adapter, calibration, torch.device("cpu"))

    alone, shared = fed(run, inputs, share=False)[0], fed(run, inputs, share=True)[0]
    for name, pruner in alone.items():
        assert torch.equal(pruner.statistics.matrix, shared[name].statistics.matrix), name
    del alone, shared
    rows = {}
    for share in (False, True):
        pruners, _, _, updates, flops, held = fed(run, inputs, share)  # also the warm-up
        distinct = {id(pruner.statistics): pruner.statistics.matrix for pruner in pruners.values()}
        size = sum(matrix.numel() * matrix.element_size() for matrix in distinct.values())
        del pruners
        timed = [fed(run, inputs, share) for _ in range(repeats)]
        feeding, updating = (statistics.median(measured[column] for measured in timed) for column in (1, 2))
        rows[share] = (len(distinct), size, updates, flops, updating, feeding, held)

    lines = table_header(
        "SparseGPT's Hessians of one decoder layer: per linear vs shared by linears that read the same tensor",
        f"python benchmarks/shared_hessians.py{' --quick' if quick else ''}",
        f"One Llama decoder layer, hidden {SHAPE['hidden_size']:,}, intermediate {SHAPE['intermediate_size']:,}, float32, CPU; "
        f"{windows} windows × {seq_len} random tokens; median of {repeats} feedings (process CPU time of "
        f"{torch.get_num_threads()} CPU threads). The Hessians are equal bit for bit.",
    )
    lines += [
        "| Hessians | distinct | MiB | updates | x·xᵀ GFLOP | updating (s) | feeding, forwards included (s) | inputs held (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for share, label in ((False, "one per linear"), (True, "shared")):
        count, size, updates, flops, updating, feeding, held = rows[share]
        lines.append(
            f"| {label} | {count} | {size / 2**20:.1f} | {updates} | {flops / 1e9:.1f} | {updating:.2f} | {feeding:.2f} | {held / 2**20:.1f} |"
        )
    ratios = " | ".join(f"{alone / shared:.2f}" for alone, shared in zip(rows[False][:6], rows[True][:6]))
    lines.append(f"| per linear / shared | {ratios} | |")
    print("\n".join(lines[-4:]), flush=True)
    write_text_atomic(output, "\n".join(lines) + "\n")
    print(f"-> {output}")


if __name__ == "__main__":
    main()

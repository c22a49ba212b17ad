"""2:4 linear layers on a CUDA GPU: dense cuBLAS against every sparse path, side by side, per
token count M — the measurements ``SparseLinear``'s dispatch threshold comes from.

For each Llama-3-8B / 70B linear shape and each M, one bf16 2:4 weight (random, the two largest of
every four kept) is timed as

- ``dense``: ``F.linear`` on the same weight stored densely (cuBLAS), the reference for every ratio;
- ``decode``, ``decode int8``, ``decode int4``, ``decode int4 zp``: ``optimum_prune``'s decode kernel on
  the compressed format (16-bit values; int8 / int4 values with group-128 scales; int4 with a
  zero-point per scale too, as optimum-quanto's affine int4 repacked by ``sparsify`` has), tiles
  autotuned per shape (the tuning runs before the timing), for M up to ``DECODE_MAX_ROWS``;
- ``mma.sp``, ``mma.sp int8``, ``mma.sp int4``: ``optimum_prune``'s sparse tensor-core kernel
  (``mma_24.py``; 16-bit values, or int8 / int4 codes with group-128 scales turned into 16-bit values
  in registers; warps and split-K measured per shape before the timing), for M up to 64;
- ``expand + cuBLAS``, ``expand int4 + cuBLAS``: the weight rebuilt densely by ``sparse24_expand``,
  then ``F.linear`` — the prefill path, both steps timed;
- ``semi-structured``: ``torch.sparse.to_sparse_semi_structured`` + ``F.linear`` (what PyTorch offers);
- ``cuSPARSELt``: ``torch._cslt_sparse_mm`` with the algorithm chosen by ``torch._cslt_sparse_mm_search``
  for this shape (inputs padded to 16 rows outside the timed call).

Each cell is dense time / path time (> 1: faster than dense), median of ``triton.testing.do_bench``;
a path that fails for a shape shows why. Every path's output is checked against the dense product
first (quantized paths against their own dequantized weight). The bytes ceiling of decode is dense
bytes / compressed bytes (1.78× for 16-bit values, ≈ 5× for int4 with bf16 scales). Below the table:
per shape, the largest M at which the decode kernel still beats expand + cuBLAS (``DECODE_ROWS`` in
``triton_24.py``), the largest at which ``mma.sp`` beats both, and the smallest M from which
cuSPARSELt beats them all.

End to end, on a Llama-3-8B-shaped model (random weights, magnitude 2:4): greedy ``generate()``
tokens/s with a static cache (transformers compiles the decode step itself), the time of one decode
step replayed as a CUDA graph (what a serving loop without Python overhead pays), the time of one
4,096-token prefill, the decoder's weight bytes and the largest logit difference on the prompt
against the dense model — for the dense model, ``sparsify()``, ``sparsify(bits=4)``,
``sparsify(prefill="cusparselt")`` (many-token calls take cuSPARSELt wherever it measures faster),
``sparsify(decode="mma")`` and ``sparsify(bits=4, decode="mma")`` (calls of up to 64 token rows on
sparse tensor cores).

    python benchmarks/kernels.py            # writes benchmarks/KERNELS.md
    python benchmarks/kernels.py --quick    # two shapes, five token counts, a 4-layer model end to end
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from torch.nn import functional as F

from common import quick_or_full, table_header
from optimum_prune.kernels import compress, decompress
from optimum_prune.sparsity import NMPattern, prune_lowest_nm

if TYPE_CHECKING:
    from transformers import LlamaConfig

SHAPES = {  # (out, in) of Llama-3-8B's and Llama-3-70B's linears
    "8B q_proj / o_proj": (4096, 4096),
    "8B k_proj / v_proj": (1024, 4096),
    "8B gate_proj / up_proj": (14336, 4096),
    "8B down_proj": (4096, 14336),
    "70B q_proj / o_proj": (8192, 8192),
    "70B gate_proj / up_proj": (28672, 8192),
    "70B down_proj": (8192, 28672),
}
TOKENS = (1, 2, 4, 16, 64, 256, 1024, 4096, 16384)  # the issue's M, and 2 for the decode kernel's crossover
QUICK_SHAPES, QUICK_TOKENS = ("8B q_proj / o_proj", "8B gate_proj / up_proj"), (1, 4, 16, 256, 4096)
# (path name suffix, bits, with zero-points: the extra load of optimum-quanto int4 codes that sparsify repacks)
FORMATS = (("", None, False), (" int8", 8, False), (" int4", 4, False), (" int4 zp", 4, True))
EXPANDED = (("expand + cuBLAS", ""), ("expand int4 + cuBLAS", " int4"))  # (path name, the FORMATS suffix it rebuilds)
MMA_FORMATS = ("", " int8", " int4")  # the FORMATS suffixes the mma.sp kernel is timed on
PATHS = (
    *(f"decode{suffix}" for suffix, *_ in FORMATS), *(f"mma.sp{suffix}" for suffix in MMA_FORMATS),
    *(name for name, _ in EXPANDED), "semi-structured", "cuSPARSELt",
)  # fmt: skip


def weight_24(out_features: int, in_features: int) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    weight[prune_lowest_nm(weight.float().abs(), NMPattern(2, 4))] = 0
    return weight


def sparse_paths(weight: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """Per path: (the call on inputs [M, in], the dense weight it must reproduce)."""
    from optimum_prune.kernels.mma_24 import sparse24_mma
    from optimum_prune.kernels.triton_24 import sparse24_decode, sparse24_expand

    paths, formats = {}, {}
    for suffix, bits, zero_points in FORMATS:
        compressed = compress(weight, bits=bits, group_size=128)
        if zero_points:  # all zero, so the values stay those of the int4 path; the kernel still loads and subtracts them
            compressed = replace(compressed, zero_points=torch.zeros_like(compressed.scales, dtype=torch.int8))
        formats[suffix] = compressed
        paths[f"decode{suffix}"] = (lambda x, c=compressed: sparse24_decode(x, c)), decompress(compressed).to(weight.dtype)
    for suffix in MMA_FORMATS:
        paths[f"mma.sp{suffix}"] = (lambda x, c=formats[suffix]: sparse24_mma(x, c)), paths[f"decode{suffix}"][1]
    for name, suffix in EXPANDED:
        paths[name] = (lambda x, c=formats[suffix]: F.linear(x, sparse24_expand(c, x.dtype))), paths[f"decode{suffix}"][1]
    semi = torch.sparse.to_sparse_semi_structured(weight)
    paths["semi-structured"] = (lambda x: F.linear(x, semi)), weight
    packed = torch._cslt_compress(weight)
    algorithms: dict[int, int] = {}

    def cusparselt(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows not in algorithms:
            algorithms[rows] = torch._cslt_sparse_mm_search(packed, x.T, transpose_result=True)
        return torch._cslt_sparse_mm(packed, x.T, transpose_result=True, alg_id=algorithms[rows])

    paths["cuSPARSELt"] = cusparselt, weight
    return paths


def padded(x: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    rows = -(-x.shape[0] // multiple) * multiple
    return x if rows == x.shape[0] else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def measure(shapes: list[str], tokens: tuple[int, ...], progress: Callable[[list[dict]], None]) -> list[dict]:
    """Rows of the table, ``progress`` called with all rows so far after each shape."""
    from triton.testing import do_bench

    from optimum_prune.kernels.mma_24 import MAX_ROWS
    from optimum_prune.kernels.triton_24 import DECODE_MAX_ROWS

    rows = []
    for shape in shapes:
        out_features, in_features = SHAPES[shape]
        weight = weight_24(out_features, in_features)
        try:
            paths = sparse_paths(weight)
        except RuntimeError as error:  # e.g. a torch build without cuSPARSELt
            raise SystemExit(f"cannot build the sparse paths for {shape}: {error}") from None
        for m in tokens:
            x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
            dense_ms = do_bench(partial(F.linear, x, weight), return_mode="median")
            row = {"shape": shape, "tokens": m, "dense_ms": dense_ms}
            for name, (call, reference) in paths.items():
                if (name.startswith("decode") and m > DECODE_MAX_ROWS) or (name.startswith("mma.sp") and m > MAX_ROWS):
                    row[name] = "—"
                    continue
                inputs = padded(x) if name == "cuSPARSELt" else x
                try:
                    result = call(inputs)[:m]  # also runs the autotuner and the algorithm search before the timing
                    expected = F.linear(x, reference)
                    error = float((result.float() - expected.float()).norm() / expected.float().norm())
                    if error > 2e-2:
                        row[name] = f"wrong (relative error {error:.1e})"
                        continue
                    row[name] = dense_ms / do_bench(partial(call, inputs), return_mode="median")
                except (RuntimeError, ValueError) as failure:
                    row[name] = f"fails: {str(failure).splitlines()[0][:60]}"
            rows.append(row)
            print(row, flush=True)
        del paths, weight
        progress(rows)
    return rows


def thresholds(rows: list[dict], shape: str) -> str:
    """The dispatch thresholds this shape's rows measure, as a dispatch by M uses them: the largest M up to
    which (at every measured M' ≤ M) the decode kernel beats expand + cuBLAS, the same for mma.sp against
    both, and the smallest M from which (at every measured M' ≥ M) cuSPARSELt beats them all."""
    measured = sorted((row for row in rows if row["shape"] == shape), key=lambda row: row["tokens"])

    def wins(path: str, *others: str) -> list[bool]:
        return [timed(row[path]) > max(timed(row[other]) for other in others) for row in measured]

    def up_to(won: list[bool]) -> int | str:
        count = next((i for i, w in enumerate(won) if not w), len(won))
        return measured[count - 1]["tokens"] if count else "none"

    cusparselt = wins("cuSPARSELt", "decode", "mma.sp", "expand + cuBLAS")
    losing = [i for i, w in enumerate(cusparselt) if not w]
    first = (losing[-1] + 1) if losing else 0
    return (
        f"decode kernel up to M = {up_to(wins('decode', 'expand + cuBLAS'))}; "
        f"mma.sp up to M = {up_to(wins('mma.sp', 'decode', 'expand + cuBLAS'))}; "
        f"cuSPARSELt from M = {measured[first]['tokens'] if first < len(measured) else 'never'}"
    )


def timed(value: float | str) -> float:
    """A cell's speed-up, or 0 for a path that did not run."""
    return value if isinstance(value, float) else 0.0


def cell(value: float | str, unit: str = "×", spec: str = ".2f") -> str:
    return f"{value:{spec}}{unit}" if isinstance(value, float) else value


def markdown(rows: list[dict], command: str) -> str:
    lines = table_header(
        "2:4 linear layers on a GPU: speed-up over dense cuBLAS (bf16)", command,
        "Each cell: dense `F.linear` time / the path's time for the same 2:4 weight and M input tokens "
        "(median of `triton.testing.do_bench`); every path's output is first checked against the dense product. "
        f"Device: {torch.cuda.get_device_name()}.",
    )  # fmt: skip
    lines += ["| shape (out × in) | M | dense (ms) | " + " | ".join(PATHS) + " |", "|---|---:|---:|" + "---:|" * len(PATHS)]
    for row in rows:
        out_features, in_features = SHAPES[row["shape"]]
        lines.append(
            f"| {row['shape']} ({out_features} × {in_features}) | {row['tokens']} | {row['dense_ms']:.4f} | "
            + " | ".join(cell(row[p]) for p in PATHS) + " |"
        )
    lines += ["", "Dispatch thresholds measured (16-bit values):", ""]
    lines += [f"- {shape}: {thresholds(rows, shape)}" for shape in dict.fromkeys(row["shape"] for row in rows)]
    return "\n".join(lines) + "\n"


def llama3_8b_shaped(layers: int) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=layers, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)  # fmt: skip


def graphed_step_ms(model: torch.nn.Module, prompt: torch.Tensor, replays: int = 50) -> float:
    """Milliseconds of one greedy decode step (one token, static cache) replayed as a CUDA graph."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + replays + 8)
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1], device=prompt.device))
        token, position = prompt[:, -1:].clone(), torch.tensor([prompt.shape[1]], device=prompt.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: autotuning, allocations
            for _ in range(3):
                model(token, past_key_values=cache, cache_position=position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(token, past_key_values=cache, cache_position=position)
    graph.replay()
    started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started.record()
    for _ in range(replays):
        graph.replay()
    ended.record()
    torch.cuda.synchronize()
    return started.elapsed_time(ended) / replays


END_TO_END = {  # row name: sparsify's options (None: the dense model)
    "dense (2:4 zeros stored densely)": None,
    "sparsify()": {},
    "sparsify(bits=4)": {"bits": 4},
    'sparsify(prefill="cusparselt")': {"prefill": "cusparselt"},
    'sparsify(decode="mma")': {"decode": "mma"},
    'sparsify(bits=4, decode="mma")': {"bits": 4, "decode": "mma"},
}
PREFILL_TOKENS = 4096


def end_to_end(config: LlamaConfig, new_tokens: int = 128, device: str = "cuda") -> list[str]:
    """Markdown rows for a bf16 Llama of ``config`` (random weights) pruned to 2:4 by magnitude, then
    with every 2:4 linear swapped for ``SparseLinear`` (``END_TO_END``), in the same run: ``generate()``
    tokens/s, CUDA-graph decode step time, prefill time, decoder weight bytes, prompt logit difference."""
    from transformers import LlamaForCausalLM

    from optimum_prune import PruningConfig, prune
    from optimum_prune.kernels import sparsify

    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    prune(dense, PruningConfig(method="magnitude", sparsity="2:4"), device=device)
    prompt = torch.randint(config.vocab_size, (1, 16), device=device, generator=torch.Generator(device).manual_seed(0))
    lines, reference = [], None
    for name, options in END_TO_END.items():
        model = dense if options is None else copy.deepcopy(dense)
        if options is not None:
            sparsify(model, **options)
        with torch.no_grad():
            logits = model(prompt).logits.float()
        speed = attempt(lambda: generated_tokens_per_second(model, prompt, new_tokens))
        step_ms = attempt(lambda: graphed_step_ms(model, prompt))
        prefill = attempt(lambda: prefill_ms(model, config.vocab_size))
        reference = reference or (speed, step_ms, prefill, logits)
        difference = float((logits - reference[3]).abs().max() / reference[3].abs().max())
        lines.append(
            f"| {name} | {cell(speed, '', '.1f')} | {cell(ratio(speed, reference[0]))} | {cell(step_ms, '', '.3f')} | "
            f"{cell(ratio(reference[1], step_ms))} | {cell(prefill, '', '.1f')} | {cell(ratio(reference[2], prefill))} | "
            f"{decoder_weight_bytes(model) / 2**30:.2f} | {difference:.1e} |"
        )
        print(lines[-1], flush=True)
        if options is not None:
            del model
            torch.cuda.empty_cache()
    return lines


def prefill_ms(model: torch.nn.Module, vocabulary: int, repeats: int = 3) -> float:
    """Milliseconds of one forward over a ``PREFILL_TOKENS``-token prompt (logits of its last token only),
    after a warm-up that runs every autotuning, cuSPARSELt's search and packing and the path choices."""
    ids = torch.randint(vocabulary, (1, PREFILL_TOKENS), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
        started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started.record()
        for _ in range(repeats):
            model(ids, use_cache=False, logits_to_keep=1)
        ended.record()
    torch.cuda.synchronize()
    return started.elapsed_time(ended) / repeats


def decoder_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder layers' weights as held on the GPU, cuSPARSELt's packed copies included."""
    from optimum_prune.kernels import SparseLinear

    layers = model.model.layers
    held = sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])
    return held + sum(m._cusparselt.num_bytes() for m in layers.modules() if isinstance(m, SparseLinear) and m._cusparselt)


def generated_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    def generate() -> None:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           cache_implementation="static", pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()

    generate()  # warm-up: kernels tuned and compiled, cache allocated
    started = time.perf_counter()
    generate()
    return new_tokens / (time.perf_counter() - started)


def attempt(measurement: Callable[[], float]) -> float | str:
    """The measurement, or why it failed (one failing end-to-end path must not lose the others)."""
    try:
        return measurement()
    except Exception as failure:  # noqa: BLE001 — reported in the table
        return f"fails: {type(failure).__name__}: {str(failure).splitlines()[0][:50] if str(failure) else ''}"


def ratio(numerator: float | str, denominator: float | str) -> float | str:
    return numerator / denominator if isinstance(numerator, float) and isinstance(denominator, float) else "—"


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "KERNELS", "two shapes, five token counts, a 4-layer model end to end")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times GPU kernels: it needs a CUDA device (none is available here)")
    shapes, tokens = (list(QUICK_SHAPES), QUICK_TOKENS) if quick else (list(SHAPES), TOKENS)
    command = "python benchmarks/kernels.py" + (" --quick" if quick else "")
    table = markdown(measure(shapes, tokens, lambda rows: output.write_text(markdown(rows, command))), command)
    output.write_text(table)
    layers = 4 if quick else 32
    table += "\n".join([
        "", f"End to end: a Llama-3-8B-shaped model with {layers} layers (random weights, magnitude 2:4), bf16. `generate()`: "
        "greedy, 128 tokens after a 16-token prompt, static cache (transformers compiles the decode step). Graph step: one "
        f"decode step replayed as a CUDA graph. Prefill: one forward over a {PREFILL_TOKENS}-token prompt. Decoder weights: "
        "as held on the GPU after the prefill (cuSPARSELt's packed copies included). Logit difference: largest |Δ logit| "
        "on the prompt / largest |logit| of the dense model.", "",
        "| model | generate() tokens/s | vs dense | graph step (ms) | vs dense | prefill (ms) | vs dense | decoder weights (GiB) | logit difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *end_to_end(llama3_8b_shaped(layers)),
    ]) + "\n"  # fmt: skip
    output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()

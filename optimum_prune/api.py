"""``prune(model, config, calibration)``: the one call every integration builds on."""

from __future__ import annotations

import logging
import resource
import sys
import time
from fnmatch import fnmatchcase
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import DecoderAdapter, get_adapter
from .allocation import ALLOCATIONS, Allocation
from .calibration import CalibrationSource, LayerInputs, calibration_windows, feeding_inputs, run_layer, walk_layers
from .config import PruningConfig
from .methods import METHODS, LayerPruner, MethodSpec
from .report import LinearReport, PruningReport
from .sparsity import NMPattern, SparsityTarget
from .statistics import ColumnNorms

logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    config: PruningConfig | Mapping[str, Any],
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
) -> PruningReport:
    """Prune ``model`` in place as ``config`` says and return a report.

    ``calibration`` is used only by methods/allocations that need data; ``None`` means the
    bundled Wikipedia calibration split (which needs ``tokenizer``). ``device`` is where layers
    are processed one at a time (default: where the model is); the model stays where it was.
    The config is recorded as ``model.config.pruning_config`` so ``save_pretrained`` keeps it.
    """
    if isinstance(config, Mapping):
        config = PruningConfig.from_dict(config)
    elif not isinstance(config, PruningConfig):
        raise TypeError(f"config must be a PruningConfig or a dict, got {type(config).__name__}")
    adapter = get_adapter(model)
    device = _resolve_device(device, model)
    method = METHODS.get(config.method)
    method_options = config.build_method_options()
    allocation = ALLOCATIONS.get(config.allocation).create(config.build_allocation_options())
    targets = _target_linears(adapter, config.ignore)
    num_layers = len(targets)

    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = None
    if config.requires_calibration:
        windows = calibration_windows(
            calibration, tokenizer, config.num_calibration_samples, config.calibration_seq_len, config.seed
        )

    if allocation.requires_calibration:
        walk_layers(adapter, windows, device, _observer(adapter, allocation, targets), "Allocating layer sparsity")
    target = config.target
    layer_targets: list[SparsityTarget] = (
        [target] * num_layers if isinstance(target, NMPattern) else allocation.allocate(target, num_layers)
    )

    report = PruningReport(
        method=config.method,
        sparsity=config.sparsity,
        allocation=config.allocation,
        device=str(device),
        calibration_tokens=0 if windows is None else windows.numel(),
    )
    if method.requires_calibration:
        visit = _pruner(adapter, method, method_options, targets, layer_targets, report)
        walk_layers(adapter, windows, device, visit, f"Pruning ({config.method})")
    else:
        for index in tqdm(range(num_layers), desc=f"Pruning ({config.method})"):
            _prune_linears(method, method_options, targets[index], index, layer_targets[index], report)

    report.seconds = time.perf_counter() - started
    report.peak_memory_bytes, report.peak_memory_kind = _peak_memory(device)
    model.config.pruning_config = config.to_dict()
    logger.info("%s", report)
    return report


def _target_linears(adapter: DecoderAdapter, ignore: list[str]) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, the linears to prune keyed by qualified name, minus ``ignore`` matches."""
    result = []
    for index, layer in enumerate(adapter.decoder_layers()):
        prefix = adapter.layer_prefix(index)
        linears = {f"{prefix}.{name}": linear for name, linear in adapter.prunable_linears(layer).items()}
        result.append({name: linear for name, linear in linears.items() if not any(fnmatchcase(name, p) for p in ignore)})
    return result


def _observer(adapter: DecoderAdapter, allocation: Allocation, targets: list[dict[str, nn.Linear]]):
    """Visitor that shows the allocation each dense layer's weights and input norms."""

    def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        linears = targets[index]
        norms = {name: ColumnNorms(linear.in_features, linear.weight.device) for name, linear in linears.items()}
        with feeding_inputs(linears, lambda name, x: norms[name].add(x)):
            run_layer(adapter, layer, inputs)
        allocation.observe(index, {name: linear.weight for name, linear in linears.items()}, norms)

    return visit


def _pruner(
    adapter: DecoderAdapter,
    method: MethodSpec,
    options: Any,
    targets: list[dict[str, nn.Linear]],
    layer_targets: list[SparsityTarget],
    report: PruningReport,
):
    """Visitor that feeds each linear's pruner the layer's calibration inputs, then prunes them all."""

    def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        pruners = {name: method.create(linear, options) for name, linear in targets[index].items()}
        with feeding_inputs(targets[index], lambda name, x: pruners[name].add_batch(x)):
            run_layer(adapter, layer, inputs)
        _finish(pruners, index, layer_targets[index], report)

    return visit


def _prune_linears(
    method: MethodSpec, options: Any, linears: dict[str, nn.Linear], index: int, target: SparsityTarget, report: PruningReport
) -> None:
    _finish({name: method.create(linear, options) for name, linear in linears.items()}, index, target, report)


def _finish(pruners: dict[str, LayerPruner], index: int, target: SparsityTarget, report: PruningReport) -> None:
    fraction = target.sparsity if isinstance(target, NMPattern) else target
    for name, pruner in pruners.items():
        try:
            pruner.prune(target)
        except ValueError as error:
            raise ValueError(f"cannot prune {name}: {error}") from None
        weight = pruner.linear.weight
        zeros = int((weight == 0).sum())
        report.linears.append(LinearReport(name, index, fraction, zeros / weight.numel(), weight.numel()))


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available; use device='cpu'")
    return device


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the process high-water mark, model included.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process RSS"

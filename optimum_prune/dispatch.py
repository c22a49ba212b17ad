"""Models that accelerate dispatched (``from_pretrained(..., device_map=...)``, ``dispatch_model``).

Weights it offloaded (``device_map`` entries ``"cpu"`` beside a GPU, or ``"disk"``) sit on the meta device and
each module's hook loads them only inside the module's forward: what reads weights outside a forward reads
them through the hook (accelerate's ``align_module_device``, one module at a time, ``parameters_read``), and
what rewrites, trains or moves them is refused with the way round (``refuse_offloaded``). Layers spread over
several devices carry hooks that move each layer's inputs to its own device, undoing a layer moved elsewhere
(``refuse_spread``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from accelerate.utils import align_module_device
from torch import nn


def refuse_offloaded(model: nn.Module, work: str, instead: str = "") -> None:
    """A ``ValueError`` naming the offloaded parts of ``model``, if any: ``work`` says why they must be in
    memory, ``instead`` (appended) another way round than loading the model without offloading."""
    device_map = getattr(model, "hf_device_map", None) or {}

    def placed(name: str) -> str:  # the device_map entry a parameter belongs to, else its module
        return next((key for key in device_map if name.startswith(f"{key}.")), name.rpartition(".")[0])

    offloaded = sorted({placed(name) for name, parameter in model.named_parameters() if parameter.is_meta})
    if offloaded:
        shown = ", ".join(offloaded[:3]) + (f" and {len(offloaded) - 3} more" if len(offloaded) > 3 else "")
        raise ValueError(
            f"{shown} hold offloaded weights (meta tensors: a device_map with 'cpu' or 'disk' entries, accelerate's cpu_offload, "
            f"or weights never loaded, as under init_empty_weights); {work}, so load "
            f"the model without offloading{instead}"
        )


def refuse_spread(model: nn.Module, work: str, instead: str = "") -> None:
    """A ``ValueError`` when ``model``'s device_map spreads it over several devices (none offloaded: those are
    ``refuse_offloaded``'s): ``work`` moves one decoder layer at a time to one device, which the hooks undo."""
    devices = sorted({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()})
    if len(devices) > 1 and not any(parameter.is_meta for parameter in model.parameters()):
        raise ValueError(
            f"the model is dispatched over several devices by its device_map ({', '.join(devices)}); {work}, which "
            f"accelerate's hooks would undo: load it on one device{instead}"
        )


def refuse_layer_walks(model: nn.Module, caller: str, instead: str = "") -> None:
    """Refuse a dispatched model to calibration that moves one decoder layer at a time to one device (``caller``)."""
    work = f"{caller} moves one decoder layer at a time to one device"
    refuse_spread(model, work, instead)
    refuse_offloaded(model, work, instead)


def parameters_read(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter of ``model`` (a shared one once), an offloaded one loaded by its module's hook while
    the caller holds it: one module's weights in memory at a time."""
    modules = dict(model.named_modules())
    for name, parameter in model.named_parameters():
        if not parameter.is_meta:
            yield parameter.detach()
            continue
        owner, _, attribute = name.rpartition(".")
        with align_module_device(modules[owner]):
            yield getattr(modules[owner], attribute).detach()

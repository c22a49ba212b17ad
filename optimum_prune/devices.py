"""Devices a user names (``device``, ``activation_device``), checked before any model loads."""

from __future__ import annotations

import torch

from .calibration.engine import on_disk
from .config import PruningConfig
from .methods import METHODS, per_layer_methods


def check_device(device: str | torch.device, field: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` this machine has, or an error naming ``field``."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):  # TypeError: not a string at all (YAML reads `off` as false)
        raise ValueError(f"{field} {str(device)!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if resolved.type == "meta":  # weights moved there would be lost: it holds shapes, no values
        raise ValueError(f"{field} 'meta' holds no values (weights moved there are lost); use cpu or an accelerator")
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    # torch.backends.mps answers on every torch this package takes (torch.mps gained is_available later)
    available = torch.backends.mps.is_available() if resolved.type == "mps" else getattr(backend, "is_available", lambda: False)()
    if backend is None or not available:
        raise ValueError(f"{field} {str(device)!r} was requested but {resolved.type.upper()} is not available here; use cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"{field} {str(device)!r}: this machine has {count} {resolved.type} device(s), numbered from 0")
    return resolved


def check_activation_device(
    activation_device: str | torch.device | None, config: PruningConfig, field: str = "activation_device"
) -> str | torch.device | None:
    """Where calibration activations wait between layers: unset, ``"disk"``, or a device this machine has, for a
    method that keeps activations between layers (the per-layer ones); checked before any model loads."""
    if activation_device is None:
        return None
    if not METHODS.get(config.method).pruner:
        raise ValueError(
            f"{field} applies to the per-layer methods ({per_layer_methods()}); {config.method!r} keeps its "
            f"activations on the compute device (leave {field} unset)"
        )
    if not config.requires_calibration:
        raise ValueError(
            f"{field} says where calibration activations wait between layers; {config.method!r} (allocation "
            f"{config.allocation!r}) reads no calibration: leave {field} unset"
        )
    if on_disk(activation_device):
        return activation_device
    return check_device(activation_device, field)

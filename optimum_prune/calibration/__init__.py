"""Calibration data sources and the sequential layer-wise engine."""

from .engine import LayerInputs, capture_first_layer_inputs, feeding_inputs, run_layer, walk_layers
from .sources import CalibrationSource, calibration_windows, sample_windows, tokenize_stream

__all__ = [
    "CalibrationSource",
    "LayerInputs",
    "calibration_windows",
    "capture_first_layer_inputs",
    "feeding_inputs",
    "run_layer",
    "sample_windows",
    "tokenize_stream",
    "walk_layers",
]

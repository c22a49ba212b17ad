"""Calibration data sources and the sequential layer-wise engine."""

from .engine import (
    CalibrationInputs,
    LayerInputs,
    capture_first_layer_inputs,
    count_tokens,
    feed_layer,
    feeding_inputs,
    model_batches,
    observe_layers,
    run_layer,
    walk_layers,
)
from .multimodal import count_images, image_text_batches
from .sources import (
    CalibrationSource,
    as_token_windows,
    calibration_inputs,
    calibration_windows,
    check_calibration_inputs,
    check_token_ids,
    leading_documents,
    sample_windows,
    tokenize_stream,
)

__all__ = [
    "CalibrationInputs",
    "CalibrationSource",
    "LayerInputs",
    "as_token_windows",
    "calibration_inputs",
    "calibration_windows",
    "capture_first_layer_inputs",
    "check_calibration_inputs",
    "check_token_ids",
    "count_images",
    "count_tokens",
    "feed_layer",
    "feeding_inputs",
    "image_text_batches",
    "model_batches",
    "observe_layers",
    "run_layer",
    "leading_documents",
    "sample_windows",
    "tokenize_stream",
    "walk_layers",
]

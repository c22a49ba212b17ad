"""Image-text calibration: pairs run through the model's processor into ready model inputs.

A pair is a mapping with an ``image`` (PIL image or array) and a ``text``; a list of them or a
``datasets.Dataset`` with those columns is a calibration source. Each pair becomes one batch
(``input_ids``, ``attention_mask``, ``pixel_values`` and whatever else the processor returns),
so no padding is involved. The processor expands the image placeholder into the model's image
tokens; a text without the placeholder gets it in front, on a line of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .engine import CalibrationInputs, model_batches


def is_image_text(source: Any) -> bool:
    if hasattr(source, "column_names"):
        return "image" in dataset_columns(source)
    return isinstance(source, Sequence) and bool(source) and all(isinstance(p, Mapping) and "image" in p for p in source)


def dataset_columns(source: Any) -> list[str] | None:
    """A ``datasets`` dataset's column names (None for other sources). A streamed dataset loaded without declared
    features has ``column_names`` None: its first row names them."""
    if not hasattr(source, "column_names"):
        return None
    if source.column_names is None:
        return list(next(iter(source), {}))
    return list(source.column_names)


def is_model_batches(source: Any) -> bool:
    """Already processed inputs: a list of mappings holding ``input_ids`` tensors."""
    return (
        isinstance(source, Sequence)
        and bool(source)
        and all(isinstance(b, Mapping) and isinstance(b.get("input_ids"), torch.Tensor) for b in source)
    )


def image_text_batches(pairs: Any, processor: Any, num_samples: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_samples`` pairs (of a list, a ``Dataset`` or a streamed one), each processed into one batch of
    model inputs."""
    check_image_text(pairs, processor)
    return [image_text_batch(pair, processor, index) for index, pair in enumerate(itertools.islice(pairs, num_samples))]


def check_image_text(pairs: Any, processor: Any) -> None:
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(
            "image-text calibration needs the model's processor (e.g. AutoProcessor.from_pretrained(...)): "
            "pass processor=..."
        )
    if hasattr(pairs, "column_names"):
        if "text" not in (columns := dataset_columns(pairs)):
            raise ValueError(f"image-text calibration dataset needs 'image' and 'text' columns; it has {columns}")


def image_placeholder(processor: Any) -> str:
    """The text a processor replaces by an image's tokens: its ``image_token`` (LLaVA), or Gemma 3's
    ``boi_token``, which it expands into the image's soft tokens (its ``image_token``)."""
    return getattr(processor, "boi_token", None) or processor.image_token


def image_text_batch(pair: dict[str, Any], processor: Any, index: int) -> dict[str, torch.Tensor]:
    """One pair as model inputs: the image placeholder, a newline and the text (unless the text places
    the placeholder itself). ``index`` names the pair in errors."""
    text = pair.get("text")
    if not isinstance(text, str):
        raise ValueError(f"image-text calibration pair {index} needs a 'text' string, got {text!r}")
    placeholder = image_placeholder(processor)
    if placeholder not in text:
        text = f"{placeholder}\n{text}"
    processed = processor(images=pair["image"], text=text, return_tensors="pt")
    return {name: value for name, value in processed.items() if isinstance(value, torch.Tensor)}


def count_images(inputs: CalibrationInputs | None) -> int:
    """The images the calibration inputs feed the model (a report's ``calibration_images``; 0 for text)."""
    if inputs is None or isinstance(inputs, torch.Tensor):
        return 0
    return sum(len(batch["pixel_values"]) for batch in model_batches(inputs) if "pixel_values" in batch)

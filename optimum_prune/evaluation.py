"""Perplexity over non-overlapping windows, one batch of logits alive at a time; image-conditioned caption loss."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils.logging import tqdm

from .devices import check_device
from .calibration import check_calibration_inputs, leading_documents, tokenize_stream
from .calibration.sources import file_texts
from .calibration.engine import evaluating
from .calibration.gradients import exp_or_inf
from .calibration.multimodal import check_image_text, image_placeholder, image_text_batch
from .data import wikipedia_text
from .options import as_option_type

logger = logging.getLogger(__name__)


class TooFewTokens(ValueError):
    """The text holds fewer tokens than asked to score; ``tokens`` says how many it holds, so a caller can name its own
    setting in the error (the CLI's ``--eval-tokens``)."""

    def __init__(self, message: str, tokens: int) -> None:
        super().__init__(message)
        self.tokens = tokens


def check_whole_windows(tokens: int | None, seq_len: int, tokens_field: str, seq_len_field: str) -> None:
    """Perplexity scores whole windows: a token count that is not a multiple of the window would be stated
    for tokens never scored (None, the whole text, is cut to whole windows)."""
    if seq_len < 2:
        raise ValueError(f"{seq_len_field} must be at least 2 (a window predicts its tokens after the first), got {seq_len}")
    if tokens is None:
        return
    if tokens < seq_len:
        raise ValueError(f"{tokens_field} ({tokens}) must be at least {seq_len_field} ({seq_len}): perplexity scores whole windows")
    if tokens % seq_len:
        raise ValueError(
            f"{tokens_field} ({tokens}) is not a multiple of {seq_len_field} ({seq_len}): the last {tokens % seq_len} "
            f"tokens would not count; use {tokens - tokens % seq_len} (perplexity scores whole windows)"
        )


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | Sequence[str] | os.PathLike | None = None,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> float:
    """exp(mean next-token NLL) over consecutive ``seq_len`` windows of ``text``.

    ``text`` defaults to the bundled Wikipedia evaluation split (disjoint from calibration); a path
    (``Path("wiki.test.raw")``) is read as a file, as the CLI's ``--eval-file`` reads it, while a string is the text.
    The stream is tokenised without special tokens and cut to ``max_tokens`` (text shorter than that, or a count
    that is not a multiple of ``seq_len``, is an error: the count is stated beside results); a trailing partial window is dropped. Each window predicts its own tokens 2..seq_len (the
    Wanda/SparseGPT protocol). Logits exist for one batch at a time only.
    """
    seq_len, batch_size = as_option_type(seq_len, int, False, "seq_len"), as_option_type(batch_size, int, False, "batch_size")
    max_tokens = as_option_type(max_tokens, int, True, "max_tokens")  # 512.0 failed slicing ("slice indices must be integers")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:  # a negative step scored no window and returned 1.0
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if tokenizer is None:
        raise ValueError("evaluate_perplexity tokenises text: pass the model's tokenizer")
    if isinstance(text, os.PathLike):
        text = file_texts(Path(text), "evaluation text file")
    if not (text is None or isinstance(text, str) or (isinstance(text, Sequence) and all(isinstance(t, str) for t in text))):
        raise TypeError(
            f"text must be None (the bundled evaluation split), a string, a list of strings or a file's Path, got {type(text).__name__}"
        )
    if isinstance(text, str):
        _warn_if_a_file_name(text)
    texts = [wikipedia_text("evaluation")] if text is None else [text] if isinstance(text, str) else list(text)
    if max_tokens is not None:  # a corpus given whole is tokenised only as far as max_tokens reaches, by paragraphs
        # (joined by blank lines again, they are the same stream): a single text, such as a file, is read so too
        texts = leading_documents([paragraph for text in texts for paragraph in text.split("\n\n")], tokenizer, max_tokens)
    tokens = tokenize_stream(tokenizer, texts)
    if max_tokens is not None:  # the count a caller states beside the result: it must be the one scored
        check_whole_windows(max_tokens, seq_len, "max_tokens", "seq_len")
        if tokens.numel() < max_tokens:
            raise TooFewTokens(
                f"the text has {tokens.numel():,} tokens, fewer than max_tokens={max_tokens:,}: give more text, or lower "
                f"max_tokens (None scores all of it)", tokens.numel(),
            )  # fmt: skip
        tokens = tokens[:max_tokens]
    windows = tokens.numel() // seq_len
    if windows == 0:
        raise TooFewTokens(f"text has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}", tokens.numel())
    tokens = tokens[: windows * seq_len].reshape(windows, seq_len)
    check_calibration_inputs(model, tokens, "evaluation windows", "lower seq_len")
    device = check_device(device) if device is not None else next(model.parameters()).device
    total_nll = 0.0
    with evaluating(model), torch.no_grad():
        for start in tqdm(range(0, windows, batch_size), desc="Perplexity", leave=False):
            batch = tokens[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total_nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            ).item()
            del logits
    return exp_or_inf(_a_number(total_nll, "the evaluation text") / (windows * (seq_len - 1)))


def _warn_if_a_file_name(text: str) -> None:
    """A string is scored as text; one that names a file and holds no whitespace was most likely meant as the file."""
    if any(character.isspace() for character in text):
        return
    try:
        names_a_file = Path(text).is_file()
    except (OSError, ValueError):  # a long token: "File name too long"
        return
    if names_a_file:
        logger.warning(
            "evaluate_perplexity scores the string %r itself as the text, though it names a file: pass Path(%r) to "
            "score the file's contents", text, text,
        )  # fmt: skip


def evaluate_image_text_loss(
    model: nn.Module, processor: Any, pairs: Sequence[Any] | None = None, device: str | torch.device | None = None
) -> float:
    """Mean next-token NLL (nats) of each caption's tokens given its image.

    Each pair runs as the model would see it in calibration (``<image>`` placeholder, a newline,
    the caption); only the caption's tokens — those after the longest prefix shared with the
    processed prompt without the caption — are scored, never the image tokens or the prompt.
    (Tokenising the caption alone would not do: SentencePiece tokenizers mark a word start
    differently after a newline, and may merge the newline into the caption's first token.) ``pairs`` defaults to the bundled
    ``evaluation`` split of image-caption pairs (disjoint captions from calibration).
    """
    if pairs is None:
        from .data.images import image_text_pairs

        pairs = image_text_pairs("evaluation")
    device = check_device(device) if device is not None else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with evaluating(model), torch.no_grad():
        check_image_text(pairs, processor)
        if len(pairs) == 0:
            raise ValueError("pairs is empty: give at least one {'image': ..., 'text': caption}")
        placeholder = image_placeholder(processor)
        for index in range(len(pairs)):  # one pair at a time: its pixels exist only while it is scored
            pair = pairs[index]
            _check_pair(pair, index)
            if placeholder in pair["text"]:  # its own prompt: the caption could not be told from it
                raise ValueError(
                    f"pair {index}'s text holds the image placeholder {placeholder!r}: evaluate_image_text_loss places "
                    "the image itself and scores the text after it as the caption; give the caption alone"
                )
            batch = image_text_batch(pair, processor, index)
            full, bare = batch["input_ids"][0], image_text_batch({**pair, "text": ""}, processor, index)["input_ids"][0]
            length = min(full.numel(), bare.numel())
            differs = (full[:length] != bare[:length]).nonzero()
            shared = int(differs[0]) if differs.numel() else length  # a merged "\n" + first word counts as caption
            scored = full.numel() - shared
            if scored <= 0 or shared == 0:
                raise ValueError("the processed caption does not extend the processed prompt without it; cannot tell its tokens apart")
            ids = batch["input_ids"].to(device)
            logits = model(**{name: value.to(device) for name, value in batch.items()}, use_cache=False).logits
            total_nll += F.cross_entropy(
                logits[0, -scored - 1 : -1].float(), ids[0, -scored:], reduction="sum"
            ).item()
            total_tokens += scored
            del logits
    return _a_number(total_nll, "the captions") / total_tokens


def _check_pair(pair: Any, index: int) -> None:
    """A caption with its image (a missing key was a KeyError, a None caption a TypeError); checked as each pair is
    read, so a dataset's images are decoded once."""
    if not isinstance(pair, Mapping) or "image" not in pair or not isinstance(pair.get("text"), str):
        raise ValueError(f"pair {index} must be a mapping with an 'image' and a 'text' string (the caption), got {pair!r:.80}")


def _a_number(total_nll: float, scored: str) -> float:
    """``total_nll``, or an error where it is NaN: a NaN printed as a result reads as a measurement."""
    if math.isnan(total_nll):
        raise ValueError(
            f"the model's next-token loss is NaN on {scored}: its logits are not finite (weights holding NaN or inf, or "
            "a float16 overflow: evaluate in bfloat16 or float32)"
        )
    return total_nll

"""Turn a calibration source into model inputs: a ``[samples, seq_len]`` tensor of token ids for text.

Text sources: ``None`` (the bundled Wikipedia calibration split), a path to a text file (or to a file of
records, JSON Lines, JSON, CSV or Parquet, read as a ``Dataset``), a list of
strings, a ``datasets.Dataset`` with a ``text`` column, or token ids ready to use: a ``[samples,
seq_len]`` ``LongTensor`` or a list of equally long ones (each ``[seq_len]`` or ``[n, seq_len]``), or
a tokenised ``Dataset`` (``input_ids``, no ``text``), whose rows drawn with the seed are processed samples.
Text is tokenised as one stream and windows start at seeded random offsets, as in the
Wanda/SparseGPT reference loaders, so the same seed always yields the same windows. Documents holding
more than the windows need are not all tokenised: a streamed ``IterableDataset``'s first ones, another
source's drawn in seeded random order, until they hold twice the windows' tokens.
Multimodal sources (image-text pairs, or already processed batches) are in ``multimodal.py``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import torch

from ..data import wikipedia_text
from .engine import CalibrationInputs
from .multimodal import dataset_columns, image_text_batches, is_image_text, is_model_batches

logger = logging.getLogger(__name__)

# A streamed dataset is read until its text holds this many times the tokens the windows need, so that windows
# drawn at random offsets rarely overlap, and no further (a stream may be a whole corpus).
STREAM_TOKENS_PER_WINDOW_TOKEN = 2

CalibrationSource = Union[None, str, os.PathLike, Sequence[str], torch.Tensor, Any]


def calibration_inputs(
    source: CalibrationSource, tokenizer: Any, processor: Any, num_samples: int, seq_len: int, seed: int
) -> CalibrationInputs:
    """Processed batches for image-text pairs (through ``processor``) or ready batches; token windows for text."""
    source = _records_file_as_dataset(source)
    _check_not_dataset_dict(source)
    if is_image_text(source):
        return image_text_batches(source, processor, num_samples)
    columns = dataset_columns(source)
    if columns is not None and "text" not in columns and "input_ids" in columns:
        source = _tokenized_rows(source, columns, num_samples, seq_len, seed)
    if isinstance(source, Mapping) and "input_ids" in source:
        if not isinstance(source["input_ids"], torch.Tensor):
            raise TypeError(
                f"calibration batch's input_ids are a {type(source['input_ids']).__name__}, not a tensor: "
                "tokenize with return_tensors='pt'"
            )
        source = [source]  # one processed batch, e.g. a tokenizer's ``BatchEncoding``
    if is_model_batches(source):
        kept_whole: list[dict[str, tuple[int, ...]]] = []
        samples = [row for index, batch in enumerate(source) for row in unpadded(_checked_batch(dict(batch), index), kept_whole)]
        if not samples:
            raise ValueError("calibration batches hold no real token: every attention_mask is all zeros")
        if kept_whole:  # once for the source, not once per batch of a DataLoader
            logger.warning(
                "%d padded calibration batch(es) hold tensors without one entry per sample (the first: %s): they are used "
                "whole, their padded positions counting in the statistics; give one processed batch per sample to avoid that",
                len(kept_whole), kept_whole[0],
            )  # fmt: skip
        return samples
    if tokenizer is None and processor is not None:
        tokenizer = getattr(processor, "tokenizer", None)
    return _text_windows(source, tokenizer, num_samples, seq_len, seed)


def calibration_windows(
    source: CalibrationSource, tokenizer: Any, num_samples: int, seq_len: int, seed: int, model: Any = None, consumer: str = "this"
) -> torch.Tensor:
    """``[samples, seq_len]`` token windows from any source ``prune`` takes that can give them (text, token ids, a
    tokenised ``Dataset``, unpadded processed batches of one length), checked against ``model`` as ``prune`` checks
    them; for the tools that calibrate on windows only (``consumer`` names one in the error for other sources)."""
    if is_image_text(source):
        inputs = None
    else:
        inputs = as_token_windows(calibration_inputs(source, tokenizer, None, num_samples, seq_len, seed))
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(
            f"{consumer} calibrates on windows of token ids of one length: pass text, a LongTensor of token ids or a tokenised "
            "Dataset; padded or uneven processed batches and image-text pairs (which prune's per-layer methods take) cannot feed it"
        )
    if model is not None:
        check_calibration_inputs(model, inputs)
    return inputs


def _text_windows(source: CalibrationSource, tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return _check_token_tensor(source)
    if _is_tensor_list(source):
        return _joined_token_tensors(source)
    needed = STREAM_TOKENS_PER_WINDOW_TOKEN * num_samples * seq_len
    texts = _texts(source, tokenizer, needed)
    if tokenizer is None:
        raise TokenizerRequired()
    if not _is_streamed(source):  # a stream's first documents are already just what the windows need
        texts = drawn_documents(texts, tokenizer, needed, seed)
    return sample_windows(tokenize_stream(tokenizer, texts), num_samples, seq_len, seed)


def drawn_documents(texts: list[str], tokenizer: Any, tokens: int, seed: int) -> list[str]:
    """The documents the windows are cut from: all of ``texts`` where they cannot hold more than ``tokens`` tokens
    (no more UTF-8 bytes: a token is at least one); of a larger source (a C4 shard), documents drawn in seeded random
    order until they hold ``tokens``, as Wanda's C4 loader draws them: tokenising a corpus in one call costs ~140
    bytes per character (tens of GB for one shard)."""
    if len(texts) < 2 or _bytes(texts) <= tokens:
        return texts
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    drawn, held_enough = _first_holding((texts[index] for index in order), tokenizer, tokens)
    return drawn if held_enough else texts  # all of them needed: in their own order


def leading_documents(texts: list[str], tokenizer: Any, tokens: int) -> list[str]:
    """The first documents of ``texts`` whose stream holds at least ``tokens`` tokens, with two more (where the
    documents meet, the joined stream may tokenise a little differently from each alone): the stream's first
    ``tokens`` tokens are the whole join's, without tokenising the rest."""
    if len(texts) < 2 or _bytes(texts) <= tokens:
        return texts
    first, held_enough = _first_holding(texts, tokenizer, tokens)
    return texts[: len(first) + 2] if held_enough else texts


def _first_holding(texts: Iterable[str], tokenizer: Any, tokens: int) -> tuple[list[str], bool]:
    """The first of ``texts`` that hold ``tokens`` tokens, each tokenised alone and no further read, and whether they
    do (or ``texts`` ended first)."""
    tokenizer = text_tokenizer(tokenizer)
    first, held = [], 0
    for text in texts:
        first.append(text)
        held += len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if held >= tokens:
            return first, True
    return first, False


def _bytes(texts: list[str]) -> int:
    """An upper bound on the tokens of ``texts`` joined (a dummy-prefix tokenizer adds one per text)."""
    return sum(len(text.encode("utf-8")) + 2 for text in texts)


def _checked_batch(batch: dict[str, Any], index: int) -> dict[str, Any]:
    """A processed batch the model can run: ``[batch, seq_len]`` integer ``input_ids``, and an
    ``attention_mask`` of their shape (caught here, not deep in the embedding or attention)."""
    token_types = batch.get("token_type_ids")  # PreTrainedTokenizerFast's default output: all zeros says nothing to a decoder
    if isinstance(token_types, torch.Tensor) and not token_types.any():
        del batch["token_type_ids"]
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"calibration batch {index}: {name!r} is a {type(value).__name__}, not a tensor; a processed batch holds model "
                "inputs only (remove that column, e.g. dataset.remove_columns, or tokenize with return_tensors='pt')"
            )
    if ids.dtype not in (torch.long, torch.int) or ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(
            f"calibration batch {index}: input_ids must be a non-empty [batch, seq_len] tensor of token ids, got shape "
            f"{tuple(ids.shape)} {ids.dtype} (one sample: ids[None])"
        )
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape != ids.shape:  # a 4-D mask (packed samples) runs as given
        raise ValueError(f"calibration batch {index}: attention_mask {tuple(mask.shape)} must have input_ids' shape {tuple(ids.shape)}")
    return batch


# Files of records (not text to read as it is), by suffix: the ``datasets`` builder that reads them.
RECORD_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _records_file_as_dataset(source: CalibrationSource) -> CalibrationSource:
    """A path to a JSON Lines, JSON, CSV or Parquet file as the ``datasets.Dataset`` of its records (a ``text`` or
    tokenised ``input_ids`` column, as a ``Dataset`` given directly), not as text with its syntax in it."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    builder = RECORD_FILE_BUILDERS.get(path.suffix.lower())
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # raw text too long for a file name: named in _texts
        return source
    if builder is None or not is_file:
        return source
    return _records(path, builder, "calibration file")


def _records(path: Path, builder: str, what: str) -> Any:
    """The file's records, read in memory: ``datasets`` would otherwise keep an Arrow copy of every calibration
    file in the user's cache, and show its "Generating train split" bar when transformers' bars are off."""
    import datasets
    from transformers.utils.logging import is_progress_bar_enabled

    quiet = not is_progress_bar_enabled() and not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        # pandas reads an empty CSV field (and "NA", "null" ...) as a missing value: a text is kept as written
        as_written = {"keep_default_na": False} if builder == "csv" else {}
        with tempfile.TemporaryDirectory(prefix="optimum-prune-records-") as cache:
            # escaped: datasets reads data_files as a glob ("calib[12].jsonl" would read calib1.jsonl and calib2.jsonl)
            return datasets.load_dataset(
                builder, data_files=glob.escape(str(path)), split="train", cache_dir=cache, keep_in_memory=True, **as_written
            )
    except Exception as error:  # datasets raises its own error types for unparsable files
        raise ValueError(f"{what} {str(path)!r} could not be read as {builder} records: {error}") from None
    finally:
        if quiet:
            datasets.enable_progress_bars()


def file_texts(path: Path, what: str) -> list[str]:
    """A file's texts, read as calibration reads a path: a records file (``RECORD_FILE_BUILDERS``) gives its ``text``
    column (blank records kept: evaluation scores a list of texts joined as the wikitext protocol joins its lines),
    any other file its UTF-8 contents."""
    if not path.is_file():  # a raw FileNotFoundError / IsADirectoryError otherwise
        raise ValueError(f"{what} {str(path)!r} is not a file")
    builder = RECORD_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        return [read_text_file(path, what)]
    records = _records(path, builder, what)
    if "text" not in records.column_names:
        raise ValueError(f"{what} {str(path)!r} holds records without a 'text' column (it has {records.column_names}); name it 'text'")
    _check_strings(records["text"], f"{what} {str(path)!r}")
    return [text for text in records["text"] if text is not None]


def _check_strings(texts: Sequence[Any], where: str) -> None:
    """Each text a string or None (a missing value): a record holding a list of paragraphs failed later on ``.strip``."""
    for index, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{where}: text {index} is a {type(text).__name__} ({text!r:.60}), not a string; a 'text' column holds one string per record")


def _check_not_dataset_dict(source: CalibrationSource) -> None:
    """A ``DatasetDict`` (what ``load_dataset`` returns without ``split=``) holds splits, not rows."""
    if isinstance(getattr(source, "column_names", None), Mapping):
        raise ValueError(
            f"calibration is a DatasetDict of splits {sorted(source.column_names)}: pass one split, e.g. "
            f"dataset[{next(iter(source.column_names))!r}] (or load_dataset(..., split=...))"
        )


def _tokenized_rows(dataset: Any, columns: list[str], num_samples: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """A tokenised ``datasets.Dataset`` (an ``input_ids`` column, no ``text``) as processed samples: ``num_samples``
    rows drawn with ``seed`` (all of a smaller one; an ``IterableDataset``'s first), each the first ``seq_len`` of its
    real tokens (where an ``attention_mask`` column marks padding, left or right, it is dropped first; other columns,
    e.g. ``labels``, are not model inputs here)."""
    columns = [name for name in ("input_ids", "attention_mask") if name in columns]
    plain = dataset.select_columns(columns).with_format(None)  # lists, whatever format it was set to (torch, numpy)
    if hasattr(dataset, "__len__"):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values.tolist()
        drawn = ((index, plain[index]) for index in chosen)
    else:  # an IterableDataset (streamed): its first rows
        drawn = zip(range(num_samples), plain)
    rows = []
    for index, row in drawn:
        ids = _listed(row["input_ids"])
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"calibration dataset row {index}: input_ids must be a non-empty list of token ids, got {ids!r:.60}")
        mask = _listed(row.get("attention_mask"))
        if isinstance(mask, list) and len(mask) == len(ids):
            ids = [token for token, real in zip(ids, mask) if real]
        if ids:
            rows.append({"input_ids": torch.tensor([ids[:seq_len]], dtype=torch.long)})
    if not rows:
        raise ValueError("calibration dataset holds no real token: it has no rows, or every row's attention_mask is all zeros")
    return rows


def _listed(value: Any) -> Any:
    """A list a CSV cell holds as its JSON text (``"[101, 2023]"``: CSV has no list type), else ``value``."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:  # not JSON: the caller names the row
            return value
    return value


def as_token_windows(inputs: CalibrationInputs) -> CalibrationInputs:
    """Processed samples that are only token ids of one length, without padding (a tokenised ``Dataset``'s rows
    cut to ``calibration_seq_len``, a tokenizer's unpadded batch), as the ``[samples, seq_len]`` windows the
    methods that calibrate on windows take; anything else as it is."""
    if isinstance(inputs, torch.Tensor) or not inputs:
        return inputs
    if any(set(batch) - {"input_ids", "attention_mask"} for batch in inputs):
        return inputs
    if any("attention_mask" in batch and not bool(batch["attention_mask"].all()) for batch in inputs):
        return inputs
    if len({batch["input_ids"].shape[1] for batch in inputs}) != 1:
        return inputs
    return torch.cat([batch["input_ids"] for batch in inputs])


def unpadded(batch: dict[str, torch.Tensor], kept_whole: list[dict[str, tuple[int, ...]]]) -> list[dict[str, torch.Tensor]]:
    """A padded batch as one batch per sample holding its real tokens only, so that no statistic
    counts padding (as calibrating on unpadded samples would) and left-padded samples get the
    positions they would have alone. Tensors of per-token values (shaped like ``input_ids``) keep
    the sample's real positions; other tensors with one entry per sample (``pixel_values`` of one
    image each, ``image_sizes``) keep the sample's entry. A batch without padding is kept whole; a padded
    one that cannot be split (a tensor without one entry per sample) too, its shapes added to ``kept_whole``."""
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape or ids.dim() != 2 or bool(mask.all()):
        return [batch]
    samples = split_per_sample(batch, mask.bool())
    if samples is None:
        kept_whole.append({name: tuple(t.shape) for name, t in batch.items()})
        return [batch]
    return samples


def split_per_sample(batch: Mapping[str, torch.Tensor], real: torch.Tensor) -> list[dict[str, torch.Tensor]] | None:
    """``batch`` (2-D ``input_ids``) as one batch per sample holding the positions ``real`` marks (a sample without any
    left out); None where a tensor holds no entry per sample."""
    samples, length = batch["input_ids"].shape
    if not all(t.shape[:2] == (samples, length) or t.shape[:1] == (samples,) for t in batch.values() if t.dim()):
        return None
    return [
        {name: _sample_part(t, index, row, (samples, length)) for name, t in batch.items()}
        for index, row in enumerate(real)
        if row.any()
    ]


def _sample_part(tensor: torch.Tensor, index: int, real: torch.Tensor, token_shape: tuple[int, int]) -> torch.Tensor:
    if not tensor.dim():
        return tensor
    if tensor.shape[:2] == token_shape:
        return tensor[index : index + 1, real]
    return tensor[index : index + 1]


def check_token_ids(model: Any, inputs: CalibrationInputs) -> None:
    """Token ids outside the model's embedding table mean a tokenizer of another model; without this
    check the first forward fails deep inside ``torch.embedding`` with "index out of range"."""
    vocabulary = model.get_input_embeddings().num_embeddings
    ids = [t for t in _token_ids(inputs) if t.numel()]
    if not ids:
        return
    smallest, largest = min(int(t.min()) for t in ids), max(int(t.max()) for t in ids)
    if smallest < 0 or largest >= vocabulary:
        raise ValueError(
            f"token ids run from {smallest} to {largest}, outside the {vocabulary} embeddings of "
            f"{type(model).__name__}: the tokenizer (or the token ids) belong to another model"
        )


# Text is cut to calibration_seq_len; token ids and processed batches are used as given.
SHORTER_CALIBRATION = (
    "lower PruningConfig.calibration_seq_len (text), or cut token ids given as one long stream into windows "
    "(optimum_prune.calibration.sample_windows(ids[0], num_samples, seq_len, seed))"
)


def check_calibration_inputs(model: Any, inputs: CalibrationInputs, what: str = "calibration windows", fix: str = SHORTER_CALIBRATION) -> None:
    """``check_token_ids``, and a warning for windows longer than the model's context."""
    check_token_ids(model, inputs)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(t.shape[-1] for t in _token_ids(inputs))
    if context is not None and longest > context:
        logger.warning(
            "%s of %d tokens are longer than %s's context (max_position_embeddings %d): the positions past it were never "
            "trained, so what is measured there misjudges the model; %s",
            what, longest, type(model).__name__, context, fix,
        )  # fmt: skip


def _token_ids(inputs: CalibrationInputs) -> list[torch.Tensor]:
    return [inputs] if isinstance(inputs, torch.Tensor) else [batch["input_ids"] for batch in inputs]


def sample_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens from a 1-D token stream, at seeded random offsets."""
    if tokens.dim() != 1:  # a tokenizer's [1, N] output sliced by rows gives empty windows
        raise ValueError(f"sample_windows takes a 1-D token stream, got shape {tuple(tokens.shape)}: pass ids[0] of a [1, N] tensor")
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"sample_windows needs num_samples and seq_len of at least 1, got {num_samples} and {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(
            f"calibration has {tokens.numel()} tokens, fewer than one window of PruningConfig.calibration_seq_len {seq_len}; "
            "give more text or lower PruningConfig.calibration_seq_len"
        )
    if tokens.numel() < num_samples * seq_len:
        logger.warning(
            "calibration text holds %d tokens, fewer than %d windows of %d tokens take (%d): the windows overlap, so the "
            "statistics see fewer distinct tokens than the report counts; give more text, or fewer or shorter windows",
            tokens.numel(), num_samples, seq_len, num_samples * seq_len,
        )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def tokenize_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """One token stream for documents joined by blank lines, without BOS/EOS insertion. A processor stands for its
    tokenizer. The stream is longer than the model's context by design (windows are cut from it), so the tokenizer's
    warning that it would not fit one forward is not shown."""
    tokenizer = text_tokenizer(tokenizer)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or a processor's (``AutoProcessor`` output given as ``tokenizer=``: called on text alone, a
    processor would read the text as images)."""
    inner = getattr(tokenizer, "tokenizer", None) if hasattr(tokenizer, "image_processor") else None
    return inner if inner is not None else tokenizer


class TokenizerRequired(ValueError):
    """Text calibration without a tokenizer: a caller that can find one (a checkpoint folder's) names where it looked."""

    def __init__(self) -> None:
        super().__init__("tokenizer is required to tokenise text calibration data; pass tokenizer= or a LongTensor of token ids")


def _texts(source: CalibrationSource, tokenizer: Any, stream_tokens: int) -> list[str]:
    """The non-blank texts of ``source``; of a streamed dataset, the first rows holding ``stream_tokens`` tokens."""
    if source is None:
        texts = [wikipedia_text("calibration")]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # a long raw text: "File name too long"
            is_file = False
        if not is_file:
            kind = "is a directory" if _is_dir(path) else "does not exist"
            raise ValueError(
                f"calibration file {str(path)[:200]!r} {kind}; a string names a local text file (dataset names are not "
                "downloaded: load one with datasets.load_dataset and pass the Dataset, which needs a 'text' column), "
                "and raw text goes in a list of strings"
            )
        texts = [read_text_file(path, "calibration file")]
    elif hasattr(source, "column_names"):
        columns = dataset_columns(source)
        if "text" not in columns:
            raise ValueError(f"calibration dataset needs a 'text' column (or tokenised 'input_ids'); it has {columns}")
        texts = _stream_prefix(source, tokenizer, stream_tokens) if _is_streamed(source) else list(source["text"])
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
    else:
        raise TypeError(
            "calibration must be None, a text file path, a list of strings, a datasets.Dataset with a 'text' column, "
            "a LongTensor of token ids (or a list of them), image-text pairs ({'image': ..., 'text': ...}) or processed batches "
            f"({{'input_ids': ..., ...}}); got {type(source).__name__}"
        )
    _check_strings(texts, "calibration")
    texts = [t for t in texts if t is not None and t.strip()]  # a dataset's missing text is None
    if not texts:
        raise ValueError("calibration is empty: it contains no non-blank text")
    return texts


def _is_streamed(source: CalibrationSource) -> bool:
    """A streamed ``IterableDataset``: rows read in order, with no length."""
    return hasattr(source, "column_names") and not hasattr(source, "__len__")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _stream_prefix(dataset: Any, tokenizer: Any, tokens: int) -> list[str]:
    """The ``text`` of a streamed dataset's first rows, until they hold ``tokens`` tokens (or the stream ends)."""
    if tokenizer is None:
        raise TokenizerRequired()
    rows = (row["text"] for row in dataset.select_columns(["text"]))
    return _first_holding((text for text in rows if text is not None and text.strip()), tokenizer, tokens)[0]


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; another encoding is named with ``what`` (Python's own error names no file)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8") from None


def _check_token_tensor(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.numel() == 0:
        raise ValueError(
            f"calibration tensor must be a non-empty [samples, seq_len] LongTensor, got shape {tuple(tokens.shape)} {tokens.dtype}"
        )
    return tokens


def _is_tensor_list(source: CalibrationSource) -> bool:
    return isinstance(source, Sequence) and bool(source) and all(isinstance(t, torch.Tensor) for t in source)


def _joined_token_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``[samples, seq_len]`` tensor from a list of ``[seq_len]`` / ``[n, seq_len]`` token tensors."""
    rows = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    lengths = sorted({t.shape[-1] for t in rows})
    if any(t.dim() != 2 for t in rows) or len(lengths) > 1:
        raise ValueError(
            f"calibration token tensors must all be [seq_len] or [n, seq_len] of one length, got shapes "
            f"{sorted({tuple(t.shape) for t in tensors})}; cut them to one length, or give prune() one processed batch "
            "per sample ([{'input_ids': ids[None]}, ...]), which may differ in length"
        )
    return _check_token_tensor(torch.cat(rows))

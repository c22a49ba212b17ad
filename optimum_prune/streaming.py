"""Prune a checkpoint that never fits in memory: decoder layers stay on disk until their turn.

    report = prune_checkpoint("Llama-3-70B/", "Llama-3-70B-wanda/", PruningConfig(method="wanda", sparsity="2:4"),
                              tokenizer=tokenizer, device="cuda")

The model is built on the meta device (Accelerate's ``init_empty_weights``); only what runs
before decoder layer 0 (the embeddings) is loaded. The sequential engine then takes one layer at
a time: its weights are read from the source safetensors shards onto the compute device, the
layer is pruned, its outputs become the next layer's calibration inputs, and its tensors are
written to their own shard and released. Peak memory is the embeddings, one layer and the
calibration activations, whatever the depth.

The shards are written into ``.<output>.partial/`` beside the output, each renamed into place
when whole, so a killed run loses at most the layer in progress. Rerunning the same call resumes:
finished layers are read back (their outputs recomputed, not pruned again) and the run goes on
from the first missing one. Only when every layer is written do the index, the config and the
tokenizer files go in and the folder is renamed to the output: a checkpoint that looks complete
is complete. The result loads with stock ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic_files import (
    check_replaceable, claimed_folder, give_output_mode, held_exclusively, in_checkpoint_store, is_checkpoint_file,
    new_file_mode, new_temporary, private_folder, remove_leftovers, replace_directory, write_text_atomic,
)  # fmt: skip
from .calibration import CalibrationInputs, CalibrationSource, calibration_inputs, check_token_ids
from .calibration.engine import all_finite, calibration_digest
from .calibration.sources import TokenizerRequired
from .config import CONFIG_NAME, PruningConfig, as_pruning_config, readable_step
from .models import as_dtype, load_tokenizer, missing_tokenizer, unreadable_checkpoint
from .report import PruningReport
from .saving import REPORT_NAME, SCORES_PLOT_NAME, drop_gguf_copy, save_tokenizer, write_report
from .structure.loading import built_without_weights, records_layer_shapes

logger = logging.getLogger(__name__)
INDEX_NAME = "model.safetensors.index.json"
REST_SHARD = "model-rest.safetensors"
RUN_RECORD = "streaming-run.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
NOTES = "streaming-notes.json"  # in the partial folder: what each finished layer's pruning reported, for a resumed run
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@contextmanager
def opened(file: Path) -> Iterator[Any]:
    """``safe_open`` of ``file``, whose corruption (also found while reading a tensor) is one clear error."""
    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise unreadable_checkpoint(file, error) from error


class CheckpointReader:
    """The tensors of a safetensors checkpoint (one file or shards with an index), read by name."""

    def __init__(self, directory: Path) -> None:
        index, single = directory / INDEX_NAME, directory / "model.safetensors"
        if index.is_file():
            try:
                self.weight_map = {name: directory / file for name, file in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
            except (ValueError, KeyError, AttributeError, TypeError) as error:  # ValueError: also UnicodeDecodeError
                raise ValueError(
                    f"{index} is not a safetensors index (a JSON object with a 'weight_map'; {type(error).__name__}: {error}); "
                    "the checkpoint is incomplete or corrupt: save or copy it again"
                ) from None
        elif single.is_file():
            with opened(single) as handle:
                self.weight_map = dict.fromkeys(handle.keys(), single)
        else:
            raise ValueError(f"{str(directory)!r} holds no safetensors weights ({INDEX_NAME} or model.safetensors)")
        if not self.weight_map:
            raise ValueError(f"{str(directory)!r}: its safetensors weights hold no tensor; the checkpoint is incomplete: save or copy it again")

    def check_layers(self, layers: dict[str, nn.Module]) -> None:
        """Before any layer is pruned, not hours in: every shard opens (a missing, truncated or corrupt copy fails
        here) and holds each decoder layer's tensors (``layers``: on the meta device, by qualified name) at the
        shape the config gives them, as floats."""
        for file in sorted(set(self.weight_map.values())):
            if not file.is_file():
                raise ValueError(f"{file} is listed in {INDEX_NAME} but missing; the checkpoint is incomplete: save or copy it again")
            with opened(file):
                pass
        expected = {f"{prefix}.{name}": tensor for prefix, layer in layers.items() for name, tensor in _meta_tensors(layer).items()}
        missing = [name for name in expected if name not in self.weight_map]
        if missing:
            raise ValueError(
                f"the checkpoint has no tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                f"({len(missing)} in all) for its decoder layers; it is incomplete: save or copy it again"
            )
        for file, names in self._by_file(list(expected)).items():
            with opened(file) as handle:
                for name in names:
                    stored = handle.get_slice(name)
                    shape, dtype = list(stored.get_shape()), stored.get_dtype()
                    if shape != list(expected[name].shape) or dtype not in SAFETENSORS_DTYPES:
                        raise ValueError(
                            f"{file} stores {name} as {dtype} {shape}; its config makes it a float tensor of shape "
                            f"{list(expected[name].shape)}: the checkpoint and its config.json do not belong together"
                        )

    def check_rest(self, model: nn.Module, layer_names: list[str]) -> None:
        """The parameters outside the decoder layers (embeddings, final norm, head) are all stored (a tied head may not be)."""
        prefixes = tuple(f"{name}." for name in layer_names)
        names = [name for name, _ in model.named_parameters(remove_duplicate=True) if not name.startswith(prefixes)]
        head = model.get_output_embeddings()
        tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
        heads = {f"{name}.weight" for name, module in model.named_modules() if module is head} if tied else set()
        missing = [name for name in names if name not in self.weight_map and name not in heads]
        if missing:
            raise ValueError(
                f"the checkpoint has no tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} outside its decoder "
                "layers; it is incomplete: save or copy it again"
            )

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for file, file_names in self._by_file(names).items():
            with opened(file) as handle:
                tensors.update({name: handle.get_tensor(name) for name in file_names})
        return tensors

    def stored_size(self, dtype: torch.dtype) -> int:
        """Bytes the checkpoint's tensors take written as ``dtype`` (the pruned output's size: zeros are stored),
        from the shards' headers."""
        elements = 0
        for file, file_names in self._by_file(list(self.weight_map)).items():
            with opened(file) as handle:
                elements += sum(math.prod(handle.get_slice(name).get_shape()) for name in file_names)
        return elements * dtype.itemsize

    def _by_file(self, names: list[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        return by_file

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first tensor, read from its header."""
        name, file = next(iter(self.weight_map.items()))
        with opened(file) as handle:
            stored = handle.get_slice(name).get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{file} stores {name} as {stored}; offloaded pruning reads {', '.join(SAFETENSORS_DTYPES)} checkpoints "
                "(convert it, or pass dtype=)"
            )
        return SAFETENSORS_DTYPES[stored]

    def under(self, prefix: str) -> list[str]:
        return [name for name in self.weight_map if name.startswith(prefix + ".")]


class LayerStream:
    """Decoder layers kept on disk: ``resident`` loads one (staged if already pruned, else from the
    source), and after a clean pass writes it to the staging folder and releases it to meta."""

    def __init__(self, reader: CheckpointReader, staging: Path, layer_names: list[str], device: torch.device, dtype: torch.dtype):
        self.reader, self.staging, self.layer_names, self.device, self.dtype = reader, staging, layer_names, device, dtype
        self.unknown_reported = False
        self.notes: dict[int, dict[str, Any]] = {}  # pruned, not yet written
        self.written_notes: dict[str, Any] = _written_notes(staging / NOTES)
        self._drop_unreadable_shards()

    def note(self, index: int, note: dict[str, Any]) -> None:
        """What layer ``index``'s pruning reported: written with its shard, read back by ``noted``. Not in the shard's
        metadata: safetensors writes several metadata keys in a random order, so identical runs gave other bytes."""
        self.notes[index] = note

    def noted(self, index: int) -> dict[str, Any] | None:
        return self.written_notes.get(str(index))

    def shard(self, index: int) -> Path:
        return self.staging / f"model-layer-{index:05d}.safetensors"

    def finished(self, index: int) -> bool:
        return self.shard(index).is_file()

    def _drop_unreadable_shards(self) -> None:
        """A staged layer is renamed into place whole, so one that cannot be opened was damaged after (cut off by a
        power loss before the disk held it, a copy): that layer is pruned again, as a resumed run prunes it alike."""
        for index in range(len(self.layer_names)):
            shard = self.shard(index)
            if not shard.is_file():
                continue
            try:
                with safe_open(shard, framework="pt"):
                    pass
            except SafetensorError as error:
                logger.warning("%s cannot be read (%s): layer %d is pruned again", shard, error, index)
                shard.unlink()

    @contextmanager
    def resident(self, index: int, layer: nn.Module) -> Iterator[None]:
        """The layer as pruning needs it: its pruned tensors when finished, else the source's, saved after."""
        finished = self.finished(index)
        prefix = self.layer_names[index]
        if finished:
            with opened(self.shard(index)) as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        else:
            tensors = self.reader.read(self.reader.under(prefix))
        self._load(layer, prefix, tensors)
        try:
            yield
            if not finished:
                self._save(index, layer, prefix)
        finally:
            _release(layer)

    @contextmanager
    def reading(self, index: int, layer: nn.Module) -> Iterator[None]:
        """The source (dense) layer, for passes that only observe (OWL's outlier statistics)."""
        prefix = self.layer_names[index]
        self._load(layer, prefix, self.reader.read(self.reader.under(prefix)))
        try:
            yield
        finally:
            _release(layer)

    def _load(self, layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        known = {name for name, _ in (*layer.named_parameters(), *layer.named_buffers())}
        unknown = []
        for name, tensor in tensors.items():
            local = name.removeprefix(prefix + ".")
            if local in known:
                set_module_tensor_to_device(layer, local, self.device, value=_cast(name, tensor, self.dtype), dtype=self.dtype)
            else:
                unknown.append(local)
        if unknown and not self.unknown_reported:  # e.g. rotary_emb.inv_freq of older checkpoints: from_pretrained drops them too
            logger.warning("the checkpoint's layers hold tensors the model does not have (%s ...); they are left out", ", ".join(unknown[:3]))
            self.unknown_reported = True
        missing = _meta_tensors(layer)
        if missing:
            raise ValueError(f"the checkpoint has no tensor(s) {', '.join(f'{prefix}.{m}' for m in missing)} for {prefix}")

    def _save(self, index: int, layer: nn.Module, prefix: str) -> None:
        tensors = {f"{prefix}.{name}": t.detach().contiguous().cpu() for name, t in layer.state_dict().items()}
        note = self.notes.pop(index, None)
        if note is not None or str(index) in self.written_notes:  # first: a finished layer's note is there
            self.written_notes[str(index)] = note  # (None replaces one a run started over left)
            write_text_atomic(self.staging / NOTES, json.dumps(self.written_notes))
        kept = f" (layers 0-{index - 1} are kept in {self.staging})" if index else ""
        resume = f"rerun the same call: it resumes from layer {index}{kept}"
        _write_shard(tensors, self.shard(index), {"format": "pt"}, resume)

    def written_size(self) -> int:
        """Bytes of the layer shards already in the staging folder (a resumed run's)."""
        return sum(self.shard(index).stat().st_size for index in range(len(self.layer_names)) if self.finished(index))


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], resume: str) -> None:
    """``save_file`` to a temporary file renamed to ``path`` when whole, readable as the umask allows (safetensors 0.8
    creates its files 0600). A full disk (safetensors reports it in a message) leaves no partial file and is said
    plainly, with how to go on (``resume``)."""
    temporary, descriptor = new_temporary(path)  # save_file opens it by name: in a folder only this user can write in
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=metadata)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if _out_of_space(error):
            raise OSError(
                errno.ENOSPC, f"no space left on the disk holding {path.parent} to write {path.name}; free space, then {resume}"
            ) from error
        raise
    temporary.chmod(new_file_mode())
    os.replace(temporary, path)


def _out_of_space(error: BaseException) -> bool:
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(error, "errno", None) in codes or any(f"(os error {code})" in str(error) for code in codes)


def _warn_if_short_of_space(stream: LayerStream, reader: CheckpointReader) -> None:
    """Said before hours of pruning, not at the layer that finds the disk full (a warning: space may be freed
    meanwhile, and a compressing file system stores zeros in less)."""
    needed = reader.stored_size(stream.dtype) - stream.written_size()
    free = shutil.disk_usage(stream.staging).free
    if free < needed:
        logger.warning(
            "the disk holding %s has %.3g GB free; the pruned checkpoint needs about %.3g GB more (pruned weights are "
            "stored dense): the run will stop when the disk is full. Free space first, or give an output_dir on "
            "another disk", stream.staging, free / 1e9, needed / 1e9,
        )


def _release(layer: nn.Module) -> None:
    """Free the layer's tensors (to meta), but for the buffers no checkpoint holds (non-persistent, e.g.
    the rotary ``inv_freq`` each Qwen2-MoE attention keeps), which its next load could not restore."""
    from accelerate.utils import set_module_tensor_to_device

    saved = layer.state_dict(keep_vars=True).keys()
    unsaved = {name: buffer for name, buffer in layer.named_buffers() if name not in saved}
    layer.to("meta")
    for name, buffer in unsaved.items():
        set_module_tensor_to_device(layer, name, buffer.device, value=buffer)


def _written_notes(path: Path) -> dict[str, Any]:
    """The notes a partial run wrote (none yet: empty); a damaged file is named."""
    if not path.is_file():
        return {}
    try:
        notes = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        notes = error
    if not isinstance(notes, dict) or not all(note is None or isinstance(note, dict) for note in notes.values()):
        raise ValueError(f"{path} is damaged ({notes!s:.80}): delete the partial folder {str(path.parent)!r} to start over")
    return notes


def _meta_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in (*module.named_parameters(), *module.named_buffers()) if tensor.is_meta}


def prune_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: PruningConfig | Mapping[str, Any],
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    activation_device: str | torch.device | None = None,
) -> PruningReport:
    """Prune the checkpoint in ``source`` layer by layer from disk into ``output_dir`` (see the module
    docstring); rerunning after an interruption resumes. ``dtype`` is what layers are pruned and
    saved in (default: the one config.json declares, else its first tensor's); ``activation_device``
    is where calibration activations wait between layers (``prune``'s). Per-layer methods (magnitude,
    wanda, sparsegpt), uniform or OWL allocation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import get_adapter
    from .api import check_moe_options, check_offloadable, prune_loaded, warn_unused_calibration
    from .devices import check_activation_device, check_device
    from .ignoring import check_ignore_patterns
    from .runs import planned_linears

    source, output_dir = Path(source), Path(output_dir)
    config = as_pruning_config(config)
    dtype = _requested_dtype(dtype)
    if source.suffix == ".gguf":
        raise ValueError(
            f"source {str(source)!r} is a GGUF file: its layers are read from safetensors shards; prune it in memory "
            "(without offloading), or convert it first (load_model(path) then save_pretrained)"
        )
    if not (source / "config.json").is_file():
        raise ValueError(f"source {str(source)!r} is not a checkpoint directory (no config.json)")
    check_replaceable(output_dir, source, "output_dir")  # before hours of pruning, not at the final rename
    remove_leftovers(output_dir.absolute())  # what killed saves to it left: the disk space is free before pruning
    reader = CheckpointReader(source)
    try:
        model_config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, TypeError, AttributeError) as error:  # invalid JSON, or JSON that is not an object
        raise ValueError(f"{str(source / 'config.json')!r} could not be read as a model config ({type(error).__name__}: {error}); "
                         "the checkpoint is damaged: save or copy it again") from None
    dtype = dtype or _declared_dtype(model_config) or reader.dtype()
    model_config.dtype = dtype  # what the saved config.json says: dtype="auto" reloads the pruned weights as written
    if records_layer_shapes(getattr(model_config, "quantization_config", None)):  # its layers would be built at stock shapes
        raise ValueError(
            f"source {str(source)!r} is a structured result with per-layer shapes (its quantization_config records "
            "them): offloaded pruning builds the layers at the config's stock shapes; load it in memory "
            "(optimum_prune.load_model) and prune it there"
        )
    try:
        model = built_without_weights(lambda: AutoModelForCausalLM.from_config(model_config, dtype=dtype), buffers=False)
    except ValueError:  # transformers: "Unrecognized configuration class ..."
        raise ValueError(
            f"source {str(source)!r} holds a {type(model_config).__name__} model, not a causal LM: pruning from disk "
            "streams a causal LM's decoder layers; load this one in memory (its from_pretrained) and prune it there"
        ) from None
    except TypeError as error:  # a size of the wrong type, e.g. "hidden_size": "64"
        raise ValueError(f"{str(source / 'config.json')!r} does not describe a model that can be built ({error}); "
                         "the checkpoint is damaged: save or copy it again") from None
    adapter = get_adapter(model)
    # The checks that need no data, before any folder is made:
    check_offloadable(config, adapter)
    check_moe_options(adapter, config)
    check_ignore_patterns(adapter, config.ignore, "PruningConfig.ignore")
    check_device(device or "cpu")
    check_activation_device(activation_device, config)
    planned_linears(adapter, config)  # the method's and allocation's own checks (N:M widths, ...)
    layer_names = adapter.layer_names()
    reader.check_layers(dict(zip(layer_names, adapter.decoder_layers())))
    reader.check_rest(model, layer_names)
    layer_tensors = {name for prefix in layer_names for name in reader.under(prefix)}
    rest = [name for name in reader.weight_map if name not in layer_tensors]
    _check_castable(reader, rest, dtype)
    _load_inputs(model, adapter.capture_modules(), reader, rest, dtype)
    inputs = None
    warn_unused_calibration(config, calibration)
    if config.requires_calibration:
        inputs = _calibration_inputs(calibration, tokenizer, config, source)
        check_token_ids(model, inputs)  # refused before anything is staged; prune() warns of over-long windows, once
    with _staging(output_dir, _run_record(source, config, dtype, inputs)) as staging:
        stream = LayerStream(reader, staging, layer_names, torch.device(device or "cpu"), dtype)
        _warn_if_short_of_space(stream, reader)
        report = prune_loaded(
            model, config, calibration=inputs, device=stream.device, activation_device=activation_device, offload=stream
        )
        _finish_checkpoint(model, reader, rest, stream, tokenizer, config, report, source, output_dir)
    return report


def _calibration_inputs(
    calibration: CalibrationSource | None, tokenizer: Any, config: PruningConfig, source: Path
) -> CalibrationInputs:
    """Text is tokenised with the checkpoint's own tokenizer unless one is given, as load_model and the CLI load it,
    and only when it is text (token ids need none, and the folder's may not load); the output keeps the source's
    tokenizer files as they are."""
    def inputs(tokenizer: Any) -> CalibrationInputs:
        return calibration_inputs(calibration, tokenizer, None, config.num_calibration_samples, config.calibration_seq_len, config.seed)

    try:
        return inputs(tokenizer)
    except TokenizerRequired:
        if tokenizer is not None:
            raise
    own = load_tokenizer(source)
    if own is None:
        raise missing_tokenizer(source, "calibration", "tokenizer=")
    return inputs(own)


def _requested_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``prune_checkpoint``'s ``dtype``: one it reads and writes, as a torch dtype or its name (``as_dtype``'s); None
    or ``"auto"``, the checkpoint's."""
    if dtype is None or dtype == "auto":
        return None
    resolved = as_dtype(dtype)
    if resolved not in SAFETENSORS_DTYPES.values():
        named = ", ".join(str(d).removeprefix("torch.") for d in SAFETENSORS_DTYPES.values())
        raise ValueError(f"dtype {dtype!r}: offloaded pruning reads and writes {named} (a torch dtype or its name, e.g. 'bf16')")
    return resolved


def _declared_dtype(model_config: Any) -> torch.dtype | None:
    """The dtype config.json declares (what ``from_pretrained(dtype="auto")`` loads), when it is one offloading reads:
    a checkpoint may keep a few tensors (norms, a router) in float32 beside bfloat16 linears."""
    declared = getattr(model_config, "dtype", None)
    declared = getattr(torch, declared, None) if isinstance(declared, str) else declared
    return declared if declared in SAFETENSORS_DTYPES.values() else None


def _load_inputs(model: nn.Module, modules: list[nn.Module], reader: CheckpointReader, rest: list[str], dtype: torch.dtype) -> None:
    """Materialise on the CPU what runs before decoder layer 0 (the embeddings): all that
    calibration needs besides the layers. The final norm and the head stay on meta."""
    from accelerate.utils import set_module_tensor_to_device

    prefixes = tuple(f"{name}." for name, module in model.named_modules() if any(module is m for m in modules))
    for name, tensor in reader.read([name for name in rest if name.startswith(prefixes)]).items():
        set_module_tensor_to_device(model, name, "cpu", value=_cast(name, tensor, dtype), dtype=dtype)


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as ``dtype``, refused where float16 cannot hold its finite values (past 65504, as bfloat16 and float32
    weights may be): the cast would make the inf that is then written, or blamed on the checkpoint."""
    if not tensor.is_floating_point():  # integer buffers keep their dtype, as set_module_tensor_to_device keeps them
        return tensor
    converted = tensor.to(dtype)
    if dtype == torch.float16 and tensor.dtype != dtype and not all_finite(converted) and all_finite(tensor):
        own = str(tensor.dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} holds values up to {float(tensor.abs().max()):.4g} ({tensor.dtype}), past float16's largest (65504): "
            f"pruning it in float16 would write inf; give dtype={own!r} (the checkpoint's){'' if own == 'bfloat16' else ' or bfloat16'}"
        )
    return converted


def _check_castable(reader: CheckpointReader, names: list[str], dtype: torch.dtype) -> None:
    """Before any layer is pruned: the tensors outside the layers (read only at the end) hold in ``dtype``."""
    if dtype == torch.float16:
        for name in names:  # one at a time: the embeddings and the head may be GBs each
            _cast(name, reader.read([name])[name], dtype)


def _run_record(source: Path, config: PruningConfig, dtype: torch.dtype, inputs: CalibrationInputs | None) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one for their layers to belong together."""
    calibration = None if inputs is None else calibration_digest(inputs)
    return {"source": _source_record(source), "pruning_config": config.to_dict(), "dtype": str(dtype), "calibration": calibration}


def _differing(previous: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The keys of ``record`` a partial run's ``previous`` one differs in. Configs compare as configs: one an earlier
    version recorded lacks the options added since, at their defaults, and is the same recipe."""
    differing = []
    for key, value in record.items():
        if key == "pruning_config":
            same = readable_step(previous.get(key)) == PruningConfig.from_dict(value)
        else:
            same = previous.get(key) == value
        if not same:
            differing.append(key)
    return differing


def _source_record(source: Path) -> dict[str, str]:
    """The source's path and files: a checkpoint replaced at the same path (another revision downloaded
    there) must not resume a run."""
    return {"path": str(source.resolve()), "files": checkpoint_fingerprint(source)}


def checkpoint_fingerprint(directory: Path) -> str:
    """A digest of a checkpoint directory's ``config.json`` and of its weight files' names, sizes and
    modification times: it changes when the checkpoint is replaced, without reading the weights."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(path for path in directory.iterdir() if path.is_file() and _is_weights(path.name)):
        stat = file.stat()
        digest.update(f"{file.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@contextmanager
def _staging(output_dir: Path, record: dict[str, Any]) -> Iterator[Path]:
    """The partial run's folder, held by this process until the block ends: resumed when the same run
    (``record``) started it; one holding no finished layer has no work to lose and starts over. Another
    process pruning into it now is refused: the two would take each other's layers as their own."""
    output_dir = output_dir.absolute()
    staging = private_folder(output_dir.parent / f".{output_dir.name}.partial")
    busy = f"another run is pruning into {str(output_dir)!r} now (in {str(staging)!r}); wait for it to end, or give another output_dir"
    with held_exclusively(staging, busy) as held:
        if not held:
            logger.warning("%s cannot be locked on this file system: a second run into %s at the same time would not be refused", staging, output_dir)
        try:
            previous = json.loads((staging / RUN_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        previous = previous if isinstance(previous, dict) else {}
        differing = _differing(previous, record)
        if not differing:
            logger.info("resuming the partial run in %s", staging)
        elif any(staging.glob("model-layer-*.safetensors")):
            if not previous:
                raise ValueError(f"{str(staging)!r} holds layers of a partial run without a readable {RUN_RECORD}; delete it to start over")
            if not isinstance(previous.get("source"), dict) or set(record) - set(previous):
                raise ValueError(
                    f"{str(staging)!r} holds layers of a partial run an earlier optimum-prune wrote, whose record cannot "
                    "tell whether its source, dtype and calibration were these; delete it to start over"
                )
            raise ValueError(
                f"{str(staging)!r} holds layers of a partial run with another {' / '.join(differing)}; delete "
                "it to start over, or rerun that same call to resume it"
            )
        else:
            write_text_atomic(staging / RUN_RECORD, json.dumps(record))
        yield staging


def _finish_checkpoint(
    model: nn.Module, reader: CheckpointReader, rest: list[str], stream: LayerStream, tokenizer: Any,
    config: PruningConfig, report: PruningReport, source: Path, output_dir: Path,
) -> None:
    """Index, config, report and tokenizer files into the staging folder, then rename it to ``output_dir``."""
    staging = stream.staging
    tensors = {name: _cast(name, t, stream.dtype).contiguous() for name, t in reader.read(rest).items()}
    _write_shard(tensors, staging / REST_SHARD, {"format": "pt"}, "rerun the same call: every layer is kept, only the rest is written")
    weight_map = dict.fromkeys(rest, REST_SHARD)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())  # the index's, as save_pretrained writes it
    for index in range(len(stream.layer_names)):
        with opened(stream.shard(index)) as handle:
            weight_map.update(dict.fromkeys(handle.keys(), stream.shard(index).name))
            slices = [handle.get_slice(name) for name in handle.keys()]
            total_size += sum(math.prod(s.get_shape()) * SAFETENSORS_DTYPES[s.get_dtype()].itemsize for s in slices)
    index_file = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (staging / INDEX_NAME).write_text(json.dumps(index_file, indent=2), encoding="utf-8")
    for extra in source.iterdir():  # tokenizer, generation config and licence files, as the source has them
        if _is_weights(extra.name) or extra.name in ("config.json", CONFIG_NAME, REPORT_NAME, SCORES_PLOT_NAME):
            continue  # written above, or an earlier run's
        if not is_checkpoint_file(extra):  # the dense model's card, another format's files: not the pruned model's, and
            continue  # the output would hold files a rerun may not replace
        if in_checkpoint_store(extra, source):
            shutil.copyfile(extra, staging / extra.name)  # not the source's modes: a read-only one blocks the tokenizer's save
        else:
            logger.warning(
                "%s links outside the checkpoint (to %s): not copied into the output; to keep it, put a copy of the file "
                "in the checkpoint", extra, extra.resolve(),
            )  # fmt: skip
    model.config.save_pretrained(staging)
    config.save_pretrained(staging)
    write_report(report, staging)
    if tokenizer is not None:
        save_tokenizer(tokenizer, staging)  # drops a GGUF copy too
    else:
        drop_gguf_copy(staging)  # copied from the source
    # Under a name of its own first (its lock moves with it): swapped with a previous output, the partial folder's
    # name would hold that output's layers, which a rerun would take for another run's.
    finished = claimed_folder(output_dir.absolute(), "staging")
    finished.rmdir()  # Windows renames no folder onto an existing one
    try:
        os.replace(staging, finished)
        give_output_mode(finished, output_dir)
        replace_directory(finished, output_dir)
    except BaseException:
        if (finished / RUN_RECORD).is_file():  # still this run's folder (not placed): a rerun resumes from it
            finished.chmod(0o700)
            os.replace(finished, staging)
        elif not staging.exists():  # placed; stopped while the previous output was removed: the output is whole
            _drop_run_files(output_dir)
        raise
    _drop_run_files(output_dir)


def _drop_run_files(output_dir: Path) -> None:
    """The partial run's own files, out of the output once it is in place (not before: a run killed then resumes)."""
    (output_dir / RUN_RECORD).unlink()
    (output_dir / NOTES).unlink(missing_ok=True)


def _is_weights(name: str) -> bool:
    """Weight files (and their indexes) of any format: the source's dense copies must not ride along."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")

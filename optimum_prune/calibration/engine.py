"""The sequential, layer-by-layer calibration engine.

The calibration windows run through the model once, up to decoder layer 0, where the layer's
inputs (hidden states and the keyword arguments the model passes it: attention mask, position
embeddings, ...) are captured. From then on one layer at a time is moved to the compute device,
visited (statistics gathered, weights pruned), and run again on the captured inputs so that its
*pruned* outputs become the next layer's inputs (SparseGPT, Sec. 3.5; Wanda, Sec. 3). Memory is
the model plus two activation buffers of ``samples × seq_len × hidden`` — independent of depth,
and no logits are ever computed. The layer's other arguments (masks, position embeddings) are kept
once for consecutive batches that share them (token windows of one length all do). With
``activation_device`` the buffers (and those arguments) wait on another device (the CPU) and each
batch visits the compute device only while its layer runs; with ``activation_device="disk"`` they are
files in a temporary directory (under ``$TMPDIR``), read one batch at a time, so host memory holds one
batch (and the distinct layer arguments) and the disk two layers' activations.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence, Union

import torch
from accelerate.utils import send_to_device
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils.logging import tqdm

from ..adapters import DecoderAdapter
from ..atomic_files import held_exclusively, unheld_leftovers
from ..adapters.base import ATTENTION_MASKS

logger = logging.getLogger(__name__)


DISK = "disk"
"""``activation_device`` value that keeps calibration activations in files between layers."""


def on_disk(activation_device: torch.device | str | None) -> bool:
    """Whether ``activation_device`` asks for activations kept in files rather than on a device."""
    return isinstance(activation_device, str) and activation_device == DISK


class DiskActivations(Sequence[torch.Tensor]):
    """One safetensors file per calibration batch in ``directory``, read back (to the CPU) one at a time."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self._count = 0

    def append(self, hidden: torch.Tensor) -> None:
        save_file({"hidden": hidden.detach().to("cpu").contiguous()}, self._path(self._count))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -self._count <= index < self._count:
            raise IndexError(f"batch {index} of {self._count}")
        return load_file(self._path(index % self._count))["hidden"]

    @property
    def num_bytes(self) -> int:
        return sum(self._path(i).stat().st_size for i in range(self._count))

    def successor(self) -> "DiskActivations":
        """An empty buffer beside this one, for the next layer's inputs."""
        return DiskActivations(self.directory.with_name(f"{int(self.directory.name) + 1}"))

    def release(self) -> None:
        shutil.rmtree(self.directory)

    def _path(self, index: int) -> Path:
        return self.directory / f"{index}.safetensors"


ActivationHome = Union[torch.device, Path, None]
"""Where captured activations wait: a device, a directory (files, see ``DiskActivations``) or,
with ``None``, the compute device."""


@dataclass
class LayerInputs:
    """Captured inputs of the current decoder layer, one entry per calibration batch."""

    hidden_states: list[torch.Tensor] | DiskActivations
    layer_kwargs: list[dict[str, Any]]

    @property
    def num_bytes(self) -> int:
        if isinstance(self.hidden_states, DiskActivations):
            return self.hidden_states.num_bytes
        return sum(t.numel() * t.element_size() for t in self.hidden_states)


CalibrationInputs = Union[torch.Tensor, Sequence[Mapping[str, torch.Tensor]]]
"""Text windows (``[samples, seq_len]`` token ids) or processed model-input batches (image-text)."""


def model_batches(inputs: CalibrationInputs) -> list[dict[str, torch.Tensor]]:
    """The keyword arguments of each calibration forward: one token window, or one image-text batch, each."""
    if isinstance(inputs, torch.Tensor):
        return [{"input_ids": window[None]} for window in inputs]
    return [dict(batch) for batch in inputs]


def calibration_digest(inputs: CalibrationInputs) -> str:
    """SHA-256 of the token ids and their shapes: which calibration a run used, without keeping it."""
    digest = hashlib.sha256()
    for ids in [inputs] if isinstance(inputs, torch.Tensor) else [batch["input_ids"] for batch in inputs]:
        digest.update(str(tuple(ids.shape)).encode())
        digest.update(ids.cpu().numpy().tobytes())
    return digest.hexdigest()


def count_tokens(inputs: CalibrationInputs | None) -> int:
    """The token ids the calibration inputs feed the model (a report's ``calibration_tokens``; 0 for none)."""
    if inputs is None:
        return 0
    return sum(batch["input_ids"].numel() for batch in model_batches(inputs))


class _StopForward(Exception):
    """Raised from layer 0's pre-hook: nothing past the captured inputs needs computing."""


@contextmanager
def forwards_restored(model: nn.Module) -> Iterator[None]:
    """Put back every submodule's own ``forward`` when a forward of ``model`` is stopped by an exception:
    transformers' output recorders (``output_router_logits``, ``output_attentions``, ``output_hidden_states``,
    also when the config sets them) wrap submodules' forwards and unwrap them only when the model's forward
    returns. Left behind, each wrapper would keep the stopped call's outputs alive, append every later
    call's to them, and look like another patch to ``skip_experts`` / ``fold_experts``."""
    before = {module: vars(module).get("forward") for module in model.modules()}
    try:
        yield
    finally:
        for module, forward in before.items():
            if vars(module).get("forward") is not forward:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward


def capture_first_layer_inputs(
    adapter: DecoderAdapter, inputs: CalibrationInputs, device: torch.device, activation_device: ActivationHome = None,
) -> LayerInputs:
    """Layer 0's inputs for every calibration batch, computed on ``device``; the hidden states are kept on
    ``activation_device`` (default: ``device``; a directory: in files there), the layer's other arguments on ``device``."""
    model = adapter.model
    first_layer = adapter.decoder_layers()[0]
    signature = inspect.signature(first_layer.forward)
    to_files = isinstance(activation_device, Path)
    captured = LayerInputs(DiskActivations(activation_device / "0") if to_files else [], [])
    # The layer's other arguments (position embeddings, masks) wait beside offloaded activations too (in host
    # memory when those are files): on the compute device they would grow with the calibration set.
    kwargs_home = torch.device("cpu") if to_files else activation_device

    # Later layers may take another mask than layer 0 (Qwen2 / Qwen3 sliding-window layers): the model builds
    # each kind's for layer 0 in turn, so every layer is calibrated with the mask it gets at inference.
    first_kind = adapter.attention_kind(first_layer)
    other_kinds = [kind for kind in dict.fromkeys(map(adapter.attention_kind, adapter.decoder_layers())) if kind != first_kind]
    seen: list[dict[str, Any]] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Bind positional arguments to their names (CLIP's encoder passes the masks positionally),
        # so every layer can be rerun as ``layer(hidden, **kwargs)``.
        seen.append(_named_arguments(signature, args, kwargs))
        raise _StopForward

    def layer_0_arguments(batch: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        try:
            with forwards_restored(model):
                model(**{name: value.to(device) for name, value in batch.items()}, use_cache=False)
        except _StopForward:
            pass
        return seen.pop() if seen else None  # None: the batch never reached the layer

    handle = first_layer.register_forward_pre_hook(record, with_kwargs=True)
    try:  # removed also where moving the modules fails (out of memory): left, it stops every later forward
        with on_device(adapter.capture_modules(), device), torch.no_grad():
            batches = [b for b in model_batches(inputs) if all(name in b for name in adapter.required_inputs)]
            for batch in tqdm(batches, desc="Capturing calibration inputs", leave=False):
                arguments = layer_0_arguments(batch)
                if arguments is None:
                    continue
                if other_kinds:
                    masks = {first_kind: arguments.get("attention_mask")}
                    for kind in other_kinds:
                        with adapter.attending_as(first_layer, kind):
                            masks[kind] = layer_0_arguments(batch).get("attention_mask")
                    arguments[ATTENTION_MASKS] = masks
                hidden = arguments.pop(next(iter(signature.parameters))).detach()
                require_finite(hidden, adapter, None)
                captured.hidden_states.append(hidden if to_files else hidden.to(activation_device or device))
                arguments = arguments if kwargs_home is None else send_to_device(arguments, kwargs_home)
                captured.layer_kwargs.append(_shared(arguments, captured.layer_kwargs[-1]) if captured.layer_kwargs else arguments)
    finally:
        handle.remove()
    if not captured.hidden_states:
        needs = f"; it runs only on batches with {', '.join(adapter.required_inputs)}" if adapter.required_inputs else ""
        raise ValueError(f"no calibration batch reached {adapter.layer_names()[0]}{needs}")
    return captured


def _shared(value: Any, previous: Any) -> Any:
    """``value`` with every tensor equal to its counterpart in ``previous`` (the batch before) replaced by that
    one, so that identical masks and position embeddings are held once, not once per batch."""
    if isinstance(value, torch.Tensor):
        same = isinstance(previous, torch.Tensor) and (value.shape, value.dtype, value.device) == (previous.shape, previous.dtype, previous.device)
        return previous if same and torch.equal(value, previous) else value
    if type(value) is dict and isinstance(previous, dict):
        return {key: _shared(item, previous.get(key)) for key, item in value.items()}
    if type(value) in (tuple, list) and isinstance(previous, (tuple, list)) and len(value) == len(previous):
        return type(value)(_shared(item, before) for item, before in zip(value, previous))
    return value  # anything else (a Cache, a dict or tuple subclass) as it is


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = signature.bind_partial(*args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"cannot capture variadic positional arguments *{name} of a layer's forward")
        else:
            named[name] = value
    return named


def run_layer(adapter: DecoderAdapter, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor] | DiskActivations:
    """The layer's outputs for every batch, computed where the layer is and kept where the inputs were
    (offloaded activations visit the compute device one batch at a time; files go to a new buffer)."""
    outputs = inputs.hidden_states.successor() if isinstance(inputs.hidden_states, DiskActivations) else []
    for output in _layer_outputs(adapter, layer, inputs):
        outputs.append(output)
    return outputs


def feed_layer(adapter: DecoderAdapter, layer: nn.Module, inputs: LayerInputs, after_each: Callable[[], None] = lambda: None) -> None:
    """Run the layer on every batch for its side effects (hooks gathering statistics), calling ``after_each`` once
    each batch's forward is done; outputs are dropped."""
    for _output in _layer_outputs(adapter, layer, inputs):
        after_each()


def _layer_outputs(adapter: DecoderAdapter, layer: nn.Module, inputs: LayerInputs) -> Iterator[torch.Tensor]:
    compute = _device_of(layer)
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden_states, inputs.layer_kwargs):
            device = compute or hidden.device
            output = adapter.run_layer(layer, hidden.to(device), send_to_device(kwargs, device)).detach()
            require_finite(output, adapter, layer)
            yield output.to(hidden.device)


class NonFiniteActivations(ValueError):
    """Calibration hidden states hold NaN or inf: every statistic after them (norms, Hessians, scores) would be
    NaN too, and a mask chosen from NaN scores is one by position, so the run stops before it prunes on them."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, checked in chunks: a whole-tensor mask of a 1G-element embedding is 1 GiB."""
    if not tensor.is_floating_point() or not tensor.numel():  # aminmax takes neither an empty tensor nor bools
        return all(bool(chunk.isfinite().all()) for chunk in tensor.detach().reshape(-1).split(1 << 26))
    for chunk in tensor.detach().reshape(-1).split(1 << 26):
        low, high = torch.aminmax(chunk)  # NaN propagates, ±inf is an extreme: one reduction, no mask allocated
        if not bool(low.isfinite() & high.isfinite()):
            return False
    return True


def require_finite(hidden: torch.Tensor, adapter: DecoderAdapter, layer: nn.Module | None) -> None:
    """Raise ``NonFiniteActivations`` naming where ``hidden`` (the output of ``layer``; None: layer 0's input) is not finite."""
    if all_finite(hidden):
        return
    names = dict(zip(map(id, adapter.decoder_layers()), adapter.layer_names()))
    where = f"the input of {adapter.layer_names()[0]}" if layer is None else f"the output of {names.get(id(layer), type(layer).__name__)}"
    modules = adapter.capture_modules() if layer is None else [layer]
    suspects = {id(p) for module in modules for p in module.parameters()}
    culprit = next(
        (
            name
            for name, p in adapter.model.named_parameters()
            if id(p) in suspects and p.is_floating_point() and p.device.type != "meta" and not all_finite(p)
        ),
        None,
    )
    hint = " (load the model in bfloat16 or float32)" if hidden.dtype == torch.float16 else ""
    cause = f"the parameter {culprit} holds NaN or inf" if culprit is not None else f"an overflow in {hidden.dtype}{hint}, or non-finite weights"
    raise NonFiniteActivations(f"calibration activations are NaN or inf at {where}: {cause}; nothing after it can be scored")


@contextmanager
def feeding_inputs(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward of a module in ``modules`` (linears, an MoE block) passes its first
    input to ``sink(name, input)``."""
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: sink(name, args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


LayerVisitor = Callable[[int, nn.Module, LayerInputs], None]
LayerObserver = Callable[[int, nn.Module], ContextManager[None]]
"""Reads what passes through decoder layer ``index`` (hooks) while the ``with`` block runs it; the layer is not changed."""
LayerResidency = Callable[[int, nn.Module], ContextManager[None]]
"""Makes decoder layer ``index`` usable on the compute device for the duration of a ``with`` block
(default: moves it there and back; ``optimum_prune.streaming`` loads it from disk and writes it out)."""


def walk_layers(
    adapter: DecoderAdapter,
    windows: CalibrationInputs,
    device: torch.device,
    visit: LayerVisitor,
    description: str,
    residency: LayerResidency | None = None,
    activation_device: torch.device | str | None = None,
) -> None:
    """Visit every decoder layer with its inputs, then propagate the (possibly pruned) layer's outputs.

    ``activation_device`` (e.g. the CPU while pruning on a GPU) holds the calibration activations
    between layers: the compute device then holds one layer and one batch of activations at a time.
    ``"disk"`` keeps them in a temporary directory, removed when the walk ends.
    """

    def step(index: int, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor] | DiskActivations:
        visit(index, layer, inputs)
        return run_layer(adapter, layer, inputs)

    _walk(adapter, windows, device, step, description, residency, activation_device)


def observe_layers(
    adapter: DecoderAdapter,
    windows: CalibrationInputs,
    device: torch.device,
    observe: LayerObserver,
    description: str,
    residency: LayerResidency | None = None,
    activation_device: torch.device | str | None = None,
) -> None:
    """Run every decoder layer once on its calibration inputs under ``observe``'s hooks: statistics of a model
    that does not change are read as the outputs propagate (a ``walk_layers`` visit would run each layer twice)."""

    def step(index: int, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor] | DiskActivations:
        with observe(index, layer):
            return run_layer(adapter, layer, inputs)

    _walk(adapter, windows, device, step, description, residency, activation_device)


def _walk(
    adapter: DecoderAdapter,
    windows: CalibrationInputs,
    device: torch.device,
    step: Callable[[int, nn.Module, LayerInputs], list[torch.Tensor] | DiskActivations],
    description: str,
    residency: LayerResidency | None,
    activation_device: torch.device | str | None,
) -> None:
    with _activation_home(activation_device) as home:
        inputs = capture_first_layer_inputs(adapter, windows, device, home)
        logger.info("captured %d calibration batches (%.1f MiB of activations)", len(inputs.hidden_states), inputs.num_bytes / 2**20)
        layers = adapter.decoder_layers()
        residency = residency or moving_to(device)
        for index in tqdm(range(len(layers)), desc=description):
            layer = layers[index]
            with residency(index, layer):
                outputs = step(index, layer, inputs)
                if isinstance(inputs.hidden_states, DiskActivations):
                    inputs.hidden_states.release()
                inputs.hidden_states = outputs  # the inputs go now: two buffers at most, not three through the next visit


ACTIVATIONS_PREFIX = "optimum-prune-activations-"


@contextmanager
def _activation_home(activation_device: torch.device | str | None) -> Iterator[ActivationHome]:
    """For ``"disk"``, a temporary folder held locked while it is used, so that the next run removes it if this one
    is killed (SIGKILL, out of memory): it can hold gigabytes, which a plain temporary folder would leave in $TMPDIR."""
    if not on_disk(activation_device):
        yield activation_device
        return
    for leftover in unheld_leftovers(Path(tempfile.gettempdir()), ACTIVATIONS_PREFIX, "run with activation_device='disk'"):
        logger.info("removing %s, the calibration activations of a killed run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=ACTIVATIONS_PREFIX) as directory, held_exclusively(Path(directory)):
        yield Path(directory)


def moving_to(device: torch.device) -> LayerResidency:
    """The default residency: a layer is moved to ``device`` while it is processed, then back."""
    return lambda _index, layer: on_device([layer], device)


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move modules to ``device`` for the duration, then back where they were (layer-wise offload); where a move
    fails (out of memory), those already moved, and the one half moved, go back before the error propagates."""
    moved: list[tuple[nn.Module, torch.device | None]] = []
    try:
        for module in modules:
            moved.append((module, _device_of(module)))
            module.to(device)
        yield
    finally:
        for module, home in moved:
            if home is not None and home != device:
                module.to(home)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the duration (calibration and evaluation forwards apply no dropout or router
    noise), then each module back in its own mode: a model training with a frozen part in eval mode keeps it so. A
    module keeps its own mode wherever surgery moved it (depth pruning renumbers layers); one surgery put in takes the
    mode of the one it replaced under that name, or of its nearest enclosing module."""
    modes = {module: module.training for module in model.modules()}  # held, so no new module can take a freed id
    named_modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if module in modes:
                module.training = modes[module]
                continue
            while name not in named_modes:
                name = name.rpartition(".")[0]
            module.training = named_modes[name]


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None

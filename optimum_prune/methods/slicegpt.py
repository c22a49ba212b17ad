"""SliceGPT: rotate the residual stream onto its principal components and slice off the rest.

Ashkboos et al. 2024. With RMSNorm, rotating the residual stream by an orthogonal Q changes
nothing once each norm's scale γ is fused into the linears that read it: RMSNorm(xQ) =
RMSNorm(x)Q. Taking Q from the PCA of calibration activations puts the stream's energy in the
leading coordinates, and dropping the trailing columns of Q deletes input columns of every
linear that reads the stream and output rows of every linear that writes it. Each residual
point (a layer's input, between its attention and MLP, its output) gets its own basis, so every
layer gains shortcut matrices Q_beforeᵀ·Q_after carrying the residual from one basis to the
next. The bases are computed layer by layer on the already-sliced model, so each PCA sees the
slicing error of the layers before it.

A norm now averages over ``width`` coordinates instead of ``hidden``; its scale is set to
√(hidden / width) so it normalises as before (up to the energy that was sliced off, and ε).

Tied input/output embeddings stay full width: fusing the final norm's γ into the output
embedding would untie it, adding vocab × width parameters — more than slicing them saves. The
first layer then reads, and the last layer writes, the unrotated stream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..adapters import DecoderAdapter, ResidualBranch, UnsupportedArchitecture
from ..calibration import LayerInputs, capture_first_layer_inputs, feed_layer, run_layer
from ..calibration.engine import on_device
from ..options import check_round_to, option
from ..report import PruningReport
from ..sparsity import whole_count
from ..structure.counting import count_parameters
from .base import StructuredMethod, register_structured_method

logger = logging.getLogger(__name__)

_ROW_CHUNK = 8192  # rows of an embedding matrix rotated at a time (bounds float64 scratch memory)


@dataclass(frozen=True)
class SliceGPTOptions:
    round_to: int = option(8, "The sliced width is rounded down to a multiple of this (hardware-friendly shapes).")

    def __post_init__(self) -> None:
        check_round_to(self.round_to)


@register_structured_method("slicegpt", options=SliceGPTOptions)
class SliceGPT(StructuredMethod[SliceGPTOptions]):
    """Rotate the residual stream by per-layer PCA (norm scales fused first) and slice its width by ``sparsity``.

    ``sparsity`` is the fraction of the hidden dimension removed (the paper's slicing ratio); the
    report gives the resulting parameter count, shortcut matrices included.
    """

    def always_records_layer_shapes(self) -> bool:
        return True  # sliced residual widths and shortcut linears, recorded per layer

    def check(self) -> None:
        model = self.adapter.model
        self.hidden = model.get_input_embeddings().embedding_dim
        step = self.options.round_to
        self.width = whole_count(self.hidden * (1 - self.sparsity)) // step * step
        if self.width < step:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} leaves {self.hidden * (1 - self.sparsity):.0f} of "
                f"{self.hidden} hidden dimensions, less than PruningConfig.method_options.round_to={step}; lower the sparsity"
            )
        if self.width >= self.hidden:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} slices nothing off the {self.hidden} hidden dimensions; raise it"
            )
        if self.ignore:
            raise ValueError(
                f"PruningConfig.ignore {self.ignore!r}: SliceGPT rotates the residual stream every layer shares, "
                "so no module can be left out; remove the ignore patterns"
            )
        for name, layer in zip(self.adapter.layer_names(), self.adapter.decoder_layers()):
            if self.adapter.attention(layer) is None or self.adapter.mlp(layer) is None:
                raise ValueError(f"{name} has a removed sublayer; SliceGPT needs whole layers, so it and sublayer removal cannot be combined")
            branches = self.adapter.residual_branches(layer)
            if any(branch.shortcut is not None for branch in branches):
                raise ValueError(f"{name} was already sliced; SliceGPT cannot be applied twice")
            for module in (m for branch in branches for m in (*branch.readers, branch.writer)):
                if type(module) is not nn.Linear:
                    raise ValueError(
                        f"{name} holds a {type(module).__name__} where SliceGPT rotates plain linears; apply SliceGPT "
                        "before factorising (low_rank) or quantizing"
                    )
        output = model.get_output_embeddings()
        # The ends keep the full width where something else shares them: tied embeddings, or (LLaVA)
        # a projector that writes image features into the embedding space.
        tied = output is None or output.weight is model.get_input_embeddings().weight
        self.slice_ends = not tied and not self.adapter.upstream_parts

    def prune(self, windows: torch.Tensor, report: PruningReport) -> None:
        adapter, device = self.adapter, self.device
        parameters_before = count_parameters(adapter.model)
        inputs = capture_first_layer_inputs(adapter, windows, device)
        self._check_layer_output(inputs)
        identity = torch.eye(self.hidden, dtype=torch.float64, device=device)
        retained: dict[str, list[float]] = {"attention": [], "mlp": []}
        if self.slice_ends:
            covariance = torch.zeros(self.hidden, self.hidden, dtype=torch.float64, device=device)
            for hidden in inputs.hidden_states:
                _accumulate(covariance, hidden)
            basis, _ = _principal_basis(covariance, self.width)
            embedding = adapter.model.get_input_embeddings()
            embedding.weight = nn.Parameter(_rotate_rows(embedding.weight, basis))
            embedding.embedding_dim = self.width
            inputs.hidden_states = [_project(h, basis) for h in inputs.hidden_states]
        else:
            basis = identity

        layers = adapter.decoder_layers()
        for index in tqdm(range(len(layers)), desc="SliceGPT"):
            layer = adapter.add_shortcuts(index)
            with on_device([layer], device):
                branches = adapter.residual_branches(layer)
                for position, (kind, branch) in enumerate(zip(retained, branches)):
                    _read_in_basis(adapter, branch, basis, self.hidden)
                    covariance, outputs = self._covariance_after(layer, branches, position, inputs)
                    if covariance is None:  # the last layer writes the unrotated stream to a tied head
                        basis, fraction = identity, 1.0
                    else:
                        basis, fraction = _principal_basis(covariance, self.width)
                    _write_in_basis(branch, basis)
                    retained[kind].append(fraction)
                if outputs is not None:
                    inputs.hidden_states = [_project(h, basis) for h in outputs]

        if self.slice_ends:
            self._slice_head(basis)
        report.layer_scores.update({f"variance kept after {kind}": values for kind, values in retained.items()})
        report.removed.append(f"residual stream width {self.hidden} → {self.width}" + ("" if self.slice_ends else " (tied embeddings kept at full width)"))
        self._warn_if_larger(parameters_before, count_parameters(adapter.model))

    def _warn_if_larger(self, before: int, after: int) -> None:
        """Each layer gains two residual shortcuts of about width² parameters: at a small slicing ratio (10 % on
        SmolLM2, and on Llama-2 7B) they outweigh what slicing saves, and the model grows."""
        if after >= before:
            logger.warning(
                "SliceGPT at PruningConfig.sparsity %s (residual width %d → %d) left the model with %s parameters, %.1f%% "
                "more than its %s before: each layer's residual shortcuts (about 2 × %d² parameters) outweigh what this "
                "ratio slices off; raise the sparsity for a smaller model",
                self.sparsity, self.hidden, self.width, f"{after:,}", 100 * (after / before - 1), f"{before:,}", self.width,
            )  # fmt: skip

    def _check_layer_output(self, inputs: LayerInputs) -> None:
        """The shortcut layers return what the adapter says the stock layer returns (``layer_returns_tuple``); where
        a plugin adapter says otherwise, the model would be rotated and then fail: one run of layer 0 says so first."""
        layer, says_tuple = self.adapter.decoder_layers()[0], self.adapter.layer_returns_tuple
        with on_device([layer], self.device), torch.no_grad():
            output = layer(inputs.hidden_states[0], **self.adapter.layer_arguments(layer, inputs.layer_kwargs[0]))
        if isinstance(output, tuple) != says_tuple:
            raise UnsupportedArchitecture(
                f"{type(self.adapter).__name__}.layer_returns_tuple is {says_tuple}, but {type(layer).__name__} returns "
                f"{'a tuple' if isinstance(output, tuple) else 'a tensor'}: set it to {not says_tuple} in the adapter "
                "(SliceGPT's shortcut layers must return the same); nothing was changed"
            )

    def _covariance_after(
        self, layer: nn.Module, branches: list[ResidualBranch], position: int, inputs: LayerInputs
    ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """Covariance of the (unrotated) residual stream after branch ``position``, and the layer's
        outputs when that is the last branch. A ``None`` covariance: the stream stays unrotated there."""
        covariance = torch.zeros(self.hidden, self.hidden, dtype=torch.float64, device=self.device)
        if position + 1 < len(branches):
            hook = branches[position + 1].norm.register_forward_pre_hook(lambda _m, args: _accumulate(covariance, args[0]))
            try:
                feed_layer(self.adapter, layer, inputs)
            finally:
                hook.remove()
            return covariance, None
        if layer is self.adapter.decoder_layers()[-1] and not self.slice_ends:
            return None, None
        outputs = run_layer(self.adapter, layer, inputs)
        for output in outputs:
            _accumulate(covariance, output)
        return covariance, outputs

    def _slice_head(self, basis: torch.Tensor) -> None:
        """Fuse the final norm's γ into the (untied) output embedding and rotate its input columns."""
        norm, head = self.adapter.final_norm(), self.adapter.model.get_output_embeddings()
        with torch.no_grad():
            scaled = head.weight * self.adapter.norm_scale(norm).to(head.weight)
            head.weight = nn.Parameter(_rotate_rows(scaled, basis))
            head.in_features = self.width
        _reset_norm(self.adapter, norm, self.hidden, self.width)


def _accumulate(covariance: torch.Tensor, signal: torch.Tensor) -> None:
    flat = signal.reshape(-1, signal.shape[-1]).to(covariance.device, torch.float64)
    covariance.addmm_(flat.T, flat)


def _principal_basis(covariance: torch.Tensor, width: int) -> tuple[torch.Tensor, float]:
    """The ``width`` leading eigenvectors (hidden × width, float64) and the variance fraction they keep."""
    values, vectors = torch.linalg.eigh(covariance)
    kept = float(values[-width:].sum() / values.sum().clamp_min(torch.finfo(values.dtype).tiny))
    return vectors[:, -width:].flip(-1), kept


def _read_in_basis(adapter: DecoderAdapter, branch: ResidualBranch, basis: torch.Tensor, hidden: int) -> None:
    """The branch now reads a stream expressed in ``basis``: fuse the norm's γ into the readers,
    rotate their input columns (and the shortcut's), and resize the norm."""
    with torch.no_grad():
        gamma = adapter.norm_scale(branch.norm).to(basis.device, torch.float64)
        for reader in branch.readers:
            _set_weight(reader, (reader.weight.to(basis.device, torch.float64) * gamma) @ basis)
        if branch.shortcut is not None:
            _set_weight(branch.shortcut, branch.shortcut.weight.to(basis.device, torch.float64) @ basis)
    _reset_norm(adapter, branch.norm, hidden, basis.shape[1])


def _write_in_basis(branch: ResidualBranch, basis: torch.Tensor) -> None:
    """The branch now writes the stream in ``basis``: rotate the writer's and the shortcut's output rows."""
    with torch.no_grad():
        for writer in (branch.writer, branch.shortcut):
            _set_weight(writer, basis.T @ writer.weight.to(basis.device, torch.float64))
            if writer.bias is not None:
                writer.bias = nn.Parameter((writer.bias.to(basis.device, torch.float64) @ basis).to(writer.bias))


def _set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    linear.weight = nn.Parameter(weight.to(linear.weight))
    linear.out_features, linear.in_features = weight.shape


def _reset_norm(adapter: DecoderAdapter, norm: nn.Module, hidden: int, width: int) -> None:
    """γ now lives in the readers; the scale √(hidden/width) makes a mean over ``width`` coordinates
    normalise like the mean over ``hidden`` did."""
    with torch.no_grad():
        adapter.set_norm_scale(norm, torch.full((width,), math.sqrt(hidden / width), dtype=torch.float64, device=norm.weight.device))


def _rotate_rows(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``weight @ basis`` for a large (vocabulary-sized) matrix, in float64 chunks on the basis's device."""
    return torch.cat(
        [(chunk.to(basis.device, torch.float64) @ basis).to(weight) for chunk in weight.detach().split(_ROW_CHUNK)]
    )


def _project(hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return (hidden.to(torch.float64) @ basis.to(hidden.device)).to(hidden.dtype)

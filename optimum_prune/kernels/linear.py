"""``SparseLinear``: an ``nn.Linear`` whose weight is held in the compressed 2:4 format, and
``sparsify(model)``, which swaps in one for every linear of the decoder layers that is exactly 2:4.

Linears already quantized by the Optimum path (``compress`` with ``GPTQConfig`` or ``QuantoConfig``
int8 / int4) are repacked, not requantized: their integer codes and scales move into the 2:4
format unchanged (with zero-points for optimum-quanto's affine int4), so the sparsified model
computes with the quantizer's own weights.

Backends: ``"reference"`` decompresses (and dequantizes) the weight and multiplies densely — what
every kernel must reproduce, and the CPU path; ``"triton"`` runs ``triton_24.py``'s paths (its decode
kernel for a few token rows, the weight rebuilt for cuBLAS above; fp16 / bf16 inputs; on CPU only
inside Triton's interpreter, which the tests use); ``"auto"`` (default) takes them for fp16 / bf16
inputs on a GPU when Triton is installed, the reference path otherwise. Calls that need the inputs'
gradient take the reference path whatever the backend: the kernels have no backward. ``prefill="cusparselt"``
adds cuSPARSELt's matmul on its own packed copy of the weight for many token rows, taken wherever
it measures faster (``prefill.py``); ``decode="mma"`` runs calls of up to 64 token rows on sparse
tensor cores instead (``mma_24.py``: 16-bit values or int8 / int4 codes, compute capability 8.0+).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters import get_adapter
from ..dispatch import refuse_offloaded
from ..quantized import dequantized_weight, integer_grid, is_quantized
from ..sparsity import NMPattern, conforms_to
from ..structure.surgery import replace_submodule
from ..wrappers import ModelLike
from .format import DEFAULT_GROUP_SIZE, Compressed24, compress, decompress, repack
from .mma_24 import mma_available, mma_fits, sparse24_mma
from .prefill import PREFILL_PATHS, CusparseltWeight, cusparselt_available, cusparselt_fits, fastest, row_bucket

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")
DECODE_PATHS = ("triton", "mma")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what the Triton kernel takes


class SparseLinear(nn.Module):
    """A linear layer with a 2:4 weight (``values``, ``metadata`` and, quantized, ``scales`` and maybe
    ``zero_points`` buffers). ``prefill``: ``"expand"`` or ``"cusparselt"`` (see ``prefill.py``);
    ``decode``: ``"triton"`` (CUDA cores) or ``"mma"`` (sparse tensor cores, see ``mma_24.py``)."""

    def __init__(
        self,
        compressed: Compressed24,
        bias: torch.Tensor | None,
        backend: str = "auto",
        prefill: str = "expand",
        decode: str = "triton",
    ) -> None:
        super().__init__()
        self.backend = _checked("backend", backend, BACKENDS)
        self.prefill = _checked("prefill", prefill, PREFILL_PATHS)
        self.decode = _checked("decode", decode, DECODE_PATHS)
        self._mma = decode == "mma" and mma_available()  # decided here: nothing on the forward path probes CUDA or NVRTC
        self._cusparselt: CusparseltWeight | None = None  # built on the first prefill that uses it; not saved
        self.in_features, self.out_features = compressed.in_features, compressed.out_features
        self.bits, self.group_size = compressed.bits, compressed.group_size
        self.register_buffer("values", compressed.values)
        self.register_buffer("metadata", compressed.metadata)
        self.register_buffer("scales", compressed.scales)
        self.register_buffer("zero_points", compressed.zero_points)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        name: str = "linear",
        bits: int | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        backend: str = "auto",
        prefill: str = "expand",
        decode: str = "triton",
    ) -> "SparseLinear":
        """Compress ``linear`` (which must be exactly 2:4; the error names ``name`` otherwise)."""
        return cls(compress(linear.weight.detach(), name, bits, group_size), linear.bias, backend, prefill, decode)

    @classmethod
    def from_quantized(
        cls,
        linear: nn.Module,
        name: str = "linear",
        backend: str = "auto",
        dequantized: torch.Tensor | None = None,
        prefill: str = "expand",
        decode: str = "triton",
    ) -> "SparseLinear":
        """Repack a GPTQ or optimum-quanto int8 / int4 linear's codes and scales exactly (its weight must be 2:4;
        ``dequantized``: its ``dequantized_weight`` if the caller already has it)."""
        grid = integer_grid(linear, name)
        weight = dequantized_weight(linear) if dequantized is None else dequantized
        compressed = repack(weight.detach(), grid.scales.detach(), grid.group_size, grid.bits, name)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(compressed, bias, backend, prefill, decode)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in: the values' (the weight's dtype) or the scales' (quantized), whatever cast or loaded them."""
        return (self.values if self.bits is None else self.scales).dtype

    @property
    def compressed(self) -> Compressed24:
        return Compressed24(
            self.values, self.metadata, self.in_features, self.dtype, self.bits, self.scales, self.group_size, self.zero_points
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(inputs.dtype)
        if self._uses_kernel(inputs):
            from .triton_24 import DECODE_ROWS, sparse24_matmul

            x = inputs.reshape(-1, self.in_features)
            if self._mma and mma_fits(x, self.compressed):
                output = sparse24_mma(x, self.compressed).reshape(*inputs.shape[:-1], self.out_features)
            elif x.shape[0] > DECODE_ROWS and self._cusparselt_usable(x):
                output = self._fastest_prefill(x).reshape(*inputs.shape[:-1], self.out_features)
            else:
                output = sparse24_matmul(inputs, self.compressed)
            return output if bias is None else output + bias
        return F.linear(inputs, decompress(self.compressed).to(inputs.dtype), bias)

    def _cusparselt_usable(self, x: torch.Tensor) -> bool:
        return (
            self.prefill == "cusparselt" and x.is_cuda and cusparselt_available()
            and cusparselt_fits(self.out_features, self.in_features)
        )  # fmt: skip

    def _fastest_prefill(self, x: torch.Tensor) -> torch.Tensor:
        """Expand + cuBLAS or cuSPARSELt, whichever was measured faster for this shape and row count."""
        from .triton_24 import sparse24_expand

        candidates = {  # the first is taken for a shape not measured yet under torch.compile / graph capture
            "expand": lambda: F.linear(x, sparse24_expand(self.compressed, x.dtype)),
            "cusparselt": lambda: self._packed_like(x).matmul(x),
        }
        return fastest((self.out_features, self.in_features, x.dtype, row_bucket(x.shape[0])), candidates)

    def _packed_like(self, x: torch.Tensor) -> CusparseltWeight:
        """cuSPARSELt's copy of the weight in ``x``'s dtype and device, built the first time it is needed."""
        from .triton_24 import sparse24_expand

        if self._cusparselt is None or not self._cusparselt.matches(x):
            self._cusparselt = CusparseltWeight(sparse24_expand(self.compressed, x.dtype))
        return self._cusparselt

    def _apply(self, fn, recurse: bool = True) -> "SparseLinear":
        self._cusparselt = None  # moved or cast: rebuilt from the buffers at the next prefill that needs it
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cusparselt = None  # new weights: cuSPARSELt's copy of the old ones must not be used
        super()._load_from_state_dict(*args, **kwargs)

    def _uses_kernel(self, inputs: torch.Tensor) -> bool:
        if self.backend == "reference" or inputs.numel() == 0:  # no rows (an MoE expert no token reached)
            return False
        if self.bits is None and inputs.dtype != self.dtype:  # the kernels read 16-bit values in the inputs' dtype
            return False
        if inputs.requires_grad and torch.is_grad_enabled():  # the kernels have no backward: the dense path carries it
            return False
        if self.backend == "triton":
            from .triton_24 import INTERPRETED

            if not inputs.is_cuda and not INTERPRETED:
                raise ValueError(
                    f"SparseLinear(backend='triton') runs Triton's kernels on a CUDA GPU, and got inputs on {inputs.device}: "
                    "move the model to the GPU (model.cuda()), or sparsify with backend='auto' (the reference path elsewhere)"
                )
            return True
        return inputs.is_cuda and inputs.dtype in KERNEL_DTYPES and triton_available()

    def extra_repr(self) -> str:
        zero_points = ", zero-points" if self.zero_points is not None else ""
        kind = "2:4" if self.bits is None else f"2:4 int{self.bits} (group {self.group_size}{zero_points})"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, prefill={self.prefill}, decode={self.decode}"


@dataclass
class SparsifyReport:
    swapped: list[str] = field(default_factory=list)
    repacked: list[str] = field(default_factory=list)  # of ``swapped``: quantized linears whose codes were kept
    left_dense: list[str] = field(default_factory=list)  # not exactly 2:4
    without_cusparselt: list[str] = field(default_factory=list)  # prefill="cusparselt", but a dimension is not a multiple of 16
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        repacked = f", {len(self.repacked)} of them repacked from their quantized codes" if self.repacked else ""
        unfit = (
            f"; {len(self.without_cusparselt)} without cuSPARSELt (a dimension not a multiple of 16)"
            if self.without_cusparselt else ""
        )  # fmt: skip
        return (
            f"sparsify: {len(self.swapped)} linears in the 2:4 format{repacked} ({self.bytes_before / 2**20:.1f} → "
            f"{self.bytes_after / 2**20:.1f} MiB of weights); {len(self.left_dense)} left dense{unfit}"
        )


def sparsify(
    model: ModelLike,
    bits: int | None = None,
    group_size: int | None = None,
    backend: str = "auto",
    prefill: str = "expand",
    decode: str = "triton",
) -> SparsifyReport:
    """Swap every decoder-layer linear of ``model`` (of every part: a LLaVA's vision tower and projector too)
    whose weight is exactly 2:4 for a ``SparseLinear``
    and leave the rest. Unquantized weights are quantized to ``bits`` 8 or 4 with one scale per ``group_size``
    input columns (default ``DEFAULT_GROUP_SIZE``, 128) when given (otherwise the values keep the weight's dtype: the GPU
    kernels take float16 or bfloat16, so cast a float32 model first, or its layers run the dense reference path); quantized ones (GPTQ, optimum-quanto int8 / int4)
    keep their own codes and scales whatever ``bits`` says. ``backend`` as in ``SparseLinear``;
    ``prefill="cusparselt"`` lets many-token calls take cuSPARSELt where it measures faster, at the
    cost of its packed copy of each weight (built on the GPU on first use; ``prefill.py``);
    ``decode="mma"`` runs calls of up to 64 token rows on sparse tensor cores (16-bit values, int8 or int4)."""
    if bits not in (None, 8, 4):
        raise ValueError(f"bits must be None (values in the weight's dtype), 8 or 4, got {bits!r}")
    if group_size is not None and bits is None:
        raise ValueError(
            "group_size sets the scales of the weights sparsify quantizes (bits=8 or 4); unquantized values have none, and "
            "quantized weights keep their own: remove it, or pass bits"
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive integer (input columns per scale), got {group_size!r}")
    for option, value, choices in (("backend", backend, BACKENDS), ("prefill", prefill, PREFILL_PATHS), ("decode", decode, DECODE_PATHS)):
        _checked(option, value, choices)  # before any linear is swapped
    if decode == "mma" and not mma_available():
        logger.warning(
            "sparsify(decode='mma') needs a CUDA GPU of compute capability 8.0+ and NVRTC (CUDA builds of torch bring it); "
            "without them the Triton / reference paths run"
        )
    refuse_offloaded(model, "sparsify packs each 2:4 weight into its compressed form in memory")
    adapter = get_adapter(model)
    # what a quantized linear's inputs are (an unquantized one's have its weight's dtype), for the Triton check
    activations = adapter.model.get_input_embeddings().weight.dtype if backend == "triton" else None
    report = SparsifyReport()
    pattern = NMPattern(2, 4)
    swaps: list[tuple[str, SparseLinear]] = []  # all built first: a layer refused (e.g. group_size) leaves the model whole
    for linears in (layer for part in adapter.parts().values() for layer in part.qualified_prunable_linears()):  # a LLaVA's towers too
        for qualified, linear in linears.items():
            if isinstance(linear, SparseLinear):  # sparsified already
                continue
            quantized = is_quantized(linear)
            weight = dequantized_weight(linear) if quantized else linear.weight
            if linear.in_features % 8 or not conforms_to(weight, pattern):
                report.left_dense.append(qualified)
                continue
            inputs = activations if quantized else weight.dtype
            if backend == "triton" and inputs not in KERNEL_DTYPES:
                raise ValueError(
                    f"backend='triton' runs the Triton kernel, which takes float16 or bfloat16 inputs; {qualified} gets "
                    f"{inputs}: cast the model first (model.to(torch.bfloat16)), or use backend='auto' (the kernel where it applies)"
                )
            if quantized:
                sparse = SparseLinear.from_quantized(linear, qualified, backend, weight, prefill, decode)
                report.repacked.append(qualified)
            else:
                sparse = SparseLinear.from_linear(linear, qualified, bits, group_size or DEFAULT_GROUP_SIZE, backend, prefill, decode)
            if prefill == "cusparselt" and not cusparselt_fits(sparse.out_features, sparse.in_features):
                report.without_cusparselt.append(qualified)
            report.bytes_before += _weight_bytes(linear)
            report.bytes_after += sparse.compressed.num_bytes()
            swaps.append((qualified, sparse))
    for qualified, sparse in swaps:
        replace_submodule(adapter.model, qualified, sparse)
        report.swapped.append(qualified)
    if report.left_dense and not report.swapped:
        logger.warning(
            "sparsify: none of the %d decoder linears is exactly 2:4, so all stay dense; prune with "
            "PruningConfig(sparsity='2:4') first", len(report.left_dense),
        )  # fmt: skip
    return report


def _weight_bytes(linear: nn.Module) -> int:
    """Bytes a linear's weight takes as stored: its saved tensors but the bias (a quantizer's codes, scales, zero-points)."""
    return sum(t.numel() * t.element_size() for name, t in linear.state_dict().items() if not name.endswith("bias"))


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (it comes with CUDA builds of torch; ``pip install optimum-prune[kernels]`` otherwise)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _checked(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value

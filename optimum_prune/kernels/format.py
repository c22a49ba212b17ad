"""The compressed 2:4 weight format: kept values plus 2-bit position metadata, optionally quantized.

A 2:4 weight keeps at most two non-zeros in every group of four consecutive input columns. It
is stored as

- ``values`` ``[out, in/2]``: the two kept entries of each group, in column order (a group with
  fewer non-zeros stores zeros at unused positions);
- ``metadata`` ``[out, in/8]`` uint8: per group the two positions i0 < i1 (2 bits each, one nibble
  ``i0 | i1 << 2``), two groups per byte (the lower nibble is the earlier group);
- quantized (``bits`` 8 or 4): ``values`` hold signed integers (int4 packed two per byte, the lower
  nibble first) with one scale per row and per ``group_size`` input columns (``group_size / 2``
  stored values): value = q × scale (``compress``: symmetric), or value = (q − zero_point) × scale
  with ``zero_points`` (int8, one per scale) for codes repacked from an affine quantizer whose
  integer grid does not fit the signed range (``repack``: optimum-quanto int4).

Bytes per weight: 16-bit values give 0.5·2 + 0.125 = 1.125 bytes for 2 dense bytes (the ≈ 1.78×
ceiling of 2:4 decode); int4 gives 0.25 + 0.125 + scales ≈ 0.39 bytes. ``decompress`` is the
reference every kernel is tested against, and the CPU fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 4
KEPT = 2

DEFAULT_GROUP_SIZE = 128  # input columns per scale of quantized values


@dataclass
class Compressed24:
    values: torch.Tensor
    metadata: torch.Tensor
    in_features: int
    dtype: torch.dtype  # of the dense weight it came from (and of the output)
    bits: int | None = None  # None: values in ``dtype``; 8 or 4: quantized
    scales: torch.Tensor | None = None  # [out, in / group_size] for quantized values
    group_size: int | None = None
    zero_points: torch.Tensor | None = None  # int8 [out, in / group_size]: value = (q − zero_point) × scale

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    def num_bytes(self) -> int:
        tensors = [t for t in (self.values, self.metadata, self.scales, self.zero_points) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def check_24(weight: torch.Tensor, name: str) -> None:
    """Raise unless ``weight`` is exactly 2:4 along its input dimension."""
    rows, columns = weight.shape
    if columns % (2 * GROUP):
        raise ValueError(f"{name}: {columns} input features are not a multiple of 8, which the 2:4 format needs")
    nonzero = (weight.reshape(rows, columns // GROUP, GROUP) != 0).sum(-1)
    if bool((nonzero > KEPT).any()):
        row, group = (nonzero > KEPT).nonzero()[0].tolist()
        raise ValueError(
            f"{name} is not 2:4 sparse: row {row}, columns {group * GROUP}–{group * GROUP + 3} hold "
            f"{int(nonzero[row, group])} non-zeros (prune it with sparsity='2:4' first)"
        )


def compress(weight: torch.Tensor, name: str = "weight", bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> Compressed24:
    """The 2:4 format of ``weight`` (``[out, in]``), quantized to ``bits`` (8 or 4) when given."""
    values, metadata = _kept_values(weight, name)
    if bits is None:
        return Compressed24(values, metadata, weight.shape[1], weight.dtype)
    return _quantized(values, metadata, weight.shape[1], weight.dtype, bits, group_size, name)


def repack(weight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, name: str = "weight") -> Compressed24:
    """The 2:4 format of a weight some quantizer already put on an integer grid, without requantizing.

    ``weight`` is the quantizer's own dequantization (``[out, in]``), ``scales`` its step per row and
    per ``group_size`` input columns (``[out, in / group_size]``), ``bits`` its code width (8 or 4).
    The codes are recovered as weight / scale and must reproduce ``weight`` bit for bit; a group whose
    codes (with the pruned zeros) leave the signed range of ``bits`` gets a zero-point that shifts them
    into it, which an affine quantizer's integer zero-point always allows (its codes span 2^bits levels).
    """
    if bits not in (8, 4):
        raise ValueError(f"{name}: only 8- and 4-bit codes can be repacked, got {bits}-bit")
    rows, columns = weight.shape
    _check_group_size(group_size, columns, name)
    if scales.shape != (rows, columns // group_size):
        raise ValueError(f"{name}: scales of shape {tuple(scales.shape)} do not give one step per row and {group_size} columns")
    values, metadata = _kept_values(weight, name)
    kept_scales = scales.float().repeat_interleave(group_size // 2, dim=1)
    codes = torch.where(kept_scales == 0, 0.0, values.float() / kept_scales).round()
    if not torch.equal((codes * kept_scales).to(weight.dtype), values):
        raise ValueError(
            f"{name}: the dequantized weight is not its scales times integers, so its codes cannot be repacked exactly "
            "(a quantizer with a float offset?); sparsify the unquantized model with bits= instead"
        )
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grouped = codes.reshape(rows, columns // group_size, group_size // 2)
    smallest, largest = grouped.amin(-1).clamp_max(0), grouped.amax(-1).clamp_min(0)  # the padded zeros count too
    if bool((largest - smallest > high - low).any()):
        raise ValueError(f"{name}: codes span more than the {2**bits} levels of {bits}-bit values")
    # Shift only the groups that leave the signed range, so a symmetric source keeps no zero-points.
    zero_points = torch.where((smallest < low) | (largest > high), low - smallest, 0)
    q = (grouped + zero_points.unsqueeze(-1)).to(torch.int8).reshape(rows, columns // 2)
    return Compressed24(
        _packed(q, bits), metadata, columns, weight.dtype, bits, scales.contiguous(), group_size,
        zero_points.to(torch.int8).contiguous() if bool(zero_points.any()) else None,
    )  # fmt: skip


def _kept_values(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kept values of every group of four (``[out, in/2]``) and their metadata (``[out, in/8]``)."""
    check_24(weight, name)
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // GROUP, GROUP)
    # Non-zeros first (stable, so ascending positions), then pad with the lowest zero positions.
    order = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., :KEPT]
    positions = order.sort(dim=-1).values
    values = groups.gather(-1, positions).reshape(rows, columns // 2)
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    metadata = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return values.contiguous(), metadata.contiguous()


def _quantized(
    values: torch.Tensor, metadata: torch.Tensor, columns: int, dtype: torch.dtype, bits: int, group_size: int, name: str
) -> Compressed24:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    _check_group_size(group_size, columns, name)
    rows = values.shape[0]
    limit = 2 ** (bits - 1) - 1
    grouped = values.float().reshape(rows, columns // group_size, group_size // 2)
    # Quantize against the scales as stored (in the weight's dtype), not their float32 originals: the
    # rounding of a 16-bit scale would otherwise shift every code of its group.
    scales = (grouped.abs().amax(-1) / limit).to(dtype)
    divisor = scales.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    largest = (torch.finfo(dtype).max / divisor).floor().clamp(max=limit)  # a code times its 16-bit scale stays finite
    q = torch.round(grouped / divisor).clamp(-largest, largest).to(torch.int8).reshape(rows, columns // 2)
    return Compressed24(_packed(q, bits), metadata, columns, dtype, bits, scales, group_size)


def _check_group_size(group_size: int, columns: int, name: str) -> None:
    if group_size % (2 * GROUP) or columns % group_size:
        fitting = [g for g in range(2 * GROUP, min(group_size, columns) + 1, 2 * GROUP) if columns % g == 0]
        hint = f": group_size={fitting[-1]} does" if fitting else ""
        raise ValueError(f"{name}: group_size {group_size} must be a multiple of 8 that divides the {columns} input features{hint}")


def _packed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes as stored: as they are for 8 bits, two's-complement nibbles two per byte for 4."""
    if bits == 8:
        return q.contiguous()
    wide = q.to(torch.int16) & 0xF  # packed in a wider type to avoid sign wrap
    return (wide[:, 0::2] | (wide[:, 1::2] << 4)).to(torch.uint8).contiguous()


def stored_values(compressed: Compressed24) -> torch.Tensor:
    """The kept values as floats in ``compressed.dtype`` (dequantized when quantized): ``[out, in/2]``."""
    if compressed.bits is None:
        return compressed.values
    q = compressed.values
    if compressed.bits == 4:
        low = (q & 0xF).to(torch.int8)
        high = (q >> 4).to(torch.int8)
        low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
        q = torch.stack([low, high], dim=-1).reshape(q.shape[0], -1)
    rows = q.shape[0]
    grouped = q.float().reshape(rows, compressed.in_features // compressed.group_size, compressed.group_size // 2)
    if compressed.zero_points is not None:
        grouped = grouped - compressed.zero_points.float().unsqueeze(-1)
    return (grouped * compressed.scales.float().unsqueeze(-1)).reshape(rows, -1).to(compressed.dtype)


def decompress(compressed: Compressed24) -> torch.Tensor:
    """The dense ``[out, in]`` weight (dequantized): the reference for every kernel."""
    rows, columns = compressed.out_features, compressed.in_features
    nibbles = torch.stack([compressed.metadata & 0xF, compressed.metadata >> 4], dim=-1).reshape(rows, columns // GROUP)
    positions = torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], dim=-1).long()
    dense = torch.zeros(rows, columns // GROUP, GROUP, dtype=compressed.dtype, device=compressed.values.device)
    dense.scatter_(-1, positions, stored_values(compressed).reshape(rows, columns // GROUP, KEPT))
    return dense.reshape(rows, columns)

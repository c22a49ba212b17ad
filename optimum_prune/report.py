"""``PruningReport``: what ``prune`` did, per linear and overall, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LinearReport:
    name: str
    layer_index: int
    target_sparsity: float
    sparsity: float
    numel: int


@dataclass
class PruningReport:
    method: str
    sparsity: float | str
    allocation: str
    device: str
    calibration_tokens: int
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    linears: list[LinearReport] = field(default_factory=list)

    @property
    def overall_sparsity(self) -> float:
        """Measured zeros over all pruned linears (pre-existing zeros included)."""
        total = sum(r.numel for r in self.linears)
        return sum(r.sparsity * r.numel for r in self.linears) / total if total else 0.0

    def layer_sparsities(self) -> dict[int, tuple[float, float]]:
        """Decoder layer index → (target, measured) sparsity over its pruned linears."""
        result: dict[int, tuple[float, float]] = {}
        for index in sorted({r.layer_index for r in self.linears}):
            rows = [r for r in self.linears if r.layer_index == index]
            numel = sum(r.numel for r in rows)
            result[index] = (
                sum(r.target_sparsity * r.numel for r in rows) / numel,
                sum(r.sparsity * r.numel for r in rows) / numel,
            )
        return result

    def __str__(self) -> str:
        lines = [
            f"Pruning report: method={self.method} sparsity={self.sparsity} allocation={self.allocation} device={self.device}",
            f"{'layer':>5}  {'target':>7}  {'measured':>8}",
        ]
        for index, (target, measured) in self.layer_sparsities().items():
            lines.append(f"{index:>5}  {target:>7.2%}  {measured:>8.2%}")
        lines += [
            f"overall sparsity of pruned linears: {self.overall_sparsity:.2%} ({len(self.linears)} linears)",
            f"calibration tokens: {self.calibration_tokens:,}",
            f"time: {self.seconds:.1f} s   peak memory ({self.peak_memory_kind}): {self.peak_memory_bytes / 2**20:,.0f} MiB",
        ]
        return "\n".join(lines)

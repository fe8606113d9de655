"""What the run-time objective check (crystal_ext.training.objective_check) measures against:
the tolerances by dtype, the report of measured quantities, the failure it raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tolerance:
    """relative: CE and logits, |ours - theirs| / |theirs| (logits: the largest difference over
    the largest logit); kl: KL_pred and KL_attn with the identity corruption, in nats; ops: the
    fused ops against their references in this dtype, relative (float32, float64) or, for
    bfloat16 / float16, the factor by which the fused op's error may exceed the reference's
    (both measured against a float32 run)."""

    relative: float
    kl: float
    ops: float


TOLERANCES = {
    torch.float64: Tolerance(relative=1e-9, kl=1e-12, ops=1e-9),
    torch.float32: Tolerance(relative=1e-4, kl=1e-7, ops=1e-4),
    torch.bfloat16: Tolerance(relative=2e-2, kl=1e-3, ops=3.0),
    torch.float16: Tolerance(relative=5e-3, kl=1e-4, ops=3.0),
}


class ObjectiveCheckFailed(RuntimeError):
    """The objective does not reproduce the model; the message says which quantity and how far."""


@dataclass
class CheckReport:
    model_type: str
    dtype: torch.dtype
    device: torch.device
    examples: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def measure(self, name: str, value: float, limit: float, detail: str = "", fail: str | None = None):
        """Record a measured quantity; past `limit` it is a failure, worded by `fail`."""
        ok = value <= limit
        self.lines.append(
            f"  {'ok  ' if ok else 'FAIL'} {name}: {short_number(value)} (limit {limit:g}){detail}"
        )
        if not ok:
            self.failures.append(
                f"crystal_ext.check: {self.model_type}: {fail or f'{name} {short_number(value)}'}"
            )

    def summary(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        head = (
            f"crystal_ext.check: {self.model_type} ({dtype}, {self.device.type}): objective checked against "
            f"the stock model on {len(self.examples)} examples ({', '.join(self.examples)}) in {self.seconds:.1f} s"
        )
        return "\n".join([head, *self.lines, "  passed" if not self.failures else "  FAILED"])


def short_number(x: float) -> str:
    """3 significant digits, in scientific notation when very small or large."""
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def relative_error(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference over the largest magnitude of `theirs` (so near-zero entries do not
    dominate), or over `floor` when that is larger; NaN anywhere counts as infinitely far."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    diff = (ours - theirs).abs().max()
    if not torch.isfinite(diff):
        return float("inf")
    return float(diff / theirs.abs().max().clamp_min(max(floor, 1e-30)))

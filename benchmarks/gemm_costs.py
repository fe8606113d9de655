"""What a step's GEMMs cost on this machine, measured in the benchmark's own run: the matmul rate,
the GEMM FLOPs of a step, and the time of the LM-head GEMMs that ours must compute.

- roofline fraction = (the step's GEMM FLOPs / the matmul rate) / the step's time: how close the
  step comes to doing nothing but GEMMs at the rate a plain torch.matmul reaches here (same
  dtype, same threads). FLOPs are counted by torch's FlopCounterMode (matmuls, convolutions,
  SDPA; causal attention counted at half, as the flash kernels skip the masked half) plus the
  fused LM-head op's two GEMM passes, which the counter cannot see inside the op.
- LM-head bound = the published step's time / the time of the LM-head GEMMs ours must compute
  (logits of the rows that need them, then P W, each [R, Hd] x [Hd, V]): however well the rest
  is done, ours cannot beat the published step by more than that.
- GEMM floor = the time of every GEMM of a step (the same ops FlopCounterMode counts, plus the
  fused LM-head op's two passes) run alone as torch runs it, each at its own shape, strides and
  dtype. The matmul rate comes from one large square product; the step's GEMMs have other shapes
  (the LM-head's R rows, weight gradients with the sequence as the inner dimension, attention),
  which torch runs slower. So (the step's FLOPs / the matmul rate) / the GEMM floor is the highest
  roofline fraction the step can reach without GEMMs faster than torch's own (the ceiling), and
  the published step's time / the GEMM floor the highest speed-up.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from crystal_ext.ops.layout import IGNORE, segments_of

# Row counts that torch's bf16 matmul (oneDNN) prefers: measured on an AMX CPU, [779 x 3584] x
# [3584 x 16384] took 100 ms where [784 x ...] took 57 ms. The bound takes the faster of the
# rows as they are and padded to this multiple, so it never flatters ours.
PAD_ROWS = 32


def logit_rows(batch) -> int:
    """Rows that need logits in ours: the targeted rows and the E and F rows of every sample."""
    need = batch["targets"] != IGNORE
    for b, seg in enumerate(segments_of(batch["layout"])):
        need[b, slice(*seg.e)] = True
        need[b, slice(*seg.f)] = True
    return int(need.sum())


def _min_seconds(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(dtype: torch.dtype, size: int = 2048, hidden: int = 3584, rounds: int = 3) -> float:
    """FLOP/s of a plain torch.matmul [size, hidden] x [hidden, hidden] in `dtype` (best of rounds)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, hidden, generator=g).to(dtype)
    b = torch.randn(hidden, hidden, generator=g).to(dtype)
    return 2 * size * hidden * hidden / _min_seconds(lambda: a @ b, rounds)


def lm_head_gemm_seconds(rows: int, weight: torch.Tensor, rounds: int = 2) -> float:
    """Time of the two LM-head GEMMs of `rows` rows with torch.matmul in weight's dtype: logits
    [rows, Hd] x [Hd, V], then P [rows, V] x [V, Hd]; the faster of rows as they are and padded
    to a multiple of PAD_ROWS."""
    w = weight.detach()
    best = float("inf")
    for r in {rows, -(-rows // PAD_ROWS) * PAD_ROWS}:
        h = torch.randn(r, w.shape[1]).to(w.dtype)

        def gemms(h=h):
            logits = h @ w.t()
            return logits @ w

        best = min(best, _min_seconds(gemms, rounds))
    return best


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    causal = kwargs.get("is_causal", args[1] if len(args) > 1 else False)
    return sdpa_flop_count(query, key, value) // (2 if causal else 1)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    causal = kwargs.get("is_causal", args[3] if len(args) > 3 else False)
    return sdpa_backward_flop_count(grad_out, query, key, value) // (2 if causal else 1)


_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def step_gemm_flops(step, lm_head_rows: int, weight: torch.Tensor) -> int:
    """GEMM FLOPs of one call of step() (forward and backward), the fused LM-head op's two GEMM
    passes over `lm_head_rows` rows included (0 rows: the step computes its logits in aten ops)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        step()
    vocab, hidden = weight.shape
    return counter.get_total_flops() + 2 * 2 * lm_head_rows * hidden * vocab


# The ops whose FLOPs step_gemm_flops counts (higher-order ops such as flex attention left out).
_GEMM_OPS = {op for op in flop_registry if isinstance(op, torch._ops.OpOverloadPacket)} | set(_CPU_SDPA)


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return t.normal_() if t.is_floating_point() else t.zero_()


def _spec(value):
    if isinstance(value, torch.Tensor):
        return _TensorSpec(tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(v) for v in value)
    if isinstance(value, dict):
        return {k: _spec(v) for k, v in value.items()}
    return value


def _made(value):
    if isinstance(value, _TensorSpec):
        return value.make()
    if isinstance(value, (list, tuple)):
        return type(value)(_made(v) for v in value)
    if isinstance(value, dict):
        return {k: _made(v) for k, v in value.items()}
    return value


class _GemmRecorder(TorchDispatchMode):
    """Keeps (op, argument shapes) of every GEMM-type op a step runs; runs everything unchanged."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _GEMM_OPS:
            self.calls.append((func, _spec(args), _spec(kwargs)))
        return func(*args, **kwargs)


def step_gemm_calls(step) -> list:
    """The GEMM-type ops one call of step() runs, as (op, args, kwargs) with tensors replaced by
    their shape, strides, dtype and device. The fused LM-head op's own GEMMs run inside its
    kernel and are not among them (lm_head_gemm_seconds times them)."""
    with _GemmRecorder() as recorder:
        step()
    return recorder.calls


def gemm_calls_seconds(calls, rounds: int = 2) -> float:
    """Sum over `calls` (from step_gemm_calls) of each op's best time alone on fresh random
    tensors of the recorded layout."""
    total = 0.0
    for func, args, kwargs in calls:
        total += _min_seconds(functools.partial(func, *_made(args), **_made(kwargs)), rounds)
    return total


def step_gemm_floor_seconds(step, lm_head_seconds: float) -> float:
    """The GEMM floor of step(): its GEMM-type ops, each alone at its own layout, plus
    `lm_head_seconds`, the fused LM-head op's two GEMMs (lm_head_gemm_seconds; 0 when the step
    computes its logits in aten ops, which are then among the recorded ones)."""
    return gemm_calls_seconds(step_gemm_calls(step)) + lm_head_seconds

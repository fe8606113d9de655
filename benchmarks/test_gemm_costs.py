"""The GEMM floor's bookkeeping (runs in the benchmarks' smoke pass; nothing here is timed against
a threshold): it records the ops of a step that the FLOP count counts, and nothing else, and
replays them at their own layout."""

import torch
from gemm_costs import gemm_calls_seconds, step_gemm_calls, step_gemm_flops
from torch.utils.flop_counter import FlopCounterMode


def linear_step(layer, x):
    layer.zero_grad(set_to_none=True)
    torch.nn.functional.gelu(layer(x)).sum().backward()


def test_the_floor_replays_the_gemms_the_flop_count_counts_and_nothing_else():
    layer, x = torch.nn.Linear(48, 40), torch.randn(33, 48, requires_grad=True)
    step = lambda: linear_step(layer, x)  # noqa: E731
    calls = step_gemm_calls(step)
    # the forward's addmm, the backward's two mm (input and weight gradients); gelu and sum not
    assert sorted(str(func) for func, _, _ in calls) == [
        "aten.addmm.default",
        "aten.mm.default",
        "aten.mm.default",
    ]
    with FlopCounterMode(display=False) as replayed:
        gemm_calls_seconds(calls, rounds=1)  # each call twice: a warm-up and one timed round
    assert replayed.get_total_flops() == 2 * step_gemm_flops(step, 0, torch.empty(0, 0)) > 0


def test_the_replay_keeps_each_operands_strides():
    a, b = torch.randn(70, 30), torch.randn(70, 50)
    calls = step_gemm_calls(lambda: a.t() @ b)  # a transposed view, as in a weight gradient
    ((func, args, _),) = calls
    assert str(func) == "aten.mm.default"
    assert (args[0].shape, args[0].stride) == ((30, 70), (1, 30))
    assert args[0].make().stride() == (1, 30)
    assert gemm_calls_seconds(calls, rounds=1) > 0


def test_keyword_tensors_are_kept_as_layouts_not_as_the_tensors():
    q = k = v = torch.randn(1, 2, 9, 8)
    mask = torch.randn(1, 1, 9, 9)  # attention's attn_mask is a keyword-only argument
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    ((func, _, kwargs),) = step_gemm_calls(lambda: sdpa(q, k, v, attn_mask=mask))
    assert not any(isinstance(value, torch.Tensor) for value in kwargs.values()), kwargs
    assert kwargs["attn_mask"].shape == (1, 1, 9, 9)
    assert gemm_calls_seconds([(func, (q, k, v), kwargs)], rounds=1) > 0

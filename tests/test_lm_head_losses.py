"""crystal_ext.lm_head_losses: fused op vs crystal_ext.ops.reference.lm_head_losses, gradcheck,
opcheck, edge cases and bad inputs. CUDA tests run only where a GPU is visible."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import crystal_ext
import crystal_ext.ops._extension as _extension
from crystal_ext.ops import reference
from crystal_ext.ops._extension import _C
from crystal_ext.ops.lm_head_plan import LmHeadPlan, PlanTensors, lm_head_plan

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="compiled extension unavailable"
)


def make_problem(
    n,
    hd,
    vocab,
    pairs_per_sample,
    *,
    dtype=torch.float32,
    bias=False,
    ignore_fraction=0.3,
    seed=0,
    device="cpu",
    weight_grad=True,
    scale=1.0,
):
    """Random inputs. Pairs of one sample use distinct rows where possible."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hd, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(vocab, hd, generator=g, dtype=torch.float64) / hd**0.5 * 2
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_fraction] = -100
    teacher, student, sample = [], [], []
    for s, count in enumerate(pairs_per_sample):
        for _ in range(count):
            teacher.append(int(torch.randint(0, n, (1,), generator=g)))
            student.append(int(torch.randint(0, n, (1,), generator=g)))
            sample.append(s * 3 + 1)  # arbitrary labels
    idx = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return dict(
        hidden=hidden.to(device=device, dtype=dtype),
        weight=weight.to(device=device, dtype=dtype),
        bias=None if b is None else b.to(device=device, dtype=dtype),
        targets=targets.to(device),
        teacher_rows=idx(teacher),
        student_rows=idx(student),
        pair_sample=idx(sample),
        weight_grad=weight_grad,
    )


def plan_of(prob, topk):
    """The op's plan for prob, built from host copies of its index tensors on hidden's device."""
    cpu = {k: prob[k].cpu() for k in ("targets", "teacher_rows", "student_rows", "pair_sample")}
    n, vocab = prob["hidden"].shape[0], prob["weight"].shape[0]
    return lm_head_plan(
        cpu["targets"], cpu["teacher_rows"], cpu["student_rows"], cpu["pair_sample"], topk, n, vocab,
        prob["hidden"].device,
    )  # fmt: skip


def run(fn, prob, topk=0.1, dtype=None, g_ce=0.7, g_kl=1.3, plan=None):
    """Forward + backward of g_ce * ce + g_kl * kl; returns (ce, kl, d hidden, d weight, d bias).
    With `plan` (fused op only) the op gets the prebuilt plan instead of the index tensors."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    hidden = cast(prob["hidden"]).detach().requires_grad_()
    weight = cast(prob["weight"]).detach().requires_grad_(prob["weight_grad"])
    bias = None if prob["bias"] is None else cast(prob["bias"]).detach().requires_grad_()
    if plan is not None:
        indices = (plan,)
    else:
        indices = (prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"], topk)
    ce, kl = fn(hidden, weight, *indices, bias=bias)
    (g_ce * ce + g_kl * kl).backward()
    return ce.detach(), kl.detach(), hidden.grad, weight.grad, None if bias is None else bias.grad


SHAPES = [
    # (N, Hd, V, pairs per sample, bias, ignore_fraction)
    (1, 5, 7, [1], False, 0.0),  # N=1, M=1 (the pair is the row with itself: KL = 0)
    (9, 6, 301, [1], True, 0.3),  # M=1
    (23, 13, 1001, [5, 1, 12], False, 0.3),  # several samples, different pair counts
    (23, 13, 1001, [5, 1, 12], True, 0.3),
    (11, 8, 9001, [4, 7], True, 0.2),  # V over two vocabulary blocks on the CPU (8192 + 809)
    (2100, 4, 131, [30, 3], False, 0.0),  # two row chunks on the CPU (2048 rows each at most)
]


def plan_counts(prob, device):
    """(row chunks, vocabulary blocks of the first chunk) that the fused forward uses for prob
    on `device`, from the chunk and block sizes the extension itself uses."""
    targeted = set((prob["targets"] != -100).nonzero().flatten().tolist())
    paired = set(prob["teacher_rows"].tolist()) | set(prob["student_rows"].tolist())
    total = len(targeted | paired)
    n, vocab, hd = prob["hidden"].shape[0], prob["weight"].shape[0], prob["hidden"].shape[1]
    max_rows, _ = _C.lm_head_losses_tiling(device == "cuda", n, vocab, hd)
    first = max(min(total, max_rows), len(paired))
    chunks = 1 + -(-(total - first) // max_rows) if total > 0 else 0
    _, block = _C.lm_head_losses_tiling(device == "cuda", first, vocab, hd)
    return chunks, -(-vocab // block)


def test_multi_chunk_and_multi_block_shapes_really_have_several_on_the_cpu():
    chunk_shape, block_shape = SHAPES[-1], SHAPES[-2]
    n, hd, vocab, pairs, bias, ignore = chunk_shape
    prob = make_problem(n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + vocab)
    assert plan_counts(prob, "cpu")[0] >= 2
    n, hd, vocab, pairs, bias, ignore = block_shape
    prob = make_problem(n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + vocab)
    assert plan_counts(prob, "cpu")[1] >= 2


@pytest.mark.parametrize("weight_grad", [True, False], ids=["head-trained", "head-frozen"])
def test_running_max_growing_in_a_later_vocabulary_block(weight_grad):
    """Every row's largest logits sit in the last of three CPU vocabulary blocks, so the online
    log-sum-exp must rescale what the earlier blocks accumulated (sum, expectation, KL cross
    term) when the running maximum grows."""
    prob = make_problem(40, 16, 20000, [10, 6], bias=True, seed=7, weight_grad=weight_grad)
    assert plan_counts(prob, "cpu")[1] == 3
    prob["bias"][16384:] += 3.0
    gold = run(reference.lm_head_losses, prob, 0.3, dtype=torch.float64)
    z = prob["hidden"] @ prob["weight"].T + prob["bias"]
    assert (z.argmax(dim=1) >= 16384).float().mean() > 0.9
    assert (z[:, :8192].max(dim=1).values < z.max(dim=1).values).all()
    fused = run(crystal_ext.lm_head_losses, prob, 0.3)
    for name, f, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, gold):
        if g is None:
            assert f is None, name
            continue
        torch.testing.assert_close(f.double(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-Hd{s[1]}-V{s[2]}-M{sum(s[3])}")
@pytest.mark.parametrize("weight_grad", [True, False], ids=["head-trained", "head-frozen"])
def test_matches_reference_fp32(shape, weight_grad):
    n, hd, vocab, pairs, bias, ignore = shape
    prob = make_problem(
        n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, weight_grad=weight_grad, seed=n + vocab
    )
    topk = 0.5
    fused = run(crystal_ext.lm_head_losses, prob, topk)
    ref = run(reference.lm_head_losses, prob, topk)
    for name, a, b in zip(["ce", "kl"], fused[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}")
    for name, a, b in zip(["d hidden", "d weight", "d bias"], fused[2:], ref[2:]):
        if b is None:
            assert a is None, name
            continue
        scale = b.abs().max().item() + 1e-12
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=name)
    if not weight_grad:
        assert fused[3] is None


NEG_INF_COLUMNS = {
    "whole-first-block": slice(0, 8192),
    "whole-last-block": slice(8192, 10000),
    "single-column": slice(4321, 4322),
}


@pytest.mark.parametrize("columns", NEG_INF_COLUMNS.values(), ids=NEG_INF_COLUMNS.keys())
def test_neg_inf_logits_give_the_reference_values(columns):
    """A -inf bias over a whole vocabulary block, the last block or one column: the fused op
    gives the reference's CE, a finite KL (0 * log 0 = 0 for entries both rows exclude) and
    the reference's gradients."""
    prob = make_problem(16, 8, 10000, [5, 4], bias=True, ignore_fraction=0.2, seed=17)
    assert plan_counts(prob, "cpu")[1] == 2
    prob["bias"][columns] = float("-inf")
    inside = (prob["targets"] >= columns.start) & (prob["targets"] < columns.stop)
    prob["targets"][inside] = columns.stop % 10000
    fused = run(crystal_ext.lm_head_losses, prob, 0.5)
    ref = run(reference.lm_head_losses, prob, 0.5, dtype=torch.float64)
    for name, f, r in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref):
        assert torch.isfinite(r).all() and torch.isfinite(f).all(), name
        torch.testing.assert_close(f.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=name)
    assert fused[1] > 0


def test_nan_hidden_row_gives_nan_losses_not_zero():
    """A NaN in a paired row makes that pair's KL NaN (it is never clamped to 0) and the CE
    of a targeted NaN row NaN, as in the reference."""
    prob = make_problem(12, 6, 301, [4], bias=True, ignore_fraction=0.0, seed=4)
    prob["hidden"][prob["teacher_rows"][0]] = float("nan")
    with torch.no_grad():
        args = [
            prob[k] for k in ("hidden", "weight", "targets", "teacher_rows", "student_rows", "pair_sample")
        ]
        fused = crystal_ext.lm_head_losses(*args, 1.0, bias=prob["bias"])
        ref = reference.lm_head_losses(*args, 1.0, bias=prob["bias"])
    for f, r in zip(fused, ref):
        assert torch.isnan(r) and torch.isnan(f)


def test_float64_exact_and_topk_fraction_one():
    prob = make_problem(15, 7, 257, [6, 4], bias=True, dtype=torch.float64, seed=3)
    fused = run(crystal_ext.lm_head_losses, prob, 1.0)
    ref = run(reference.lm_head_losses, prob, 1.0)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused[0].dtype == torch.float64


def _err(a, b):
    return (a.double() - b.double()).norm().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_vs_float64(dtype):
    """bf16/fp16: the fused op's error against a float64 run is at most twice the error of the
    reference run in the same dtype (flash-attention's criterion)."""
    prob = make_problem(40, 32, 2003, [10, 6], bias=True, seed=11)
    gold = run(reference.lm_head_losses, prob, 0.3, dtype=torch.float64)
    fused = run(crystal_ext.lm_head_losses, prob, 0.3, dtype=dtype)
    ref = run(reference.lm_head_losses, prob, 0.3, dtype=dtype)
    for name, f, r, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref, gold):
        assert f.dtype == (torch.float32 if name in ("ce", "kl") else dtype), name
        assert _err(f, g) <= 2 * _err(r, g) + 1e-6 * g.abs().max().item(), (name, _err(f, g), _err(r, g))


bf16_gemm = pytest.mark.skipif(
    not crystal_ext.extension_available() or not crystal_ext.build_info()["cpu_bf16_gemm"],
    reason="this CPU has no AVX512-BF16: bf16 inputs always take the fp32-GEMM path",
)


@bf16_gemm
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-Hd{s[1]}-V{s[2]}-M{sum(s[3])}")
def test_bf16_gemm_path_as_accurate_as_fp32_gemm_path(shape, monkeypatch):
    """bf16 inputs on a CPU with AVX512-BF16 run both GEMMs on bf16 operands with fp32 output
    (csrc/cpu/gemm_bf16); CRYSTAL_EXT_CPU_BF16_GEMM=0 runs them as fp32 GEMMs of the converted
    values. The logits are the same fp32 values either way, so the losses agree to fp32
    rounding, and the gradients are about as close to a float64 run. The shapes cover an odd
    Hd (padded k), a last vocabulary block of odd length, the paired rows' hi + lo products (few
    rows) and the kept pairs' own sweep (many rows), a bias and two row chunks."""
    n, hd, vocab, pairs, bias, ignore = shape
    prob = make_problem(n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + hd, weight_grad=True)
    gold = run(reference.lm_head_losses, prob, 0.5, dtype=torch.float64)
    monkeypatch.setenv("CRYSTAL_EXT_CPU_BF16_GEMM", "1")
    fast = run(crystal_ext.lm_head_losses, prob, 0.5, dtype=torch.bfloat16)
    monkeypatch.setenv("CRYSTAL_EXT_CPU_BF16_GEMM", "0")
    slow = run(crystal_ext.lm_head_losses, prob, 0.5, dtype=torch.bfloat16)
    for name, f, s_ in zip(["ce", "kl"], fast[:2], slow[:2]):
        torch.testing.assert_close(f, s_, rtol=1e-5, atol=1e-6, msg=name)
    # d weight: its logit gradient enters the GEMM in bf16 (as in a bf16 autograd backward),
    # which adds an error of the size of the bf16 output rounding: within 1.5x the fp32 path.
    # d hidden: within 1.25x; where the kept pairs' rows are swept on their own, their KL rows
    # of D enter the GEMM in bf16 the same way (measured up to 1.15x the fp32 path's error).
    for name, f, s_, g, bound in zip(
        ["d hidden", "d weight", "d bias"], fast[2:], slow[2:], gold[2:], [1.25, 1.5, 1.1]
    ):
        if g is None:
            continue
        assert _err(f, g) <= bound * _err(s_, g) + 1e-6 * g.abs().max().item(), (
            name,
            _err(f, g),
            _err(s_, g),
        )


def _near_equal_pairs(n, hd, vocab, n_pairs, *, seed, ignore_fraction, noise_seed):
    """(problem, hidden to edit): rows 0 .. n_pairs - 1 teachers of rows n_pairs .. 2 n_pairs - 1,
    each student its teacher's hidden plus 1% noise; the weight a copy the caller may edit."""
    prob = make_problem(
        n, hd, vocab, [n_pairs], seed=seed, weight_grad=False, ignore_fraction=ignore_fraction
    )
    prob["teacher_rows"] = torch.arange(n_pairs)
    prob["student_rows"] = torch.arange(n_pairs, 2 * n_pairs)
    prob["weight"] = prob["weight"].clone()
    g = torch.Generator().manual_seed(noise_seed)
    h = prob["hidden"].clone()
    h[n_pairs : 2 * n_pairs] = h[:n_pairs] + 0.01 * torch.randn(n_pairs, hd, generator=g, dtype=h.dtype)
    return prob, h


def _bf16_and_fp32_path_errors(prob, hidden, monkeypatch, rows=slice(None)):
    """(bf16 GEMM path's error, fp32 GEMM path's error, the gold's norm) of d kl / d hidden on
    `rows`, against a float64 reference run, hidden and weight made bf16-exact first (so the only
    errors are the op's)."""
    prob["hidden"] = hidden.bfloat16().double()
    prob["weight"] = prob["weight"].bfloat16().double()
    gold = run(reference.lm_head_losses, prob, 0.3, dtype=torch.float64, g_ce=0.0)[2][rows]
    monkeypatch.setenv("CRYSTAL_EXT_CPU_BF16_GEMM", "1")
    fast = run(crystal_ext.lm_head_losses, prob, 0.3, dtype=torch.bfloat16, g_ce=0.0)[2][rows]
    monkeypatch.setenv("CRYSTAL_EXT_CPU_BF16_GEMM", "0")
    slow = run(crystal_ext.lm_head_losses, prob, 0.3, dtype=torch.bfloat16, g_ce=0.0)[2][rows]
    return _err(fast, gold), _err(slow, gold), gold.norm().item()


@bf16_gemm
@pytest.mark.parametrize(
    "way",
    ["difference-rows", "one-pass-sweep", "two-gemm-sweep"],
)
@pytest.mark.parametrize("shift", ["none", "every-logit", "first-block"])
@pytest.mark.parametrize("n_pairs", [29, 61])
def test_bf16_gemm_path_keeps_the_kl_gradient_of_near_equal_pairs(n_pairs, shift, way, monkeypatch):
    """The KL gradient of a pair is E_student - E_teacher, a difference of nearly equal
    expectations when the two rows' distributions almost agree. Rounding P to bf16 for the
    expectation GEMM would leave it far less accurate than fp32 GEMMs (measured ~15x the error).
    Every way of the bf16 path keeps it near the fp32 path's error: the students' difference rows
    p~_s - r p~_teacher (each student in one pair, the default), and otherwise the paired rows'
    hi + lo split (58 rows, where the CPU runs P W's two A's in one pass) or the kept pairs' own
    sweep of D = p_student - p_teacher (122 rows), in one pass over the weight where the CPU has
    AMX or as two GEMMs per block (CRYSTAL_EXT_CPU_ONE_PASS_SWEEP). `shift` adds a near-constant
    offset to every logit of the students (their distributions stay close, their sums do not),
    or to the logits of the first vocabulary block only (so the ratio of the first block's sums
    is not the final one; test_difference_rows_follow_the_running_ratio_of_sums below makes that
    case sharp). Hidden and weight are bf16-exact, so the only errors are the op's (the returned
    gradient's bf16 rounding included); measured on the development CPU without a shift and with
    every logit shifted: difference rows 1.06-1.11x, sweep 1.12-1.14x, hi + lo 1.00-1.01x the
    fp32 path's error."""
    monkeypatch.setenv("CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS", "1" if way == "difference-rows" else "0")
    monkeypatch.setenv("CRYSTAL_EXT_CPU_ONE_PASS_SWEEP", "0" if way == "two-gemm-sweep" else "1")
    prob, h = _near_equal_pairs(2 * n_pairs, 96, 20011, n_pairs, seed=3, ignore_fraction=1.0, noise_seed=0)
    if shift != "none":  # a weight column shared by vocabulary rows moves those student logits
        prob["weight"][:, 0] = 1.0 if shift == "every-logit" else 0.0
        prob["weight"][:4000, 0] = 1.0
        h[n_pairs:, 0] += 0.7 if shift == "every-logit" else 0.3
    fast_err, slow_err, gold_norm = _bf16_and_fp32_path_errors(prob, h, monkeypatch)
    assert fast_err <= 1.2 * slow_err, (fast_err / gold_norm, slow_err / gold_norm)


@bf16_gemm
def test_difference_rows_follow_the_running_ratio_of_sums(monkeypatch):
    """The students' difference rows p~_s - r p~_teacher stay small differences only while r is
    close to the ratio of the two rows' sums over the whole vocabulary, which the sweep learns
    block by block. Here the students' logits are raised by 0.3 in the first vocabulary block
    only (5% of the vocabulary, about 20 blocks: 900 CE rows make the blocks small), so the first
    block's ratio is far from the final one; a ratio kept from there leaves the near-equal pairs'
    KL gradient above this bound (the mutation difference_rows_ratio_fixed_after_first_block),
    while the running ratio measured 1.04x the fp32 path's error on the development CPU."""
    monkeypatch.setenv("CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS", "1")
    n_pairs, n_ce, hd, vocab = 61, 900, 96, 20011
    n = 2 * n_pairs + n_ce
    _, block = _C.lm_head_losses_tiling(False, n, vocab, hd)
    assert vocab / block > 15, block
    prob, h = _near_equal_pairs(n, hd, vocab, n_pairs, seed=4, ignore_fraction=0.0, noise_seed=1)
    h[n_pairs : 2 * n_pairs, 0] += 0.3
    prob["weight"][:, 0] = 0.0
    prob["weight"][:block, 0] = 1.0
    students = slice(n_pairs, 2 * n_pairs)
    fast_err, slow_err, gold_norm = _bf16_and_fp32_path_errors(prob, h, monkeypatch, rows=students)
    assert fast_err <= 1.2 * slow_err, (fast_err / slow_err, slow_err / gold_norm)


@bf16_gemm
def test_both_ways_of_the_kl_gradient_run_on_this_cpu():
    """Without the difference rows (CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS=0, or a student row in two
    pairs), the near-equal-pairs test above covers the hi + lo split at 58 rows and the kept
    pairs' sweep at 122: on a CPU with AMX (the k-outer P W) they are the two ways; elsewhere
    both sizes take the sweep."""
    if not _C.cpu_gemm_two_a_share_one_pass(58):
        pytest.skip("no k-outer P W on this CPU: every size takes the kept pairs' sweep")
    assert not _C.cpu_gemm_two_a_share_one_pass(122)


def test_gradcheck_float64():
    """The teacher is detached, so the KL is only a true function of the student side: check
    it w.r.t. the non-teacher rows of hidden (teacher rows held constant, and not CE rows),
    and the CE w.r.t. everything."""
    prob = make_problem(9, 4, 37, [3, 2], bias=True, dtype=torch.float64, seed=5)
    n_teacher = 3
    teacher = torch.tensor([0, 1, 2, 1, 0])
    student = torch.tensor([3, 4, 5, 6, 8])
    targets = prob["targets"].clone()
    targets[:n_teacher] = -100
    targets[3:] = torch.tensor([1, 5, -100, 30, 2, 36])
    const_rows = prob["hidden"][:n_teacher].clone()
    var_rows = prob["hidden"][n_teacher:].clone().requires_grad_()
    weight = prob["weight"].clone().requires_grad_()
    bias = prob["bias"].clone().requires_grad_()

    def losses(h_var, w, b):
        h = torch.cat([const_rows, h_var])
        return crystal_ext.lm_head_losses(h, w, targets, teacher, student, prob["pair_sample"], 0.5, bias=b)

    assert torch.autograd.gradcheck(
        lambda h: losses(h, weight.detach(), bias.detach()), (var_rows,), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: losses(h, w, b)[0], (var_rows, weight, bias), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda h: losses(h, weight.detach(), None), (var_rows,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("transform", [(1.0, 0.0), (0.5, 3.0)], ids=["bare-head", "scale-softcap"])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias, transform):
    prob = make_problem(9, 5, 67, [3, 2], bias=bias, seed=2)
    hidden = prob["hidden"].requires_grad_()
    weight = prob["weight"].requires_grad_()
    b = prob["bias"].requires_grad_() if bias else None
    plan = plan_of(prob, 0.5)
    args = (hidden, weight, b, list(plan.tensors), plan.paired_rows, None, None, *transform, True)
    torch.library.opcheck(torch.ops.crystal_ext.lm_head_losses_fwd.default, args)


def test_no_targets_and_no_pairs_give_zero_losses_that_backpropagate():
    prob = make_problem(6, 4, 29, [], ignore_fraction=1.0, seed=1)
    hidden = prob["hidden"].requires_grad_()
    weight = prob["weight"].requires_grad_()
    ce, kl = crystal_ext.lm_head_losses(
        hidden, weight, prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"]
    )
    assert ce.item() == 0.0 and kl.item() == 0.0
    (ce + kl).backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
    ref_ce, ref_kl = reference.lm_head_losses(
        prob["hidden"],
        prob["weight"],
        prob["targets"],
        prob["teacher_rows"],
        prob["student_rows"],
        prob["pair_sample"],
    )
    assert ref_ce.item() == 0.0 and ref_kl.item() == 0.0


def test_only_one_loss_used_and_only_weight_requires_grad():
    prob = make_problem(12, 6, 97, [4, 4], seed=4)
    weight = prob["weight"].clone().requires_grad_()
    ref_w = prob["weight"].clone().requires_grad_()
    args = (prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"], 0.5)
    _, kl = crystal_ext.lm_head_losses(prob["hidden"], weight, *args)
    kl.backward()
    _, ref_kl = reference.lm_head_losses(prob["hidden"], ref_w, *args)
    ref_kl.backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, rtol=1e-4, atol=1e-6)


def test_no_grad_forward_matches():
    prob = make_problem(10, 6, 211, [5], seed=8)
    args = [prob[k] for k in ("hidden", "weight", "targets", "teacher_rows", "student_rows", "pair_sample")]
    with torch.no_grad():
        ce, kl = crystal_ext.lm_head_losses(*args, 0.4)
    ref_ce, ref_kl = reference.lm_head_losses(*args, 0.4)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)


def _bad(**changes):
    prob = make_problem(6, 4, 17, [2, 1], bias=True, seed=0)
    prob.pop("weight_grad")
    kwargs = dict(prob)
    topk = changes.pop("topk_fraction", 0.1)
    kwargs.update(changes)
    return lambda: crystal_ext.lm_head_losses(
        kwargs["hidden"],
        kwargs["weight"],
        kwargs["targets"],
        kwargs["teacher_rows"],
        kwargs["student_rows"],
        kwargs["pair_sample"],
        topk,
        bias=kwargs["bias"],
    )


L = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731

BAD_INPUTS = [
    ("hidden-1d", dict(hidden=torch.randn(6)), ValueError, "hidden must be 2-D"),
    ("hidden-int", dict(hidden=torch.ones(6, 4, dtype=torch.long)), ValueError, "hidden must be"),
    (
        "weight-dtype",
        dict(weight=torch.randn(17, 4, dtype=torch.float64)),
        ValueError,
        "weight must have the dtype",
    ),
    ("weight-hd", dict(weight=torch.randn(17, 5)), ValueError, "weight has hidden_dim 5"),
    ("bias-shape", dict(bias=torch.randn(16)), ValueError, "bias must have shape"),
    ("bias-dtype", dict(bias=torch.randn(17, dtype=torch.float64)), ValueError, "bias must have the dtype"),
    ("targets-len", dict(targets=L(1, 2, 3)), ValueError, "targets has 3 entries"),
    ("targets-dtype", dict(targets=torch.zeros(6, dtype=torch.int32)), ValueError, "targets must be int64"),
    ("targets-range", dict(targets=L(0, 1, 17, 2, 3, 4)), ValueError, r"targets\[2\] = 17"),
    ("targets-negative", dict(targets=L(0, 1, -1, 2, 3, 4)), ValueError, r"targets\[2\] = -1"),
    ("teacher-range", dict(teacher_rows=L(0, 6, 1)), ValueError, r"teacher_rows\[1\] = 6"),
    ("student-range", dict(student_rows=L(0, -1, 1)), ValueError, r"student_rows\[1\] = -1"),
    ("student-len", dict(student_rows=L(0, 1)), ValueError, "student_rows has 2 entries"),
    ("sample-len", dict(pair_sample=L(0, 1, 1, 1)), ValueError, "pair_sample has 4 entries"),
    ("teacher-2d", dict(teacher_rows=L(0, 1, 2).view(3, 1)), ValueError, "teacher_rows must be 1-D"),
    ("topk-zero", dict(topk_fraction=0.0), ValueError, "topk_fraction must lie in"),
    ("topk-big", dict(topk_fraction=1.5), ValueError, "topk_fraction must lie in"),
    ("topk-nan", dict(topk_fraction=float("nan")), ValueError, "topk_fraction must lie in"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(case):
    _, changes, exc, match = case
    with pytest.raises(exc, match=match):
        _bad(**changes)()


@pytest.mark.cuda
def test_bad_device_mix(cuda):
    with pytest.raises(RuntimeError, match="weight must be on the device of hidden"):
        _bad(hidden=torch.randn(6, 4, device="cuda"))()


# ---- the plan (crystal_ext.ops.lm_head_plan) and the device top-k ----

PLAN_CASES = [
    # (N, Hd, V, pairs per sample, bias, ignore_fraction, dtype)
    (23, 13, 1001, [5, 1, 12], True, 0.3, torch.float32),  # several samples of different lengths
    (11, 8, 9001, [4, 7], True, 0.2, torch.bfloat16),  # two vocabulary blocks on the CPU
    (11, 8, 9001, [4, 7], False, 0.2, torch.float16),
    (2100, 4, 131, [30, 3], False, 0.0, torch.float32),  # two row chunks on the CPU
    (9, 6, 301, [3, 2], True, 0.3, torch.float64),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: f"N{c[0]}-V{c[2]}-{str(c[6])[6:]}")
def test_prebuilt_plan_equals_the_plain_call_and_the_reference(case):
    n, hd, vocab, pairs, bias, ignore, dtype = case
    prob = make_problem(n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + vocab, dtype=dtype)
    plan = plan_of(prob, 0.4)
    assert isinstance(plan, LmHeadPlan) and plan.tensors.sample_pairs.shape == (len(pairs), max(pairs))
    planned = run(crystal_ext.lm_head_losses, prob, plan=plan)
    _assert_identical(planned, run(crystal_ext.lm_head_losses, prob, 0.4))
    if dtype in (torch.float32, torch.float64):
        gold = run(reference.lm_head_losses, prob, 0.4, dtype=torch.float64)
        for name, f, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], planned, gold):
            if g is not None:
                torch.testing.assert_close(
                    f.double(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name
                )


@pytest.mark.parametrize("columns", ["first-block", "single-column"])
def test_prebuilt_plan_with_neg_inf_and_nan(columns):
    prob = make_problem(11, 8, 9001, [4, 7], bias=True, seed=3)
    prob["bias"][: 8192 if columns == "first-block" else 1] = float("-inf")
    plan = plan_of(prob, 0.4)
    planned = run(crystal_ext.lm_head_losses, prob, plan=plan)
    for a, b in zip(planned[:2], run(reference.lm_head_losses, prob, 0.4)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    prob["hidden"][int(prob["student_rows"][0])] = float("nan")
    ce, kl = run(crystal_ext.lm_head_losses, prob, plan=plan)[:2]
    assert ce.isnan() and kl.isnan()


def _select_topk_rule(pair_kl, pair_sample, fraction):
    """The published selection in plain Python: per sample (in label order) the k largest KLs,
    NaN above every number, ties to the earlier pair; (kl, coef)."""
    values = pair_kl.tolist()
    labels = sorted(set(pair_sample.tolist()))
    coef = [0.0] * len(values)
    total = 0.0
    for label in labels:
        members = [i for i, s in enumerate(pair_sample.tolist()) if s == label]
        ranked = sorted(
            members,
            key=lambda i: (not math.isnan(values[i]), -values[i] if not math.isnan(values[i]) else 0, i),
        )
        k = max(1, int(fraction * len(members)))
        for i in ranked[:k]:
            coef[i] = 1.0 / (k * len(labels))
        total += sum(values[i] for i in ranked[:k]) / k
    return total / len(labels), torch.tensor(coef, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(6))
def test_device_topk_selection_matches_the_rule_with_ties_and_nan(seed):
    """The ATen selection the kernels run on every device, on KLs with many ties and NaNs."""
    g = torch.Generator().manual_seed(seed)
    m = 40
    pair_kl = torch.randint(0, 5, (m,), generator=g).double() / 4  # few distinct values: ties
    pair_kl[torch.rand(m, generator=g) < 0.15] = float("nan")
    pair_sample = torch.randint(0, 4, (m,), generator=g) * 7 - 3
    fraction = [0.1, 0.3, 0.5, 1.0, 0.25, 0.7][seed]
    plan = lm_head_plan(torch.zeros(1, dtype=torch.long), torch.zeros(m, dtype=torch.long),
                        torch.zeros(m, dtype=torch.long), pair_sample, fraction, 1, 3, "cpu")  # fmt: skip
    want_kl, want_coef = _select_topk_rule(pair_kl, pair_sample, fraction)
    for dtype in (torch.float64, torch.float32):
        kl, coef = _C.lm_head_select_topk(
            pair_kl.to(dtype), plan.tensors.sample_pairs, plan.tensors.sample_k, plan.tensors.kept_slots
        )
        assert kl.dtype == dtype and coef.dtype == dtype
        torch.testing.assert_close(coef, want_coef.to(dtype), rtol=0, atol=0)
        if math.isnan(want_kl):
            assert kl.isnan()
        else:
            torch.testing.assert_close(kl.double(), torch.tensor(want_kl, dtype=torch.float64))
    # The kept values are torch.topk's values, sample by sample.
    for label in pair_sample.unique().tolist():
        values = pair_kl[pair_sample == label]
        k = max(1, int(fraction * values.numel()))
        kept = pair_kl[(pair_sample == label) & (want_coef > 0)]
        torch.testing.assert_close(kept.sort().values, values.topk(k).values.sort().values, equal_nan=True)


def _plan_tensors(prob, topk=0.5):
    """The op's plan list by name (a dict, to replace one tensor) and its paired-row count."""
    plan = plan_of(prob, topk)
    return plan.tensors._asdict(), plan.paired_rows


def _direct_call(prob, tensors, paired_rows, scale=1.0, cap=0.0):
    """The compiled forward called with a plan list, without the Python checks."""
    return torch.ops.crystal_ext.lm_head_losses_fwd(
        prob["hidden"],
        prob["weight"],
        prob["bias"],
        list(tensors.values()),
        paired_rows,
        None,
        None,
        scale,
        cap,
        False,
    )


@pytest.mark.parametrize(
    "name", ["rows", "row_targets", "ce_rows", "pair_rows", "sample_pairs", "sample_k", "kept_slots"]
)
def test_wrong_plan_tensors_name_the_argument(name):
    prob = make_problem(9, 5, 67, [3, 2], bias=True, seed=2)
    plan, paired_rows = _plan_tensors(prob)
    call = lambda p: _direct_call(prob, p, paired_rows)  # noqa: E731
    call(plan)
    with pytest.raises(ValueError, match=f"plan tensor {name} must be int64"):
        call({**plan, name: plan[name].int()})
    with pytest.raises(ValueError, match=f"plan tensor {name} must have shape"):
        call({**plan, name: plan[name].unsqueeze(0)})


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_plan_list_of_the_wrong_length_is_refused(change):
    """The schema's `Tensor[] plan` is unpacked in one place, which names what it must hold."""
    prob = make_problem(9, 5, 67, [3, 2], bias=True, seed=2)
    plan, paired_rows = _plan_tensors(prob)
    if change == "missing":
        del plan["kept_slots"]
    else:
        plan["spare"] = plan["kept_slots"]
    got = 6 if change == "missing" else 8
    match = (
        r"lm_head_losses: plan must hold 7 tensors \(rows, row_targets, .*kept_slots; build it with "
        rf"lm_head_plan\), got {got}"
    )
    with pytest.raises(ValueError, match=match):
        _direct_call(prob, plan, paired_rows)


def test_python_and_kernel_plans_name_the_same_tensors_in_the_same_order():
    """One list on each side (PlanTensors, csrc/lm_head_plan.h), checked against each other when
    the extension loads; a difference is named, so an op never reads one tensor as another."""
    assert _extension.plan_mismatch("lm_head_losses", PlanTensors._fields) is None
    reordered = ("row_targets", "rows", *PlanTensors._fields[2:])
    error = _extension.plan_mismatch("lm_head_losses", reordered)
    assert "unpack the lm_head_losses plan as ['rows', 'row_targets'" in error
    assert "Python plan holds ['row_targets', 'rows'" in error
    assert _extension.plan_mismatch("lm_head_losses", PlanTensors._fields[:-1]) is not None


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name", ["rows", "row_targets", "ce_rows", "pair_rows", "sample_pairs", "sample_k", "kept_slots"]
)
def test_cuda_plan_tensor_on_the_cpu_is_refused(name, cuda):
    prob = make_problem(9, 5, 67, [3, 2], bias=True, seed=2, device="cuda")
    plan, paired_rows = _plan_tensors(prob)
    plan[name] = plan[name].cpu()
    with pytest.raises(RuntimeError, match=f"plan tensor {name} must be on the device of hidden"):
        _direct_call(prob, plan, paired_rows)


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("rows", lambda t: t.clone().fill_(9), r"plan rows\[0\] = 9 is not a distinct row"),
        ("row_targets", lambda t: t.clone().fill_(67), r"plan row_targets\[0\] = 67"),
        ("pair_rows", lambda t: t.clone().fill_(-1), r"plan pair_rows\[:, 0\]"),
        ("sample_pairs", lambda t: t.clone().fill_(0), r"plan sample_pairs\[0, 1\] = 0"),
        ("sample_k", lambda t: t.clone().fill_(7), r"plan sample_k\[0\] = 7"),
        ("kept_slots", lambda t: t.flip(0), "plan kept_slots does not list"),
    ],
)
def test_cpu_kernel_refuses_hand_made_plan_values(name, change, match):
    """The CPU kernel reads the plan on the host anyway, and checks it: a clear error, not a
    read out of bounds."""
    prob = make_problem(9, 5, 67, [3, 2], bias=True, seed=2)
    plan, paired_rows = _plan_tensors(prob)
    plan[name] = change(plan[name])
    with pytest.raises(ValueError, match=match):
        _direct_call(prob, plan, paired_rows)


def test_plan_for_another_problem_is_refused():
    prob = make_problem(9, 5, 67, [3, 2], seed=2)
    plan = plan_of(prob, 0.5)
    with pytest.raises(ValueError, match=r"was built for 9 rows and vocabulary 67"):
        crystal_ext.lm_head_losses(prob["hidden"][:8], prob["weight"], plan)
    with pytest.raises(ValueError, match="teacher_rows, student_rows and pair_sample must be None"):
        crystal_ext.lm_head_losses(prob["hidden"], prob["weight"], plan, prob["teacher_rows"])
    with pytest.raises(RuntimeError, match=r"was built on cpu, but hidden is on meta"):
        crystal_ext.lm_head_losses(prob["hidden"].to("meta"), prob["weight"].to("meta"), plan)


# ---- CUDA ----


@pytest.fixture
def reference_without_tf32(monkeypatch):
    """The reference's fp32 GEMMs in full fp32 on the GPU (restored after the test)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-Hd{s[1]}-V{s[2]}-M{sum(s[3])}")
def test_cuda_matches_reference_fp32(shape, cuda, reference_without_tf32):
    n, hd, vocab, pairs, bias, ignore = shape
    prob = make_problem(n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + vocab, device="cuda")
    fused = run(crystal_ext.lm_head_losses, prob, 0.5)
    ref = run(reference.lm_head_losses, prob, 0.5)
    for a, b in zip(fused[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[2:], ref[2:]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * (b.abs().max().item() + 1e-12))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_error_vs_float64(dtype, cuda):
    prob = make_problem(40, 64, 5003, [10, 6], bias=True, seed=11, device="cuda")
    gold = run(reference.lm_head_losses, prob, 0.3, dtype=torch.float64)
    fused = run(crystal_ext.lm_head_losses, prob, 0.3, dtype=dtype)
    ref = run(reference.lm_head_losses, prob, 0.3, dtype=dtype)
    for name, f, r, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref, gold):
        assert _err(f, g) <= 2 * _err(r, g) + 1e-6 * g.abs().max().item(), name


@pytest.mark.cuda
def test_cuda_opcheck_and_edge_cases(cuda):
    prob = make_problem(9, 5, 67, [3, 2], bias=True, seed=2, device="cuda")
    plan = plan_of(prob, 0.5)
    args = (
        prob["hidden"].requires_grad_(),
        prob["weight"].requires_grad_(),
        prob["bias"].requires_grad_(),
        list(plan.tensors),
        plan.paired_rows,
        None,
        None,
        0.5,
        3.0,
        True,
    )
    torch.library.opcheck(torch.ops.crystal_ext.lm_head_losses_fwd.default, args)
    empty = make_problem(6, 4, 29, [], ignore_fraction=1.0, seed=1, device="cuda")
    fused = run(crystal_ext.lm_head_losses, empty)
    assert fused[0].item() == 0.0 and fused[1].item() == 0.0
    assert torch.count_nonzero(fused[2]) == 0


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape",
    [
        (40, 64, 70001, [10, 6]),  # three vocabulary blocks on the GPU: the cross-block rescale
        (5000, 32, 1000, [20, 7]),  # two row chunks of 4096 (ignore_fraction 0 below)
    ],
    ids=["three-vocab-blocks", "two-row-chunks"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_multi_block_and_chunk(shape, dtype, cuda, reference_without_tf32):
    n, hd, vocab, pairs = shape
    prob = make_problem(n, hd, vocab, pairs, bias=True, ignore_fraction=0.0, seed=5, device="cuda")
    chunks, blocks = plan_counts(prob, "cuda")
    assert (blocks if vocab > 10000 else chunks) >= 2
    gold = run(reference.lm_head_losses, prob, 0.3, dtype=torch.float64)
    fused = run(crystal_ext.lm_head_losses, prob, 0.3, dtype=dtype)
    ref = run(reference.lm_head_losses, prob, 0.3, dtype=dtype)
    for name, f, r, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref, gold):
        if g is None:
            continue
        if dtype == torch.float32:
            assert _err(f, g) <= 1e-4 * g.double().norm().item() + 1e-9, name
        else:
            assert _err(f, g) <= 2 * _err(r, g) + 1e-6 * g.abs().max().item(), name


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_float64(cuda):
    prob = make_problem(37, 16, 3001, [9, 4], bias=True, seed=3)
    cpu = run(crystal_ext.lm_head_losses, prob, 0.5, dtype=torch.float64)
    gpu_prob = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in prob.items()}
    gpu = run(crystal_ext.lm_head_losses, gpu_prob, 0.5, dtype=torch.float64)
    for a, b in zip(gpu, cpu):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


def _non_contiguous(prob):
    """The same values as prob with hidden column-major and weight a column slice of a wider
    matrix, as a model's tied or sliced head can pass them."""
    out = dict(prob)
    out["hidden"] = prob["hidden"].T.contiguous().T
    wide = torch.zeros(
        prob["weight"].shape[0],
        prob["weight"].shape[1] + 3,
        dtype=prob["weight"].dtype,
        device=prob["weight"].device,
    )
    wide[:, 1:-2] = prob["weight"]
    out["weight"] = wide[:, 1:-2]
    assert not out["hidden"].is_contiguous() and not out["weight"].is_contiguous()
    return out


def _assert_identical(a_results, b_results):
    for a, b in zip(a_results, b_results):
        if b is None:
            assert a is None
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_non_contiguous_inputs_and_determinism(device, request):
    if device == "cuda":
        request.getfixturevalue("cuda")
    prob = make_problem(40, 16, 9001, [10, 6], bias=True, seed=21, device=device)
    first = run(crystal_ext.lm_head_losses, prob, 0.3)
    _assert_identical(run(crystal_ext.lm_head_losses, prob, 0.3), first)
    strided = run(crystal_ext.lm_head_losses, _non_contiguous(prob), 0.3)
    for a, b in zip(strided, first):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_tf32_flag_does_not_change_the_result(dtype, cuda, monkeypatch):
    """The op pins its fp32 GEMMs: the same result with the global TF32 flag on and off."""
    prob = make_problem(40, 64, 9001, [10, 6], bias=True, seed=11, device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    off = run(crystal_ext.lm_head_losses, prob, 0.3, dtype=dtype)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    _assert_identical(run(crystal_ext.lm_head_losses, prob, 0.3, dtype=dtype), off)
    assert torch.backends.cuda.matmul.allow_tf32  # the op leaves the global flag as it was


def test_cuda_non_default_stream(cuda):
    prob = make_problem(40, 64, 9001, [10, 6], bias=True, seed=12, device="cuda")
    on_default = run(crystal_ext.lm_head_losses, prob, 0.3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_side = run(crystal_ext.lm_head_losses, prob, 0.3)
    torch.cuda.current_stream().wait_stream(stream)
    _assert_identical(on_side, on_default)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["head-trained", "head-frozen"])
def test_cuda_forward_and_backward_without_host_synchronisation(cuda, dtype, weight_grad):
    """With the plan built beforehand (its one pinned copy happens there), neither direction
    waits for the GPU: no .item(), no device-to-host or pageable copy, no synchronize; the
    top-k selection and the weight sweep's choice of the kept pairs run on the device."""
    prob = make_problem(40, 64, 9001, [10, 6, 1], bias=True, seed=13, device="cuda", weight_grad=weight_grad)
    plan = plan_of(prob, 0.3)
    expected = run(crystal_ext.lm_head_losses, prob, dtype=dtype, plan=plan)  # warm-up: lazy init may sync
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run(crystal_ext.lm_head_losses, prob, dtype=dtype, plan=plan)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    # Close rather than equal: pairs sharing a student row add their gradients atomically.
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(run(crystal_ext.lm_head_losses, prob, 0.3, dtype=dtype), expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- the model's own logits: softcap(logit_scale * (h W^T + b)) ----

# (logit_scale, logit_softcap): Cohere-like scale, Granite-like division, a Gemma-like cap (tight
# enough that many logits sit on the tanh's flat part), and both.
TRANSFORMS = [(0.25, None), (1.0, 2.5), (3.0, 1.5)]
TRANSFORM_IDS = ["scale", "softcap", "scale-softcap"]


def run_transformed(fn, prob, transform, topk=0.5, dtype=None, g_ce=0.7, g_kl=1.3):
    """run() with the model's logit transform."""
    scale, cap = transform
    return run(functools.partial(fn, logit_scale=scale, logit_softcap=cap), prob, topk, dtype, g_ce, g_kl)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-Hd{s[1]}-V{s[2]}-M{sum(s[3])}")
def test_transform_matches_reference_fp32(shape, transform):
    n, hd, vocab, pairs, bias, ignore = shape
    prob = make_problem(n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + vocab + 1, scale=2.0)
    fused = run_transformed(crystal_ext.lm_head_losses, prob, transform)
    ref = run_transformed(reference.lm_head_losses, prob, transform)
    for name, a, b in zip(["ce", "kl"], fused[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for name, a, b in zip(["d hidden", "d weight", "d bias"], fused[2:], ref[2:]):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * (b.abs().max().item() + 1e-12), msg=name)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transform_float64_exact_and_not_the_bare_head(transform):
    prob = make_problem(15, 7, 257, [6, 4], bias=True, dtype=torch.float64, seed=3, scale=2.0)
    fused = run_transformed(crystal_ext.lm_head_losses, prob, transform)
    ref = run_transformed(reference.lm_head_losses, prob, transform)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bare = run(reference.lm_head_losses, prob, 0.5)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(fused, bare))


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transform_running_max_growing_in_a_later_vocabulary_block(transform):
    """The largest logits in the last of three CPU vocabulary blocks: the rescale of what earlier
    blocks accumulated, the soft-cap's per-pair cross expectation included."""
    prob = make_problem(40, 16, 20000, [10, 6], bias=True, seed=7)
    prob["bias"][16384:] += 3.0
    gold = run_transformed(reference.lm_head_losses, prob, transform, 0.3, dtype=torch.float64)
    fused = run_transformed(crystal_ext.lm_head_losses, prob, transform, 0.3)
    for name, f, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, gold):
        torch.testing.assert_close(f.double(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transform_low_precision_error_vs_float64(dtype, transform):
    """bf16/fp16 with the transform: the fused op's error against float64 is at most twice the
    reference's in the same dtype. The float64 run takes the inputs rounded to `dtype`, so that
    both errors are the arithmetic's: against the unrounded inputs the rounding of the inputs
    dominates both, and a scalar loss's error then cancels or not by chance."""
    prob = make_problem(40, 32, 2003, [10, 6], bias=True, seed=11)
    for key in ("hidden", "weight", "bias"):
        prob[key] = prob[key].to(dtype).float()
    gold = run_transformed(reference.lm_head_losses, prob, transform, 0.3, dtype=torch.float64)
    fused = run_transformed(crystal_ext.lm_head_losses, prob, transform, 0.3, dtype=dtype)
    ref = run_transformed(reference.lm_head_losses, prob, transform, 0.3, dtype=dtype)
    for name, f, r, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref, gold):
        assert _err(f, g) <= 2 * _err(r, g) + 1e-6 * g.abs().max().item(), (name, _err(f, g), _err(r, g))


@pytest.mark.parametrize("columns", NEG_INF_COLUMNS.values(), ids=NEG_INF_COLUMNS.keys())
@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transform_with_neg_inf_and_large_logits(transform, columns):
    """-inf bias columns (a soft-cap makes them -cap, finite, as the models' own forward does) and
    logits of a few hundred (the cap's flat part, where its slope is 0 in float32)."""
    prob = make_problem(16, 8, 10000, [5, 4], bias=True, ignore_fraction=0.2, seed=17, scale=30.0)
    prob["bias"][columns] = float("-inf")
    inside = (prob["targets"] >= columns.start) & (prob["targets"] < columns.stop)
    prob["targets"][inside] = columns.stop % 10000
    fused = run_transformed(crystal_ext.lm_head_losses, prob, transform)
    ref = run_transformed(reference.lm_head_losses, prob, transform, dtype=torch.float64)
    for name, f, r in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref):
        assert torch.isfinite(r).all() and torch.isfinite(f).all(), name
        torch.testing.assert_close(f.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
def test_transform_gradcheck_float64(transform):
    """As test_gradcheck_float64, with the transform: the KL w.r.t. the non-teacher rows, the
    CE w.r.t. hidden, weight and bias (through the soft-cap's slope)."""
    scale, cap = transform
    prob = make_problem(9, 4, 37, [3, 2], bias=True, dtype=torch.float64, seed=5, scale=2.0)
    teacher = torch.tensor([0, 1, 2, 1, 0])
    student = torch.tensor([3, 4, 5, 6, 8])
    targets = prob["targets"].clone()
    targets[:3] = -100
    targets[3:] = torch.tensor([1, 5, -100, 30, 2, 36])
    const_rows = prob["hidden"][:3].clone()
    var_rows = prob["hidden"][3:].clone().requires_grad_()
    weight = prob["weight"].clone().requires_grad_()
    bias = prob["bias"].clone().requires_grad_()

    def losses(h_var, w, b):
        h = torch.cat([const_rows, h_var])
        return crystal_ext.lm_head_losses(
            h,
            w,
            targets,
            teacher,
            student,
            prob["pair_sample"],
            0.5,
            bias=b,
            logit_scale=scale,
            logit_softcap=cap,
        )

    assert torch.autograd.gradcheck(
        lambda h: losses(h, weight.detach(), bias.detach()), (var_rows,), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: losses(h, w, b)[0], (var_rows, weight, bias), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    "scale, cap, match",
    [
        (0.0, None, "logit_scale must be finite and > 0"),
        (-2.0, None, "logit_scale must be finite and > 0"),
        (float("inf"), None, "logit_scale must be finite and > 0"),
        (float("nan"), None, "logit_scale must be finite and > 0"),
        (1.0, -1.0, "logit_softcap must be None, 0"),
        (1.0, float("inf"), "logit_softcap must be None, 0"),
        (1.0, float("nan"), "logit_softcap must be None, 0"),
    ],
)
@pytest.mark.parametrize(
    "fn", [crystal_ext.lm_head_losses, reference.lm_head_losses], ids=["fused", "reference"]
)
def test_bad_transform_names_the_argument(fn, scale, cap, match):
    prob = make_problem(6, 4, 17, [2, 1], bias=True, seed=0)
    args = [prob[k] for k in ("hidden", "weight", "targets", "teacher_rows", "student_rows", "pair_sample")]
    with pytest.raises(ValueError, match=match):
        fn(*args, logit_scale=scale, logit_softcap=cap)


@pytest.mark.parametrize(
    "scale, cap, match",
    [(0.0, 0.0, "logit_scale must be finite and > 0"), (1.0, -3.0, "logit_softcap must be 0 \\(off\\)")],
)
def test_compiled_op_refuses_a_bad_transform(scale, cap, match):
    """The compiled op checks the transform too (a direct torch.ops call skips the Python check)."""
    prob = make_problem(9, 5, 67, [3, 2], bias=True, seed=2)
    plan, paired_rows = _plan_tensors(prob)
    with pytest.raises(ValueError, match=match):
        _direct_call(prob, plan, paired_rows, scale, cap)


@pytest.mark.cuda
@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_transform_matches_the_reference(transform, dtype, cuda, reference_without_tf32):
    """The CUDA kernels with the transform, on several vocabulary blocks, against the float64
    reference (float32: to 1e-4; bf16: within twice the bf16 reference's error)."""
    prob = make_problem(70, 24, 40000, [12, 9], bias=True, seed=13, device="cuda", scale=2.0)
    gold = run_transformed(reference.lm_head_losses, prob, transform, 0.3, dtype=torch.float64)
    fused = run_transformed(crystal_ext.lm_head_losses, prob, transform, 0.3, dtype=dtype)
    if dtype == torch.float32:
        for name, f, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, gold):
            torch.testing.assert_close(f.double(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)
        return
    ref = run_transformed(reference.lm_head_losses, prob, transform, 0.3, dtype=dtype)
    for name, f, r, g in zip(["ce", "kl", "d hidden", "d weight", "d bias"], fused, ref, gold):
        assert _err(f, g) <= 2 * _err(r, g) + 1e-6 * g.abs().max().item(), (name, _err(f, g), _err(r, g))

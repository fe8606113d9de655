"""Override rows of the LM-head losses: the reference against the plain losses on a weight with
the rows written in, the fused path against the reference, gradcheck, the frozen weight left
untouched, and bad inputs."""

from __future__ import annotations

import pytest
import torch

import crystal_ext
from crystal_ext.ops import reference
from crystal_ext.ops.checks import check_override
from crystal_ext.ops.lm_head_plan import lm_head_plan

fused_only = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="compiled extension unavailable"
)


def problem(dtype=torch.float64, bias=False, n=14, hd=6, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hd, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hd, generator=g, dtype=torch.float64) / hd**0.5 * 2
    ids = torch.tensor([21 % vocab, 4, 9])
    rows = torch.randn(3, hd, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[[0, 5]] = 4  # targets that are override ids
    targets[[1, 7]] = 21 % vocab
    targets[[2, 11]] = -100
    teacher = torch.tensor([3, 4, 5, 8, 9, 12])
    student = torch.tensor([6, 7, 8, 10, 13, 13])
    sample = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(
        hidden=cast(hidden),
        weight=cast(weight),
        bias=cast(b),
        targets=targets,
        teacher_rows=teacher,
        student_rows=student,
        pair_sample=sample,
        override_ids=ids,
        override_rows=cast(rows),
    )


# The model's own logits: the head's output as it is, and a scale with a soft-cap
# (crystal_ext.ops.model_logits).
TRANSFORMS = {"bare-head": {}, "scale-softcap": dict(logit_scale=0.6, logit_softcap=2.0)}


def losses_and_grads(fn, prob, topk=0.5, g_ce=0.7, g_kl=1.3, with_override=True, transform=None):
    hidden = prob["hidden"].detach().requires_grad_()
    rows = prob["override_rows"].detach().requires_grad_()
    kwargs = dict(override_ids=prob["override_ids"], override_rows=rows) if with_override else {}
    kwargs.update(transform or {})
    ce, kl = fn(
        hidden,
        prob["weight"],
        prob["targets"],
        prob["teacher_rows"],
        prob["student_rows"],
        prob["pair_sample"],
        topk,
        bias=prob["bias"],
        **kwargs,
    )
    (g_ce * ce + g_kl * kl).backward()
    return ce.detach(), kl.detach(), hidden.grad, rows.grad


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("bias", [False, True])
def test_reference_override_equals_the_plain_losses_with_the_rows_written_in(bias, transform):
    prob = problem(bias=bias)
    ce, kl, d_hidden, d_rows = losses_and_grads(reference.lm_head_losses, prob, transform=transform)
    ids = prob["override_ids"]
    written = prob["weight"].clone()
    written[ids] = prob["override_rows"]
    hidden = prob["hidden"].detach().requires_grad_()
    weight = written.requires_grad_()
    ce2, kl2 = reference.lm_head_losses(
        hidden,
        weight,
        prob["targets"],
        prob["teacher_rows"],
        prob["student_rows"],
        prob["pair_sample"],
        0.5,
        bias=prob["bias"],
        **transform,
    )
    (0.7 * ce2 + 1.3 * kl2).backward()
    torch.testing.assert_close(ce, ce2.detach())
    torch.testing.assert_close(kl, kl2.detach())
    torch.testing.assert_close(d_hidden, hidden.grad)
    torch.testing.assert_close(d_rows, weight.grad[ids])
    assert kl > 0 and d_rows.abs().sum() > 0


@fused_only
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_override_matches_the_reference(dtype, bias, transform):
    prob = problem(dtype=dtype, bias=bias)
    before = prob["weight"].clone()
    got = losses_and_grads(crystal_ext.lm_head_losses, prob, transform=transform)
    want = losses_and_grads(reference.lm_head_losses, prob, transform=transform)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("ce", "kl", "d hidden", "d rows"), got, want):
        torch.testing.assert_close(a.to(b.dtype), b, **tol, msg=name)
    assert torch.equal(prob["weight"], before), "the frozen weight must be left as it was"


@fused_only
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
def test_fused_override_gradcheck_float64(transform):
    """The teacher is detached, so the KL is a true function only of the student rows of hidden
    (teacher rows held constant) and not of the override rows (which the teacher logits also
    use): ce + kl w.r.t. the other rows of hidden, ce alone w.r.t. the override rows. The KL's
    row gradient is checked against the reference above."""
    prob = problem(n=12, hd=4, vocab=11)
    ids = torch.tensor([10, 4, 0])
    targets = prob["targets"].clone()
    targets[:4] = -100
    targets[4:7] = torch.tensor([10, 0, 4])
    teacher, student = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 6])
    sample = torch.tensor([0, 0, 1, 1])
    const_rows = prob["hidden"][:4].clone()

    def losses(h_var, rows):
        return crystal_ext.lm_head_losses(
            torch.cat([const_rows, h_var]),
            prob["weight"],
            targets,
            teacher,
            student,
            sample,
            0.5,
            override_ids=ids,
            override_rows=rows,
            **transform,
        )

    h_var = prob["hidden"][4:].clone().requires_grad_()
    rows = prob["override_rows"].clone().requires_grad_()
    ce_kl = lambda h: sum(losses(h, rows.detach()))  # noqa: E731
    assert torch.autograd.gradcheck(ce_kl, (h_var,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda r: losses(h_var.detach(), r)[0], (rows,), eps=1e-6, atol=1e-7)


@fused_only
def test_fused_override_runs_without_grad_and_refuses_a_head_that_requires_grad():
    prob = problem(dtype=torch.float32)
    with torch.no_grad():
        ce, kl = crystal_ext.lm_head_losses(
            prob["hidden"],
            prob["weight"],
            prob["targets"],
            prob["teacher_rows"],
            prob["student_rows"],
            prob["pair_sample"],
            0.5,
            override_ids=prob["override_ids"],
            override_rows=prob["override_rows"],
        )
    want = losses_and_grads(reference.lm_head_losses, prob)
    torch.testing.assert_close((ce, kl), want[:2], rtol=1e-4, atol=1e-5)
    weight = prob["weight"].clone().requires_grad_()
    for fn in (crystal_ext.lm_head_losses, reference.lm_head_losses):
        with pytest.raises(ValueError, match="head is frozen, but weight requires grad"):
            fn(
                prob["hidden"].clone().requires_grad_(),
                weight,
                prob["targets"],
                prob["teacher_rows"],
                prob["student_rows"],
                prob["pair_sample"],
                override_ids=prob["override_ids"],
                override_rows=prob["override_rows"],
            )


BAD = [
    (dict(override_ids=torch.tensor([1, 2, 23])), r"override_ids must be in \[0, 23\)"),
    (dict(override_ids=torch.tensor([-1, 2, 3])), r"override_ids must be in"),
    (dict(override_ids=torch.tensor([4, 5, 4])), "override_ids has duplicates"),
    (dict(override_ids=torch.tensor([[1, 2, 3]])), "override_ids must be a 1-D int64"),
    (dict(override_ids=torch.tensor([1.0, 2.0, 3.0])), "override_ids must be int64"),
    (dict(override_rows=torch.zeros(2, 6, dtype=torch.float64)), r"override_rows must be \[3, 6\]"),
    (dict(override_rows=torch.zeros(3, 5, dtype=torch.float64)), r"override_rows must be \[3, 6\]"),
    (dict(override_rows=None), "must be given together"),
]


@pytest.mark.parametrize(
    "fn", [reference.lm_head_losses, pytest.param(crystal_ext.lm_head_losses, marks=fused_only)]
)
@pytest.mark.parametrize("change, match", BAD)
def test_bad_override_names_the_argument(fn, change, match):
    prob = {**problem(), **change}
    with pytest.raises(ValueError, match=match):
        fn(
            prob["hidden"],
            prob["weight"],
            prob["targets"],
            prob["teacher_rows"],
            prob["student_rows"],
            prob["pair_sample"],
            override_ids=prob["override_ids"],
            override_rows=prob["override_rows"],
        )


@fused_only
def test_fused_override_without_targeted_rows_or_pairs():
    prob = problem()
    prob["targets"] = torch.full_like(prob["targets"], -100)
    got = losses_and_grads(crystal_ext.lm_head_losses, prob)
    want = losses_and_grads(reference.lm_head_losses, prob)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    empty = torch.zeros(0, dtype=torch.long)
    prob.update(teacher_rows=empty, student_rows=empty, pair_sample=empty)
    ce, kl, d_hidden, d_rows = losses_and_grads(crystal_ext.lm_head_losses, prob)
    assert ce == 0 and kl == 0 and d_rows.abs().sum() == 0 and d_hidden.abs().sum() == 0


@fused_only
@pytest.mark.parametrize("transform", [(1.0, 0.0), (0.6, 2.0)], ids=TRANSFORMS.keys())
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias, transform):
    """The LM-head op itself takes the override rows: its schema says it mutates nothing, and
    opcheck's schema test checks that it writes no input (the weight included)."""
    prob = problem(bias=bias)
    plan = lm_head_plan(
        prob["targets"],
        prob["teacher_rows"],
        prob["student_rows"],
        prob["pair_sample"],
        0.5,
        prob["hidden"].shape[0],
        prob["weight"].shape[0],
        prob["hidden"].device,
    )
    args = (
        prob["hidden"].requires_grad_(),
        prob["weight"],
        prob["bias"],
        list(plan.tensors),
        plan.paired_rows,
        prob["override_ids"],
        prob["override_rows"].requires_grad_(),
        *transform,
        True,
    )
    torch.library.opcheck(torch.ops.crystal_ext.lm_head_losses_fwd.default, args)
    schema = torch.ops.crystal_ext.lm_head_losses_fwd.default._schema
    assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def test_override_ids_off_the_cpu_are_not_read_on_each_call():
    """Ids on an accelerator are checked where they are made (NewTokenRows), not on every call:
    reading them back would wait for the device. Meta tensors have no values to read."""
    weight = torch.empty(23, 6, device="meta")
    ids = torch.empty(3, dtype=torch.long, device="meta")
    assert check_override(weight, ids, torch.empty(3, 6, device="meta"), "op")
    with pytest.raises(ValueError, match="override_rows must be"):
        check_override(weight, ids, torch.empty(2, 6, device="meta"), "op")


@fused_only
@pytest.mark.cuda
def test_cuda_override_forward_and_backward_without_host_synchronisation(cuda):
    """With the plan built beforehand and the ids on the GPU (checked where they were made), the
    override path waits for the device in neither direction."""
    prob = problem(dtype=torch.float32)
    plan = lm_head_plan(
        prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"], 0.5,
        prob["hidden"].shape[0], prob["weight"].shape[0], torch.device("cuda", torch.cuda.current_device()),
    )  # fmt: skip
    on_gpu = {k: v.cuda() for k, v in prob.items() if isinstance(v, torch.Tensor)}

    def step():
        hidden = on_gpu["hidden"].detach().requires_grad_()
        rows = on_gpu["override_rows"].detach().requires_grad_()
        ce, kl = crystal_ext.lm_head_losses(
            hidden, on_gpu["weight"], plan, override_ids=on_gpu["override_ids"], override_rows=rows
        )
        (0.7 * ce + 1.3 * kl).backward()
        return ce.detach(), kl.detach(), hidden.grad, rows.grad

    expected = step()  # warm-up: lazy init may sync
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    want = losses_and_grads(reference.lm_head_losses, prob)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def random_problem(n, hd, vocab, ids, dtype=torch.float32, bias=True, seed=0):
    """Fresh random inputs: odd sizes, three samples of pairs, targets that hit override ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(ids, dtype=torch.long)
    targets = torch.randint(0, vocab, (n,), generator=g)
    hits = torch.randperm(n, generator=g)[: max(1, n // 4)]
    targets[hits] = ids[torch.randint(0, ids.numel(), (hits.numel(),), generator=g)]
    targets[torch.rand(n, generator=g) < 0.2] = -100
    rows = torch.randperm(n, generator=g)
    m = min(9, n // 2)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(
        hidden=cast(torch.randn(n, hd, generator=g, dtype=torch.float64)),
        weight=cast(torch.randn(vocab, hd, generator=g, dtype=torch.float64) / hd**0.5 * 2),
        bias=cast(torch.randn(vocab, generator=g, dtype=torch.float64)) if bias else None,
        targets=targets,
        teacher_rows=rows[:m],
        student_rows=rows[m : 2 * m],
        pair_sample=torch.tensor([5, -2, 9])[torch.arange(m) % 3],
        override_ids=ids,
        override_rows=cast(torch.randn(ids.numel(), hd, generator=g, dtype=torch.float64) / hd**0.5 * 2),
    )


def _spread_ids(vocab, n, seed=1):
    """n unique ids over the whole vocabulary, 0 and vocab - 1 among them."""
    g = torch.Generator().manual_seed(seed)
    middle = torch.randperm(vocab - 2, generator=g)[: n - 2] + 1
    return torch.cat([torch.tensor([vocab - 1]), middle, torch.tensor([0])])


# (rows N, hidden size, vocabulary V, override ids): one id (0), ids at both ends, 300 ids spread
# over several vocabulary blocks, and rows over several row chunks.
RANDOM_CASES = {
    "n1-id0": (37, 13, 611, [0]),
    "ids-at-0-and-V-1": (37, 13, 611, [610, 0, 300]),
    "ids-over-blocks": (37, 13, 9001, _spread_ids(9001, 300)),
    "rows-over-chunks": (2801, 5, 301, [300, 0, 17]),
}


def _err(a, b):
    return (a.double() - b.double()).norm().item()


def _cast(prob, dtype):
    """prob with its floating-point tensors in dtype."""
    floating = lambda v: isinstance(v, torch.Tensor) and v.is_floating_point()  # noqa: E731
    return {k: v.to(dtype) if floating(v) else v for k, v in prob.items()}


@fused_only
@pytest.mark.parametrize("pair_diff", ["1", "0"], ids=["difference-rows", "lo-rows-or-sweep"])
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("case", RANDOM_CASES.values(), ids=RANDOM_CASES.keys())
def test_fused_override_matches_the_reference_on_fresh_random_inputs(case, transform, pair_diff, monkeypatch):
    """fp32 close to the reference; bf16 and fp16 no worse than twice the reference's own error
    in the same dtype, both against a float64 run. Each student row is in one pair, so the CPU
    bf16 path forms the pairs' KL gradient from the students' difference rows (override columns
    included), or, with CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS=0, the other ways."""
    monkeypatch.setenv("CRYSTAL_EXT_CPU_PAIR_DIFF_ROWS", pair_diff)
    n, hd, vocab, ids = case
    chunk_rows, block = crystal_ext.ops._extension._C.lm_head_losses_tiling(False, n, vocab, hd)
    if len(ids) > 100:
        assert len(set((torch.as_tensor(ids) // block).tolist())) > 1, "ids in several vocabulary blocks"
    if n > 2000:
        assert chunk_rows < 0.75 * n, "rows needing logits (80% targeted) in several row chunks"
    prob = random_problem(n, hd, vocab, ids, dtype=torch.float64, seed=n + vocab)
    names = ("ce", "kl", "d hidden", "d rows")
    gold = losses_and_grads(reference.lm_head_losses, prob, transform=transform)
    got = losses_and_grads(crystal_ext.lm_head_losses, prob, transform=transform)
    for name, a, b in zip(names, got, gold):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        inputs = _cast(prob, dtype)  # the float64 run below sees the same rounded inputs
        gold = losses_and_grads(reference.lm_head_losses, _cast(inputs, torch.float64), transform=transform)
        fused = losses_and_grads(crystal_ext.lm_head_losses, inputs, transform=transform)
        if dtype == torch.float32:
            for name, f, g in zip(names, fused, gold):
                torch.testing.assert_close(f.double(), g, rtol=1e-4, atol=1e-5, msg=name)
            continue
        ref = losses_and_grads(reference.lm_head_losses, inputs, transform=transform)
        for name, f, r, g in zip(names, fused, ref, gold):
            assert _err(f, g) <= 2 * _err(r, g) + 1e-6 * g.abs().max().item(), (dtype, name)


def _direct_forward(prob, ids, rows):
    plan = lm_head_plan(
        prob["targets"], prob["teacher_rows"], prob["student_rows"], prob["pair_sample"], 0.5,
        prob["hidden"].shape[0], prob["weight"].shape[0], "cpu",
    )  # fmt: skip
    return torch.ops.crystal_ext.lm_head_losses_fwd(
        prob["hidden"], prob["weight"], None, list(plan.tensors), plan.paired_rows, ids, rows, 1.0, 0.0, False
    )


OP_BAD = [
    (dict(override_ids=torch.tensor([4, 9, 4])), r"override_ids has duplicates: override_ids\[2\] = 4"),
    (
        dict(override_ids=torch.tensor([4, 9, 23])),
        r"override_ids must be in \[0, 23\) .*override_ids\[2\] = 23",
    ),
    (
        dict(override_ids=torch.tensor([-1, 9, 4])),
        r"override_ids must be in \[0, 23\) .*override_ids\[0\] = -1",
    ),
    (dict(override_ids=torch.tensor([4, 9, 5], dtype=torch.int32)), "override_ids must be a 1-D int64"),
    (
        dict(override_rows=torch.zeros(3, 6, dtype=torch.float32)),
        "override_rows must have the dtype of hidden",
    ),
    (dict(override_rows=torch.zeros(3, 5, dtype=torch.float64)), r"override_rows must be \[3, 6\]"),
    (dict(override_rows=torch.zeros(2, 6, dtype=torch.float64)), r"override_rows must be \[3, 6\]"),
    (dict(override_rows=None), "override_ids and override_rows must be given together"),
]


@fused_only
@pytest.mark.parametrize("change, match", OP_BAD)
def test_the_op_itself_names_bad_override_arguments(change, match):
    """The compiled op checks what it reads (a direct call skips the Python checks)."""
    prob = {**problem(), **change}
    with pytest.raises(ValueError, match=match):
        _direct_forward(prob, prob["override_ids"], prob["override_rows"])

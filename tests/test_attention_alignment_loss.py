"""attention_alignment_loss: fused (C++/CUDA) vs the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from alignment_cases import MIXED_SAMPLES, make_layout, needed_length, random_qk

import crystal_ext
import crystal_ext.ops._extension as _extension
from crystal_ext.ops import reference
from crystal_ext.ops.attention_alignment_loss import AlignmentIndices, AlignmentPlanTensors, alignment_indices
from crystal_ext.ops.layout import validate_layout

fused = crystal_ext.attention_alignment_loss
ref = reference.attention_alignment_loss

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason=f"no extension: {crystal_ext.extension_error()}"
)


def loss_and_grads(fn, q, k, layout, scale=None):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    loss = fn(q, k, layout, scale)
    gq, gk = torch.autograd.grad(loss, (q, k))
    return loss.detach(), gq, gk


def rel_err(x, ref_x):
    """max |x - ref| / max |ref| (so near-zero entries do not dominate)."""
    x, ref_x = x.double().cpu(), ref_x.double().cpu()
    return ((x - ref_x).abs().max() / ref_x.abs().max().clamp_min(1e-30)).item()


SHAPES = [  # heads, kv_heads, head_dim
    (4, 4, 64),
    (8, 2, 128),
    (7, 1, 64),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_fp32_matches_float64_reference(heads, kv_heads, head_dim):
    samples = MIXED_SAMPLES
    length = needed_length(samples) + 3  # padding after F; 61 is no multiple of any tile
    layout = make_layout(samples)
    q, k = random_qk(len(samples), heads, kv_heads, length, head_dim, seed=heads * head_dim)
    loss, gq, gk = loss_and_grads(fused, q, k, layout)
    loss64, gq64, gk64 = loss_and_grads(ref, q.double(), k.double(), layout)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-5)
    assert rel_err(gq, gq64) < 1e-4
    assert rel_err(gk, gk64) < 1e-4
    # The fused op is also the reference's equal in its own dtype.
    loss32, gq32, gk32 = loss_and_grads(ref, q, k, layout)
    assert loss.item() == pytest.approx(loss32.item(), rel=1e-5)
    assert rel_err(gq, gq32) < 1e-4 and rel_err(gk, gk32) < 1e-4


def test_float64_fused_equals_reference_exactly_enough():
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 6, 2, needed_length(MIXED_SAMPLES), 16, dtype=torch.float64, seed=7)
    loss, gq, gk = loss_and_grads(fused, q, k, layout)
    loss_r, gq_r, gk_r = loss_and_grads(ref, q, k, layout)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=0)
    torch.testing.assert_close(gq, gq_r, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gk, gk_r, rtol=1e-10, atol=1e-14)


def test_gradients_reach_only_student_rows_and_their_keys():
    samples = [(2, 5, 3, 4)]
    layout = make_layout(samples)
    (a0, a1), (b0, b1), (c0, c1), (d0, d1), (e0, e1), (f0, f1) = layout[0].tolist()
    q, k = random_qk(1, 4, 2, needed_length(samples) + 2, 8, seed=3)
    _, gq, gk = loss_and_grads(fused, q, k, layout)
    nonzero_q_rows = gq.abs().sum((0, 1, 3)).nonzero().flatten().tolist()
    assert nonzero_q_rows == list(range(f0, f1))  # nothing flows through the teacher rows E
    key_rows = set(gk.abs().sum((0, 1, 3)).nonzero().flatten().tolist())
    assert key_rows <= set(range(a0, a1)) | set(range(b0, b1)) | set(range(d0, d1)) | set(range(f0, f1))
    assert set(range(d0, d1)) <= key_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (7, 1, 128)])
def test_low_precision_no_worse_than_twice_reference(dtype, heads, kv_heads, head_dim):
    samples = MIXED_SAMPLES
    layout = make_layout(samples)
    q, k = random_qk(3, heads, kv_heads, needed_length(samples) + 5, head_dim, seed=11)
    truth = loss_and_grads(ref, q.double(), k.double(), layout)
    lowp_fused = loss_and_grads(fused, q.to(dtype), k.to(dtype), layout)
    lowp_ref = loss_and_grads(ref, q.to(dtype), k.to(dtype), layout)
    assert lowp_fused[1].dtype == dtype and lowp_fused[2].dtype == dtype
    for name, got, base, exact in zip(("loss", "grad_q", "grad_k"), lowp_fused, lowp_ref, truth):
        err_fused, err_ref = rel_err(got, exact), rel_err(base, exact)
        assert err_fused <= 2 * err_ref + 1e-6, (name, err_fused, err_ref)


def _student_only_masks(layout, heads, kv_heads, length, head_dim):
    """Positions whose values reach the student rows only (q of F; k of B and F), where a
    numerical derivative equals the analytical one despite the detached teacher."""
    mq = torch.zeros(layout.shape[0], heads, length, head_dim, dtype=torch.bool)
    mk = torch.zeros(layout.shape[0], kv_heads, length, head_dim, dtype=torch.bool)
    for b, row in enumerate(layout.tolist()):
        (b0, b1), (f0, f1) = row[1], row[5]
        mq[b, :, f0:f1] = True
        mk[b, :, b0:b1] = True
        mk[b, :, f0:f1] = True
    return mq, mk


def test_gradcheck_float64():
    samples = [(1, 3, 2, 2), (0, 2, 1, 1)]
    layout = make_layout(samples)
    heads, kv_heads, length, head_dim = 4, 2, needed_length(samples) + 1, 3
    q0, k0 = random_qk(2, heads, kv_heads, length, head_dim, dtype=torch.float64, seed=5)
    mq, mk = _student_only_masks(layout, heads, kv_heads, length, head_dim)

    def student_side(qv, kv):
        return fused(torch.where(mq, qv, q0), torch.where(mk, kv, k0), layout)

    qv = q0.clone().requires_grad_(True)
    kv = k0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(student_side, (qv, kv), eps=1e-6, atol=1e-8)
    # Keys of A and D reach the teacher too (detached): their analytical gradient is checked
    # against the reference's autograd in test_float64_fused_equals_reference_exactly_enough.


def _indices(layout, q):
    """The op's `plan` argument for this layout."""
    return list(alignment_indices(layout, q.shape[2], q.device).tensors)


def test_opcheck():
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8, seed=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.crystal_ext.attention_alignment_loss_fwd.default, (q, k, _indices(layout, q), 0.3)
    )


def test_opcheck_backward_with_transposed_q():
    """Models hand q as a transposed view ([B, L, H, d] memory): the gradients come back in the
    strides of q and k, in the real kernel and in the fake one."""
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8, seed=6)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    indices = _indices(layout, q)
    _, lse = torch.ops.crystal_ext.attention_alignment_loss_fwd(q, k, indices, 0.3)
    grad = torch.tensor(1.0)
    args = (grad, q, k, indices, lse, 0.3)
    torch.library.opcheck(torch.ops.crystal_ext.attention_alignment_loss_bwd.default, args)
    grad_q, _ = torch.ops.crystal_ext.attention_alignment_loss_bwd(*args)
    assert grad_q.stride() == q.stride()


def test_prebuilt_indices_give_the_layout_result():
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 6, 2, needed_length(MIXED_SAMPLES) + 2, 16, dtype=torch.float64, seed=17)
    indices = alignment_indices(layout, q.shape[2], q.device)
    assert isinstance(indices, AlignmentIndices)
    assert indices.tensors.answer_rows.shape == (2, 3, 5) and indices.tensors.latent_keys.shape == (3, 4)
    for a, b in zip(loss_and_grads(fused, q, k, indices), loss_and_grads(fused, q, k, layout)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_indices_for_another_length_are_refused():
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8)
    indices = alignment_indices(layout, q.shape[2] + 1, q.device)
    with pytest.raises(ValueError, match="layout .AlignmentIndices. was built for length"):
        fused(q, k, indices)


@pytest.mark.parametrize("name", ["answer_rows", "intact_keys", "corrupted_keys", "latent_keys"])
def test_op_refuses_index_tensors_that_do_not_fit_the_layout(name):
    """Index tensors from another layout: a clear error naming them, not a read past their end."""
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8)
    indices = alignment_indices(layout, q.shape[2], q.device).tensors._asdict()
    indices[name] = indices[name][..., :-1]
    with pytest.raises(ValueError, match=f"{name} has width"):
        torch.ops.crystal_ext.attention_alignment_loss_fwd(q, k, list(indices.values()), 0.3)
    indices[name] = indices[name].int()
    with pytest.raises(ValueError, match=f"{name} must be int64"):
        torch.ops.crystal_ext.attention_alignment_loss_fwd(q, k, list(indices.values()), 0.3)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_op_refuses_a_plan_with_a_missing_or_extra_tensor(change):
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8)
    plan = _indices(layout, q)
    plan = plan[:-1] if change == "missing" else plan + [plan[-1]]
    with pytest.raises(
        ValueError, match=r"attention_alignment_loss: plan must hold 5 tensors \(layout, answer_rows"
    ):
        torch.ops.crystal_ext.attention_alignment_loss_fwd(q, k, plan, 0.3)


def test_python_and_kernel_plans_name_the_same_tensors_in_the_same_order():
    assert _extension.plan_mismatch("attention_alignment_loss", AlignmentPlanTensors._fields) is None
    swapped = ("layout", "intact_keys", "answer_rows", "corrupted_keys", "latent_keys")
    error = _extension.plan_mismatch("attention_alignment_loss", swapped)
    assert "unpack the attention_alignment_loss plan as ['layout', 'answer_rows'" in error
    assert "Python plan holds ['layout', 'intact_keys'" in error


def test_long_rows():
    samples = [(40, 150, 40, 60), (3, 11, 2, 5)]
    layout = make_layout(samples)
    q, k = random_qk(2, 8, 2, needed_length(samples) + 7, 64, dtype=torch.float64, seed=31)
    got = loss_and_grads(fused, q, k, layout)
    want = loss_and_grads(ref, q, k, layout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_torch_compile_traces_the_op():
    """With its indices built beforehand the op is one graph (a plain layout needs a host read of
    its values, which is a graph break)."""
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8, seed=4)
    indices = alignment_indices(layout, q.shape[2], q.device)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    expected = loss_and_grads(fused, q, k, layout)
    got = loss_and_grads(compiled, q, k, indices)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_default_scale_and_explicit_scale():
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 16, seed=8)
    assert fused(q, k, layout).item() == pytest.approx(fused(q, k, layout, 0.25).item(), rel=1e-6)
    assert fused(q, k, layout, 0.1).item() == pytest.approx(ref(q, k, layout, 0.1).item(), rel=1e-5)


# ---------------------------------------------------------------- bad input


def _bad_layouts():
    good = make_layout([(2, 3, 2, 2)]).tolist()[0]

    def edit(fn):
        row = [list(s) for s in good]
        fn(row)
        return torch.tensor([row], dtype=torch.long)

    return {
        "segment A must start at 0": edit(lambda r: r[0].__setitem__(0, 1)),
        "contiguous": edit(lambda r: r[3].__setitem__(0, r[3][0] + 1)),
        "|B| must equal |C|": edit(lambda r: (r[1].__setitem__(1, 6), r[2].__setitem__(0, 6))),
        "segment D (latent block) is empty": edit(
            lambda r: (r[3].__setitem__(1, r[3][0]), r[4].__setitem__(0, r[3][0]))
        ),
        "segment E (answer) is empty": edit(
            lambda r: (r[4].__setitem__(1, r[4][0]), r[5].__setitem__(0, r[4][0]))
        ),
        "|E| must equal |F|": edit(lambda r: r[5].__setitem__(1, r[5][1] + 1)),
        "beyond the sequence length": edit(
            lambda r: (r[4].__setitem__(1, 40), r[5].__setitem__(0, 40), r[5].__setitem__(1, 78))
        ),
        "has start": edit(lambda r: r[2].__setitem__(1, 3)),
    }


@pytest.mark.parametrize("fn", [fused, ref], ids=["fused", "reference"])
@pytest.mark.parametrize("message", list(_bad_layouts()))
def test_bad_layout_values(fn, message):
    layout = _bad_layouts()[message]
    q, k = random_qk(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="layout") as info:
        fn(q, k, layout)
    assert message in str(info.value)


def _bad_calls():
    layout = make_layout([(2, 3, 2, 2)])
    q, k = random_qk(1, 4, 2, 16, 8)
    return {
        "q must be 4-D": (q[0], k, layout),
        "k must be 4-D": (q, k[0], layout),
        "must be a positive multiple of the kv_heads": (q, random_qk(1, 4, 3, 16, 8)[1], layout),
        "k must have the dtype of q": (q, k.double(), layout),
        "q must be float32": (q.int(), k.int(), layout),
        "layout must be int64": (q, k, layout.int()),
        "layout must have shape": (q, k, layout[:, :5]),
        "k has length": (q, k[:, :, :15], layout),
        "k has head_dim": (q, k[..., :7], layout),
        "k has batch": (q, torch.cat([k, k]), layout),
    }


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_bad_arguments_name_the_argument(message):
    args = _bad_calls()[message]
    with pytest.raises((ValueError, RuntimeError)) as info:
        fused(*args)
    assert message in str(info.value)


def test_bad_scale():
    layout = make_layout([(2, 3, 2, 2)])
    q, k = random_qk(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        fused(q, k, layout, -1.0)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        fused(q, k, layout, float("nan"))


def test_layout_on_another_device_is_refused():
    layout = make_layout([(2, 3, 2, 2)])
    q, k = random_qk(1, 4, 2, 16, 8)
    with pytest.raises(RuntimeError, match="layout must be on the CPU or on the device of q"):
        fused(q, k, layout.to("meta"))


def test_fuzz_malformed_layouts_never_crash():
    """Random [B, 6, 2] layouts: valid ones give the reference's value, every invalid one a
    ValueError naming the layout (the process survives all of them)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    length, heads, kv_heads, head_dim = 24, 2, 1, 4
    q, k = random_qk(2, heads, kv_heads, length, head_dim, dtype=torch.float64, seed=9)

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(
        values=st.lists(st.integers(-3, length + 3), min_size=24, max_size=24),
        plausible=st.booleans(),
    )
    def check(values, plausible):
        if plausible:  # make most layouts contiguous so the deeper rules get exercised
            sizes = [abs(v) % 6 for v in values[:6]]
            sizes[2] = sizes[1] if values[6] % 3 else sizes[2]
            sizes[5] = sizes[4] if values[7] % 3 else sizes[5]
            starts = [0]
            for s in sizes[:-1]:
                starts.append(starts[-1] + s)
            one = [[st_, st_ + sz] for st_, sz in zip(starts, sizes)]
            layout = torch.tensor([one, one], dtype=torch.long)
        else:
            layout = torch.tensor(values, dtype=torch.long).view(2, 6, 2)
        try:
            validate_layout(layout, 2, length)
            valid = True
        except ValueError:
            valid = False
        if valid:
            got = fused(q, k, layout)
            assert torch.isfinite(got)
            torch.testing.assert_close(got, ref(q, k, layout), rtol=1e-10, atol=1e-12)
        else:
            with pytest.raises(ValueError, match="layout"):
                fused(q, k, layout)

    check()


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_cuda_fp32_matches_float64_reference(heads, kv_heads, head_dim, cuda):
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, heads, kv_heads, needed_length(MIXED_SAMPLES) + 3, head_dim, seed=21)
    loss, gq, gk = loss_and_grads(fused, q.cuda(), k.cuda(), layout.cuda())
    loss64, gq64, gk64 = loss_and_grads(ref, q.double(), k.double(), layout)
    assert loss.is_cuda and gq.is_cuda
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-5)
    assert rel_err(gq, gq64) < 1e-4
    assert rel_err(gk, gk64) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype, cuda):
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 8, 2, needed_length(MIXED_SAMPLES) + 5, 128, seed=12)
    truth = loss_and_grads(ref, q.double(), k.double(), layout)
    got = loss_and_grads(fused, q.cuda().to(dtype), k.cuda().to(dtype), layout)
    base = loss_and_grads(ref, q.cuda().to(dtype), k.cuda().to(dtype), layout.cuda())
    for a, b, t in zip(got, base, truth):
        assert rel_err(a, t) <= 2 * rel_err(b, t) + 1e-6


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_float64(cuda):
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 7, 1, needed_length(MIXED_SAMPLES) + 2, 64, dtype=torch.float64, seed=13)
    cpu = loss_and_grads(fused, q, k, layout)
    gpu = loss_and_grads(fused, q.cuda(), k.cuda(), layout)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
def test_cuda_long_rows_use_every_lane(cuda):
    """More than 32 keys and latents per row, so each lane of a warp handles several."""
    samples = [(40, 150, 40, 60), (3, 11, 2, 5)]
    layout = make_layout(samples)
    q, k = random_qk(2, 8, 2, needed_length(samples) + 7, 64, dtype=torch.float64, seed=31)
    cpu = loss_and_grads(fused, q, k, layout)
    gpu = loss_and_grads(fused, q.cuda(), k.cuda(), layout.cuda())
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    first = loss_and_grads(fused, q.cuda().float(), k.cuda().float(), layout)
    again = loss_and_grads(fused, q.cuda().float(), k.cuda().float(), layout)
    for a, b in zip(first, again):  # deterministic: bitwise equal
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_gradcheck_float64(cuda):
    samples = [(1, 3, 2, 2), (0, 2, 1, 1)]
    layout = make_layout(samples).cuda()
    heads, kv_heads, length, head_dim = 4, 2, needed_length(samples) + 1, 3
    q0, k0 = random_qk(2, heads, kv_heads, length, head_dim, dtype=torch.float64, device="cuda")
    mq, mk = (m.cuda() for m in _student_only_masks(layout.cpu(), heads, kv_heads, length, head_dim))

    def student_side(qv, kv):
        return fused(torch.where(mq, qv, q0), torch.where(mk, kv, k0), layout)

    assert torch.autograd.gradcheck(
        student_side, (q0.clone().requires_grad_(), k0.clone().requires_grad_()), eps=1e-6, atol=1e-8
    )


@pytest.mark.cuda
def test_cuda_opcheck(cuda):
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 4, 2, needed_length(MIXED_SAMPLES), 8, device="cuda")
    q.requires_grad_(True)
    k.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.crystal_ext.attention_alignment_loss_fwd.default, (q, k, _indices(layout, q), 0.3)
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_backward_without_host_synchronisation(cuda, dtype):
    """With the indices built once per layout, neither direction waits for the GPU (no .item(),
    no device-to-host or pageable copy, no synchronize), on a transposed q as models pass it."""
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(3, 8, 2, needed_length(MIXED_SAMPLES) + 3, 64, dtype=dtype, device="cuda", seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    k = k.requires_grad_(True)
    indices = alignment_indices(layout, q.shape[2], q.device)
    expected = torch.autograd.grad(fused(q, k, indices), (q, k))  # warm-up: lazy init may sync
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_q, grad_k = torch.autograd.grad(fused(q, k, indices), (q, k))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert grad_q.stride() == q.stride()
    assert torch.equal(grad_q, expected[0]) and torch.equal(grad_k, expected[1])


@pytest.mark.cuda
def test_cuda_tf32_flag_does_not_change_the_result(cuda, monkeypatch):
    """The op pins its fp32 GEMMs: the same result with the global TF32 flag on and off."""
    layout = make_layout(MIXED_SAMPLES)
    q, k = random_qk(len(MIXED_SAMPLES), 4, 2, needed_length(MIXED_SAMPLES), 64, seed=3)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    off = loss_and_grads(fused, q.cuda(), k.cuda(), layout.cuda())
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    on = loss_and_grads(fused, q.cuda(), k.cuda(), layout.cuda())
    for a, b in zip(on, off):
        assert torch.equal(a, b)

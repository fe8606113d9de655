"""dual_path_attention (SDPA on gathered paths) against the dense-mask reference."""

from __future__ import annotations

import random

import pytest
import torch
from dual_path_helpers import random_layout

import crystal_ext
from crystal_ext.model.dual_path_attention import dual_path_attention
from crystal_ext.ops import reference
from crystal_ext.ops.layout import dual_path_mask


def _inputs(layout, length, heads, kv_heads, dim, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    batch = layout.shape[0]
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_matches_dense_reference_fp32(seed, heads, kv_heads):
    rng = random.Random(seed)
    layout, length = random_layout(rng.randint(1, 4), rng)
    q, k, v = _inputs(layout, length, heads, kv_heads, 8, seed=seed)
    scale = None if seed % 2 else 0.37
    out = dual_path_attention(q, k, v, layout, scale)
    ref = reference.dual_path_attention(q, k, v, layout, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_gradients_match_reference_fp32(seed):
    rng = random.Random(100 + seed)
    layout, length = random_layout(3, rng)
    q, k, v = _inputs(layout, length, 4, 2, 8, seed=seed, grad=True)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((dual_path_attention(q, k, v, layout) * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((reference.dual_path_attention(q, k, v, layout) * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    layout, length = random_layout(2, random.Random(7), max_seg=3, pad=2)
    q, k, v = _inputs(layout, length, 2, 1, 4, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: dual_path_attention(q, k, v, layout), (q, k, v))


def test_padding_rows_are_zero_and_masked_keys_do_not_leak():
    layout, length = random_layout(3, random.Random(3), pad=4)
    q, k, v = _inputs(layout, length, 2, 2, 4)
    out = dual_path_attention(q, k, v, layout)
    mask = dual_path_mask(layout, length)  # [B, L, L]
    for b in range(layout.shape[0]):
        end = int(layout[b, 5, 1])
        assert out[b, :, end:].abs().sum().item() == 0
    # Perturbing the values of keys a row cannot see leaves that row unchanged.
    v2 = v.clone()
    v2[0, :, int(layout[0, 1, 0]) : int(layout[0, 1, 1])] += 100.0  # segment B of sample 0
    out2 = dual_path_attention(q, k, v2, layout)
    path1_rows = ~mask[0][:, int(layout[0, 1, 0]) : int(layout[0, 1, 1])].any(-1)
    torch.testing.assert_close(out2[0, :, path1_rows], out[0, :, path1_rows])


def test_exported_from_package():
    assert crystal_ext.dual_path_attention is dual_path_attention


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v, lay: (q[0], k, v, lay), "q must be a 4-D"),
        (lambda q, k, v, lay: (q, k[..., :3], v, lay), "k .* does not match q"),
        (lambda q, k, v, lay: (q, k, v[:, :, :-1], lay), "v .* does not match k"),
        (lambda q, k, v, lay: (q, k.double(), v, lay), "k must have the dtype of q"),
        (lambda q, k, v, lay: (q[:, :3], k, v, lay), "multiple of the kv_heads"),
        (lambda q, k, v, lay: (q, k, v, lay.int()), "layout must be int64"),
        (lambda q, k, v, lay: (q, k, v, lay[:, :5]), "layout must have shape"),
        (lambda q, k, v, lay: (q, k, v, lay + 1), "segment A must start at 0"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, match):
    layout = torch.tensor([[[0, 2], [2, 4], [4, 6], [6, 7], [7, 9], [9, 11]]])
    q, k, v = _inputs(layout, 12, 4, 2, 4)
    with pytest.raises(ValueError, match=match):
        dual_path_attention(*mutate(q, k, v, layout))


def test_unequal_answer_copy_is_rejected():
    layout = torch.tensor([[[0, 2], [2, 4], [4, 6], [6, 7], [7, 9], [9, 10]]])
    q, k, v = _inputs(layout, 12, 2, 2, 4)
    with pytest.raises(ValueError, match=r"\|E\| must equal \|F\|"):
        dual_path_attention(q, k, v, layout)

"""Dual-path attention with a sliding window and bidirectional image blocks (Gemma 3's layers)
against the dense rule written out per sample (tests/dual_path_helpers.dense_visibility): the
window counts path positions, each image's block is bidirectional inside its own path only."""

from __future__ import annotations

import random

import pytest
import torch
from dual_path_helpers import dense_visibility, random_layout

from crystal_ext.model import dual_path_attention as dual_path_attention_module
from crystal_ext.model.dual_path_attention import dual_path_attention
from crystal_ext.ops.layout import segments_of


def _case(seed: int, batch: int = 3, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    """q, k, v (float64), layout, length, position ids (path 1 numbered 0, 1, ...; B takes C's, F
    takes E's, as the packer numbers them) and image-token flags (the same pattern on B and C, as
    B and C hold the same tokens), with runs of image tokens of random lengths."""
    rng = random.Random(seed)
    layout, length = random_layout(batch, rng, max_seg=7)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    positions = torch.zeros(batch, length, dtype=torch.long)
    image = torch.zeros(batch, length, dtype=torch.bool)
    for b, seg in enumerate(segments_of(layout)):
        positions[b, seg.path1()] = torch.arange(len(seg.path1()))
        positions[b, seg.b[0] : seg.b[1]] = positions[b, seg.c[0] : seg.c[1]]
        positions[b, seg.f[0] : seg.f[1]] = positions[b, seg.e[0] : seg.e[1]]
        pattern = torch.tensor([rng.random() < 0.6 for _ in range(seg.size("c"))], dtype=torch.bool)
        image[b, seg.b[0] : seg.b[1]] = pattern
        image[b, seg.c[0] : seg.c[1]] = pattern
    return q, k, v, layout, length, positions, image


def _dense(q, k, v, visible, scale):
    kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    scores = (q @ kk.transpose(-1, -2) * scale).masked_fill(~visible[:, None], float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ vv  # rows that see nothing (padding): zeros


def _real_rows(layout, length):
    rows = torch.zeros(layout.shape[0], length, dtype=torch.bool)
    for b, seg in enumerate(segments_of(layout)):
        rows[b, : seg.f[1]] = True
    return rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 1, 2, 3, 5])
@pytest.mark.parametrize("blocks", [False, True])
def test_equals_the_dense_rule_with_windows_on_positions_and_image_blocks(seed, window, blocks):
    q, k, v, layout, length, positions, image = _case(seed)
    image_tokens = image if blocks else None
    scale = 0.3
    got = dual_path_attention(q, k, v, layout, scale, window=window, image_tokens=image_tokens)
    want = _dense(q, k, v, dense_visibility(layout, length, positions, window, image_tokens), scale)
    rows = _real_rows(layout, length)
    assert torch.allclose(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=1e-12, rtol=0)
    assert (got.transpose(1, 2)[~rows] == 0).all()


def _packed_window_visibility(layout, length, window, image):
    """The wrong rule: the window counted on packed indices instead of positions."""
    packed = torch.arange(length).expand(layout.shape[0], -1)
    return dense_visibility(layout, length, packed, window, image)


def test_the_comparison_tells_a_window_on_packed_indices_and_causal_path2_blocks_apart():
    """The dense rule above is not met by the two wrong rules: the window counted on packed indices
    (path 2's F rows are far from A and D in packed order), and B's image blocks left causal."""
    q, k, v, layout, length, positions, image = _case(0, batch=4)
    rows = _real_rows(layout, length)
    got = dual_path_attention(q, k, v, layout, 0.3, window=3, image_tokens=image).transpose(1, 2)[rows]
    packed = _dense(q, k, v, _packed_window_visibility(layout, length, 3, image), 0.3).transpose(1, 2)[rows]
    assert (got - packed).abs().max() > 1e-3
    path2_causal = image.clone()
    for b, seg in enumerate(segments_of(layout)):
        path2_causal[b, seg.b[0] : seg.b[1]] = False
    causal = _dense(q, k, v, dense_visibility(layout, length, positions, 3, path2_causal), 0.3)
    assert (got - causal.transpose(1, 2)[rows]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 2])
def test_no_image_block_crosses_the_paths(window):
    """Path-1 rows (A, C, D, E) do not depend on B's keys and values, nor path-2 rows (B, F) on C's
    or E's, with image blocks on both B and C."""
    q, k, v, layout, length, positions, image = _case(3, batch=4)
    base = dual_path_attention(q, k, v, layout, 0.3, window=window, image_tokens=image)
    for hide, keep in (("b", ("a", "c", "d", "e")), ("c", ("b", "f")), ("e", ("b", "f"))):
        k2, v2 = k.clone(), v.clone()
        for b, seg in enumerate(segments_of(layout)):
            s, e = getattr(seg, hide)
            k2[b, :, s:e] += 5.0
            v2[b, :, s:e] -= 3.0
        out = dual_path_attention(q, k2, v2, layout, 0.3, window=window, image_tokens=image)
        for b, seg in enumerate(segments_of(layout)):
            for name in keep:
                s, e = getattr(seg, name)
                assert torch.equal(out[b, :, s:e], base[b, :, s:e]), (hide, name)
    # ... while a path-2 image row does see the later tokens of its own block.
    assert image.any()


def test_gradcheck_with_window_and_image_blocks():
    q, k, v, layout, length, _, image = _case(1, batch=2, heads=2, kv_heads=1, dim=4)
    args = [t.detach().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: dual_path_attention(q, k, v, layout, 0.5, window=2, image_tokens=image), args
    )


def test_bad_window_and_image_tokens_are_named():
    q, k, v, layout, length, _, image = _case(2, batch=2)
    with pytest.raises(ValueError, match="window must be a positive int"):
        dual_path_attention(q, k, v, layout, window=0)
    with pytest.raises(ValueError, match="image_tokens must be"):
        dual_path_attention(q, k, v, layout, image_tokens=image[:, :-1])


def _one_int64_buffer(host, device):
    """copy_to_device's way to a GPU (crystal_ext.ops.layout), on the CPU: every tensor through one
    int64 buffer, so a bool tensor comes back as integers."""
    flat = torch.cat([t.reshape(-1) for t in host])
    return tuple(part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in host]), host))


def test_the_image_blocks_survive_the_plans_copy_to_a_gpu(monkeypatch):
    """To a GPU the plan's index tensors travel as one int64 buffer; the real-slot flags its image
    blocks are found from must still work as flags there."""
    q, k, v, layout, length, _, image = _case(5)
    want = dual_path_attention(q, k, v, layout, 0.3, window=3, image_tokens=image)
    monkeypatch.setattr(dual_path_attention_module, "copy_to_device", _one_int64_buffer)
    got = dual_path_attention(q, k, v, layout, 0.3, window=3, image_tokens=image)
    assert torch.equal(got, want)

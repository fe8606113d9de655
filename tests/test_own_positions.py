"""Models that number their positions themselves (3-row M-RoPE through their own get_rope_index):
path 1 [A, C, D, E] of a packed sample is numbered exactly as the stock model numbers that
sequence on its own (the processor's text types, the model's own function), B repeats C's ids
and F repeats E's. On a tiny GLM-4V with its real processor class, and the Qwen-VL families."""

from __future__ import annotations

import functools

import pytest
import torch
from family_models import build
from test_families import _examples

from crystal_ext.data.packing import DualPathPacker


@functools.cache
def _packer(family):
    model, processor, latent = build(family)
    return model, processor, DualPathPacker(processor, latent, model, system="you are a helpful assistant")


def _stock_positions(model, processor, packer, example, path1_ids):
    """The stock model's own numbering of the single-path sequence: its get_rope_index on the
    processor's input ids and text types for the prompt (A and C), followed by the D and E text."""
    images = packer.images.intact(example)
    processed = processor(
        text=[packer.chat.prompt(example)], images=[images], return_tensors="pt", add_special_tokens=False
    )
    prompt_ids = processed["input_ids"][0]
    assert torch.equal(path1_ids[: prompt_ids.numel()], prompt_ids)
    types = torch.zeros_like(path1_ids)
    types[: prompt_ids.numel()] = processed["mm_token_type_ids"][0]
    positions, _ = model.model.get_rope_index(
        path1_ids[None], mm_token_type_ids=types[None], image_grid_thw=processed["image_grid_thw"]
    )
    return positions[:, 0]


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl", "qwen3_vl"])
def test_path1_positions_are_the_stock_models_own_and_b_f_copy_c_e(family):
    model, processor, packer = _packer(family)
    plain_count = []
    for example in _examples():
        packed = packer.pack(example)
        (_, a1), (b0, b1), (c0, c1), _, (e0, e1), (f0, f1) = packed["layout"].tolist()
        path1 = torch.cat([torch.arange(0, a1), torch.arange(c0, e1)])
        want = _stock_positions(model, processor, packer, example, packed["input_ids"][path1])
        got = packed["position_ids"]
        assert got.shape[0] == 3 and torch.equal(got[:, path1], want), example.key
        assert torch.equal(got[:, b0:b1], got[:, c0:c1]) and torch.equal(got[:, f0:f1], got[:, e0:e1])
        plain_count.append(torch.equal(want, torch.arange(path1.numel()).expand(3, -1)))
    # Images of more than one token are numbered by rows and columns: one-row 0, 1, 2, ... is not
    # the model's numbering (a one-token image's is).
    assert not all(plain_count)

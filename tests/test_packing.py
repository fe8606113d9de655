"""Packing: tokens, targets and position ids of every segment; collator padding; bad data."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from dual_path_helpers import WORDS, tiny_qwen25vl, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crystal_ext.data.corruption import CorruptionConfig
from crystal_ext.data.packing import (
    IGNORE,
    DualPathCollator,
    DualPathPacker,
    Example,
    model_rope_index,
    qwen_pixel_values,
)
from crystal_ext.model.latent_tokens import add_latent_tokens

SYSTEM = "you are a helpful assistant"


@functools.cache
def _setup():
    tok = tiny_tokenizer()
    lat = add_latent_tokens(tok, None, k=4)
    model = tiny_qwen25vl(tok)
    return tok, lat, model


def _packer(image_size=56, max_length=4096):
    tok, lat, model = _setup()
    return DualPathPacker(
        tok,
        lat,
        model_rope_index(model),
        CorruptionConfig(),
        seed=0,
        image_size=image_size,
        max_length=max_length,
        system=SYSTEM,
    )


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


words = st.lists(st.sampled_from(WORDS[3:]), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    question=words,
    answer=words,
    w=st.integers(8, 120),
    h=st.integers(8, 120),
    side=st.sampled_from([28, 56, 84]),
)
def test_segments_targets_and_positions(question, answer, w, h, side):
    tok, lat, model = _setup()
    ids = lambda s: tok(s, add_special_tokens=False).input_ids
    one = lambda s: tok.convert_tokens_to_ids(s)
    image = _image(w, h)
    p = _packer(side).pack(Example("ex", image, question, answer))
    (a0, a1), (b0, b1), (c0, c1), (d0, d1), (e0, e1), (f0, f1) = p["layout"].tolist()
    x = p["input_ids"].tolist()
    n_img = (side // 28) ** 2
    # Tokens of each segment.
    assert a0 == 0 and x[a0:a1] == ids(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    prompt = (
        [one("<|vision_start|>")]
        + [one("<|image_pad|>")] * n_img
        + [one("<|vision_end|>")]
        + ids(question)
        + ids("<|im_end|>\n<|im_start|>assistant\n")
    )
    assert x[b0:b1] == prompt and x[c0:c1] == prompt
    assert x[d0:d1] == [lat.think_open, *lat.latent_ids, lat.think_close]
    answer_ids = [lat.answer_open] + ids(answer) + [lat.answer_close, one("<|im_end|>")]
    assert x[e0:e1] == answer_ids and x[f0:f1] == answer_ids and f1 == len(x)
    # Targets: row-aligned next tokens of D and E along path 1, F[1:] along path 2.
    want = [IGNORE] * len(x)
    nxt = x[d0:e1]
    for i, r in enumerate(range(c1 - 1, e1 - 1)):
        want[r] = nxt[i]
    for r in range(f0, f1 - 1):
        want[r] = x[r + 1]
    assert p["targets"].tolist() == want
    # Position ids: path 1 is the model's own numbering of [A, C, D, E]; B = C, F = E.
    path1 = list(range(a0, a1)) + list(range(c0, e1))
    seq = torch.tensor([x[i] for i in path1])[None]
    stock, _ = model.model.get_rope_index(
        seq,
        mm_token_type_ids=(seq == one("<|image_pad|>")).long(),
        image_grid_thw=torch.tensor([[1, side // 14, side // 14]]),
    )
    pos = p["position_ids"]
    assert torch.equal(pos[:, path1], stock[:, 0])
    assert torch.equal(pos[:, b0:b1], pos[:, c0:c1]) and torch.equal(pos[:, f0:f1], pos[:, e0:e1])
    # Text after the image continues from the image's largest id; D and E follow C in order.
    assert (
        pos[:, c1 - 1].max() + 1 == pos[0, d0]
        and (pos[:, d0:e1] == torch.arange(pos[0, d0], pos[0, d0] + e1 - d0)).all()
    )
    assert (pos[:, :a1] == torch.arange(a1)).all()
    # Pixels: the corrupted image then the intact one, same grid.
    assert p["image_grid_thw"].tolist() == [[1, side // 14, side // 14]] * 2
    intact, _ = qwen_pixel_values(image.convert("RGB").resize((side, side), Image.BICUBIC))
    n = intact.shape[0]
    assert torch.equal(p["pixel_values"][n:], intact) and not torch.equal(p["pixel_values"][:n], intact)
    assert p["image_is_intact"].tolist() == [False, True]


def test_pixel_values_match_qwen_image_processor():
    from transformers import Qwen2VLImageProcessor

    image = _image(84, 56, seed=3)
    proc = Qwen2VLImageProcessor()
    ref = proc(images=[image], do_resize=False, return_tensors="pt")
    ours, grid = qwen_pixel_values(image)
    assert ref["image_grid_thw"].tolist() == [grid.tolist()]
    torch.testing.assert_close(ours, ref["pixel_values"].float(), rtol=0, atol=1e-5)


def test_collator_pads_examples_of_different_lengths():
    tok, _, _ = _setup()
    coll = DualPathCollator(_packer(), tok.pad_token_id)
    exs = [
        Example("a", _image(40, 30), "what is the shape", "circle"),
        Example("b", _image(50, 70, 1), "how many", "two red square blue triangle green circle"),
    ]
    batch = coll(exs)
    singles = [_packer().pack(e) for e in exs]
    length = max(s["input_ids"].numel() for s in singles)
    assert batch["input_ids"].shape == (2, length) and batch["position_ids"].shape == (3, 2, length)
    for i, s in enumerate(singles):
        n = s["input_ids"].numel()
        assert torch.equal(batch["input_ids"][i, :n], s["input_ids"])
        assert torch.equal(batch["position_ids"][:, i, :n], s["position_ids"])
        assert (batch["targets"][i, n:] == IGNORE).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert torch.equal(batch["layout"][i], s["layout"])
    assert batch["pixel_values"].shape[0] == 4 * 16 and batch["image_is_intact"].tolist() == [False, True] * 2
    assert batch["skipped"] == 0


def test_bad_examples_are_skipped_with_a_warning_naming_them(tmp_path):
    tok, _, _ = _setup()
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not a png at all")
    coll = DualPathCollator(_packer(max_length=120), tok.pad_token_id)
    exs = [
        Example("good-1", _image(30, 30), "what colour", "red"),
        Example("no-image", None, "what colour", "red"),
        Example("missing-file", str(tmp_path / "nope.png"), "what colour", "red"),
        Example("broken-file", str(garbage), "what colour", "red"),
        Example("no-answer", _image(30, 30), "what colour", None),
        Example("too-long", _image(30, 30), "what colour", " ".join(["red"] * 200)),
        Example("good-2", _image(30, 30), "what shape", "square"),
    ]
    with pytest.warns(UserWarning) as record:
        batch = coll(exs)
    messages = " | ".join(str(w.message) for w in record)
    for key in ("no-image", "missing-file", "broken-file", "no-answer", "too-long"):
        assert f"'{key}'" in messages
    assert "good" not in messages
    assert batch["keys"] == ["good-1", "good-2"] and batch["skipped"] == 5 and coll.skipped == 5
    with pytest.warns(UserWarning):
        assert coll([exs[1]]) is None
    assert coll.skipped == 6


def test_image_size_must_fit_the_patch_grid():
    tok, lat, model = _setup()
    with pytest.raises(ValueError, match="multiple of 28"):
        DualPathPacker(tok, lat, model_rope_index(model), image_size=50)

"""Packing: tokens, targets and position ids of every segment; collator padding; bad data."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from family_models import WORDS, build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crystal_ext.data.corruption import CorruptionConfig
from crystal_ext.data.packing import IGNORE, DualPathCollator, DualPathPacker, Example

SYSTEM = "you are a helpful assistant"


@functools.cache
def _setup(family="qwen2_5_vl"):
    model, processor, lat = build(family, side=84)
    return processor, lat, model


def _packer(image_size=56, max_length=4096, family="qwen2_5_vl"):
    processor, lat, model = _setup(family)
    return DualPathPacker(
        processor,
        lat,
        model,
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
    processor, lat, model = _setup()
    tok = processor.tokenizer
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
    # Pixels: the corrupted image then the intact one, from the model's own processor.
    corrupted_inputs, intact_inputs = p["image_groups"]
    want = processor.image_processor(images=[image.convert("RGB").resize((side, side), Image.BICUBIC)])
    assert intact_inputs["image_grid_thw"].tolist() == [[1, side // 14, side // 14]]
    assert corrupted_inputs["image_grid_thw"].tolist() == [[1, side // 14, side // 14]]
    assert torch.equal(intact_inputs["pixel_values"], torch.as_tensor(want["pixel_values"]))
    assert not torch.equal(corrupted_inputs["pixel_values"], intact_inputs["pixel_values"])


def test_one_example_by_hand_qwen():
    """F's targets and B's position ids of one small example, written out by hand: a 56 x 56
    image is 4 x 4 patches, 2 x 2 image tokens after the 2 x 2 merge."""
    processor, lat, _ = _setup()
    p = _packer(56).pack(Example("hand", _image(56, 56), "what colour", "red"))
    one = processor.tokenizer.convert_tokens_to_ids
    assert p["layout"].tolist() == [[0, 10], [10, 21], [21, 32], [32, 38], [38, 42], [42, 46]]
    f = [lat.answer_open, one("red"), lat.answer_close, one("<|im_end|>")]
    assert p["input_ids"][42:46].tolist() == f
    assert p["targets"][42:46].tolist() == [one("red"), lat.answer_close, one("<|im_end|>"), IGNORE]
    # B: <|vision_start|> at 10, 4 image tokens (t, h, w from 11), <|vision_end|> at 13, then the text.
    assert p["position_ids"][:, 10:21].tolist() == [
        [10, 11, 11, 11, 11, 13, 14, 15, 16, 17, 18],
        [10, 11, 11, 12, 12, 13, 14, 15, 16, 17, 18],
        [10, 11, 12, 11, 12, 13, 14, 15, 16, 17, 18],
    ]
    assert p["position_ids"][:, 42:46].tolist() == [[25, 26, 27, 28]] * 3


def test_one_example_by_hand_generic():
    """The same for Idefics3 (1-D positions): B = <fake_token_around_image> <global-img>, 4 image
    tokens, <fake_token_around_image>, the question, the end of the turn and "Assistant:"."""
    processor, lat, _ = _setup("idefics3")
    p = _packer(None, family="idefics3").pack(Example("hand", _image(32, 32), "what colour", "red"))
    one = processor.tokenizer.convert_tokens_to_ids
    assert p["layout"].tolist() == [[0, 11], [11, 23], [23, 35], [35, 41], [41, 45], [45, 49]]
    assert p["input_ids"][11:23].tolist() == [
        one("<fake_token_around_image>"),
        one("<global-img>"),
        *[one("<image>")] * 4,
        one("<fake_token_around_image>"),
        one("what"),
        one("colour"),
        one("<end_of_utterance>"),
        one("Assistant"),
        one(":"),
    ]
    assert p["targets"][45:49].tolist() == [one("red"), lat.answer_close, one("<end_of_utterance>"), IGNORE]
    assert p["position_ids"][0, 11:23].tolist() == list(range(11, 23))
    assert p["position_ids"][0, 45:49].tolist() == [29, 30, 31, 32]


def test_multi_turn_multi_image_keeps_every_turn_and_corrupts_every_image():
    processor, lat, _ = _setup()
    ex = Example(
        "mt",
        [_image(56, 56, 1), _image(56, 56, 2)],
        "and this",
        "blue",
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many"}]},
        ],
    )
    p = _packer(56).pack(ex)
    (_, a1), (b0, b1), (c0, c1), *_ = p["layout"].tolist()
    text = processor.tokenizer.decode(p["input_ids"][c0:c1])
    assert text.count("<|vision_start|>") == 2 and "red" in text and "how many" in text
    corrupted, intact = p["image_groups"]
    assert intact["image_grid_thw"].shape[0] == 2 and corrupted["image_grid_thw"].shape[0] == 2
    half = intact["pixel_values"].shape[0] // 2
    for part in (slice(0, half), slice(half, None)):  # each image corrupted
        assert not torch.equal(corrupted["pixel_values"][part], intact["pixel_values"][part])


def test_collator_pads_examples_of_different_lengths():
    tok = _setup()[0].tokenizer
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
    assert batch["images"]["pixel_values"].shape[0] == 4 * 16 and batch["images"]["image_grid_thw"].shape == (
        4,
        3,
    )
    assert batch["intact_images"]["pixel_values"].shape[0] == 2 * 16
    assert batch["skipped"] == 0


def test_bad_examples_are_skipped_with_a_warning_naming_them(tmp_path):
    tok = _setup()[0].tokenizer
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
    import warnings

    with warnings.catch_warnings():  # a record is warned about once, not in every epoch
        warnings.simplefilter("error")
        assert coll([exs[1]]) is None
    assert coll.skipped == 6


def test_image_size_must_be_positive():
    processor, lat, model = _setup()
    with pytest.raises(ValueError, match="image_size"):
        DualPathPacker(processor, lat, model, image_size=0)

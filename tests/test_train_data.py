"""The synthetic task, LLaVA / datasets loading, and the checkpoint helpers (no training)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from crystal_ext.data.example import SkipExample
from crystal_ext.data.records import load_examples
from crystal_ext.data.synthetic import SHAPES, STRIPES, TASKS, SyntheticVQA, draw_example
from crystal_ext.training.checkpoints import (
    COMPLETE_MARKER,
    last_complete_checkpoint,
    resolve_resume_checkpoint,
)


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a, b = SyntheticVQA(20, "train", seed=3), SyntheticVQA(20, "train", seed=3)
    for i in range(20):
        assert np.array_equal(np.asarray(a[i].image), np.asarray(b[i].image)) and a[i].answer == b[i].answer
    test = SyntheticVQA(20, "test", seed=3)
    train_pixels = {np.asarray(a[i].image).tobytes() for i in range(20)}
    assert not train_pixels & {np.asarray(test[i].image).tobytes() for i in range(20)}
    shapes = SyntheticVQA(300, "train", task="shape")
    assert {shapes[i].answer for i in range(300)} == set(SHAPES)
    stripes = SyntheticVQA(300, "train", task="stripes")
    assert {stripes[i].answer for i in range(300)} == set(STRIPES)
    assert a[0].image.size == (112, 112)


def test_blur_removes_the_stripes():
    from crystal_ext.data.corruption import CorruptionConfig, corrupt

    def stripe_energy(image):  # mean absolute difference of neighbouring pixels, both directions
        x = np.asarray(image.convert("L"), dtype=np.float32)
        return np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()

    image, _ = draw_example(0, "k", "stripes")
    energy = [
        stripe_energy(corrupt(image, CorruptionConfig(blur_radius=(r, r)), 0, "k")) for r in (2.0, 3.0, 5.0)
    ]
    # radius 2 leaves faint lines (period 7 px); from radius 3 on they are gone (what is left
    # is the outline and the background noise)
    assert energy[0] < 0.25 * stripe_energy(image) and max(energy[1:]) < 0.08 * stripe_energy(image)


_STRIPE_BINS = {"horizontal": (16, 0), "vertical": (0, 16), "diagonal": (16, 16)}  # 112 px / period 7 = 16


def _stripe_amplitudes(image):
    """|FFT| of the grey image at the lines' fundamental for each orientation."""
    x = np.asarray(image.convert("L"), dtype=np.float64)
    f = np.abs(np.fft.fft2(x - x.mean()))
    return {name: f[b] for name, b in _STRIPE_BINS.items()}


def test_stripes_faint_is_deterministic_graded_and_blur_removes_it():
    from crystal_ext.data.corruption import CorruptionConfig, corrupt
    from crystal_ext.data.synthetic import FAINT_NOISE

    a, b = (
        SyntheticVQA(40, "train", seed=5, task="stripes_faint"),
        SyntheticVQA(40, "train", seed=5, task="stripes_faint"),
    )
    for i in range(40):
        assert np.array_equal(np.asarray(a[i].image), np.asarray(b[i].image)) and a[i].answer == b[i].answer
    assert a[0].question == TASKS["stripes"] and {a[i].answer for i in range(40)} == set(STRIPES)
    other = SyntheticVQA(3, "train", seed=6, task="stripes_faint")
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(other[0].image))
    # the noise covers the shape too (the default task's shape is noise-free)
    image, _ = draw_example(0, "k", "stripes_faint")
    assert np.asarray(image, dtype=np.float64)[50:60, 50:60].std() > FAINT_NOISE / 2
    strong, faint = 0, 0
    for i in range(40):
        amp = _stripe_amplitudes(a[i].image)
        ratio = amp[a[i].answer] / max(v for k, v in amp.items() if k != a[i].answer)
        if ratio > 20:  # full contrast: the orientation stands far above the others and the noise
            strong += 1
            blurred = _stripe_amplitudes(
                corrupt(a[i].image, CorruptionConfig(blur_radius=(3.0, 3.0)), 0, "k")
            )
            assert blurred[a[i].answer] < 0.01 * amp[a[i].answer]  # radius 3 leaves < 1% of the lines
        elif ratio < 5:
            faint += 1
    assert strong >= 10 and faint >= 4  # both kinds are there: intact accuracy is graded by contrast


def test_synthetic_words_are_in_the_tiny_vocabulary():
    from crystal_ext.training.tiny_model import tiny_tokenizer

    tok = tiny_tokenizer()
    for task, question in TASKS.items():
        _, answer = draw_example(0, "k", task)
        assert tok.unk_token_id not in tok(f"{question} {answer}", add_special_tokens=False).input_ids


def _llava_records(folder):
    Image.new("RGB", (40, 30), "red").save(folder / "a.png")
    return [
        {
            "id": "r1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red"},
            ],
        },
        {
            "id": "r2",
            "conversations": [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}],
        },
    ]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_json_and_jsonl(tmp_path, fmt):
    records = _llava_records(tmp_path)
    path = tmp_path / f"train.{fmt}"
    path.write_text(json.dumps(records) if fmt == "json" else "\n".join(json.dumps(r) for r in records))
    ds = load_examples(str(path))
    assert len(ds) == 2
    ex = ds[0]
    assert (ex.key, ex.question, ex.answer) == ("r1", "What colour?", "Red")
    assert ex.image == str(tmp_path / "a.png")
    with pytest.raises(SkipExample, match="no image"):  # the data check leaves it out
        ds[1]


def test_datasets_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(_llava_records(tmp_path)).save_to_disk(str(tmp_path / "single"))
    ds = load_examples(str(tmp_path / "single"), image_folder=str(tmp_path))
    assert ds[0].answer == "Red" and ds[0].image == str(tmp_path / "a.png")
    qa = Dataset.from_list([{"question": "q?", "answer": "a", "image": str(tmp_path / "a.png")}])
    DatasetDict({"train": qa, "test": qa}).save_to_disk(str(tmp_path / "dict"))
    assert load_examples(str(tmp_path / "dict"), split="test")[0].question == "q?"


def test_resume_resolution(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(ValueError, match="incomplete.*checkpoint-4"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-6"), str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        resolve_resume_checkpoint(os.path.join(str(tmp_path), "nope"), str(tmp_path))


def test_the_newest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for step in (9, 10, 100):  # by name, "checkpoint-9" sorts last
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint of this run
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
    assert resolve_resume_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-100")


def test_messages_format_multi_turn_multi_image(tmp_path):
    from crystal_ext.data.records import check_dataset

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    Image.new("RGB", (30, 40), "blue").save(tmp_path / "b.png")
    records = [
        {  # TRL: content as a list of parts
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red"}]},
            ],
            "images": ["a.png"],
        },
        {  # LLaMA-Factory: strings with <image>, two turns, two images
            "messages": [
                {"role": "user", "content": "<image>What colour?"},
                {"role": "assistant", "content": "Red"},
                {"role": "user", "content": "<image>And this one?"},
                {"role": "assistant", "content": "Blue"},
            ],
            "images": ["a.png", "b.png"],
        },
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    ds = load_examples(str(path))
    assert check_dataset(ds) == {"records": 2, "usable": 2, "skipped": 0}
    one, two = ds[0], ds[1]
    assert (one.question, one.answer, one.image) == ("What colour?", "Red", str(tmp_path / "a.png"))
    assert two.answer == "Blue" and two.image == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [m["role"] for m in two.messages] == ["user", "assistant", "user"]
    assert two.messages[1]["content"] == [{"type": "text", "text": "Red"}]
    assert two.messages[2]["content"] == [{"type": "image"}, {"type": "text", "text": "And this one?"}]


def test_data_check_names_file_and_line_and_stops_on_mostly_bad_data(tmp_path):
    from crystal_ext.data.records import check_dataset

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    good = {
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        "images": ["a.png"],
    }
    no_answer = {"messages": [{"role": "user", "content": "<image>Q"}], "images": ["a.png"]}
    missing = {**good, "images": ["nope.png"]}
    lines = [json.dumps(good)] * 4 + ["{not json", json.dumps(no_answer), json.dumps(missing)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines))
    ds = load_examples(str(path))
    with pytest.warns(UserWarning) as record:
        report = check_dataset(ds)
    messages = [str(w.message) for w in record]
    assert report == {"records": 7, "usable": 4, "skipped": 3} and len(ds) == 4
    assert any(f"{path}:5: malformed JSON" in m for m in messages)
    assert any(f"{path}:6: no answer" in m for m in messages)
    assert any(f"{path}:7: image file not found" in m for m in messages)
    path.write_text("\n".join([json.dumps(good)] + lines[4:]))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="--data: 3 of 4 records cannot be used"):
        check_dataset(load_examples(str(path)))


@pytest.mark.parametrize(
    "record",
    [
        {  # TRL parts: two image places, one image
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}],
                },
                {"role": "assistant", "content": "A"},
            ],
            "images": ["a.png"],
        },
        {  # LLaMA-Factory strings: places over two turns, one image
            "messages": [
                {"role": "user", "content": "<image>Q"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "<image>Q2"},
                {"role": "assistant", "content": "B"},
            ],
            "images": ["a.png"],
        },
        {  # LLaVA conversations
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nQ"},
                {"from": "gpt", "value": "A"},
            ],
        },
        {  # more images than places
            "image": ["a.png", "a.png"],
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
    ],
)
def test_data_check_refuses_image_places_and_images_that_differ(tmp_path, record):
    from crystal_ext.data.records import check_dataset

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]}
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps({**good, "images": ["a.png"]})] * 2 + [json.dumps(record)]))
    with pytest.warns(UserWarning, match=rf"{path}:3: \d image places in the conversation but \d images"):
        assert check_dataset(load_examples(str(path))) == {"records": 3, "usable": 2, "skipped": 1}


@pytest.mark.parametrize(
    "record",
    [
        {
            "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}],
            "images": ["a.png"],
        },
        {"messages": "not a list of turns", "images": ["a.png"]},
        {"conversations": [1, 2], "image": "a.png"},
        {"messages": [{"role": "user", "content": ["<image>Q", 7]}, {"role": "assistant", "content": "A"}]},
    ],
)
def test_a_record_of_the_wrong_structure_is_left_out_by_name(tmp_path, record):
    from crystal_ext.data.records import check_dataset

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]}
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps({**good, "images": ["a.png"]})] * 2 + [json.dumps(record)]))
    with pytest.warns(UserWarning, match=rf"{path}:3: malformed record \((TypeError|AttributeError)"):
        assert check_dataset(load_examples(str(path))) == {"records": 3, "usable": 2, "skipped": 1}


def test_a_data_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xff\xfe\x00 not text\n")
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text"):
        load_examples(str(path))


def test_unknown_words_of_the_tiny_tokenizer_are_found():
    from crystal_ext.data.example import Example
    from crystal_ext.training.tiny_model import tiny_tokenizer, unknown_words

    tok = tiny_tokenizer()
    examples = [
        Example("a", None, "what shape is in the image ?", "circle"),
        Example("b", None, "zebra ?", "x"),
    ]
    assert unknown_words(tok, examples) == (1, 2, ["x", "zebra"])


def test_a_hub_data_set_id_offline_fails_at_once_with_what_to_do(monkeypatch, tmp_path):
    """An owner/name --data is a hub data set (datasets.load_dataset); without network the run
    stops during argument checks, naming the flag and the save_to_disk way round, and a path that
    looks like a file stays a missing file."""
    import time

    from crystal_ext.training.arguments import check_data_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"--eval_data someone/vqa-set: .*cannot be reached.*save_to_disk"):
        check_data_available("--eval_data", "someone/vqa-set")
    assert time.monotonic() - start < 5  # no hub retries
    with pytest.raises(ValueError, match="--data missing/data.jsonl: no such file"):
        check_data_available("--data", "missing/data.jsonl")
    local = tmp_path / "d.jsonl"
    local.write_text("{}\n")
    check_data_available("--data", str(local))

"""Fault injection through the command lines: truncated, missing and unreadable images, malformed
lines, records of the wrong structure and wrong image counts in `--data`, `--eval_data` and
`crystal_ext.evaluate --data`. Every run ends with a message naming each bad record, its outputs
written (or, when the data cannot be used at all, exit status 2 with the earlier run's outputs
left as they were), and no traceback."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from train_helpers import metrics, run

import crystal_ext

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="training runs the compiled fused ops"
)

QUESTION = "what shape is in the image ?"  # the tiny tokenizer's words


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _record(images: list[str], places: int | None = None, answer: str = "circle") -> str:
    places = len(images) if places is None else places
    user = "<image>" * places + QUESTION
    return json.dumps(
        {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": images,
        }
    )


def _data_file(folder, name: str, good: int) -> tuple[str, dict]:
    """`good` usable records, then one record of each fault; returns the path and, per fault, the
    `file:line` that names its record."""
    lines = [_record([f"good{i}.png"]) for i in range(good)]
    faults = {
        "truncated": _record(["truncated.png"]),
        "unreadable": _record(["not_an_image.png"]),
        "missing": _record(["missing.png"]),
        "malformed": '{"messages": [',
        "wrong structure": json.dumps(
            {"messages": [{"role": "user", "content": 5}], "images": ["good0.png"]}
        ),
        "more places than images": _record(["good0.png"], places=2),
        "more images than places": _record(["good0.png", "good1.png"], places=1),
    }
    path = folder / name
    where = {}
    for fault, line in faults.items():
        lines.append(line)
        where[fault] = f"{path}:{len(lines)}"
    path.write_text("\n".join(lines) + "\n")
    return str(path), where


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    for i in range(8):
        (folder / f"good{i}.png").write_bytes(_png(i))
    whole = _png(99)
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "not_an_image.png").write_text("this is not a picture\n")
    train, train_where = _data_file(folder, "train.jsonl", good=8)
    held_out, held_out_where = _data_file(folder, "held_out.jsonl", good=7)
    return {"folder": folder, "train": (train, train_where), "held_out": (held_out, held_out_where)}


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]


def _names_every_fault(text: str, where: dict) -> None:
    for fault, place in where.items():
        assert place in text, f"{fault} ({place}) not named:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def trained(faulty, tmp_path_factory):
    """A tiny training run on the faulty --data and --eval_data (one batch holds every record, so
    the truncated and unreadable images reach the packer)."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["--data", faulty["train"][0], "--eval_data", faulty["held_out"][0], "--output_dir", str(out)]
    args += ["--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "16"]
    args += ["--logging_steps", "1", "--num_pictures", "2", "--report_to", "none"]
    return out, run(args, check=False, timeout=300)


def test_training_names_every_bad_record_and_writes_its_outputs(faulty, trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr[-4000:]
    _no_traceback(proc)
    _names_every_fault(proc.stderr, faulty["train"][1])
    _names_every_fault(proc.stderr, faulty["held_out"][1])
    assert (out / "checkpoint-2" / "crystal_checkpoint_complete.json").is_file()
    assert (out / "model.safetensors").is_file()
    result = json.loads((out / "eval_results.json").read_text())
    # the end-of-run evaluation: the 7 good records answered, the two bad images skipped by name
    assert result["n"] == 7
    skipped = {s["where"]: s["reason"] for s in result["skipped"]}
    where = faulty["held_out"][1]
    assert set(skipped) == {where["truncated"], where["unreadable"]}
    assert (
        "truncated.png" in skipped[where["truncated"]] and "not_an_image.png" in skipped[where["unreadable"]]
    )
    assert len(list((out / "pictures").glob("*.png"))) == 2
    assert "2 examples skipped" in proc.stdout and "evaluation:" in proc.stdout
    check = [r["data_check"] for r in metrics(out) if "data_check" in r]
    assert check == [{"records": 15, "usable": 10, "skipped": 5}]


def test_evaluate_names_every_bad_record_and_writes_its_results(faulty, trained, tmp_path):
    out, _ = trained
    results = tmp_path / "results.json"
    args = ["--model", str(out), "--data", faulty["held_out"][0], "--output", str(results)]
    proc = run([*args, "--no_latent_carried"], module="crystal_ext.evaluate", check=False, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _no_traceback(proc)
    _names_every_fault(proc.stderr, faulty["held_out"][1])
    result = json.loads(results.read_text())
    assert result["n"] == 7 and len(result["skipped"]) == 2


def _mostly_bad(faulty) -> str:
    folder = faulty["folder"]
    path = folder / "mostly_bad.jsonl"
    path.write_text(
        "\n".join([_record(["good0.png"]), _record(["missing.png"]), "not json", _record([])]) + "\n"
    )
    return str(path)


def test_unusable_data_stops_with_the_records_named_and_the_earlier_run_kept(faulty, trained):
    """--overwrite_output_dir with data that cannot be used: exit 2 naming the records, and the
    earlier run's checkpoints, metrics, results and pictures untouched (they are removed only once
    every check has passed)."""
    out, _ = trained
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = _mostly_bad(faulty)
    for flags in (["--data", bad], ["--data", faulty["train"][0], "--eval_data", bad]):
        proc = run(
            [*flags, "--overwrite_output_dir", "--output_dir", str(out), "--max_steps", "2"], check=False
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        _no_traceback(proc)
        flag = flags[-2]
        assert f"{flag}: 3 of 4 records cannot be used" in proc.stderr
        assert f"{bad}:2: image file not found" in proc.stderr and f"{bad}:3: malformed JSON" in proc.stderr
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert after == before
    proc = run(["--model", str(out), "--data", bad], module="crystal_ext.evaluate", check=False, timeout=120)
    assert proc.returncode == 2 and "--data: 3 of 4 records cannot be used" in proc.stderr
    _no_traceback(proc)


def test_overwrite_removes_the_earlier_run_once_the_checks_pass(faulty, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "crystal_checkpoint_complete.json").write_text("{}")
    for name in ("eval_results.json", "adapter_config.json", "metrics.jsonl"):
        (out / name).write_text("{}\n")
    (out / "pictures").mkdir()
    args = ["--data", faulty["train"][0], "--output_dir", str(out), "--overwrite_output_dir"]
    run([*args, "--max_steps", "1", "--save_steps", "5", "--logging_steps", "1", "--report_to", "none"])
    left = sorted(p.name for p in out.iterdir())
    assert "checkpoint-7" not in left and "adapter_config.json" not in left and "pictures" not in left
    assert "eval_results.json" not in left  # no held-out data this time: no stale results either
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1]

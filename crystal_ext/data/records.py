"""Loading real training data into `crystal_ext.data.example.Example`s, and checking it before
training.

Accepted sources (`--data`):
- the `messages` + `images` format of TRL / LLaMA-Factory / ms-swift, JSONL (one record a line)
  or JSON (a list):
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                  {"role": "assistant", "content": "A"}],
     "images": ["relative/or/absolute.jpg"]}
  A content is a string (where "<image>" marks an image) or a list of parts ({"type": "image"},
  optionally with the image inline under "image", and {"type": "text", "text": ...}).
- a LLaVA-conversation file, JSON or JSONL:
    {"id": "...", "image": "a.jpg" or ["a.jpg", "b.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value": "Answer"}]}
  "<image>" marks where each image goes (without one, the images open the first user turn).
- a data set on the Hugging Face hub by its id (`owner/name`, loaded with `datasets.load_dataset`
  when the machine is online), with the columns below;
- a folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict: its "train" split; for
  --eval_data its "test" split), with either column set above or "question" / "answer" /
  "image" columns; an image may be a path or a decoded image (the `datasets` Image feature).
Every turn and every image is kept: the last assistant turn is the trained answer, the earlier
turns are context (docs/training.md). Relative image paths are resolved against
`--image_folder` (default: the data file's folder).

`check_dataset` runs before training and evaluation (`--data`, `--eval_data`, and
`crystal_ext.evaluate --data`): a record that cannot be used (malformed JSON, no
assistant answer, no image, a missing image file, images and image places that do not match)
is reported once as `file:line: reason` and left out; the run stops when more than half of the
records (or all of them) are left out.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings

from torch.utils.data import Dataset

from crystal_ext.data.example import Example, SkipExample

HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant")
PLACEHOLDER = "<image>"
MAX_SKIPPED_SHARE = 0.5


class _Malformed:
    """A line of a JSONL file that is not JSON; the check reports it."""

    def __init__(self, reason: str):
        self.reason = reason


def _role(turn: dict) -> str:
    who = str(turn.get("role", turn.get("from", ""))).lower()
    return "user" if who in HUMAN else "assistant" if who in ASSISTANT else who


def _parts(content) -> list[dict]:
    """A content as parts; "<image>" in a string becomes an image part."""
    if content is None:
        return []
    if isinstance(content, str):
        parts = []
        for i, piece in enumerate(content.split(PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        return parts
    out = []
    for part in content:
        if isinstance(part, str):
            out += _parts(part)
        elif part.get("type") == "image" or "image" in part and part.get("type") in (None, "image"):
            out.append(
                {"type": "image", **({"image": part["image"]} if part.get("image") is not None else {})}
            )
        elif part.get("type") == "text":
            out.append({"type": "text", "text": str(part.get("text", ""))})
    return out


def _text_of(parts: list[dict]) -> str:
    return " ".join(p["text"] for p in parts if p["type"] == "text").strip()


def _resolve(image, image_folder):
    if isinstance(image, dict):  # datasets' Image feature, not decoded: bytes or a path
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
    if isinstance(image, str) and image_folder and not os.path.isabs(image):
        return os.path.join(image_folder, image)
    return image


def _conversation_example(key: str, turns: list, images, image_folder) -> Example:
    messages = [{"role": _role(t), "content": _parts(t.get("content", t.get("value")))} for t in turns]
    if not messages or messages[-1]["role"] != "assistant" or not _text_of(messages[-1]["content"]):
        raise SkipExample("no answer: the conversation does not end with an assistant turn that has text")
    answer, prompt = _text_of(messages[-1]["content"]), messages[:-1]
    if not any(m["role"] == "user" for m in prompt):
        raise SkipExample("no user turn before the answer")
    images = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
    inline = [p.pop("image") for m in prompt for p in m["content"] if p["type"] == "image" and "image" in p]
    images = images or inline
    places = sum(p["type"] == "image" for m in prompt for p in m["content"])
    if places == 0 and images:  # no placeholder: the images open the first user turn
        first = next(m for m in prompt if m["role"] == "user")
        first["content"] = [{"type": "image"} for _ in images] + first["content"]
        places = len(images)
    if not images:
        raise SkipExample("no image")
    if places != len(images):
        raise SkipExample(f"{places} image places in the conversation but {len(images)} images")
    last_user = next(m for m in reversed(prompt) if m["role"] == "user")
    images = [_resolve(im, image_folder) for im in images]
    return Example(
        key, images if len(images) > 1 else images[0], _text_of(last_user["content"]), answer, prompt
    )


def record_to_example(record, index: int, image_folder: str | None) -> Example:
    """The Example of one record; raises SkipExample when the record cannot be used (also when
    its fields have the wrong types: a turn that is not an object, a content that is a number...)."""
    try:
        return _record_to_example(record, index, image_folder)
    except SkipExample:
        raise
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        raise SkipExample(f"malformed record ({type(exc).__name__}: {exc})") from exc


def _record_to_example(record, index: int, image_folder: str | None) -> Example:
    if isinstance(record, _Malformed):
        raise SkipExample(record.reason)
    if not isinstance(record, dict):
        raise SkipExample(f"a record must be a JSON object, got {type(record).__name__}")
    key = str(record.get("id", index))
    if record.get("messages") is not None:
        return _conversation_example(key, record["messages"], record.get("images"), image_folder)
    if record.get("conversations") is not None:
        return _conversation_example(key, record["conversations"], record.get("image"), image_folder)
    answer = record.get("answer")
    image = _resolve(record.get("image"), image_folder)
    question = str(record.get("question") or "").replace(PLACEHOLDER, "").strip()
    return Example(key, image, question, answer)


class RecordDataset(Dataset):
    """Examples built lazily from a list-like of records (a list or a `datasets.Dataset`).
    `where[i]` names record i in messages (file:line for JSONL)."""

    def __init__(self, records, image_folder: str | None, where=None):
        self.records, self.image_folder = records, image_folder
        self.where = where
        self.indices = None  # after check_dataset: the usable records

    def _label(self, i: int) -> str:
        return self.where[i] if self.where is not None else f"record {i}"

    def __len__(self) -> int:
        return len(self.records) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> Example:
        i = index if self.indices is None else self.indices[index]
        example = record_to_example(self.records[i], i, self.image_folder)
        example.where = self._label(i)
        return example


def _problem(example: Example) -> str | None:
    """A reason the packer would skip the example, found without opening images."""
    if example.answer is None or not str(example.answer).strip():
        return "no answer"
    if not example.images:
        return "no image"
    for image in example.images:
        if isinstance(image, str) and not os.path.isfile(image):
            return f"image file not found: {image}"
    return None


def check_dataset(dataset: RecordDataset, argument: str = "--data") -> dict:
    """Leave out the records that cannot be used, warning once for each (`file:line: reason`);
    return {"records", "usable", "skipped"}. Raises ValueError naming `argument` when no record,
    or more than half of them, can be used."""
    usable, skipped = [], []
    for i in range(len(dataset.records)):
        try:
            reason = _problem(record_to_example(dataset.records[i], i, dataset.image_folder))
        except SkipExample as exc:
            reason = str(exc)
        if reason is None:
            usable.append(i)
        else:
            skipped.append(f"{dataset._label(i)}: {reason}")
            warnings.warn(f"crystal_ext: skipping {skipped[-1]}", stacklevel=2)
    total = len(dataset.records)
    if not usable or len(skipped) > MAX_SKIPPED_SHARE * total:
        shown = "; ".join(skipped[:5]) + (f"; ... ({len(skipped) - 5} more)" if len(skipped) > 5 else "")
        raise ValueError(
            f"{argument}: {len(skipped)} of {total} records cannot be used (more than "
            f"{MAX_SKIPPED_SHARE:.0%} or all): {shown or 'the data set is empty'}"
        )
    dataset.indices = usable
    return {"records": total, "usable": len(usable), "skipped": len(skipped)}


def read_records(path: str) -> tuple[list, list[str]]:
    """(records, where) of a JSON / JSONL file; a malformed JSONL line becomes a record the check
    reports with its line number."""
    try:
        return _read_records(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _read_records(path: str) -> tuple[list, list[str]]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records, where = [], []
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    records.append(_Malformed(f"malformed JSON ({exc.msg}, column {exc.colno})"))
                where.append(f"{path}:{number}")
            return records, where
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON data file must hold a list of records, got {type(data).__name__}")
    return data, [f"{path}[{i}]" for i in range(len(data))]


# owner/name of a data set on the Hugging Face hub (a path that does not exist locally).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_data_id(path: str) -> bool:
    return not os.path.exists(path) and bool(_HUB_ID.match(path)) and not path.endswith((".json", ".jsonl"))


def check_data_path(path: str) -> None:
    """Cheap checks for argument validation (before any model is loaded); a hub id is checked for
    reachability by the caller."""
    if is_hub_data_id(path):
        return
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or folder (nor an owner/name data set id)")
    if os.path.isdir(path):
        if not any(
            os.path.isfile(os.path.join(path, n))
            for n in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            raise ValueError(
                f"--data {path}: a folder must be a data set saved with datasets' save_to_disk "
                "(no dataset_info.json / dataset_dict.json found)"
            )
    elif not path.endswith((".json", ".jsonl")):
        raise ValueError(
            f"--data {path}: expected a .json / .jsonl file (messages + images, or LLaVA conversations) "
            "or a save_to_disk folder"
        )


def load_examples(path: str, image_folder: str | None = None, split: str = "train") -> RecordDataset:
    check_data_path(path)
    if is_hub_data_id(path):
        from datasets import load_dataset

        data = load_dataset(path, split=split)
        return RecordDataset(data, image_folder or ".", [f"{path}[{i}]" for i in range(len(data))])
    if os.path.isdir(path):
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(path)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"--data {path}: no {split!r} split (has {sorted(data)})")
            data = data[split]
        return RecordDataset(data, image_folder or path, [f"{path}[{i}]" for i in range(len(data))])
    records, where = read_records(path)
    return RecordDataset(records, image_folder or os.path.dirname(os.path.abspath(path)), where)

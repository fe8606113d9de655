"""Loading real training data into `crystal_ext.data.packing.Example`s.

Accepted sources (`--data`):
- a LLaVA-conversation file, JSON (a list of records) or JSONL (one record a line):
    {"id": "...", "image": "relative/or/absolute.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value": "Answer"}]}
  The first human -> gpt exchange is used (the dual-path layout holds one question and one
  answer); the "<image>" placeholder is removed (the packer places the image itself).
- a folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict: its "train" split),
  with either the LLaVA columns above or "question" / "answer" / "image" columns; "image" may
  be a path or a decoded image (the `datasets` Image feature).
Relative image paths are resolved against `--image_folder` (default: the data file's folder).
Records that cannot be used (no image, no answer, unreadable file) are not dropped here: the
packer skips them with a warning naming the record, so a bad record never stops a run.
"""

from __future__ import annotations

import json
import os

from torch.utils.data import Dataset

from crystal_ext.data.example import Example

HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant")


def _first_exchange(conversations) -> tuple[str | None, str | None]:
    question = None
    for turn in conversations or ():
        who, text = (
            str(turn.get("from", turn.get("role", ""))).lower(),
            turn.get("value", turn.get("content")),
        )
        if question is None and who in HUMAN:
            question = text
        elif question is not None and who in ASSISTANT:
            return question, text
    return question, None


def _clean_question(text: str | None) -> str | None:
    if text is None:
        return None
    return text.replace("<image>", "").strip()


def record_to_example(record: dict, index: int, image_folder: str | None) -> Example:
    key = str(record.get("id", index))
    if "conversations" in record:
        question, answer = _first_exchange(record["conversations"])
    else:
        question, answer = record.get("question"), record.get("answer")
    image = record.get("image")
    if isinstance(image, (list, tuple)):  # multi-image records: the layout holds one image
        image = image[0] if len(image) == 1 else None
    if isinstance(image, str) and image_folder and not os.path.isabs(image):
        image = os.path.join(image_folder, image)
    return Example(key, image, _clean_question(question) or "", answer)


class RecordDataset(Dataset):
    """Examples built lazily from a list-like of records (a list or a `datasets.Dataset`)."""

    def __init__(self, records, image_folder: str | None):
        self.records, self.image_folder = records, image_folder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        return record_to_example(self.records[index], index, self.image_folder)


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA JSON file must hold a list of records, got {type(data).__name__}")
    return data


def check_data_path(path: str) -> None:
    """Cheap checks for argument validation (before any model is loaded)."""
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file or folder")
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
            f"--data {path}: expected a .json / .jsonl LLaVA-conversation file or a save_to_disk folder"
        )


def load_examples(path: str, image_folder: str | None = None, split: str = "train") -> RecordDataset:
    check_data_path(path)
    if os.path.isdir(path):
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(path)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"--data {path}: no {split!r} split (has {sorted(data)})")
            data = data[split]
        return RecordDataset(data, image_folder or path)
    return RecordDataset(read_records(path), image_folder or os.path.dirname(os.path.abspath(path)))

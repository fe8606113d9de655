"""Crash-safe checkpoints: a completion marker written last, and resuming only from complete ones.

transformers' Trainer writes `checkpoint-N` in place (no temporary folder, no rename) and
deletes old checkpoints right after, so a kill mid-save leaves a folder that looks like a
checkpoint. CrystalTrainer therefore fsyncs every file of a new checkpoint, then writes
`crystal_checkpoint_complete.json` atomically (write_complete_marker), and only then rotates
old checkpoints out; `resolve_resume_checkpoint` refuses a folder without the marker.
"""

from __future__ import annotations

import json
import os
import time

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

COMPLETE_MARKER = "crystal_checkpoint_complete.json"


def is_complete_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def checkpoint_step(name: str) -> int | None:
    """N of a folder named checkpoint-N, else None."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    found = [(checkpoint_step(n), n) for n in os.listdir(output_dir)]
    found = [
        (s, n) for s, n in found if s is not None and is_complete_checkpoint(os.path.join(output_dir, n))
    ]
    return os.path.join(output_dir, max(found)[1]) if found else None


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None. `value` is a path, or "last"/"true" for
    the newest complete checkpoint of `output_dir`. Raises ValueError with what to do instead."""
    if value is None or str(value).lower() in ("", "none", "false"):
        return None
    if str(value).lower() in ("last", "true"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return found
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: {value} is not a folder")
    if not is_complete_checkpoint(value):
        other = last_complete_checkpoint(os.path.dirname(os.path.abspath(value)))
        hint = f"; the newest complete checkpoint there is {other}" if other else ""
        raise ValueError(
            f"--resume_from_checkpoint: {value} is incomplete (no {COMPLETE_MARKER}: the run was stopped while "
            f"saving it, or it was not written by crystal_ext.train){hint}"
        )
    return value


def _fsync(path: str) -> None:
    """Flush one file, or one folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """Flush every file of `folder` (and the folders themselves) to disk, so the marker written
    after this never survives a crash that the files it vouches for do not."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def write_complete_marker(folder: str, step: int) -> None:
    _fsync_tree(folder)
    tmp = os.path.join(folder, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"global_step": step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))  # atomic: the marker exists whole or not at all
    _fsync(folder)  # the rename itself made durable

"""The checkpoint's completion marker is the last thing made durable: every file of the folder is
fsynced before the marker appears (os.replace of its temporary file), the marker's own bytes are
fsynced before the rename, and the folder entry after it. A marker that reaches the disk before
the files it vouches for would let a crash leave a "complete" checkpoint with torn files."""

from __future__ import annotations

import json
import os

from crystal_ext.training import checkpoints
from crystal_ext.training.checkpoints import COMPLETE_MARKER, is_complete_checkpoint, write_complete_marker


def _record_durability_events(monkeypatch):
    """Wraps os.fsync and os.replace as checkpoints.py calls them; returns the list of
    ("fsync", path) and ("replace", src, dst) events in call order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    monkeypatch.setattr(checkpoints.os, "replace", replace)
    return events


def test_files_are_fsynced_before_the_marker_appears(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint-7"
    (folder / "shards").mkdir(parents=True)
    files = [folder / "model.safetensors", folder / "optimizer.pt", folder / "shards" / "rng_state_1.pth"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    events = _record_durability_events(monkeypatch)

    write_complete_marker(str(folder), 7)

    marker = os.path.realpath(folder / COMPLETE_MARKER)
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == marker]
    assert len(renames) == 1, events  # the marker appears once, by an atomic rename
    appear = renames[0]
    synced_before = {e[1] for e in events[:appear] if e[0] == "fsync"}
    for f in files:
        assert os.path.realpath(f) in synced_before, f"{f.name} not fsynced before the marker: {events}"
    for d in (folder, folder / "shards"):
        assert os.path.realpath(d) in synced_before, f"folder {d.name} not fsynced before the marker"
    assert events[appear][1] in synced_before  # the marker's own bytes, before its rename
    # the rename itself is made durable by an fsync of the folder after it
    assert ("fsync", os.path.realpath(folder)) in events[appear + 1 :]

    assert is_complete_checkpoint(str(folder))
    assert json.loads((folder / COMPLETE_MARKER).read_text())["global_step"] == 7
    assert not (folder / (COMPLETE_MARKER + ".tmp")).exists()

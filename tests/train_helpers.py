"""Running `python -m crystal_ext.train` / `crystal_ext.evaluate` in subprocesses for the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Small runs: no time guard, no pictures unless asked, a short held-out set.
FAST = ["--logging_steps", "1", "--eval_examples", "0", "--report_to", "none"]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["HF_HUB_OFFLINE"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(
    args: list[str],
    module: str = "crystal_ext.train",
    prefix: list[str] | None = None,
    timeout: int = 170,
    check: bool = True,
) -> subprocess.CompletedProcess:
    cmd = (prefix or [sys.executable, "-m", module]) + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in Path(folder, "metrics.jsonl").read_text().splitlines()]


def loss_at(folder, step: int) -> float:
    return [r["loss"] for r in metrics(folder) if r.get("step") == step and "loss" in r][-1]

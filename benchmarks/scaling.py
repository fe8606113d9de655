"""How one step's cost grows with the answer length |E| and the vocabulary V: ours vs the
published recipe, on the Qwen-7B-attention model of test_crystal_step.py (L ~ 700).

    python benchmarks/scaling.py

Prints a markdown table (median of 2 steps after a warm-up; peak memory with parameter
gradients). Growth with L is in test_crystal_step.py (L = 685 and 1317).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_models  # noqa: E402
from bench_utils import median_seconds  # noqa: E402
from published_step import published_step_loss_switched  # noqa: E402
from step_models import peak_step_bytes, run_step  # noqa: E402

import crystal_ext  # noqa: E402
from crystal_ext.model.objective import crystal_objective  # noqa: E402


def measure(loss_fn, model, batch, rounds=2):
    """(median seconds of a step after a warm-up, peak bytes of one step)."""
    run_step(loss_fn, model, batch)
    return median_seconds(lambda: run_step(loss_fn, model, batch), rounds), peak_step_bytes(
        loss_fn, model, batch
    )


def main():
    crystal_ext.register_dual_path_attention()
    print("| |E| = |F| | V | L | ours (s) | published (s) | speed-up | peak ours / published (MB) |")
    print("|---|---|---|---|---|---|---|")
    for answer, vocab in ((21, 152064), (45, 152064), (93, 152064), (45, 32768)):
        model, batch = step_models.build_qwen7b_attention(
            crystal_ext.ATTN_IMPLEMENTATION, 448, 25, answer, vocab=vocab
        )
        e = int(batch["layout"][0, 4, 1] - batch["layout"][0, 4, 0])
        ours_s, ours_peak = measure(crystal_objective, model, batch)
        theirs_s, theirs_peak = measure(published_step_loss_switched, model, batch)
        print(
            f"| {e} | {vocab} | {batch['input_ids'].shape[1]} | {ours_s:.2f} | {theirs_s:.2f} | "
            f"{theirs_s / ours_s:.2f}x | {ours_peak / 2**20:.0f} / {theirs_peak / 2**20:.0f} |",
            flush=True,
        )
        del model, batch


if __name__ == "__main__":
    main()

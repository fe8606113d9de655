"""Baseline (--no_crystal) vs CrystaL on the embedded synthetic task, several seeds.

    python benchmarks/ablation.py --seeds 0 1 2 --max_steps 400                        # stripes
    python benchmarks/ablation.py --seeds 0 1 2 --max_steps 800 --task stripes_faint   # harder

Each run is `python -m crystal_ext.train --task T --seed S --max_steps N` (a fixed step count
rather than the default run's time guard, so that a busy machine changes the wall time, not
what is learned), with and without `--no_crystal`, one after another, each with one CPU thread
(the embedded default). The seed sets the model's initialisation and the blur of the
corrupted path; the training and held-out images are the same for every seed (data seed 0).
Prints a markdown table of held-out accuracy (greedy, exact match) on intact and on blurred
images (intact path) and latent-carried (the corrupted path answering from the latents), mean
+- standard deviation over the seeds, and writes every run's numbers
to OUT/ablation.json (OUT defaults to outputs/ablation/TASK-NSTEPS). More crystal_ext.train
arguments go after `--`. Results, machine and what was tried: README.md, "Baseline vs CrystaL on the
embedded task".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def run(mode: str, seed: int, args) -> dict:
    out = os.path.join(args.out, f"{mode}-seed{seed}")
    cmd = [
        sys.executable,
        "-m",
        "crystal_ext.train",
        "--task",
        args.task,
        "--seed",
        str(seed),
        "--max_steps",
        str(args.max_steps),
        "--output_dir",
        out,
        "--overwrite_output_dir",
        "--num_pictures",
        "0",
        *args.extra,
    ]
    if mode == "baseline":
        cmd.append("--no_crystal")
    start = time.time()
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "eval_results.json")) as f:
        result = json.load(f)
    return {
        "mode": mode,
        "task": args.task,
        "max_steps": args.max_steps,
        "seed": seed,
        "seconds": round(time.time() - start, 1),
        "n": result["n"],
        "accuracy_intact": result["accuracy_intact"],
        "accuracy_blurred": result["accuracy_blurred"],
        "accuracy_latent_carried": result.get("accuracy_latent_carried"),
        "attention_kl": result.get("attention_kl"),
    }


def summary(rows: list[dict], mode: str, key: str) -> str:
    values = [100 * r[key] for r in rows if r["mode"] == mode]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=800)
    parser.add_argument(
        "--task",
        default="stripes",
        help="synthetic task (crystal_ext.data.synthetic.TASKS; crystal_ext.train checks it)",
    )
    parser.add_argument("--out", help="output folder (default outputs/ablation/TASK-NSTEPS)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("baseline", "crystal"),
        default=["baseline", "crystal"],
        help="which objectives to run (a remedy tried on CrystaL alone: --modes crystal)",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more crystal_ext.train arguments, after --")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    args.out = args.out or os.path.join("outputs", "ablation", f"{args.task}-{args.max_steps}")
    started = time.time()
    rows = [run(mode, seed, args) for seed in args.seeds for mode in args.modes]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(
        f"\ntask {args.task}, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.max_steps} steps, "
        f"n = {rows[0]['n']} held-out examples each, {time.time() - started:.0f} s in all"
    )
    keys = ("accuracy_intact", "accuracy_blurred", "accuracy_latent_carried")
    print("| objective | accuracy intact (%) | accuracy blurred (%) | accuracy latent-carried (%) |")
    print("|---|---|---|---|")
    for mode, label in (("baseline", "SFT baseline (`--no_crystal`)"), ("crystal", "CrystaL")):
        if mode not in args.modes:
            continue
        print(f"| {label} | {' | '.join(summary(rows, mode, k) for k in keys)} |")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()

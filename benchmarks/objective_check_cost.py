"""What the run-time objective check (crystal_ext.training.objective_check) costs: on the embedded
tiny default, and on a model of Qwen2.5-VL-7B's text widths (hidden 3584, 28 heads, 4 kv heads,
MLP 18944, vocabulary 152,064) with 2 layers, a one-block vision tower and 448 px synthetic images
(256 visual tokens each), random init.

    python benchmarks/objective_check_cost.py --size tiny --threads 1
    python benchmarks/objective_check_cost.py --size 7b --dtype bfloat16

Prints the check's report (what was checked, each measured error, seconds) after one warm-up run
(the first call also loads the extension and warms the allocator).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_models import qwen7b_attention_model  # noqa: E402

from crystal_ext.data.packing import DualPathPacker  # noqa: E402
from crystal_ext.data.synthetic import SyntheticVQA  # noqa: E402
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention  # noqa: E402
from crystal_ext.model.latent_tokens import add_latent_tokens  # noqa: E402
from crystal_ext.model.objective import ObjectiveConfig  # noqa: E402
from crystal_ext.training import tiny_model  # noqa: E402
from crystal_ext.training.objective_check import check_objective  # noqa: E402


def build(size: str, dtype: torch.dtype):
    tok = tiny_model.tiny_tokenizer()
    latent = add_latent_tokens(tok, None, k=8)
    image = 112 if size == "tiny" else 448
    if size == "tiny":
        model = tiny_model.tiny_model(tok).to(dtype)
    else:
        model = qwen7b_attention_model(tok, layers=2, intermediate=18944, dtype=dtype)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    packer = DualPathPacker(
        tiny_model.tiny_processor(tok, image), latent, model, system="you are a helpful assistant ."
    )
    return model, packer, SyntheticVQA(20, "train", seed=0, image_size=image)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_dual_path_attention()
    started = time.monotonic()
    model, packer, data = build(args.size, getattr(torch, args.dtype))
    print(f"built in {time.monotonic() - started:.1f} s; {torch.get_num_threads()} threads")
    objective = ObjectiveConfig(topk_fraction=1.0 if args.size == "tiny" else 0.1)
    for run in ("warm-up", "measured"):
        report = check_objective(model, packer, data, objective, count=args.examples)
        print(f"--- {run}\n{report.summary()}")


if __name__ == "__main__":
    main()

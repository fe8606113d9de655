"""`python -m crystal_ext.check --model DIR --data FILE`: prove, on a few examples of your own data,
that the CrystaL objective trains your model and not something else (docs/training.md, "The
run-time check"); crystal_ext.train runs the same check before its first optimizer step.

The model is loaded as crystal_ext.train loads it (its processor beside it, SDPA attention, the
latent tokens added, the dual-path attention switched on; no LoRA: a fresh adapter changes
nothing) and checked by crystal_ext.training.objective_check. Exit status 0 when every quantity is
within its tolerance, 2 when one is not (the message names the model type, the quantity and how
far off it is) or when the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys

import torch

from crystal_ext.model.alignment_layer import ALIGNMENT_LAYERS

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m crystal_ext.check",
        description="Check that the CrystaL objective reproduces the stock model on a few examples of your data.",
    )
    parser.add_argument(
        "--model", required=True, help="save_pretrained folder (or cached hub id) with its processor"
    )
    parser.add_argument("--data", required=True, help="training data, in any format crystal_ext.train reads")
    parser.add_argument(
        "--image_folder", default=None, help="folder of relative image paths (default: the data's)"
    )
    parser.add_argument("--examples", type=int, default=2, help="examples checked (the first that pack)")
    parser.add_argument("--num_latent_tokens", type=int, default=8)
    parser.add_argument("--system_prompt", default="You are a helpful assistant.")
    parser.add_argument(
        "--image_size", type=int, default=None, help="resize images to this square side first"
    )
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on the CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--lm_head_losses", choices=("fused", "reference"), default="fused")
    parser.add_argument("--topk_fraction", type=float, default=0.1)
    parser.add_argument(
        "--alignment_layer",
        choices=ALIGNMENT_LAYERS,
        default="last",
        help="whose attention the alignment loss reads, as crystal_ext.train's flag: last (as published) or "
        "last_attention (the last full-attention text layer)",
    )
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples must be at least 1, got {args.examples}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def _fail(message: str) -> None:
    print(
        message if message.startswith("crystal_ext.check:") else f"crystal_ext.check: error: {message}",
        file=sys.stderr,
    )
    raise SystemExit(2)


def load(args):
    """(model with the dual-path attention on, packer) as crystal_ext.train builds them."""
    from transformers import AutoConfig, AutoProcessor

    from crystal_ext.data.packing import DualPathPacker
    from crystal_ext.model.alignment_layer import alignment_layer_index
    from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
    from crystal_ext.model.families import UnsupportedModel, family_of
    from crystal_ext.model.latent_tokens import add_latent_tokens
    from crystal_ext.model.runtime_fusions import load_pretrained

    try:  # refused before any weight is loaded
        config = AutoConfig.from_pretrained(args.model)
        family_of(config)
        alignment_layer_index(config, args.alignment_layer)
    except UnsupportedModel as exc:
        _fail(f"--model {args.model}: {exc}")
    except OSError as exc:
        _fail(f"--model {args.model}: {exc}")
    register_dual_path_attention()
    processor = AutoProcessor.from_pretrained(args.model)
    model = load_pretrained(args.model, DTYPES[args.dtype])
    latent = add_latent_tokens(processor.tokenizer, model, k=args.num_latent_tokens)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.to(args.device)
    packer = DualPathPacker(
        processor,
        latent,
        model,
        seed=0,
        image_size=args.image_size,
        max_length=args.max_length,
        system=args.system_prompt or None,
    )
    return model, packer


def main(argv=None) -> None:
    args = parse_args(argv)
    from crystal_ext.data.records import load_examples
    from crystal_ext.model.objective import ObjectiveConfig
    from crystal_ext.model.transformers_support import transformers_problem
    from crystal_ext.ops import extension_available, extension_error
    from crystal_ext.training.objective_check import ObjectiveCheckFailed, check_objective

    problem = transformers_problem()
    if problem is not None:
        _fail(problem)
    if not extension_available():
        _fail(f"the compiled extension is missing ({extension_error()}); the objective's fused ops need it")
    try:
        examples = load_examples(args.data, args.image_folder)
        objective = ObjectiveConfig(
            topk_fraction=args.topk_fraction,
            lm_head_losses=args.lm_head_losses,
            alignment_layer=args.alignment_layer,
        )
    except ValueError as exc:
        _fail(str(exc))
    model, packer = load(args)
    try:
        report = check_objective(model, packer, examples, objective, count=args.examples)
    except ObjectiveCheckFailed as exc:
        _fail(str(exc))
    print(report.summary(), flush=True)


if __name__ == "__main__":
    main()

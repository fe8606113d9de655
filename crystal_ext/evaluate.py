"""`python -m crystal_ext.evaluate --model OUTPUT_DIR [--merge MERGED_DIR]`

Answers the held-out set the way CrystaL is used at inference (docs/method.md): the
intact path only, the stock model class and its own attention, greedy decoding; the model
writes its think block (latent tokens) itself and then `<answer>...</answer>`. Accuracy is
exact match of the answer text, once on the intact images and once on blurred copies
(radius U(blur_radius_min, blur_radius_max), seeded per example as in training).

What the latents carry (crystal_ext.training.latent_carried): the latent-carried accuracy,
the corrupted path answering from the run's corrupted image and the intact path's latent
block, and the mean answer->latent attention KL between the two paths, gold answers
teacher-forced.

`--merge DIR` writes a plain model: LoRA folded into the weights (peft merge_and_unload), the
trained token rows in place, the attention implementation reset to sdpa, and the processor;
`<ModelClass>.from_pretrained(DIR)` loads it with no crystal_ext or peft code. Alone it only
merges (no held-out data needed); with `--data` or `--eval_examples N` it evaluates first.

The held-out data, the packer and the evaluation's settings come from the run's configuration
(crystal_ext.training.run_config), exactly as the training run used them. A held-out example whose
image cannot be read is skipped with a warning naming it and listed under `skipped` in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from crystal_ext.model.attention_registration import register_dual_path_attention
from crystal_ext.model.transformers_support import transformers_problem
from crystal_ext.ops import extension_available, extension_error
from crystal_ext.training.evaluation import evaluate_held_out, headline
from crystal_ext.training.run_config import held_out_data, make_packer, read_run_config
from crystal_ext.training.run_loading import load_trained, merge


def held_out_set(args, config: dict):
    """The held-out set to evaluate, or None for a merge alone. ValueError says what is missing."""
    wanted = args.data is not None or args.eval_examples is not None or not args.merge
    if not wanted or args.eval_examples == 0:
        return None
    if args.data is not None:
        from crystal_ext.training.arguments import check_data_available

        check_data_available("--data", args.data)
    dataset = held_out_data(config, args.data, args.eval_examples, flag="--data")
    if dataset is None:
        raise ValueError(
            "this run trained on --data without --eval_data: pass --data HELD_OUT_FILE "
            "(or only --merge DIR to write the merged model without evaluating)"
        )
    return dataset


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crystal_ext.evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="output folder (or checkpoint) of crystal_ext.train")
    p.add_argument(
        "--data",
        help="held-out data, in any --data format of crystal_ext.train (default: the run's held-out set)",
    )
    p.add_argument(
        "--eval_examples", type=int, help="evaluate only the first N held-out examples (0: no evaluation)"
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--merge",
        metavar="DIR",
        help="write the merged stock model to DIR; alone it only merges (add --data or --eval_examples N "
        "to evaluate as well)",
    )
    p.add_argument(
        "--no_latent_carried",
        action="store_true",
        help="skip the latent-carried accuracy and the attention KL (they run dual-path forwards)",
    )
    p.add_argument("--output", help="where to write the results JSON (default: MODEL/eval_results.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    command = parser()
    args = command.parse_args(argv)
    problem = transformers_problem()
    if problem is not None:
        command.error(problem)
    if args.eval_examples is not None and args.eval_examples < 0:
        command.error(f"--eval_examples must be >= 0, got {args.eval_examples}")
    if args.eval_examples == 0 and not args.merge:
        command.error("--eval_examples 0 evaluates nothing: give --merge DIR, or more examples")
    try:  # the data is checked before the model is loaded
        dataset = held_out_set(args, read_run_config(args.model))
        model, processor, config = load_trained(args.model)
    except (ValueError, OSError) as exc:
        command.error(str(exc))
    if dataset is not None:
        evaluate(model, processor, config, dataset, args)
    if args.merge:
        print(f"merged model: {merge(model.cpu(), processor, args.merge)}")
    return 0


def evaluate(model, processor, config: dict, dataset, args) -> dict:
    """The held-out evaluation with the run's settings; the results JSON written, the headline printed."""
    if torch.cuda.is_available():
        model.to("cuda")
    packer = None
    if not args.no_latent_carried:
        if extension_available():
            register_dual_path_attention()
            packer = make_packer(config, processor, None, model)
        else:
            print(
                f"latent-carried evaluation skipped: the compiled extension is missing ({extension_error()})",
                file=sys.stderr,
            )
    result = evaluate_held_out(config, model, processor, dataset, packer, batch_size=args.batch_size)
    output = args.output or os.path.join(args.model, "eval_results.json")
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"held-out accuracy: {headline(result)} ({result['n']} examples) -> {output}")
    return result


if __name__ == "__main__":
    sys.exit(main())

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
import warnings

import torch

from crystal_ext.data.chat import generation_prompt, turn_end
from crystal_ext.data.example import SkipExample
from crystal_ext.model.attention_registration import register_dual_path_attention
from crystal_ext.ops import extension_available, extension_error
from crystal_ext.training import latent_carried
from crystal_ext.training.run_config import evaluation_settings, held_out_data, make_packer, read_run_config


def _normalise(tokenizer, text: str) -> str:
    # Decode(encode(text)) so gold and generated answers go through the same detokeniser.
    return (
        tokenizer.decode(tokenizer(str(text), add_special_tokens=False).input_ids, skip_special_tokens=True)
        .strip()
        .lower()
    )


def extract_answer(tokenizer, ids: list[int]) -> str | None:
    """The text between <answer> and </answer> (or the end of the turn) in generated ids, normalised.

    Special tokens inside the answer are kept in the text, so an answer such as
    `<answer><|latent_5|> horizontal</answer>` does not count as "horizontal": exact match means
    the model wrote the answer and nothing else (decoding with skip_special_tokens=True would drop
    a stray latent token and give the model a second try, which teacher-forced accuracy does not)."""
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<answer>", "</answer>"])
    if open_id not in ids:
        return None
    ids = ids[ids.index(open_id) + 1 :]
    if close_id in ids:
        ids = ids[: ids.index(close_id)]
    else:  # cut off: the answer ends with the turn (<|im_end|>) or the batch padding after it
        ends = {
            end_of_turn_id(tokenizer),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        } - {None}
        ids = ids[: next((i for i, t in enumerate(ids) if t in ends), len(ids))]
    return tokenizer.decode(ids, skip_special_tokens=False).strip().lower()


def end_of_turn_id(tokenizer_or_processor) -> int | None:
    """The token the chat template ends an assistant turn with (e.g. <|im_end|>)."""
    tok = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    try:
        text = turn_end(tokenizer_or_processor)
    except ValueError:
        return tok.eos_token_id
    ids = tok(text, add_special_tokens=False).input_ids
    return ids[0] if ids else tok.eos_token_id


@torch.no_grad()
def generate_answers(
    model,
    processor,
    images,
    questions,
    system: str | None,
    max_new_tokens: int,
    examples=None,
    template_kwargs: dict | None = None,
) -> list[list[int]]:
    """Greedy answers; `images[i]` is one image or the list of an example's images; the prompt is
    training's (crystal_ext.data.chat.generation_prompt) over `examples[i]`'s turns (default: one
    image, `questions[i]`)."""
    from crystal_ext.data.example import Example

    tok = processor.tokenizer
    if examples is None:
        examples = [Example(str(i), im, q, None) for i, (im, q) in enumerate(zip(images, questions))]
    side = tok.padding_side
    tok.padding_side = "left"  # batched greedy decoding continues every row at its real end
    try:
        inputs = processor(
            text=[generation_prompt(processor, e, system, template_kwargs) for e in examples],
            images=[im if isinstance(im, list) else [im] for im in images],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
    finally:
        tok.padding_side = side
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=end_of_turn_id(processor),
    )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def evaluate_model(
    model,
    processor,
    dataset,
    *,
    system: str | None,
    image_size: int | None,
    num_latent_tokens: int,
    blur_radius=(2.0, 5.0),
    seed: int = 0,
    batch_size: int = 32,
    max_answer_tokens: int = 32,
    progress: bool = True,
    packer=None,
    template_kwargs: dict | None = None,
) -> dict:
    """Accuracy on the intact and on blurred images of `dataset` (Examples); greedy, intact path.

    With a `packer` (the run's DualPathPacker: its corruption, seed and think block) also the
    latent-carried accuracy and the mean held-out attention KL (`attention_kl`); an example whose
    latent-carried answer the packer could not use has `latent_carried` None (wrong) and is counted
    in `latent_carried_unpacked`. Every example record holds each answer given (`intact`,
    `blurred`, `latent_carried`) and whether it is right (`intact_correct`, ...). The prompt is
    training's: `system` and `template_kwargs` as the run's packer has them."""
    from PIL import Image

    from crystal_ext.data.corruption import CorruptionConfig, corrupt
    from crystal_ext.data.images import open_image
    from crystal_ext.data.packing import corruption_key

    def _load(source, size):
        image = open_image(source)
        return image if size is None else image.resize((size, size), Image.BICUBIC)

    def _loaded(example):
        """The example's intact images, or None (recorded in `skipped`, warned about) when it
        cannot be evaluated."""
        reason = None
        if example.image is None or example.answer is None:
            reason = "no image" if example.image is None else "no answer"
        else:
            try:
                return [_load(source, image_size) for source in example.images]
            except SkipExample as exc:
                reason = str(exc)
        where = getattr(example, "where", None)
        skipped.append({"key": example.key, "where": where, "reason": reason})
        warnings.warn(
            f"crystal_ext: evaluation skips example {example.key!r}{f' ({where})' if where else ''}: {reason}",
            stacklevel=3,
        )
        return None

    blur = CorruptionConfig(kind="blur", blur_radius=tuple(blur_radius))
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    names = ("intact", "blurred") + (("latent_carried",) if packer is not None else ())
    results = {name: [] for name in names}
    records, skipped = [], []
    kl_sum, kl_count = 0.0, 0
    # think open/close + K latents + <answer> ... </answer> + <|im_end|>
    max_new = num_latent_tokens + 2 + max_answer_tokens + 3
    n = len(dataset)
    try:
        for start in range(0, n, batch_size):
            loaded = [(e, _loaded(e)) for e in (dataset[i] for i in range(start, min(n, start + batch_size)))]
            exs = [e for e, images in loaded if images is not None]
            intact = [images for _, images in loaded if images is not None]
            if not exs:
                continue
            blurred = [
                [corrupt(im, blur, seed, corruption_key(e.key, i, len(ims))) for i, im in enumerate(ims)]
                for ims, e in zip(intact, exs)
            ]
            questions = [e.question for e in exs]
            got = {}
            for name, images in (("intact", intact), ("blurred", blurred)):
                outs = generate_answers(
                    model,
                    processor,
                    images,
                    questions,
                    system,
                    max_new,
                    examples=exs,
                    template_kwargs=template_kwargs,
                )
                got[name] = [extract_answer(tok, o) for o in outs]
            if packer is not None:
                got["latent_carried"] = latent_carried.latent_carried_answers(
                    model, packer, exs, tok, max_answer_tokens
                )
                kl_sum += latent_carried.held_out_attention_kl(model, packer, exs, tok) * len(exs)
                kl_count += len(exs)
            for i, e in enumerate(exs):
                gold = _normalise(tok, e.answer)
                row = {"key": e.key, "answer": gold}
                for name in results:
                    results[name].append(got[name][i] == gold)
                    row[name] = got[name][i]
                    row[f"{name}_correct"] = got[name][i] == gold
                records.append(row)
            if progress:
                print(f"evaluate: {len(records) + len(skipped)}/{n}", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    count = len(records)
    summary = {"n": count, **{f"accuracy_{name}": sum(results[name]) / max(count, 1) for name in names}}
    if packer is not None:
        summary["attention_kl"] = kl_sum / kl_count if kl_count else float("nan")
        summary["latent_carried_unpacked"] = sum(r["latent_carried"] is None for r in records)
        summary["corruption"] = packer.corruption.kind
    return {**summary, "blur_radius": list(blur_radius), "examples": records, "skipped": skipped}


def headline(result: dict) -> str:
    """The accuracies (and attention KL) of an evaluate_model result as one line."""
    parts = [f"intact {result['accuracy_intact']:.3f}", f"blurred {result['accuracy_blurred']:.3f}"]
    if "accuracy_latent_carried" in result:
        parts += [
            f"latent-carried {result['accuracy_latent_carried']:.3f}",
            f"attention KL {result['attention_kl']:.4f}",
        ]
        if result.get("latent_carried_unpacked"):
            parts[-2] += f" ({result['latent_carried_unpacked']} could not be packed)"
    line = ", ".join(parts)
    if result.get("skipped"):
        line += f" ({len(result['skipped'])} examples skipped, each named in eval_results.json)"
    return line


# ---- loading what crystal_ext.train wrote ----------------------------------------------------


def load_trained(folder: str, dtype=torch.float32):
    """(model, processor, run config) of an output folder or checkpoint of crystal_ext.train.
    A LoRA run gives a peft model (base + adapter + trained token rows)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = read_run_config(folder)
    processor = AutoProcessor.from_pretrained(folder)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from peft import PeftModel

        from crystal_ext.training.token_rows import load_token_rows

        base_path = config["base_model"]
        if not os.path.isabs(base_path) and os.path.isdir(os.path.join(config["output_dir_abs"], base_path)):
            base_path = os.path.join(config["output_dir_abs"], base_path)
        base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype, attn_implementation="sdpa")
        if len(processor.tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(base, folder)
        if not load_token_rows(model, folder):
            raise ValueError(
                f"{folder}: LoRA output without its token rows ({'crystal_token_rows.safetensors'})"
            )
    else:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), processor, config


def merge(model, processor, folder: str) -> str:
    """Write a stock model (LoRA folded in) that plain from_pretrained loads."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.set_attn_implementation("sdpa")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _held_out(args, config: dict):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crystal_ext.evaluate", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--model", required=True, help="output folder (or checkpoint) of crystal_ext.train")
    parser.add_argument(
        "--data",
        help="held-out data, in any --data format of crystal_ext.train (default: the run's held-out set)",
    )
    parser.add_argument(
        "--eval_examples", type=int, help="evaluate only the first N held-out examples (0: no evaluation)"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--merge",
        metavar="DIR",
        help="write the merged stock model to DIR; alone it only merges (add --data or --eval_examples N "
        "to evaluate as well)",
    )
    parser.add_argument(
        "--no_latent_carried",
        action="store_true",
        help="skip the latent-carried accuracy and the attention KL (they run dual-path forwards)",
    )
    parser.add_argument("--output", help="where to write the results JSON (default: MODEL/eval_results.json)")
    args = parser.parse_args(argv)
    if args.eval_examples is not None and args.eval_examples < 0:
        parser.error(f"--eval_examples must be >= 0, got {args.eval_examples}")
    if args.eval_examples == 0 and not args.merge:
        parser.error("--eval_examples 0 evaluates nothing: give --merge DIR, or more examples")
    try:  # the data is checked before the model is loaded
        dataset = _held_out(args, read_run_config(args.model))
        model, processor, config = load_trained(args.model)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if dataset is not None:
        evaluate(model, processor, config, dataset, args)
    if args.merge:
        print(f"merged model: {merge(model.cpu(), processor, args.merge)}")
    return 0


def evaluate(model, processor, config: dict, dataset, args) -> dict:
    """evaluate_model with the run's settings; the results JSON written, the headline printed."""
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
    result = evaluate_model(
        model, processor, dataset, **evaluation_settings(config), batch_size=args.batch_size, packer=packer
    )
    output = args.output or os.path.join(args.model, "eval_results.json")
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"held-out accuracy: {headline(result)} ({result['n']} examples) -> {output}")
    return result


if __name__ == "__main__":
    sys.exit(main())

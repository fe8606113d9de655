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
`<ModelClass>.from_pretrained(DIR)` loads it with no crystal_ext or peft code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from crystal_ext.data.chat import generation_prompt, parse_template_kwargs, turn_end
from crystal_ext.model.attention_registration import register_dual_path_attention
from crystal_ext.ops import extension_available, extension_error
from crystal_ext.training import latent_carried

CONFIG_FILE = "crystal_config.json"


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
    from crystal_ext.data.packing import corruption_key

    def _load(source, size):
        image = (source if isinstance(source, Image.Image) else Image.open(source)).convert("RGB")
        return image if size is None else image.resize((size, size), Image.BICUBIC)

    blur = CorruptionConfig(kind="blur", blur_radius=tuple(blur_radius))
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    names = ("intact", "blurred") + (("latent_carried",) if packer is not None else ())
    results = {name: [] for name in names}
    records = []
    kl_sum, kl_count = 0.0, 0
    # think open/close + K latents + <answer> ... </answer> + <|im_end|>
    max_new = num_latent_tokens + 2 + max_answer_tokens + 3
    n = len(dataset)
    try:
        for start in range(0, n, batch_size):
            exs = [dataset[i] for i in range(start, min(n, start + batch_size))]
            exs = [e for e in exs if e.image is not None and e.answer is not None]
            if not exs:
                continue
            intact = [[_load(source, image_size) for source in e.images] for e in exs]
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
                print(f"evaluate: {len(records)}/{n}", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    count = len(records)
    summary = {"n": count, **{f"accuracy_{name}": sum(results[name]) / max(count, 1) for name in names}}
    if packer is not None:
        summary["attention_kl"] = kl_sum / kl_count if kl_count else float("nan")
        summary["latent_carried_unpacked"] = sum(r["latent_carried"] is None for r in records)
        summary["corruption"] = packer.corruption.kind
    return {**summary, "blur_radius": list(blur_radius), "examples": records}


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
    return ", ".join(parts)


def run_packer(model, processor, config: dict):
    """The DualPathPacker of a crystal_ext.train run (its corruption, seed, image size, think block),
    for the latent-carried evaluation of the trained model."""
    from crystal_ext.data.corruption import CorruptionConfig
    from crystal_ext.data.packing import DualPathPacker
    from crystal_ext.model.latent_tokens import add_latent_tokens

    # The tokenizer already holds the tokens: this only reads their ids.
    latent = add_latent_tokens(processor.tokenizer, None, k=config["num_latent_tokens"])
    corruption = CorruptionConfig(
        kind=config["corruption"], blur_radius=(config["blur_radius_min"], config["blur_radius_max"])
    )
    return DualPathPacker(
        processor,
        latent,
        model,
        corruption,
        seed=config["seed"],
        image_size=config["image_size"],
        max_length=config["max_length"],
        system=config["system_prompt"],
        template_kwargs=parse_template_kwargs(config.get("chat_template_kwargs")),
    )


# ---- loading what crystal_ext.train wrote ----------------------------------------------------


def read_run_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        # A checkpoint folder: the run's config sits in the output folder above it.
        path = os.path.join(os.path.dirname(os.path.abspath(folder)), CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder}: no {CONFIG_FILE} here or in the folder above (not written by crystal_ext.train)"
        )
    with open(path) as f:
        return json.load(f)


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


def eval_dataset(config: dict, data: str | None, n: int | None):
    from crystal_ext.data.records import check_dataset, load_examples
    from crystal_ext.data.synthetic import SyntheticVQA

    data = data or config.get("eval_data")
    if data:
        ds = load_examples(data, config.get("image_folder"), split="test" if os.path.isdir(data) else "train")
        if n is not None and n < len(ds):
            ds.records = ds.records[:n] if isinstance(ds.records, list) else ds.records.select(range(n))
        check_dataset(ds, "--data")
        return ds
    if config.get("data"):
        raise ValueError("this run trained on --data without --eval_data: pass --data HELD_OUT_FILE")
    return SyntheticVQA(
        n if n is not None else config["eval_examples"],
        "test",
        seed=config["data_seed"],
        task=config["task"],
        image_size=config["image_size"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crystal_ext.evaluate", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--model", required=True, help="output folder (or checkpoint) of crystal_ext.train")
    parser.add_argument("--data", help="held-out data (default: the run's held-out set)")
    parser.add_argument("--eval_examples", type=int, help="evaluate only the first N held-out examples")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--merge", metavar="DIR", help="also write the merged stock model to DIR")
    parser.add_argument(
        "--no_latent_carried",
        action="store_true",
        help="skip the latent-carried accuracy and the attention KL (they run dual-path forwards)",
    )
    parser.add_argument("--output", help="where to write the results JSON (default: MODEL/eval_results.json)")
    args = parser.parse_args(argv)
    try:
        model, processor, config = load_trained(args.model)
        dataset = eval_dataset(config, args.data, args.eval_examples)
    except ValueError as exc:
        parser.error(str(exc))
    if torch.cuda.is_available():
        model.to("cuda")
    packer = None
    if not args.no_latent_carried:
        if extension_available():
            register_dual_path_attention()
            packer = run_packer(model, processor, config)
        else:
            print(
                f"latent-carried evaluation skipped: the compiled extension is missing ({extension_error()})",
                file=sys.stderr,
            )
    result = evaluate_model(
        model,
        processor,
        dataset,
        system=config["system_prompt"],
        template_kwargs=parse_template_kwargs(config.get("chat_template_kwargs")),
        image_size=config["image_size"],
        num_latent_tokens=config["num_latent_tokens"],
        blur_radius=(config["blur_radius_min"], config["blur_radius_max"]),
        seed=config["seed"],
        batch_size=args.batch_size,
        packer=packer,
    )
    output = args.output or os.path.join(args.model, "eval_results.json")
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"held-out accuracy: {headline(result)} ({result['n']} examples) -> {output}")
    if args.merge:
        print(f"merged model: {merge(model.cpu(), processor, args.merge)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

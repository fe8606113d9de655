"""Held-out accuracy, the way CrystaL is used at inference (docs/method.md): greedy answers on the
intact path of the stock model (crystal_ext.training.generation), exact match of the answer text
(crystal_ext.training.answers), once on the intact images and once on blurred copies (radius
U(blur_radius_min, blur_radius_max), seeded per example as in training).

What the latents carry (crystal_ext.training.latent_carried): with the run's packer also the
latent-carried accuracy, the corrupted path answering from the run's corrupted image and the intact
path's latent block, and the mean answer->latent attention KL between the two paths, gold answers
teacher-forced.

A held-out example whose image cannot be read is skipped with a warning naming it and listed under
`skipped` in the results. `evaluate_held_out` runs this with a run's own settings
(crystal_ext.training.run_config), for crystal_ext.train and crystal_ext.evaluate alike.
"""

from __future__ import annotations

import sys
import warnings

from crystal_ext.data.corruption import CorruptionConfig
from crystal_ext.data.example import SkipExample
from crystal_ext.data.images import ExampleImages
from crystal_ext.ops import extension_available
from crystal_ext.training import latent_carried
from crystal_ext.training.answers import extract_answer, normalise_answer
from crystal_ext.training.generation import generate_answers
from crystal_ext.training.run_config import evaluation_settings


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
    alignment_layer: str = "last",
) -> dict:
    """Accuracy on the intact and on blurred images of `dataset` (Examples); greedy, intact path.

    With a `packer` (the run's DualPathPacker: its corruption, seed and think block) also the
    latent-carried accuracy and the mean held-out attention KL (`attention_kl`); an example whose
    latent-carried answer the packer could not use has `latent_carried` None (wrong) and is counted
    in `latent_carried_unpacked`. Every example record holds each answer given (`intact`,
    `blurred`, `latent_carried`) and whether it is right (`intact_correct`, ...). The prompt is
    training's: `system` and `template_kwargs` as the run's packer has them; the attention KL is read
    at the run's `alignment_layer` (crystal_ext.model.alignment_layer)."""
    images = ExampleImages(image_size, CorruptionConfig(kind="blur", blur_radius=tuple(blur_radius)), seed)
    names = ("intact", "blurred") + (("latent_carried",) if packer is not None else ())
    scores = _Scores(names, processor.tokenizer)
    answering = {
        "system": system,
        "template_kwargs": template_kwargs,
        # think open/close + K latents + <answer> ... </answer> + <|im_end|>
        "max_new": num_latent_tokens + 2 + max_answer_tokens + 3,
        "max_answer_tokens": max_answer_tokens,
        "packer": packer,
        "alignment_layer": alignment_layer,
    }
    n = len(dataset)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            batch = [dataset[i] for i in range(start, min(n, start + batch_size))]
            if _score_batch(model, processor, batch, images, answering, scores) and progress:
                print(f"evaluate: {scores.seen}/{n}", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    return scores.result(packer, blur_radius)


def _score_batch(model, processor, batch: list, images: ExampleImages, answering: dict, scores) -> bool:
    """Answers `batch`'s examples on intact and blurred images (and, with the run's packer,
    latent-carried) into `scores`; False when every example of it was skipped."""
    loaded = [(e, _intact_images(e, images, scores.skipped)) for e in batch]
    exs = [e for e, intact in loaded if intact is not None]
    if not exs:
        return False
    intact = [intact for _, intact in loaded if intact is not None]
    blurred = [images.corrupted(e, ims) for ims, e in zip(intact, exs)]
    got = {
        "intact": _greedy_answers(model, processor, intact, exs, answering),
        "blurred": _greedy_answers(model, processor, blurred, exs, answering),
    }
    packer = answering["packer"]
    if packer is not None:
        layer = answering["alignment_layer"]
        got["latent_carried"] = latent_carried.latent_carried_answers(
            model, packer, exs, processor.tokenizer, answering["max_answer_tokens"], alignment_layer=layer
        )
        kl = latent_carried.held_out_attention_kl(
            model, packer, exs, processor.tokenizer, alignment_layer=layer
        )
        scores.add_attention_kl(kl, len(exs))
    scores.add(exs, got)
    return True


def _intact_images(example, images: ExampleImages, skipped: list) -> list | None:
    """The example's intact images, or None (recorded in `skipped`, warned about) when it cannot be
    evaluated."""
    reason = None
    if example.image is None or example.answer is None:
        reason = "no image" if example.image is None else "no answer"
    else:
        try:
            return images.intact(example)
        except SkipExample as exc:
            reason = str(exc)
    where = getattr(example, "where", None)
    skipped.append({"key": example.key, "where": where, "reason": reason})
    warnings.warn(
        f"crystal_ext: evaluation skips example {example.key!r}{f' ({where})' if where else ''}: {reason}",
        stacklevel=4,
    )
    return None


def _greedy_answers(model, processor, images, examples, answering: dict) -> list[str | None]:
    outs = generate_answers(
        model,
        processor,
        images,
        [e.question for e in examples],
        answering["system"],
        answering["max_new"],
        examples=examples,
        template_kwargs=answering["template_kwargs"],
    )
    return [extract_answer(processor.tokenizer, o) for o in outs]


class _Scores:
    """The answers of every evaluated example against its gold answer, the skipped examples, and
    the running attention KL."""

    def __init__(self, names: tuple[str, ...], tokenizer):
        self.names, self.tokenizer = names, tokenizer
        self.correct = {name: [] for name in names}
        self.records, self.skipped = [], []
        self.kl_sum, self.kl_count = 0.0, 0

    @property
    def seen(self) -> int:
        return len(self.records) + len(self.skipped)

    def add_attention_kl(self, mean_kl: float, count: int) -> None:
        self.kl_sum += mean_kl * count
        self.kl_count += count

    def add(self, examples: list, got: dict) -> None:
        for i, e in enumerate(examples):
            gold = normalise_answer(self.tokenizer, e.answer)
            row = {"key": e.key, "answer": gold}
            for name in self.names:
                self.correct[name].append(got[name][i] == gold)
                row[name] = got[name][i]
                row[f"{name}_correct"] = got[name][i] == gold
            self.records.append(row)

    def result(self, packer, blur_radius) -> dict:
        count = len(self.records)
        accuracies = {f"accuracy_{name}": sum(self.correct[name]) / max(count, 1) for name in self.names}
        summary = {"n": count, **accuracies}
        if packer is not None:
            summary["attention_kl"] = self.kl_sum / self.kl_count if self.kl_count else float("nan")
            summary["latent_carried_unpacked"] = sum(r["latent_carried"] is None for r in self.records)
            summary["corruption"] = packer.images.corruption.kind
        return {
            **summary,
            "blur_radius": list(blur_radius),
            "examples": self.records,
            "skipped": self.skipped,
        }


def evaluate_held_out(config: dict, model, processor, held_out, packer=None, **options) -> dict:
    """evaluate_model with the run's settings (crystal_ext.training.run_config); the latent-carried
    accuracy and attention KL only with the run's packer and the compiled extension (the dual-path
    forward's alignment loss). `options`: evaluate_model's batch_size, progress."""
    packer = packer if extension_available() else None
    return evaluate_model(model, processor, held_out, **evaluation_settings(config), packer=packer, **options)


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

"""`python -m crystal_ext.train [options]`: CrystaL training on a stock transformers VLM.

With no arguments it trains the embedded tiny Qwen2.5-VL on the synthetic task (offline, two
CPU cores, a few minutes) and writes to outputs/crystal-tiny:
  checkpoint-N/                 Trainer checkpoints (complete ones carry crystal_checkpoint_complete.json)
  model.safetensors, config.json, tokenizer/processor files   the final model (stock from_pretrained)
  base_model/                   a LoRA run of the tiny model only: the random base the adapter loads on
  adapter_*, crystal_token_rows.safetensors   a LoRA run: the adapter and the new tokens' trained rows
  crystal_config.json           the run's settings (training/run_config.py; read by crystal_ext.evaluate)
  metrics.jsonl                 every log record (loss, ce, kl_pred, kl_attn, lr, ...; with
                                --eval_strategy steps the eval_* accuracies and attention KL)
  tensorboard/                  TensorBoard event files
  eval_results.json             held-out accuracy (intact and blurred images, greedy, intact path;
                                latent-carried: the corrupted path answering from the latents),
                                and the held-out examples skipped (unreadable image) by name
  pictures/attention_*.png      answer->latent and latent->image attention maps, the answers given
Everything transformers' Trainer offers (gradient accumulation, bf16, gradient checkpointing,
torchrun DDP, FSDP, DeepSpeed, --resume_from_checkpoint, --report_to) is a TrainingArguments
flag; see docs/training.md, and `--help` for all options.

A record that cannot be used is named (file:line) and left out, in training and evaluation alike;
with --overwrite_output_dir the earlier run's outputs are removed only after every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch
from transformers import set_seed

from crystal_ext.data.example import SkipExample
from crystal_ext.data.packing import DualPathCollator
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.latent_tokens import add_latent_tokens
from crystal_ext.model.lora import apply_lora
from crystal_ext.model.new_token_rows import attach_new_token_rows
from crystal_ext.model.parts import unwrap_distributed, unwrap_peft
from crystal_ext.model.runtime_fusions import without_fusion_config
from crystal_ext.model.transformers_support import transformers_problem
from crystal_ext.ops import extension_available, extension_error
from crystal_ext.training.arguments import parse_args
from crystal_ext.training.callbacks import JsonlMetricsCallback, TimeBudgetCallback
from crystal_ext.training.checkpoints import checkpoint_step
from crystal_ext.training.evaluation import evaluate_held_out, headline
from crystal_ext.training.run_config import (
    held_out_data,
    make_packer,
    run_config,
    training_data,
    write_run_config,
)
from crystal_ext.training.trainer import CrystalTrainer

# What --overwrite_output_dir removes of an earlier run (with its checkpoint-N folders), once every
# check of the new run has passed: the outputs a new run would not all rewrite. An earlier LoRA
# run's adapter beside a new full model would make crystal_ext.evaluate load the old adapter.
RUN_OUTPUTS = (
    "metrics.jsonl",
    "tensorboard",
    "pictures",
    "eval_results.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "crystal_token_rows.safetensors",
)


class _SkipAwareCollator:
    """DualPathCollator, with an all-skipped batch turned into {"empty": True} (the Trainer
    cannot take None; CrystalTrainer.compute_loss turns it into a zero step)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        return {"empty": True, "skipped": len(examples)} if batch is None else batch


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log(msg: str) -> None:
    if _is_main():
        print(f"crystal_ext.train: {msg}", flush=True)


def _fail(msg: str) -> None:
    print(f"crystal_ext.train: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_kernels(cargs) -> None:
    """The fused ops need the compiled extension; say so before any model is built."""
    needs_fused = not cargs.no_crystal or cargs.lm_head_losses == "fused"
    if needs_fused and not extension_available():
        _fail(
            f"the compiled extension is missing ({extension_error()}); rebuild it, or pass "
            "--lm_head_losses reference --no_crystal to train the baseline with the plain-PyTorch reference"
        )


def clear_previous_run(cargs, targs) -> None:
    """With --overwrite_output_dir (and no resume): remove an earlier run's checkpoints and outputs.
    Called only after every check (arguments, data, model, processor) has passed, so a run that
    stops on bad input leaves the earlier run as it was."""
    out = targs.output_dir
    fresh_overwrite = cargs.overwrite_output_dir and targs.resume_from_checkpoint is None
    if fresh_overwrite and _is_main() and os.path.isdir(out):
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name.startswith("checkpoint-") or name in RUN_OUTPUTS:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)


def run_objective_check(cargs, targs, model, packer, train_set) -> None:
    """The run-time proof (crystal_ext.training.objective_check) on the model's training device;
    a failure stops the run with status 2 before any optimizer step."""
    from crystal_ext.training.objective_check import ObjectiveCheckFailed, check_objective

    if targs.device.type == "cuda":
        model.to(targs.device)  # where the Trainer would put it; the check runs at the run's shapes there
    try:
        report = check_objective(model, packer, train_set, cargs.objective(), cargs.objective_check_examples)
    except ObjectiveCheckFailed as exc:
        _fail(
            f"{exc}\nthe run stopped before training: no optimizer step was taken and nothing of a "
            f"previous run in {targs.output_dir} was deleted (--skip_objective_check skips this check)"
        )
    _log(report.summary().removeprefix("crystal_ext.check: "))


def build_model(cargs, targs):
    """(model, processor, latent tokens) with the latent tokens added."""
    if cargs.tiny:
        from crystal_ext.training.tiny_model import tiny_model, tiny_processor, tiny_tokenizer

        tok = tiny_tokenizer()
        latent = add_latent_tokens(tok, None, k=cargs.num_latent_tokens)  # before the model: sized to fit
        return tiny_model(tok, seed=targs.seed), tiny_processor(tok, cargs.image_size), latent
    from transformers import AutoConfig, AutoProcessor

    from crystal_ext.model.alignment_layer import alignment_layer_index
    from crystal_ext.model.families import UnsupportedModel, family_of
    from crystal_ext.model.runtime_fusions import load_pretrained

    try:  # refused before any weight is loaded
        config = AutoConfig.from_pretrained(cargs.model)
        family_of(config)
        if not cargs.no_crystal:
            alignment_layer_index(config, cargs.alignment_layer)
    except UnsupportedModel as exc:
        _fail(f"--model {cargs.model}: {exc}")
    # Mixed precision keeps fp32 master weights only if the model is loaded in fp32; with bf16
    # on a GPU the published recipe trains LoRA on bf16 weights (the adapter itself stays fp32).
    dtype = torch.bfloat16 if targs.bf16 else torch.float16 if targs.fp16 else torch.float32
    processor = AutoProcessor.from_pretrained(cargs.model)
    model = load_pretrained(cargs.model, dtype)
    latent = add_latent_tokens(processor.tokenizer, model, k=cargs.num_latent_tokens)
    return model, processor, latent


def make_trainable(model, latent, cargs, targs):
    """(model, no_decay): the dual-path attention switched on, and LoRA with the new tokens' rows
    (own [n_new, Hd] parameters over the frozen embedding and head, kept out of weight decay) when
    asked; otherwise every parameter trains."""
    if base_model_folder(cargs) == TINY_BASE_MODEL and _is_main():
        # LoRA on the tiny model (tests, experiments): its random base must be kept to load the adapter.
        model.save_pretrained(os.path.join(targs.output_dir, TINY_BASE_MODEL))
    if not cargs.no_crystal:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    no_decay = ()
    if cargs.use_lora:
        model = apply_lora(model, r=cargs.lora_r, alpha=cargs.lora_alpha, dropout=cargs.lora_dropout)
        no_decay = tuple(attach_new_token_rows(model, latent.new_ids).parameters())
        if targs.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trained"
        f"{' (LoRA)' if cargs.use_lora else ''}; objective: {'SFT baseline' if cargs.no_crystal else 'CrystaL'}"
    )
    return model, no_decay


TINY_BASE_MODEL = "base_model"


def base_model_folder(cargs) -> str | None:
    """Where a LoRA run's base model is: --model, or the tiny model's random base saved in the
    output folder."""
    return TINY_BASE_MODEL if cargs.tiny and cargs.use_lora else cargs.model


def build_datasets(config: dict):
    """(training set, held-out set or None), each checked (ValueError naming the flag)."""
    train = training_data(config)
    report = getattr(train, "report", None)
    if report:
        _log(f"--data: {report['usable']} of {report['records']} records usable, {report['skipped']} skipped")
    held_out = held_out_data(config)
    report = getattr(held_out, "report", None)
    if report:
        _log(
            f"--eval_data: {report['usable']} of {report['records']} records usable, {report['skipped']} skipped"
        )
    return train, held_out


EVAL_METRICS = ("accuracy_intact", "accuracy_blurred", "accuracy_latent_carried", "attention_kl")


def make_evaluator(config: dict, processor, packer, held_out):
    """fn(model) -> the held-out accuracies and attention KL, for CrystalTrainer's evaluate()
    (run at every --eval_steps with --eval_strategy steps; logged as eval_<name>)."""

    def evaluator(model) -> dict:
        result = evaluate_held_out(config, model, processor, held_out, packer, progress=False)
        return {k: result[k] for k in EVAL_METRICS if k in result}

    return evaluator


def train(
    config, cargs, targs, model, processor, packer, train_set, no_decay, extra_callbacks, held_out=None
):
    """(trained model, summary) of one Trainer run; the final model is saved at the top of the output folder."""
    out = targs.output_dir
    evaluating = targs.eval_strategy not in (None, "no") and held_out is not None and len(held_out) > 0
    budget = TimeBudgetCallback(cargs.max_train_minutes) if cargs.max_train_minutes else None
    callbacks = [JsonlMetricsCallback(os.path.join(out, "metrics.jsonl"))] + ([budget] if budget else [])
    collator = _SkipAwareCollator(DualPathCollator(packer, processor.tokenizer.pad_token_id))
    trainer = CrystalTrainer(
        model=model,
        args=targs,
        train_dataset=train_set,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks + list(extra_callbacks or ()),
        objective=cargs.objective(),
        no_decay=no_decay,
        eval_dataset=held_out if evaluating else None,
        evaluator=make_evaluator(config, processor, packer, held_out) if evaluating else None,
        alignment_warmup_steps=round(cargs.alignment_warmup_ratio * max(targs.max_steps, 0)),
    )
    if targs.resume_from_checkpoint:
        _log(f"resuming from {targs.resume_from_checkpoint}")
    result = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    # The final model at the top of the output folder, with the stock config.json: the fusion is how
    # crystal_ext loads a model, not part of the model (checkpoints keep it: the resume reloads
    # them fused, to match the fused model it loads them into).
    with without_fusion_config(unwrap_peft(unwrap_distributed(trainer.model))):
        trainer.save_model(out)
    history = trainer.state.log_history
    return trainer.model, {
        "output_dir": out,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": result.metrics.get("train_runtime"),
        "stopped_by_time_budget_at": budget.stopped_at if budget else None,
        "final_logged_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
    }


def evaluate_and_draw(config: dict, cargs, targs, model, processor, packer, held_out) -> dict:
    """Held-out accuracy (eval_results.json) and the attention pictures; main process only. An
    example that cannot be evaluated or drawn is skipped with a warning naming it."""
    out, summary = targs.output_dir, {}
    if held_out is None or not len(held_out):
        return summary
    _log(
        f"evaluating {len(held_out)} held-out examples (greedy; intact path on intact and blurred images, "
        "corrupted path from the latents)"
    )
    result = evaluate_held_out(config, model, processor, held_out, packer, progress=False)
    with open(os.path.join(out, "eval_results.json"), "w") as f:
        json.dump(result, f, indent=1)
    summary.update({k: result[k] for k in EVAL_METRICS if k in result})
    summary.update(
        eval_headline=headline(result),
        eval_examples=result["n"],
        eval_skipped=len(result["skipped"]),
        eval_results=os.path.join(out, "eval_results.json"),
    )
    if cargs.num_pictures:
        summary["pictures"] = draw_some_pictures(
            model, packer, held_out, result, cargs.num_pictures, out, cargs.alignment_layer
        )
    return summary


def draw_some_pictures(
    model, packer, held_out, result: dict, count: int, out: str, alignment_layer: str = "last"
) -> list[str]:
    """Pictures of the first `count` evaluated held-out examples, at the run's `alignment_layer`."""
    from crystal_ext.training.pictures import draw_example_picture

    answers = {r["key"]: r for r in result["examples"]}
    drawn = []
    for i in range(len(held_out)):
        if len(drawn) == count:
            break
        example = held_out[i]
        if example.key not in answers:  # skipped by the evaluation (warned there)
            continue
        path = os.path.join(out, "pictures", f"attention_{example.key}.png")
        try:
            drawn.append(
                draw_example_picture(model, packer, example, path, answers[example.key], alignment_layer)
            )
        except (SkipExample, ValueError) as exc:
            _log(f"warning: no picture of held-out example {example.key!r}: {exc}")
    return drawn


def main(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict:
    """Parse, train, evaluate, draw. Returns a summary dict (also printed). `extra_callbacks`
    are added to the Trainer (tests use them to stop or slow a run)."""
    started = time.monotonic()
    had_process_group = _process_group_up()
    problem = transformers_problem()
    if problem is not None:
        _fail(problem)
    try:
        cargs, targs = parse_args(argv)
    except ValueError as exc:
        _fail(str(exc))
    check_kernels(cargs)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(targs.output_dir, "tensorboard"))
    if cargs.cpu_threads:
        torch.set_num_threads(cargs.cpu_threads)
    register_dual_path_attention()
    config = run_config(cargs, targs, base_model_folder(cargs))

    try:  # the data is checked before any model is built
        train_set, held_out = build_datasets(config)
    except ValueError as exc:
        _fail(str(exc))
    _log(f"building {'the embedded tiny model' if cargs.tiny else cargs.model}")
    # Seeded before the model is built, not only in the Trainer: the LoRA A matrices and the new
    # tokens' rows are drawn here, and a run must be repeatable from its --seed.
    set_seed(targs.seed)
    try:
        model, processor, latent = build_model(cargs, targs)
    except (OSError, ValueError) as exc:  # e.g. no processor or chat template beside the weights
        _fail(f"--model {cargs.model}: {exc}")
    if cargs.tiny and cargs.data is not None:
        from crystal_ext.training.tiny_model import unknown_words

        bad, seen, words = unknown_words(processor.tokenizer, train_set)
        if bad:
            _log(
                f"warning: the embedded tiny model's word-level tokenizer does not know words of {bad} of "
                f"the first {seen} records (e.g. {', '.join(words)}): they become <unk>. Pass --model "
                "with a real model for real data."
            )
    try:
        packer = make_packer(config, processor, latent, model)
    except ValueError as exc:
        _fail(f"--model {cargs.model or '(embedded)'}: {exc}")
    model, no_decay = make_trainable(model, latent, cargs, targs)
    if not cargs.skip_objective_check:  # the run-time proof, before anything of a previous run is touched
        run_objective_check(cargs, targs, model, packer, train_set)
    # Every check has passed: only now may an earlier run's outputs go (--overwrite_output_dir).
    clear_previous_run(cargs, targs)
    if _is_main():
        write_run_config(config, targs.output_dir)

    model, summary = train(
        config, cargs, targs, model, processor, packer, train_set, no_decay, extra_callbacks, held_out
    )
    if not _is_main():
        _close_process_group(had_process_group)
        return summary
    summary.update(evaluate_and_draw(config, cargs, targs, model, processor, packer, held_out))
    out = targs.output_dir
    steps = sorted((checkpoint_step(n), n) for n in os.listdir(out) if checkpoint_step(n) is not None)
    summary["checkpoints"] = [os.path.join(out, n) for _, n in steps]  # by step: checkpoint-9 before -10
    report = getattr(train_set, "report", None)
    summary["skipped_records"] = report["skipped"] if report else 0
    if report:  # the data check's counts, next to the training log
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": summary["global_step"], "data_check": report}) + "\n")
    summary["metrics"] = os.path.join(out, "metrics.jsonl")
    summary["tensorboard"] = os.environ["TENSORBOARD_LOGGING_DIR"]
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    print_summary(summary)
    _close_process_group(had_process_group)
    return summary


def _process_group_up() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _close_process_group(had_one: bool) -> None:
    """Destroys the process group the run set up (torchrun: the Trainer's, through accelerate), on
    every rank once its work is done. Left alive, its gloo threads are torn down at interpreter
    exit, and a rank could abort there ("terminate called without an active exception", seen on
    rank 1 of a 2-process CPU run whose training had finished), so torchrun reported a failed
    run. A process group the caller had before main() is the caller's to close."""
    if not had_one and _process_group_up():
        torch.distributed.destroy_process_group()


def print_summary(s: dict) -> None:
    stopped = ", stopped by the time budget" if s.get("stopped_by_time_budget_at") else ""
    lines = ["", f"done in {s['wall_seconds']:.0f} s ({s['global_step']} steps{stopped})"]
    if s.get("skipped_records"):
        lines.append(f"skipped records: {s['skipped_records']} (each warned about before training)")
    if "accuracy_intact" in s:
        lines.append(f"held-out accuracy ({s['eval_examples']} examples, greedy): {s['eval_headline']}")
    lines += [
        f"final model:   {s['output_dir']}  (evaluate: python -m crystal_ext.evaluate --model {s['output_dir']})",
        f"checkpoints:   {', '.join(s['checkpoints']) or 'none'}",
        f"metrics log:   {s['metrics']}",
        f"tensorboard:   {s['tensorboard']}  (tensorboard --logdir {s['tensorboard']})",
    ]
    if "eval_results" in s:
        lines.append(f"evaluation:    {s['eval_results']}")
    if s.get("pictures"):
        lines.append(f"pictures:      {', '.join(s['pictures'])}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

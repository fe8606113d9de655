"""`python -m crystal_ext.train [options]`: CrystaL training on a stock transformers VLM.

With no arguments it trains the embedded tiny Qwen2.5-VL on the synthetic task (offline, two
CPU cores, a few minutes) and writes to outputs/crystal-tiny:
  checkpoint-N/                 Trainer checkpoints (complete ones carry crystal_checkpoint_complete.json)
  model.safetensors, config.json, tokenizer/processor files   the final model (stock from_pretrained)
  crystal_config.json           the run's CrystaL settings (read by crystal_ext.evaluate)
  metrics.jsonl                 every log record (loss, ce, kl_pred, kl_attn, lr, ...)
  tensorboard/                  TensorBoard event files
  eval_results.json             held-out accuracy, intact and blurred images, greedy, intact path
  pictures/attention_*.png      answer->latent and latent->image attention maps
Everything transformers' Trainer offers (gradient accumulation, bf16, gradient checkpointing,
torchrun DDP, FSDP, DeepSpeed, --resume_from_checkpoint, --report_to) is a TrainingArguments
flag; see README.md, and `--help` for all options.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


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


def build_model(cargs, targs):
    """(model, processor, latent tokens, base-model path) with the latent tokens added."""
    from crystal_ext.latent_tokens import add_latent_tokens

    if cargs.tiny:
        from crystal_ext.tiny_model import tiny_model, tiny_processor, tiny_tokenizer

        tok = tiny_tokenizer()
        latent = add_latent_tokens(tok, None, k=cargs.num_latent_tokens)  # before the model: sized to fit
        model = tiny_model(tok, seed=targs.seed)
        processor = tiny_processor(tok, cargs.image_size)
        return model, processor, latent
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if targs.bf16 else torch.float16 if targs.fp16 else torch.float32
    # Mixed precision keeps fp32 master weights only if the model is loaded in fp32; with bf16
    # on a GPU the published recipe trains LoRA on bf16 weights (the adapter itself stays fp32).
    processor = AutoProcessor.from_pretrained(cargs.model)
    model = AutoModelForImageTextToText.from_pretrained(cargs.model, dtype=dtype, attn_implementation="sdpa")
    latent = add_latent_tokens(processor.tokenizer, model, k=cargs.num_latent_tokens)
    return model, processor, latent


def build_datasets(cargs, data_seed: int):
    from crystal_ext.data import load_examples
    from crystal_ext.synthetic import SyntheticVQA

    if cargs.data is None:
        train = SyntheticVQA(cargs.train_examples, "train", seed=data_seed, task=cargs.task, image_size=cargs.image_size)
        held_out = SyntheticVQA(cargs.eval_examples, "test", seed=data_seed, task=cargs.task,
                                image_size=cargs.image_size)
        return train, held_out
    train = load_examples(cargs.data, cargs.image_folder)
    held_out = None
    if cargs.eval_data:
        held_out = load_examples(cargs.eval_data, cargs.image_folder,
                                 split="test" if os.path.isdir(cargs.eval_data) else "train")
    return train, held_out


def run_config(cargs, targs, base_model: str | None) -> dict:
    from dataclasses import asdict

    return {**asdict(cargs), "seed": targs.seed, "data_seed": 0, "base_model": base_model,
            "output_dir_abs": os.path.abspath(targs.output_dir)}


def main(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict:
    """Parse, train, evaluate, draw. Returns a summary dict (also printed). `extra_callbacks`
    are added to the Trainer (tests use them to stop or slow a run)."""
    started = time.monotonic()
    from crystal_ext.arguments import parse_args

    try:
        cargs, targs = parse_args(argv)
    except ValueError as exc:
        print(f"crystal_ext.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    import crystal_ext
    from crystal_ext.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
    from crystal_ext.corruption import CorruptionConfig
    from crystal_ext.evaluate import CONFIG_FILE, evaluate_model
    from crystal_ext.latent_tokens import apply_lora, train_new_rows_only
    from crystal_ext.packing import DualPathCollator, DualPathPacker, model_rope_index
    from crystal_ext.trainer import CrystalTrainer, JsonlMetricsCallback, TimeBudgetCallback

    out = targs.output_dir
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(out, "tensorboard"))
    if cargs.overwrite_output_dir and targs.resume_from_checkpoint is None and _is_main() and os.path.isdir(out):
        import shutil

        for name in os.listdir(out):
            if name.startswith("checkpoint-") or name in ("metrics.jsonl", "tensorboard", "pictures"):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True) if os.path.isdir(
                    os.path.join(out, name)) else os.remove(os.path.join(out, name))
    if cargs.lm_head_losses == "reference":
        lm_head_losses = crystal_ext.reference.lm_head_losses
    else:
        lm_head_losses = getattr(crystal_ext, "lm_head_losses", None)
        if lm_head_losses is None:
            print("crystal_ext.train: error: the fused crystal_ext.lm_head_losses is not in this build "
                  "(rebuild the extension, or pass --lm_head_losses reference to train with the plain-PyTorch "
                  "reference)", file=sys.stderr)
            raise SystemExit(2)
    if not crystal_ext.extension_available() and not cargs.no_crystal:
        print(f"crystal_ext.train: error: the compiled extension is missing ({crystal_ext.extension_error()})",
              file=sys.stderr)
        raise SystemExit(2)

    if cargs.cpu_threads:
        torch.set_num_threads(cargs.cpu_threads)
    register_dual_path_attention()
    _log(f"building {'the embedded tiny model' if cargs.tiny else cargs.model}")
    model, processor, latent = build_model(cargs, targs)
    base_model = cargs.model
    os.makedirs(out, exist_ok=True)
    if cargs.tiny and cargs.use_lora and _is_main():
        # LoRA on the tiny model (tests, experiments): its random base must be kept to load the adapter.
        base_model = "base_model"
        model.save_pretrained(os.path.join(out, base_model))
    if not cargs.no_crystal:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    token_rows, no_decay = None, ()
    if cargs.use_lora:
        model = apply_lora(model, r=cargs.lora_r, alpha=cargs.lora_alpha, dropout=cargs.lora_dropout)
        no_decay = tuple(train_new_rows_only(model, latent.new_ids))
        token_rows = {"ids": list(latent.new_ids)}
        if targs.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trained"
         f"{' (LoRA)' if cargs.use_lora else ''}; objective: {'SFT baseline' if cargs.no_crystal else 'CrystaL'}")

    train_set, held_out = build_datasets(cargs, data_seed=0)
    corruption = CorruptionConfig(kind=cargs.corruption, blur_radius=(cargs.blur_radius_min, cargs.blur_radius_max))
    packer = DualPathPacker(processor.tokenizer, latent, model_rope_index(model), corruption, seed=targs.seed,
                            image_size=cargs.image_size, max_length=cargs.max_length, system=cargs.system_prompt)
    collator = _SkipAwareCollator(DualPathCollator(packer, processor.tokenizer.pad_token_id))
    if _is_main():
        with open(os.path.join(out, CONFIG_FILE), "w") as f:
            json.dump(run_config(cargs, targs, base_model), f, indent=1)

    budget = TimeBudgetCallback(cargs.max_train_minutes) if cargs.max_train_minutes else None
    callbacks = [JsonlMetricsCallback(os.path.join(out, "metrics.jsonl"))] + ([budget] if budget else [])
    trainer = CrystalTrainer(
        model=model, args=targs, train_dataset=train_set, data_collator=collator, processing_class=processor,
        callbacks=callbacks + list(extra_callbacks or ()), crystal=not cargs.no_crystal,
        lambda_pred=cargs.lambda_pred, lambda_attn=cargs.lambda_attn, topk_fraction=cargs.topk_fraction,
        lm_head_losses=lm_head_losses, token_rows=token_rows, no_decay=no_decay)
    if targs.resume_from_checkpoint:
        _log(f"resuming from {targs.resume_from_checkpoint}")
    train_result = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model(out)  # the final model at the top of the output folder
    summary = {"output_dir": out, "global_step": trainer.state.global_step,
               "train_loss": train_result.training_loss, "train_seconds": train_result.metrics.get("train_runtime"),
               "stopped_by_time_budget_at": budget.stopped_at if budget else None,
               "final_logged_loss": next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r),
                                         None)}
    if not _is_main():
        return summary

    model = trainer.model
    if held_out is not None and len(held_out):
        _log(f"evaluating {len(held_out)} held-out examples (greedy, intact path; intact and blurred images)")
        result = evaluate_model(model, processor, held_out, system=cargs.system_prompt, image_size=cargs.image_size,
                                num_latent_tokens=cargs.num_latent_tokens,
                                blur_radius=(cargs.blur_radius_min, cargs.blur_radius_max), seed=targs.seed,
                                progress=False)
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump(result, f, indent=1)
        summary.update(accuracy_intact=result["accuracy_intact"], accuracy_blurred=result["accuracy_blurred"],
                       eval_examples=result["n"], eval_results=os.path.join(out, "eval_results.json"))
        if cargs.num_pictures:
            from crystal_ext.pictures import draw_pictures

            examples = [held_out[i] for i in range(min(cargs.num_pictures, len(held_out)))]
            summary["pictures"] = draw_pictures(model, packer, examples, os.path.join(out, "pictures"))
    summary["checkpoints"] = sorted(os.path.join(out, n) for n in os.listdir(out) if n.startswith("checkpoint-"))
    summary["metrics"] = os.path.join(out, "metrics.jsonl")
    summary["tensorboard"] = os.environ["TENSORBOARD_LOGGING_DIR"]
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    lines = [
        "",
        f"done in {s['wall_seconds']:.0f} s ({s['global_step']} steps"
        + (f", stopped by the time budget" if s.get("stopped_by_time_budget_at") else "") + ")",
    ]
    if "accuracy_intact" in s:
        lines.append(f"held-out accuracy ({s['eval_examples']} examples, greedy, intact path): "
                     f"intact images {s['accuracy_intact']:.3f}, blurred images {s['accuracy_blurred']:.3f}")
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

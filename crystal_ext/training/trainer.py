"""`CrystalTrainer`: transformers.Trainer with the CrystaL objective and crash-safe checkpoints.

What it changes in the stock Trainer, and why:
- compute_loss runs `crystal_objective` (CE + KL_pred + KL_attn, or CE alone with
  crystal=False). The objective is run *as the model's forward* (see `_objective_as_forward`),
  so DDP / FSDP / DeepSpeed wrappers see an ordinary forward call: DDP only synchronises
  gradients of a backward that follows its own forward, and FSDP gathers its parameters there.
- The parts ce / kl_pred / kl_attn are averaged over each logging window and logged next to
  the Trainer's `loss` (so they reach the progress bar, TensorBoard and the JSONL log).
- Checkpoints are crash-safe (crystal_ext.training.checkpoints): the completion marker is
  written after every rank has finished writing and the files are fsynced, and old
  checkpoints are rotated out only after that.
- With LoRA (peft) the trained rows of the new tokens are saved beside the adapter
  (crystal_ext.training.token_rows) and loaded back on resume.
- Weight decay skips the parameters given as `no_decay` (the new tokens' rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from crystal_ext.model.new_token_rows import new_token_rows_of
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective
from crystal_ext.model.parts import unwrap_distributed, unwrap_peft
from crystal_ext.training.checkpoints import is_complete_checkpoint, write_complete_marker
from crystal_ext.training.token_rows import resume_token_rows, save_token_rows

# ---- the objective as a forward ------------------------------------------------------------


@contextlib.contextmanager
def _objective_as_forward(inner, objective):
    """Make `inner(crystal_batch=...)` compute the objective for the duration of the block.

    Distributed wrappers (DDP, FSDP, DeepSpeed) must see a forward call of the module they
    wrap; the objective, however, calls the backbone and the LM head separately. Setting an
    instance attribute `forward` (looked up before the class's by nn.Module.__call__) on the
    wrapped module routes the wrapper's forward into the objective without changing the
    model's class or its saved form.
    """
    inner.forward = objective
    try:
        yield
    finally:
        del inner.forward


def objective_at(objective: ObjectiveConfig, step: int, warmup_steps: int) -> ObjectiveConfig:
    """The objective of training step `step` (0-based): during an alignment warm-up of
    `warmup_steps` the KL weights are scaled by step / warmup_steps, so the first step trains on
    CE alone (the KL terms are still computed and logged)."""
    if step >= warmup_steps:
        return objective
    share = step / warmup_steps
    return dataclasses.replace(
        objective, lambda_pred=objective.lambda_pred * share, lambda_attn=objective.lambda_attn * share
    )


# ---- the trainer ---------------------------------------------------------------------------


class CrystalTrainer(Trainer):
    def __init__(
        self,
        *args,
        objective: ObjectiveConfig = ObjectiveConfig(),
        no_decay: tuple = (),
        evaluator=None,
        alignment_warmup_steps: int = 0,
        **kwargs,
    ):
        """`objective`: the CrystaL objective's settings; `no_decay`: parameters kept out of
        weight decay (the new tokens' rows, crystal_ext.model.new_token_rows, which are saved
        beside the adapter and loaded back on resume when the model has them); `evaluator`: fn(model) ->
        {name: value}, what `evaluate()` reports (the Trainer's own evaluation computes a loss,
        where CrystaL's questions are answered by generation); `alignment_warmup_steps`: the
        weights of KL_pred and KL_attn grow linearly from 0 to the objective's over this many
        steps (see `objective_at`)."""
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.evaluator = evaluator
        self.alignment_warmup_steps = alignment_warmup_steps
        self.no_decay_ids = {id(p) for p in no_decay}
        # The objective returns a mean over its own rows; with no `labels` in the batch the
        # Trainer divides by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._parts_sum = torch.zeros(3)
        self._parts_n = 0

    # -- loss --
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs.get("empty"):
            # Every example of this batch was skipped (warned by the collator). A zero that
            # touches every trainable parameter keeps distributed ranks in step.
            loss = torch.stack([p.sum() * 0.0 for p in model.parameters() if p.requires_grad]).sum()
            return (loss, {}) if return_outputs else loss

        config = self.objective_at(self.state.global_step)

        def objective(crystal_batch):
            out = crystal_objective(inner, crystal_batch, config)
            return {"loss": out.loss, "ce": out.ce, "kl_pred": out.kl_pred, "kl_attn": out.kl_attn}

        inner = unwrap_distributed(model)
        with _objective_as_forward(inner, objective):
            out = model(crystal_batch=inputs)
        if model.training:
            self._parts_sum += torch.stack([out["ce"], out["kl_pred"], out["kl_attn"]]).detach().float().cpu()
            self._parts_n += 1
        return (out["loss"], out) if return_outputs else out["loss"]

    def objective_at(self, step: int) -> ObjectiveConfig:
        return objective_at(self.objective, step, self.alignment_warmup_steps)

    def log(self, logs, start_time=None):
        if "loss" in logs and self._parts_n:
            parts = self._parts_sum / self._parts_n
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts.to(self.args.device), reduction="mean").cpu()
            logs.update({k: round(float(v), 6) for k, v in zip(("ce", "kl_pred", "kl_attn"), parts)})
            self._parts_sum.zero_()
            self._parts_n = 0
        super().log(logs, start_time)

    # -- evaluation --
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """With an `evaluator`: its metrics, logged (progress bar, metrics.jsonl, TensorBoard)
        under `metric_key_prefix`; the Trainer calls this at every `--eval_steps` with
        `--eval_strategy steps`."""
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.evaluator(unwrap_distributed(self.model))
        # Unrounded: a held-out attention KL early in training is far below 1e-6.
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- optimiser --
    def get_decay_parameter_names(self, model):
        names = super().get_decay_parameter_names(model)
        if not self.no_decay_ids:
            return names
        skip = {n for n, p in model.named_parameters() if id(p) in self.no_decay_ids}
        return [n for n in names if n not in skip]

    # -- checkpoints --
    def _barrier(self):
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder) and not is_complete_checkpoint(folder):
            shutil.rmtree(folder)  # the leftover of a save that was killed: never mix old and new files
        self._barrier()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # old checkpoints go only once the new one is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self._barrier()  # every rank's files (RNG states, shards) are written
        if self.args.should_save:
            write_complete_marker(folder, self.state.global_step)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self._barrier()

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        rows = new_token_rows_of(unwrap_distributed(self.model))
        if rows is not None and self.args.should_save:
            save_token_rows(rows, output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model or self.model
        full = os.path.isfile(os.path.join(resume_from_checkpoint, "model.safetensors")) or os.path.isfile(
            os.path.join(resume_from_checkpoint, "model.safetensors.index.json")
        )
        if (
            full
            and unwrap_peft(target) is target
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
        ):
            # transformers 5.24 reloads checkpoint weights with a bare load_state_dict, but saves
            # them through the model's key conversion (Qwen2.5-VL writes visual.* and model.*
            # keys, the module has model.visual.*): nothing would be loaded, with only a warning
            # (the kill-and-resume test checks it). from_pretrained applies the conversion.
            dtype = next(target.parameters()).dtype
            loaded = type(target).from_pretrained(
                resume_from_checkpoint, dtype=dtype, attn_implementation="sdpa"
            )
            target.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        rows = new_token_rows_of(unwrap_distributed(target))
        if rows is not None:
            resume_token_rows(rows, resume_from_checkpoint)

"""`CrystalTrainer`: transformers.Trainer with the CrystaL objective and crash-safe checkpoints.

What it changes in the stock Trainer, and why:
- compute_loss runs `crystal_objective` (CE + KL_pred + KL_attn, or CE alone with
  crystal=False). The objective is run *as the model's forward* (see `_objective_as_forward`),
  so DDP / FSDP / DeepSpeed wrappers see an ordinary forward call: DDP only synchronises
  gradients of a backward that follows its own forward, and FSDP gathers its parameters there.
- The parts ce / kl_pred / kl_attn are averaged over each logging window and logged next to
  the Trainer's `loss` (so they reach the progress bar, TensorBoard and the JSONL log).
- Checkpoints: transformers 5.24 writes `checkpoint-N` in place (no temporary folder, no
  rename) and deletes old checkpoints right after; a kill mid-save leaves a folder that
  `get_last_checkpoint` would happily resume from. Here a marker file is written last, after
  every rank has finished writing and the files are fsynced; rotation of old checkpoints
  runs only after that, and `resolve_resume_checkpoint` refuses a folder without the marker.
- With LoRA (peft) the rows of the new tokens in the base embedding / LM head are trained too
  (latent_tokens.train_new_rows_only) but are no part of the peft adapter: they are saved
  beside it (`crystal_token_rows.safetensors`) and loaded back on resume and by evaluate.
- Weight decay skips the row-masked embedding / LM-head matrices (see latent_tokens).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from crystal_ext.objective import crystal_objective

COMPLETE_MARKER = "crystal_checkpoint_complete.json"
TOKEN_ROWS_FILE = "crystal_token_rows.safetensors"


# ---- checkpoints ---------------------------------------------------------------------------

def is_complete_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def _step_of(name: str) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    found = [(_step_of(n), n) for n in os.listdir(output_dir)]
    found = [(s, n) for s, n in found if s is not None and is_complete_checkpoint(os.path.join(output_dir, n))]
    return os.path.join(output_dir, max(found)[1]) if found else None


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None. `value` is a path, or "last"/"true" for
    the newest complete checkpoint of `output_dir`. Raises ValueError with what to do instead."""
    if value is None or str(value).lower() in ("", "none", "false"):
        return None
    if str(value).lower() in ("last", "true"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return found
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: {value} is not a folder")
    if not is_complete_checkpoint(value):
        other = last_complete_checkpoint(os.path.dirname(os.path.abspath(value)))
        hint = f"; the newest complete checkpoint there is {other}" if other else ""
        raise ValueError(
            f"--resume_from_checkpoint: {value} is incomplete (no {COMPLETE_MARKER}: the run was stopped while "
            f"saving it, or it was not written by crystal_ext.train){hint}"
        )
    return value


def _fsync_tree(folder: str) -> None:
    """Flush every file of `folder` (and the folders themselves) to disk, so the marker written
    after this never survives a crash that the files it vouches for do not."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_marker(folder: str, step: int) -> None:
    _fsync_tree(folder)
    tmp = os.path.join(folder, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"global_step": step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))  # atomic: the marker exists whole or not at all
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP / DeepSpeed engine / DataParallel
    return model


# ---- the trainer ---------------------------------------------------------------------------

class CrystalTrainer(Trainer):
    def __init__(self, *args, crystal: bool = True, lambda_pred: float = 1.0, lambda_attn: float = 1.0,
                 topk_fraction: float = 0.1, lm_head_losses=None, token_rows: dict | None = None,
                 no_decay: tuple = (), **kwargs):
        """`token_rows`: {"ids": [...]} of the new tokens whose rows are trained in a peft model's
        base embedding / LM head (saved beside the adapter); `no_decay`: parameters kept out of
        weight decay."""
        super().__init__(*args, **kwargs)
        self.crystal, self.lambda_pred, self.lambda_attn = crystal, lambda_pred, lambda_attn
        self.topk_fraction, self.lm_head_losses = topk_fraction, lm_head_losses
        self.token_rows, self.no_decay_ids = token_rows, {id(p) for p in no_decay}
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

        def objective(crystal_batch):
            out = crystal_objective(
                inner, crystal_batch, crystal=self.crystal, lambda_pred=self.lambda_pred,
                lambda_attn=self.lambda_attn, topk_fraction=self.topk_fraction, lm_head_losses=self.lm_head_losses)
            return {"loss": out.loss, "ce": out.ce, "kl_pred": out.kl_pred, "kl_attn": out.kl_attn}

        inner = _unwrap(model)
        with _objective_as_forward(inner, objective):
            out = model(crystal_batch=inputs)
        if model.training:
            self._parts_sum += torch.stack([out["ce"], out["kl_pred"], out["kl_attn"]]).detach().float().cpu()
            self._parts_n += 1
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs, start_time=None):
        if "loss" in logs and self._parts_n:
            parts = self._parts_sum / self._parts_n
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts.to(self.args.device), reduction="mean").cpu()
            logs.update({k: round(float(v), 6) for k, v in zip(("ce", "kl_pred", "kl_attn"), parts)})
            self._parts_sum.zero_()
            self._parts_n = 0
        super().log(logs, start_time)

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
            _write_marker(folder, self.state.global_step)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self._barrier()

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.token_rows and self.args.should_save:
            save_token_rows(_unwrap(self.model), self.token_rows["ids"], output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model or self.model
        full = os.path.isfile(os.path.join(resume_from_checkpoint, "model.safetensors")) or os.path.isfile(
            os.path.join(resume_from_checkpoint, "model.safetensors.index.json"))
        if full and not hasattr(target, "get_base_model") and not self.is_fsdp_enabled \
                and not self.is_deepspeed_enabled:
            # transformers 5.24 reloads checkpoint weights with a bare load_state_dict, but saves
            # them through the model's key conversion (Qwen2.5-VL writes visual.* and model.*
            # keys, the module has model.visual.*): nothing would be loaded, with only a warning
            # (found by the kill-and-resume test). from_pretrained applies the conversion.
            dtype = next(target.parameters()).dtype
            loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype, attn_implementation="sdpa")
            target.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.token_rows:
            load_token_rows(target, resume_from_checkpoint)


def _row_matrices(model):
    from crystal_ext.latent_tokens import _row_matrices as rows

    return rows(model.get_base_model() if hasattr(model, "get_base_model") else model)


def save_token_rows(model, ids, folder: str) -> None:
    """The trained rows `ids` of the embedding and (untied) LM head, as safetensors."""
    from safetensors.torch import save_file

    index = torch.tensor(list(ids), dtype=torch.long)
    mats = _row_matrices(model)
    tensors = {"ids": index, "embed_tokens": mats[0].detach()[index.to(mats[0].device)].cpu().contiguous()}
    if len(mats) > 1:
        tensors["lm_head"] = mats[1].detach()[index.to(mats[1].device)].cpu().contiguous()
    save_file(tensors, os.path.join(folder, TOKEN_ROWS_FILE))


@torch.no_grad()
def load_token_rows(model, folder: str) -> bool:
    """Write the rows saved by `save_token_rows` back into `model`; False if `folder` has none."""
    from safetensors.torch import load_file

    path = os.path.join(folder, TOKEN_ROWS_FILE)
    if not os.path.isfile(path):
        return False
    saved = load_file(path)
    mats = _row_matrices(model)
    for name, mat in zip(("embed_tokens", "lm_head"), mats):
        if name in saved:
            mat[saved["ids"].to(mat.device)] = saved[name].to(mat.device, mat.dtype)
    return True


# ---- callbacks -----------------------------------------------------------------------------

class JsonlMetricsCallback(TrainerCallback):
    """Appends every log record (train and eval) as one JSON line to `path` (main process only)."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class TimeBudgetCallback(TrainerCallback):
    """Stops training (with a final save) once `minutes` of training time have passed: the
    embedded default promises to finish on a laptop in minutes even on a slow or busy CPU.
    The decision is made on rank 0 and shared, so every rank stops at the same step."""

    def __init__(self, minutes: float):
        self.seconds, self.start, self.stopped_at = minutes * 60.0, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        over = time.monotonic() - self.start > self.seconds
        if args.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([int(over)], device=args.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        if over:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
        return control

"""Trainer callbacks of crystal_ext.train: the JSONL metrics log and the time budget."""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import TrainerCallback


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

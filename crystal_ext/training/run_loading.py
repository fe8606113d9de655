"""Loading what crystal_ext.train wrote, and merging it into a stock model."""

from __future__ import annotations

import os

import torch

from crystal_ext.model.latent_tokens import grow_vocabulary
from crystal_ext.model.runtime_fusions import load_pretrained, without_fusion_config
from crystal_ext.training.run_config import read_run_config
from crystal_ext.training.token_rows import TOKEN_ROWS_FILE, load_token_rows


def load_trained(folder: str, dtype=torch.float32):
    """(model, processor, run config) of an output folder or checkpoint of crystal_ext.train.
    A LoRA run gives a peft model (base + adapter + trained token rows)."""
    from transformers import AutoProcessor

    config = read_run_config(folder)
    processor = AutoProcessor.from_pretrained(folder)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from peft import PeftModel

        base_path = config["base_model"]
        if not os.path.isabs(base_path) and os.path.isdir(os.path.join(config["output_dir_abs"], base_path)):
            base_path = os.path.join(config["output_dir_abs"], base_path)
        base = load_pretrained(base_path, dtype)
        grow_vocabulary(base, len(processor.tokenizer))
        model = PeftModel.from_pretrained(base, folder)
        if not load_token_rows(model, folder):
            raise ValueError(f"{folder}: LoRA output without its token rows ({TOKEN_ROWS_FILE})")
    else:
        model = load_pretrained(folder, dtype)
    return model.eval(), processor, config


def merge(model, processor, folder: str) -> str:
    """Write a stock model (LoRA folded in, a stock config.json) that plain from_pretrained loads."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.set_attn_implementation("sdpa")
    with without_fusion_config(model):
        model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

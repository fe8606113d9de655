"""`torchrun --nproc_per_node 2 tests/fsdp_objective_run.py OUT` (FSDP, gloo, CPU) or
`python tests/fsdp_objective_run.py OUT` (one process): 10 steps of the CrystaL objective on the
tiny model with LoRA and the new tokens' rows; writes the loss of every step to OUT.

Each step's batch is 4 examples: under FSDP rank r trains on examples [2r, 2r + 2) and FSDP
averages the gradients; one process trains on both halves and averages their losses, which is
the same step. LoRA dropout is 0 so that both compute the same numbers.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch
import torch.distributed as dist

from crystal_ext.data.packing import DualPathCollator, DualPathPacker
from crystal_ext.data.synthetic import SyntheticVQA
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.latent_tokens import add_latent_tokens
from crystal_ext.model.lora import apply_lora
from crystal_ext.model.new_token_rows import attach_new_token_rows, new_token_rows_of
from crystal_ext.model.objective import crystal_objective
from crystal_ext.training.tiny_model import tiny_model, tiny_processor, tiny_tokenizer
from crystal_ext.training.trainer import _objective_as_forward

STEPS, HALF = 10, 2


def build():
    register_dual_path_attention()
    tok = tiny_tokenizer()
    latent = add_latent_tokens(tok, None, k=8)
    model = tiny_model(tok, seed=0)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model = apply_lora(model, dropout=0.0)
    attach_new_token_rows(model, latent.new_ids)
    processor = tiny_processor(tok, 112)
    packer = DualPathPacker(processor, latent, model, image_size=112)
    collate = DualPathCollator(packer, processor.tokenizer.pad_token_id)
    data = SyntheticVQA(STEPS * 2 * HALF, "train", seed=0, image_size=112)
    halves = [
        [collate([data[(2 * step + h) * HALF + i] for i in range(HALF)]) for h in range(2)]
        for step in range(STEPS)
    ]
    return model, halves


def optimizer_of(model):
    rows = {id(p) for p in new_token_rows_of(model).parameters()} if new_token_rows_of(model) else set()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) not in rows], "weight_decay": 0.1},
            {"params": [p for p in params if id(p) in rows], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )


def single_process(out):
    model, halves = build()
    optimizer = optimizer_of(model)
    losses = []
    for pair in halves:
        optimizer.zero_grad()
        loss = sum(crystal_objective(model, batch).loss for batch in pair) / 2
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fsdp(out):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLDecoderLayer,
        Qwen2_5_VLVisionBlock,
    )

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, halves = build()
    wrapped = FullyShardedDataParallel(
        model,
        sharding_strategy=ShardingStrategy.FULL_SHARD,  # "full_shard"
        auto_wrap_policy=functools.partial(  # "auto_wrap" by the transformer layer classes
            transformer_auto_wrap_policy,
            transformer_layer_cls={Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock},
        ),
        use_orig_params=True,  # LoRA: frozen and trained parameters share FSDP units
        device_id=torch.device("cpu"),  # CPU and gloo (without it FSDP insists on an accelerator)
    )
    optimizer = optimizer_of(wrapped)
    inner = wrapped.module

    def objective(crystal_batch):
        return crystal_objective(inner, crystal_batch).loss

    losses = []
    for pair in halves:
        optimizer.zero_grad()
        with _objective_as_forward(inner, objective):
            loss = wrapped(crystal_batch=pair[rank])
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    sharded = sum(1 for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel))
    dist.destroy_process_group()
    return losses if rank == 0 else None, sharded


def main(out):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        losses, units = fsdp(out)
        if losses is None:
            return
        result = {"losses": losses, "fsdp_units": units}
    else:
        result = {"losses": single_process(out)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])

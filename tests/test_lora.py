"""LoRA: the published settings, the family's target layers, the projector trained in full, and
one source of the defaults for the command line and apply_lora."""

from __future__ import annotations

import inspect

from family_models import qwen_tokenizer, tiny_qwen25vl
from peft import PeftModel

from crystal_ext.model.latent_tokens import add_latent_tokens
from crystal_ext.model.lora import LORA_ALPHA, LORA_DROPOUT, LORA_RANK, apply_lora
from crystal_ext.training.arguments import CrystalArguments


def test_lora_defaults_targets_and_merger():
    tok = qwen_tokenizer()
    model = tiny_qwen25vl(tok)
    add_latent_tokens(tok, model, k=8)
    peft_model = apply_lora(model)
    assert isinstance(peft_model, PeftModel)
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.01)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("language_model.layers.0.self_attn.q_proj.lora_A" in n for n in trainable)
    assert any("language_model.layers.1.mlp.down_proj.lora_B" in n for n in trainable)
    assert any("visual.blocks.0.attn.qkv.lora_A" in n for n in trainable)
    assert any("visual.merger" in n and "modules_to_save" in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    assert not any("merger" in n and "lora_" in n for n in trainable)


def test_the_command_line_defaults_are_apply_loras():
    assert (LORA_RANK, LORA_ALPHA, LORA_DROPOUT) == (16, 32, 0.01)  # the published recipe
    defaults = {k: v.default for k, v in inspect.signature(apply_lora).parameters.items() if k != "model"}
    cargs = CrystalArguments()
    assert defaults == {"r": cargs.lora_r, "alpha": cargs.lora_alpha, "dropout": cargs.lora_dropout}

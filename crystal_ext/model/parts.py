"""Finding the pieces of a stock transformers VLM, whatever wraps it (peft, DDP, DeepSpeed)."""

from __future__ import annotations

import torch
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap_distributed(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / a DeepSpeed engine (each keeps it as `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(transformers model, backbone returning last hidden states, LM head) of a possibly
    peft-wrapped *ForConditionalGeneration model. The objective calls the backbone and the
    head separately, so the full [batch, length, vocabulary] logits are never computed."""
    model = unwrap_peft(model)
    backbone = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if backbone is None or head is None:
        raise ValueError(f"cannot find the backbone and LM head of {type(model).__name__}")
    return model, backbone, head


def text_config_of(config):
    """The text decoder's part of a model config (the config itself when it has no sub-configs)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def text_config(model: nn.Module):
    """The config of `model`'s text decoder (the model's own config when it has no sub-configs)."""
    return text_config_of(unwrap_peft(model).config)


def embedding_and_head_weights(model: nn.Module) -> list[torch.Tensor]:
    """The input-embedding weight and the LM-head weight (once if they are tied)."""
    model = unwrap_peft(model)
    mats = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not mats[0]:
        mats.append(head.weight)
    return mats

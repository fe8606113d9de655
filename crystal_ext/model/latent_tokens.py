"""Latent tokens and what is trained (docs/method.md, "What is trained").

- K (default 8) latent tokens plus the think/answer markers are added to the tokenizer as
  special tokens (one id each, never split) when it lacks them; a token it already has (Qwen3
  tokenizers hold `<think>` / `</think>` as added, non-special tokens) keeps its id, special
  flag and normalisation. The model's embedding and LM head grow to fit.
- With the base frozen, only the rows of the newly added tokens are trained in the
  embedding and LM-head matrices, as their own [n_new, Hd] parameters over the frozen
  matrices (crystal_ext.model.new_token_rows.attach_new_token_rows): no gradient or
  optimizer state of vocabulary size exists.
- LoRA: crystal_ext.model.lora.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crystal_ext.model.parts import embedding_and_head_weights

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def latent_token_strings(k: int) -> list[str]:
    return [f"<|latent_{i}|>" for i in range(k)]


@dataclass(frozen=True)
class LatentTokens:
    """Ids of the added tokens. `new_ids` are the rows this run trains in the embedding and LM head."""

    latent_ids: tuple[int, ...]
    think_open: int
    think_close: int
    answer_open: int
    answer_close: int
    new_ids: tuple[int, ...]


def add_latent_tokens(tokenizer, model: nn.Module | None = None, k: int = 8) -> LatentTokens:
    """Add the K latent tokens and the markers that `tokenizer` lacks, and grow `model`'s embeddings.

    A token the tokenizer already has is reused as it is: its id, its special flag and its
    normalisation stay (a served model's stack parses `</think>` and decodes it with
    skip_special_tokens=True, so turning it special would change what the saved tokenizer does).
    It must encode to its one id, or the packed think block would not be what the text says.

    The embedding (and an untied LM head) is resized only when the tokenizer outgrows it
    (Qwen's matrices carry spare rows). Rows of the added tokens start at the mean of the
    rows of the tokens the tokenizer had before, so the new tokens start "average" instead
    of random.
    """
    if k < 1:
        raise ValueError(f"add_latent_tokens: k must be >= 1, got {k}")
    old_len = len(tokenizer)
    wanted = latent_token_strings(k) + [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
    vocab = tokenizer.get_vocab()
    for token in (t for t in wanted if t in vocab):
        if tokenizer(token, add_special_tokens=False).input_ids != [vocab[token]]:
            raise ValueError(
                f"add_latent_tokens: the tokenizer has {token!r} (id {vocab[token]}) but splits the text "
                f"{token!r} into {tokenizer(token, add_special_tokens=False).input_ids}: it cannot mark the latent "
                "block or the answer; use a tokenizer that encodes it as one token"
            )
    missing = [t for t in wanted if t not in vocab]
    # add_tokens(special_tokens=True) rather than add_special_tokens: same effect (never split),
    # and its signature is the same in transformers 4 and 5.
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(wanted)
    new_ids = tuple(tokenizer.convert_tokens_to_ids(missing))
    if model is not None:
        grow_vocabulary(model, len(tokenizer))
        _init_new_rows(model, new_ids, old_len)
    return LatentTokens(tuple(ids[:k]), *ids[k:], new_ids=new_ids)


@torch.no_grad()
def grow_vocabulary(model: nn.Module, size: int) -> None:
    """Resize `model`'s token matrices to `size` rows when they hold fewer. Rows that the resize
    adds to a per-layer input embedding (Gemma 4's `embed_tokens_per_layer`, resized with the
    embedding by the model itself) start at zero: they are never trained, and a reload of a LoRA
    run, which resizes the base model again (crystal_ext.training.run_loading), must give the
    tokens the same per-layer inputs as training did (transformers draws them at random)."""
    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    per_layer = getattr(model, "get_per_layer_input_embeddings", lambda: None)()
    if per_layer is not None:
        per_layer.weight[old:] = 0


@torch.no_grad()
def _init_new_rows(model: nn.Module, new_ids, old_len: int) -> None:
    if not new_ids:
        return
    rows = torch.tensor(new_ids, dtype=torch.long)
    for matrix in embedding_and_head_weights(model):
        matrix[rows.to(matrix.device)] = matrix[:old_len].mean(0, keepdim=True)

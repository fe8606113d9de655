"""The trained rows of the new tokens, saved beside a peft adapter.

With LoRA the rows of the new tokens in the base embedding / LM head are trained
(crystal_ext.model.latent_tokens.train_new_rows_only) but are no part of the peft adapter:
they are saved beside it (`crystal_token_rows.safetensors`) and loaded back on resume and by
evaluation.
"""

from __future__ import annotations

import os

import torch

from crystal_ext.model.parts import embedding_and_head_weights

TOKEN_ROWS_FILE = "crystal_token_rows.safetensors"


def save_token_rows(model, ids, folder: str) -> None:
    """The trained rows `ids` of the embedding and (untied) LM head, as safetensors."""
    from safetensors.torch import save_file

    index = torch.tensor(list(ids), dtype=torch.long)
    mats = embedding_and_head_weights(model)
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
    mats = embedding_and_head_weights(model)
    for name, mat in zip(("embed_tokens", "lm_head"), mats):
        if name in saved:
            mat[saved["ids"].to(mat.device)] = saved[name].to(mat.device, mat.dtype)
    return True

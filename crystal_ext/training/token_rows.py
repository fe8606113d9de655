"""The trained rows of the new tokens, saved beside a peft adapter.

With LoRA the new tokens' embedding and LM-head rows are trained as their own parameters
(crystal_ext.model.new_token_rows) and are no part of the peft adapter: they are saved beside
it (`crystal_token_rows.safetensors`: ids, embed_tokens and, for an untied head, lm_head),
loaded back into those parameters on resume, and written into the plain matrices by
evaluation (so a merged model carries them in its ordinary embedding and LM head).
"""

from __future__ import annotations

import os

import torch

from crystal_ext.model.new_token_rows import ATTRIBUTE, NewTokenRows
from crystal_ext.model.parts import embedding_and_head_weights

TOKEN_ROWS_FILE = "crystal_token_rows.safetensors"


def save_token_rows(rows: NewTokenRows, folder: str, state_dict: dict | None = None) -> None:
    """Save `rows`; when the Trainer hands over a gathered `state_dict` (FSDP: the rank's own
    parameters are shards), the rows are taken from it by name."""
    from safetensors.torch import save_file

    state = rows.state()
    for key, name in (("embed_tokens", "embedding_rows"), ("lm_head", "head_rows")):
        gathered = [v for k, v in (state_dict or {}).items() if k.endswith(f"{ATTRIBUTE}.{name}")]
        if key in state and gathered:
            state[key] = gathered[0].detach().cpu().contiguous()
    save_file(state, os.path.join(folder, TOKEN_ROWS_FILE))


def _load(folder: str) -> dict | None:
    from safetensors.torch import load_file

    path = os.path.join(folder, TOKEN_ROWS_FILE)
    return load_file(path) if os.path.isfile(path) else None


def resume_token_rows(rows: NewTokenRows, folder: str) -> None:
    """Load the rows saved in checkpoint `folder` into the trained parameters."""
    saved = _load(folder)
    if saved is None:
        raise ValueError(f"{folder}: a LoRA checkpoint without its token rows ({TOKEN_ROWS_FILE})")
    rows.load_state(saved)


@torch.no_grad()
def load_token_rows(model, folder: str) -> bool:
    """Write the saved rows into `model`'s plain embedding and LM head; False if `folder` has none."""
    saved = _load(folder)
    if saved is None:
        return False
    mats = embedding_and_head_weights(model)
    for name, mat in zip(("embed_tokens", "lm_head"), mats):
        if name in saved:
            mat[saved["ids"].to(mat.device)] = saved[name].to(mat.device, mat.dtype)
    return True

"""The new tokens' rows of the embedding and the LM head, trained at the cost of those rows.

The published recipe trains, of the two [V, Hd] matrices, only the rows of the newly added tokens
(the latents and the think/answer markers). Making the whole matrices trainable and masking
their gradients (the published code's way) still materialises two dense [V, Hd] gradients and
their optimizer states every step: at Qwen2.5-VL-7B that is 1.09 G values to change 12 rows.

Here the base matrices stay frozen and the rows live in their own parameters, `[n_new, Hd]`:
- the input embedding is overridden by a forward hook that puts the trained rows at the
  positions of the new tokens (a `torch.where` over the looked-up embeddings);
- the LM head's rows reach the training loss through the LM-head losses, which take them as
  override rows in place of the base rows (`crystal_ext.lm_head_losses(..., override_ids=,
  override_rows=)`: the kernels compute those columns from the rows and only read the frozen
  weight), so the objective never calls the head module;
- a forward hook on the head module replaces the new tokens' logit columns with
  hidden . rows, so generation and evaluation on the live model use the trained rows too.

peft has the same idea (`trainable_token_indices`), but its forward builds the merged matrix with
`weight.index_copy(...)`, a [V, Hd] copy in every forward, and a fused LM-head loss would then
see that copy; hence this small module instead. Saving, loading and merging (writing the rows
into the ordinary matrices, so the stock `from_pretrained` loads the result) are below.
"""

from __future__ import annotations

import torch
from torch import nn

from crystal_ext.model.parts import unwrap_peft

ATTRIBUTE = "crystal_new_token_rows"


class NewTokenRows(nn.Module):
    """Trainable rows for the token ids `ids` over a frozen embedding and LM head."""

    def __init__(self, embedding: nn.Embedding, head: nn.Module | None, ids):
        super().__init__()
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("NewTokenRows: ids is empty; nothing would be trained")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"NewTokenRows: ids has duplicates: {ids.tolist()}")
        vocab = embedding.weight.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"NewTokenRows: ids must be in [0, {vocab}), got {ids.tolist()}")
        weight = embedding.weight
        self.register_buffer("ids", ids.to(weight.device), persistent=False)
        self.embedding_rows = nn.Parameter(weight.detach()[self.ids].clone())
        self.tied = head is None or head.weight is embedding.weight
        self.head_rows = None if self.tied else nn.Parameter(head.weight.detach()[self.ids].clone())
        self._hooks = [embedding.register_forward_hook(self._override_embedding)]
        if head is not None:
            self._hooks.append(head.register_forward_hook(self._override_head_logits))

    def lm_head_rows(self) -> torch.Tensor:
        """The rows the LM head uses for `ids` (the embedding's when the two are tied)."""
        return self.embedding_rows if self.tied else self.head_rows

    def _override_embedding(self, module, args, output):
        input_ids = args[0]
        is_new = torch.isin(input_ids, self.ids)
        # The slot of each new token in `ids` (searchsorted over the sorted ids; other positions
        # get an arbitrary slot that torch.where discards).
        order = torch.argsort(self.ids)
        slot = order[torch.searchsorted(self.ids[order], input_ids).clamp_(max=self.ids.numel() - 1)]
        rows = self.embedding_rows.to(output.dtype)[slot]
        return torch.where(is_new[..., None], rows, output)

    def _override_head_logits(self, module, args, output):
        rows = self.lm_head_rows().to(output.dtype)
        bias = None if getattr(module, "bias", None) is None else module.bias[self.ids].to(output.dtype)
        return output.index_copy(-1, self.ids, nn.functional.linear(args[0].to(output.dtype), rows, bias))

    def remove(self) -> None:
        """Detach the embedding and head hooks (the rows stay readable)."""
        for hook in self._hooks:
            hook.remove()

    @torch.no_grad()
    def write_into(self, embedding: nn.Embedding, head: nn.Module | None) -> None:
        """Put the trained rows into the ordinary matrices (what a merged model carries)."""
        embedding.weight[self.ids] = self.embedding_rows.to(embedding.weight.dtype)
        if not self.tied and head is not None:
            head.weight[self.ids] = self.head_rows.to(head.weight.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"ids": self.ids.cpu(), "embed_tokens": self.embedding_rows.detach().cpu().contiguous()}
        if not self.tied:
            out["lm_head"] = self.head_rows.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state(self, saved: dict[str, torch.Tensor]) -> None:
        if saved["ids"].tolist() != self.ids.tolist():
            raise ValueError(
                f"NewTokenRows: saved rows are for ids {saved['ids'].tolist()}, this model trains "
                f"{self.ids.tolist()}"
            )
        self.embedding_rows.copy_(saved["embed_tokens"])
        if not self.tied:
            self.head_rows.copy_(saved["lm_head"])


def attach_new_token_rows(model: nn.Module, ids) -> NewTokenRows:
    """Freeze the embedding and LM head of `model` (a transformers model or its peft wrapper)
    and train the rows `ids` in a `NewTokenRows` registered on the transformers model (so the
    Trainer's optimizer sees its parameters)."""
    base = unwrap_peft(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    embedding.weight.requires_grad_(False)
    if head is not None:
        head.weight.requires_grad_(False)
    rows = NewTokenRows(embedding, head, ids)
    setattr(base, ATTRIBUTE, rows)
    return rows


def new_token_rows_of(model: nn.Module) -> NewTokenRows | None:
    return getattr(unwrap_peft(model), ATTRIBUTE, None)

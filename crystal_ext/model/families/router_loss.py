"""The router load-balancing loss a mixture-of-experts model's own forward adds to its training
loss, when its config asks for it (`output_router_logits` true, `router_aux_loss_coef` > 0):
`router_aux_loss_coef * load_balancing_loss_func(router logits, num_experts, top_k, mask)`, with
the model's own function from its modelling module.

The objective adds the same term computed on path 1's routing: the rows [A, C, D, E] are the
sequence the stock model sees, and a router acts on each row alone, so their router logits in
the packed forward equal the stock model's on the single path. Path 2's rows (B, F) are routed
too but not counted, as a model serving the intact path never routes them.

The router logits are read by forward hooks, during the objective's own forward, on the modules
the text model records as its `router_logits` (transformers' `_can_record_outputs`)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from crystal_ext.model.parts import text_config_of, unwrap_distributed, unwrap_peft
from crystal_ext.ops.layout import segments_of


def router_loss_requested(config) -> bool:
    text = text_config_of(config)
    return bool(getattr(text, "output_router_logits", False) and getattr(text, "router_aux_loss_coef", 0))


def load_balancing_function(model_class):
    """The model's own load_balancing_loss_func (from its modelling module), or None."""
    module = sys.modules.get(getattr(model_class, "__module__", ""), None)
    return getattr(module, "load_balancing_loss_func", None)


def _router_spec(language):
    """(module class, output index) of what `language` records as router_logits, or None."""
    spec = (getattr(language, "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        return None
    target = getattr(spec, "target_class", None) or (spec if isinstance(spec, type) else None)
    return (target, getattr(spec, "index", 0)) if target is not None else None


def unsupported_router_loss(model_class, config) -> str | None:
    """Why the requested router loss cannot be reproduced for this model class (None if it can)."""
    text = text_config_of(config)
    if load_balancing_function(model_class) is None:
        return f"{model_class.__name__}'s modelling module has no load_balancing_loss_func"
    missing = [k for k in ("num_experts", "num_experts_per_tok") if getattr(text, k, None) is None]
    if missing:
        return f"its text config has no {', '.join(missing)}"
    return None


def path1_rows(layout: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [batch, L1] of each sample's path-1 rows, padded with its last row; valid [batch, L1])."""
    keep = [seg.path1() for seg in segments_of(layout)]
    width = max(map(len, keep))
    index = torch.tensor([k + [k[-1]] * (width - len(k)) for k in keep])
    valid = torch.tensor([[i < len(k) for i in range(width)] for k in keep])
    return index, valid


class RouterLogits:
    """The router logits of one forward ([batch * length, experts] per MoE layer, in call order)."""

    def __init__(self, model_class, coef: float, num_experts: int, top_k: int):
        self.coef, self.num_experts, self.top_k = coef, num_experts, top_k
        self.fn = load_balancing_function(model_class)
        self.logits = []

    def loss(self, batch_size: int, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """coef x the load-balancing loss over the rows `index` ([batch, L']) where `valid`."""
        if not self.logits:
            raise RuntimeError("router aux loss: no router ran in the forward (is the text model an MoE?)")
        device = self.logits[0].device
        index, valid = index.to(device), valid.to(device)
        rows = torch.arange(batch_size, device=device)[:, None]
        picked = tuple(g.reshape(batch_size, -1, g.shape[-1])[rows, index].flatten(0, 1) for g in self.logits)
        return self.coef * self.fn(picked, self.num_experts, self.top_k, valid.long())

    def path1_loss(self, batch: dict) -> torch.Tensor:
        """The term on path 1 of a collated dual-path batch."""
        index, valid = path1_rows(batch["layout"].cpu(), batch["input_ids"].shape[1])
        return self.loss(batch["input_ids"].shape[0], index, valid)

    def with_path1_term(self, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        return loss + self.path1_loss(batch)

    def with_single_path_term(self, loss: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`loss` plus the term of a forward of ordinary sequences (`attention_mask` [batch, length])."""
        batch, length = attention_mask.shape
        return loss + self.loss(batch, torch.arange(length).expand(batch, -1), attention_mask.bool().cpu())


class _NoRouterLoss:
    """The config asks for no router term: the loss stays as it is."""

    def with_path1_term(self, loss, batch):
        return loss

    def with_single_path_term(self, loss, attention_mask):
        return loss


@contextmanager
def recording_router_logits(model, family):
    """Yields an object that adds the stock router term of the forward run in the block to a loss
    (`with_path1_term`, `with_single_path_term`; the loss itself when the config asks for no term);
    the hooks are removed on leaving the block. `family`: the model's (crystal_ext.model.families)."""
    base = unwrap_peft(unwrap_distributed(model))
    if not router_loss_requested(base.config):
        yield _NoRouterLoss()
        return
    language = family.parts(base)[0]
    problem = unsupported_router_loss(type(base), base.config)
    spec = _router_spec(language)
    if problem is not None or spec is None:
        raise ValueError(
            f"the config of {type(base).__name__} asks for a router load-balancing loss that the objective "
            f"cannot reproduce: {problem or 'its text model records no router_logits'}"
        )
    text = text_config_of(base.config)
    record = RouterLogits(type(base), text.router_aux_loss_coef, text.num_experts, text.num_experts_per_tok)
    target, position = spec

    def keep(module, args, output):
        record.logits.append(output[position] if isinstance(output, (tuple, list)) else output)

    hooks = [m.register_forward_hook(keep) for m in language.modules() if isinstance(m, target)]
    try:
        yield record
    finally:
        for hook in hooks:
            hook.remove()

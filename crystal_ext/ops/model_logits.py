r"""The model's own logits from its LM head's output: some models transform the head's output in
their forward before the softmax and the loss, and the LM-head losses must see what the model
sees.

    z = softcap(logit_scale * (h W^T + b)),   softcap(u) = logit_softcap * tanh(u / logit_softcap)

`logit_scale` is a multiplier (Cohere's `logit_scale`; Granite's division by `logits_scaling`
is the scale 1 / logits_scaling); `logit_softcap` None or 0 leaves the cap off (Gemma's
`final_logit_softcapping` otherwise). Which model applies what is read from its config by its
family (crystal_ext.model.families.logits).

Gradient: d z / d (h W^T + b) = logit_scale * (1 - tanh(u / cap)^2) = logit_scale * (1 - (z / cap)^2).
"""

from __future__ import annotations

import math

import torch


def check_logit_transform(logit_scale, logit_softcap, op: str) -> tuple[float, float]:
    """(logit_scale, logit_softcap as a float, 0.0 for no cap), checked; errors name the argument."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"{op}: logit_scale must be a number, got {type(logit_scale).__name__}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"{op}: logit_scale must be finite and > 0, got {logit_scale}")
    if logit_softcap is None:
        return float(logit_scale), 0.0
    if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float)):
        raise ValueError(f"{op}: logit_softcap must be None or a number, got {type(logit_softcap).__name__}")
    if logit_softcap != 0 and not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"{op}: logit_softcap must be None, 0 (off) or finite and > 0, got {logit_softcap}")
    return float(logit_scale), float(logit_softcap)


def model_logits(
    raw: torch.Tensor, logit_scale: float = 1.0, logit_softcap: float | None = None
) -> torch.Tensor:
    """The model's logits from the head's output `raw` (h W^T + b), in raw's dtype."""
    z = raw * logit_scale if logit_scale != 1.0 else raw
    if logit_softcap:
        z = torch.tanh(z / logit_softcap) * logit_softcap
    return z

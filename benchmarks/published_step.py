"""The published way of computing one CrystaL step, in plain PyTorch, for comparison only.

Same model weights, same batch, same loss as crystal_ext.model.objective.crystal_objective,
computed as the authors' code does:
  - the stock modules: a patch embedding that crystal_ext loads as transformers' fused Linear
    (crystal_ext.model.runtime_fusions) runs as the stock Conv3d, on the same weight, and the
    RMSNorms that crystal_ext fuses run the stock module's forward;
  - every text layer: SDPA with the dense [B, 1, L, L] additive dual-path mask;
  - the last layer: additionally the full [B, H, L, L] attention probabilities, from which
    the alignment loss reads the E/F rows and D columns;
  - the full fp32 logits [B, L, V], for the cross entropy and again (as log-softmax copies of
    the E and F rows) for the prediction KL.
The one difference from the published code: the alignment loss covers every sample of the
batch (theirs takes sample 0 only), so that both compute the same number.

`train_new_rows_the_published_way`: the published trainable set for the new tokens' rows,
the whole embedding and LM-head matrices trainable with a gradient hook that zeroes every
other row (dense [V, Hd] gradients and optimizer states).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from crystal_ext.model.attention_registration import is_last_layer, is_text_decoder_attention
from crystal_ext.model.objective import CrystalLoss
from crystal_ext.model.parts import backbone_and_head, embedding_and_head_weights, text_config
from crystal_ext.model.rms_norm_fusion import fused_rms_norms, stock_class_of
from crystal_ext.model.runtime_fusions import fused_modules
from crystal_ext.ops.layout import IGNORE, dual_path_mask, segments_of

PUBLISHED_ATTN = "crystal_published_dense"
PROBS_KWARG = "published_outputs"


def published_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    slot = kwargs.pop(PROBS_KWARG, None)
    out = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    if slot is not None and is_text_decoder_attention(module) and is_last_layer(module):
        keys = repeat_kv(key, query.shape[1] // key.shape[1])
        scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling + attention_mask
        slot["probs"] = scores.softmax(dim=-1)  # [B, H, L, L]
    return out


def register_published_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PUBLISHED_ATTN, published_attention)
    AttentionMaskInterface.register(PUBLISHED_ATTN, sdpa_mask)
    return PUBLISHED_ATTN


class _StockConv3d(torch.nn.Module):
    """A fused patch embedding's Linear run as the stock Conv3d (F.conv3d on a view of its weight,
    so that the gradient reaches the Linear's weight)."""

    def __init__(self, linear, in_channels: int, kernel: tuple):
        super().__init__()
        self.__dict__["linear"] = linear  # not registered: the fused module already owns it
        self.kernel = tuple(kernel)
        self.in_channels = in_channels

    @property
    def weight(self):
        return self.linear.weight.view(self.linear.out_features, self.in_channels, *self.kernel)

    def forward(self, x):
        return F.conv3d(x, self.weight, self.linear.bias, stride=self.kernel)


@contextlib.contextmanager
def stock_modules(model):
    """Inside, every fused patch embedding of `model` runs its stock class's forward with the
    stock Conv3d on the fused Linear's weight, and every fused RMSNorm its stock class's forward:
    the model as the stock from_pretrained builds it."""
    fused = list(fused_modules(model).values())
    for m in fused:
        stock_class = type(m).__mro__[2]  # (Fused<class>, the fusion's mixin, <class>, ...)
        m.proj = _StockConv3d(m.linear_proj, m.proj_in_channels, m.proj_kernel_size)
        m.forward = types.MethodType(stock_class.forward, m)
    norms = list(fused_rms_norms(model).values())
    for m in norms:
        m.forward = types.MethodType(stock_class_of(m).forward, m)
    try:
        yield model
    finally:
        for m in fused:
            del m.proj, m.forward
        for m in norms:
            del m.forward


def published_step_loss_switched(model, batch) -> CrystalLoss:
    """published_step_loss on a model set up for our attention: switches its attention
    implementation to the published one and its modules to the stock ones (stock_modules) for
    the call and back afterwards (same weights)."""
    previous = text_config(model)._attn_implementation
    model.set_attn_implementation(register_published_attention())
    try:
        with stock_modules(model):
            return published_step_loss(model, batch)
    finally:
        model.set_attn_implementation(previous)


def published_step_loss(model, batch, topk_fraction=0.1, lambda_pred=1.0, lambda_attn=1.0) -> CrystalLoss:
    """CE + lambda_pred * KL_pred + lambda_attn * KL_attn the published way (see module doc).
    The model's text attention must be PUBLISHED_ATTN (register_published_attention())."""
    _, backbone, head = backbone_and_head(model)
    input_ids, targets, layout = batch["input_ids"], batch["targets"], batch["layout"]
    length = input_ids.shape[1]
    dtype = head.weight.dtype
    visible = dual_path_mask(layout, length)[:, None].to(input_ids.device)
    additive = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device)
    additive = additive.masked_fill(~visible, torch.finfo(dtype).min)
    slot: dict = {}
    hidden = backbone(
        input_ids=input_ids,
        position_ids=batch["position_ids"],
        attention_mask=additive,
        use_cache=False,
        **batch["images"],
        **{PROBS_KWARG: slot},
    ).last_hidden_state
    logits = head(hidden).float()  # [B, L, V], fp32
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE)
    probs = slot["probs"]
    kl_pred, kl_attn = [], []
    for b, seg in enumerate(segments_of(layout)):
        answer, copy, latent = slice(*seg.e), slice(*seg.f), slice(*seg.d)
        teacher = logits[b, answer].detach().log_softmax(-1)
        student = logits[b, copy].log_softmax(-1)
        per_row = (teacher.exp() * (teacher - student)).sum(-1)
        kl_pred.append(per_row.topk(max(1, int(topk_fraction * per_row.numel()))).values.mean())
        t = probs[b, :, answer, latent].float().mean(0)
        s = probs[b, :, copy, latent].float().mean(0)
        t = (t / (t.sum(-1, keepdim=True) + 1e-8)).detach()
        s = s / (s.sum(-1, keepdim=True) + 1e-8)
        kl_attn.append(F.kl_div(s.log(), t, reduction="batchmean"))
    kl_pred, kl_attn = torch.stack(kl_pred).mean(), torch.stack(kl_attn).mean()
    return CrystalLoss(ce + lambda_pred * kl_pred + lambda_attn * kl_attn, ce, kl_pred, kl_attn)


def train_new_rows_the_published_way(model, new_ids):
    """(the two matrices, hook handles): both made trainable, every row but `new_ids` masked out
    of their gradients by a hook. Keep the matrices out of weight decay (AdamW's decoupled
    decay would shrink the masked rows)."""
    mats = embedding_and_head_weights(model)
    handles = []
    for weight in mats:
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[torch.tensor(list(new_ids), device=weight.device)] = 1
        weight.requires_grad_(True)
        handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    return mats, handles

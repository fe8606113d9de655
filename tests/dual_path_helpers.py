"""Shared helpers of the dual-path tests: random layouts obeying the rules of docs/method.md; the
dense dual-path mask (optionally with a sliding window on positions and bidirectional image blocks,
dense_visibility) as an additive attention mask, a plain eager attention that records the last
layer's q and k, and the published loss formulas written out on
full logits and dense attention probabilities, the eager side of the objective's comparisons;
the two sides' gradients paired by parameter; a batch cast to another float precision."""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as Fn

from crystal_ext.ops.layout import IGNORE, dual_path_mask, segment_bounds, segments_of

DENSE_EAGER = "crystal_test_dense_eager"


def random_layout(batch: int, rng: random.Random, max_seg: int = 6, pad: int = 3):
    """A random valid layout [batch, 6, 2] and the padded length it needs.

    Sizes: |A| >= 0, |B| = |C| >= 0, |D| >= 1, |E| = |F| >= 1; each sample padded by up to
    `pad` positions beyond the longest sample.
    """
    rows, ends = [], []
    for _ in range(batch):
        a, bc, d, e = (
            rng.randint(0, max_seg),
            rng.randint(0, max_seg),
            rng.randint(1, 4),
            rng.randint(1, max_seg),
        )
        row = segment_bounds([a, bc, bc, d, e, e])
        rows.append(row)
        ends.append(row[-1][1])
    length = max(ends) + rng.randint(0, pad)
    return torch.tensor(rows, dtype=torch.long), length


def dense_additive_mask(layout: torch.Tensor, length: int, dtype=torch.float32) -> torch.Tensor:
    """The dense dual-path mask as a [B, 1, L, L] additive attention mask: 0 where a position is
    visible, the lowest value of `dtype` where it is not."""
    visible = dual_path_mask(layout, length)[:, None]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def dense_visibility(layout, length, positions=None, window=None, image_tokens=None) -> torch.Tensor:
    """Bool [B, L, L]: the dual-path rule of docs/method.md written out per sample, with Gemma's two
    rules on top, as the stock model applies them to an ordinary sequence: a key is visible to a row
    of its path when it is causal OR in the row's image block (a run of consecutive image tokens of
    the packed sequence: B's and C's runs are separate), AND, with a `window`, when the row's
    position minus the key's is below the window (positions: [B, L])."""
    visible = torch.zeros(layout.shape[0], length, length, dtype=torch.bool)
    for b, seg in enumerate(segments_of(layout)):
        path1 = [*seg.span("a"), *seg.span("c"), *seg.span("d"), *seg.span("e")]
        path2 = [*seg.span("a"), *seg.span("b"), *seg.span("d"), *seg.span("f")]
        run, block = -1, [-1] * length
        for i in range(length):
            if image_tokens is not None and bool(image_tokens[b, i]):
                run += i == 0 or not bool(image_tokens[b, i - 1])
                block[i] = run
        for path in (path1, path2):
            rows = path if path is path1 else [*seg.span("b"), *seg.span("f")]
            for r in rows:
                for c in path:
                    ok = c <= r or (block[r] >= 0 and block[r] == block[c])
                    if window is not None:
                        ok = ok and int(positions[b, r]) - int(positions[b, c]) < window
                    visible[b, r, c] = ok
    return visible


def additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    """A bool [B, L, L] visibility as a [B, 1, L, L] additive mask in `dtype`."""
    return torch.zeros(visible[:, None].shape, dtype=dtype).masked_fill(
        ~visible[:, None], torch.finfo(dtype).min
    )


def dense_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scale + mask) v written out (an AttentionInterface function, registered as
    DENSE_EAGER); records the q and k of the last text layer, or of the layer index the sink holds
    under "layer" (the layer the alignment loss reads), in the `crystal_test_sink` kwarg."""
    sink = kwargs.get("crystal_test_sink")
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ k.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    out = scores.softmax(-1) @ v
    layers = getattr(module.config, "num_hidden_layers", None)
    wanted = sink.get("layer", layers - 1) if sink is not None else None
    if sink is not None and getattr(module, "layer_idx", None) == wanted and module.is_causal:
        sink["q"], sink["k"], sink["scale"] = query, key, scaling
    return out.transpose(1, 2).contiguous(), None


def register_dense_eager() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(DENSE_EAGER, dense_eager_attention)
    AttentionMaskInterface.register(DENSE_EAGER, eager_mask)
    return DENSE_EAGER


def dense_mask_forward(model, batch, **kwargs):
    """`model` on `batch` with the dense dual-path mask as its 4-D additive attention mask (in the
    model's precision), the batch's position ids and image inputs; `kwargs` go to the forward."""
    additive = dense_additive_mask(batch["layout"], batch["input_ids"].shape[1], model.dtype)
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=additive,
        **batch["images"],
        **kwargs,
    )


def dense_eager_run(model, batch, attention_mask=None):
    """A copy of `model` through the plain attention above with a dense 4-D additive mask (the
    dual-path mask by default; a {layer type: mask} dict for models with several layer types):
    (full logits, the last layer's q, k, scale, the model copy)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation(register_dense_eager())
    sink = {}
    if attention_mask is None:
        out = dense_mask_forward(eager, batch, use_cache=False, crystal_test_sink=sink)
    else:
        out = eager(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=attention_mask,
            use_cache=False,
            crystal_test_sink=sink,
            **batch["images"],
        )
    return out.logits, sink["q"], sink["k"], sink["scale"], eager


def relative_error(got, want):
    """Largest difference relative to the largest value; a value that is zero up to rounding (the
    key-projection bias's gradient: softmax ignores a shift shared by all keys) is compared absolutely."""
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-9))


def objective_errors(ours, ours_model, logits, q, k, scale, reference_model, batch):
    """(relative errors of the objective's loss, its parts and every gradient, the gradient pairs)
    against the published formulas (plain_losses) on a reference forward's logits and last-layer
    q, k; `ours.loss` must have been backpropagated into `ours_model` already."""
    parts = plain_losses(logits, q, k, batch, scale)
    errors = [relative_error(got, want) for got, want in zip((ours.ce, ours.kl_pred, ours.kl_attn), parts)]
    sum(parts).backward()
    errors.append(relative_error(ours.loss, sum(parts).detach()))
    pairs = gradient_pairs(ours_model, reference_model)
    return errors + [relative_error(got, want) for _, got, want in pairs], pairs


def plain_losses(logits, q, k, batch, scale, probs=None):
    """(CE, KL_pred, KL_attn): the published formulas written out with full logits and dense
    attention probabilities, the last layer's: `probs` when given, else computed from its rotated
    q and k (grouped kv heads repeated) under the dense dual-path mask."""
    targets, layout = batch["targets"], batch["layout"]
    ce = Fn.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    if probs is None:
        mask = dual_path_mask(layout, targets.shape[1])[:, None]
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        probs = (q @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
    kl_pred, kl_attn = [], []
    for b, r in enumerate(layout.reshape(-1, 12).tolist()):
        (d0, d1), (e0, e1), (f0, f1) = r[6:8], r[8:10], r[10:12]
        t = logits[b, e0:e1].detach().log_softmax(-1)
        s = logits[b, f0:f1].log_softmax(-1)
        per_row = (t.exp() * (t - s)).sum(-1)
        kl_pred.append(per_row.topk(max(1, int(0.1 * per_row.numel()))).values.mean())
        tm = probs[b, :, e0:e1, d0:d1].mean(0)
        sm = probs[b, :, f0:f1, d0:d1].mean(0)
        tm = (tm / (tm.sum(-1, keepdim=True) + 1e-8)).detach()
        sm = sm / (sm.sum(-1, keepdim=True) + 1e-8)
        kl_attn.append(Fn.kl_div(sm.log(), tm, reduction="batchmean"))
    return ce, torch.stack(kl_pred).mean(), torch.stack(kl_attn).mean()


def gradient_pairs(model, other) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, its gradient in `model`, in `other`) for every parameter that has a gradient after
    the two copies' backward passes; a parameter with a gradient in one copy only fails the test."""
    others = dict(other.named_parameters())
    pairs = []
    for name, p in model.named_parameters():
        want = others[name].grad
        assert (p.grad is None) == (want is None), f"{name}: a gradient on one side only"
        if p.grad is not None:
            pairs.append((name, p.grad, want))
    return pairs


def cast_floats(batch: dict, dtype: torch.dtype) -> dict:
    """The batch with its floating-point tensors, the image inputs' included, cast to `dtype`."""

    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v

    return cast(batch)

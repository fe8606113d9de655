r"""The dual-path rule for text layers that are not attention: sequence mixers that carry a state
along the sequence (Qwen3.5's Gated DeltaNet linear attention with its short causal convolution,
LFM2's short convolution). docs/method.md, "Linear attention and short convolutions".

Such a layer has no mask to restrict: row r's output depends on every earlier row through the
scan. The dual-path rule (rows of A, C, D, E see A, C, D, E; rows of B, F see A, B, D, F) is kept
by scanning each path as its own contiguous sequence (the DualPathPlan's indices of
crystal_ext.model.dual_path_attention):

  path 1 = [A, C, D, E] -> gives the outputs of rows A, C, D, E
  path 2 = [A, B, D, F] -> gives the outputs of rows B, F (its A and D outputs are discarded:
                           the scan state at D differs, having run through B)

D's inputs at that layer are the packed sequence's, i.e. path 1's (D exists once), so path 2's
scan reads the latents computed on the intact path, as path 2's attention rows read path 1's D
keys. The two paths of a sample have the same length (|B| = |C|, |E| = |F|), so they run as two
sequences of one batch of 2 * batch (path 1 of every sample, then path 2 of every sample): no
state crosses samples or paths. Paths are padded at their END, which a causal scan never reads
back. Two ways to run them:

- gated_delta_rule_paths (Qwen3.5, Qwen3.5-MoE): the layer's own modules and its modelling file's
  kernel entry points (fla / causal_conv1d when installed, transformers' torch fallback
  otherwise). Per-token parts once per packed row, the convolution over each path, and the delta
  rule over A's whole chunks (shared_prefix) once, both paths continuing from the state at their
  end, so A's rows get gradient from both paths through it. Whole chunks keep the single-path
  scan's chunk boundaries, so path 1 keeps the stock model's float32 rounding.
- short_conv_paths (LFM2): the input projection, gates and output projection once per packed row,
  the 3-tap convolution over each path (its only state is its last inputs: nothing to share).
- path_scan (either family on transformers releases without those entry points): the stock
  forward on [2 * batch, P, hidden], with the valid slots as its 2-D padding mask.

Wiring: `use_path_scans(backbone)` (idempotent; called where the dual-path forward starts,
crystal_ext.model.objective.dual_path_hidden) gives every mixer module of the text decoder an
instance-level forward that splits into the two paths when the forward carries a dual-path
layout (the `crystal_layout` kwarg that transformers hands down to every layer), and calls the
stock forward unchanged otherwise (generation, the single-path baseline, the stock checks). It
stays installed, so gradient checkpointing's recomputation runs the same rule.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from crystal_ext.model.attention_registration import (
    _PLAN_KEY,
    IMAGE_TOKENS_KWARG,
    LAYOUT_KWARG,
    OUTPUTS_KWARG,
    _checked_layout,
)
from crystal_ext.model.dual_path_attention import DualPathPlan
from crystal_ext.model.parts import text_config_of

_OP = "path_scan"
_INSTALLED = "_crystal_path_scan"

# The stock sequence-mixer classes, by class name (transformers 5.25): each takes
# (hidden_states [batch, length, hidden], cache, attention_mask [batch, length]) and returns the
# mixed hidden states of the same shape.
MIXER_CLASSES = frozenset({"Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "Lfm2ShortConv"})


def is_sequence_mixer(module) -> bool:
    return type(module).__name__ in MIXER_CLASSES


def sequence_mixers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if is_sequence_mixer(m)]


def _plan(hidden: torch.Tensor, layout, outputs: dict | None, image_tokens) -> DualPathPlan:
    """The forward's plan (shared with the attention layers through the output slot)."""
    as_heads = hidden.unsqueeze(1)  # [batch, 1, length, hidden]: the shape the plan checks
    plan = outputs.get(_PLAN_KEY) if outputs is not None else None
    if plan is None or not plan.matches(as_heads):
        plan = DualPathPlan(_checked_layout(layout, outputs, as_heads), hidden.device, image_tokens)
        if outputs is not None:
            outputs[_PLAN_KEY] = plan
    return plan


def _path_rows(plan: DualPathPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, index), both [2 * batch, P]: packed row index[i, t] of sample rows[i] is slot t of
    path 1 of every sample, then path 2 of every sample."""
    index = torch.cat([plan.idx1, plan.idx2])
    rows = torch.arange(plan.batch, device=index.device).repeat(2)[:, None]
    return rows.expand_as(index), index


def _to_packed(out: torch.Tensor, plan: DualPathPlan) -> torch.Tensor:
    """Per-path outputs [2 * batch, P, ...] back to packed rows [batch, length, ...]: A, C, D, E
    from path 1, B and F from path 2, zeros after F.end."""
    batch, trailing = plan.batch, out.shape[2:]
    out = out.flatten(2)
    zero_row = out.new_zeros(batch, 1, out.shape[-1])
    # plan.src points into [path 1 slots, path 2 slots, zero row] of each sample.
    both = torch.cat([out[:batch], out[batch:], zero_row], dim=1)
    packed = both.gather(1, plan.src[:, :, None].expand(-1, -1, out.shape[-1]))
    return packed.unflatten(2, trailing)


def path_scan(stock_forward, hidden_states: torch.Tensor, plan: DualPathPlan, **kwargs) -> torch.Tensor:
    """The dual-path output [batch, length, hidden] of a sequence mixer whose stock forward is
    `stock_forward(hidden_states=..., cache=None, attention_mask=..., **kwargs)`, run on both paths
    whole; rows after F.end are zeros."""
    if hidden_states.dim() != 3:
        raise ValueError(
            f"{_OP}: hidden_states must be [batch, length, hidden], got {list(hidden_states.shape)}"
        )
    rows, index = _path_rows(plan)
    valid = torch.cat([plan.valid, plan.valid]).long()
    out = stock_forward(hidden_states=hidden_states[rows, index], cache=None, attention_mask=valid, **kwargs)
    return _to_packed(out, plan)


# The chunk length of the gated delta rule's chunked kernels (transformers' torch fallback and
# fla's): a prefix of whole chunks ends where the single-path scan's chunk loop carries its state.
CHUNK = 64


def shared_prefix(segments) -> int:
    """How many leading tokens of A the gated delta rule scans once for both paths: the whole
    chunks of the batch's shortest A (`segments`: the Segments of each sample)."""
    return CHUNK * (min(seg.size("a") for seg in segments) // CHUNK)


def gated_delta_rule_paths(mixer, hidden_states: torch.Tensor, plan: DualPathPlan) -> torch.Tensor:
    """The dual-path output [batch, length, hidden] of a Gated DeltaNet layer (Qwen3.5), from its
    own modules and its modelling file's kernels: the per-token projections, gates, norm and
    output projection once per packed row; the causal convolution on each path; the delta rule
    over A's shared prefix once, then over the rest of both paths from the state at its end."""
    if hidden_states.dim() != 3:
        raise ValueError(
            f"{_OP}: hidden_states must be [batch, length, hidden], got {list(hidden_states.shape)}"
        )
    # The modelling file's kernel entry points pick fla / causal_conv1d when installed.
    kernels = sys.modules[type(mixer).__module__]
    batch, length, _ = hidden_states.shape
    qkv = mixer.in_proj_qkv(hidden_states)
    z = mixer.in_proj_z(hidden_states).unflatten(-1, (-1, mixer.head_v_dim))
    beta = mixer.in_proj_b(hidden_states).sigmoid()
    # In float32 as the stock forward computes it: A_log.exp() could overflow in half precision.
    g = -mixer.A_log.float().exp() * F.softplus(mixer.in_proj_a(hidden_states).float() + mixer.dt_bias)

    rows, index = _path_rows(plan)
    # The 4-tap convolution is no scan: run over each whole path, A included.
    mixed = kernels.causal_conv1d_forward(
        mixer.conv1d, qkv[rows, index].transpose(1, 2), None, mixer.layer_idx, activation=mixer.activation
    ).transpose(1, 2)
    q, k, v = mixed.split([mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
    q, k = (t.unflatten(-1, (-1, mixer.head_k_dim)) for t in (q, k))
    v = v.unflatten(-1, (-1, mixer.head_v_dim))
    g, beta = g[rows, index], beta[rows, index]

    def delta_rule(span: slice, paths: slice, initial_state=None, final_state=False):
        return kernels.torch_chunk_gated_delta_rule(
            *(t[paths, span] for t in (q, k, v)),
            g=g[paths, span],
            beta=beta[paths, span],
            initial_state=initial_state,
            output_final_state=final_state,
            use_qk_l2norm_in_kernel=True,
        )

    n = shared_prefix(plan.segments)
    if n:
        # A's first n tokens are the same on both paths: path 1's slots hold them.
        prefix, state = delta_rule(slice(0, n), slice(0, batch), final_state=True)
        rest, _ = delta_rule(slice(n, None), slice(None), initial_state=torch.cat([state, state]))
        core = torch.cat([torch.cat([prefix, prefix]), rest], dim=1)
    else:
        core, _ = delta_rule(slice(None), slice(None))

    core = _to_packed(core, plan)  # [batch, length, value heads, head_v_dim]
    out = mixer.norm(core.flatten(0, 2), z.flatten(0, 2)).reshape(batch, length, -1)
    return mixer.out_proj(out)


def short_conv_paths(mixer, hidden_states: torch.Tensor, plan: DualPathPlan) -> torch.Tensor:
    """The dual-path output [batch, length, hidden] of an LFM2 short-convolution layer, from its own
    modules and its modelling file's causal_conv1d_forward: the input projection, the gates and the
    output projection once per packed row (as the stock forward computes them, per token), the
    causal convolution on each path. Its only state is the last kernel_size - 1 inputs, so nothing of
    A is scanned once: the gain over path_scan is the per-token work on |A| + |D| rows fewer."""
    if hidden_states.dim() != 3:
        raise ValueError(
            f"{_OP}: hidden_states must be [batch, length, hidden], got {list(hidden_states.shape)}"
        )
    kernels = sys.modules[type(mixer).__module__]
    b, c, x = mixer.in_proj(hidden_states).chunk(3, dim=-1)
    rows, index = _path_rows(plan)
    conv = kernels.causal_conv1d_forward(
        mixer.conv, (b * x)[rows, index].transpose(1, 2), None, mixer.layer_idx
    )
    return mixer.out_proj(c * _to_packed(conv.transpose(1, 2), plan))


# The mixers whose dual path is put together from their parts, and the modelling file's entry
# points that needs (transformers 5.25 has them; earlier releases keep the kernels as module
# attributes instead, and path_scan runs the stock forward on each whole path there).
FROM_PARTS = {
    "Qwen3_5GatedDeltaNet": (
        gated_delta_rule_paths,
        ("causal_conv1d_forward", "torch_chunk_gated_delta_rule"),
    ),
    "Qwen3_5MoeGatedDeltaNet": (
        gated_delta_rule_paths,
        ("causal_conv1d_forward", "torch_chunk_gated_delta_rule"),
    ),
    "Lfm2ShortConv": (short_conv_paths, ("causal_conv1d_forward",)),
}


def parts_forward(mixer):
    """The function that runs `mixer`'s dual path from its parts (gated_delta_rule_paths,
    short_conv_paths), or None: then path_scan runs its stock forward on each whole path."""
    entry = FROM_PARTS.get(type(mixer).__name__)
    kernels = sys.modules[type(mixer).__module__]
    if entry is None or not all(hasattr(kernels, name) for name in entry[1]):
        return None
    return entry[0]


def _dual_path_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """The instance forward of a sequence mixer (the stock signature): the stock forward, split
    into the two paths when the call carries a dual-path layout."""
    stock = type(self).forward.__get__(self)
    layout = kwargs.pop(LAYOUT_KWARG, None)
    outputs = kwargs.pop(OUTPUTS_KWARG, None)
    image_tokens = kwargs.pop(IMAGE_TOKENS_KWARG, None)
    if layout is None:
        return stock(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if cache is not None or kwargs.get("cache_params") is not None:
        raise ValueError(
            f"{_OP}: a dual-path layout needs the whole packed sequence in one call; do not pass a cache "
            "when training"
        )
    # attention_mask is not used: the layout says which positions are padding.
    plan = _plan(hidden_states, layout, outputs, image_tokens)
    from_parts = parts_forward(self)
    if from_parts is not None:
        return from_parts(self, hidden_states, plan)
    return path_scan(stock, hidden_states, plan, **kwargs)


# The text layer types whose mixer is one of MIXER_CLASSES.
SCANNED_LAYER_TYPES = frozenset({"linear_attention", "conv"})


def use_path_scans(module: torch.nn.Module) -> int:
    """Give every sequence mixer inside `module` (a backbone) the dual-path forward (idempotent);
    returns how many mixers it holds. Raises when its config names more scanned layers than it
    holds known mixers: such a layer would scan the packed sequence, both paths as one."""
    mixers = sequence_mixers(module)
    config = getattr(module, "config", None)
    text = text_config_of(config)
    layer_types = list(getattr(text, "layer_types", None) or ())
    scanned = sum(t in SCANNED_LAYER_TYPES for t in layer_types)
    if scanned > len(mixers):
        raise ValueError(
            f"{_OP}: the text config has {scanned} layers of types "
            f"{sorted(SCANNED_LAYER_TYPES & set(layer_types))} but {type(module).__name__} holds "
            f"{len(mixers)} known sequence mixers ({', '.join(sorted(MIXER_CLASSES))})"
        )
    for mixer in mixers:
        if not getattr(mixer, _INSTALLED, False):
            mixer.forward = types.MethodType(_dual_path_forward, mixer)
            setattr(mixer, _INSTALLED, True)
    return len(mixers)

"""Argument checks shared by the fused ops and their plain-PyTorch references.

Imports neither the fused op modules nor the references, so that the references stay independent
of the compiled code (importing them registers no custom op). Every error names the argument.
"""

from __future__ import annotations

import torch


def check_qk(q: torch.Tensor, k: torch.Tensor, op: str) -> None:
    """q [batch, heads, length, head_dim] and k [batch, kv_heads, length, head_dim] of one dtype and
    device, heads a multiple of kv_heads; errors name the argument."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D [batch, heads, length, head_dim]")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"{op}: k must be 4-D [batch, kv_heads, length, head_dim]")
    if k.dtype != q.dtype:
        raise ValueError(f"{op}: k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise RuntimeError(f"{op}: k must be on the device of q ({q.device}), got {k.device}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(
            f"{op}: k {list(k.shape)} does not match q {list(q.shape)} in batch, length or head_dim"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{op}: the heads of q ({q.shape[1]}) must be a multiple of the kv_heads of k ({k.shape[1]})"
        )


def check_override(
    weight: torch.Tensor, override_ids, override_rows, op: str, check_values: bool = True
) -> bool:
    """True when an override is given (both arguments), after checking it; errors name the argument.

    Shapes, dtypes and devices are checked on every call. The ids' values (in [0, V), no
    duplicates) are checked only when they are on the CPU, a free read there: ids on a GPU
    would have to be copied back, which waits for it, so they are checked where they are made
    (crystal_ext.model.new_token_rows.NewTokenRows checks its ids once, on creation). The fused
    op passes check_values=False: its CPU kernel checks them itself, and a value read here would
    break a torch.compile graph."""
    if override_ids is None and override_rows is None:
        return False
    if override_ids is None or override_rows is None:
        raise ValueError(f"{op}: override_ids and override_rows must be given together")
    if not isinstance(override_ids, torch.Tensor) or override_ids.dim() != 1:
        raise ValueError(f"{op}: override_ids must be a 1-D int64 tensor")
    if override_ids.dtype != torch.long:
        raise ValueError(f"{op}: override_ids must be int64, got {override_ids.dtype}")
    vocab, width = weight.shape
    n = override_ids.numel()
    if not isinstance(override_rows, torch.Tensor) or tuple(override_rows.shape) != (n, width):
        got = list(override_rows.shape) if isinstance(override_rows, torch.Tensor) else type(override_rows)
        raise ValueError(f"{op}: override_rows must be [{n}, {width}] (len(override_ids), Hd), got {got}")
    if not override_rows.is_floating_point():
        raise ValueError(f"{op}: override_rows must be floating point, got {override_rows.dtype}")
    if override_ids.device != weight.device or override_rows.device != weight.device:
        raise RuntimeError(
            f"{op}: override_ids and override_rows must be on the weight's device ({weight.device})"
        )
    if torch.is_grad_enabled() and weight.is_leaf and weight.requires_grad:
        # The override columns train through override_rows and the kernels give the weight no
        # gradient: a head parameter that requires one would silently not be trained. (A view,
        # e.g. FSDP's head inside a flat parameter of trained pieces, is the caller's to freeze.)
        raise ValueError(
            f"{op}: with override rows the head is frozen, but weight requires grad; train the whole "
            "head without override rows, or freeze it (weight.requires_grad_(False))"
        )
    if check_values and override_ids.device.type == "cpu":
        check_override_ids(override_ids, vocab, op)
    return True


def check_override_ids(ids: torch.Tensor, vocab: int, op: str) -> None:
    """The ids' values: in [0, vocab) and without duplicates (read on the host)."""
    ids = ids.cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{op}: override_ids must be in [0, {vocab}), got {ids.tolist()}")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{op}: override_ids has duplicates: {ids.tolist()}")

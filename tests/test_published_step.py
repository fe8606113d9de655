"""The published-recipe step kept in benchmarks/ computes the same loss as ours, so the
whole-step benchmark compares equal work."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from dual_path_helpers import gradient_pairs

import crystal_ext
from crystal_ext.model.objective import crystal_objective

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import step_models  # noqa: E402
from published_step import published_step_loss, register_published_attention  # noqa: E402

pytestmark = pytest.mark.skipif(not crystal_ext.extension_available(), reason="needs the fused ops")


def test_published_step_equals_ours_fp32():
    crystal_ext.register_dual_path_attention()
    published = register_published_attention()
    model, batch = step_models.build("tiny", crystal_ext.ATTN_IMPLEMENTATION, batch_size=3)
    theirs_model = copy.deepcopy(model)
    theirs_model.set_attn_implementation(published)
    ours = crystal_objective(model, batch)
    theirs = published_step_loss(theirs_model, batch)
    for got, want in zip(
        (ours.loss, ours.ce, ours.kl_pred, ours.kl_attn),
        (theirs.loss, theirs.ce, theirs.kl_pred, theirs.kl_attn),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert ours.kl_attn > 0 and ours.kl_pred > 0
    ours.loss.backward()
    theirs.loss.backward()
    pairs = gradient_pairs(model, theirs_model)
    for name, got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(pairs) == trainable, f"gradients compared for {len(pairs)} of {trainable} trainable parameters"
    assert model.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0  # the loss reaches the image side


def test_published_step_runs_the_stock_conv3d_patch_embedding():
    """Ours builds the model with the patch embedding as transformers' fused Linear
    (crystal_ext.model.runtime_fusions); the published step switches it back to the stock Conv3d
    for its call, on the same weight, whose gradient it fills."""
    from published_step import published_step_loss_switched

    crystal_ext.register_dual_path_attention()
    model, batch = step_models.build("tiny", crystal_ext.ATTN_IMPLEMENTATION, batch_size=2)
    patch_embed = model.model.visual.patch_embed
    assert hasattr(patch_embed, "linear_proj"), "the benchmark model is built fused"
    convolutions = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: (
            convolutions.append(type(m).__name__) if m is getattr(patch_embed, "proj", None) else None
        )
    )
    try:
        theirs = published_step_loss_switched(model, batch)
    finally:
        hook.remove()
    assert convolutions == ["_StockConv3d"] and not hasattr(patch_embed, "proj")
    theirs.loss.backward()
    want = patch_embed.linear_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    ours = crystal_objective(model, batch)
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(patch_embed.linear_proj.weight.grad, want, rtol=1e-4, atol=1e-6)


def test_published_step_runs_the_stock_rms_norms(monkeypatch):
    """Ours builds the model with the fused RMSNorm (crystal_ext.model.rms_norm_fusion); the
    published step runs every norm's stock forward, and ours the fused op afterwards."""
    import importlib

    from published_step import published_step_loss_switched

    from crystal_ext.model.rms_norm_fusion import fused_rms_norms

    crystal_ext.register_dual_path_attention()
    model, batch = step_models.build("tiny", crystal_ext.ATTN_IMPLEMENTATION, batch_size=1)
    norms = fused_rms_norms(model)
    assert len(norms) >= 5, "the benchmark model is built with fused norms"
    op_module = importlib.import_module("crystal_ext.ops.rms_norm")
    calls = []
    real = op_module.rms_norm
    monkeypatch.setattr(op_module, "rms_norm", lambda *a: calls.append(1) or real(*a))
    published_step_loss_switched(model, batch)
    assert calls == []
    crystal_objective(model, batch)
    assert len(calls) == len(
        norms
    )  # each runs once: the vision tower once, the text layers on the packed rows
    assert all("forward" not in m.__dict__ for m in norms.values())

"""crystal_ext builds and loads models through transformers' patch-embedding fusion
(crystal_ext.model.runtime_fusions): in every family whose patch embedding is a Conv3d with kernel
== stride it runs as a Linear, the objective and every gradient equal those of the stock model
with the Conv3d (float64), and the model saves as the stock checkpoint. The other families keep
their modules."""

from __future__ import annotations

import pytest
import torch
from dual_path_helpers import cast_floats
from family_models import FAMILIES, LINEAR_FAMILIES, build, build_linear
from safetensors import safe_open
from test_families import _examples

import crystal_ext
from crystal_ext.data.packing import DualPathCollator, DualPathPacker
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.lora import apply_lora
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective
from crystal_ext.model.runtime_fusions import (
    fused_modules,
    load_pretrained,
    without_fusion_config,
)
from crystal_ext.training.run_loading import merge

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the objective needs the compiled extension"
)
CONV3D_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")
REFERENCE_HEAD = ObjectiveConfig(lm_head_losses="reference")


def _build(family):
    register_dual_path_attention()
    if family in LINEAR_FAMILIES:
        return build_linear(family, ATTN_IMPLEMENTATION)
    return build(family, attn_implementation=ATTN_IMPLEMENTATION)


def _conv3d_patch_embeddings(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)]


def _batch(model, processor, latent):
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples())
    return cast_floats(batch, torch.float64)


def _stock_twin(model, folder):
    """The model saved with a stock config and loaded by plain from_pretrained: Conv3d again."""
    with without_fusion_config(model):
        model.save_pretrained(folder)
    stock = type(model).from_pretrained(folder, dtype=torch.float64, attn_implementation=ATTN_IMPLEMENTATION)
    if hasattr(stock, "set_experts_implementation"):
        stock.set_experts_implementation("eager")  # as family_models builds MoE models: float64
    return stock.eval()


@pytest.mark.parametrize("family", CONV3D_FAMILIES)
def test_the_patch_embedding_runs_as_a_linear_with_the_stock_objective_and_gradients(family, tmp_path):
    fused, processor, latent = _build(family)
    fused = fused.double()
    assert _conv3d_patch_embeddings(fused) == []
    stock = _stock_twin(fused, tmp_path)
    assert len(_conv3d_patch_embeddings(stock)) == 1
    batch = _batch(fused, processor, latent)
    ours = crystal_objective(fused, batch, REFERENCE_HEAD)
    ours.loss.backward()
    want = crystal_objective(stock, batch, REFERENCE_HEAD)
    want.loss.backward()
    assert ours.kl_attn > 0 and ours.kl_pred > 0
    for part in ("loss", "ce", "kl_attn", "kl_pred"):
        assert torch.allclose(getattr(ours, part), getattr(want, part), rtol=1e-12, atol=0), part
    stock_params = dict(stock.named_parameters())
    compared = 0
    for name, p in fused.named_parameters():
        q = stock_params[name.replace("patch_embed.linear_proj.", "patch_embed.proj.")]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad.reshape(p.grad.shape), rtol=1e-9, atol=1e-12), name
            compared += "patch_embed" in name
    assert compared >= 1, "the patch embedding's weight got no gradient"


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_what_is_saved_is_the_stock_checkpoint_and_loads_fused_again(family, tmp_path):
    fused, processor, _ = _build(family)
    fused.save_pretrained(tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as saved:
        kernel = [k for k in saved.keys() if "patch_embed" in k]
        assert kernel and all(k.endswith("patch_embed.proj.weight") for k in kernel), kernel
        assert saved.get_tensor(kernel[0]).dim() == 5
    again = load_pretrained(str(tmp_path / "run"), torch.float32)
    assert _conv3d_patch_embeddings(again) == []
    merged = merge(again, processor, str(tmp_path / "merged"))
    plain = type(fused).from_pretrained(merged)
    assert not hasattr(plain.config, "fusion_config"), "merge writes a stock config.json"
    assert len(_conv3d_patch_embeddings(plain)) == 1
    pixels = torch.randn(16, fused.model.visual.patch_embed.linear_proj.in_features)
    assert torch.allclose(
        plain.model.visual.patch_embed(pixels), fused.model.visual.patch_embed(pixels), atol=1e-5
    )


@pytest.mark.parametrize("family", CONV3D_FAMILIES)
def test_lora_targets_only_layers_the_stock_model_has(family, tmp_path):
    # GLM-4V's family targets every linear layer of the vision tower: the fused patch embedding
    # would be one, and its adapter would not load onto the stock model (a Conv3d there).
    fused, _, _ = _build(family)
    stock_names = {name for name, _ in _stock_twin(fused, tmp_path).named_modules()}
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in apply_lora(fused).named_modules()
        if hasattr(module, "lora_A")
    }
    assert wrapped and wrapped <= stock_names, sorted(wrapped - stock_names)
    assert not any("patch_embed" in name for name in wrapped)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in CONV3D_FAMILIES])
def test_other_families_keep_their_patch_embeddings(family):
    model, _, _ = _build(family)
    assert fused_modules(model) == {}

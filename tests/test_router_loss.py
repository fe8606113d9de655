"""The router load-balancing loss of a mixture-of-experts model whose config asks for it
(`output_router_logits`, `router_aux_loss_coef`): the objective adds the stock forward's term,
computed on path 1's routing (the sequence the stock model sees); the single-path baseline equals
the stock model's own training loss, value and every gradient."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as Fn
from family_models import build
from test_families import _examples

import crystal_ext
from crystal_ext.data.packing import DualPathCollator, DualPathPacker
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.families import UnsupportedModel, family_of
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective, intact_path_batch
from crystal_ext.ops.layout import IGNORE

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the objective runs the fused alignment loss"
)
COEF = 0.25
REFERENCE_HEAD = ObjectiveConfig(lm_head_losses="reference")


@functools.cache
def _setup():
    register_dual_path_attention()
    model, processor, latent = build("qwen3_vl_moe", attn_implementation=ATTN_IMPLEMENTATION)
    model.config.text_config.output_router_logits = True
    model.config.text_config.router_aux_loss_coef = COEF
    model = model.double()
    packer = DualPathPacker(processor, latent, model, system="you are a helpful assistant")
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(_examples())
    batch = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in batch.items()
    }
    batch["images"] = {k: v.double() if v.is_floating_point() else v for k, v in batch["images"].items()}
    batch["intact_images"] = {
        k: v.double() if v.is_floating_point() else v for k, v in batch["intact_images"].items()
    }
    return model, batch


def _stock(model, batch):
    """The stock model's own forward on the single path [A, C, D, E] (its attention and positions)
    and its training loss, CE + router_aux_loss_coef x aux_loss as its forward adds them, with the
    CE taken in float64 (the stock loss function upcasts the logits to float32 only)."""
    single = intact_path_batch(batch)
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("eager")
    out = stock(
        input_ids=single["input_ids"],
        attention_mask=single["attention_mask"],
        mm_token_type_ids=(single["input_ids"] == stock.config.image_token_id).long(),
        **single["images"],
    )
    ce = Fn.cross_entropy(out.logits.flatten(0, 1), single["targets"].flatten(), ignore_index=IGNORE)
    return out, ce + stock.config.text_config.router_aux_loss_coef * out.aux_loss, stock


def test_the_objective_adds_the_stock_router_term_on_path_1():
    model, batch = _setup()
    ours = crystal_objective(copy.deepcopy(model), batch, REFERENCE_HEAD)
    added = ours.loss - (ours.ce + ours.kl_pred + ours.kl_attn)
    out, _, _ = _stock(model, batch)
    want = COEF * out.aux_loss
    print(f"\nrouter term {float(added):.6f}, stock {float(want):.6f}")
    assert float(want) > 0.1 and abs(float(added - want)) < 1e-9 * float(want)


def test_the_baseline_equals_the_stock_training_loss_and_gradients():
    model, batch = _setup()
    ours_model = copy.deepcopy(model)
    ours = crystal_objective(ours_model, batch, ObjectiveConfig(crystal=False, lm_head_losses="reference"))
    ours.loss.backward()
    _, loss, stock = _stock(model, batch)
    loss.backward()
    assert abs(float(ours.loss - loss)) < 1e-9 * float(loss)
    assert float(ours.loss - ours.ce) > 0.1  # the router term is in the loss
    stock_params = dict(stock.named_parameters())
    compared = 0
    for name, p in ours_model.named_parameters():
        want = stock_params[name].grad
        if p.grad is None or want is None:
            assert p.grad is None and (want is None or not want.abs().sum()), name
            continue
        error = float((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-12))
        # The router's softmax runs in float32 even in a float64 model: an input that differs by
        # rounding between the two attentions can flip a float32 ulp (about 1e-7).
        assert error < 1e-6, (name, error)
        compared += "gate" in name
    assert compared >= 2  # the routers' weights, which only the router term and the CE reach


def test_a_router_loss_that_cannot_be_reproduced_is_refused():
    text = SimpleNamespace(output_router_logits=True, router_aux_loss_coef=0.01, num_experts=4)
    config = SimpleNamespace(model_type="newmoevlm", get_text_config=lambda: text)
    with pytest.raises(
        UnsupportedModel, match=r"newmoevlm.*router_aux_loss_coef \(0.01\).*set output_router_logits"
    ):
        family_of(config)

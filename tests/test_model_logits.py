"""The model's own logits read from its config (crystal_ext.model.families.logits): which VLM
forward applies which field, where the field lives, and what is refused."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from crystal_ext.model.families import UnsupportedModel, family_of
from crystal_ext.model.families.logits import LogitTransform, logit_transform
from crystal_ext.ops.model_logits import check_logit_transform, model_logits


def _config(model_type: str, text: dict | None = None, **kwargs):
    return transformers.AutoConfig.for_model(model_type, text_config=text, **kwargs)


def test_aya_vision_multiplies_by_its_text_models_logit_scale():
    config = _config("aya_vision", {"model_type": "cohere", "logit_scale": 0.125})
    assert family_of(config).logit_transform(config) == LogitTransform(0.125, None)


def test_granite_docling_and_granite4_vision_divide_by_logits_scaling():
    for model_type in ("granite_docling", "granite4_vision"):
        config = _config(model_type, {"logits_scaling": 8.0})
        assert logit_transform(config) == LogitTransform(0.125, None), model_type


def test_hyperclovax_vision_multiplies_by_logits_scaling():
    config = _config("hyperclovax_vision_v2", {"logits_scaling": 0.5})
    assert logit_transform(config) == LogitTransform(0.5, None)


def test_cohere_compass_without_a_scale_keeps_the_heads_output():
    assert logit_transform(_config("cohere_compass")) == LogitTransform()


def test_muse_scales_then_soft_caps():
    config = _config("muse_glimmer")
    text = config.get_text_config()
    want = LogitTransform(text.output_multiplier, text.final_logit_softcapping)
    assert logit_transform(config) == want and want.softcap == 20.0


def test_paligemma_soft_caps_only_when_its_text_config_says_so():
    assert logit_transform(_config("paligemma")) == LogitTransform()
    config = _config("paligemma", {"model_type": "gemma2", "final_logit_softcapping": 30.0})
    assert logit_transform(config) == LogitTransform(1.0, 30.0)


@pytest.mark.parametrize("model_type", ["llava_next", "idefics3"])
def test_a_wrapper_that_ignores_its_text_models_scaling_keeps_the_heads_output(model_type):
    """Granite-Vision (LLaVA-NeXT with a Granite text model) and Idefics3 with one: their forward
    returns the head's output as it is, so the objective must not divide by logits_scaling."""
    config = _config(model_type, {"model_type": "granite", "logits_scaling": 8.0})
    assert family_of(config).logit_transform(config) == LogitTransform()


def test_an_unread_model_type_with_a_logit_field_is_refused_before_loading():
    config = transformers.LlavaConfig(text_config={"model_type": "granite", "logits_scaling": 8.0})
    config.model_type = "newvlm"
    with pytest.raises(UnsupportedModel, match=r"newvlm.*logits_scaling = 8\.0.*not known"):
        family_of(config)
    config.text_config.logits_scaling = 1.0  # the identity: nothing to reproduce
    assert family_of(config).logit_transform(config) == LogitTransform()


def test_model_logits_formula():
    raw = torch.tensor([-math.inf, -3.0, 0.0, 2.0, 100.0], dtype=torch.float64)
    z = model_logits(raw, 0.5, 4.0)
    want = 4.0 * torch.tanh(raw * 0.5 / 4.0)
    assert torch.equal(z, want) and z[0] == -4.0
    assert torch.equal(model_logits(raw), raw)
    assert torch.equal(LogitTransform(2.0).apply(raw), raw * 2.0)


@pytest.mark.parametrize(
    "scale, cap, match",
    [
        (0.0, None, "logit_scale must be finite and > 0"),
        (-1.0, None, "logit_scale must be finite and > 0"),
        (math.inf, None, "logit_scale must be finite and > 0"),
        (math.nan, None, "logit_scale must be finite and > 0"),
        (True, None, "logit_scale must be a number"),
        (1.0, -2.0, "logit_softcap must be None, 0"),
        (1.0, math.inf, "logit_softcap must be None, 0"),
        (1.0, math.nan, "logit_softcap must be None, 0"),
        (1.0, "30", "logit_softcap must be None or a number"),
    ],
)
def test_bad_transform_names_the_argument(scale, cap, match):
    with pytest.raises(ValueError, match=match):
        check_logit_transform(scale, cap, "op")


def test_off_values_of_the_soft_cap():
    assert check_logit_transform(2, None, "op") == (2.0, 0.0)
    assert check_logit_transform(2, 0, "op") == (2.0, 0.0)

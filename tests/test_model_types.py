"""Every model type of transformers' image-text-to-text mapping, with its default config, is
exactly one of: in a tested family; generic (a plain causal decoder-only VLM with image tokens
inline, listed by architecture); refused by `family_of` from its config and classes alone, with
the reason. Also the config checks behind the refusals, one by one."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from crystal_ext.model.families import TESTED_MODEL_TYPES, UnsupportedModel, classify, family_of
from crystal_ext.model.families.generic import GENERIC_BY_ARCHITECTURE
from crystal_ext.model.families.own_positions import own_position_function


def _default_config(model_type):
    from transformers import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type]()


def test_every_image_text_to_text_type_is_tested_generic_or_refused():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    table = {t: classify(_default_config(t)) for t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
    print()
    for model_type, (kind, why) in sorted(table.items()):
        print(f"{model_type:24s} {kind:8s} {why}")
    kinds = {k for k, _ in table.values()}
    assert kinds <= {"tested", "generic", "refused"}
    for model_type, (kind, why) in table.items():
        assert why, model_type
        if kind == "tested":
            assert model_type in TESTED_MODEL_TYPES
        elif kind == "generic":  # accepted untested only when listed by architecture
            assert model_type in GENERIC_BY_ARCHITECTURE, f"{model_type} is accepted without a classification"
        else:
            assert model_type not in TESTED_MODEL_TYPES or "sliding" in why
    counts = {k: sum(v[0] == k for v in table.values()) for k in ("tested", "generic", "refused")}
    print(counts)
    # The kinds of model the dual path cannot run are all refused.
    for model_type in ("florence2", "pix2struct", "udop", "vision-encoder-decoder", "idefics", "mllama",
                       "pi0", "pi05", "paligemma", "chameleon", "emu3", "gemma3n"):  # fmt: skip
        assert table[model_type][0] == "refused", model_type


@pytest.mark.parametrize(
    "model_type", ["glm4v_moe", "glm46v", "glm_ocr", "paddleocr_vl", "ernie4_5_vl_moe", "hunyuan_vl",
                   "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker", "cohere_compass", "cosmos3_edge",
                   "cosmos3_omni"],
)  # fmt: skip
def test_own_position_functions_without_an_adapter_are_refused(model_type):
    """Found from the model's classes (get_rope_index), not from its name."""
    config = _default_config(model_type)
    assert own_position_function(config)
    with pytest.raises(
        UnsupportedModel, match=rf"'{model_type}'.*numbers its positions itself.*get_rope_index"
    ):
        family_of(config)


def test_own_positions_are_found_from_the_classes_and_rope_parameters():
    assert own_position_function(_default_config("glm4v")) == "Glm4vModel.get_rope_index"
    assert own_position_function(_default_config("llava")) is None
    # A type transformers does not know, with multimodal rope parameters in its text config.
    text = SimpleNamespace(rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]})
    config = SimpleNamespace(model_type="newvlm", get_text_config=lambda: text)
    assert "mrope_section" in own_position_function(config)
    with pytest.raises(UnsupportedModel, match="newvlm.*numbers its positions itself"):
        family_of(config)


def test_encoder_decoder_and_rescaled_logits_are_refused():
    with pytest.raises(UnsupportedModel, match="encoder-decoder"):
        family_of(SimpleNamespace(model_type="newvlm", is_encoder_decoder=True))
    with pytest.raises(UnsupportedModel, match=r"sets logits_scaling = 4.0, and whether its forward applies"):
        family_of(SimpleNamespace(model_type="newvlm", logits_scaling=4.0))
    assert family_of(SimpleNamespace(model_type="newvlm", logits_scaling=1.0)).position_rows == 1


def test_a_tested_family_is_still_refused_when_its_config_asks_for_what_the_dual_path_does_not_do():
    config = _default_config("mistral3")
    config.text_config.sliding_window = 4096
    with pytest.raises(UnsupportedModel, match="mistral3.*sliding window"):
        family_of(config)

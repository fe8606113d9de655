"""An image or video placeholder token is never answer text: the latent-carried evaluation stops an
answer there instead of packing it back (which made Qwen3-VL's get_rope_index look for an image
that is not there: StopIteration at the end of a run), and the packer skips a record whose answer
holds one, with the reason."""

from __future__ import annotations

import pytest
import torch
from family_models import build
from test_families import _examples

import crystal_ext
from crystal_ext.data.example import SkipExample
from crystal_ext.data.packing import DualPathPacker
from crystal_ext.model.parts import backbone_and_head
from crystal_ext.training.latent_carried import latent_carried_answers

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the dual-path forward runs the fused alignment loss"
)


def _packer(family):
    model, processor, latent = build(family)
    return model, processor, DualPathPacker(processor, latent, model, system="you are a helpful assistant")


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_latent_carried_answers_stop_at_a_generated_image_token(family):
    model, processor, packer = _packer(family)
    tok = processor.tokenizer
    image_token = next(iter(packer.family.image_token_ids(model.config)))
    word = tok.convert_tokens_to_ids("red")
    steps = []

    def one_word_then_the_image_token(module, args, logits):
        """The greedy answer: "red", then the image placeholder."""
        forced = torch.full_like(logits, -1e4)
        forced[..., word if not steps else image_token] = 0
        steps.append(1)
        return forced

    hook = backbone_and_head(model)[2].register_forward_hook(one_word_then_the_image_token)
    try:
        answers = latent_carried_answers(model, packer, _examples(), tok, max_answer_tokens=4)
    finally:
        hook.remove()
    assert answers == ["red"] * 3


def test_the_packer_skips_an_answer_holding_an_image_token():
    from dataclasses import replace

    _, _, packer = _packer("qwen3_vl")
    with pytest.raises(SkipExample, match="image or video placeholder"):
        packer.pack(replace(_examples()[1], answer="red <|image_pad|>"))

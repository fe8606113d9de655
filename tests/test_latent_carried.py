"""The latent-carried evaluation: the corrupted path answering from the intact path's latents."""

from __future__ import annotations

import functools

import pytest
import torch

import crystal_ext
from crystal_ext.data.corruption import CorruptionConfig
from crystal_ext.data.example import Example
from crystal_ext.data.packing import DualPathCollator, DualPathPacker
from crystal_ext.data.synthetic import SyntheticVQA
from crystal_ext.model.latent_tokens import add_latent_tokens
from crystal_ext.training import latent_carried
from crystal_ext.training.tiny_model import tiny_model, tiny_processor, tiny_tokenizer

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the dual-path forward runs the fused alignment loss"
)

# Erasing the whole image makes the corrupted path's image the same black square for every
# example: whatever path 2 knows about the image then comes through the latent block alone.
BLACK_OUT = CorruptionConfig(kind="erase", erase_area=(1.0, 1.0), erase_aspect=(1.0, 1.0))


@functools.cache
def _setup():
    tok = tiny_tokenizer()
    latent = add_latent_tokens(tok, None, k=4)
    model = tiny_model(tok, seed=3).eval()
    packer = DualPathPacker(
        tiny_processor(tok, 112),
        latent,
        model,
        BLACK_OUT,
        image_size=112,
        max_length=512,
        system="you are a helpful assistant .",
    )
    return tok, model, packer


def _examples(n: int) -> list[Example]:
    data = SyntheticVQA(n, "test", seed=5)
    return [data[i] for i in range(n)]


def test_stepwise_decoding_reads_the_teacher_forced_f_rows():
    """Decoding step n reads exactly the logits that the teacher-forced dual-path forward gives
    at F's n-th row: the evaluation's decoding and training's forward agree on the F rows."""
    tok, model, packer = _setup()
    example = Example(
        "k0", _examples(1)[0].image, "which way do the stripes go ?", "vertical diagonal horizontal"
    )
    collate = DualPathCollator(packer, tok.pad_token_id)
    head = model.get_output_embeddings()
    with latent_carried.DualPathAttentionOn(model):
        full = collate([example])
        hidden, _ = latent_carried.dual_path_forward(model, full)
        seg = crystal_ext.Segments.from_bounds(full["layout"][0])
        answer = full["input_ids"][0, seg.f[0] + 1 : seg.f[1]].tolist()
        answer = answer[: answer.index(packer.latent.answer_close)]
        for n in range(len(answer) + 1):
            text = tok.decode(answer[:n]) or example.answer
            step = collate([Example(example.key, example.image, example.question, text)])
            row = latent_carried.next_token_rows(step, packer.latent.answer_close, [answer[:n]])[0]
            step_hidden, _ = latent_carried.dual_path_forward(model, step)
            torch.testing.assert_close(head(step_hidden[0, row]), head(hidden[0, seg.f[0] + n]))


def _blank_latents(model, layout):
    """Forward pre-hooks that overwrite the latent block's hidden states with zeros at the input
    of every text layer: the latents then carry nothing."""
    seg = crystal_ext.Segments.from_bounds(layout[0])

    def hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[:, seg.d[0] : seg.d[1]] = 0
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return [
        layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers
    ]


def test_latents_that_carry_nothing_answer_at_chance():
    tok, model, packer = _setup()
    examples = _examples(9)  # all three answers occur; every image differs
    first = DualPathCollator(packer, tok.pad_token_id)([examples[0]])
    handles = _blank_latents(model, first["layout"])  # one layout: every example packs to the same length
    try:
        answers = latent_carried.latent_carried_answers(model, packer, examples, tok, max_answer_tokens=3)
    finally:
        for h in handles:
            h.remove()
    assert len(set(answers)) == 1, answers  # the same answer whatever the image: nothing reaches F
    gold = [e.answer for e in examples]
    accuracy = sum(a == g for a, g in zip(answers, gold)) / len(gold)
    assert accuracy == gold.count(answers[0]) / len(gold)  # the share of one answer: chance level


def test_intact_image_reaches_f_only_through_the_latents():
    tok, model, packer = _setup()
    a, b = _examples(2)
    collate = DualPathCollator(packer, tok.pad_token_id)
    with latent_carried.DualPathAttentionOn(model):
        batch = collate([a, Example(a.key, b.image, a.question, a.answer)])  # same text, other image
        seg = crystal_ext.Segments.from_bounds(batch["layout"][0])
        hidden, _ = latent_carried.dual_path_forward(model, batch)
        assert not torch.allclose(hidden[0, slice(*seg.f)], hidden[1, slice(*seg.f)])  # through D
        handles = _blank_latents(model, batch["layout"])
        try:
            blank, _ = latent_carried.dual_path_forward(model, batch)
        finally:
            for h in handles:
                h.remove()
        torch.testing.assert_close(blank[0, slice(*seg.f)], blank[1, slice(*seg.f)])


def test_held_out_attention_kl_is_the_alignment_loss():
    tok, model, packer = _setup()
    examples = _examples(2)
    kl = latent_carried.held_out_attention_kl(model, packer, examples, tok)
    collate = DualPathCollator(packer, tok.pad_token_id)
    with latent_carried.DualPathAttentionOn(model):
        each = [float(latent_carried.dual_path_forward(model, collate([e]))[1]) for e in examples]
    assert kl == pytest.approx(sum(each) / 2) and kl > 0

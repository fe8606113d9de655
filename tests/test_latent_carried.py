"""The latent-carried evaluation: the corrupted path answering from the intact path's latents."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _latents_blanked(model, layout, dual_path_only: bool = False):
    """Within the block, forward pre-hooks overwrite the latent block's hidden states with zeros at
    the input of every text layer: the latents then carry nothing. With `dual_path_only`, only
    sequences of the layout's length are touched, so the intact path's own generation runs as is."""
    seg = crystal_ext.Segments.from_bounds(layout[0])
    length = int(layout[0].max())

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if dual_path_only and hidden.shape[1] < length:
            return None
        hidden = hidden.clone()
        hidden[:, seg.d[0] : seg.d[1]] = 0
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handles = [
        layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_latents_that_carry_nothing_answer_at_chance():
    tok, model, packer = _setup()
    examples = _examples(9)  # all three answers occur; every image differs
    first = DualPathCollator(packer, tok.pad_token_id)([examples[0]])
    with _latents_blanked(model, first["layout"]):  # one layout: every example packs to the same length
        answers = latent_carried.latent_carried_answers(model, packer, examples, tok, max_answer_tokens=3)
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
        with _latents_blanked(model, batch["layout"]):
            blank, _ = latent_carried.dual_path_forward(model, batch)
        torch.testing.assert_close(blank[0, slice(*seg.f)], blank[1, slice(*seg.f)])


def test_held_out_attention_kl_is_the_alignment_loss():
    tok, model, packer = _setup()
    examples = _examples(2)
    kl = latent_carried.held_out_attention_kl(model, packer, examples, tok)
    collate = DualPathCollator(packer, tok.pad_token_id)
    with latent_carried.DualPathAttentionOn(model):
        each = [float(latent_carried.dual_path_forward(model, collate([e]))[1]) for e in examples]
    assert kl == pytest.approx(sum(each) / 2) and kl > 0


# ---- the evaluation's report: evaluate_model with a packer ------------------------------------


def _evaluate(model, tok, packer, examples, **kw):
    from crystal_ext.training.evaluation import evaluate_model

    return evaluate_model(
        model,
        tiny_processor(tok, 112),
        examples,
        system="you are a helpful assistant .",
        image_size=112,
        num_latent_tokens=4,
        progress=False,
        packer=packer,
        max_answer_tokens=3,
        **kw,
    )


def test_evaluation_of_latents_that_carry_nothing_is_at_chance():
    tok, model, packer = _setup()
    examples = _examples(9)
    first = DualPathCollator(packer, tok.pad_token_id)([examples[0]])
    with _latents_blanked(model, first["layout"], dual_path_only=True):
        result = _evaluate(model, tok, packer, examples, batch_size=4)
    carried = [r["latent_carried"] for r in result["examples"]]
    assert len(set(carried)) == 1, carried
    gold = [r["answer"] for r in result["examples"]]
    assert result["accuracy_latent_carried"] == pytest.approx(gold.count(carried[0]) / len(gold))
    assert [r["latent_carried_correct"] for r in result["examples"]] == [
        c == g for c, g in zip(carried, gold)
    ]
    # With the latent block blanked the two paths' attention over it nearly agree: a KL of 0 up
    # to rounding (the renormalisation's 1e-8 lets it dip below 0 by ~1e-9), but a number.
    assert result["attention_kl"] > -1e-6 and result["n"] == 9
    assert {"intact", "blurred", "intact_correct", "blurred_correct"} <= set(result["examples"][0])


def test_evaluation_reports_the_answers_it_was_given(monkeypatch):
    """Known answers in, known accuracies, per-example records and a batch-weighted KL out."""
    from crystal_ext.training import evaluation

    tok, model, packer = _setup()
    examples = _examples(3)
    gold = [e.answer for e in examples]
    wrong = {"vertical": "horizontal", "horizontal": "diagonal", "diagonal": "vertical"}
    done = {"intact": 0, "blurred": 0}

    def fake_generate(model, processor, images, questions, system, max_new, **_):
        # per batch an intact call (answers right), then a blurred call (answers wrong)
        name = "blurred" if done["intact"] > done["blurred"] else "intact"
        start = done[name]
        done[name] += len(images)
        texts = [wrong[g] if name == "blurred" else g for g in gold[start : start + len(images)]]
        return [tok(f"<answer> {t} </answer>", add_special_tokens=False).input_ids for t in texts]

    def fake_carried(model, packer, exs, tokenizer, max_answer_tokens, alignment_layer):
        return [e.answer if e.key == examples[0].key else wrong[e.answer] for e in exs]

    kl_of_batch = iter([0.2, 0.5])
    monkeypatch.setattr(evaluation, "generate_answers", fake_generate)
    monkeypatch.setattr(evaluation.latent_carried, "latent_carried_answers", fake_carried)
    monkeypatch.setattr(evaluation.latent_carried, "held_out_attention_kl", lambda *a, **k: next(kl_of_batch))
    result = _evaluate(model, tok, packer, examples, batch_size=2)
    assert result["accuracy_intact"] == 1.0 and result["accuracy_blurred"] == 0.0
    assert result["accuracy_latent_carried"] == pytest.approx(1 / 3)
    assert result["attention_kl"] == pytest.approx((2 * 0.2 + 0.5) / 3)  # per example, not per batch
    rows = result["examples"]
    assert [r["latent_carried_correct"] for r in rows] == [True, False, False]
    assert [r["blurred"] for r in rows] == [wrong[g] for g in gold]
    assert all(r["intact_correct"] and not r["blurred_correct"] for r in rows)
    # without a packer: no latent-carried evaluation
    done.update(intact=0, blurred=0)
    no_packer = _evaluate(model, tok, None, examples)
    assert "accuracy_latent_carried" not in no_packer and "attention_kl" not in no_packer


def test_an_answer_the_packer_cannot_use_affects_only_its_example():
    """An example the packer refuses ("no answer": its answer is whitespace, as a partial answer
    decoding to whitespace is) gets None; the other examples of the batch answer as they do alone."""
    tok, model, packer = _setup()
    examples = _examples(3)
    examples[1] = Example(examples[1].key, examples[1].image, examples[1].question, "  ")
    alone = [latent_carried.latent_carried_answers(model, packer, [e], tok, 3)[0] for e in examples]
    assert alone[1] is None and all(alone[i] for i in (0, 2))
    assert latent_carried.latent_carried_answers(model, packer, examples, tok, 3) == alone


def test_evaluation_counts_the_answers_the_packer_could_not_use(monkeypatch):
    from crystal_ext.training import evaluation

    tok, model, packer = _setup()
    examples = _examples(3)
    monkeypatch.setattr(
        evaluation, "generate_answers", lambda model, processor, images, *a, **k: [[] for _ in images]
    )
    monkeypatch.setattr(
        evaluation.latent_carried,
        "latent_carried_answers",
        lambda model, packer, exs, *a, **k: [None if e.key == examples[1].key else e.answer for e in exs],
    )
    monkeypatch.setattr(evaluation.latent_carried, "held_out_attention_kl", lambda *a, **k: 0.0)
    result = _evaluate(model, tok, packer, examples)
    assert result["latent_carried_unpacked"] == 1
    assert [r["latent_carried_correct"] for r in result["examples"]] == [True, False, True]
    assert "(1 could not be packed)" in evaluation.headline(result)


def test_picture_names_tokens_and_shows_the_answers():
    from crystal_ext.training.pictures import example_picture

    tok, model, packer = _setup()
    example = _examples(1)[0]
    wrong = "diagonal" if example.answer != "diagonal" else "vertical"
    record = {"answer": example.answer, "intact": example.answer, "latent_carried": wrong}
    image, texts = example_picture(model, packer, example, answers=record)
    for name in ("<think>", "</think>", "<|latent_0|>", "<|latent_3|>", "<answer>", "</answer>"):
        assert name in texts, name  # axis labels: the think block's and the answer's tokens
    assert any(t.startswith("intact path (E)") for t in texts)
    assert any(t.startswith("corrupted path (F)") for t in texts)
    assert "0" in texts and "share" in texts  # the colour scale's ends
    assert f"correct answer: {example.answer}" in texts
    line = next(t for t in texts if t.startswith("model: "))
    assert f"intact path: {example.answer!r} right" in line
    assert f"latent-carried (corrupted path): {wrong!r} wrong" in line
    assert image.width > 300 and image.height > 300

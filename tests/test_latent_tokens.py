"""Latent tokens: tokenizer and embeddings grow, only new rows train."""

from __future__ import annotations

import pytest
import torch
from family_models import qwen_tokenizer, tiny_qwen25vl

from crystal_ext.model.latent_tokens import (
    ANSWER_CLOSE,
    THINK_CLOSE,
    THINK_OPEN,
    add_latent_tokens,
)
from crystal_ext.model.lora import apply_lora
from crystal_ext.model.new_token_rows import attach_new_token_rows
from crystal_ext.model.parts import embedding_and_head_weights


@pytest.fixture()
def setup():
    tok = qwen_tokenizer()
    old_len = len(tok)
    model = tiny_qwen25vl(tok)
    old_embed = model.get_input_embeddings().weight.detach().clone()
    lat = add_latent_tokens(tok, model, k=8)
    return tok, model, lat, old_len, old_embed


def test_tokens_added_as_single_ids_and_matrices_resized(setup):
    tok, model, lat, old_len, old_embed = setup
    assert len(lat.latent_ids) == 8 and len(set(lat.new_ids)) == 12
    assert set(lat.new_ids) == set(range(old_len, old_len + 12))
    assert tok(f"{THINK_OPEN}<|latent_3|>{ANSWER_CLOSE}").input_ids == [
        lat.think_open,
        lat.latent_ids[3],
        lat.answer_close,
    ]
    for m in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert m.shape[0] == len(tok)
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:old_len], old_embed)
    torch.testing.assert_close(emb[lat.new_ids[0]], old_embed.mean(0))


def test_adding_twice_adds_nothing_new(setup):
    tok, model, lat, _, _ = setup
    again = add_latent_tokens(tok, model, k=8)
    assert again.new_ids == () and again.latent_ids == lat.latent_ids


def _tokenizer_with_think_tokens():
    """Qwen3's case: `<think>` / `</think>` already added to the tokenizer, not special."""
    from tokenizers import AddedToken

    tok = qwen_tokenizer()
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in (THINK_OPEN, THINK_CLOSE)])
    return tok


def test_tokens_the_tokenizer_has_are_left_as_they_are(tmp_path):
    """Qwen3's `<think>` keeps its id, its non-special flag and its normalisation, also in the saved
    tokenizer: decode(skip_special_tokens=True) keeps it, as serving stacks that parse it need."""
    from transformers import AutoTokenizer

    tok = _tokenizer_with_think_tokens()
    before = {
        t: (tok.convert_tokens_to_ids(t), str(tok.added_tokens_decoder[tok.convert_tokens_to_ids(t)]))
        for t in (THINK_OPEN, THINK_CLOSE)
    }
    old_len = len(tok)
    lat = add_latent_tokens(tok, None, k=2)
    assert (lat.think_open, lat.think_close) == (before[THINK_OPEN][0], before[THINK_CLOSE][0])
    assert set(lat.new_ids) == set(range(old_len, old_len + 4))  # 2 latents, <answer>, </answer>
    assert lat.think_open not in lat.new_ids and lat.think_close not in lat.new_ids
    tok.save_pretrained(tmp_path)
    for loaded in (tok, AutoTokenizer.from_pretrained(tmp_path)):
        for t, (i, added) in before.items():
            assert loaded.convert_tokens_to_ids(t) == i and str(loaded.added_tokens_decoder[i]) == added
        text = loaded.decode([lat.think_open, lat.latent_ids[0], lat.think_close], skip_special_tokens=True)
        assert text.replace(" ", "") == f"{THINK_OPEN}{THINK_CLOSE}"
        assert loaded.added_tokens_decoder[lat.latent_ids[0]].special


def test_a_token_the_tokenizer_splits_is_refused():
    from crystal_ext.training.tiny_model import SPECIAL, word_level_tokenizer

    tok = word_level_tokenizer(["answer", "<", ">", "<answer>"], SPECIAL)  # in the vocabulary, split
    with pytest.raises(ValueError, match="'<answer>'.*splits the text"):
        add_latent_tokens(tok, None, k=2)


def test_only_new_rows_train(setup):
    """The new tokens' rows train as their own parameters; the matrices get no gradient and
    keep every row (the trained rows are written in only by write_into)."""
    tok, model, lat, old_len, _ = setup
    peft_model = apply_lora(model)
    mats = embedding_and_head_weights(peft_model)
    before = [m.detach().clone() for m in mats]
    rows = attach_new_token_rows(peft_model, lat.new_ids)
    start = [p.detach().clone() for p in rows.parameters()]
    opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[1, 9, lat.think_open, *lat.latent_ids, lat.think_close, 15, 2]])
    for _ in range(2):
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert all(m.grad is None and not m.requires_grad for m in mats)
        assert all(p.grad.abs().sum() > 0 for p in rows.parameters())
        opt.step()
        opt.zero_grad()
    for m, b in zip(mats, before):
        torch.testing.assert_close(m, b, rtol=0, atol=0)
    assert all((p - s).abs().sum() > 0 for p, s in zip(rows.parameters(), start))
    rows.write_into(peft_model.get_input_embeddings(), peft_model.get_output_embeddings())
    assert torch.equal(mats[0][list(lat.new_ids)], rows.embedding_rows.detach())


def test_bad_arguments(setup):
    tok, model, _, _, _ = setup
    with pytest.raises(ValueError, match="k must be >= 1"):
        add_latent_tokens(tok, model, k=0)
    with pytest.raises(ValueError, match="ids is empty"):
        attach_new_token_rows(model, ())

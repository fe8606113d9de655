"""NewTokenRows: the new tokens' embedding rows trained on their own over a frozen matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crystal_ext.model.new_token_rows import NewTokenRows


def _layers(vocab=50, hidden=8, tied=False):
    torch.manual_seed(0)
    embedding = nn.Embedding(vocab, hidden)
    head = nn.Linear(hidden, vocab, bias=False)
    if tied:
        head.weight = embedding.weight
    for p in (embedding.weight, head.weight):
        p.requires_grad_(False)
    return embedding, head


def test_embedding_rows_replace_the_new_tokens_only():
    embedding, head = _layers()
    base = embedding.weight.clone()
    rows = NewTokenRows(embedding, head, [47, 3, 12])
    with torch.no_grad():
        rows.embedding_rows.copy_(torch.arange(24.0).reshape(3, 8))
    ids = torch.tensor([[1, 3, 47, 5], [12, 12, 0, 49]])
    out = embedding(ids)
    for pos, token in enumerate(ids.flatten().tolist()):
        got = out.reshape(-1, 8)[pos]
        want = rows.embedding_rows[[47, 3, 12].index(token)] if token in (47, 3, 12) else base[token]
        torch.testing.assert_close(got, want)


def test_gradient_reaches_the_rows_and_not_the_matrix():
    embedding, head = _layers()
    rows = NewTokenRows(embedding, head, [3, 12])
    out = embedding(torch.tensor([[3, 4, 12, 3]]))
    out.pow(2).sum().backward()
    assert embedding.weight.grad is None
    assert rows.embedding_rows.grad.shape == (2, 8)
    torch.testing.assert_close(rows.embedding_rows.grad[0], 2 * 2 * rows.embedding_rows[0].detach())


def test_write_into_gives_a_plain_embedding_with_the_same_outputs():
    embedding, head = _layers()
    rows = NewTokenRows(embedding, head, [3, 12])
    with torch.no_grad():
        rows.embedding_rows.add_(1.0)
        rows.head_rows.add_(2.0)
    ids = torch.tensor([[3, 4, 12]])
    before = embedding(ids)
    rows.write_into(embedding, head)
    rows.remove()
    torch.testing.assert_close(embedding(ids), before)
    torch.testing.assert_close(head.weight[[3, 12]], rows.head_rows.detach())


def test_tied_head_uses_the_embedding_rows():
    embedding, head = _layers(tied=True)
    rows = NewTokenRows(embedding, head, [7])
    assert rows.tied and rows.head_rows is None and rows.lm_head_rows() is rows.embedding_rows


def test_state_round_trip_and_mismatch():
    embedding, head = _layers()
    rows = NewTokenRows(embedding, head, [3, 12])
    with torch.no_grad():
        rows.embedding_rows.mul_(3)
    saved = rows.state()
    other = NewTokenRows(*_layers(), [3, 12])
    other.load_state(saved)
    torch.testing.assert_close(other.embedding_rows, rows.embedding_rows)
    with pytest.raises(ValueError, match="saved rows are for ids"):
        NewTokenRows(*_layers(), [3, 13]).load_state(saved)


@pytest.mark.parametrize("ids, match", [([], "empty"), ([3, 3], "duplicates"), ([50], r"in \[0, 50\)")])
def test_bad_ids_name_the_problem(ids, match):
    with pytest.raises(ValueError, match=match):
        NewTokenRows(*_layers(), ids)


@pytest.mark.parametrize("tied", [False, True])
def test_head_logits_of_the_new_tokens_come_from_the_rows(tied):
    embedding, head = _layers(tied=tied)
    base_logits = head(torch.randn(4, 8))
    rows = NewTokenRows(embedding, head, [47, 3])
    with torch.no_grad():
        rows.lm_head_rows().add_(5.0)
    hidden = torch.randn(2, 4, 8)
    logits = head(hidden)
    torch.testing.assert_close(logits[..., [47, 3]], hidden @ rows.lm_head_rows().detach().T)
    other = [v for v in range(50) if v not in (47, 3)]
    torch.testing.assert_close(logits[..., other], hidden @ head.weight[other].T)
    assert base_logits.shape == (4, 50)
    rows.remove()
    torch.testing.assert_close(head(hidden)[..., [47, 3]], hidden @ head.weight[[47, 3]].T)


def test_saved_rows_come_from_a_gathered_state_dict_when_given(tmp_path):
    """Under FSDP the rank's parameters are shards; the Trainer hands the gathered state dict to
    _save, and the rows file takes the rows from it."""
    from safetensors.torch import load_file

    from crystal_ext.training.token_rows import TOKEN_ROWS_FILE, save_token_rows

    embedding, head = _layers()
    rows = NewTokenRows(embedding, head, [3, 12])
    gathered = {
        "base_model.model.crystal_new_token_rows.embedding_rows": torch.ones(2, 8),
        "base_model.model.crystal_new_token_rows.head_rows": torch.full((2, 8), 2.0),
    }
    save_token_rows(rows, str(tmp_path), gathered)
    saved = load_file(tmp_path / TOKEN_ROWS_FILE)
    assert torch.equal(saved["embed_tokens"], torch.ones(2, 8))
    assert torch.equal(saved["lm_head"], torch.full((2, 8), 2.0))
    save_token_rows(rows, str(tmp_path))
    assert torch.equal(load_file(tmp_path / TOKEN_ROWS_FILE)["embed_tokens"], rows.embedding_rows.detach())

"""Answers as text: the answer a model generated, cut out of its ids, and gold answers normalised
the same way, so that exact match compares like with like."""

from __future__ import annotations

from crystal_ext.data.chat import turn_end


def normalise_answer(tokenizer, text: str) -> str:
    """A gold answer as the model would write it: through the tokenizer and back, stripped, lower case."""
    # Decode(encode(text)) so gold and generated answers go through the same detokeniser.
    return (
        tokenizer.decode(tokenizer(str(text), add_special_tokens=False).input_ids, skip_special_tokens=True)
        .strip()
        .lower()
    )


def extract_answer(tokenizer, ids: list[int]) -> str | None:
    """The text between <answer> and </answer> (or the end of the turn) in generated ids, normalised.

    Special tokens inside the answer are kept in the text, so an answer such as
    `<answer><|latent_5|> horizontal</answer>` does not count as "horizontal": exact match means
    the model wrote the answer and nothing else (decoding with skip_special_tokens=True would drop
    a stray latent token and give the model a second try, which teacher-forced accuracy does not)."""
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<answer>", "</answer>"])
    if open_id not in ids:
        return None
    ids = ids[ids.index(open_id) + 1 :]
    if close_id in ids:
        ids = ids[: ids.index(close_id)]
    else:  # cut off: the answer ends with the turn (<|im_end|>) or the batch padding after it
        ends = {
            end_of_turn_id(tokenizer),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        } - {None}
        ids = ids[: next((i for i, t in enumerate(ids) if t in ends), len(ids))]
    return tokenizer.decode(ids, skip_special_tokens=False).strip().lower()


def end_of_turn_id(tokenizer_or_processor) -> int | None:
    """The token the chat template ends an assistant turn with (e.g. <|im_end|>)."""
    tok = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    try:
        text = turn_end(tokenizer_or_processor)
    except ValueError:
        return tok.eos_token_id
    ids = tok(text, add_special_tokens=False).input_ids
    return ids[0] if ids else tok.eos_token_id

"""Which text layer's attention the attention-alignment loss reads (`--alignment_layer`).

The published method reads the LAST decoder layer's attention. A model whose last text layer is
not attention (LFM2's released configurations end on a short-convolution layer, a Qwen3.5
configuration may end on a linear-attention layer) has no attention there to read, so the
choice is explicit, never silent:

  last            (default) the last text layer, as published; refused when it is not an
                  attention layer, with a message naming the other choice
  last_attention  the last full-attention text layer; the layers after it still run the dual
                  path and carry the gradient of the other losses. On a model whose last layer is
                  full attention it is the same layer as `last`.

Layers are numbered as the decoder numbers them (its layers' `layer_idx`), their kinds read from
the text config's `layer_types`; a config without `layer_types` has full attention on every layer.
The index is computed here once per forward and handed to the attention layers through the
forward's output slot (crystal_ext.model.attention_registration), so the model's config, and a
saved config.json, never change.
"""

from __future__ import annotations

from crystal_ext.model.parts import text_config_of

ALIGNMENT_LAYERS = ("last", "last_attention")
FLAG = "--alignment_layer"
FULL_ATTENTION = "full_attention"
# The layer types whose attention the dual-path attention runs, and so can give the loss its
# probabilities (a sliding last layer only while its window hides no key: checked at run time).
ATTENTION_LAYER_TYPES = frozenset({FULL_ATTENTION, "sliding_attention"})


def check_choice(choice: str) -> str:
    if choice not in ALIGNMENT_LAYERS:
        raise ValueError(f"{FLAG} must be one of {', '.join(ALIGNMENT_LAYERS)}, got {choice!r}")
    return choice


def text_layer_types(config) -> list[str]:
    """The kind of each text layer, in the decoder's order."""
    text = text_config_of(config)
    types = list(getattr(text, "layer_types", None) or ())
    return types or [FULL_ATTENTION] * int(text.num_hidden_layers)


def alignment_layer_problem(config, choice: str = "last") -> str | None:
    """Why `choice` names no layer whose attention the loss can read (None if it names one)."""
    check_choice(choice)
    types = text_layer_types(config)
    if choice == "last" and types[-1] not in ATTENTION_LAYER_TYPES:
        return (
            f"its last text layer is a {types[-1]!r} layer; the attention-alignment loss reads the last "
            f"layer's attention probabilities, so the last layer must be attention. Pass {FLAG} "
            "last_attention to read them at the last full-attention layer instead (text layer "
            f"{_last_full(types)}, numbered from 0, of {len(types)}; the layers after it still train "
            "through the other losses): a documented change of the method (docs/method.md)"
            if FULL_ATTENTION in types
            else f"its last text layer is a {types[-1]!r} layer and it has no full-attention layer; the "
            "attention-alignment loss reads an attention layer's probabilities"
        )
    if choice == "last_attention" and FULL_ATTENTION not in types:
        return (
            f"{FLAG} last_attention: its text layers ({sorted(set(types))}) include no full-attention layer"
        )
    return None


def _last_full(types: list[str]) -> int:
    return len(types) - 1 - types[::-1].index(FULL_ATTENTION)


def alignment_layer_index(config, choice: str = "last") -> int:
    """The index of the text layer whose attention the alignment loss reads; UnsupportedModel
    (naming the model type and FLAG) when `choice` names none."""
    problem = alignment_layer_problem(config, choice)
    if problem is not None:
        from crystal_ext.model.families.base import UnsupportedModel  # the families import this module

        raise UnsupportedModel(getattr(config, "model_type", None), problem)
    types = text_layer_types(config)
    return len(types) - 1 if choice == "last" else _last_full(types)


__all__ = [
    "ALIGNMENT_LAYERS",
    "alignment_layer_index",
    "alignment_layer_problem",
    "check_choice",
    "text_layer_types",
]

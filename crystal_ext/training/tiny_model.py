"""The embedded default model: a tiny Qwen2.5-VL built from a config, with a tokenizer and a
processor built in code, so `python -m crystal_ext.train` runs with no network and no cache.

Sizes: text hidden 128, 2 layers, 4 heads / 2 kv heads; vision depth 2, hidden 128, patch 14,
merge 2: 1.1 M parameters with this tokenizer's small vocabulary (a size that trains at about
12 steps a second on two CPU cores). It learns the default synthetic task
(crystal_ext.data.synthetic) in a few hundred steps on two CPU cores.

The tokenizer is word-level (the `tokenizers` library wrapped in PreTrainedTokenizerFast):
it knows Qwen's chat and vision special tokens, carries Qwen's chat template, and the words of the synthetic task
(crystal_ext.data.synthetic), so a sample is about 30 tokens per path. Everything saves with
`save_pretrained` and loads back with the stock `from_pretrained` / `AutoProcessor`.

The pieces (word_level_tokenizer, tiny_text_config, mrope, qwen2_5_vl_config) also build the test
suite's and the benchmarks' smaller models (tests/family_models.py, benchmarks/step_models.py).
"""

from __future__ import annotations

import torch

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Chat words of the packer's system / turn text, then the synthetic task's words.
BASE_WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    ".",
    "?",
    "what",
    "is",
    "in",
    "the",
    "image",
    "this",
    "which",
    "how",
    "many",
    "yes",
    "no",
]


# Qwen's chat format (ChatML with vision markers), as Qwen2.5-VL's own chat template writes it,
# default system turn included (in this tokenizer's lower-case words) when a conversation has none.
TINY_DEFAULT_SYSTEM = "you are a helpful assistant ."
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + TINY_DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocabulary() -> list[str]:
    from crystal_ext.data.synthetic import VOCABULARY

    words = list(BASE_WORDS)
    words += [w for w in VOCABULARY if w not in words]
    return words


def word_level_tokenizer(words, special=SPECIAL, chat_template: str | None = None):
    """A word-level fast tokenizer over `special` (one id each, `special[0]` the padding), "<unk>"
    and `words`, in that order of ids, built offline; the test suite builds its tokenizers with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*special, "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation on its own
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces when decoding
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token=special[0], eos_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(special[1:])})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_tokenizer():
    """The embedded default's tokenizer: Qwen's special tokens, the chat words and the synthetic
    task's words, Qwen's chat template."""
    return word_level_tokenizer(tiny_vocabulary(), SPECIAL, CHAT_TEMPLATE)


def tiny_processor(tokenizer, image_size: int = 112):
    """A Qwen2.5-VL processor around `tokenizer` whose image processor keeps `image_size`
    square images at that size (min = max pixels), i.e. (image_size / 28)^2 visual tokens."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise RuntimeError(
            "the embedded default's Qwen2.5-VL processor needs torchvision (transformers 5): "
            "pip install -e '.[train]' (or a torchvision matching your torch)"
        )
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = image_size * image_size
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    # The processor class requires a video processor; videos are not used here.
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def mrope(hidden: int) -> dict:
    """Qwen-VL's multimodal RoPE for 4 heads of `hidden`: halves of (temporal, height, width)
    summing to head_dim / 2."""
    return {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [hidden // 16, hidden // 32, hidden // 32],
    }


def tiny_text_config(tokenizer, hidden: int, layers: int, max_position_embeddings: int, **overrides) -> dict:
    """A small decoder's text config over `tokenizer`'s vocabulary and its Qwen special tokens
    (4 heads / 2 kv heads, MLP twice as wide, untied head); `overrides` replace or add keys."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    text.update(overrides)
    return text


def qwen_vision_token_ids(tokenizer) -> dict:
    """The Qwen-VL config's image / video token ids, as `tokenizer` spells them."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def qwen2_5_vl_config(tokenizer, text: dict, vision_hidden: int, vision_depth: int, window_size: int):
    """A Qwen2.5-VL config of `text` (see tiny_text_config) and a small vision tower (4 heads, patch 14,
    merge 2, full attention in every block) that hands the text model `text`'s hidden size."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=4,
        out_hidden_size=text["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        fullatt_block_indexes=list(range(vision_depth)),
        window_size=window_size,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **qwen_vision_token_ids(tokenizer)
    )


def tiny_config(
    tokenizer, hidden: int = 128, layers: int = 2, vision_hidden: int = 128, vision_depth: int = 2
):
    """The embedded default's Qwen2.5-VL config."""
    text = tiny_text_config(tokenizer, hidden, layers, 1024, rope_parameters=mrope(hidden))
    return qwen2_5_vl_config(tokenizer, text, vision_hidden, vision_depth, window_size=112)


def tiny_model(tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised tiny Qwen2.5-VL (fp32), deterministic for a seed. Built without
    the patch-embedding fusion (crystal_ext.model.runtime_fusions): at its 64 patches an image the
    Conv3d costs nothing, and the fused class draws its initial weights in another order, so a
    seed would give another model than the one the embedded default's results were measured on.
    Loaded back from a run's folder it is fused like any other model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_config(tokenizer)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )


def unknown_words(tokenizer, examples, limit: int = 200) -> tuple[int, int, list[str]]:
    """(examples with words the word-level tokenizer does not know, examples looked at, a few such
    words) over the first `limit` examples: the embedded tokenizer knows only the synthetic task's
    words, and turns every other word into <unk>."""
    unk, bad, seen, words = tokenizer.unk_token_id, 0, 0, []
    for i in range(min(limit, len(examples))):
        ex = examples[i]
        text = f"{ex.question} {ex.answer or ''}"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        seen += 1
        if unk in ids:
            bad += 1
            pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
            words += [w for w, _ in pieces if tokenizer.convert_tokens_to_ids(w) == unk][:3]
    return bad, seen, sorted(set(words))[:10]

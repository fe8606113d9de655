"""Models and batches for the whole-step benchmarks (ours vs the published recipe).

`tiny`: the test suite's tiny Qwen2.5-VL (hidden 64, 2 layers).
`qwen7b_attn`: Qwen2.5-VL-7B's attention shape (hidden 3584, 28 heads, 4 kv heads,
head_dim 128) and vocabulary (152,064) with few layers and a small MLP and vision tower, so
one step fits this CPU; images of 448x448 give 256 visual tokens each, like the recipe.
Embedding and LM head are frozen (as in the recipe, where only new rows train), the rest
trains. The models are built as crystal_ext builds them (crystal_ext.model.runtime_fusions: the
Conv3d patch embedding as a Linear, the RMSNorms fused); the published step runs them with the
stock modules (published_step.stock_modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_utils import peak_memory_bytes  # noqa: E402
from family_models import TASK_WORDS, qwen_tokenizer, tiny_qwen25vl  # noqa: E402

from crystal_ext.data.packing import DualPathCollator, DualPathPacker, Example  # noqa: E402
from crystal_ext.model.latent_tokens import add_latent_tokens  # noqa: E402
from crystal_ext.model.runtime_fusions import from_config  # noqa: E402
from crystal_ext.training import tiny_model  # noqa: E402


def qwen7b_attention_model(
    tokenizer, layers=2, vocab=152064, intermediate=1024, attn="sdpa", dtype=torch.float32
):
    from transformers import Qwen2_5_VLForConditionalGeneration

    text = tiny_model.tiny_text_config(
        tokenizer,
        3584,
        layers,
        32768,
        vocab_size=vocab,
        intermediate_size=intermediate,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    config = tiny_model.qwen2_5_vl_config(tokenizer, text, vision_hidden=64, vision_depth=1, window_size=112)
    torch.manual_seed(0)
    model = from_config(Qwen2_5_VLForConditionalGeneration, config, attn_implementation=attn, dtype=dtype)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    return model


def _image(seed, size):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _words(n, seed):
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(TASK_WORDS[4:], size=n))  # from "what" on


def build(shape: str, attn: str, batch_size: int = 1):
    """(model, batch) for `shape` in {"tiny", "qwen7b_L700", "qwen7b_L1400"}."""
    if shape == "tiny":
        tok = qwen_tokenizer()
        latent = add_latent_tokens(tok, None, k=4)
        model = tiny_qwen25vl(tok, attn_implementation=attn).train()
        return model, make_batch(model, tok, latent, 56, 6, 8, batch_size)
    # L ~ 700: 448 px (256 visual tokens), |E| = |F| = 45; L ~ 1400: 644 px (529 tokens).
    image, question, answer = (448, 25, 42) if shape == "qwen7b_L700" else (644, 40, 70)
    return build_qwen7b_attention(attn, image, question, answer, batch_size=batch_size)


def build_qwen7b_attention(
    attn: str, image: int, question: int, answer: int, vocab: int = 152064, batch_size: int = 1
):
    """The Qwen-7B-attention model and a batch with `answer` answer words (|E| = answer + 3)."""
    model, tok, latent = qwen7b_attention_parts(attn, vocab=vocab)
    return model, make_batch(model, tok, latent, image, question, answer, batch_size)


def qwen7b_attention_parts(attn: str, vocab: int = 152064, dtype=torch.float32):
    """(the Qwen-7B-attention model in training mode, its tokenizer, the latent tokens), for
    batches made with make_batch."""
    tok = qwen_tokenizer()
    latent = add_latent_tokens(tok, None, k=10)  # |D| = 12 with the think markers
    return qwen7b_attention_model(tok, vocab=vocab, attn=attn, dtype=dtype).train(), tok, latent


def build_published_configuration(attn: str, dtype=torch.bfloat16):
    """(model, batch, new token ids) at the L ~ 700 shape for the published trainable
    configuration: the same model and batch as `qwen7b_L700`, in `dtype`."""
    tok = qwen_tokenizer()
    latent = add_latent_tokens(tok, None, k=10)
    model = qwen7b_attention_model(tok, attn=attn, dtype=dtype).train()
    return model, make_batch(model, tok, latent, 448, 25, 42, 1), list(latent.new_ids)


def make_batch(model, tok, latent, image, question, answer, batch_size):
    packer = DualPathPacker(
        tiny_model.tiny_processor(tok, image), latent, model, image_size=image, max_length=4096
    )
    examples = [
        Example(f"ex{i}", _image(i, image), _words(question, i), _words(answer, 100 + i))
        for i in range(batch_size)
    ]
    return DualPathCollator(packer, tok.pad_token_id)(examples)


def run_step(loss_fn, model, batch, zero_grad=True):
    """One training step's forward + backward of loss_fn(model, batch).loss."""
    if zero_grad:
        model.zero_grad(set_to_none=True)
    loss_fn(model, batch).loss.backward()


def peak_step_bytes(loss_fn, model, batch):
    """Peak memory of one step, its parameter gradients included (the previous step's are
    released before the measured window opens)."""
    model.zero_grad(set_to_none=True)
    return peak_memory_bytes(lambda: run_step(loss_fn, model, batch, zero_grad=False))

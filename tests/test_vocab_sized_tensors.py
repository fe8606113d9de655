"""In the published trainable configuration (LoRA on the language model and vision blocks, the
merger in full, the new tokens' rows of the embedding and the LM head) a whole training step
creates no tensor of the vocabulary matrices' size other than the frozen matrices themselves:
no gradient, optimizer state or temporary copy of [V, Hd]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import build
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import crystal_ext
from crystal_ext.data.packing import DualPathCollator, DualPathPacker, Example
from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.lora import apply_lora
from crystal_ext.model.new_token_rows import attach_new_token_rows
from crystal_ext.model.objective import ObjectiveConfig, crystal_objective
from crystal_ext.model.parts import embedding_and_head_weights

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available(), reason="the objective runs the compiled fused ops"
)


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8))


# A vocabulary no other dimension of the tiny model has, so a size-V dimension means V.
VOCAB = 4099


class VocabSized(TorchDispatchMode):
    """Records every op output with a size-V dimension or V * Hd elements that is not stored
    in one of the frozen matrices (an in-place write into them is allowed)."""

    def __init__(self, vocab: int, width: int, frozen: list[torch.Tensor]):
        super().__init__()
        self.vocab, self.size = vocab, vocab * width
        self.frozen = {m.untyped_storage().data_ptr() for m in frozen}
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            big = t.numel() == self.size or self.vocab in t.shape
            if big and t.untyped_storage().data_ptr() not in self.frozen:
                self.found.append(f"{func} -> {list(t.shape)}")
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_a_published_step_has_no_vocabulary_sized_tensor(tied):
    register_dual_path_attention()
    model, processor, latent = build("qwen2_5_vl", attn_implementation=ATTN_IMPLEMENTATION)
    model.train()
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    packer = DualPathPacker(processor, latent, model, image_size=56, system="you are a helpful assistant")
    batch = DualPathCollator(packer, processor.tokenizer.pad_token_id)(
        [
            Example("a", _image(0), "what is the shape", "red circle"),
            Example("b", _image(1), "how many", "two"),
        ]
    )
    model = apply_lora(model)
    rows = attach_new_token_rows(model, latent.new_ids)
    frozen = embedding_and_head_weights(model)
    vocab, width = frozen[0].shape
    assert (vocab, width) == (VOCAB, 64)
    before = [m.detach().clone() for m in frozen]
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows_ids = {id(p) for p in rows.parameters()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if id(p) not in rows_ids], "weight_decay": 0.1},
            {"params": list(rows.parameters()), "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    watch = VocabSized(vocab, width, frozen)
    for _ in range(2):
        with watch:
            loss = crystal_objective(model, batch, ObjectiveConfig()).loss
            loss.backward()
            optimizer.step()
        assert watch.found == []
        assert all(not m.requires_grad and m.grad is None for m in frozen)
        for name, p in model.named_parameters():
            assert p.grad is None or (vocab not in p.grad.shape and p.grad.numel() < vocab * width), name
        states = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        assert len(states) == 3 * len(trainable)  # step, exp_avg, exp_avg_sq of every trained parameter
        assert all(vocab not in t.shape and t.numel() < vocab * width for t in states)
        assert rows.embedding_rows.grad.shape == (len(latent.new_ids), width)
        assert rows.embedding_rows.grad.abs().sum() > 0 and rows.lm_head_rows().grad.abs().sum() > 0
        optimizer.zero_grad()
    for m, b in zip(frozen, before):
        assert torch.equal(m, b)  # frozen, and the override rows were put back after each forward


def test_the_watch_sees_a_vocabulary_sized_gradient():
    """The check above fails for the published code's way (the whole matrix trains)."""
    weight = torch.randn(30, 4)
    trained = weight.clone().requires_grad_()
    with VocabSized(30, 4, [weight]) as watch:
        (trained[:3].sum()).backward()
    assert watch.found

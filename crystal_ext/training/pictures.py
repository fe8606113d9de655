"""PNG pictures of where the trained model looks, drawn with Pillow (no matplotlib needed).

For one held-out example, at the last text layer (the layer the attention-alignment loss
reads), head-averaged attention probabilities of the packed dual-path sequence:
  - answer -> latent: rows of the intact-path answer E and of the corrupted-path answer F,
    columns of the latent block D, each row renormalised over D (exactly what loss_attn
    compares);
  - latent -> image: rows of D, columns of the intact image's visual tokens, averaged over the
    latent rows and laid over the image (one cell per merged 28 x 28 patch).
The queries and keys are read through a probe attention registered like the training one
(`AttentionInterface`), which stores the last layer's rotated q and k; the probabilities are
then computed densely with the dual-path mask (fine for one short example).
"""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw, ImageFont

from crystal_ext.model.attention_registration import (
    LAYOUT_KWARG,
    OUTPUTS_KWARG,
    crystal_attention_forward,
    is_last_layer,
    is_text_decoder_attention,
)
from crystal_ext.model.families import family_of
from crystal_ext.model.parts import backbone_and_head, text_config
from crystal_ext.ops.layout import Segments, dual_path_mask

PROBE = "crystal_dual_path_probe"
_ANCHORS = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]  # inferno-like


def _probe_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    outputs = kwargs.get(OUTPUTS_KWARG)
    if (
        outputs is not None
        and kwargs.get(LAYOUT_KWARG) is not None
        and is_text_decoder_attention(module)
        and is_last_layer(module)
    ):
        outputs["probe"] = (query.detach(), key.detach(), scaling)
    return crystal_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def _register_probe():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE, _probe_forward)
    AttentionMaskInterface.register(PROBE, sdpa_mask)


def colour(v: float) -> tuple[int, int, int]:
    v = min(max(v, 0.0), 1.0) * (len(_ANCHORS) - 1)
    i = min(int(v), len(_ANCHORS) - 2)
    t = v - i
    return tuple(round(a + (b - a) * t) for a, b in zip(_ANCHORS[i], _ANCHORS[i + 1]))


def heat_map(values: torch.Tensor, cell: int = 22, stretch: bool = False) -> Image.Image:
    """A [rows, cols] tensor as coloured cells, scaled to the map's own maximum (or stretched
    from its minimum to its maximum, for maps whose values are all similar)."""
    values = values.float()
    if stretch:
        values = values - values.min()
    top = float(values.max()) or 1.0
    rows, cols = values.shape
    image = Image.new("RGB", (cols * cell, rows * cell))
    draw = ImageDraw.Draw(image)
    for r in range(rows):
        for c in range(cols):
            draw.rectangle(
                (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1),
                fill=colour(float(values[r, c]) / top),
            )
    return image


def overlay(image: Image.Image, grid: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """`grid` [h, w] upsampled (nearest) over `image`, stretched from its minimum to its maximum."""
    heat = heat_map(grid, cell=1, stretch=True).resize(image.size, Image.NEAREST)
    return Image.blend(image.convert("RGB"), heat, alpha)


@torch.no_grad()
def attention_maps(model, batch: dict) -> dict:
    """Head-averaged last-layer maps of the first sample of a collated dual-path batch."""
    base, backbone, _ = backbone_and_head(model)
    previous = text_config(base)._attn_implementation
    _register_probe()
    base.set_attn_implementation(PROBE)
    slot: dict = {}
    was_training = model.training
    model.eval()
    try:
        backbone(
            input_ids=batch["input_ids"][:1],
            position_ids=batch["position_ids"][..., :1, :],
            attention_mask=None,
            use_cache=False,
            **batch["images"],
            **{LAYOUT_KWARG: batch["layout"][:1], OUTPUTS_KWARG: slot},
        )
    finally:
        base.set_attn_implementation(previous)
        model.train(was_training)
    q, k, scale = slot["probe"]
    q, k = q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    length = q.shape[2]
    mask = dual_path_mask(batch["layout"][:1], length)[:, None].to(q.device)
    probs = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
    probs = torch.nan_to_num(probs).mean(1)[0].cpu()  # [L, L]; padding rows have no keys
    seg = Segments.from_bounds(batch["layout"][0])
    latent = slice(*seg.d)

    def renorm(m):
        return m / (m.sum(-1, keepdim=True) + 1e-8)

    family = family_of(base)
    image_tokens = family.image_token_ids(base.config)
    cols = [c for c in seg.span("c") if int(batch["input_ids"][0, c]) in image_tokens]
    rows_, cols_ = family.image_grid(base.config, batch["intact_images"], len(cols))  # the first image's map
    latent_to_image = probs[latent][:, cols[: rows_ * cols_]].mean(0).reshape(rows_, cols_)
    return {
        "intact": renorm(probs[slice(*seg.e), latent]),
        "corrupted": renorm(probs[slice(*seg.f), latent]),
        "latent_to_image": latent_to_image,
    }


def _label(draw, xy, text):
    draw.text(xy, text, fill=(20, 20, 20), font=ImageFont.load_default())


def draw_example_picture(model, packer, example, path: str, scale: int = 2) -> str:
    """One PNG: intact / corrupted image / latent->image overlay on top; answer->latent maps of
    the intact path (E rows) and the corrupted path (F rows) below."""
    from crystal_ext.data.corruption import corrupt
    from crystal_ext.data.packing import DualPathCollator

    batch = DualPathCollator(packer, packer.tok.pad_token_id)([example])
    if batch is None:
        raise ValueError(f"pictures: example {example.key!r} cannot be packed")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    maps = attention_maps(model, batch)
    intact = packer._load(example)
    corrupted = corrupt(intact, packer.corruption, packer.seed, example.key)
    side = intact.size[0] * scale
    tiles = [
        intact.resize((side, side)),
        corrupted.resize((side, side)),
        overlay(intact.resize((side, side)), maps["latent_to_image"]),
    ]
    e_map, f_map = heat_map(maps["intact"]), heat_map(maps["corrupted"])
    pad, head = 10, 16
    width = max(3 * side + 4 * pad, e_map.width + f_map.width + 3 * pad)
    height = head + side + 2 * pad + head + max(e_map.height, f_map.height) + pad + 2 * head
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, name) in enumerate(zip(tiles, ("intact image", "corrupted image", "latent -> image"))):
        x = pad + i * (side + pad)
        _label(draw, (x, 2), name)
        canvas.paste(tile, (x, head))
    y = head + side + pad
    _label(draw, (pad, y), "answer -> think block (rows: answer tokens; cols: <think>, latents, </think>)")
    y += head
    canvas.paste(e_map, (pad, y))
    canvas.paste(f_map, (2 * pad + e_map.width, y))
    y += max(e_map.height, f_map.height) + 2
    _label(draw, (pad, y), "intact (E)")
    _label(draw, (2 * pad + e_map.width, y), "corrupted (F)")
    _label(draw, (pad, y + 14), f"question: {example.question}   answer: {example.answer}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    return path


def draw_pictures(model, packer, examples, folder: str) -> list[str]:
    return [
        draw_example_picture(model, packer, ex, os.path.join(folder, f"attention_{ex.key}.png"))
        for ex in examples
    ]

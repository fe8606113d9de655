"""PNG pictures of where the trained model looks, drawn with Pillow (no matplotlib needed).

For one held-out example, at the text layer the attention-alignment loss reads (the last one, or
the last full-attention one: the run's --alignment_layer, crystal_ext.model.alignment_layer),
head-averaged attention probabilities of the packed dual-path sequence:
  - answer -> latent: rows of the intact-path answer E and of the corrupted-path answer F,
    columns of the latent block D, each row renormalised over D (exactly what loss_attn
    compares);
  - latent -> image: rows of D, columns of the intact image's visual tokens, averaged over the
    latent rows and laid over the image (one cell per merged 28 x 28 patch).
Both answer->latent maps share one colour scale (drawn beside them), their rows and columns
are named by their tokens, and the model's own answers stand beside the correct one.
The queries and keys are read through a probe attention registered like the training one
(`AttentionInterface`), which stores that layer's rotated q and k; the probabilities are
then computed densely with the dual-path mask (fine for one short example).
"""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw, ImageFont

from crystal_ext.model.attention_registration import (
    ALIGNMENT_LAYER_KEY,
    LAYOUT_KWARG,
    OUTPUTS_KWARG,
    crystal_attention_forward,
    is_alignment_layer,
    is_text_decoder_attention,
)
from crystal_ext.model.families import family_of
from crystal_ext.model.objective import dual_path_hidden
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
        and is_alignment_layer(module, outputs)
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


def heat_map(
    values: torch.Tensor, cell: int = 22, stretch: bool = False, top: float | None = None
) -> Image.Image:
    """A [rows, cols] tensor as coloured cells, scaled to `top` (default: the map's own maximum),
    or stretched from its minimum to its maximum, for maps whose values are all similar."""
    values = values.float()
    if stretch:
        values = values - values.min()
    top = top or float(values.max()) or 1.0
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


def colour_bar(height: int, width: int = 14) -> Image.Image:
    """The colour scale, top (1) to bottom (0)."""
    column = torch.linspace(1.0, 0.0, height)[:, None]
    return heat_map(column, cell=1, top=1.0).resize((width, height), Image.NEAREST)


def overlay(image: Image.Image, grid: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """`grid` [h, w] upsampled (nearest) over `image`, stretched from its minimum to its maximum."""
    heat = heat_map(grid, cell=1, stretch=True).resize(image.size, Image.NEAREST)
    return Image.blend(image.convert("RGB"), heat, alpha)


@torch.no_grad()
def attention_maps(model, batch: dict, alignment_layer: str = "last") -> dict:
    """Head-averaged maps of the first sample of a collated dual-path batch, at the layer the
    alignment loss reads (`alignment_layer`, crystal_ext.model.alignment_layer; its index is
    under "layer")."""
    base, backbone, _ = backbone_and_head(model)
    previous = text_config(base)._attn_implementation
    _register_probe()
    base.set_attn_implementation(PROBE)
    slot: dict = {}
    was_training = model.training
    model.eval()
    first = {
        "input_ids": batch["input_ids"][:1],
        "position_ids": batch["position_ids"][..., :1, :],
        "images": batch["images"],
        "layout": batch["layout"][:1],
    }
    try:
        # The objective's own forward (the family's inputs, the two scans of linear layers).
        dual_path_hidden(backbone, first, alignment_layer=alignment_layer, outputs=slot)
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
        "layer": slot[ALIGNMENT_LAYER_KEY],
    }


class _Canvas:
    """A white picture that remembers every text written on it (what the tests read)."""

    def __init__(self, width: int, height: int):
        self.image = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.texts: list[str] = []

    def text(self, xy, text: str, fill=(20, 20, 20)) -> None:
        self.draw.text(xy, text, fill=fill, font=self.font)
        self.texts.append(text)

    def text_width(self, text: str) -> int:
        return int(self.draw.textlength(text, font=self.font))

    def vertical_text(self, xy, text: str) -> None:
        """`text` rotated to read bottom to top, its top-left corner at `xy`."""
        width = self.text_width(text) + 2
        strip = Image.new("RGB", (width, 12), "white")
        ImageDraw.Draw(strip).text((0, 0), text, fill=(20, 20, 20), font=self.font)
        self.image.paste(strip.rotate(90, expand=True), xy)
        self.texts.append(text)

    def paste(self, tile: Image.Image, xy) -> None:
        self.image.paste(tile, xy)


def _token_names(tokenizer, ids) -> list[str]:
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _verdict(given, gold) -> str:
    if given is None:
        return "(no answer)"
    return f"{given!r} {'right' if given == gold else 'wrong'}"


def example_picture(
    model, packer, example, answers: dict | None = None, scale: int = 2, alignment_layer: str = "last"
):
    """(PIL image, the texts written on it) for one example: intact / corrupted image /
    latent->image overlay on top; below, the answer->think-block maps of the intact path (E rows)
    and the corrupted path (F rows) on one colour scale, rows and columns named by their tokens;
    at the bottom the question, the correct answer and, from `answers` (an eval_results.json
    example record), the model's own answers: intact path and latent-carried. The maps are read at
    the run's `alignment_layer` (crystal_ext.model.alignment_layer)."""
    from crystal_ext.data.packing import DualPathCollator

    batch = DualPathCollator(packer, packer.tok.pad_token_id)([example])
    if batch is None:
        raise ValueError(f"pictures: example {example.key!r} cannot be packed")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    maps = attention_maps(model, batch, alignment_layer)
    seg = Segments.from_bounds(batch["layout"][0])
    ids = batch["input_ids"][0].tolist()
    think_names = _token_names(packer.tok, ids[slice(*seg.d)])
    e_names = _token_names(packer.tok, ids[slice(*seg.e)])
    f_names = _token_names(packer.tok, ids[slice(*seg.f)])
    images = packer.images.intact_and_corrupted(example)
    intact, corrupted = images.intact[0], images.corrupted[0]
    side = intact.size[0] * scale
    tiles = [
        intact.resize((side, side)),
        corrupted.resize((side, side)),
        overlay(intact.resize((side, side)), maps["latent_to_image"]),
    ]
    # One colour scale for both maps, so the two paths' attention compares by colour.
    top = max(float(maps["intact"].max()), float(maps["corrupted"].max())) or 1.0
    cell = 22
    e_map = heat_map(maps["intact"], cell=cell, top=top)
    f_map = heat_map(maps["corrupted"], cell=cell, top=top)
    probe = _Canvas(1, 1)
    row_w = max(probe.text_width(n) for n in e_names + f_names) + 6
    col_h = max(probe.text_width(n) for n in think_names) + 6
    pad, head, bar_w = 10, 16, 14
    maps_w = 2 * (row_w + e_map.width) + 3 * pad + bar_w + 60
    width = max(3 * side + 4 * pad, maps_w)
    maps_h = max(e_map.height, f_map.height)
    gold = None if answers is None else answers.get("answer")
    height = head + side + 2 * pad + 2 * head + col_h + maps_h + pad + 3 * head + pad
    canvas = _Canvas(width, height)
    for i, (tile, name) in enumerate(zip(tiles, ("intact image", "corrupted image", "latent -> image"))):
        x = pad + i * (side + pad)
        canvas.text((x, 2), name)
        canvas.paste(tile, (x, head))
    y = head + side + pad
    canvas.text(
        (pad, y),
        "attention of the answer tokens (rows) over the think block (columns), "
        f"text layer {maps['layer']} ({alignment_layer}), head mean",
    )
    y += head
    x = pad
    for title, tile, names in (("intact path (E)", e_map, e_names), ("corrupted path (F)", f_map, f_names)):
        canvas.text((x + row_w, y), title)
        for c, name in enumerate(think_names):
            canvas.vertical_text((x + row_w + c * cell + 5, y + head), name)
        top_y = y + head + col_h
        for r, name in enumerate(names):
            canvas.text((x + row_w - canvas.text_width(name) - 4, top_y + r * cell + 5), name)
        canvas.paste(tile, (x + row_w, top_y))
        x += row_w + tile.width + pad
    top_y = y + head + col_h
    canvas.paste(colour_bar(maps_h, bar_w), (x, top_y))
    canvas.text((x + bar_w + 3, top_y - 2), f"{top:.2f}")
    canvas.text((x + bar_w + 3, top_y + maps_h - 10), "0")
    canvas.text((x, top_y - head), "share")
    y = top_y + maps_h + pad
    canvas.text((pad, y), f"question: {example.question}")
    canvas.text((pad, y + head), f"correct answer: {gold if gold is not None else example.answer}")
    if answers is not None:
        given = [f"intact path: {_verdict(answers.get('intact'), gold)}"]
        if "latent_carried" in answers:
            given.append(f"latent-carried (corrupted path): {_verdict(answers['latent_carried'], gold)}")
        canvas.text((pad, y + 2 * head), "model: " + "; ".join(given))
    return canvas.image, canvas.texts


def draw_example_picture(
    model, packer, example, path: str, answers: dict | None = None, alignment_layer: str = "last"
) -> str:
    """example_picture saved as a PNG at `path`."""
    image, _ = example_picture(model, packer, example, answers, alignment_layer=alignment_layer)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path)
    return path


def draw_pictures(
    model, packer, examples, folder: str, answers: dict | None = None, alignment_layer: str = "last"
) -> list[str]:
    """One picture per example; `answers`: {key: eval_results.json example record}."""
    return [
        draw_example_picture(
            model,
            packer,
            ex,
            os.path.join(folder, f"attention_{ex.key}.png"),
            None if answers is None else answers.get(ex.key),
            alignment_layer,
        )
        for ex in examples
    ]

"""Every VLM whose text decoder is plain causal full attention over image tokens placed in the
sequence: LLaVA-OneVision, Idefics3, SmolVLM, LLaVA, and others of the same kind.

Positions: plain 1-D (0, 1, 2, ... along path 1). Trained in full: the projector / connector.
Images: whatever the processor returns besides the text; the families listed here collate them
as their models expect (LLaVA-OneVision: pixel_values [images, patches, C, H, W] padded in
patches, image_sizes, batch_num_images; Idefics3 / SmolVLM / Granite-Docling: pixel_values
and pixel_attention_mask [1, images, ...] padded in height and width)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crystal_ext.model.families.base import Family

GENERIC_MODEL_TYPES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    "internvl",
    "mistral3",
    "aya_vision",  # with a full-attention (Cohere) text model; its logit scale: families/logits.py
    "granite_docling",  # Idefics3-shaped, Granite text; its logits_scaling: families/logits.py
)
# Untested types accepted as generic: LLaVA-style models (their modelling code derives from LLaVA,
# LLaVA-NeXT, Mistral3 or InternVL) whose Llama / Qwen2 / Qwen3 / Mistral text decoder runs plain
# causal full attention over the image features written in place of the image tokens.
_LLAVA_STYLE = "LLaVA-style: image features in place of the image tokens, plain causal text decoder"
GENERIC_BY_ARCHITECTURE = {
    "llava_next_video": f"{_LLAVA_STYLE} (LLaVA-NeXT's code, Llama text)",
    "video_llava": f"{_LLAVA_STYLE} (Llama text)",
    "vipllava": f"{_LLAVA_STYLE} (Llama text)",
    "perception_lm": f"{_LLAVA_STYLE} (LLaVA's code, Llama text)",
    "fast_vlm": f"{_LLAVA_STYLE} (LLaVA's code, Qwen2 text)",
    "lighton_ocr": f"{_LLAVA_STYLE} (Mistral3's code, Qwen3 text)",
    "got_ocr2": f"{_LLAVA_STYLE} (LLaVA's code, Qwen2 text)",
    "pp_chart2table": f"{_LLAVA_STYLE} (GOT-OCR2's class, Qwen2 text)",
    "qianfan_ocr": f"{_LLAVA_STYLE} (InternVL's code, Qwen3 text)",
}


def _pad_to(t: torch.Tensor, sizes: list[int], value=0) -> torch.Tensor:
    """`t` padded at the end of each dimension up to `sizes`."""
    pad = []
    for have, want in reversed(list(zip(t.shape, sizes))):
        pad += [0, want - have]
    return F.pad(t, pad, value=value) if any(pad) else t


def _pad_cat(tensors: list[torch.Tensor], dim: int, value=0) -> torch.Tensor:
    """Concatenate along `dim`, padding every other dimension to the largest."""
    sizes = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = []
    for t in tensors:
        want = list(sizes)
        want[dim] = t.shape[dim]
        out.append(_pad_to(t, want, value))
    return torch.cat(out, dim)


class GenericFamily(Family):
    def collate_images(self, groups):
        keys = groups[0].keys()
        if self.model_type in (
            "idefics3",
            "smolvlm",
            "granite_docling",
        ):  # [1, images, ...]: one flat list of images
            return {
                k: _pad_cat([g[k] for g in groups], dim=1, value=False if k == "pixel_attention_mask" else 0)
                for k in keys
            }
        return {k: _pad_cat([g[k] for g in groups], dim=0) for k in keys}

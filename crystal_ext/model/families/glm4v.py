"""GLM-4.1V / GLM-4V (`glm4v`).

Positions: path 1 numbered by the model's own `get_rope_index` (3-row M-RoPE, as Qwen2-VL's, with
the image tokens of the processor's `mm_token_type_ids`; crystal_ext.model.families.own_positions).
Images: `pixel_values` and `image_grid_thw`, as Qwen-VL. The chat template opens an image with
`<|begin_of_image|>`. Trained in full: the vision tower's patch merger and the 2x2 downsampling
convolution before it (together they are the vision-language projector)."""

from __future__ import annotations

from crystal_ext.model.families.own_positions import OwnPositionsFamily

GLM4V_MODEL_TYPES = ("glm4v",)


class Glm4vFamily(OwnPositionsFamily):
    language = ("language_model",)
    vision = ("visual",)
    projector = ("merger", "downsample")

    def image_open(self, processor):
        return "<|begin_of_image|>"

"""The interface every model family implements (crystal_ext.model.families)."""

from __future__ import annotations

import torch
from torch import nn

from crystal_ext.model.families.logits import LogitTransform, logit_transform, unknown_transform

# Keys of a processor's output that are text, not image inputs.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class UnsupportedModel(ValueError):
    """A model the dual-path objective cannot run; the message names the model type and why."""

    def __init__(self, model_type, reason: str):
        self.model_type, self.reason = model_type, reason
        super().__init__(f"model_type {model_type!r} is not supported by the dual-path objective: {reason}")


def _first_attr(module: nn.Module, names) -> tuple[str, nn.Module] | tuple[None, None]:
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return name, sub
    return None, None


class Family:
    """Base behaviour; subclasses override what differs.

    language / vision / projector: attribute names, tried in order on the backbone, of the text
    decoder, the vision tower and the vision-language projector (trained in full)."""

    language = ("language_model", "text_model")
    tests = ""  # the test file proving the family, when it has its own
    vision = ("visual", "vision_tower", "vision_model")
    projector = ("multi_modal_projector", "connector", "merger")

    def __init__(self, model_type: str):
        self.model_type = model_type

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"

    # ---- positions -------------------------------------------------------------------------

    position_rows = 1  # rows of the position ids of one sample ([rows, length])

    def position_ids_fn(self, model):
        """fn(path-1 input ids [L], the intact images' inputs) -> position ids [rows, L]."""

        def plain(input_ids, image_inputs):
            return torch.arange(input_ids.numel())[None]

        return plain

    # ---- attention ---------------------------------------------------------------------------

    # The text layer types the dual path reproduces for this family (crystal_ext.model.dual_path_attention).
    attention_kinds = frozenset({"full_attention"})

    def problem(self, config) -> str | None:
        """Why this family cannot run a model with this config (None if it can)."""
        return None

    def dual_path_inputs(self, config, input_ids: torch.Tensor) -> dict:
        """Extra forward kwargs of the dual-path forward (Gemma 3: which tokens are image tokens)."""
        return {}

    def single_path_inputs(self, config, input_ids: torch.Tensor) -> dict:
        """Extra forward kwargs the stock model needs on an ordinary sequence (Gemma 3: token_type_ids)."""
        return {}

    # ---- the model's own logits -------------------------------------------------------------

    def logit_transform(self, config) -> LogitTransform:
        """What the model's forward does to its LM head's output (a scale, a soft-cap), read from
        its config (crystal_ext.model.families.logits); refuses a transform it cannot reproduce."""
        problem = unknown_transform(config)
        if problem is not None:
            raise UnsupportedModel(self.model_type, problem)
        return logit_transform(config)

    # ---- what is trained -------------------------------------------------------------------

    def parts(self, model: nn.Module):
        """(language model, vision tower, [(full name, module) of the modules trained in full])."""
        backbone = getattr(model, model.base_model_prefix, model)
        _, language = _first_attr(backbone, self.language)
        _, vision = _first_attr(backbone, self.vision)
        if language is None or vision is None:
            raise ValueError(
                f"{self!r}: {type(model).__name__} has no text decoder ({'/'.join(self.language)}) or "
                f"vision tower ({'/'.join(self.vision)})"
            )
        wanted = set(self.projector)
        full = []
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in wanted:
                continue
            if isinstance(module, nn.ModuleList):  # peft trains modules, not lists: their entries
                full += [(f"{name}.{i}", m) for i, m in enumerate(module)]
            else:
                full.append((name, module))
        return language, vision, full

    def trained_in_full(self, model: nn.Module) -> list[str]:
        """Full names of the modules trained in full (peft modules_to_save)."""
        return [n for n, _ in self.parts(model)[2]]

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Every linear layer of the text decoder and of the vision tower, except the projector."""
        language, vision, full = self.parts(model)
        inside = {id(m) for m in language.modules()} | {id(m) for m in vision.modules()}
        inside -= {id(m) for _, p in full for m in p.modules()}
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]

    # ---- images ----------------------------------------------------------------------------

    def image_open(self, processor) -> str:
        """The text the chat template opens an image with: segment B starts there."""
        return processor.image_token

    def image_inputs(self, processed: dict) -> dict:
        """The image inputs of one processor output (one sample, one path's images)."""
        return {k: v for k, v in processed.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}

    def collate_images(self, groups: list[dict]) -> dict:
        """The model's image keyword arguments for several groups (in sequence order)."""
        return {k: torch.cat([g[k] for g in groups]) for k in groups[0]}

    def image_grid(self, config, group: dict, n_tokens: int) -> tuple[int, int]:
        """(rows, cols) of the first image's tokens drawn as a map, given the `n_tokens` image tokens
        of the intact images (in order): the largest square (the base image's features come
        first in LLaVA-OneVision, the image's own in Idefics3 without splitting)."""
        side = max(1, int(n_tokens**0.5))
        return side, side

    def image_token_ids(self, config) -> set[int]:
        ids = {getattr(config, k, None) for k in ("image_token_id", "image_token_index")}
        return {int(i) for i in ids if i is not None}

    def media_token_ids(self, config) -> set[int]:
        """The image and video placeholder tokens: the processor expands them into an image's
        tokens and the model writes image features there, so they are never answer text."""
        ids = {getattr(config, k, None) for k in ("video_token_id", "video_token_index")}
        return self.image_token_ids(config) | {int(i) for i in ids if i is not None}

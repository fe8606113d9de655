"""How crystal_ext builds and loads a model: through transformers' fusion mapping, which swaps a
module for an equivalent faster one at load time and keeps the checkpoint's layout, and with
crystal_ext's fused RMSNorm.

The one fusion asked for is `patch_embeddings`: a Conv3d patch embedding whose kernel equals its
stride (no padding, no dilation, one group: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V) is a
matrix product of each flattened patch with the flattened kernel, and runs as that Linear. The
convolution is the slow way to compute it: in bf16 on the development CPU its forward + weight
gradient for 2,048 patches takes 65 ms against 1.4 ms as a Linear (fp32: 12 ms vs 2.7 ms), and
cuDNN has no good kernel for this degenerate shape either. Other families' modules are left as
they are. `save_pretrained` writes the weight back in the Conv3d layout, so checkpoints and
merged models load with plain `from_pretrained`.

The second fusion is crystal_ext's own, `rms_norm` (crystal_ext.model.rms_norm_fusion): RMSNorm
modules of the Llama / Qwen2 form run the fused CPU kernel, checked against their stock forward
on the model's own weights when it is built. It adds no module and no weight: checkpoints are
the stock ones.

The fusion mapping is part of every transformers crystal_ext runs models with
(crystal_ext.model.transformers_support); with an older one these functions refuse like the rest.
"""

from __future__ import annotations

import contextlib

from crystal_ext.model.rms_norm_fusion import check_fused_rms_norms, fused_rms_norm_classes
from crystal_ext.model.transformers_support import require_supported_transformers

FUSION_CONFIG = {"patch_embeddings": True}


def load_pretrained(path: str, dtype, attn_implementation: str = "sdpa"):
    """AutoModelForImageTextToText.from_pretrained with FUSION_CONFIG."""
    require_supported_transformers()
    from transformers import AutoModelForImageTextToText

    with fused_rms_norm_classes():
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, fusion_config=dict(FUSION_CONFIG)
        )
    check_fused_rms_norms(model)
    return model


def from_config(model_class, config, **kwargs):
    """model_class._from_config(config, **kwargs) with FUSION_CONFIG (what `from_pretrained`
    does for a checkpoint, for a model built from a config: `_from_config` does not read
    config.fusion_config)."""
    require_supported_transformers()
    from transformers.fusion_mapping import get_fusion_patch_mapping
    from transformers.monkey_patching import apply_patches

    with (
        fused_rms_norm_classes(),
        apply_patches(get_fusion_patch_mapping(model_class, config, FUSION_CONFIG)),
    ):
        model = model_class._from_config(config, **kwargs)
    model.config.fusion_config = dict(FUSION_CONFIG)  # as from_pretrained leaves it
    check_fused_rms_norms(model)
    return model


def fused_modules(model) -> dict:
    """The modules of `model` that a fusion put in place of stock ones, by name."""
    from transformers.fusion_mapping import PatchEmbeddingsFusionSpec

    spec = PatchEmbeddingsFusionSpec()
    return {name: module for name, module in model.named_modules() if spec.is_fused(module)}


def fused_module_names(model) -> set[str]:
    """Names of the fused modules and of their children (the fused patch embedding's
    `linear_proj`): modules the stock model does not have."""
    fused = fused_modules(model)
    return {
        name for name, _ in model.named_modules() if any(name == f or name.startswith(f + ".") for f in fused)
    }


@contextlib.contextmanager
def without_fusion_config(model):
    """Context in which model.config has no fusion_config (writing a stock config.json: the
    weights are saved in the stock layout anyway)."""
    saved = model.config.__dict__.pop("fusion_config", None)
    try:
        yield model
    finally:
        if saved is not None:
            model.config.fusion_config = saved


__all__ = [
    "FUSION_CONFIG",
    "from_config",
    "fused_module_names",
    "fused_modules",
    "load_pretrained",
    "without_fusion_config",
]

"""crystal_ext: fused kernels and training for CrystaL latent reasoning in vision-language models.

Subpackages, each depending only on those before it:
  ops       the fused C++/CUDA ops and their plain-PyTorch references
  model     sequence layout, dual-path attention, latent tokens, the CrystaL objective
  data      examples and data files, corruption, the synthetic task, packing
  training  arguments, trainer, checkpoints, callbacks, evaluation, pictures, the tiny model

and the commands on top: `python -m crystal_ext.train`, `crystal_ext.evaluate`, `crystal_ext.info`.

The names below are the public API; docs/ describes the method and every op's contract.
"""

import importlib

# public name -> the module that defines it; loaded on first use, so that importing one part
# (the plain-PyTorch references, say) loads no other
_PUBLIC = {
    "ATTN_IMPLEMENTATION": "crystal_ext.model.attention_registration",
    "register_dual_path_attention": "crystal_ext.model.attention_registration",
    "dual_path_attention": "crystal_ext.model.dual_path_attention",
    "UnsupportedModel": "crystal_ext.model.families",
    "family_of": "crystal_ext.model.families",
    "LatentTokens": "crystal_ext.model.latent_tokens",
    "add_latent_tokens": "crystal_ext.model.latent_tokens",
    "CrystalLoss": "crystal_ext.model.objective",
    "ObjectiveConfig": "crystal_ext.model.objective",
    "crystal_objective": "crystal_ext.model.objective",
    "attention_alignment_loss": "crystal_ext.ops",
    "build_info": "crystal_ext.ops",
    "extension_available": "crystal_ext.ops",
    "extension_error": "crystal_ext.ops",
    "lm_head_losses": "crystal_ext.ops",
    "reference": "crystal_ext.ops",
    "Segments": "crystal_ext.ops.layout",
}


_SUBPACKAGES = ("data", "model", "ops", "training")


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES})


__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"

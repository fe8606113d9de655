"""crystal_ext: fused kernels and training for CrystaL latent reasoning in vision-language models.

Subpackages, each depending only on those before it:
  ops       the fused C++/CUDA ops and their plain-PyTorch references
  model     sequence layout, dual-path attention, latent tokens, the CrystaL objective
  data      examples and data files, corruption, the synthetic task, packing
  training  arguments, trainer, checkpoints, callbacks, evaluation, pictures, the tiny model

and the commands on top: `python -m crystal_ext.train`, `crystal_ext.evaluate`, `crystal_ext.info`.

The names below are the public API; docs/ describes the method and every op's contract.
"""

from crystal_ext.model.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention
from crystal_ext.model.dual_path_attention import dual_path_attention
from crystal_ext.model.families import UnsupportedModel, family_of
from crystal_ext.model.latent_tokens import LatentTokens, add_latent_tokens
from crystal_ext.model.objective import CrystalLoss, ObjectiveConfig, crystal_objective
from crystal_ext.ops import (
    attention_alignment_loss,
    build_info,
    extension_available,
    extension_error,
    lm_head_losses,
    reference,
)
from crystal_ext.ops.layout import Segments

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CrystalLoss",
    "LatentTokens",
    "ObjectiveConfig",
    "Segments",
    "UnsupportedModel",
    "add_latent_tokens",
    "attention_alignment_loss",
    "build_info",
    "crystal_objective",
    "dual_path_attention",
    "extension_available",
    "extension_error",
    "family_of",
    "lm_head_losses",
    "reference",
    "register_dual_path_attention",
]
__version__ = "0.1.0"

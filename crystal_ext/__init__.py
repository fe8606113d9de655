"""crystal_ext: fused kernels and training for CrystaL latent reasoning in VLMs.

Fused ops (compiled C++/CUDA, with plain-PyTorch twins in crystal_ext.reference):
  attention_alignment_loss(q, k, layout, scale=None)
  lm_head_losses(hidden, weight, targets, teacher_rows, student_rows, pair_sample,
                 topk_fraction=0.1, bias=None) -> (ce, kl)
"""

from crystal_ext._extension import build_info, extension_available, extension_error
from crystal_ext import reference
from crystal_ext.ops.attention_alignment_loss import attention_alignment_loss
from crystal_ext.ops.lm_head_losses import lm_head_losses

__all__ = [
    "attention_alignment_loss",
    "build_info",
    "extension_available",
    "extension_error",
    "lm_head_losses",
    "reference",
]
__version__ = "0.1.0"

# Dual-path model (issue 4): attention composed from torch SDPA on gathered paths.
from crystal_ext.dual_path_attention import dual_path_attention  # noqa: E402

__all__ += ["dual_path_attention"]

# Dual-path model (issue 4): registration with transformers (imported lazily inside
# register_dual_path_attention, so crystal_ext itself does not need transformers).
from crystal_ext.attention_registration import ATTN_IMPLEMENTATION, register_dual_path_attention  # noqa: E402

__all__ += ["ATTN_IMPLEMENTATION", "register_dual_path_attention"]

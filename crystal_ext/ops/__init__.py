"""The fused ops (compiled C++/CUDA kernels) and their plain-PyTorch references.

One module per op: the custom-op registration (fake kernel + autograd) and the maths in the
docstring; `reference` holds their plain-PyTorch twins, which take the same tensors (the fused
ops also accept an index plan built once per layout, `AlignmentIndices` / `LmHeadPlan`, in place
of the index tensors; the twins do not).
"""

from crystal_ext.ops import reference
from crystal_ext.ops._extension import build_info, extension_available, extension_error
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

"""LoRA through peft with the published settings (docs/method.md, "What is trained"): rank 16,
alpha 32, dropout 0.01 on every linear layer of the language model and of the vision tower (chosen
by the model's family, crystal_ext.model.families); the vision-language projector / merger is
trained in full (peft `modules_to_save`). The defaults below are the only place these numbers are
written: the command line's defaults (crystal_ext.training.arguments) are read from here.
"""

from __future__ import annotations

from torch import nn

from crystal_ext.model.families import family_of
from crystal_ext.model.runtime_fusions import fused_module_names

LORA_RANK = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.01


def apply_lora(model: nn.Module, r: int = LORA_RANK, alpha: int = LORA_ALPHA, dropout: float = LORA_DROPOUT):
    """Wrap `model` with peft LoRA on the family's target layers; the family's projector is
    trained in full. Layers that only a load-time fusion created (crystal_ext.model.runtime_fusions:
    GLM-4V's patch embedding as a Linear) are not targets: the stock model has a Conv3d there, so
    an adapter on them would not load onto it, and the stock Conv3d was never a target."""
    from peft import LoraConfig, get_peft_model

    family = family_of(model)
    fused = fused_module_names(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[name for name in family.lora_targets(model) if name not in fused],
        modules_to_save=family.trained_in_full(model),
        bias="none",
    )
    return get_peft_model(model, config)

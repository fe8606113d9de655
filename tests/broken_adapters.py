"""Deliberately broken adapters, for the tests of the run-time objective check: each one makes the
objective compute something other than the stock model, the way a wrong family would.

  one_row_positions   a Qwen-VL model numbered 0, 1, 2, ... in one row (what the generic family
                      gives), where the model numbers its images with its own 3-row M-RoPE index
  scaled_head         the model's own forward scales its logits (as Cohere's logit_scale does)
                      and the objective, which reads the head's weight, does not

    python tests/broken_adapters.py BROKEN MODULE [ARGS...]

runs `python -m MODULE ARGS...` with the adapter BROKEN installed (the command-line tests use it).
"""

from __future__ import annotations

import runpy
import sys

import torch

from crystal_ext.model.families import QwenVLFamily

HEAD_SCALE = 1.5


class OneRowPositions(QwenVLFamily):
    position_rows = 1

    def position_ids_fn(self, model):
        def plain(input_ids, image_inputs):
            return torch.arange(input_ids.numel())[None]

        return plain


def break_positions(packer) -> None:
    """`packer` with the one-row positions of a Qwen-VL model."""
    packer.family = OneRowPositions(packer.family.model_type)
    packer.positions = packer.family.position_ids_fn(None)


def scale_head(model) -> None:
    """`model`'s own forward multiplies its logits by HEAD_SCALE; its head's weight is unchanged."""
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out * HEAD_SCALE)


def install(broken: str) -> None:
    """Every DualPathPacker built from now on carries the broken adapter `broken`."""
    from crystal_ext.data import packing

    plain_init = packing.DualPathPacker.__init__

    def init(self, processor, latent, model, *args, **kwargs):
        plain_init(self, processor, latent, model, *args, **kwargs)
        if broken == "one_row_positions":
            break_positions(self)
        elif broken == "scaled_head":
            scale_head(model)
        else:
            raise ValueError(f"unknown broken adapter {broken!r}")

    packing.DualPathPacker.__init__ = init


if __name__ == "__main__":
    broken, module, *argv = sys.argv[1:]
    install(broken)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)

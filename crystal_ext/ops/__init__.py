"""The fused ops (compiled C++/CUDA kernels) and their plain-PyTorch references.

One module per op: the custom-op registration (fake kernel + autograd) and the maths in the
docstring; `reference` holds their plain-PyTorch twins, which take the same tensors (the fused
ops also accept an index plan built once per layout, `AlignmentIndices` / `LmHeadPlan`, in place
of the index tensors; the twins do not).

The public names load on first use, so importing the references (`crystal_ext.ops.reference`)
registers no custom op and loads no compiled extension.
"""

import importlib
import sys
import types

# The ops named like the module that defines them.
_OPS = ("attention_alignment_loss", "lm_head_losses", "rms_norm")
_EXTENSION_FACTS = ("build_info", "extension_available", "extension_error")

__all__ = sorted((*_OPS, *_EXTENSION_FACTS, "reference"))


def __getattr__(name: str):
    if name in _EXTENSION_FACTS:
        return getattr(importlib.import_module(f"{__name__}._extension"), name)
    if name == "reference":
        return importlib.import_module(f"{__name__}.reference")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _op(name: str) -> property:
    """The op `name` of the module of the same name. A property of the package's class, not an
    entry of its namespace: importing that module binds the module under the op's name in the
    package, which would hide the op from a later `from crystal_ext.ops import name`."""
    module_name = f"{__name__}.{name}"

    def get(package):
        if name in package.__dict__:  # assigned by hand, e.g. a test's stand-in
            return package.__dict__[name]
        return getattr(importlib.import_module(module_name), name)

    def set_(package, value):
        if not (isinstance(value, types.ModuleType) and value.__name__ == module_name):
            package.__dict__[name] = value

    return property(get, set_)


class _OpsPackage(types.ModuleType):
    attention_alignment_loss = _op("attention_alignment_loss")
    lm_head_losses = _op("lm_head_losses")
    rms_norm = _op("rms_norm")


sys.modules[__name__].__class__ = _OpsPackage

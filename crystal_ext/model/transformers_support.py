"""The transformers releases crystal_ext's model side runs on.

The fused ops (crystal_ext.ops) need only torch. Everything that runs a transformers model (the
dual-path attention, the families, the objective, the training entry point) relies on interfaces
of the modelling code that changed within 5.x. On 5.17, for instance, the LFM2 decoder layer
does not hand its keyword arguments to its short convolution, so the dual-path layout would not
reach it, the convolution would run over both paths at once, and LFM2-VL would train on another
objective; its TrainingArguments has no `activation_checkpointing`; the Qwen3.5 mixer takes its
cache under another name (92 of the suite's tests failed there). 5.24.0 failed 19 (Aya Vision,
the LFM2 short convolution run from its parts, FSDP, the fused resume). MIN_TRANSFORMERS is the
oldest release the whole test suite has passed on; an older one is refused with this message
instead of running code nobody checked against it.
"""

from __future__ import annotations

MIN_TRANSFORMERS = "5.25.0"


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def installed_transformers() -> str:
    """The version of the transformers that `import transformers` gives."""
    import transformers

    return transformers.__version__


def transformers_problem() -> str | None:
    """Why the installed transformers cannot run crystal_ext's models, or None."""
    installed = installed_transformers()
    if _release(installed) < _release(MIN_TRANSFORMERS):
        return (
            f"crystal_ext runs models with transformers >= {MIN_TRANSFORMERS}; this is {installed} "
            f"(pip install 'transformers>={MIN_TRANSFORMERS}'). The fused ops in crystal_ext.ops work "
            "with any transformers."
        )
    return None


def require_supported_transformers() -> None:
    """RuntimeError with transformers_problem()'s message where there is one."""
    problem = transformers_problem()
    if problem is not None:
        raise RuntimeError(problem)


__all__ = ["MIN_TRANSFORMERS", "require_supported_transformers", "transformers_problem"]

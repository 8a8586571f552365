"""What the hardware makes fast: the bf16 and gradient-checkpointing defaults of every trainer we build.

TRL's ``GRPOConfig`` / ``SFTConfig`` default to ``bf16=True`` and ``gradient_checkpointing=True`` on
every device, the CPU included. On a CPU without native bf16 (AVX2 only: no AVX512-BF16 / AMX) bf16
autocast runs on oneDNN's slow emulation path — the default main job took 35 s per GRPO step instead
of 3.6 s in fp32 — and its numbers depend on the CPU. Gradient checkpointing trades compute for
memory, which a CPU run on a tiny model does not need. So our configs decide both explicitly:

* ``bf16`` (:func:`resolve_bf16`): ``None`` (our default) means bf16 on an accelerator that supports it
  (TRL's choice there) and fp32 on a CPU; ``True`` on a CPU is honoured only where the CPU has native
  bf16 (:func:`cpu_has_native_bf16`), otherwise it falls back to fp32 with a warning naming the field;
  ``False`` is fp32 everywhere.
* ``gradient_checkpointing`` (:func:`resolve_gradient_checkpointing`): ``None`` (our default) means on
  with an accelerator (TRL's default, for memory) and off on a CPU; ``True`` / ``False`` are honoured.

Only torch is imported, inside the functions.
"""

from __future__ import annotations

import warnings

__all__ = [
    "accelerator_available",
    "cpu_has_native_bf16",
    "resolve_bf16",
    "resolve_gradient_checkpointing",
    "runs_on_cpu",
]


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (oneDNN reports AVX512-BF16 or AMX).

    Reads ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours ``ONEDNN_MAX_CPU_ISA`` (so
    ``ONEDNN_MAX_CPU_ISA=AVX2`` emulates an AVX2-only CPU); False when torch cannot tell.
    """
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def accelerator_available() -> bool:
    """True when torch sees a CUDA, XPU or MPS device (the devices transformers' Trainer would pick)."""
    import torch

    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def runs_on_cpu(use_cpu: bool) -> bool:
    """True when a trainer with this ``use_cpu`` runs on the CPU: asked for, or no accelerator at all."""
    return bool(use_cpu) or not accelerator_available()


def resolve_bf16(requested: bool | None, *, use_cpu: bool, fp16: bool = False, field: str = "bf16") -> bool:
    """The ``bf16`` a trainer runs with (see the module docstring for the rule).

    Args:
        requested: the user's value; ``None`` = decide from the hardware.
        use_cpu: the config's ``use_cpu``.
        fp16: the config's ``fp16`` (``None`` never turns bf16 on beside fp16).
        field: the config field named in the warning.

    Returns ``True`` for bf16 autocast. ``True`` on a CPU without native bf16 returns ``False`` and warns
    once per call site: the run is fp32, as fast as it can be there, instead of about 10x slower.
    """
    import torch

    if requested is not None and not isinstance(requested, bool):
        raise ValueError(f"{field} must be True, False or None (auto), got {requested!r}")
    if runs_on_cpu(use_cpu):
        if requested and not cpu_has_native_bf16():
            warnings.warn(
                f"{field}=True on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 autocast would be emulated, "
                f"about 10x slower than fp32; running fp32. Set {field}=False to silence this, or train on a GPU.",
                stacklevel=3,
            )
            return False
        return bool(requested)
    if requested is None:
        if fp16:
            return False
        return bool(not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    return requested


def resolve_gradient_checkpointing(requested: bool | None, *, use_cpu: bool,
                                   field: str = "gradient_checkpointing") -> bool:
    """The ``gradient_checkpointing`` a trainer runs with: ``None`` = on with an accelerator, off on a CPU."""
    if requested is not None and not isinstance(requested, bool):
        raise ValueError(f"{field} must be True, False or None (auto), got {requested!r}")
    if requested is None:
        return not runs_on_cpu(use_cpu)
    return requested

"""Precision that follows the device: bf16-mixed where GPUs support it, 32-true on CPU.

On a CPU without native bf16 units a bf16 matrix product is emulated and runs
orders of magnitude slower than fp32 (about 400x on our 2-core build machines),
so asking for it there earns a loud warning instead of a silent crawl.
"""

from __future__ import annotations

import warnings

import torch


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def default_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` on CUDA GPUs with bf16, ``16-mixed`` on older CUDA GPUs, ``32-true`` elsewhere."""
    if _uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_precision(precision: str | int | None, accelerator: str = "auto") -> str:
    """Resolve ``None``/``auto`` to the device default; warn about bf16 on a CPU."""
    if precision in (None, "auto", "null"):
        return default_precision(accelerator)
    precision = str(precision)
    if "bf16" in precision and not _uses_cuda(accelerator) and accelerator != "tpu":
        warnings.warn(
            f"trainer.precision={precision} on a CPU: bf16 matrix products are emulated on CPUs without native "
            "bf16 support and can run hundreds of times slower than fp32; use trainer.precision=32-true unless "
            "this CPU has AMX/AVX512-BF16.", stacklevel=2)
    return precision

"""Which float precision inference runs in: bf16 where the hardware computes it natively.

bf16 autocast halves memory traffic and, on GPUs and on CPUs with bf16 instructions (AVX512-BF16,
AMX: Intel Cooper Lake / Sapphire Rapids, AMD Zen 4 and later), runs the encoder and the sampler
faster than fp32 with results that differ only by rounding (test_encoders.py and test_sampling.py
bound the difference; the README gives the speed). Elsewhere oneDNN *emulates* bf16,
slower than fp32, so "auto" stays in fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")
PRECISION_HELP = (
    "auto: bf16 on a GPU and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere; "
    "fp32 for bit-stable features across batch sizes (default: auto)"
)
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags_have_native_bf16(cpuinfo: str) -> bool:
    """True when a ``/proc/cpuinfo`` text lists a native bf16 instruction set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and NATIVE_BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU runs bf16 math natively (Linux x86; False where unknown)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return cpu_flags_have_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def device_type(device: Any) -> str:
    """ "cpu", "cuda", ... of a ``torch.device`` or a device string such as "cuda:1"."""
    return getattr(device, "type", str(device).split(":")[0])


def resolve_precision(precision: str, device: Any) -> str:
    """``"bf16"`` or ``"fp32"``: "auto" is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    kind = device_type(device)
    if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def autocast(device: Any, precision: str) -> Any:
    """bf16 autocast on ``device`` for a resolved ``precision`` of "bf16"; a no-op for "fp32"."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=torch.bfloat16)

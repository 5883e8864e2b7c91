"""Keep torch usable inside napari when OpenGL is Mesa's software renderer (llvmpipe).

Mesa's llvmpipe maps its own libLLVM into the napari process when the canvas starts. Importing
triton afterwards (torch imports it lazily, e.g. via ``torchvision.ops`` → ``torch._dynamo``)
loads triton's bundled LLVM too, and the clash crashes the process with a segmentation fault.
napari-stem never compiles kernels with triton, so when another LLVM is already mapped we make
``import triton`` fail cleanly; torch then treats triton as absent and runs as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path


def llvm_already_mapped(maps_file: Path = Path("/proc/self/maps")) -> bool:
    """Whether a libLLVM shared library (e.g. Mesa's) is loaded in this process (Linux only)."""
    try:
        return "libLLVM" in maps_file.read_text()
    except OSError:
        return False


def block_triton_if_llvm_loaded() -> bool:
    """Make ``import triton`` raise ImportError when it would crash; returns whether it did."""
    if "triton" in sys.modules or not llvm_already_mapped():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # import now raises ImportError
    return True

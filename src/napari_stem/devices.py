"""What device "auto" means, decided in one place (torch-free: torch is imported only when asked).

"auto" is CUDA when a CUDA device is usable, else the CPU; every other name ("cpu", "cuda",
"cuda:1", a ``torch.device``) is kept as given. Callers that must not import torch (the preview's
cost estimate in the GUI) pass their own ``cuda_available`` answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def resolve_device_name(device: Any = "auto", cuda_available: Callable[[], bool] | None = None) -> Any:
    """``"cuda"`` or ``"cpu"`` for ``"auto"``; anything else unchanged.

    ``cuda_available`` says whether CUDA is usable; by default ``torch.cuda.is_available`` (which
    imports torch, so only when ``device`` is "auto").
    """
    if str(device) != "auto":
        return device
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available
    return "cuda" if cuda_available() else "cpu"

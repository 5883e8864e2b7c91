"""Reading torch pickles without running code, with messages that say what happened.

Every ``.pt``/``.pth``/``.bin`` napari-stem reads (reference checkpoints, encoder weights, a
training run's state) goes through :func:`torch_load_tensors`. ``torch.load(weights_only=True)``
refuses pickles that reference classes or functions; torch's own message then advises re-running
with ``weights_only=False``, the one call that would execute the file's code. We replace that
advice: the file contains code, it was refused for safety, and here is how to convert it in a
trusted environment.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from napari_stem.errors import StemError, describe_path

#: torch's wording for a class/function reference in the pickle ("Unsupported global",
#: "unsupported GLOBAL", "... is not an allowed global", older "Unsupported class").
_CODE_IN_PICKLE = re.compile(r"unsupported (global|class)|not an allowed global|GLOBAL [\w.]+ was not", re.IGNORECASE)

CONVERT_TO_STATE_DICT_RECIPE = """\
# only in a trusted environment, where the code the file refers to is importable:
import torch
obj = torch.load("FILE", weights_only=False, map_location="cpu")
state = obj.state_dict() if hasattr(obj, "state_dict") else obj
torch.save(state, "FILE_state_dict.pt")   # or safetensors.torch.save_file(state, "FILE.safetensors")"""


def contains_code(exc: BaseException) -> bool:
    """Whether a ``torch.load(weights_only=True)`` error means the pickle references code."""
    return isinstance(exc, pickle.UnpicklingError) and bool(_CODE_IN_PICKLE.search(str(exc)))


def torch_load_tensors(
    path: str | Path, what: str, error: type[StemError] = StemError, recipe: str | None = None
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; problems raise ``error`` naming ``what``.

    ``recipe``: how to convert a code-bearing file (default: a generic state-dict conversion).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {describe_path(path)} does not exist or is not a file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports junk as UnpicklingError, EOFError, RuntimeError, KeyError...
        if contains_code(exc):
            steps = (recipe or CONVERT_TO_STATE_DICT_RECIPE).replace("FILE", path.stem)
            raise error(
                f"{what} {describe_path(path)} contains pickled code (class or function references), not just "
                "tensors. Loading it would run that code, so napari-stem refuses it for safety. If you trust its "
                f"source, convert it once to plain tensors in a trusted environment:\n{steps}\nthen use the converted file."
            ) from exc
        raise error(
            f"cannot read {what} {describe_path(path)}: it is damaged (truncated or overwritten) or not a file "
            f"written by torch.save ({type(exc).__name__}: {_first_sentence(exc)}). Use an intact copy."
        ) from exc


def _first_sentence(exc: BaseException) -> str:
    """torch's reason (e.g. "Unsupported operand 110"), without its advice to load unsafely."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = re.split(r"(?i)\b(re-?running|weights_only)\b", lines[0])[0].strip(" .:,;") if lines else ""
    return reason[:200] or type(exc).__name__

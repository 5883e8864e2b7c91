"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

Every writer in napari-stem (predictions, reports, manifests, run logs, training state) goes
through :func:`replace_atomically`, so a crash or Ctrl-C mid-write leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(partial)`` to a hidden sibling of ``path``, then rename it over ``path``.

    On any failure the partial file is removed and the error propagates; ``path`` is untouched.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return replace_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))

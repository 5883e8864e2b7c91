"""The project's error types.

Every problem caused by a user's input (a file, a folder, a checkpoint, a weights file) raises a
:class:`StemError` subclass whose message names the offending file and says what to do, so the
plugin can show it as is and the CLI can print it without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class StemError(Exception):
    """Base class of napari-stem's user-facing errors."""


class SlideError(StemError):
    """A slide could not be opened or read (corrupt, truncated, not a slide, no pixel size)."""


class SpotsError(StemError):
    """Spot coordinates or geometry are missing or inconsistent (h5ad, spaceranger, grid)."""


class DatasetError(StemError):
    """A HEST-layout folder is incomplete or inconsistent."""


class CheckpointError(StemError):
    """A checkpoint is missing, unsafe to load, or does not match what the caller asks for."""


class EncoderError(StemError):
    """An image encoder cannot be built: unknown name, missing or mismatched weights, no hub."""


def describe_path(path: str | Path) -> str:
    """Quote a path the same way in every message."""
    return f"'{Path(path)}'"

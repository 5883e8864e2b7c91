"""Checkpoints within reach: the demo model (built on first use) and the recently used ones.

The recent list is a small JSON file in napari-stem's cache folder; entries whose folder has gone
are dropped when read. No napari or Qt import.
"""

from __future__ import annotations

import json
from pathlib import Path

from napari_stem.datasets import DEMO_BUILD_TIME, cache_dir, demo_model_dir

DEMO = "demo"
HUB_PREFIX = "hf-hub:"  # as napari_stem.hub (not imported: it is only needed to download)
MAX_RECENT = 8


def _recent_file() -> Path:
    return cache_dir() / "recent_checkpoints.json"


def recent_checkpoints() -> list[Path]:
    """Recently used checkpoint folders that still exist and ``hf-hub:`` references, newest first."""
    try:
        entries = json.loads(_recent_file().read_text())
    except (OSError, ValueError):
        return []
    return [
        Path(entry)
        for entry in entries
        if isinstance(entry, str) and (entry.startswith(HUB_PREFIX) or (Path(entry) / "config.json").is_file())
    ]


def remember_checkpoint(path: str | Path) -> None:
    """Put ``path`` first in the recent list (best effort: a read-only cache only loses the list)."""
    path = str(path) if str(path).startswith(HUB_PREFIX) else str(Path(path).resolve())
    entries = [str(p) for p in recent_checkpoints() if str(p) != path]
    try:
        target = _recent_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps([path, *entries][:MAX_RECENT]))
    except OSError:
        pass


def demo_checkpoint() -> Path | None:
    """The demo checkpoint when it is built, else None."""
    checkpoint = demo_model_dir("full") / "run" / "checkpoint"
    return checkpoint if (checkpoint / "config.json").is_file() else None


def choices() -> list[tuple[str, str | None]]:
    """``(label, value)`` pairs for a menu: a blank first, the demo model, then recent folders."""
    demo = demo_checkpoint()
    items: list[tuple[str, str | None]] = [("—", None)]
    items.append(("demo model", str(demo)) if demo else (f"demo model (built on first use, {DEMO_BUILD_TIME})", DEMO))
    for path in recent_checkpoints():
        if str(path).startswith(HUB_PREFIX):
            items.append((str(path), str(path)))
        elif demo is None or path.resolve() != demo.resolve():
            items.append((f"{path.parent.name}/{path.name}", str(path)))
    return items

"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

The writers of results and state (prediction tables and CSVs, checkpoints, embedding caches,
manifests, evaluation reports, cohort state files, the cached demo assets) put their work in a
hidden sibling named by :func:`temporary_sibling` (target name, process id and host, kind) and
rename it into place, so a crash or Ctrl-C mid-write leaves the target untouched. A few small
side files are written in place: the recent-checkpoints list, figures, ``stem-train baseline``'s
summary, and the model card in the temporary folder ``stem-train push`` uploads. A killed process
(SIGKILL, OOM, power) cannot remove its sibling; the next writer of the same target does, with
:func:`remove_stale_temporaries`, once that process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: This machine's name as it appears in temporary file names (letters, digits, '-', '_').
_HOST = re.sub(r"[^\w-]", "-", socket.gethostname())[:64] or "host"


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(partial)`` to a hidden sibling of ``path``, then rename it over ``path``.

    On any failure the partial file is removed and the error propagates; ``path`` is untouched.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    partial = temporary_sibling(path, "part")
    try:
        write(partial)
        os.replace(partial, path)
    except OSError as exc:  # disk full, read-only...: name the file the caller asked for
        partial.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return replace_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def temporary_sibling(path: str | Path, kind: str) -> Path:
    """``.<name>.<pid>@<host>.<kind>`` next to ``path``: hidden, and traceable to its writer."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.{kind}")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by processes of this host that no longer run.

    A sibling written on another host (a shared filesystem) is left alone: its process cannot be
    checked from here. Returns what was removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)(?:@([\w-]+))?\.[\w.-]+$")
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or match.group(2) not in (None, _HOST) or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a number we cannot check): leave it
    return True

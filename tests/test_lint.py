"""The repository passes ``ruff check`` and ``ruff format --check`` with the settings in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The ruff next to this Python (the venv's), else one on PATH."""
    here = Path(sys.executable).with_name("ruff")
    if here.is_file():
        return [str(here)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[testing]' installs it)")
    return [found]


def test_ruff_check_passes() -> None:
    result = subprocess.run(
        [*_ruff(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, (
        "ruff check found problems (most fixed by `ruff check --fix`):\n" + result.stdout + result.stderr
    )


def test_ruff_format_is_applied() -> None:
    result = subprocess.run(
        [*_ruff(), "format", "--check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, "files not formatted (run `ruff format`):\n" + result.stdout + result.stderr

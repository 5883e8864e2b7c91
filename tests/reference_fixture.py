"""Facts about the reference-written checkpoint fixture (tests/data/stem_reference/), read from its files.

The equivalence tests take the gene count, condition width and architecture from the fixture's own
config.json, so a regenerated fixture (another size) needs no edits to the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "data" / "stem_reference"
REFERENCE_PT = REFERENCE_DIR / "0000100.pt"
REFERENCE_CASES = REFERENCE_DIR / "cases.npz"
#: The reference ``Stem(...)`` constructor arguments the fixture was written with.
REFERENCE_ARGS: dict = json.loads((REFERENCE_DIR / "config.json").read_text())["reference_constructor_args"]
N_GENES: int = REFERENCE_ARGS["input_size"]
COND_DIM: int = REFERENCE_ARGS["label_size"]
NUM_HEADS: int = REFERENCE_ARGS["num_heads"]


def write_gene_list(path: Path, prefix: str = "G", n_genes: int = N_GENES, trailer: str = "\n") -> Path:
    """A gene list of ``n_genes`` names ``{prefix}0``, ``{prefix}1``, ... (the fixture's count by default)."""
    path.write_text("\n".join(f"{prefix}{i}" for i in range(n_genes)) + trailer)
    return path

"""The prepared-dataset manifest: what ``prepare`` wrote and what ``fit``/``baseline`` read.

``stem-train prepare DATA_DIR --out PREP_DIR`` leaves in ``PREP_DIR``:

* ``manifest.json`` — this file's :class:`PreparedDataset`;
* ``embeddings/<sample_id>.h5`` — per-slide embedding caches (HEST-Bench layout, with the seven
  dihedral augmentations in ``embeddings_aug``), rows in the order of ``st/<sample_id>.h5ad``;
* ``selected_gene_list.txt`` — the ordered gene panel, one symbol per line (the reference's name);
* ``all_slide_lst.txt`` — every sample id, one per line (the reference's name).

Paths inside the manifest are stored relative to ``PREP_DIR`` (embeddings) or absolute (the
HEST data folder) so a prepared folder can be moved together with its embeddings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_stem.atomic import write_text_atomically
from napari_stem.errors import DatasetError, describe_path
from napari_stem.values import EmbeddingSpec

MANIFEST_FILE = "manifest.json"
GENE_LIST_FILE = "selected_gene_list.txt"
SLIDE_LIST_FILE = "all_slide_lst.txt"
EMBEDDINGS_DIR = "embeddings"
MANIFEST_VERSION = 1


@dataclass
class PreparedSlide:
    sample_id: str
    patient: str  # HEST metadata/<id>.json "patient" (the sample id when the metadata names none)
    split: str  # "train" or "test" (held out: never used for gene selection unless asked)
    n_spots: int
    embeddings: str  # relative to the prepared folder
    # the slide file embedded, so 'evaluate' can tell a held-out slide that is a training image under
    # another name (same bytes) from new tissue; absent in manifests written before they were recorded
    image: str | None = None  # absolute path when prepared
    image_sha256: str | None = None
    image_bytes: int | None = None
    image_mtime_ns: int | None = None  # with image_bytes: a rerun reuses the hash instead of reading the file again


#: Bytes read per step while hashing a slide file (whole-slide images are gigabytes: never read at once).
HASH_CHUNK_BYTES = 8 << 20


def sha256_file(path: str | Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file, streamed in chunks (memory stays at one chunk whatever the slide's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def image_record(path: str | Path, previous: PreparedSlide | None = None) -> dict[str, Any]:
    """``image*`` fields of a :class:`PreparedSlide` for the slide file at ``path``.

    The hash of ``previous`` (the same sample in the manifest being replaced) is reused when its
    path, size and modification time are unchanged, so a cached rerun does not reread every slide.
    """
    path = Path(path).resolve()
    stat = path.stat()
    if (
        previous is not None
        and previous.image_sha256
        and previous.image == str(path)
        and previous.image_bytes == stat.st_size
        and previous.image_mtime_ns == stat.st_mtime_ns
    ):
        digest = previous.image_sha256
    else:
        digest = sha256_file(path)
    return {
        "image": str(path),
        "image_sha256": digest,
        "image_bytes": int(stat.st_size),
        "image_mtime_ns": int(stat.st_mtime_ns),
    }


@dataclass
class PreparedDataset:
    """Everything ``fit``, ``baseline`` and ``predict`` need to know about a prepared dataset."""

    data_dir: str  # the HEST folder (absolute)
    encoder: str
    encoder_weights: str | None
    embedding_dim: int
    patch: dict[str, Any]  # napari_stem.embedding.patches.PatchSpec.to_dict()
    genes: list[str]
    gene_selection: dict[str, Any]  # method, requested count, whether held-out slides were used, ...
    slides: list[PreparedSlide] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    root: Path | None = field(default=None, compare=False, repr=False)

    # -------------------------------------------------------------- queries
    def split(self, name: str) -> list[PreparedSlide]:
        return [slide for slide in self.slides if slide.split == name]

    def embeddings_path(self, slide: PreparedSlide) -> Path:
        return self._root() / slide.embeddings

    def st_path(self, slide: PreparedSlide) -> Path:
        return Path(self.data_dir) / "st" / f"{slide.sample_id}.h5ad"

    def embedding_spec(self) -> EmbeddingSpec:
        """What checkpoints trained on this data record about their embeddings, so prediction embeds like training."""
        return EmbeddingSpec.from_dict({"encoder": self.encoder, "dim": self.embedding_dim, "patch": self.patch})

    def _root(self) -> Path:
        if self.root is None:
            raise DatasetError("this manifest was not loaded from a folder; save or load it first")
        return self.root

    # -------------------------------------------------------------- I/O
    def save(self, root: str | Path) -> Path:
        """Write ``manifest.json`` and the two reference-style text lists atomically."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        data = asdict(self)
        data.pop("root")
        write_text_atomically(root / MANIFEST_FILE, json.dumps(data, indent=2))
        write_text_atomically(root / GENE_LIST_FILE, "\n".join(self.genes) + "\n")
        write_text_atomically(root / SLIDE_LIST_FILE, "\n".join(s.sample_id for s in self.slides) + "\n")
        return root / MANIFEST_FILE

    @classmethod
    def load(cls, root: str | Path) -> PreparedDataset:
        root = Path(root)
        path = root / MANIFEST_FILE if root.is_dir() else root
        if not path.exists():
            raise DatasetError(
                f"{describe_path(path)} does not exist: run 'stem-train prepare DATA_DIR --out {path.parent}' first."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{describe_path(path)} is not valid JSON ({exc}); re-run 'stem-train prepare'."
            ) from exc
        if data.get("version") != MANIFEST_VERSION:
            raise DatasetError(
                f"{describe_path(path)} has manifest version {data.get('version')}, this stem-train reads "
                f"{MANIFEST_VERSION}; re-run 'stem-train prepare'."
            )
        slides = [PreparedSlide(**slide) for slide in data.pop("slides")]
        manifest = cls(**data, slides=slides)
        manifest.root = path.parent
        return manifest

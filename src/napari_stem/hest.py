"""HEST-1k folders: ``wsis/<id>.tif``, ``st/<id>.h5ad``, ``metadata/<id>.json`` per sample.

:func:`iter_hest_samples` walks such a folder the way ``hest.iter_hest`` does, checking that every
sample has its three files, so a missing file is reported by name before hours of work start.
:func:`download` fetches such a folder from HEST-1k on the Hugging Face Hub (:mod:`napari_stem.hest_download`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_stem.errors import DatasetError, describe_path

_WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif")


@dataclass(frozen=True)
class HestSample:
    """One HEST sample: its id, its three files and its metadata."""

    sample_id: str
    wsi_path: Path
    st_path: Path
    metadata: dict[str, Any]

    @property
    def mpp(self) -> float | None:
        """HEST's fitted pixel size (``pixel_size_um_estimated``), the one to trust."""
        value = self.metadata.get("pixel_size_um_estimated")
        return float(value) if value else None

    @property
    def patient(self) -> str:
        return str(self.metadata.get("patient") or self.sample_id)

    def open_slide(self):
        from napari_stem.slide import open_slide

        return open_slide(self.wsi_path, mpp=self.mpp)

    def read_spots(self):
        from napari_stem.spots import read_spots_h5ad

        return read_spots_h5ad(self.st_path, mpp=self.mpp)


def hest_sample_ids(root: str | Path) -> list[str]:
    """Sample ids of a HEST folder: the stems of ``st/*.h5ad``, sorted."""
    root = _check_root(Path(root))
    return sorted(path.stem for path in (root / "st").glob("*.h5ad"))


def iter_hest_samples(root: str | Path, sample_ids: Sequence[str] | None = None) -> Iterator[HestSample]:
    """Yield the samples of a HEST folder, all of them or ``sample_ids`` in the given order."""
    root = _check_root(Path(root))
    if sample_ids is None:
        sample_ids = sorted(
            {path.stem for sub in ("st", "wsis") for path in (root / sub).iterdir() if not path.name.startswith(".")}
        )
    for sample_id in sample_ids:
        yield hest_sample(root, sample_id)


def hest_sample(root: str | Path, sample_id: str) -> HestSample:
    """One sample of a HEST folder, with a :class:`DatasetError` naming any missing file."""
    root = Path(root)
    st_path = root / "st" / f"{sample_id}.h5ad"
    if not st_path.exists():
        raise DatasetError(
            f"HEST sample '{sample_id}' has no expression file {describe_path(st_path)}; copy it from the "
            "HEST download or leave the sample out (e.g. remove its slide from wsis/)."
        )
    wsi_candidates = [root / "wsis" / f"{sample_id}{suffix}" for suffix in _WSI_SUFFIXES]
    wsi_path = next((path for path in wsi_candidates if path.exists()), None)
    if wsi_path is None:
        raise DatasetError(
            f"HEST sample '{sample_id}' has no slide in {describe_path(root / 'wsis')} "
            f"(looked for {sample_id}.tif and other slide formats)."
        )
    metadata_path = root / "metadata" / f"{sample_id}.json"
    metadata: dict[str, Any] = {}
    if metadata_path.exists():
        try:
            metadata = json.loads(metadata_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"metadata file {describe_path(metadata_path)} is not valid JSON ({exc}).") from exc
    else:
        raise DatasetError(
            f"HEST sample '{sample_id}' has no metadata file {describe_path(metadata_path)}; it must give "
            "at least 'pixel_size_um_estimated'."
        )
    return HestSample(sample_id=sample_id, wsi_path=wsi_path, st_path=st_path, metadata=metadata)


def is_hest_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "st").is_dir() and (path / "wsis").is_dir()


def _check_root(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"HEST folder {describe_path(root)} does not exist.")
    missing = [sub for sub in ("wsis", "st", "metadata") if not (root / sub).is_dir()]
    if missing:
        raise DatasetError(
            f"{describe_path(root)} is not a HEST-layout folder: missing {', '.join(s + '/' for s in missing)} "
            "(expected wsis/<id>.tif, st/<id>.h5ad, metadata/<id>.json)."
        )
    return root

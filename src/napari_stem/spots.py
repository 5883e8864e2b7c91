"""Spots: where expression is measured or predicted on a slide.

A :class:`Spots` holds spot centres in level-0 slide pixels ``(x, y)`` (the ``obsm['spatial']``
convention of HEST and scanpy), the spot diameter, the slide's µm/px, barcodes and per-spot
annotations (``array_row``, ``array_col``, ``in_tissue`` ...). Physical units are derived, never
stored twice, so pixels and µm cannot drift apart.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_stem.errors import SpotsError, describe_path
from napari_stem.validate import check_unique_barcodes

#: Visium: 55 µm spots on a 100 µm centre-to-centre hexagonal grid.
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_PITCH_UM = 100.0
#: Legacy Spatial Transcriptomics: 100 µm spots, 200 µm pitch.
LEGACY_ST_SPOT_DIAMETER_UM = 100.0
LEGACY_ST_PITCH_UM = 200.0


@dataclass
class Spots:
    """Spot centres on one slide, in level-0 pixels, with their diameter and annotations."""

    centers_px: np.ndarray  # (n, 2) float, (x, y) level-0 pixels
    diameter_px: float
    mpp: float | None = None
    barcodes: np.ndarray = field(default=None)  # type: ignore[assignment]
    obs: pd.DataFrame = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.centers_px = np.asarray(self.centers_px, dtype=np.float64).reshape(-1, 2)
        n_spots = len(self.centers_px)
        if self.barcodes is None:
            self.barcodes = np.array([f"spot_{i}" for i in range(n_spots)], dtype=object)
        self.barcodes = np.asarray(self.barcodes, dtype=object)
        if self.obs is None:
            self.obs = pd.DataFrame(index=pd.Index(self.barcodes.astype(str), name="barcode"))
        if len(self.barcodes) != n_spots or len(self.obs) != n_spots:
            raise SpotsError(f"{n_spots} spot centres but {len(self.barcodes)} barcodes / {len(self.obs)} obs rows")
        if not self.diameter_px > 0:
            raise SpotsError(f"spot diameter must be positive, got {self.diameter_px} px")

    def __len__(self) -> int:
        return len(self.centers_px)

    @property
    def centers_um(self) -> np.ndarray:
        """``(x, y)`` in µm from the slide's origin."""
        return self.centers_px * self._require_mpp()

    @property
    def diameter_um(self) -> float:
        return self.diameter_px * self._require_mpp()

    @property
    def napari_coords_um(self) -> np.ndarray:
        """``(row, col)`` in µm: napari's axis order for a Points layer in the slide's µm frame."""
        return self.centers_um[:, ::-1].copy()

    def subset(self, index: np.ndarray) -> Spots:
        """The spots selected by a boolean mask or integer index, in their original order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return Spots(
            centers_px=self.centers_px[index],
            diameter_px=self.diameter_px,
            mpp=self.mpp,
            barcodes=self.barcodes[index],
            obs=self.obs.iloc[index].copy(),
        )

    def _require_mpp(self) -> float:
        if self.mpp is None:
            raise SpotsError("these spots have no pixel size (µm/px); give mpp= when loading them")
        return self.mpp


# ---------------------------------------------------------------------- readers
def read_spots_h5ad(path: str | Path, mpp: float | None = None) -> Spots:
    """Spots of a HEST/Visium ``.h5ad`` (``obsm['spatial']`` + ``spot_diameter_fullres``).

    ``mpp`` is the slide's µm/px; when omitted it is taken from HEST's ``metadata/<id>.json``
    next to ``st/`` if there is one.
    """
    import anndata

    path = Path(path)
    if not path.exists():
        raise SpotsError(f"spot file {describe_path(path)} does not exist.")
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:
        raise SpotsError(f"{describe_path(path)} is not a readable .h5ad file ({exc}).") from exc
    try:
        spots = spots_from_anndata(adata, source=path, mpp=mpp if mpp is not None else _hest_metadata_mpp(path))
    finally:
        if adata.isbacked:
            adata.file.close()
    return spots


def spots_from_anndata(adata, source: str | Path = "<AnnData>", mpp: float | None = None) -> Spots:
    """Spots of an in-memory AnnData laid out as HEST/scanpy spatial data."""
    if "spatial" not in adata.obsm:
        raise SpotsError(
            f"{describe_path(source)} has no obsm['spatial'] spot coordinates; spots need centres in "
            "full-resolution slide pixels (x, y). Add them, or let napari-stem lay a grid over the tissue."
        )
    centers = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    if not np.isfinite(centers).all():
        raise SpotsError(f"{describe_path(source)} has missing (NaN) values in obsm['spatial'].")
    diameter = spot_diameter_fullres(adata, source)
    check_unique_barcodes(adata.obs_names, describe_path(source))
    return Spots(
        centers_px=centers,
        diameter_px=diameter,
        mpp=mpp,
        barcodes=np.asarray(adata.obs_names, dtype=object),
        obs=pd.DataFrame(adata.obs).copy(),
    )


def spot_diameter_fullres(adata, source: str | Path = "<AnnData>") -> float:
    """``uns['spatial'][library]['scalefactors']['spot_diameter_fullres']`` of the first library."""
    libraries = adata.uns.get("spatial", {}) if hasattr(adata.uns, "get") else {}
    for library in libraries.values() if hasattr(libraries, "values") else []:
        factors = library.get("scalefactors", {}) if hasattr(library, "get") else {}
        if "spot_diameter_fullres" in factors:
            return float(np.asarray(factors["spot_diameter_fullres"]))
    raise SpotsError(
        f"{describe_path(source)} has no spot diameter: expected "
        "uns['spatial'][<library>]['scalefactors']['spot_diameter_fullres'] (in full-resolution "
        "pixels, as HEST and spaceranger write it). Add it, e.g. 55 µm / pixel size for Visium."
    )


def read_spots_spaceranger(outs_dir: str | Path, mpp: float | None = None) -> Spots:
    """Spots of a spaceranger ``outs/`` folder, read with :func:`scanpy.read_visium`.

    spaceranger records no µm/px; without ``mpp`` it is estimated from the spots' 100 µm Visium
    lattice (:func:`visium_mpp_from_lattice`, like HEST's ``pixel_size_um_estimated``), so the spots
    land in the µm frame of the full-resolution slide they were aligned to.
    """
    import scanpy as sc

    outs_dir = Path(outs_dir)
    if not (outs_dir / "spatial").is_dir():
        raise SpotsError(f"{describe_path(outs_dir)} is not a spaceranger outs/ folder (no spatial/ inside).")
    try:
        with warnings.catch_warnings():  # scanpy points to squidpy; its reader is what we want here
            warnings.simplefilter("ignore", FutureWarning)
            adata = sc.read_visium(outs_dir)
    except Exception as exc:
        raise SpotsError(f"scanpy could not read the spaceranger folder {describe_path(outs_dir)}: {exc}") from exc
    spots = spots_from_anndata(adata, source=outs_dir, mpp=mpp)
    if spots.mpp is None:
        spots.mpp = visium_mpp_from_lattice(spots.centers_px, spots.obs.get("array_row"), spots.obs.get("array_col"))
    return spots


def visium_lattice_um(
    array_row: Any, array_col: Any, pitch_um: float = VISIUM_PITCH_UM
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` in µm of Visium lattice indices: ``array_col`` steps half a pitch along a row,
    rows are ``pitch · √3/2`` apart."""
    x_um = np.asarray(array_col, dtype=np.float64) * pitch_um / 2
    y_um = np.asarray(array_row, dtype=np.float64) * pitch_um * math.sqrt(3) / 2
    return x_um, y_um


def visium_mpp_from_lattice(
    centers_px: np.ndarray, array_row: Any, array_col: Any, pitch_um: float = VISIUM_PITCH_UM
) -> float | None:
    """µm/px of a Visium slide from its spots: least-squares fit of lattice µm → pixel centres.

    Lattice positions are ``x = array_col · pitch/2``, ``y = array_row · pitch·√3/2``; the fit is
    affine (any rotation of the capture area), and µm/px is 1/√|det|. None when underdetermined.
    """
    if array_row is None or array_col is None:
        return None
    centers_px = np.asarray(centers_px, dtype=np.float64)
    lattice_um = np.stack(visium_lattice_um(array_row, array_col, pitch_um), axis=1)
    design = np.hstack([lattice_um, np.ones((len(lattice_um), 1))])
    if len(design) < 3 or np.linalg.matrix_rank(design) < 3:
        return None
    coefficients, *_ = np.linalg.lstsq(design, centers_px, rcond=None)
    px_per_um = np.sqrt(abs(np.linalg.det(coefficients[:2])))
    return float(1.0 / px_per_um) if px_per_um > 0 else None


def _hest_metadata_mpp(st_path: Path) -> float | None:
    """``pixel_size_um_estimated`` from ``<root>/metadata/<id>.json`` when ``st_path`` is in a HEST folder."""
    import json

    metadata = st_path.parent.parent / "metadata" / f"{st_path.stem}.json"
    if st_path.parent.name == "st" and metadata.exists():
        value = json.loads(metadata.read_text()).get("pixel_size_um_estimated")
        return float(value) if value else None
    return None


# ---------------------------------------------------------------------- layouts
def hex_grid(
    width_um: float,
    height_um: float,
    pitch_um: float = VISIUM_PITCH_UM,
    origin_um: tuple[float, float] = (0.0, 0.0),
) -> pd.DataFrame:
    """A Visium-style hexagonal lattice covering a ``width_um × height_um`` box.

    Returns ``array_row``, ``array_col`` (Visium indices: ``array_col`` steps by 2 along a row and
    odd rows are offset by one column) and centres ``x_um``, ``y_um``. Neighbours in a row are
    ``pitch_um`` apart; rows are ``pitch_um · √3/2`` apart, so all six neighbours are equidistant.
    """
    row_step = pitch_um * math.sqrt(3) / 2
    n_rows = int(math.floor(height_um / row_step)) + 1
    n_cols = int(math.floor(width_um / (pitch_um / 2))) + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    x_um, y_um = visium_lattice_um(rows, cols, pitch_um)
    x_um, y_um = x_um + origin_um[0], y_um + origin_um[1]
    inside = (x_um <= origin_um[0] + width_um) & (y_um <= origin_um[1] + height_um)
    return pd.DataFrame(
        {"array_row": rows[inside], "array_col": cols[inside], "x_um": x_um[inside], "y_um": y_um[inside]}
    )

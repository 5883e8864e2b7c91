"""Spots for slides without spatial data: a Visium-like hexagonal grid over detected tissue."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_stem.errors import describe_path
from napari_stem.slide import Slide
from napari_stem.spots import Spots, hex_grid
from napari_stem.tissue import mask_overview, tissue_fraction_at, tissue_mask_from_rgb
from napari_stem.validate import check_grid, check_grid_size
from napari_stem.values import VISIUM_GRID, GridSpec

#: Longest edge of the overview the tissue mask is computed on.
_MASK_MAX_SIZE = 2048


def tissue_mask(slide: Slide) -> tuple[np.ndarray, float]:
    """The slide's tissue mask and its scale (level-0 px → mask px), found on
    :func:`~napari_stem.tissue.mask_overview` (the file's stored thumbnail when it is fine enough):
    one definition of tissue, so ``stem-train predict``, the demo and the widget lay the same grid."""
    overview, scale = mask_overview(slide, _MASK_MAX_SIZE)
    return tissue_mask_from_rgb(overview), scale


def spots_over_tissue(
    slide: Slide, grid: GridSpec = VISIUM_GRID, tissue: tuple[np.ndarray, float] | None = None
) -> Spots:
    """Hexagonal spots of ``grid`` (default Visium: 100 µm pitch, 55 µm spots) over the tissue.

    Only spots whose footprint is at least ``grid.min_tissue_fraction`` tissue are kept. Spots carry
    Visium-like ``array_row``/``array_col`` and barcodes ``"<row>x<col>"``. ``tissue``: this
    slide's :func:`tissue_mask`, when already computed (:class:`napari_stem.caches.GridCache` keeps
    it: it is the slow part).
    """
    grid = check_grid(grid)
    pitch_um, diameter_um = grid.pitch_um, grid.spot_diameter_um
    mpp = slide.require_mpp()
    height_px, width_px = slide.shape
    check_grid_size(width_px * mpp, height_px * mpp, pitch_um, describe_path(slide.path))
    mask, scale = tissue if tissue is not None else tissue_mask(slide)
    layout = hex_grid(width_px * mpp, height_px * mpp, pitch_um, origin_um=(pitch_um / 2, pitch_um / 2))
    centers_px = np.stack([layout["x_um"].to_numpy(), layout["y_um"].to_numpy()], axis=1) / mpp
    radius_px = diameter_um / 2 / mpp
    fraction = tissue_fraction_at(mask, scale, centers_px, radius_px)
    keep = fraction >= grid.min_tissue_fraction
    layout = layout[keep].reset_index(drop=True)
    barcodes = np.array(
        [f"{r}x{c}" for r, c in zip(layout["array_row"], layout["array_col"], strict=True)], dtype=object
    )
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(len(layout), dtype=np.int64),
            "array_row": layout["array_row"].to_numpy(),
            "array_col": layout["array_col"].to_numpy(),
            "tissue_fraction": fraction[keep],
        },
        index=pd.Index(barcodes.astype(str), name="barcode"),
    )
    return Spots(centers_px=centers_px[keep], diameter_px=diameter_um / mpp, mpp=mpp, barcodes=barcodes, obs=obs)

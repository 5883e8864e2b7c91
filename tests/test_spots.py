"""Spots from HEST h5ad, spaceranger outs/, hexagonal layouts and grids over tissue."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_stem.errors import SpotsError
from napari_stem.grid import spots_over_tissue
from napari_stem.slide import open_slide
from napari_stem.spots import hex_grid, read_spots_h5ad, read_spots_spaceranger
from napari_stem.values import GridSpec


def test_hest_h5ad_spots_in_pixels_and_microns(synthetic_hest: Path) -> None:
    st_path = synthetic_hest / "st" / "SYN000.h5ad"
    spots = read_spots_h5ad(st_path)
    adata = anndata.read_h5ad(st_path)
    assert len(spots) == adata.n_obs
    assert spots.mpp == 0.5  # from metadata/SYN000.json
    assert spots.diameter_px == pytest.approx(110.0)
    assert spots.diameter_um == pytest.approx(55.0)
    np.testing.assert_allclose(spots.centers_px, adata.obsm["spatial"])
    np.testing.assert_allclose(spots.napari_coords_um[:, 0], adata.obsm["spatial"][:, 1] * 0.5)
    assert list(spots.barcodes) == list(adata.obs_names)
    assert {"array_row", "array_col", "in_tissue"} <= set(spots.obs.columns)
    half = spots.subset(np.arange(len(spots)) % 2 == 0)
    assert len(half) == (len(spots) + 1) // 2 and half.barcodes[1] == spots.barcodes[2]


def test_h5ad_without_coordinates_or_diameter(tmp_path: Path, synthetic_hest: Path) -> None:
    adata = anndata.read_h5ad(synthetic_hest / "st" / "SYN000.h5ad")
    no_coords = adata.copy()
    del no_coords.obsm["spatial"]
    no_coords.write_h5ad(tmp_path / "nocoords.h5ad")
    with pytest.raises(SpotsError, match=r"nocoords\.h5ad.*obsm\['spatial'\]"):
        read_spots_h5ad(tmp_path / "nocoords.h5ad", mpp=0.5)
    no_diameter = adata.copy()
    del no_diameter.uns["spatial"]["ST"]["scalefactors"]["spot_diameter_fullres"]
    no_diameter.write_h5ad(tmp_path / "nodiam.h5ad")
    with pytest.raises(SpotsError, match=r"nodiam\.h5ad.*spot_diameter_fullres"):
        read_spots_h5ad(tmp_path / "nodiam.h5ad", mpp=0.5)
    (tmp_path / "junk.h5ad").write_text("junk")
    with pytest.raises(SpotsError, match=r"junk\.h5ad.*not a readable"):
        read_spots_h5ad(tmp_path / "junk.h5ad")
    from napari_stem.spots import Spots

    with pytest.raises(SpotsError, match="spots have no pixel size"):
        _ = Spots(centers_px=np.zeros((1, 2)), diameter_px=10.0).centers_um


def test_spaceranger_outs(spaceranger_outs: Path) -> None:
    spots = read_spots_spaceranger(spaceranger_outs, mpp=0.65)
    assert len(spots) == 100  # the filtered matrix of the mini dataset
    assert spots.diameter_px > 50
    assert {"array_row", "array_col", "in_tissue"} <= set(spots.obs.columns)
    with pytest.raises(SpotsError, match="not a spaceranger outs"):
        read_spots_spaceranger(spaceranger_outs.parent)


def test_hex_grid_is_visium_like() -> None:
    layout = hex_grid(1000.0, 800.0, pitch_um=100.0)
    assert ((layout.array_row + layout.array_col) % 2 == 0).all()
    xy = layout[["x_um", "y_um"]].to_numpy()
    distances, _ = cKDTree(xy).query(xy, k=7)
    interior = (xy[:, 0] > 150) & (xy[:, 0] < 850) & (xy[:, 1] > 150) & (xy[:, 1] < 650)
    np.testing.assert_allclose(distances[interior, 1:], 100.0, rtol=1e-9)  # six equidistant neighbours
    legacy = hex_grid(1000.0, 800.0, pitch_um=200.0)
    assert len(legacy) < len(layout) / 3


def test_grid_over_real_tissue(demo_slide_file: Path) -> None:
    from napari_stem.tissue import mask_overview, tissue_fraction_at, tissue_mask_from_rgb

    slide = open_slide(demo_slide_file)
    spots = spots_over_tissue(slide)
    assert 30 < len(spots) < 170  # 1.1 × 1.5 mm slide, 100 µm pitch, tissue only
    assert spots.diameter_um == pytest.approx(55.0)
    overview, scale = mask_overview(slide)  # the overview the grid finds tissue on
    mask = tissue_mask_from_rgb(overview)
    fraction = tissue_fraction_at(mask, scale, spots.centers_px, spots.diameter_px / 2)
    assert (fraction >= 0.5).all()
    distances, _ = cKDTree(spots.centers_um).query(spots.centers_um, k=2)
    assert distances[:, 1].min() == pytest.approx(100.0)
    legacy = spots_over_tissue(slide, GridSpec(pitch_um=200.0, spot_diameter_um=100.0))
    assert len(legacy) < len(spots) / 2

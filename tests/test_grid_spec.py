"""GridSpec: the grid over tissue as one value, checked by one call, built alike by the widget and the CLI."""

from __future__ import annotations

import argparse
from dataclasses import astuple

import pytest

from napari_stem.validate import InputError, check_grid
from napari_stem.values import VISIUM_GRID, GridSpec


def test_check_grid_refuses_overlapping_spots_and_fractions_outside_0_1() -> None:
    with pytest.raises(InputError, match="grid pitch .* at least 55"):
        check_grid(GridSpec(pitch_um=10.0, spot_diameter_um=55.0))
    with pytest.raises(InputError, match="grid spot diameter"):
        check_grid(GridSpec(spot_diameter_um=0.0))
    with pytest.raises(InputError, match="minimum tissue fraction"):
        check_grid(GridSpec(min_tissue_fraction=1.5))
    checked = check_grid(GridSpec(pitch_um=200, spot_diameter_um=100, min_tissue_fraction=1))
    assert checked == GridSpec(200.0, 100.0, 1.0) and all(type(value) is float for value in astuple(checked))


def test_visium_is_the_default_grid() -> None:
    from napari_stem.plugin.jobs import PredictSettings
    from napari_stem.spots import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM

    assert VISIUM_GRID == GridSpec() == GridSpec(VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, 0.5)
    assert PredictSettings().grid == VISIUM_GRID


def test_cli_builds_the_grid_from_its_flags_and_fingerprints_it_as_before() -> None:
    from stem_train.cohort import settings_fingerprint
    from stem_train.predict import grid_spec

    args = argparse.Namespace(grid_pitch_um=200.0, grid_diameter_um=100.0, min_tissue_fraction=0.3)
    assert grid_spec(args) == GridSpec(pitch_um=200.0, spot_diameter_um=100.0, min_tissue_fraction=0.3)
    # a cohort's done slides stay done: the grid enters its settings fingerprint as the tuple it was
    assert settings_fingerprint(astuple(VISIUM_GRID)) == settings_fingerprint((100.0, 55.0, 0.5))

"""What the prediction widget hands its controller, and the validated job a run is made from.

The widget turns napari layers into the plain inputs here (world coordinates, the slide layer's
transform); :meth:`napari_stem.plugin.controller.PredictController.prepare` checks them with the
functions below, each raising a :class:`~napari_stem.errors.StemError` that names the problem and
its fix, and builds a :class:`PredictJob`. Nothing here imports napari or Qt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import EncoderError, SlideError, SpotsError, StemError, describe_path
from napari_stem.plugin.layers import SlideFrame
from napari_stem.predict import DEFAULT_SAMPLER, SAMPLERS
from napari_stem.spots import Spots
from napari_stem.validate import check_mpp, check_samples, check_steps
from napari_stem.values import VISIUM_GRID, GridSpec

GRID = "grid over tissue"
WHOLE_SLIDE = "whole slide"
DEVICES = ("auto", "cpu", "cuda")


# ---------------------------------------------------------------------- plain inputs
@dataclass
class SlideInput:
    """A slide image layer as plain data: its file, µm/px (None = unknown) and transform."""

    name: str
    path: Path | None
    mpp: float | None
    frame: SlideFrame


@dataclass
class PointsInput:
    """A Points layer as plain data, in world coordinates."""

    name: str
    world_rc: np.ndarray  # (n, 2) world (row, col)
    diameter_world: float
    features: Any = None  # pandas DataFrame or None


@dataclass
class RegionInput:
    """A Shapes layer as ``(shape_type, world vertices)`` pairs; no shapes = whole slide."""

    name: str
    shapes: list[tuple[str, np.ndarray]] = field(default_factory=list)


@dataclass
class PredictSettings:
    """The widget's fields: checkpoint, sampling, device, µm/px override and the grid over tissue."""

    checkpoint: Path | None = None
    n_samples: int = 4
    steps: int = 25
    intervals: tuple[float, ...] = ()  # central interval levels (napari_stem.intervals)
    sampler: str = DEFAULT_SAMPLER
    device: str = "auto"
    seed: int = 0
    encoder_weights: Path | None = None
    mpp_override: float = 0.0  # > 0 replaces the slide's µm/px
    grid: GridSpec = VISIUM_GRID  # used when the spots are the grid over tissue


@dataclass
class PredictJob:
    """Everything one run needs, validated; spots are in the slide's level-0 pixels."""

    job_id: int
    slide_path: Path
    slide_name: str
    mpp: float
    frame: SlideFrame
    spots: Spots
    checkpoint: Path
    genes: list[str]
    encoder: str
    settings: PredictSettings
    cache_path: Path
    region_name: str | None = None


# ---------------------------------------------------------------------- checks
def check_slide(slide: SlideInput | None, settings: PredictSettings) -> float:
    """The slide's µm/px (the override when set): the slide is chosen, has a file, and a pixel size."""
    if slide is None:
        raise SlideError(
            "no slide chosen: open a slide (File > Open, or a HEST folder) and pick its layer under 'slide'."
        )
    if slide.path is None or not Path(slide.path).is_file():
        raise SlideError(
            f"the layer '{slide.name}' has no slide file behind it"
            + (f" ({describe_path(slide.path)} is missing)" if slide.path else "")
            + "; open the slide file with napari-stem (File > Open) and pick that layer."
        )
    mpp = check_mpp(settings.mpp_override, "'µm/px'") if settings.mpp_override else slide.mpp
    if not mpp:
        raise SlideError(
            f"slide {describe_path(slide.path)} does not record its pixel size (µm/px), which patches and "
            "spot sizes need. Fix: enter it in the 'µm/px' field (e.g. 0.5 for a 20× scan, 0.25 for 40×)."
        )
    return float(mpp)


def check_encoder_weights(weights: Path | None, encoder: str) -> None:
    """A chosen weights file exists (None: the encoder's default source)."""
    if weights is not None and not Path(weights).is_file():
        raise EncoderError(
            f"encoder weights file {describe_path(weights)} does not exist; choose the "
            f"weights file of '{encoder}' or clear the field to use its default source."
        )


def check_sampling(settings: PredictSettings) -> None:
    """Samples, sampler, steps and device are ones a run can use (CUDA only when usable here)."""
    check_samples(settings.n_samples, "'samples per spot'")
    if settings.sampler not in SAMPLERS:
        raise StemError(f"unknown sampler {settings.sampler!r}; use {' or '.join(SAMPLERS)}.")
    check_steps(settings.steps, "'steps'", settings.sampler)
    if settings.device not in DEVICES and not str(settings.device).startswith("cuda:"):
        raise StemError(f"unknown device {settings.device!r}; use {', '.join(DEVICES)}.")
    if str(settings.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StemError("device 'cuda' was chosen but no CUDA GPU is usable here; choose 'auto' or 'cpu'.")


def select_region(spots: Spots, region: RegionInput | None, frame: SlideFrame) -> tuple[Spots, str | None]:
    """``(spots inside the region, its name)``; all spots and None without a region or shapes."""
    from napari_stem.regions import has_area_shapes, select_in_shapes

    if region is None or not region.shapes:
        return spots, None
    if not has_area_shapes([shape_type for shape_type, _ in region.shapes]):
        raise SpotsError(
            f"the region layer '{region.name}' holds only lines or paths; draw a polygon, rectangle "
            "or ellipse, or choose 'whole slide'."
        )
    selected = spots.subset(select_in_shapes(frame.pixels_to_world(spots.centers_px), region.shapes))
    if len(selected) == 0:
        raise SpotsError(
            f"no spots lie inside the region '{region.name}' ({len(spots)} spots on the slide); "
            "draw the region over the spots / tissue, or choose 'whole slide'."
        )
    return selected, region.name


def slide_shape(path: Path) -> tuple[int, int]:
    """``(height, width)`` of the slide's level 0, in pixels."""
    from napari_stem.slide import open_slide

    with open_slide(path) as opened:
        return opened.shape


# ---------------------------------------------------------------------- conversions
def spots_from_points(points: PointsInput, frame: SlideFrame, mpp: float) -> Spots:
    """Spots in level-0 slide pixels from a Points layer given in world coordinates."""
    import pandas as pd

    world = np.asarray(points.world_rc, dtype=np.float64).reshape(-1, 2)
    if len(world) == 0:
        raise SpotsError(f"the points layer '{points.name}' has no spots; add points, or choose '{GRID}'.")
    diameter_px = frame.length_to_pixels(points.diameter_world)
    if not diameter_px > 0:
        raise SpotsError(f"the points layer '{points.name}' has spots of size 0; set a spot size in µm.")
    features = points.features
    barcodes = None
    obs = None
    if features is not None and len(features.columns):
        table = pd.DataFrame(features).reset_index(drop=True)
        if "barcode" in table:
            barcodes = np.asarray(table["barcode"], dtype=str).astype(object)
            table = table.drop(columns="barcode")
        if barcodes is not None:
            table.index = pd.Index(barcodes.astype(str), name="barcode")
        obs = table
    if barcodes is None:
        barcodes = np.array([f"spot_{i}" for i in range(len(world))], dtype=object)
        if obs is not None:
            obs.index = pd.Index(barcodes.astype(str), name="barcode")
    return Spots(centers_px=frame.world_to_pixels(world), diameter_px=diameter_px, mpp=mpp, barcodes=barcodes, obs=obs)

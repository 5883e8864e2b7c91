"""See before you compute: the spots a run would predict, the tissue they were laid on, the cost.

The tissue mask is the slow part of a grid, so it is found on the cheapest overview fine enough
for spot tissue fractions (the file's stored thumbnail when it has one: 0.1 s for the demo slide,
where decoding its one level takes 1.4 s; :func:`napari_stem.tissue.mask_overview`) and kept per
slide file; a grid for other pitch, diameter or minimum tissue fraction is then milliseconds. The widget's preview and the controller's run take their grids
from here, so what the preview shows is what gets predicted. The cost estimate uses the pace of
the last run on this machine when there was one, else rough figures measured on 2 CPU cores.
No napari or Qt import.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_stem.devices import resolve_device_name
from napari_stem.spots import Spots

_TISSUE: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()  # slide file -> (mask, scale)
_GRIDS: OrderedDict[tuple, Spots] = OrderedDict()  # slide file + grid settings -> spots
_CACHE_SIZE = 8

#: Seconds per embedded spot by device type, for encoders without a measured pace here
#: (efficientnet_lite0 on 2 busy CPU cores: ~0.5 s; a ViT-L such as UNI is ~10x that).
EMBED_SECONDS_PER_SPOT = {"cpu": 0.5, "cuda": 0.01}
LARGE_ENCODER_FACTOR = 10.0
#: Seconds per sample row and denoising step (the demo-size model on 2 CPU cores: ~0.8 ms).
SAMPLE_SECONDS_PER_ROW_STEP = {"cpu": 8e-4, "cuda": 2e-5}
#: Paces measured by finished runs in this session: (device type, encoder) -> seconds.
MEASURED: dict[tuple[str, str], dict[str, float]] = {}


def _file_key(path: str | Path) -> tuple:
    path = Path(path)
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _remember(cache: OrderedDict, key: tuple, value: object) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def cached_tissue(path: str | Path, mpp: float) -> tuple[np.ndarray, float] | None:
    """The slide's tissue mask if already computed (instant), else None."""
    return _TISSUE.get((*_file_key(path), float(mpp)))


def slide_tissue(path: str | Path, mpp: float) -> tuple[np.ndarray, float]:
    """``(mask, scale)`` of the slide's tissue on :func:`~napari_stem.tissue.mask_overview`, kept per file."""
    key = (*_file_key(path), float(mpp))
    if key not in _TISSUE:
        from napari_stem.slide import open_slide
        from napari_stem.tissue import mask_overview, tissue_mask_from_rgb

        with open_slide(path, mpp=mpp) as slide:
            overview, scale = mask_overview(slide)
        _remember(_TISSUE, key, (tissue_mask_from_rgb(overview), scale))
    return _TISSUE[key]


def grid_over_tissue(
    path: str | Path, mpp: float, pitch_um: float, diameter_um: float, min_tissue_fraction: float
) -> Spots:
    """:func:`napari_stem.grid.spots_over_tissue` of a slide file, kept per file and settings."""
    key = (*_file_key(path), float(mpp), float(pitch_um), float(diameter_um), float(min_tissue_fraction))
    if key not in _GRIDS:
        from napari_stem.grid import spots_over_tissue
        from napari_stem.slide import open_slide

        tissue = slide_tissue(path, mpp)
        with open_slide(path, mpp=mpp) as slide:
            _remember(_GRIDS, key, spots_over_tissue(slide, pitch_um, diameter_um, min_tissue_fraction, tissue=tissue))
    return _GRIDS[key]


# ---------------------------------------------------------------------- cost
def _device_type(device: str) -> str:
    """ "cuda" or "cpu". For "auto", torch is asked only when already loaded: importing it for an
    estimate would freeze the GUI for seconds (3 s on 2 busy cores); until then an NVIDIA driver
    on the machine stands for a usable GPU."""
    if str(device) == "auto":
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "cuda"):
            return resolve_device_name(device, torch.cuda.is_available)
        return resolve_device_name(device, Path("/proc/driver/nvidia/version").exists)
    return "cuda" if str(device).startswith("cuda") else "cpu"


def estimate_seconds(
    n_spots: int, n_samples: int, steps: int, device: str, encoder: str, embedded: bool = False
) -> float:
    """Rough seconds a run takes: embedding (unless cached) plus sampling rows × steps."""
    kind = _device_type(device)
    measured = MEASURED.get((kind, encoder), {})
    embed = measured.get(
        "embed", EMBED_SECONDS_PER_SPOT[kind] * (1.0 if "efficientnet" in encoder else LARGE_ENCODER_FACTOR)
    )
    sample = measured.get("sample", SAMPLE_SECONDS_PER_ROW_STEP[kind])
    return (0.0 if embedded else n_spots * embed) + n_spots * n_samples * steps * sample


def record_pace(
    device: str,
    encoder: str,
    *,
    embed_seconds_per_spot: float | None = None,
    sample_seconds_per_row_step: float | None = None,
) -> None:
    """Remember a finished run's pace so the next estimates on this machine use it."""
    pace = MEASURED.setdefault((_device_type(device), encoder), {})
    if embed_seconds_per_spot and embed_seconds_per_spot > 0:
        pace["embed"] = float(embed_seconds_per_spot)
    if sample_seconds_per_row_step and sample_seconds_per_row_step > 0:
        pace["sample"] = float(sample_seconds_per_row_step)


def format_duration(seconds: float) -> str:
    """ "45 s", "3 min", "2.5 h": rounded the way a person reads a countdown."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def describe_cost(n_spots: int, seconds: float, device: str) -> str:
    """ "~540 spots · ~4 min on cpu"."""
    return f"~{n_spots} spots · ~{format_duration(seconds)} on {_device_type(device)} (estimate)"


@dataclass
class Preview:
    """What a run would predict: all candidate spots, which of them are selected, the tissue."""

    spots: Spots  # every candidate spot (grid over tissue or the spots layer)
    selected: np.ndarray  # bool per spot: inside the region (all when there is none)
    tissue: tuple[np.ndarray, float] | None  # (mask, scale level-0 px → mask px) for grids
    message: str = ""

    @property
    def n_selected(self) -> int:
        return int(np.count_nonzero(self.selected))

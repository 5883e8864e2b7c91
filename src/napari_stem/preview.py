"""See before you compute: what a run would predict (:class:`Preview`) and what it would cost.

The spots come from the controller's :class:`napari_stem.caches.GridCache`, the same a run uses,
so what the preview shows is what gets predicted. The cost estimate uses the pace of the last run
on this machine when there was one, else rough figures measured on 2 CPU cores. No napari or Qt import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_stem.devices import resolve_device_name
from napari_stem.spots import Spots

#: Seconds per embedded spot by device type, for encoders without a measured pace here
#: (efficientnet_lite0 on 2 busy CPU cores: ~0.5 s; a ViT-L such as UNI is ~10x that).
EMBED_SECONDS_PER_SPOT = {"cpu": 0.5, "cuda": 0.01}
LARGE_ENCODER_FACTOR = 10.0
#: Seconds per sample row and denoising step (the demo-size model on 2 CPU cores: ~0.8 ms).
SAMPLE_SECONDS_PER_ROW_STEP = {"cpu": 8e-4, "cuda": 2e-5}
#: Paces measured by finished runs in this session: (device type, encoder) -> seconds.
MEASURED: dict[tuple[str, str], dict[str, float]] = {}


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

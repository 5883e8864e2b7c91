"""Which pixels around a spot the encoder sees, and the order in which spots are read.

Torch-free: the patch geometry is recorded in caches and checkpoints (``PatchSpec.to_dict()``) and
read back by code that never builds a model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.slide import STEM_NATIVE_MIN_CROP_PX, Slide, open_slide

PATCH_MODES = ("hest", "stem-native")
#: HEST-Bench's patches: 112 µm at 0.5 µm/px = 224 px.
HEST_PATCH_SIZE_UM = 112.0
HEST_TARGET_MPP = 0.5


@dataclass(frozen=True)
class PatchSpec:
    """Which pixels around a spot the encoder sees.

    * ``"hest"``: a fixed physical field, ``size_um`` resampled to ``target_mpp`` (HEST-Bench:
      112 µm at 0.5 µm/px → 224 px), read from the coarsest pyramid level that is fine enough;
      white outside the slide. The same tissue area on every scanner.
    * ``"stem-native"``: the reference Stem crop, ``max(224 px, spot diameter)`` at full
      resolution, black outside the slide; the encoder then resizes it. The field of view varies
      with the scanner's µm/px, exactly as in the reference's training data.

    The mode is stored with embeddings and checkpoints so prediction embeds like training did.
    """

    mode: str = "hest"
    size_um: float = HEST_PATCH_SIZE_UM
    target_mpp: float = HEST_TARGET_MPP

    def __post_init__(self) -> None:
        if self.mode not in PATCH_MODES:
            raise ValueError(f"unknown patch mode {self.mode!r}; use one of {', '.join(PATCH_MODES)}")
        if not (self.size_um > 0 and self.target_mpp > 0):
            raise ValueError(f"patch size and µm/px must be positive, got {self.size_um} µm at {self.target_mpp} µm/px")

    @classmethod
    def stem_native(cls) -> PatchSpec:
        return cls(mode="stem-native")

    def patch_size_px(self, spot_diameter_px: float) -> int:
        """Edge of the patch as read (before the encoder's own resize)."""
        if self.mode == "hest":
            return int(round(self.size_um / self.target_mpp))
        if spot_diameter_px < STEM_NATIVE_MIN_CROP_PX:
            return STEM_NATIVE_MIN_CROP_PX
        return 2 * int(spot_diameter_px // 2)

    def extent_px(self, spot_diameter_px: float, slide_mpp: float | None) -> float:
        """Edge of the field of view in level-0 pixels (what a read of the patch covers)."""
        if self.mode == "hest" and slide_mpp:
            return self.size_um / slide_mpp
        return float(self.patch_size_px(spot_diameter_px))

    def patch_size_um(self, spot_diameter_px: float, slide_mpp: float | None) -> float:
        """Physical edge of the field of view (NaN for a native crop on a slide of unknown µm/px)."""
        if self.mode == "hest":
            return float(self.size_um)
        return self.patch_size_px(spot_diameter_px) * slide_mpp if slide_mpp else math.nan

    def read(self, slide: Slide, center_xy_px: tuple[float, float], spot_diameter_px: float) -> np.ndarray:
        """The ``(P, P, 3)`` uint8 patch of one spot."""
        if self.mode == "hest":
            return slide.read_patch(center_xy_px, self.size_um, self.target_mpp, fill=255)
        return slide.read_native_crop(center_xy_px, spot_diameter_px, fill=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON/HDF5-attribute friendly form (for caches and checkpoints)."""
        return {"mode": self.mode, "size_um": float(self.size_um), "target_mpp": float(self.target_mpp)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchSpec:
        return cls(
            mode=str(data["mode"]),
            size_um=float(data.get("size_um", HEST_PATCH_SIZE_UM)),
            target_mpp=float(data.get("target_mpp", HEST_TARGET_MPP)),
        )


#: HEST-Bench's patches, the default wherever patches are read.
HEST_PATCHES = PatchSpec()


class SpotPatches:
    """Map-style dataset of spot patches, read lazily from the slide file.

    Holds the slide's path and µm/px, not an open :class:`Slide`: file handles do not survive
    being sent to DataLoader worker processes, so each process opens its own on first use.
    """

    def __init__(
        self,
        slide_path: str | Path,
        mpp: float | None,
        centers_px: np.ndarray,
        spot_diameter_px: float,
        patch_spec: PatchSpec,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.mpp = mpp
        self.centers_px = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
        self.spot_diameter_px = float(spot_diameter_px)
        self.patch_spec = patch_spec
        self._slide: Slide | None = None
        self._owner_pid: int | None = None

    def __len__(self) -> int:
        return len(self.centers_px)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._slide is None or self._owner_pid != os.getpid():  # a forked worker gets its own
            self._slide = open_slide(self.slide_path, mpp=self.mpp)
            self._owner_pid = os.getpid()
        x, y = self.centers_px[index]
        patch = self.patch_spec.read(self._slide, (float(x), float(y)), self.spot_diameter_px)
        return np.require(patch, dtype=np.uint8, requirements=("C", "W"))  # torch wants writable arrays

    def close(self) -> None:
        if self._slide is not None and self._owner_pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None
        state["_owner_pid"] = None
        return state


def reading_order(centers_px: np.ndarray, band_px: float) -> np.ndarray:
    """Spot indices band by band down the slide (bands ``band_px`` high), left to right in a band.

    Patches read in this order revisit the tiles the previous ones decoded, which the slide keeps
    (the TIFF backend's tile cache, OpenSlide's own); spot files are often in barcode order, which
    is spatially random. Stable: spots at the same place keep their order.
    """
    centers = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
    band = np.floor(centers[:, 1] / max(float(band_px), 1.0))
    return np.lexsort((centers[:, 0], band))

"""Tissue detection: which parts of a slide hold tissue rather than glass.

Otsu's threshold on saturation of a low-resolution level, small holes filled and specks removed:
cheap (one thumbnail), robust for H&E, and good enough to lay spots and to skip empty patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Saturation (0–255) below which a pixel is glass whatever Otsu says (blank slides, pale edges).
MIN_TISSUE_SATURATION = 15
#: A stored thumbnail is fine enough for spot tissue fractions when its pixel is at most this many
#: µm: a 55 µm Visium spot then spans ≥ 13 mask pixels (the disc is sampled on a 7 × 7 grid).
MASK_MAX_UM_PER_PX = 4.0


def mask_overview(slide: Any, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """The cheapest RGB overview to find ``slide``'s tissue on, and its scale (level-0 px → overview px).

    Why: on a one-level slide (the demo, many SVS crops) the pyramid's overview means decoding the
    whole level (seconds for a large one-level slide), while the scanner's stored thumbnail decodes
    in milliseconds. The thumbnail is used when it is at least as fine as ``slide.thumbnail(max_size)``
    or as :data:`MASK_MAX_UM_PER_PX`; otherwise (no thumbnail, a large slide) the pyramid's overview.
    """
    height, width = slide.shape
    needed = min(1.0, max_size / max(height, width))
    if slide.mpp:
        needed = min(needed, slide.mpp / MASK_MAX_UM_PER_PX)
    stored = stored_thumbnail(slide.path, slide.backend)
    if stored is not None:
        scale_x, scale_y = stored.shape[1] / width, stored.shape[0] / height
        if abs(scale_x - scale_y) <= 0.01 * scale_x and scale_x >= needed * 0.999:
            return stored, scale_x
    return slide.thumbnail(max_size)


def stored_thumbnail(path: Any, backend: str) -> np.ndarray | None:
    """The RGB thumbnail a slide file stores beside its pyramid (SVS, NDPI, ...), else None."""
    try:
        if backend == "openslide":
            import openslide

            with openslide.OpenSlide(str(path)) as handle:
                image = handle.associated_images.get("thumbnail")
                if image is None:
                    return None
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
            alpha = rgba[..., 3:4] / 255.0  # transparent = glass, as the slide's levels are read
            return np.clip(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for series in tif.series[1:]:
                if (
                    (series.name or "").lower() == "thumbnail"
                    and series.ndim == 3
                    and series.shape[-1] in (3, 4)
                    and series.dtype == np.uint8
                ):
                    return np.asarray(series.asarray())[..., :3]
    except Exception:  # an unreadable thumbnail only means the slower overview
        return None
    return None


def tissue_mask_from_rgb(image: np.ndarray, min_object_fraction: float = 0.0005) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (a thumbnail or low pyramid level)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    saturation = ndimage.uniform_filter(_saturation(image[..., :3]), size=3)
    try:
        threshold = threshold_otsu(saturation)
    except ValueError:  # a constant image: no tissue
        return np.zeros(image.shape[:2], dtype=bool)
    mask = saturation > max(threshold, MIN_TISSUE_SATURATION)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    min_size = max(1, int(min_object_fraction * mask.size))
    return (
        remove_small_objects(mask, max_size=min_size)
        if _has_max_size()
        else remove_small_objects(mask, min_size=min_size)
    )


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation × 255 ((max − min) / max), as skimage's rgb2hsv gives it, without the hue
    it also computes (the mask is on the preview's critical path)."""
    high = rgb.max(axis=-1).astype(np.float64)
    spread = high - rgb.min(axis=-1)
    return np.divide(spread, high, out=np.zeros_like(high), where=high > 0) * 255.0


def _has_max_size() -> bool:
    """scikit-image ≥ 0.26 renamed ``min_size`` to ``max_size`` (objects ≤ max_size are removed)."""
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


def tissue_fraction_at(mask: np.ndarray, mask_scale: float, centers_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Fraction of each disc (level-0 centre, radius) covered by tissue in ``mask``.

    ``mask_scale`` maps level-0 pixels to mask pixels. Discs are sampled on a small fixed grid of
    offsets, so the cost is independent of slide size.
    """
    offsets = np.linspace(-1.0, 1.0, 7)
    dx, dy = np.meshgrid(offsets, offsets)
    inside = dx**2 + dy**2 <= 1.0
    dx, dy = dx[inside] * radius_px, dy[inside] * radius_px
    xs = ((centers_px[:, 0:1] + dx[None, :]) * mask_scale).round().astype(int)
    ys = ((centers_px[:, 1:2] + dy[None, :]) * mask_scale).round().astype(int)
    valid = (xs >= 0) & (ys >= 0) & (xs < mask.shape[1]) & (ys < mask.shape[0])
    hits = np.zeros(xs.shape, dtype=bool)
    hits[valid] = mask[ys[valid], xs[valid]]
    return hits.mean(axis=1)

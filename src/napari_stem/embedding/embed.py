"""Spots on a slide → patch embeddings, streamed batch by batch.

The reference Stem decodes the whole slide into RAM and embeds one patch at a time. Here a
DataLoader over spot centres reads each patch lazily from the pyramid (in worker processes, each
with its own slide handle), the encoder runs once per batch under ``torch.inference_mode()``, and
:func:`iter_embed_spots` yields progress events so the GUI and the CLI consume the same generator.
Spots are read in bands across the slide (:func:`~napari_stem.embedding.patches.reading_order`),
not in the file's order (often barcode order, spatially random), so neighbouring patches share
decoded tiles. Memory stays bounded by ``batch_size × num_workers`` patches and a few rows of tiles
whatever the slide size. :mod:`napari_stem.embedding.cache` keeps the result per slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stem.embedding.augment import N_AUGMENTATIONS, dihedral
from napari_stem.embedding.encoders import resolve_encoder
from napari_stem.embedding.patches import HEST_PATCHES, PatchSpec, SpotPatches, reading_order
from napari_stem.precision import device_type
from napari_stem.slide import open_slide

if TYPE_CHECKING:
    from napari_stem.spots import Spots
    from napari_stem.values import Encoder


@dataclass
class EmbedProgress:
    """One step of an embedding run: ``done`` of ``total`` spots are embedded, ``start`` before it.

    This step's spots are the rows ``index`` (increasing) of the spots given: ``embeddings`` is
    ``(len(index), D)``, ``embeddings_aug`` ``(len(index), 7, D)`` when augmentations were asked
    for. Spots are embedded in reading order, so write results with ``out[event.index]``.
    ``from_cache`` marks the single event of a cache hit.
    """

    done: int
    total: int
    start: int
    index: np.ndarray
    embeddings: np.ndarray
    embeddings_aug: np.ndarray | None = None
    from_cache: bool = False

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def iter_embed_spots(
    slide_path: str | Path,
    spots: Spots,
    encoder: Encoder | str,
    patch_spec: PatchSpec = HEST_PATCHES,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    augment: bool = False,
    device: str | None = None,
    precision: str = "auto",
    mpp: float | None = None,
    encoder_weights: Any = None,
) -> Iterator[EmbedProgress]:
    """Embed every spot, yielding an :class:`EmbedProgress` per batch, in reading order.

    ``encoder`` is an :class:`~napari_stem.values.Encoder` or a registered name (built once here
    with ``encoder_weights`` on ``device``, computing in ``precision``). ``mpp`` overrides the
    slide's µm/px (default: the spots' ``mpp``, else the file's). ``num_workers`` > 0 reads patches
    in that many processes. Closing the generator early stops the workers.
    """
    import torch
    from torch.utils.data import DataLoader

    if (batch_size is not None and batch_size < 1) or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    mpp = mpp if mpp is not None else spots.mpp
    with open_slide(slide_path, mpp=mpp) as slide:  # fail early (missing file, no µm/px), before the model loads
        if patch_spec.mode == "hest":
            slide.require_mpp()
        mpp = slide.mpp
    encoder = resolve_encoder(encoder, encoder_weights, device, precision)
    on_cuda = device_type(getattr(encoder, "device", "cpu")) == "cuda"
    batch_size = batch_size or default_batch_size("cuda" if on_cuda else "cpu")
    order = reading_order(spots.centers_px, patch_spec.extent_px(spots.diameter_px, mpp))
    dataset = SpotPatches(slide_path, mpp, spots.centers_px[order], spots.diameter_px, patch_spec)
    total = len(dataset)
    if total == 0:
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=on_cuda,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    batches = iter(loader)
    done = 0
    try:
        for batch in batches:
            if on_cuda:  # one upload; the augmented views are then made on the GPU
                batch = batch.to(encoder.device, non_blocking=True)
            features = _as_float32(encoder(batch))
            features_aug = None
            if augment:
                views = [_as_float32(encoder(dihedral(batch, k))) for k in range(N_AUGMENTATIONS)]
                features_aug = np.stack(views, axis=1)
            start, done = done, done + len(batch)
            rows = order[start:done]
            by_row = np.argsort(rows)  # increasing rows: runs of consecutive ones are written as slices
            yield EmbedProgress(
                done=done,
                total=total,
                start=start,
                index=rows[by_row],
                embeddings=features[by_row],
                embeddings_aug=None if features_aug is None else features_aug[by_row],
            )
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        dataset.close()
        del batches
        if on_cuda:
            torch.cuda.empty_cache()


def embed_spots(
    slide_path: str | Path,
    spots: Spots,
    encoder: Encoder | str,
    patch_spec: PatchSpec = HEST_PATCHES,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    augment: bool = False,
    device: str | None = None,
    precision: str = "auto",
    mpp: float | None = None,
    encoder_weights: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """All embeddings at once: ``(n, D)`` float32 and, with ``augment``, ``(n, 7, D)`` (else None)."""
    encoder = resolve_encoder(encoder, encoder_weights, device, precision)
    n_spots = len(spots)
    embeddings = np.empty((n_spots, encoder.dim), dtype=np.float32)
    embeddings_aug = np.empty((n_spots, N_AUGMENTATIONS, encoder.dim), dtype=np.float32) if augment else None
    events = iter_embed_spots(
        slide_path, spots, encoder, patch_spec, batch_size=batch_size, num_workers=num_workers, augment=augment, mpp=mpp
    )
    for event in events:
        embeddings[event.index] = event.embeddings
        if embeddings_aug is not None:
            embeddings_aug[event.index] = event.embeddings_aug
    return embeddings, embeddings_aug


def default_batch_size(device: Any) -> int:
    """Patches per forward pass: 8 on a CPU (cache-sized: 1.4× the throughput of 32 on
    efficientnet_lite0, measured by bench/bench_embed.py), 64 on a GPU."""
    return 64 if device_type(device) == "cuda" else 8


def _as_float32(features: Any) -> np.ndarray:
    return np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float32)

"""Spots on a slide → patch embeddings, streamed batch by batch and cached per slide.

The reference Stem decodes the whole slide into RAM and embeds one patch at a time. Here a
DataLoader over spot centres reads each patch lazily from the pyramid (in worker processes, each
with its own slide handle), the encoder runs once per batch under ``torch.inference_mode()``, and
:func:`iter_embed_spots` yields progress events so the GUI and the CLI consume the same generator.
Spots are read in bands across the slide (:func:`reading_order`), not in the file's order (often
barcode order, spatially random), so neighbouring patches share decoded tiles. Memory stays
bounded by ``batch_size × num_workers`` patches and a few rows of tiles whatever the slide size.

:func:`embed_slide_cached` keeps one HDF5 file per slide in HEST-Bench's layout (``embeddings``,
``coords``, ``barcodes``; optional ``embeddings_aug``), written atomically, reused only when the
encoder, its weights, the patch spec and the spots all match.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stem.atomic import remove_stale_temporaries, temporary_sibling
from napari_stem.errors import DatasetError, describe_path
from napari_stem.precision import device_type
from napari_stem.slide import STEM_NATIVE_MIN_CROP_PX, Slide, open_slide

if TYPE_CHECKING:
    from napari_stem.spots import Spots

PATCH_MODES = ("hest", "stem-native")
#: HEST-Bench's patches: 112 µm at 0.5 µm/px = 224 px.
HEST_PATCH_SIZE_UM = 112.0
HEST_TARGET_MPP = 0.5

#: The reference's ``patch.transpose(k)`` for k = 0..6: the seven non-identity elements of D4.
DIHEDRAL_AUGMENTATIONS = (
    "FLIP_LEFT_RIGHT",
    "FLIP_TOP_BOTTOM",
    "ROTATE_90",
    "ROTATE_180",
    "ROTATE_270",
    "TRANSPOSE",
    "TRANSVERSE",
)
N_AUGMENTATIONS = len(DIHEDRAL_AUGMENTATIONS)

CACHE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------- patch geometry
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


# ---------------------------------------------------------------------- augmentation
def dihedral(batch: Any, index: int, dims: tuple[int, int] = (-3, -2)) -> Any:
    """``PIL.Image.transpose(index)`` on every image of a batch tensor (``dims`` = height, width).

    ``index`` follows PIL's order (:data:`DIHEDRAL_AUGMENTATIONS`); ROTATE_90 is counter-clockwise
    and TRANSVERSE mirrors across the anti-diagonal, as in PIL. Default ``dims`` suit NHWC.
    """
    import torch

    h, w = dims
    if index == 0:
        return batch.flip(w)
    if index == 1:
        return batch.flip(h)
    if index in (2, 3, 4):
        return torch.rot90(batch, index - 1, dims=(h, w))
    if index == 5:
        return batch.transpose(h, w)
    if index == 6:
        return torch.rot90(batch.transpose(h, w), 2, dims=(h, w))
    raise ValueError(f"dihedral augmentation index must be 0..6, got {index}")


# ---------------------------------------------------------------------- lazy patch reading
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


# ---------------------------------------------------------------------- embedding
@dataclass
class EmbedProgress:
    """One step of an embedding run: ``done`` of ``total`` spots are embedded, ``start`` before it.

    This step's spots are the rows ``index`` (increasing) of the spots given: ``embeddings`` is
    ``(len(index), D)``, ``embeddings_aug`` ``(len(index), 7, D)`` when augmentations were asked
    for. Spots are embedded in :func:`reading_order`, so write results with ``out[event.index]``.
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
    encoder: Any,
    patch_spec: PatchSpec = PatchSpec(),
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    augment: bool = False,
    device: str | None = None,
    precision: str = "auto",
    mpp: float | None = None,
    encoder_weights: Any = None,
) -> Iterator[EmbedProgress]:
    """Embed every spot, yielding an :class:`EmbedProgress` per batch, in :func:`reading_order`.

    ``encoder`` is an :class:`~napari_stem.embedding.encoders.Encoder` or a registered name (built once here
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
    encoder = _resolve_encoder(encoder, encoder_weights, device, precision)
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
    encoder: Any,
    patch_spec: PatchSpec = PatchSpec(),
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
    encoder = _resolve_encoder(encoder, encoder_weights, device, precision)
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


def reading_order(centers_px: np.ndarray, band_px: float) -> np.ndarray:
    """Spot indices band by band down the slide (bands ``band_px`` high), left to right in a band.

    Patches read in this order revisit the tiles the previous ones decoded, which the slide keeps
    (:class:`napari_stem.slide._TiffTiles`, OpenSlide's own cache); spot files are often in
    barcode order, which is spatially random. Stable: spots at the same place keep their order.
    """
    centers = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
    band = np.floor(centers[:, 1] / max(float(band_px), 1.0))
    return np.lexsort((centers[:, 0], band))


def default_batch_size(device: Any) -> int:
    """Patches per forward pass: 8 on a CPU (cache-sized: 1.4× the throughput of 32 on
    efficientnet_lite0, measured by bench/bench_embed.py), 64 on a GPU."""
    return 64 if device_type(device) == "cuda" else 8


def _as_float32(features: Any) -> np.ndarray:
    return np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float32)


def _resolve_encoder(encoder: Any, weights: Any, device: str | None, precision: str) -> Any:
    if isinstance(encoder, str):
        from napari_stem.embedding.encoders import create_encoder

        return create_encoder(encoder, weights=weights, device=device, precision=precision)
    return encoder


# ---------------------------------------------------------------------- cache (HEST-Bench layout)
@dataclass
class SlideEmbeddings:
    """The contents of one slide's embedding file."""

    embeddings: np.ndarray  # (n, D) float32
    coords: np.ndarray  # (n, 2) float64, spot centres (x, y) in level-0 pixels
    barcodes: np.ndarray  # (n,) str
    embeddings_aug: np.ndarray | None = None  # (n, 7, D) float32
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reused: bool = False

    @property
    def encoder(self) -> str:
        return str(self.attrs.get("encoder", ""))

    @property
    def patch_spec(self) -> PatchSpec:
        return PatchSpec.from_dict(
            {
                "mode": self.attrs["patch_mode"],
                "size_um": self.attrs["patch_spec_size_um"],
                "target_mpp": self.attrs["patch_spec_target_mpp"],
            }
        )


def spots_fingerprint(spots: Spots) -> str:
    """A hash of the spot centres, diameter and barcodes: any change invalidates a cache."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(spots.centers_px, dtype=np.float64).tobytes())
    digest.update(repr(float(spots.diameter_px)).encode())
    digest.update("\0".join(str(barcode) for barcode in spots.barcodes).encode())
    return digest.hexdigest()[:32]


def _expected_attrs(
    slide_path: Path,
    spots: Spots,
    encoder: Any,
    encoder_weights: Any,
    patch_spec: PatchSpec,
    mpp: float | None,
    augment: bool,
) -> dict[str, Any]:
    """What a cache must record to be reused; computed without loading the model when possible."""
    if isinstance(encoder, str):
        from napari_stem.embedding.encoders import encoder_weights_id, get_encoder_spec

        name, weights_id, dim = encoder, encoder_weights_id(encoder, encoder_weights), get_encoder_spec(encoder).dim
    else:
        name, weights_id, dim = encoder.name, getattr(encoder, "weights_id", "unknown"), encoder.dim
    if mpp is None:
        with open_slide(slide_path) as slide:
            mpp = slide.mpp
    size_px = patch_spec.patch_size_px(spots.diameter_px)
    return {
        "format": "napari-stem patch embeddings (HEST-Bench layout)",
        "format_version": CACHE_FORMAT_VERSION,
        "encoder": name,
        "encoder_weights": weights_id,
        "dim": int(dim),  # 0 = unknown until the encoder is built (any timm name)
        "patch_mode": patch_spec.mode,
        "patch_spec_size_um": float(patch_spec.size_um),
        "patch_spec_target_mpp": float(patch_spec.target_mpp),
        "patch_size_px": int(size_px),
        "patch_size_um": float(patch_spec.patch_size_um(spots.diameter_px, mpp)),
        "mpp": float(mpp) if mpp is not None else math.nan,
        "n_augmentations": N_AUGMENTATIONS if augment else 0,
        "augmentations": ",".join(DIHEDRAL_AUGMENTATIONS) if augment else "",
        "n_spots": len(spots),
        "spots_fingerprint": spots_fingerprint(spots),
        "spot_diameter_px": float(spots.diameter_px),
        "slide_name": slide_path.name,
        "slide_size_bytes": int(slide_path.stat().st_size),
        "coords_convention": "spot centre (x, y) in level-0 slide pixels",
    }


#: Attributes that must be equal for reuse (``dim`` is checked separately: 0 means not yet known).
_MATCH_KEYS = (
    "format_version",
    "encoder",
    "encoder_weights",
    "patch_mode",
    "patch_size_px",
    "patch_spec_size_um",
    "patch_spec_target_mpp",
    "mpp",
    "n_spots",
    "spots_fingerprint",
    "slide_name",
    "slide_size_bytes",
)


#: Owner recorded by ``stem-train prepare`` in the embedding files it writes for training.
TRAINING_DATA_OWNER = "stem-train prepare"


def _cache_owner(cache_path: Path) -> str:
    """Who wrote a cache file; files in a prepared folder's ``embeddings/`` count as training data."""
    import h5py

    try:
        with h5py.File(cache_path, "r") as handle:
            owner = str(_plain(handle.attrs.get("owner", "")))
    except Exception:
        owner = ""
    if not owner and cache_path.parent.name == "embeddings" and (cache_path.parent.parent / "manifest.json").exists():
        owner = TRAINING_DATA_OWNER
    return owner


def _cache_mismatch(cache_path: str | Path, expected: Mapping[str, Any]) -> str | None:
    """Why ``cache_path`` cannot be reused for ``expected`` (None: it can)."""
    import h5py

    cache_path = Path(cache_path)
    if not cache_path.exists():
        return "no cache file"
    try:
        with h5py.File(cache_path, "r") as handle:
            attrs = dict(handle.attrs)
            shape = handle["embeddings"].shape if "embeddings" in handle else None
            has_aug = "embeddings_aug" in handle
    except Exception as exc:
        return f"unreadable cache ({exc})"
    if not _plain(attrs.get("complete", False)):
        return "the cache was not finished"
    for key in _MATCH_KEYS:
        cached, wanted = _plain(attrs.get(key)), _plain(expected.get(key))
        if isinstance(cached, float) and isinstance(wanted, float):
            same = (math.isnan(cached) and math.isnan(wanted)) or math.isclose(cached, wanted, rel_tol=1e-9)
        else:
            same = cached == wanted
        if not same:
            return f"{key} differs (cache {cached!r}, wanted {wanted!r})"
    if shape is None or shape[0] != expected["n_spots"] or (expected["dim"] and shape[1] != expected["dim"]):
        return f"embeddings have shape {shape}"
    if expected["n_augmentations"] and not has_aug:
        return "augmented embeddings are wanted but not cached"
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def iter_embed_slide_cached(
    cache_path: str | Path,
    slide_path: str | Path,
    spots: Spots,
    encoder: Any,
    patch_spec: PatchSpec = PatchSpec(),
    *,
    encoder_weights: Any = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    augment: bool = False,
    device: str | None = None,
    precision: str = "auto",
    mpp: float | None = None,
    owner: str = "",
) -> Iterator[EmbedProgress]:
    """Like :func:`iter_embed_spots`, but reuse or (re)write ``cache_path``.

    ``owner`` is recorded in the file; a cache owned by :data:`TRAINING_DATA_OWNER` (prepared
    training embeddings) is only ever replaced by that owner, so pointing a prediction's cache at a
    prepared folder reuses matching embeddings and refuses, before any work, to replace the rest.

    On a hit it yields one event with ``from_cache=True`` and the model is never built. Otherwise
    batches are written into a temporary file next to ``cache_path`` that replaces it atomically
    once the last batch is in (before that batch's event is yielded); an error or a closed
    generator deletes the temporary file, so ``cache_path`` is either the old file or a complete
    new one.
    """
    import h5py

    cache_path = Path(cache_path)
    slide_path = Path(slide_path)
    mpp = mpp if mpp is not None else spots.mpp
    if not slide_path.exists():
        open_slide(slide_path)  # raises the SlideError that names the path
    expected = _expected_attrs(slide_path, spots, encoder, encoder_weights, patch_spec, mpp, augment)
    if _cache_mismatch(cache_path, expected) is None:
        cached = read_embedding_cache(cache_path)
        cached.reused = True
        n_spots = len(cached.embeddings)
        aug = cached.embeddings_aug if augment else None
        yield EmbedProgress(
            done=n_spots,
            total=n_spots,
            start=0,
            index=np.arange(n_spots),
            embeddings=cached.embeddings,
            embeddings_aug=aug,
            from_cache=True,
        )
        return

    if cache_path.exists() and _cache_owner(cache_path) == TRAINING_DATA_OWNER and owner != TRAINING_DATA_OWNER:
        raise DatasetError(
            f"{describe_path(cache_path)} holds prepared training embeddings for other spots or settings "
            f"({_cache_mismatch(cache_path, expected)}); napari-stem will not replace them. Give another cache folder "
            "(--cache-dir), or none."
        )
    encoder = _resolve_encoder(encoder, encoder_weights, device, precision)
    expected["dim"] = int(encoder.dim)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_path)
    temp_path = temporary_sibling(cache_path, f"{uuid.uuid4().hex[:8]}.tmp")
    handle = h5py.File(temp_path, "w")
    try:
        n_spots, dim = len(spots), encoder.dim
        # One row per chunk: spots arrive in reading order, so rows are written out of order and a
        # row chunk is written once, never read back and rewritten (5k spots: 0.5 s, not 2-4 s).
        embeddings = handle.create_dataset(
            "embeddings", shape=(n_spots, dim), dtype="float32", chunks=(1, dim) if n_spots else None
        )
        embeddings_aug = None
        if augment:
            embeddings_aug = handle.create_dataset(
                "embeddings_aug",
                shape=(n_spots, N_AUGMENTATIONS, dim),
                dtype="float32",
                chunks=(1, N_AUGMENTATIONS, dim) if n_spots else None,
            )
        handle.create_dataset("coords", data=np.asarray(spots.centers_px, dtype=np.float64).reshape(-1, 2))
        # HEST-Bench stores barcodes as bytes; UTF-8 keeps any non-ASCII barcode intact.
        handle.create_dataset("barcodes", data=np.array([str(b).encode() for b in spots.barcodes], dtype="S"))
        handle.attrs.update({key: value for key, value in expected.items()})
        # Informational, not a reuse condition: bf16 and fp32 features differ by rounding only.
        handle.attrs["precision"] = str(getattr(encoder, "precision", "fp32"))
        handle.attrs["complete"] = False
        handle.attrs["owner"] = owner

        def finish() -> None:
            handle.attrs["complete"] = True
            handle.close()
            os.replace(temp_path, cache_path)

        if n_spots == 0:
            finish()
            return
        events = iter_embed_spots(
            slide_path,
            spots,
            encoder,
            patch_spec,
            batch_size=batch_size,
            num_workers=num_workers,
            augment=augment,
            mpp=mpp,
        )
        try:
            for event in events:
                _write_rows(embeddings, event.index, event.embeddings)  # rows in the spots' order
                if embeddings_aug is not None:
                    _write_rows(embeddings_aug, event.index, event.embeddings_aug)
                if event.done == event.total:
                    finish()
                yield event
        finally:
            events.close()
    finally:
        try:
            if handle.id.valid:
                handle.close()  # may fail again after a write error (disk full): the file is dropped anyway
        except Exception:
            pass
        temp_path.unlink(missing_ok=True)


def _write_rows(dataset: Any, rows: np.ndarray, values: np.ndarray) -> None:
    """``dataset[rows] = values`` for increasing ``rows``, one slice per run of consecutive rows
    (h5py's point selections cost milliseconds per call)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run_rows, run_values in zip(np.split(rows, breaks), np.split(values, breaks), strict=True):
        dataset[int(run_rows[0]) : int(run_rows[-1]) + 1] = run_values


def embed_slide_cached(
    cache_path: str | Path,
    slide_path: str | Path,
    spots: Spots,
    encoder: Any,
    patch_spec: PatchSpec = PatchSpec(),
    *,
    encoder_weights: Any = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    augment: bool = False,
    device: str | None = None,
    precision: str = "auto",
    mpp: float | None = None,
) -> SlideEmbeddings:
    """Embeddings of one slide's spots, from ``cache_path`` when it matches, else computed and cached."""
    reused = False
    for event in iter_embed_slide_cached(
        cache_path,
        slide_path,
        spots,
        encoder,
        patch_spec,
        encoder_weights=encoder_weights,
        batch_size=batch_size,
        num_workers=num_workers,
        augment=augment,
        device=device,
        precision=precision,
        mpp=mpp,
    ):
        reused = event.from_cache
    result = read_embedding_cache(cache_path)
    result.reused = reused
    return result


def read_embedding_cache(path: str | Path) -> SlideEmbeddings:
    """Read an embedding file (ours, or any HEST-Bench-style file with ``embeddings``/``barcodes``)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"embedding file {describe_path(path)} does not exist.")
    try:
        with h5py.File(path, "r") as handle:
            if "embeddings" not in handle:
                raise DatasetError(f"{describe_path(path)} has no 'embeddings' dataset; it is not an embedding file.")
            embeddings = np.asarray(handle["embeddings"], dtype=np.float32)
            coords = (
                np.asarray(handle["coords"], dtype=np.float64)
                if "coords" in handle
                else np.full((len(embeddings), 2), np.nan)
            )
            if "barcodes" in handle:
                barcodes = np.array([_plain(b) for b in np.asarray(handle["barcodes"]).reshape(-1)], dtype=object)
            else:
                barcodes = np.array([f"spot_{i}" for i in range(len(embeddings))], dtype=object)
            aug = np.asarray(handle["embeddings_aug"], dtype=np.float32) if "embeddings_aug" in handle else None
            attrs = {key: _plain(value) for key, value in handle.attrs.items()}
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(
            f"could not read embedding file {describe_path(path)} ({exc}); delete it to recompute."
        ) from exc
    if attrs.get("complete") is False:
        raise DatasetError(f"embedding file {describe_path(path)} was not finished; delete it to recompute.")
    return SlideEmbeddings(
        embeddings=embeddings, coords=coords, barcodes=barcodes, embeddings_aug=aug, attrs=attrs, path=path
    )

"""One HDF5 file of patch embeddings per slide, in HEST-Bench's layout, reused when it still matches.

The file holds ``embeddings``, ``coords``, ``barcodes`` and optionally ``embeddings_aug``, and records
in its attributes what made them: encoder, weights, patch spec, µm/px, spots. It is written
atomically and reused only when all of those match; prepared training embeddings (written by
``stem-train prepare``) are never replaced by anyone else.
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
from napari_stem.embedding.augment import DIHEDRAL_AUGMENTATIONS, N_AUGMENTATIONS
from napari_stem.embedding.embed import EmbedProgress, iter_embed_spots
from napari_stem.embedding.encoders import encoder_weights_id, get_encoder_spec, resolve_encoder
from napari_stem.embedding.patches import HEST_PATCHES, PatchSpec
from napari_stem.errors import DatasetError, describe_path
from napari_stem.slide import open_slide

if TYPE_CHECKING:
    from napari_stem.spots import Spots
    from napari_stem.values import Encoder

CACHE_FORMAT_VERSION = 1


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
    encoder: Encoder | str,
    encoder_weights: Any,
    patch_spec: PatchSpec,
    mpp: float | None,
    augment: bool,
) -> dict[str, Any]:
    """What a cache must record to be reused; computed without loading the model when possible."""
    if isinstance(encoder, str):
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
    encoder: Encoder | str,
    patch_spec: PatchSpec = HEST_PATCHES,
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
    encoder = resolve_encoder(encoder, encoder_weights, device, precision)
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
    encoder: Encoder | str,
    patch_spec: PatchSpec = HEST_PATCHES,
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

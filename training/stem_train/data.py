"""Training and validation arrays from a prepared folder, assembled like the reference trainer.

A training row is (condition = one patch embedding, target = the spot's transformed counts). Every
training spot gives its original embedding plus ``num_aug_ratio`` of its seven dihedral
augmentations, drawn once per run from a generator seeded by the run's seed only, so every DDP
rank holds the same rows (the reference seeds by rank, so its ranks disagree). Spots whose panel
counts are all zero or all NaN are dropped, as the reference does; a remaining NaN count becomes 0
(the reference would train on NaN). Rows are ordered: all originals, then each spot's augmented
views; :class:`BatchOrder` shuffles them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_stem import metrics
from napari_stem.embedding.augment import N_AUGMENTATIONS
from napari_stem.embedding.cache import read_embedding_cache
from napari_stem.errors import DatasetError, describe_path
from stem_train.manifest import PreparedDataset, PreparedSlide

#: Count → model target, as the metrics define them. ``log2p1`` is the reference's (no library-size normalisation).
TARGET_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    name: metrics.TARGET_TRANSFORMS[name] for name in metrics.TRAINING_TARGET_TRANSFORMS
}
#: Mixed into the run seed for the augmentation draw, so it never shares a stream with anything else.
AUGMENTATION_STREAM = 0xA9


def to_target(counts: np.ndarray, transform: str) -> np.ndarray:
    """float32 targets; NaN counts become 0 (:func:`napari_stem.metrics.to_target_space`)."""
    if transform not in TARGET_TRANSFORMS:
        raise ValueError(f"unknown target transform {transform!r}; use one of {', '.join(TARGET_TRANSFORMS)}")
    return metrics.to_target_space(counts, transform).astype(np.float32)


def slide_counts(manifest: PreparedDataset, slide: PreparedSlide) -> np.ndarray:
    """Raw counts ``(n_spots, G)`` float32 of the manifest's genes, in the h5ad's spot order (NaN kept)."""
    import anndata
    import scipy.sparse as sp

    path = manifest.st_path(slide)
    if not path.exists():
        raise DatasetError(
            f"expression file {describe_path(path)} of slide {slide.sample_id} is missing; the prepared folder points at it."
        )
    adata = anndata.read_h5ad(path)
    columns = adata.var_names.get_indexer(manifest.genes)
    if (columns < 0).any():
        absent = [gene for gene, column in zip(manifest.genes, columns, strict=True) if column < 0]
        raise DatasetError(f"{describe_path(path)} lacks panel genes {absent[:5]}; re-run 'stem-train prepare'.")
    if adata.n_obs != slide.n_spots:
        raise DatasetError(
            f"{describe_path(path)} has {adata.n_obs} spots but was prepared with {slide.n_spots}; re-run 'stem-train prepare'."
        )
    values = adata.X[:, columns]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    return values.astype(np.float32)


def slide_embeddings(manifest: PreparedDataset, slide: PreparedSlide, *, augmented: bool = True):
    """The slide's :class:`~napari_stem.embedding.cache.SlideEmbeddings`, checked against the manifest."""
    path = manifest.embeddings_path(slide)
    cached = read_embedding_cache(path)
    if cached.embeddings.shape != (slide.n_spots, manifest.embedding_dim):
        raise DatasetError(
            f"embedding file {describe_path(path)} holds {cached.embeddings.shape}, the manifest expects "
            f"({slide.n_spots}, {manifest.embedding_dim}); re-run 'stem-train prepare'."
        )
    if cached.encoder and cached.encoder != manifest.encoder:
        raise DatasetError(
            f"{describe_path(path)} was made with encoder '{cached.encoder}', the manifest says '{manifest.encoder}'; re-run 'stem-train prepare'."
        )
    if augmented and (cached.embeddings_aug is None or cached.embeddings_aug.shape[1] != N_AUGMENTATIONS):
        raise DatasetError(
            f"{describe_path(path)} has no augmented embeddings (prepared with --no-augment); train with --num-aug-ratio 0 or re-run 'stem-train prepare' without --no-augment."
        )
    return cached


def draw_augmentations(n_spots: int, num_aug_ratio: int, seed: int) -> np.ndarray:
    """``(n_spots, num_aug_ratio)`` distinct view indices in 0..6 per spot, from the seed alone."""
    if not 0 <= num_aug_ratio <= N_AUGMENTATIONS:
        raise ValueError(f"num_aug_ratio must be between 0 and {N_AUGMENTATIONS}, got {num_aug_ratio}")
    rng = np.random.default_rng([int(seed), AUGMENTATION_STREAM])
    return np.argsort(rng.random((n_spots, N_AUGMENTATIONS)), axis=1)[:, :num_aug_ratio]


@dataclass
class TrainingSet:
    """Rows of (condition, target); the target of row i is ``targets[spot_of_row[i]]``."""

    conditions: np.ndarray  # (n_rows, D) float32
    spot_of_row: np.ndarray  # (n_rows,) int64 into targets
    targets: np.ndarray  # (n_spots_kept, G) float32, transformed
    n_spots: int  # training spots before dropping
    n_dropped: int  # all-zero / all-NaN spots left out
    augmentation_fingerprint: str  # hash of the drawn views: equal on every rank

    def __len__(self) -> int:
        return len(self.conditions)


def assemble_training_set(
    manifest: PreparedDataset,
    *,
    num_aug_ratio: int = N_AUGMENTATIONS,
    target_transform: str = "log2p1",
    seed: int = 0,
    split: str = "train",
    progress: Callable | None = None,
) -> TrainingSet:
    """All rows of the ``split`` slides; ``progress`` wraps the slide loop (e.g. tqdm)."""
    slides = manifest.split(split)
    if not slides:
        raise DatasetError(
            f"{describe_path(manifest._root())} has no '{split}' slides; re-run 'stem-train prepare' with fewer --held-out slides."
        )
    originals, augmented, counts = [], [], []
    for slide in progress(slides) if progress is not None else slides:
        cached = slide_embeddings(manifest, slide, augmented=num_aug_ratio > 0)
        originals.append(cached.embeddings)
        augmented.append(cached.embeddings_aug)
        counts.append(slide_counts(manifest, slide))
    counts = np.concatenate(counts)
    n_spots = len(counts)
    views = draw_augmentations(n_spots, num_aug_ratio, seed)
    keep = ~(np.isnan(counts).all(axis=1) | (np.nansum(counts, axis=1) == 0))
    kept = np.flatnonzero(keep)
    targets = to_target(counts[kept], target_transform)
    original = np.concatenate(originals)[kept]
    parts = [original]
    spot_of_row = [np.arange(len(kept))]
    if num_aug_ratio:
        stacked_aug = np.concatenate(augmented)
        chosen = stacked_aug[kept[:, None], views[kept]]  # (n_kept, r, D)
        parts.append(chosen.reshape(-1, chosen.shape[-1]))
        spot_of_row.append(np.repeat(np.arange(len(kept)), num_aug_ratio))
    return TrainingSet(
        conditions=np.ascontiguousarray(np.concatenate(parts), dtype=np.float32),
        spot_of_row=np.concatenate(spot_of_row).astype(np.int64),
        targets=targets,
        n_spots=n_spots,
        n_dropped=int(n_spots - len(kept)),
        augmentation_fingerprint=hashlib.sha256(views.astype(np.int8).tobytes()).hexdigest()[:16],
    )


@dataclass
class HeldOutSet:
    """Original embeddings and transformed targets of every spot of the ``test`` slides (none dropped)."""

    conditions: np.ndarray  # (n, D)
    targets: np.ndarray  # (n, G)
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.conditions)


def assemble_held_out(
    manifest: PreparedDataset, *, target_transform: str = "log2p1", split: str = "test"
) -> HeldOutSet:
    slides = manifest.split(split)
    conditions = [slide_embeddings(manifest, slide, augmented=False).embeddings for slide in slides]
    counts = [slide_counts(manifest, slide) for slide in slides]
    dim, n_genes = manifest.embedding_dim, len(manifest.genes)
    return HeldOutSet(
        conditions=np.concatenate(conditions) if conditions else np.zeros((0, dim), np.float32),
        targets=to_target(np.concatenate(counts), target_transform) if counts else np.zeros((0, n_genes), np.float32),
        sample_ids=[slide.sample_id for slide in slides],
    )


class BatchOrder:
    """Which rows make up each step's global batch, and which of them a rank trains on.

    Epoch e is a permutation of all rows from a generator seeded by (seed, e); its consecutive
    blocks of ``global_batch_size`` rows are that epoch's steps (the short tail is dropped). A
    rank takes every ``world_size``-th row of the block starting at its rank, so the global batch
    is the same whatever the number of ranks, and step s is a pure function of (seed, s): resuming
    needs no sampler state.
    """

    def __init__(self, n_rows: int, global_batch_size: int, seed: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be >= 1, got {global_batch_size}")
        if global_batch_size > n_rows:
            raise DatasetError(
                f"the global batch of {global_batch_size} rows is larger than the training set ({n_rows} rows); "
                f"pass --global-batch-size {n_rows} or less."
            )
        self.n_rows, self.global_batch_size, self.seed = n_rows, global_batch_size, int(seed)
        self.steps_per_epoch = n_rows // global_batch_size
        self._epoch, self._permutation = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of the 0-based ``step``."""
        return divmod(int(step), self.steps_per_epoch)

    def global_batch(self, step: int) -> np.ndarray:
        epoch, index = self.position(step)
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._epoch = epoch
        return self._permutation[index * self.global_batch_size : (index + 1) * self.global_batch_size]

    def rank_batch(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        return self.global_batch(step)[rank::world_size]

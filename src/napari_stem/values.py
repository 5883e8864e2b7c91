"""Typed values passed between the stages of a prediction, and the sampler names a run may ask for.

Torch-free, so anyone may import them: the sampler (:mod:`napari_stem.stem.sampling`) fills them, the
prediction path (:mod:`napari_stem.predict`, which re-exports ``SAMPLERS`` and ``DEFAULT_SAMPLER``)
assembles them, and the writers, the napari layers and ``stem-train`` read them without torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from napari_stem.intervals import IntervalSpec, plan_intervals

#: "ancestral" and "ddim" are the reference's samplers (respaced); the other three are our few-step
#: solvers (napari_stem.stem.diffusion.SOLVERS). "ancestral-matched" gives each big step the variance
#: the model learned for the 1000-step chain, so its samples keep their spread at 4 steps where
#: the respaced ancestral sampler's shrink. Every sampler clips its x_0 predictions to the
#: training range a checkpoint records (``clip_x0``), which stopped DDIM's blow-ups.
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "ancestral-matched")
DEFAULT_SAMPLER = "ancestral-matched"


@dataclass(frozen=True)
class PredictOptions:
    """How a prediction samples: what :func:`napari_stem.predict.iter_predict` takes as ``options``.

    One value for the widget, ``stem-train predict`` and cohort workers alike. ``None`` for
    ``n_samples``/``steps`` means the device's default (:func:`napari_stem.predict.default_settings`,
    raised for exact ``intervals``).
    """

    n_samples: int | None = None
    steps: int | str | None = None
    sampler: str = DEFAULT_SAMPLER
    eta: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    embed_batch_size: int | None = None
    sample_batch_size: int | None = None
    num_workers: int = 0
    intervals: tuple[float, ...] | None = None  # central interval levels (napari_stem.intervals)
    quantiles: tuple[float, ...] | None = None
    keep_samples: bool = False
    clip_x0: bool = True


@dataclass
class SampleBatch:
    """Progress event: results for spots [start, stop) once their batch has finished."""

    start: int
    stop: int
    total_spots: int
    mean: np.ndarray  # (stop - start, G)
    variance: np.ndarray  # (stop - start, G), ddof = napari_stem.stem.sampling.VARIANCE_DDOF
    samples: np.ndarray | None = None  # (stop - start, K, G) with keep_samples
    quantiles: np.ndarray | None = None  # (Q, stop - start, G) with quantiles
    intervals: np.ndarray | None = None  # (I, 2, stop - start, G): lower, upper of each interval

    @property
    def done_spots(self) -> int:
        return self.stop


@dataclass
class SampleStep:
    """Progress event inside a batch (``step_events=True``): ``step`` of ``n_steps`` denoising
    steps done for spots [start, stop). Lets a GUI move its bar and cancel between steps."""

    start: int
    stop: int
    total_spots: int
    step: int
    n_steps: int


@dataclass
class Prediction:
    """Per-spot predictive mean and variance in the model's target space (e.g. log2(1 + count))."""

    mean: np.ndarray  # (n_spots, G) float32
    variance: np.ndarray  # (n_spots, G): sample variance, ddof 1; NaN when n_samples == 1
    genes: list[str]
    samples: np.ndarray | None = None  # (n_spots, K, G)
    quantile_levels: tuple[float, ...] | None = None  # interpolated quantiles (e.g. the median)
    quantiles: np.ndarray | None = None  # (len(quantile_levels), n_spots, G)
    interval_specs: tuple[IntervalSpec, ...] = ()  # order-statistic intervals, narrowest first
    intervals: np.ndarray | None = None  # (len(interval_specs), 2, n_spots, G): lower, upper
    metadata: dict = field(default_factory=dict)

    def subset(self, index: np.ndarray) -> Prediction:
        """The rows of the selected spots (boolean mask or integer index), like :meth:`Spots.subset`."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return dataclasses.replace(
            self,
            mean=np.asarray(self.mean)[index],
            variance=np.asarray(self.variance)[index],
            samples=None if self.samples is None else np.asarray(self.samples)[index],
            quantiles=None if self.quantiles is None else np.asarray(self.quantiles)[:, index],
            intervals=None if self.intervals is None else np.asarray(self.intervals)[:, :, index],
            metadata=dict(self.metadata),
        )

    @classmethod
    def from_batches(
        cls,
        batches: Sequence[SampleBatch],
        genes: Sequence[str],
        *,
        n_samples: int,
        metadata: dict,
        quantiles: Sequence[float] | None = None,
        intervals: Sequence[float] | None = None,
        keep_samples: bool = False,
        n_spots: int | None = None,
    ) -> Prediction:
        """The one place a prediction is assembled from the sampler's batches, with its provenance.

        Rows no batch has reached yet are NaN: ``n_spots`` beyond the batches' rows gives the buffers
        a running (or cancelled) job fills in place with :meth:`fill`, so a partial result is the
        same value, with the same provenance, as a finished one.
        """
        n_genes = len(genes)
        n_spots = max((batch.stop for batch in batches), default=0) if n_spots is None else int(n_spots)
        levels = tuple(sorted(quantiles)) if quantiles else None
        specs = plan_intervals(intervals, n_samples)
        keep_samples = keep_samples or any(batch.samples is not None for batch in batches)

        def unsampled(*shape: int) -> np.ndarray:
            return np.full(shape, np.nan, dtype=np.float32)

        prediction = cls(
            mean=unsampled(n_spots, n_genes),
            variance=unsampled(n_spots, n_genes),
            genes=list(genes),
            samples=unsampled(n_spots, n_samples, n_genes) if keep_samples else None,
            quantile_levels=levels,
            quantiles=unsampled(len(levels), n_spots, n_genes) if levels else None,
            interval_specs=specs,
            intervals=unsampled(len(specs), 2, n_spots, n_genes) if specs else None,
            metadata=dict(metadata),
        )
        for batch in batches:
            prediction.fill(batch)
        return prediction

    def fill(self, batch: SampleBatch) -> None:
        """Write one batch's spots into their rows, in place."""
        rows = slice(batch.start, batch.stop)
        self.mean[rows] = batch.mean
        self.variance[rows] = batch.variance
        if self.samples is not None and getattr(batch, "samples", None) is not None:
            self.samples[rows] = batch.samples
        if self.quantiles is not None and getattr(batch, "quantiles", None) is not None:
            self.quantiles[:, rows] = batch.quantiles
        if self.intervals is not None and getattr(batch, "intervals", None) is not None:
            self.intervals[:, :, rows] = batch.intervals


@dataclass(frozen=True)
class GridSpec:
    """A Visium-like hexagonal spot grid laid over a slide's tissue (defaults: Visium's 100 µm pitch
    and 55 µm spots, as :data:`napari_stem.spots.VISIUM_PITCH_UM` and ``VISIUM_SPOT_DIAMETER_UM``;
    legacy ST is ``GridSpec(pitch_um=200, spot_diameter_um=100)``).

    Only spots whose footprint is at least ``min_tissue_fraction`` tissue are kept. Checked by
    :func:`napari_stem.validate.check_grid`; laid by :func:`napari_stem.grid.spots_over_tissue`.
    """

    pitch_um: float = 100.0
    spot_diameter_um: float = 55.0
    min_tissue_fraction: float = 0.5


#: Visium's grid, the default wherever a grid over tissue is laid.
VISIUM_GRID = GridSpec()


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a checkpoint (or a prepared dataset) says about the embeddings its model conditions on.

    Prediction embeds a slide as training did: the same encoder and the same patches. This is the
    ``embedding`` entry of a checkpoint's ``config.json``; :meth:`from_dict` reads every form written
    so far (an empty entry: nothing recorded, so only precomputed embeddings can be used) and
    :meth:`to_dict` writes back what was read. ``None`` means "not recorded": a missing patch mode
    is HEST's, a missing patch size the mode's default
    (:class:`napari_stem.embedding.patches.PatchSpec`).
    """

    encoder: str | None = None
    dim: int | None = None
    patch_mode: str | None = None
    patch_size_um: float | None = None
    patch_target_mpp: float | None = None
    encoder_weights: str | None = None
    #: Keys this version does not know, kept as written so a re-saved checkpoint loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def patch(self) -> dict[str, Any]:
        """The patch spec in ``PatchSpec.to_dict()``'s form, only the recorded sizes (HEST mode if none)."""
        patch: dict[str, Any] = {"mode": self.patch_mode or "hest"}
        if self.patch_size_um is not None:
            patch["size_um"] = self.patch_size_um
        if self.patch_target_mpp is not None:
            patch["target_mpp"] = self.patch_target_mpp
        return patch

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``embedding`` entry (JSON-ready)."""
        data: dict[str, Any] = {}
        if self.encoder is not None:
            data["encoder"] = self.encoder
        if self.dim is not None:
            data["dim"] = self.dim
        recorded = {
            key: value
            for key, value in (
                ("mode", self.patch_mode),
                ("size_um", self.patch_size_um),
                ("target_mpp", self.patch_target_mpp),
            )
            if value is not None
        }
        if recorded:
            data["patch"] = recorded
        if self.encoder_weights is not None:
            data["encoder_weights"] = self.encoder_weights
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EmbeddingSpec:
        """Read a checkpoint's ``embedding`` entry; ``None`` or ``{}`` gives a spec that records nothing."""
        rest = dict(data or {})
        patch = rest.get("patch")
        if isinstance(patch, Mapping):
            del rest["patch"]
        else:
            patch = {}
        encoder, dim, weights = rest.pop("encoder", None), rest.pop("dim", None), rest.pop("encoder_weights", None)
        try:
            return cls(
                encoder=None if encoder is None else str(encoder),
                dim=None if dim is None else int(dim),
                patch_mode=None if patch.get("mode") is None else str(patch["mode"]),
                patch_size_um=None if patch.get("size_um") is None else float(patch["size_um"]),
                patch_target_mpp=None if patch.get("target_mpp") is None else float(patch["target_mpp"]),
                encoder_weights=None if weights is None else str(weights),
                extra=rest,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed embedding spec {dict(data or {})!r}: {exc}") from exc


@runtime_checkable
class Encoder(Protocol):
    """What an image encoder offers (:func:`napari_stem.embedding.encoders.create_encoder` builds them).

    ``encoder(batch)`` maps a batch of patches, uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in
    [0, 1], to ``(N, dim)`` float32 features: it resizes to ``input_size`` px and normalises with its
    own statistics, so every caller embeds a patch the same way. ``weights_id`` says which weights
    it loaded (embedding caches record it); ``precision`` is what it computes in.
    """

    name: str
    dim: int
    input_size: int
    weights_id: str
    precision: str

    def __call__(self, batch: Any) -> Any: ...

"""Typed values passed between the stages of a prediction, and the sampler names a run may ask for.

Torch-free, so anyone may import them: the sampler (:mod:`napari_stem.stem.sampling`) fills them, the
prediction path (:mod:`napari_stem.predict`, which re-exports ``SAMPLERS`` and ``DEFAULT_SAMPLER``)
assembles them, and the writers, the napari layers and ``stem-train`` read them without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from napari_stem.intervals import IntervalSpec

#: "ancestral" and "ddim" are the reference's samplers (respaced); the other three are our few-step
#: solvers (napari_stem.stem.diffusion.SOLVERS). "ancestral-matched" gives each big step the variance
#: the model learned for the 1000-step chain, so its samples keep their spread at 4 steps where
#: the respaced ancestral sampler's shrink. Every sampler clips its x_0 predictions to the
#: training range a checkpoint records (``clip_x0``), which stopped DDIM's blow-ups.
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "ancestral-matched")
DEFAULT_SAMPLER = "ancestral-matched"


@dataclass(frozen=True)
class PredictOptions:
    """How a prediction samples: the keyword options of :func:`napari_stem.predict.iter_predict`.

    ``None`` for ``n_samples``/``steps`` means the device's default
    (:func:`napari_stem.predict.default_settings`, raised for exact ``intervals``). Each default
    here is iter_predict's own (a test checks), so ``iter_predict(..., **options.as_kwargs())``
    is the same call as passing the keywords one by one.
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

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


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

"""Qt-free state behind the prediction widget: inputs → validated job → run → results → export.

The widget (``widget.py``) turns napari layers into the plain inputs of :mod:`napari_stem.plugin.jobs`
(world coordinates, the slide layer's transform) and only wires signals; everything that can go wrong
is decided here and unit-testable without a viewer. Nothing here imports napari or Qt.

Job lifecycle. :meth:`PredictController.prepare` validates the inputs (the checks of
:mod:`~napari_stem.plugin.jobs`) and raises a :class:`~napari_stem.errors.StemError` naming the
problem and its fix; grids come from the controller's :class:`~napari_stem.caches.GridCache`, which
the preview shares, and the embedding file from :func:`~napari_stem.caches.embedding_cache_path`.
:meth:`~PredictController.run` is the generator a napari ``thread_worker`` (or, with
``NAPARI_STEM_NOTHREADS=1``, a plain loop) drives: it wraps :func:`napari_stem.predict.iter_predict`
— the one prediction path shared with ``stem-train predict`` — and stops at the next batch once a
cancel was requested. Events come back on the main thread through :meth:`~PredictController.apply`,
which folds each sampled batch into a :class:`PredictionResult` (NaN = spot not sampled yet) so
partial results can be drawn. Stale events of an older job are ignored ("latest job wins").

End states. Done: all spots. Cancelled: the spots finished so far are kept as a complete,
smaller result (the widget names its layers "… (partial k/n)"); nothing is kept if no spot
finished. Failed: the result is dropped, so nothing half-drawn remains.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.caches import GridCache, embedding_cache_path
from napari_stem.errors import CheckpointError, SpotsError, StemError, describe_path
from napari_stem.plugin.jobs import (
    GRID,
    PointsInput,
    PredictJob,
    PredictSettings,
    RegionInput,
    SlideInput,
    check_encoder_weights,
    check_sampling,
    check_slide,
    select_region,
    slide_shape,
    spots_from_points,
)
from napari_stem.preview import format_duration
from napari_stem.spots import Spots
from napari_stem.validate import check_grid, check_spots
from napari_stem.values import EmbeddingSpec

#: Least time between two progress events sent to the GUI while sampling (cancel is checked at
#: every step regardless): often enough for a moving bar, rare enough not to flood the event loop.
PROGRESS_INTERVAL_S = 0.2
#: Samples kept per run for the spot inspector, at most (spots × samples × genes float32 values).
MAX_KEPT_SAMPLE_VALUES = 64_000_000


# ---------------------------------------------------------------------- results
@dataclass
class PredictionResult:
    """The results of one job, filled batch by batch (rows of NaN are spots not sampled yet)."""

    job: PredictJob
    prediction: Any  # napari_stem.values.Prediction; its arrays are filled in place
    done: int = 0
    status: str = "running"  # running, done, cancelled
    from_cache: bool = False

    @property
    def spots(self) -> Spots:
        return self.job.spots

    @property
    def genes(self) -> list[str]:
        return list(self.prediction.genes)

    @property
    def n_spots(self) -> int:
        return len(self.job.spots)

    @property
    def shown(self) -> np.ndarray:
        """Spots with values (napari hides the rest)."""
        shown = np.zeros(self.n_spots, dtype=bool)
        shown[: self.done] = True
        return shown

    def finished(self) -> tuple[Any, Spots]:
        """``(Prediction, Spots)`` of the spots sampled so far (batches finish in spot order)."""
        if self.done == self.n_spots:
            return self.prediction, self.spots
        index = np.arange(self.done)
        return self.prediction.subset(index), self.spots.subset(index)


@dataclass
class Update:
    """What :meth:`PredictController.apply` changed, for the view."""

    stage: str
    values_changed: bool = False


# ---------------------------------------------------------------------- controller
class PredictController:
    """State machine of the prediction widget: idle → running → done / cancelled / failed."""

    def __init__(self, embedding_cache_dir: str | Path | None = None) -> None:
        #: Where per-slide embedding caches go (default: ``<napari-stem cache>/embeddings``).
        self.embedding_cache_dir = Path(embedding_cache_dir) if embedding_cache_dir else None
        #: Tissue masks and grids over them, shared with the widget's preview.
        self.grids = GridCache()
        #: Spots per sampling batch (None: napari-stem's default per device); smaller = more partial draws.
        self.sample_batch_size: int | None = None
        #: Patches per encoder pass (None: napari-stem's default per device).
        self.embed_batch_size: int | None = None
        self.job: PredictJob | None = None
        self.result: PredictionResult | None = None
        self.status = "idle"  # idle, running, done, cancelled, failed
        self.message = ""
        self.stage = ""
        self.stage_done = 0
        self.stage_total = 0
        self._job_counter = 0
        self._cancel_requested = False
        self._started_at = 0.0
        self._stage_started_at = 0.0
        self._from_cache = False
        self._metadata: dict = {}
        self._fetched: dict[str, dict] = {}  # hf-hub: reference -> its config, once downloaded

    @property
    def running(self) -> bool:
        return self.status == "running"

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def checkpoint_summary(path: str | Path | None) -> str:
        """One line about a checkpoint (genes, encoder, patches), read from its config only."""
        return describe_checkpoint(_checkpoint_metadata(path))

    def needs_download(self, path: str | Path | None) -> bool:
        """A ``hf-hub:`` reference not fetched yet by :meth:`fetch_checkpoint`: reading it waits on
        the network, so the widget does that in a worker, never on the GUI thread."""
        from napari_stem.hub import is_hub_reference

        return is_hub_reference(path) and str(path) not in self._fetched

    def fetch_checkpoint(self, path: str | Path) -> dict:
        """Worker thread: download a ``hf-hub:`` checkpoint (config and weights, into the Hub cache,
        which later reads reuse at once) and return its config."""
        metadata = _checkpoint_metadata(path)
        self._fetched[str(path)] = metadata
        return metadata

    def prepare(
        self,
        slide: SlideInput | None,
        spots: PointsInput | str | None,
        region: RegionInput | None,
        settings: PredictSettings,
    ) -> PredictJob:
        """Validate everything a run needs; raise a :class:`StemError` naming problem and fix."""
        if self.running:
            raise StemError("a prediction is already running; wait for it or press Cancel.")
        mpp = check_slide(slide, settings)
        metadata = _checkpoint_metadata(settings.checkpoint)
        checkpoint = Path(settings.checkpoint)  # type: ignore[arg-type]
        embedding = EmbeddingSpec.from_dict(metadata.get("embedding"))
        encoder = embedding.encoder
        if not encoder:
            raise CheckpointError(
                f"checkpoint {describe_path(checkpoint)} does not say which image encoder it was trained on "
                "(config 'embedding'); re-save it with stem-train, or choose another checkpoint."
            )
        genes = [str(g) for g in metadata.get("genes") or []]
        check_encoder_weights(settings.encoder_weights, encoder)
        check_sampling(settings)

        all_spots = self._spots(slide, mpp, spots, settings)
        selected, region_name = select_region(all_spots, region, slide.frame)
        if len(selected) == 0:
            raise SpotsError("there are no spots to predict; choose a spots layer with points, or a grid over tissue.")
        selected, _ = check_spots(
            selected, slide_shape(Path(slide.path)), f"the spots '{getattr(spots, 'name', spots)}'"
        )

        self._job_counter += 1
        return PredictJob(
            job_id=self._job_counter,
            slide_path=Path(slide.path),
            slide_name=slide.name,
            mpp=mpp,
            frame=slide.frame,
            spots=selected,
            checkpoint=checkpoint,
            genes=genes,
            encoder=str(encoder),
            settings=settings,
            cache_path=embedding_cache_path(
                slide.path, selected, embedding, settings.encoder_weights, root=self.embedding_cache_dir
            ),
            region_name=region_name,
        )

    def _spots(
        self, slide: SlideInput, mpp: float, spots: PointsInput | str | None, settings: PredictSettings
    ) -> Spots:
        if spots is None:
            raise SpotsError(f"no spots chosen: pick a Points layer or '{GRID}'.")
        if isinstance(spots, str):
            if spots != GRID:
                raise SpotsError(f"unknown spots choice {spots!r}")
            grid = self.grids.grid(slide.path, mpp, check_grid(settings.grid))  # the preview's grid
            if len(grid) == 0:
                raise SpotsError(
                    f"no tissue found on {describe_path(slide.path)} for a {settings.grid.pitch_um:g} µm grid; "
                    "check the slide, or use a spots layer instead."
                )
            return grid
        return spots_from_points(spots, slide.frame, mpp)

    # ------------------------------------------------------------------ running
    def start(self, job: PredictJob) -> None:
        """Main thread, before the worker starts: forget the previous result, reset progress."""
        self.job = job
        self.result = None
        self.status = "running"
        self._cancel_requested = False
        self._from_cache = False
        self.stage, self.stage_done, self.stage_total = "embed", 0, len(job.spots)
        self.message = f"embedding {len(job.spots)} spots…"
        self._started_at = self._stage_started_at = time.perf_counter()
        self._metadata = {}

    def keeps_samples(self, job: PredictJob) -> bool:
        """Whether a run keeps every sample (for the spot inspector): unless they would be huge."""
        return len(job.spots) * job.settings.n_samples * max(len(job.genes), 1) <= MAX_KEPT_SAMPLE_VALUES

    @property
    def fraction(self) -> float:
        """Progress of the whole run in [0, 1]: embedding is the first half, sampling the second."""
        total = max(self.stage_total, 1)
        part = min(self.stage_done / total, 1.0)
        return 0.5 * part + (0.5 if self.stage == "sample" else 0.0)

    def run(self, job: PredictJob) -> Iterator[Any]:
        """Worker thread: the :class:`~napari_stem.predict.PredictEvent` stream; returns the outcome.

        Returns ``"cancelled"`` after the first event that follows a cancel request, closing
        ``iter_predict`` so its temporary files are removed; else ``"done"``.
        """
        from napari_stem.predict import iter_predict
        from napari_stem.values import PredictOptions

        settings = job.settings
        options = PredictOptions(
            n_samples=settings.n_samples,
            steps=settings.steps,
            sampler=settings.sampler,
            seed=settings.seed,
            device=settings.device,
            embed_batch_size=self.embed_batch_size,
            sample_batch_size=self.sample_batch_size,
            keep_samples=self.keeps_samples(job),
            intervals=settings.intervals,
        )
        events = iter_predict(
            job.slide_path,
            job.spots,
            job.checkpoint,
            options,
            encoder_weights=settings.encoder_weights,
            cache_path=job.cache_path,
            step_events=True,
        )
        last_sent = 0.0
        try:
            for event in events:
                now = time.perf_counter()
                if event.stage != "step" or now - last_sent >= PROGRESS_INTERVAL_S:
                    last_sent = now
                    yield event
                if self._cancel_requested and job is self.job:
                    return "cancelled"
        finally:
            events.close()
        return "done"

    def request_cancel(self) -> None:
        """Ask the running job to stop at its next step or embedding batch (safe from any thread)."""
        if self.running:
            self._cancel_requested = True
            self.message = "cancelling…"

    def apply(self, job_id: int, event: Any) -> Update | None:
        """Main thread: fold one event into the result; None for events of an older job."""
        if self.job is None or job_id != self.job.job_id or not self.running:
            return None
        n_spots = len(self.job.spots)
        if getattr(event, "metadata", None):
            self._metadata = dict(event.metadata)
        if event.stage == "embed":
            self.stage, self.stage_done, self.stage_total = "embed", event.done, n_spots
            self._from_cache = bool(event.from_cache)
            self.message = (
                "embeddings from the cache"
                if event.from_cache
                else f"embedding patches: {event.done}/{n_spots} spots{self._time_left(event.done / max(n_spots, 1))}"
            )
            return Update("embed")
        if event.stage == "step":
            self._enter_sampling()
            step = event.batch
            done = step.start + (step.stop - step.start) * step.step / max(step.n_steps, 1)
            self.stage_done = done
            self.message = (
                f"sampling spots {step.start + 1}–{step.stop} of {n_spots}: step {step.step}/{step.n_steps}"
                f"{self._time_left(done / max(n_spots, 1))}"
            )
            return Update("step")
        if event.stage == "sample":
            self._enter_sampling()
            batch = event.batch
            result = self._ensure_result()
            result.prediction.mean[batch.start : batch.stop] = batch.mean
            result.prediction.variance[batch.start : batch.stop] = batch.variance
            if result.prediction.samples is not None and getattr(batch, "samples", None) is not None:
                result.prediction.samples[batch.start : batch.stop] = batch.samples
            if result.prediction.intervals is not None and getattr(batch, "intervals", None) is not None:
                result.prediction.intervals[:, :, batch.start : batch.stop] = batch.intervals
            result.done = max(result.done, batch.stop)
            self.stage_done = result.done
            self.message = (
                f"sampling: {result.done}/{n_spots} spots done{self._time_left(result.done / max(n_spots, 1))}"
            )
            return Update("sample", values_changed=True)
        if event.stage == "done":
            result = self._ensure_result()
            final = event.prediction
            final.metadata = {**final.metadata, "slide": str(self.job.slide_path), "mpp": self.job.mpp}
            result.prediction.mean[...] = final.mean
            result.prediction.variance[...] = final.variance
            if final.samples is not None:
                result.prediction.samples = final.samples
            result.prediction.interval_specs, result.prediction.intervals = final.interval_specs, final.intervals
            result.prediction.metadata = dict(final.metadata)
            result.done = n_spots
            self.stage, self.stage_done, self.stage_total = "sample", n_spots, n_spots
            return Update("done", values_changed=True)
        return Update(event.stage)

    def _record_pace(self, n_spots: int) -> None:
        """Teach the preview's cost estimate this machine's pace (seconds per spot, per row-step)."""
        from napari_stem.preview import record_pace

        settings, now = self.job.settings, time.perf_counter()
        metadata = self.result.prediction.metadata
        rows_steps = (
            n_spots
            * int(metadata.get("n_samples", settings.n_samples))
            * int(str(metadata.get("steps", settings.steps)).removeprefix("ddim") or 1)
        )
        embed = None if self._from_cache else (self._stage_started_at - self._started_at) / max(n_spots, 1)
        record_pace(
            str(metadata.get("device", settings.device)),
            self.job.encoder,
            embed_seconds_per_spot=embed,
            sample_seconds_per_row_step=(now - self._stage_started_at) / max(rows_steps, 1),
        )

    def _enter_sampling(self) -> None:
        if self.stage != "sample":
            self.stage, self.stage_done, self.stage_total = "sample", 0, len(self.job.spots)
            self._stage_started_at = time.perf_counter()

    def _time_left(self, fraction: float) -> str:
        """ " · ~T left" for the current stage, from its pace so far (empty until there is one)."""
        elapsed = time.perf_counter() - self._stage_started_at
        if not 0.02 <= fraction < 1 or elapsed < 1.0:
            return ""
        return f" · ~{format_duration(elapsed * (1 - fraction) / fraction)} left"

    def _ensure_result(self) -> PredictionResult:
        """The result buffers, made at the first sampled batch (so nothing exists while embedding)."""
        if self.result is None:
            from napari_stem.values import Prediction

            job = self.job
            prediction = Prediction.from_batches(  # NaN rows until their batch arrives
                [],
                job.genes,
                n_samples=job.settings.n_samples,
                intervals=job.settings.intervals,
                keep_samples=self.keeps_samples(job),
                n_spots=len(job.spots),
                metadata={**self._metadata, "slide": str(job.slide_path), "mpp": job.mpp, "status": "running"},
            )
            self.result = PredictionResult(job=job, prediction=prediction, from_cache=self._from_cache)
        return self.result

    def finish(self, job_id: int, outcome: str) -> str | None:
        """Main thread: the job ended ("done" or "cancelled"); returns the new status or None if stale."""
        if self.job is None or job_id != self.job.job_id or not self.running:
            return None
        seconds = time.perf_counter() - self._started_at
        n_spots = len(self.job.spots)
        if outcome == "cancelled" or self._cancel_requested and (self.result is None or self.result.done < n_spots):
            self.status = "cancelled"
            if self.result is None or self.result.done == 0:
                self.result = None
                self.message = "cancelled before any spot was sampled; nothing kept."
            else:
                prediction, spots = self.result.finished()
                prediction.metadata = {
                    **prediction.metadata,
                    "status": f"cancelled after {self.result.done}/{n_spots} spots",
                }
                kept = self.result.done
                self.result = PredictionResult(
                    job=_with_spots(self.job, spots), prediction=prediction, done=kept, status="cancelled"
                )
                self.message = f"cancelled: kept the {kept} of {n_spots} spots already sampled."
            return self.status
        if self.result is None:  # no sample event at all (cannot happen with ≥ 1 spot)
            self.status = "failed"
            self.message = "the prediction ended without results."
            return self.status
        self.status = "done"
        self.result.status = "done"
        self.result.prediction.metadata.pop("status", None)
        self._record_pace(n_spots)
        self.message = f"done: {n_spots} spots × {len(self.result.genes)} genes in {seconds:.1f} s" + (
            " (embeddings from the cache)" if self.result.from_cache else ""
        )
        return self.status

    def fail(self, job_id: int, error: BaseException) -> str | None:
        """Main thread: the job raised; drop the partial result. Returns the message for the user."""
        if self.job is None or job_id != self.job.job_id or not self.running:
            return None
        self.status = "failed"
        self.result = None
        self.message = error_message(error)
        return self.message

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path | None) -> Path:
        """Write the current result to ``.h5ad`` (same as ``stem-train predict``) or ``.csv``."""
        from napari_stem.csv_io import write_prediction_csv

        if self.result is None or self.running:
            raise StemError("nothing to export yet: run a prediction first (and let it finish or cancel it).")
        if path is None or str(path) in ("", "."):
            raise StemError("choose a file to export to ('export to'), ending in .h5ad or .csv.")
        path = Path(path)
        prediction, spots = self.result.finished()
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return write_prediction_csv(path, prediction, spots)
        if suffix != ".h5ad":
            raise StemError(f"cannot export to {describe_path(path)}: use a file name ending in .h5ad or .csv.")
        from napari_stem.export import write_prediction
        from napari_stem.slide import open_slide

        with open_slide(self.result.job.slide_path, mpp=self.result.job.mpp) as slide:
            return write_prediction(path, prediction, spots, slide)


# ---------------------------------------------------------------------- helpers
def describe_checkpoint(metadata: dict) -> str:
    """ "24 genes · encoder efficientnet_lite0 · hest patches", from a checkpoint's config."""
    embedding = EmbeddingSpec.from_dict(metadata.get("embedding"))
    patch = embedding.patch["mode"]
    genes = metadata.get("genes") or []
    encoder = "?" if embedding.encoder is None else embedding.encoder
    return f"{len(genes)} genes · encoder {encoder} · {patch} patches"


def error_message(error: BaseException) -> str:
    """What the user reads: our errors as they are, others with what to try."""
    if isinstance(error, StemError):
        return str(error)
    text = f"{type(error).__name__}: {error}"
    if "out of memory" in str(error).lower():
        return f"prediction failed, out of memory ({text}). Lower 'samples per spot', or choose device 'cpu'."
    return f"prediction failed ({text}). Check the inputs; the full traceback is in napari's console/log."


def _checkpoint_metadata(path: str | Path | None) -> dict:
    if path is None or str(path) in ("", "."):
        raise CheckpointError(
            "no checkpoint chosen: pick a napari-stem checkpoint folder (from stem-train fit) under 'checkpoint'."
        )
    from napari_stem.stem.checkpoint import read_metadata

    return read_metadata(path)


def _with_spots(job: PredictJob, spots: Spots) -> PredictJob:
    import dataclasses

    return dataclasses.replace(job, spots=spots)

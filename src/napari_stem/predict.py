"""Slide + spots + checkpoint → per-spot predictive mean and variance: the one prediction path.

The napari widget and ``stem-train predict`` both drive :func:`iter_predict`, a generator that
embeds the spots the way the checkpoint was trained (its encoder and patch mode), then samples,
yielding a :class:`PredictEvent` after every batch so callers can show progress, draw partial
results and cancel between batches. The last event carries the finished :class:`Prediction`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stem.devices import resolve_device_name
from napari_stem.errors import CheckpointError, describe_path
from napari_stem.precision import resolve_precision
from napari_stem.validate import check_batch_size, check_samples, check_spots, check_steps
from napari_stem.values import DEFAULT_SAMPLER as DEFAULT_SAMPLER
from napari_stem.values import SAMPLERS as SAMPLERS
from napari_stem.values import EmbeddingSpec, Prediction, PredictOptions, SampleBatch, SampleStep

if TYPE_CHECKING:
    from napari_stem.spots import Spots

#: Interactive defaults (samples per spot, denoising steps = network evaluations per sample).
#: Chosen from bench/bench_sampler.py --quality (the table is in the README): the default sampler
#: matches the paper's 1000-step chain at 4 evaluations; CUDA affords a margin. SAMPLERS and
#: DEFAULT_SAMPLER (imported above, still importable from here) live in napari_stem.values, torch-free,
#: so the sampler names them without importing this module.
DEFAULT_SETTINGS = {"cpu": {"n_samples": 4, "steps": 4}, "cuda": {"n_samples": 10, "steps": 10}}


@dataclass
class PredictEvent:
    """Progress of a prediction run.

    ``stage`` is ``"embed"`` (patches → embeddings), ``"step"`` (one denoising step of a batch,
    with ``step_events``; ``batch`` is a :class:`~napari_stem.values.SampleStep`), ``"sample"``
    (diffusion sampling; ``batch`` holds the finished spots' mean/variance) or ``"done"``
    (``prediction`` is set). ``done``/``total`` count spots within the stage. ``metadata`` is the
    run's provenance (the final prediction's), on sampling and done events, so partial results carry it too.
    """

    stage: str
    done: int
    total: int
    batch: SampleBatch | SampleStep | None = None  # while sampling
    prediction: Prediction | None = None  # when done
    from_cache: bool = False
    metadata: dict | None = None


def default_settings(device: str = "auto") -> dict[str, int]:
    """Samples per spot and steps suited to ``device`` ("auto" resolves to CUDA when present)."""
    device = resolve_device_name(device)
    return dict(DEFAULT_SETTINGS["cuda" if str(device).startswith("cuda") else "cpu"])


def embedding_spec(checkpoint: Any) -> EmbeddingSpec:
    """How a checkpoint's embeddings were made; refused when it names no encoder (no slide can be embedded)."""
    spec = checkpoint.embedding
    if spec.encoder is None:
        raise CheckpointError(
            f"checkpoint {describe_path(checkpoint.path)} does not say which image encoder it was trained "
            "on (config 'embedding': {'encoder': ..., 'patch': ...}); re-save it with stem-train, or give "
            "precomputed embeddings instead of a slide."
        )
    return spec


def iter_predict(
    slide_path: str | Path,
    spots: Spots,
    checkpoint: Any,
    options: PredictOptions | None = None,
    *,
    embeddings: np.ndarray | None = None,
    encoder: Any = None,
    encoder_weights: Any = None,
    cache_path: str | Path | None = None,
    step_events: bool = False,
) -> Iterator[PredictEvent]:
    """Predict expression for ``spots`` of a slide; see the module docstring.

    ``checkpoint`` is a path or a loaded :class:`~napari_stem.stem.checkpoint.StemCheckpoint`;
    ``options`` (:class:`~napari_stem.values.PredictOptions`) says how to sample, on which device,
    in what batches. Its ``n_samples``/``steps`` default to :func:`default_settings` for the
    device, raised to the smallest count that makes the ``intervals`` levels exact
    (:func:`napari_stem.intervals.samples_for_levels`; 19 for 0.5 and 0.9); an explicit
    ``n_samples`` is kept and its intervals labelled with the level they have. Its ``precision``
    ("auto", "bf16", "fp32") applies to the encoder and the sampler alike; "auto" is bf16 where
    the hardware computes it natively. ``clip_x0`` clips the predicted x_0 to the training range
    the checkpoint records (when it records one); False samples exactly as the reference does.

    The keywords are inputs, not options: ``embeddings`` skips the embedding stage (rows in spot
    order); ``encoder`` is an already built encoder of the checkpoint's kind, so a cohort worker
    builds it once for all its slides (default: built here from the checkpoint's encoder name,
    with ``encoder_weights`` if given); ``cache_path`` keeps the embeddings in a HEST-Bench HDF5
    file reused on the next run. ``step_events`` adds a ``"step"`` event after every denoising
    step of every batch.
    """
    from napari_stem.intervals import samples_for_levels
    from napari_stem.stem.checkpoint import load_checkpoint
    from napari_stem.stem.sampling import iter_sample, resolve_device, sampling_provenance

    options = PredictOptions() if options is None else options
    # Arguments first: a mistake is refused before any model is loaded.
    if options.n_samples is not None:
        check_samples(options.n_samples)
    if options.steps is not None and not isinstance(options.steps, str):
        check_steps(options.steps)
    check_batch_size("embedding batch size", options.embed_batch_size)
    check_batch_size("sampling batch size", options.sample_batch_size)
    check_spots(spots, None, "the spot set")
    if not isinstance(checkpoint, (str, Path)):
        loaded = checkpoint
    else:
        loaded = load_checkpoint(checkpoint)
    torch_device = resolve_device(options.device)
    precision = resolve_precision(options.precision, torch_device)
    defaults = default_settings(torch_device.type)
    n_samples = options.n_samples
    if n_samples is None:
        intervals = options.intervals
        n_samples = samples_for_levels(intervals, defaults["n_samples"]) if intervals else defaults["n_samples"]
    n_samples = check_samples(n_samples)
    steps = defaults["steps"] if options.steps is None else options.steps
    n_spots = len(spots)

    if embeddings is None:
        embeddings = yield from _embed(
            slide_path,
            spots,
            loaded,
            encoder_weights,
            torch_device,
            precision,
            cache_path,
            options.embed_batch_size,
            options.num_workers,
            encoder,
        )
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.shape != (n_spots, loaded.config.cond_dim):
        raise CheckpointError(
            f"checkpoint {describe_path(loaded.path)} expects {loaded.config.cond_dim}-d embeddings, got "
            f"{embeddings.shape[1] if embeddings.ndim == 2 else embeddings.shape} for {n_spots} spots."
        )

    encoder_name, patch = "", {}
    if loaded.embedding.encoder:
        from napari_stem.embedding.patches import PatchSpec

        encoder_name, patch = loaded.embedding.encoder, PatchSpec.from_dict(loaded.embedding.patch).to_dict()
    metadata = {
        **sampling_provenance(
            loaded,
            n_samples=n_samples,
            steps=steps,
            sampler=options.sampler,
            eta=options.eta,
            seed=options.seed,
            device=torch_device,
            precision=precision,
            clip_x0=options.clip_x0,
        ),
        "encoder": encoder_name,
        "patch": patch,
    }
    parts = []
    for batch in iter_sample(
        loaded,
        embeddings,
        n_samples=n_samples,
        steps=steps,
        sampler=options.sampler,
        eta=options.eta,
        seed=options.seed,
        device=torch_device,
        precision=precision,
        batch_size=options.sample_batch_size,
        quantiles=options.quantiles,
        intervals=options.intervals,
        keep_samples=options.keep_samples,
        step_events=step_events,
        clip_x0=options.clip_x0,
    ):
        if isinstance(batch, SampleStep):
            yield PredictEvent("step", batch.start, n_spots, batch=batch, metadata=metadata)
            continue
        _check_finite(batch, loaded)
        parts.append(batch)
        yield PredictEvent("sample", batch.stop, n_spots, batch=batch, metadata=metadata)

    prediction = Prediction.from_batches(
        parts,
        loaded.genes,
        n_samples=n_samples,
        quantiles=options.quantiles,
        intervals=options.intervals,
        keep_samples=options.keep_samples,
        n_spots=n_spots,
        metadata=metadata,
    )
    yield PredictEvent("done", n_spots, n_spots, prediction=prediction, metadata=metadata)


def _check_finite(batch: Any, loaded: Any) -> None:
    """Refuse NaN/inf samples: a diverged sampler must never look like a normal result."""
    finite = np.isfinite(batch.mean).all(axis=1) & np.isfinite(batch.variance).all(axis=1)
    if not finite.all():
        raise CheckpointError(
            f"sampling with checkpoint {describe_path(loaded.path)} gave non-finite values (NaN or infinity) for "
            f"{int((~finite).sum())} of spots {batch.start}-{batch.stop - 1}: the model diverges with these settings. "
            "Nothing was written; use the ancestral sampler, more steps, or another checkpoint."
        )


def _embed(
    slide_path, spots, loaded, encoder_weights, device, precision, cache_path, batch_size, num_workers, encoder=None
):
    """Embedding stage of :func:`iter_predict` (a sub-generator whose return value is the array)."""
    from napari_stem.embedding.cache import iter_embed_slide_cached
    from napari_stem.embedding.embed import iter_embed_spots
    from napari_stem.embedding.patches import PatchSpec

    spec = embedding_spec(loaded)
    encoder_name, patch_spec = spec.encoder, PatchSpec.from_dict(spec.patch)
    if encoder is not None and getattr(encoder, "name", encoder_name) != encoder_name:
        raise CheckpointError(
            f"checkpoint {describe_path(loaded.path)} was trained on encoder '{encoder_name}', "
            f"not the '{encoder.name}' given."
        )
    n_spots = len(spots)
    out = np.empty((n_spots, loaded.config.cond_dim), dtype=np.float32)
    if n_spots == 0:
        return out
    common = {
        "encoder_weights": encoder_weights,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": str(device),
        "precision": precision,
    }
    if cache_path is not None:
        events = iter_embed_slide_cached(
            cache_path, slide_path, spots, encoder_name if encoder is None else encoder, patch_spec, **common
        )
    else:
        events = iter_embed_spots(slide_path, spots, encoder_name if encoder is None else encoder, patch_spec, **common)
    for event in events:
        if event.embeddings.shape[1] != loaded.config.cond_dim:
            events.close()
            raise CheckpointError(
                f"encoder '{encoder_name}' gives {event.embeddings.shape[1]}-d embeddings but checkpoint "
                f"{describe_path(loaded.path)} expects {loaded.config.cond_dim}-d; use the encoder it was trained with."
            )
        out[event.index] = event.embeddings
        yield PredictEvent("embed", event.done, n_spots, from_cache=event.from_cache)
    return out


def predict(
    slide_path: str | Path, spots: Spots, checkpoint: Any, options: PredictOptions | None = None, **inputs: Any
) -> Prediction | None:
    """Run :func:`iter_predict` to the end and return its :class:`~napari_stem.values.Prediction`;
    ``inputs`` are its keywords (``embeddings``, ``cache_path``, ...)."""
    prediction = None
    for event in iter_predict(slide_path, spots, checkpoint, options, **inputs):
        if event.stage == "done":
            prediction = event.prediction
    return prediction

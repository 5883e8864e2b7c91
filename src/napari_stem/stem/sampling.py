"""Draw expression samples per spot from patch embeddings: what the plugin and the CLI call.

Spots are processed in batches; each batch runs all its spots x samples through one forward per
step (spot-major rows, as the reference: rows j*K .. j*K+K-1 are spot j). ``iter_sample`` yields
after every batch so callers can show progress and stop early. All noise of spot j comes from its
own generator seeded by (seed, j), drawn on the CPU, so a seed gives the same numbers whatever the
batch size or device. The model's condition MLP runs once per batch, not once per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from napari_stem.allocator import keep_tensor_buffers_in_heap
from napari_stem.devices import resolve_device_name
from napari_stem.intervals import IntervalSpec, plan_intervals
from napari_stem.precision import autocast, resolve_precision
from napari_stem.stem.checkpoint import StemCheckpoint, check_compatible, load_checkpoint
from napari_stem.stem.diffusion import (
    N_TRAIN_STEPS,
    SOLVERS,
    GaussianDiffusion,
    create_diffusion,
    solver_timesteps,
)
from napari_stem.stem.model import StemModel
from napari_stem.values import (  # re-exported: their old home
    DEFAULT_SAMPLER,
    SAMPLERS,
    Prediction,
    SampleBatch,
    SampleStep,
)

ROWS_PER_BATCH = {"cpu": 256, "cuda": 4096}  # spots x samples per forward, by default
#: Each solver's timesteps for an integer ``steps`` (diffusion.solver_timesteps), chosen with
#: bench/bench_sampler.py --quality: the ODE solvers need logSNR spacing to be accurate; the
#: moment-matched steps are exact whatever the spacing and calibrate best uniform in t.
SOLVER_SPACING = {"dpm++2m": "logsnr", "dpm++2m-sde": "logsnr", "ancestral-matched": "time"}
VARIANCE_DDOF = 1  # unbiased sample variance over the K samples of a spot
#: x_0 predictions are clipped to the training range widened by this much (log2 units: one doubling
#: of counts): it stops the high-noise blow-ups while leaving the chain's own tails alone, which the
#: bare range cut (lower coverage on unseen tissue; bench/bench_sampler.py --quality).
X0_CLIP_MARGIN = 1.0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for a name; "auto" as :func:`napari_stem.devices.resolve_device_name` decides."""
    return torch.device(resolve_device_name(device, torch.cuda.is_available))


def spot_generator(seed: int, spot_index: int) -> torch.Generator:
    """The CPU generator all noise of one spot comes from; independent streams per (seed, spot)."""
    state = np.random.SeedSequence([int(seed), int(spot_index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _as_model(model_or_checkpoint, embedding_dim: int, map_location):
    """(model, checkpoint or None) from a StemModel, a loaded checkpoint or a checkpoint path."""
    if isinstance(model_or_checkpoint, (str, Path)):
        checkpoint = load_checkpoint(model_or_checkpoint, expected_cond_dim=embedding_dim, map_location=map_location)
        return checkpoint.model, checkpoint
    if isinstance(model_or_checkpoint, StemCheckpoint):
        checkpoint = model_or_checkpoint
        check_compatible(
            checkpoint.path,
            checkpoint.genes,
            checkpoint.config.cond_dim,
            checkpoint.embedding,
            expected_cond_dim=embedding_dim,
        )
        return checkpoint.model, checkpoint
    if isinstance(model_or_checkpoint, StemModel):
        if model_or_checkpoint.config.cond_dim != embedding_dim:
            raise ValueError(
                f"the model expects {model_or_checkpoint.config.cond_dim}-dim embeddings, got {embedding_dim}-dim"
            )
        return model_or_checkpoint, None
    raise TypeError(
        f"expected a StemModel, StemCheckpoint or checkpoint path, got {type(model_or_checkpoint).__name__}"
    )


def iter_sample(
    model_or_checkpoint,
    embeddings,
    *,
    n_samples: int = 10,
    steps: int | str = 50,
    sampler: str = DEFAULT_SAMPLER,
    eta: float = 0.0,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    seed: int = 0,
    keep_samples: bool = False,
    quantiles: Sequence[float] | None = None,
    step_events: bool = False,
    intervals: Sequence[float] | None = None,
    clip_x0: bool = True,
    target_range=None,
    clip_margin: float = X0_CLIP_MARGIN,
    spacing: str | None = None,
    solver_options: dict | None = None,
) -> Iterator[SampleBatch | SampleStep]:
    """Sample ``n_samples`` expression vectors for each row of ``embeddings`` (n_spots, D).

    ``steps``: an int N keeps N of the 1000 training steps evenly spread (the reference sampler's
    ``create_diffusion(str(N))``; 1000 = the full chain), or a respacing string like "ddim50".
    ``sampler``: one of :data:`napari_stem.values.SAMPLERS`, by default
    :data:`~napari_stem.values.DEFAULT_SAMPLER`; "ancestral" is the reference's p_sample_loop, "ddim"
    (``eta`` 0 = deterministic given the start noise) its DDIM loop. ``batch_size``: spots per batch (each brings ``n_samples`` rows); default ~256
    rows on CPU, ~4096 on CUDA. ``precision``: "auto" = bf16 autocast on CUDA and on CPUs with
    native bf16 (:mod:`napari_stem.precision`), else fp32; "bf16" or "fp32" to force. A
    StemModel passed in is moved to ``device``. ``quantiles``: interpolated quantile levels;
    ``intervals``: central interval levels, written as the order-statistic intervals
    :func:`napari_stem.intervals.plan_intervals` picks for ``n_samples`` (exact where K allows).
    Yields one :class:`SampleBatch` per batch; stop iterating to cancel. ``step_events`` adds a
    :class:`SampleStep` after every denoising step of a batch (same numbers either way).

    "dpm++2m", "dpm++2m-sde", "ancestral-matched" (:data:`napari_stem.stem.diffusion.SOLVERS`, the
    last one the few-step choice: its noise keeps the spread at 3-4 steps): an int ``steps`` is the
    number of network evaluations, at ``spacing`` (default :data:`SOLVER_SPACING`, see
    :func:`napari_stem.stem.diffusion.solver_timesteps`); a respacing string keeps its steps and
    evaluates at all but t = 0. ``solver_options``: keywords of
    :meth:`napari_stem.stem.diffusion.GaussianDiffusion.dpm_step` (``variance``, ``second_order``).
    ``clip_x0``: clip every predicted x_0 to the training targets' per-gene range recorded in
    the checkpoint (``target_range``, lo and hi arrays of G values, gives one outright), widened by
    ``clip_margin``; False, or a model without a recorded range, samples exactly as the reference does.
    """
    embeddings = torch.as_tensor(
        np.asarray(embeddings, dtype=np.float32) if not isinstance(embeddings, torch.Tensor) else embeddings
    ).float()
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n_spots, dim), got shape {tuple(embeddings.shape)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if isinstance(steps, int) and not 1 <= steps <= N_TRAIN_STEPS:
        raise ValueError(f"steps must be between 1 and {N_TRAIN_STEPS}, got {steps}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if device.type == "cpu":
        keep_tensor_buffers_in_heap()
    model, checkpoint = _as_model(model_or_checkpoint, embeddings.shape[1], device)
    model.to(device)  # train/eval mode left as is: the model has no mode-dependent layers
    diffusion = build_diffusion(steps, sampler, spacing)
    x0_range = None
    if clip_x0:
        if target_range is None and checkpoint is not None:
            target_range = checkpoint.target_range
        x0_range = range_tensors(target_range, model.config.n_genes, device, margin=clip_margin)
    levels = torch.tensor(sorted(quantiles), dtype=torch.float32) if quantiles else None
    interval_specs = plan_intervals(intervals, n_samples)
    n_spots = embeddings.shape[0]
    if batch_size is None:
        batch_size = max(1, ROWS_PER_BATCH.get(device.type, 256) // n_samples)
    for start in range(0, n_spots, batch_size):
        stop = min(start + batch_size, n_spots)
        steps = _iter_sample_batch(
            model,
            diffusion,
            embeddings[start:stop],
            range(start, stop),
            n_samples,
            sampler,
            eta,
            seed,
            device,
            precision,
            x0_range,
            solver_options,
        )
        while True:
            try:
                done = next(steps)
            except StopIteration as finished:
                samples = finished.value
                break
            if step_events:
                yield SampleStep(start, stop, n_spots, done, diffusion.n_loop_steps(sampler))
        yield SampleBatch(
            start,
            stop,
            n_spots,
            mean=samples.mean(dim=1).numpy(),
            variance=samples.var(dim=1, correction=VARIANCE_DDOF).numpy()
            if n_samples > 1
            else np.full((stop - start, samples.shape[2]), np.nan, dtype=np.float32),
            samples=samples.numpy() if keep_samples else None,
            quantiles=torch.quantile(samples, levels, dim=1).numpy() if levels is not None else None,
            intervals=_interval_bounds(samples.numpy(), interval_specs),
        )


def build_diffusion(steps: int | str, sampler: str, spacing: str | None = None) -> GaussianDiffusion:
    """The kept timesteps a sampler runs over: the reference's respacing for its samplers, N + 1
    timesteps at ``spacing`` for a solver asked for N evaluations."""
    if sampler in SOLVERS and str(steps).isdigit():
        if not 1 <= int(steps) < N_TRAIN_STEPS:
            raise ValueError(f"the {sampler} solver takes 1 to {N_TRAIN_STEPS - 1} steps, got {steps}")
        return GaussianDiffusion(timesteps=solver_timesteps(int(steps), spacing or SOLVER_SPACING[sampler]))
    return create_diffusion(str(steps))


def range_tensors(target_range, n_genes: int, device: torch.device, margin: float = 0.0):
    """(lo - margin, hi + margin) as (1, 1, G) float32 tensors from {"min": [...], "max": [...]} or a
    pair; None if none."""
    if target_range is None:
        return None
    low, high = (target_range["min"], target_range["max"]) if isinstance(target_range, dict) else target_range
    low, high = np.asarray(low, dtype=np.float32) - margin, np.asarray(high, dtype=np.float32) + margin
    bounds = [
        torch.as_tensor(np.broadcast_to(np.asarray(v, dtype=np.float32), (n_genes,)).copy())
        .view(1, 1, n_genes)
        .to(device)
        for v in (low, high)
    ]
    if not bool((bounds[0] <= bounds[1]).all()):
        raise ValueError("target range: some minimum exceeds its maximum")
    return tuple(bounds)


def _interval_bounds(samples: np.ndarray, specs: Sequence[IntervalSpec]) -> np.ndarray | None:
    """(I, 2, n_spots, G) lower and upper ends of each interval from (n_spots, K, G) samples."""
    if not specs:
        return None
    return np.stack([np.stack(spec.bounds(samples, axis=1)) for spec in specs])


def _iter_sample_batch(
    model: StemModel,
    diffusion,
    embeddings: torch.Tensor,
    spot_indices: range,
    n_samples: int,
    sampler: str,
    eta: float,
    seed: int,
    device: torch.device,
    precision: str,
    x0_range=None,
    solver_options: dict | None = None,
) -> Iterator[int]:
    """Yields steps done; returns (n_spots, K, G) float32 CPU samples for one batch of spots.

    Inference mode and autocast are entered around each step only, so they never leak into the
    consumer's code while the generator is suspended.
    """
    n_genes = model.config.n_genes
    generators = [spot_generator(seed, j) for j in spot_indices]

    def draw_noise() -> torch.Tensor:  # one block of K rows per spot, spot-major
        noise = [torch.randn((n_samples, 1, n_genes), generator=g) for g in generators]
        return torch.cat(noise).to(device)

    with torch.inference_mode(), autocast(device, precision):
        cond = model.embed_condition(embeddings.to(device)).repeat_interleave(n_samples, dim=0)
        steps = diffusion.iter_sample_loop(
            lambda x, t: model.forward_embedded(x, t, cond),
            draw_noise(),
            sampler=sampler,
            eta=eta,
            step_noise=lambda step_index: draw_noise(),
            x0_range=x0_range,
            **(solver_options or {}),
        )
    while True:
        with torch.inference_mode(), autocast(device, precision):
            try:
                done = next(steps)
            except StopIteration as finished:
                x_0 = finished.value
                break
        yield done
    return x_0.float().reshape(len(spot_indices), n_samples, n_genes).cpu()


def sample_expression(
    model_or_checkpoint,
    embeddings,
    *,
    n_samples: int = 10,
    steps: int | str = 50,
    sampler: str = DEFAULT_SAMPLER,
    eta: float = 0.0,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    seed: int = 0,
    keep_samples: bool = False,
    quantiles: Sequence[float] | None = None,
    intervals: Sequence[float] | None = None,
    genes: Sequence[str] | None = None,
    clip_x0: bool = True,
    target_range=None,
    clip_margin: float = X0_CLIP_MARGIN,
    spacing: str | None = None,
    solver_options: dict | None = None,
) -> Prediction:
    """Run :func:`iter_sample` to the end and gather a :class:`Prediction`.

    Gene names come from the checkpoint, else from ``genes``, else "gene0", "gene1", ...
    """
    if isinstance(model_or_checkpoint, (str, Path)):
        model_or_checkpoint = load_checkpoint(model_or_checkpoint)
    checkpoint = model_or_checkpoint if isinstance(model_or_checkpoint, StemCheckpoint) else None
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    batches = list(
        iter_sample(
            model_or_checkpoint,
            embeddings,
            n_samples=n_samples,
            steps=steps,
            sampler=sampler,
            eta=eta,
            batch_size=batch_size,
            device=device,
            precision=precision,
            seed=seed,
            keep_samples=keep_samples,
            quantiles=quantiles,
            intervals=intervals,
            clip_x0=clip_x0,
            target_range=target_range,
            clip_margin=clip_margin,
            spacing=spacing,
            solver_options=solver_options,
        )
    )
    config = (checkpoint.model if checkpoint else model_or_checkpoint).config
    if checkpoint is not None:
        genes = checkpoint.genes
    elif genes is None:
        genes = [f"gene{i}" for i in range(config.n_genes)]
    metadata = sampling_provenance(
        checkpoint,
        n_samples=n_samples,
        steps=steps,
        sampler=sampler,
        eta=eta,
        seed=seed,
        device=device,
        precision=precision,
        clip_x0=clip_x0,
        clip_margin=clip_margin,
        spacing=spacing,
        target_range=target_range,
    )
    return Prediction.from_batches(
        batches,
        genes,
        n_samples=n_samples,
        quantiles=quantiles,
        intervals=intervals,
        keep_samples=keep_samples,
        n_spots=len(embeddings),
        metadata=metadata,
    )


def sampling_provenance(
    checkpoint: StemCheckpoint | None,
    *,
    n_samples: int,
    steps: int | str,
    sampler: str,
    eta: float,
    seed: int,
    device: str | torch.device,
    precision: str,
    clip_x0: bool,
    clip_margin: float = X0_CLIP_MARGIN,
    spacing: str | None = None,
    target_range=None,
) -> dict:
    """How samples were drawn, as a prediction's metadata records it: the sampler's settings as run
    (resolved device and precision, the solver's spacing, whether x_0 was clipped), the checkpoint
    and its target transform. The same keys whether the plugin, the CLI or a script sampled."""
    clipped = clip_x0 and (target_range is not None or getattr(checkpoint, "target_range", None) is not None)
    return {
        "checkpoint": str(checkpoint.path) if checkpoint is not None else None,
        "target_transform": checkpoint.target_transform if checkpoint is not None else None,
        "n_samples": int(n_samples),
        "steps": int(steps) if str(steps).isdigit() else str(steps),
        "sampler": sampler,
        "eta": float(eta),
        "seed": int(seed),
        **({"spacing": spacing or SOLVER_SPACING[sampler]} if sampler in SOLVERS else {}),
        "clip_x0": bool(clipped),
        "clip_margin": float(clip_margin),
        "variance_ddof": VARIANCE_DDOF,
        "device": str(device),
        "precision": precision,
    }

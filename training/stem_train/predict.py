"""``stem-train predict``: a trained checkpoint + slides → one prediction ``.h5ad`` per slide.

Runs the plugin's own prediction path (:func:`napari_stem.predict.iter_predict`) so the CLI and the
GUI give the same numbers for the same settings, and writes each result with
:func:`napari_stem.export.write_prediction` (scanpy spatial layout, slide thumbnail included).

Many slides can be split over processes: under ``torchrun`` (or with ``RANK``/``WORLD_SIZE`` set)
rank r predicts slides r, r + world_size, ...; no process group is needed for that. With
``--scheduler`` each slide is instead one Dask task, :func:`predict_slide`, running the same
:func:`predict_job` (:func:`predict_cohort` over :mod:`stem_train.cohort`): workers may die or
join, and each slide's fate is recorded.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

from napari_stem.errors import StemError, describe_path
from napari_stem.intervals import DEFAULT_LEVELS
from napari_stem.precision import PRECISION_HELP, PRECISIONS
from napari_stem.predict import DEFAULT_SAMPLER, DEFAULT_SETTINGS, SAMPLERS
from napari_stem.validate import (
    BATCH_SIZE,
    FRACTION,
    MPP,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    SAMPLES,
    STEPS,
    check_steps,
)
from napari_stem.values import VISIUM_GRID, GridSpec, PredictOptions
from stem_train.cohort import (
    CohortReport,
    Scheduler,
    SlideTask,
    file_identity,
    refuse_under_torchrun,
    report_spots,
    run_cohort,
    settings_fingerprint,
    worker_device,
)
from stem_train.cohort import add_arguments as add_cohort_arguments
from stem_train.worker_models import worker_checkpoint, worker_encoder


@dataclass
class PredictJob:
    """One slide to predict: where it is, where its spots come from, where the result goes."""

    name: str
    slide_path: Path
    out_path: Path
    spots_path: Path | None = None  # None: a Visium-like grid over the detected tissue
    mpp: float | None = None


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="predict expression for a slide or every sample of a HEST folder; writes .h5ad files",
        description=(
            "Predict spatial expression with a trained checkpoint. INPUT is a slide file (spots from --spots, "
            "else a Visium-like grid laid over the detected tissue) or a HEST-layout folder (every sample, or "
            "--sample-ids, with the spots of its st/<id>.h5ad). Patches are embedded with the checkpoint's own "
            "encoder and patch mode, then diffusion samples are drawn per spot.\n\n"
            "Each slide gives one .h5ad: X = mean of the samples, layers['variance'] = their variance, "
            "layers['lo50'], ['hi50'], ['lo90'], ['hi90'] = prediction intervals (--intervals), obsm['spatial'] = "
            "spot centres, uns['spatial']['ST'] = slide thumbnail "
            "(scanpy.pl.spatial(adata, library_id='ST', img_key='downscaled_fullres') draws it), provenance in "
            "uns['napari_stem'] (each interval's exact level and sample count in its 'intervals_json').\n\n"
            "Intervals are order statistics of the K samples: [i-th smallest, i-th largest] covers exactly "
            "(K + 1 - 2i)/(K + 1) for a calibrated model, so a level L is exact when (1 - L)(K + 1)/2 is a whole "
            "number: 19 samples give exact 50% and 90% intervals. The sample count is raised to the next such K "
            "when needed, with a note of the cost (sampling time grows with K).\n\n"
            "Under torchrun (or with RANK/WORLD_SIZE set) slides are split across ranks: rank r takes slides "
            "r, r+W, r+2W, ...; on CUDA each rank uses the GPU of its LOCAL_RANK."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        type=Path,
        metavar="SLIDE_OR_HEST_DIR",
        help="a slide file (.tif, .svs, ...) or a HEST-layout folder (wsis/, st/, metadata/)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="CKPT",
        help="checkpoint folder written by stem-train fit (config.json + weights.safetensors), or "
        "hf-hub:owner/name[@revision] for one on the Hugging Face Hub (cached; safetensors only)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="OUT",
        help="output .h5ad (one slide) or folder (one <name>.h5ad per slide); default: ./predictions/",
    )
    parser.add_argument(
        "--format",
        choices=("h5ad", "spatialdata"),
        default="h5ad",
        help="h5ad (scanpy layout) or spatialdata: a <name>.zarr SpatialData folder per slide (H&E as a "
        "downscaled multiscale image, spots as circles in full-res pixels, table with mean, variance and "
        "intervals) that spatialdata.read_zarr and napari-spatialdata open (default: h5ad)",
    )
    spots = parser.add_argument_group("spots (slide input)")
    spots.add_argument(
        "--spots",
        type=Path,
        default=None,
        metavar="ST.h5ad",
        help="spot coordinates: an .h5ad with obsm['spatial'] (x, y full-res pixels) and "
        "uns['spatial'][lib]['scalefactors']['spot_diameter_fullres'], or a SpatialData .zarr (its circle "
        "shapes, e.g. from spatialdata-io's Visium reader); default: a grid over the tissue",
    )
    spots.add_argument(
        "--grid-pitch-um", type=POSITIVE_FLOAT, default=100.0, help="grid spot pitch in µm (default: 100, Visium)"
    )
    spots.add_argument(
        "--grid-diameter-um", type=POSITIVE_FLOAT, default=55.0, help="grid spot diameter in µm (default: 55, Visium)"
    )
    spots.add_argument(
        "--min-tissue-fraction",
        type=FRACTION,
        default=0.5,
        help="keep grid spots at least this much tissue (default: 0.5)",
    )
    spots.add_argument(
        "--mpp",
        type=MPP,
        default=None,
        help="slide pixel size in µm/px (0.05-20) when the file does not record it or records a wrong one",
    )
    spots.add_argument(
        "--drop-off-slide-spots",
        action="store_true",
        help="drop (and count) spots whose centre lies off the slide instead of refusing the spot file",
    )
    spots.add_argument(
        "--sample-ids",
        "--samples-ids",
        dest="sample_ids",
        default=None,
        metavar="ID,ID",
        help="HEST input: comma-separated sample ids to predict (default: all)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--samples",
        type=SAMPLES,
        default=None,
        metavar="K",
        help="diffusion samples per spot; their mean is the prediction, their spread the uncertainty "
        "(default: the fewest that make --intervals exact, 19 for 0.5,0.9; without intervals 4 on CPU, "
        "10 on CUDA; the paper: 20). A K that cannot give the intervals exactly is raised to one that can",
    )
    sampling.add_argument(
        "--steps",
        type=STEPS,
        default=None,
        metavar="N",
        help="denoising steps out of the 1000 trained, i.e. network evaluations per sample (default: "
        f"{DEFAULT_SETTINGS['cpu']['steps']} on CPU, {DEFAULT_SETTINGS['cuda']['steps']} on CUDA; the paper: 1000)",
    )
    sampling.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=DEFAULT_SAMPLER,
        help=f"ancestral (the paper's DDPM sampler, respaced to --steps); ddim (eta 0 = deterministic per "
        f"start noise); dpm++2m (DPM-Solver++(2M), deterministic, second order); dpm++2m-sde (its "
        f"stochastic form); ancestral-matched (ancestral steps whose noise is the learned variance "
        f"carried to the big step: keeps the spread at few steps) (default: {DEFAULT_SAMPLER})",
    )
    sampling.add_argument(
        "--no-clip-x0",
        dest="clip_x0",
        action="store_false",
        help="do not clip the denoiser's predicted x0 to the per-gene range of the training targets "
        "the checkpoint records (the reference's sampling exactly; checkpoints without a range, e.g. "
        "imported reference weights, are never clipped)",
    )
    sampling.add_argument(
        "--eta", type=FRACTION, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: 0)"
    )
    sampling.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same samples on any batch size (default: 0)"
    )
    sampling.add_argument(
        "--intervals",
        default=",".join(f"{level:g}" for level in DEFAULT_LEVELS),
        metavar="L,L",
        help="central prediction-interval levels, written as layers lo<L>/hi<L> from order statistics of "
        "the samples, each exact at its stated level ('' for none; default: 0.5,0.9)",
    )
    sampling.add_argument(
        "--median", action="store_true", help="also store the samples' (interpolated) median as layers['median']"
    )
    sampling.add_argument(
        "--quantiles",
        default=None,
        metavar="Q,Q",
        help="removed: interpolated quantiles of few samples are not interval ends (q05-q95 of 8 samples "
        "covers ~0.65, not 0.90); use --intervals and --median",
    )
    sampling.add_argument(
        "--keep-samples",
        action="store_true",
        help="also store every sample (obsm['samples'], n_spots x K*genes): lets evaluate compute the "
        "sample CRPS and exact rank coverage; files grow K-fold",
    )
    sampling.add_argument(
        "--sample-batch-size",
        type=BATCH_SIZE,
        default=None,
        metavar="SPOTS",
        help="spots per sampling batch (default: about 256 rows on CPU, 4096 on CUDA)",
    )
    compute = parser.add_argument_group("compute")
    compute.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default: auto)")
    compute.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help=f"encoder and sampler arithmetic. {PRECISION_HELP}"
    )
    compute.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="local weights file for the checkpoint's encoder (default: its built-in source)",
    )
    compute.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep patch embeddings in DIR/<name>.h5 and reuse them when encoder, patches and spots match "
        "(a prepared folder's embeddings/ works)",
    )
    compute.add_argument(
        "--batch-size",
        type=BATCH_SIZE,
        default=None,
        help="patches per encoder forward pass (default: 8 on CPU, 64 on CUDA)",
    )
    compute.add_argument(
        "--num-workers",
        type=NON_NEGATIVE_INT,
        default=0,
        help="patch-reading worker processes (default: 0 = in process)",
    )
    compute.add_argument(
        "--skip-existing", action="store_true", help="leave slides whose output .h5ad exists alone (resume a long run)"
    )
    add_cohort_arguments(parser.add_argument_group("cohort (many slides on Dask; see the README)"))
    return parser


def run(args: argparse.Namespace) -> int:
    from napari_stem.predict import embedding_spec
    from napari_stem.stem.checkpoint import load_checkpoint

    if args.quantiles is not None:
        raise StemError(
            f"--quantiles {args.quantiles!r} is no longer written: interpolated quantiles of K samples are not "
            "interval ends (q05-q95 of 8 samples covers ~0.65 of the truth, not 0.90). Use --intervals 0.5,0.9 "
            "(exact order-statistic intervals, layers lo50/hi50 and lo90/hi90) and --median for the median."
        )
    if args.steps is not None:
        check_steps(args.steps, "--steps", args.sampler)
    levels = parse_levels(args.intervals, "--intervals")
    jobs = plan_jobs(
        args.input,
        args.out,
        spots_path=args.spots,
        sample_ids=_split_ids(args.sample_ids),
        mpp=args.mpp,
        suffix=".zarr" if getattr(args, "format", "h5ad") == "spatialdata" else ".h5ad",
    )
    check_outputs(jobs, args)  # before any model is loaded
    checkpoint = load_checkpoint(args.checkpoint)
    embedding_spec(checkpoint)  # fail now, not after the first slide, if it names no encoder
    rank, world_size = shard_rank()
    if args.scheduler.distributed:
        refuse_under_torchrun(args.scheduler)
    mine = shard(jobs, rank, world_size)
    device = rank_device(args.device)
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    n_samples = sample_count(levels, args.samples, device, prefix)
    print(
        f"{prefix}{len(mine)} of {len(jobs)} slides; checkpoint {checkpoint.path} ({len(checkpoint.genes)} genes, "
        f"encoder {checkpoint.embedding.encoder}); device {device}"
    )
    grid = grid_spec(args)
    options = PredictOptions(
        n_samples=n_samples,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        seed=args.seed,
        device=device,
        precision=args.precision,
        embed_batch_size=args.batch_size,
        num_workers=args.num_workers,
        sample_batch_size=args.sample_batch_size,
        quantiles=(0.5,) if args.median else None,
        intervals=levels,
        keep_samples=args.keep_samples,
        clip_x0=args.clip_x0,
    )
    if args.scheduler.distributed:  # one Dask task per slide, each running predict_job below
        report = predict_cohort(
            [job for job in jobs if not (args.skip_existing and job.out_path.exists())],
            args.checkpoint,
            args.scheduler,
            grid=grid,
            options=options,
            encoder_weights=args.encoder_weights,
            cache_dir=args.cache_dir,
            drop_off_slide_spots=args.drop_off_slide_spots,
            retry_failed=args.retry_failed,
            show_workers=args.show_workers,
        )
        print(report.table())
        report.raise_if_failed("they have no .h5ad")
        return 0
    for job in mine:
        if args.skip_existing and job.out_path.exists():
            print(f"{prefix}{job.name}: {job.out_path} exists, skipped")
            continue
        path = predict_job(
            job,
            checkpoint,
            grid=grid,
            options=options,
            encoder_weights=args.encoder_weights,
            cache_dir=args.cache_dir,
            progress_prefix=prefix,
            drop_off_slide_spots=args.drop_off_slide_spots,
        )
        print(f"{prefix}{job.name}: wrote {path}")
    return 0


# ---------------------------------------------------------------------- planning
def parse_levels(text: str | None, flag: str = "--intervals") -> tuple[float, ...] | None:
    if not text or not text.strip():
        return None
    try:
        levels = tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError as exc:
        raise StemError(f"{flag} must be comma-separated numbers in (0, 1), got {text!r}.") from exc
    if not all(0 < q < 1 for q in levels):
        raise StemError(f"{flag} must lie strictly between 0 and 1, got {text!r}.")
    return levels


def sample_count(levels: Sequence[float] | None, requested: int | None, device: str, prefix: str = "") -> int:
    """Samples per spot: ``--samples``, or the device default, raised so the intervals are exact (noted)."""
    from napari_stem.intervals import resolve_sample_count
    from napari_stem.predict import default_settings

    n_samples, note = resolve_sample_count(levels, requested, default_settings(device)["n_samples"])
    if note:
        print(f"{prefix}note: {note}")
    return n_samples


def _split_ids(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def plan_jobs(
    input_path: Path,
    out: Path | None,
    *,
    spots_path: Path | None = None,
    sample_ids: Sequence[str] | None = None,
    mpp: float | None = None,
    suffix: str = ".h5ad",
) -> list[PredictJob]:
    """The slides to predict, in a fixed order (the same on every rank); outputs end in ``suffix``
    (".h5ad", or ".zarr" for SpatialData)."""
    from napari_stem.hest import hest_sample, hest_sample_ids, is_hest_folder

    input_path = Path(input_path)
    if not input_path.exists():
        raise StemError(
            f"input {describe_path(input_path)} does not exist; give a slide file or a HEST folder (wsis/, st/, metadata/)."
        )
    if input_path.is_dir():
        if not is_hest_folder(input_path):
            raise StemError(
                f"{describe_path(input_path)} is a folder but not a HEST-layout folder (it needs wsis/ and st/); give a slide file or a HEST folder."
            )
        if spots_path is not None:
            raise StemError("--spots is for a single slide; a HEST folder's spots come from its st/<id>.h5ad files.")
        out_dir = _output_dir(out, suffix)
        ids = list(sample_ids) if sample_ids else hest_sample_ids(input_path)
        known = set(hest_sample_ids(input_path))
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise StemError(
                f"--sample-ids {', '.join(unknown)} not found in {describe_path(input_path / 'st')} (available: {', '.join(sorted(known)[:10])})."
            )
        jobs = []
        for sample_id in ids:
            sample = hest_sample(input_path, sample_id)
            jobs.append(
                PredictJob(
                    sample_id, sample.wsi_path, out_dir / f"{sample_id}{suffix}", sample.st_path, mpp or sample.mpp
                )
            )
        return jobs
    if sample_ids:
        raise StemError("--sample-ids is for a HEST folder; the input is a single slide file.")
    if spots_path is not None and not Path(spots_path).exists():
        raise StemError(f"spot file {describe_path(spots_path)} does not exist.")
    if out is not None and out.suffix == suffix:
        out_path = out
    else:
        out_path = _output_dir(out, suffix) / f"{input_path.stem}{suffix}"
    return [PredictJob(input_path.stem, input_path, out_path, spots_path, mpp)]


def _output_dir(out: Path | None, suffix: str = ".h5ad") -> Path:
    out = Path("predictions") if out is None else Path(out)
    if out.suffix == suffix:
        raise StemError(f"--out {describe_path(out)} names one file, but several slides are predicted; give a folder.")
    return out


def shard_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise StemError(
            f"RANK/WORLD_SIZE must be integers, got {os.environ.get('RANK')!r}/{os.environ.get('WORLD_SIZE')!r}."
        ) from exc
    if not 0 <= rank < world_size:
        raise StemError(f"RANK {rank} is outside WORLD_SIZE {world_size}.")
    return rank, world_size


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank r's share: items r, r + world_size, ... (round-robin keeps big and small slides mixed)."""
    return list(items[rank::world_size])


def rank_device(device: str) -> str:
    """``auto`` under torchrun with CUDA → this rank's GPU (LOCAL_RANK); otherwise unchanged."""
    if device != "auto" or "LOCAL_RANK" not in os.environ:
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return "cpu"


# ---------------------------------------------------------------------- one slide
def check_outputs(jobs: Sequence[PredictJob], args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that are inputs, foreign files or unwritable places."""
    from napari_stem.stem.checkpoint import read_metadata
    from napari_stem.validate import check_grid, check_prediction_output, check_writable_folder

    read_metadata(args.checkpoint)  # a missing or damaged checkpoint is named before anything else
    if any(job.spots_path is None for job in jobs):
        check_grid(grid_spec(args))
    checkpoint_files = list(Path(args.checkpoint).glob("*")) if Path(args.checkpoint).is_dir() else [args.checkpoint]
    inputs = [args.input, *checkpoint_files] + [path for job in jobs for path in (job.slide_path, job.spots_path)]
    for job in jobs:
        if not (args.skip_existing and job.out_path.exists()):
            check_prediction_output(job.out_path, inputs)
    if args.cache_dir is not None:
        check_writable_folder(args.cache_dir, flag="--cache-dir")


def grid_spec(args: argparse.Namespace) -> GridSpec:
    """The grid over tissue of ``--grid-pitch-um``, ``--grid-diameter-um`` and ``--min-tissue-fraction``."""
    return GridSpec(
        pitch_um=args.grid_pitch_um,
        spot_diameter_um=args.grid_diameter_um,
        min_tissue_fraction=args.min_tissue_fraction,
    )


def job_spots(job: PredictJob, slide: Any, grid: GridSpec = VISIUM_GRID) -> Any:
    """The job's spots: read from its h5ad, or a grid over the slide's tissue."""
    from napari_stem.grid import spots_over_tissue
    from napari_stem.spots import read_spots_h5ad

    if job.spots_path is not None and Path(job.spots_path).suffix == ".zarr":  # circles of a SpatialData object
        from napari_stem.spatialdata_io import spots_from_spatialdata

        return spots_from_spatialdata(job.spots_path, mpp=slide.mpp if slide.mpp else None)
    if job.spots_path is not None:
        return read_spots_h5ad(job.spots_path, mpp=slide.mpp if slide.mpp else None)
    spots = spots_over_tissue(slide, grid)
    if len(spots) == 0:
        raise StemError(
            f"no tissue found on {describe_path(job.slide_path)} for a grid of {grid.pitch_um:g} µm spots; lower "
            "--min-tissue-fraction or give the spots with --spots ST.h5ad."
        )
    print(f"{job.name}: laid a {grid.pitch_um:g} µm grid over the tissue: {len(spots)} spots")
    return spots


def predict_job(
    job: PredictJob,
    checkpoint: Any,
    *,
    grid: GridSpec = VISIUM_GRID,
    options: PredictOptions | None = None,
    encoder_weights: Path | None = None,
    encoder: Any = None,
    cache_dir: Path | None = None,
    progress_prefix: str = "",
    drop_off_slide_spots: bool = False,
    progress: Any = None,
) -> Path:
    """Predict one slide with progress bars; returns the written .h5ad path.

    The spots and the room for the result are checked once they are known, before embedding.
    ``progress(stage, done, total)`` is called after every batch too (a cohort's live spot count).
    ``encoder`` is an already built encoder (a cohort worker's, built once for all its slides).
    """
    from tqdm.auto import tqdm

    from napari_stem.caches import embedding_cache_path
    from napari_stem.export import write_prediction
    from napari_stem.predict import iter_predict
    from napari_stem.slide import open_slide
    from napari_stem.validate import check_prediction_output, check_spots, prediction_bytes

    options = PredictOptions() if options is None else options
    with open_slide(job.slide_path, mpp=job.mpp) as slide:
        spots = job_spots(job, slide, grid)
        spots, dropped = check_spots(
            spots, slide.shape, describe_path(job.spots_path or job.slide_path), drop_off_slide_spots
        )
        if dropped:
            print(f"{progress_prefix}{job.name}: dropped {dropped} spots off the slide; {len(spots)} left")
        n_layers = 2 + 2 * len(options.intervals or ()) + len(options.quantiles or ())
        kept = int(options.n_samples or 0) if options.keep_samples else 0
        check_prediction_output(
            job.out_path,
            [job.slide_path, job.spots_path],
            prediction_bytes(len(spots), len(checkpoint.genes), n_layers, kept),
        )
        cache_path = None  # no --cache-dir: embeddings are not kept
        if cache_dir is not None:
            cache_path = embedding_cache_path(
                job.slide_path, spots, checkpoint.embedding, encoder_weights, root=cache_dir, name=job.name
            )
        bars: dict[str, Any] = {}
        prediction = None
        try:
            events = iter_predict(
                job.slide_path,
                spots,
                checkpoint,
                options,
                encoder=encoder,
                encoder_weights=encoder_weights,
                cache_path=cache_path,
            )
            for event in events:
                if event.stage == "done":
                    prediction = event.prediction
                    break
                bar = bars.get(event.stage)
                if bar is None:
                    label = {"embed": "embedding patches", "sample": "sampling"}.get(event.stage, event.stage)
                    bar = bars[event.stage] = tqdm(
                        total=event.total, desc=f"{progress_prefix}{job.name}: {label}", unit="spot", leave=False
                    )
                bar.update(event.done - bar.n)
                if event.from_cache:
                    bar.set_postfix_str("from cache")
                if progress is not None:
                    progress(event.stage, event.done, event.total)
        finally:
            for bar in bars.values():
                bar.close()
        return write_prediction(
            job.out_path, prediction, spots, slide, format="zarr" if job.out_path.suffix == ".zarr" else "h5ad"
        )


# ---------------------------------------------------------------------- many slides as a cohort
def predict_cohort(
    jobs: Sequence[PredictJob],
    checkpoint: str | Path,
    scheduler: Scheduler | str = "local",
    *,
    grid: GridSpec = VISIUM_GRID,
    options: PredictOptions | None = None,
    encoder_weights: Path | None = None,
    cache_dir: Path | None = None,
    drop_off_slide_spots: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    quiet: bool = False,
    show_workers: bool = False,
) -> CohortReport:
    """``stem-train predict`` over many slides as a cohort (:mod:`stem_train.cohort`): one
    :func:`predict_slide` task per slide."""
    options = PredictOptions() if options is None else options
    weights = Path(checkpoint) / "weights.safetensors"
    model = (str(checkpoint), *(file_identity(weights) if weights.exists() else ()))
    tasks = [
        SlideTask(
            job.name,
            Path(job.out_path),
            predict_slide,
            {
                "job": job,
                "checkpoint_path": str(checkpoint),
                "grid": grid,
                "options": options,
                "encoder_weights": encoder_weights,
                "cache_dir": cache_dir,
                "drop_off_slide_spots": drop_off_slide_spots,
            },
            n_spots=_spot_count(job.spots_path),
            settings=settings_fingerprint(
                model,
                asdict(job),
                astuple(grid),  # as the runs before GridSpec recorded it
                recorded_options(options, encoder_weights),
                drop_off_slide_spots,
                *(file_identity(path) for path in (job.slide_path, job.spots_path) if path),
            ),
        )
        for job in jobs
    ]
    return run_cohort(
        tasks, scheduler, retry_failed=retry_failed, progress=progress, quiet=quiet, show_workers=show_workers
    )


def recorded_options(options: PredictOptions, encoder_weights: Path | None) -> dict[str, Any]:
    """The options as a slide's state file fingerprints them: every sampling option and the encoder
    weights, one dict, as the runs before PredictOptions recorded it, so their done slides stay done."""
    return {**asdict(options), "encoder_weights": encoder_weights}


def predict_slide(
    job: PredictJob,
    checkpoint_path: str | Path,
    grid: GridSpec,
    options: PredictOptions,
    encoder_weights: Path | None,
    cache_dir: Path | None,
    drop_off_slide_spots: bool,
) -> dict:
    """One slide of a cohort on a worker: :func:`predict_job` with this worker's device and models."""
    import h5py

    checkpoint = worker_checkpoint(checkpoint_path)
    options = replace(options, device=worker_device(str(options.device or "auto")))
    encoder_name = checkpoint.embedding.encoder or ""
    encoder = worker_encoder(encoder_name, encoder_weights, options.device, options.precision)

    def sampled(stage: str, done: int, total: int) -> None:
        if stage == "sample":  # a spot counts once its samples are drawn
            report_spots(done)

    path = Path(
        predict_job(
            job,
            checkpoint,
            grid=grid,
            options=options,
            encoder_weights=encoder_weights,
            encoder=encoder,
            cache_dir=cache_dir,
            progress=sampled,
            drop_off_slide_spots=drop_off_slide_spots,
        )
    )
    if path.suffix != ".h5ad":  # a SpatialData .zarr: the spot file's count (a grid's is not known here)
        return {"n_spots": _spot_count(job.spots_path)} if job.spots_path is not None else {}
    with h5py.File(path, "r") as handle:
        return {"n_spots": int(handle["obsm"]["spatial"].shape[0])}


def _spot_count(spots_path: Path | None) -> int | None:
    """Spots in an .h5ad without reading its matrix (None for a grid, known only once laid)."""
    if spots_path is None:
        return None
    import h5py

    try:
        with h5py.File(spots_path, "r") as handle:
            return int(handle["obsm"]["spatial"].shape[0])
    except (OSError, KeyError):
        return None

"""Cohort throughput on Dask: slides/hour with 1 and 2 local workers, and the per-slide overhead.

Both runs predict the same synthetic HEST slides with the same tiny Stem model (efficientnet_lite0
embeddings, untrained weights: the work per spot is real, the numbers are not) on a LocalCluster
whose workers have already imported torch and loaded the model and encoder (that start-up is
printed apart: a cohort pays it once per worker, not per slide). The machine's cores are shared
out as ``stem-train predict --scheduler local:N`` does: N workers x (cores / N) torch threads.

The overhead line is the wall time per slide of a cohort of no-op slides (each writes a tiny
file): the Dask round trip, the state files and the output checksum, what every slide pays on top
of its own work.

    python bench/bench_cohort.py                                   # 8 slides x 40 spots
    python bench/bench_cohort.py --slides 2 --spots 2 --samples 2 --steps 1 --overhead-slides 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from napari_stem.values import PredictOptions


def make_cohort(workdir: Path, n_slides: int, n_spots: int) -> tuple[Path, Path]:
    """A HEST folder of ``n_slides`` synthetic slides cut to ``n_spots`` spots, and a tiny checkpoint."""
    import anndata
    import torch

    from napari_stem.embedding.patches import PatchSpec
    from napari_stem.stem.checkpoint import save_checkpoint
    from napari_stem.stem.model import StemConfig, StemModel
    from napari_stem.synthetic import make_demo_dataset

    hest = workdir / "hest"
    make_demo_dataset(hest, n_slides=n_slides, n_genes=30, seed=3, slide_size_um=1200.0)
    for path in sorted((hest / "st").glob("*.h5ad")):
        adata = anndata.read_h5ad(path)[:n_spots].copy()
        adata.write_h5ad(path)
    genes = list(anndata.read_h5ad(next((hest / "st").glob("*.h5ad")), backed="r").var_names[:20])
    torch.manual_seed(0)
    config = StemConfig(n_genes=len(genes), cond_dim=1280, hidden_size=64, depth=2, num_heads=4)
    checkpoint = save_checkpoint(
        workdir / "checkpoint",
        config=config,
        genes=genes,
        ema=StemModel(config),
        embedding={"encoder": "efficientnet_lite0", "dim": 1280, "patch": PatchSpec().to_dict()},
        provenance={"steps": 0, "data": "bench_cohort: untrained"},
    )
    return hest, checkpoint


def warm_worker(job: object, checkpoint: str, options: PredictOptions) -> None:
    """One slide outside the timing: imports, model and encoder into this worker's cache, first-call costs."""
    import contextlib
    import dataclasses
    import io

    from stem_train.predict import predict_slide

    job = dataclasses.replace(job, out_path=Path(job.out_path).parent.parent / f"warm_{os.getpid()}.h5ad")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        predict_slide(job, checkpoint, (100.0, 55.0, 0.5), options, None, None, False)


def noop_slide(path: str) -> dict:
    Path(path).write_text("done\n")
    return {"n_spots": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--spots", type=int, default=40, help="spots per slide")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--overhead-slides", type=int, default=40, help="no-op slides timed for the overhead line")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from stem_train.cohort import Scheduler, SlideTask, connect, local_cluster_size, run_cohort
    from stem_train.predict import plan_jobs, predict_cohort

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    hest, checkpoint = make_cohort(workdir, args.slides, args.spots)
    options = PredictOptions(n_samples=args.samples, steps=args.steps, device="cpu", precision="auto", intervals=None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{args.slides} slides x {args.spots} spots, {args.samples} samples x {args.steps} steps, "
        f"efficientnet_lite0 + 64-wide 2-block Stem, {cores} cores"
    )

    rates = {}
    for n_workers in (1, 2):
        start = time.perf_counter()
        with connect(Scheduler("local", n_workers), quiet=True) as (client, threads):
            client.wait_for_workers(n_workers)
            jobs = plan_jobs(hest, workdir / f"predictions_{n_workers}")
            client.run(warm_worker, jobs[0], str(checkpoint), options)
            ready = time.perf_counter() - start
            start = time.perf_counter()
            report = predict_cohort(
                jobs, checkpoint, client.scheduler.address, options=options, progress=False, quiet=True
            )
            seconds = time.perf_counter() - start
            assert report.exit_code == 0, report.table()
            if n_workers == 2:
                overhead_dask = _overhead(
                    client.scheduler.address, workdir / "noop_dask", args.overhead_slides, SlideTask, run_cohort
                )
        rates[n_workers] = args.slides / seconds * 3600
        spots = sum(o.result.get("n_spots", 0) for o in report.outcomes)
        print(
            f"  {n_workers} worker{'s' if n_workers > 1 else ' '} x {local_cluster_size(n_workers)[1]} torch threads: "
            f"{rates[n_workers]:8.0f} slides/hour  ({seconds:.1f} s, {spots / seconds:.1f} spots/s; "
            f"cluster start + first slide {ready:.1f} s, once)"
        )
    print(f"ratio slides/hour 2 workers / 1 worker: {rates[2] / rates[1]:.2f}×")
    print(
        f"max |mean, 2 workers - mean, 1 worker| = {_max_difference(workdir / 'predictions_1', workdir / 'predictions_2'):.2g} "
        "(1 vs 2 torch threads: rounding only)"
    )
    overhead_here = _overhead("none", workdir / "noop_here", args.overhead_slides, SlideTask, run_cohort)
    print(
        f"per-slide scheduling overhead: {overhead_dask * 1000:.1f} ms on Dask (2 workers), "
        f"{overhead_here * 1000:.1f} ms in process (state files + checksum only)"
    )
    print(f"work files in {workdir}")


def _max_difference(one: Path, two: Path) -> float:
    import anndata
    import numpy as np

    return max(
        float(np.abs(anndata.read_h5ad(path).X - anndata.read_h5ad(two / path.name).X).max())
        for path in sorted(one.glob("*.h5ad"))
    )


def _overhead(scheduler: str, folder: Path, n: int, SlideTask, run_cohort) -> float:
    """Seconds per slide of a cohort of no-op slides."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [
        SlideTask(
            f"noop{i:04d}", folder / f"noop{i:04d}.txt", noop_slide, {"path": str(folder / f"noop{i:04d}.txt")}, 1
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    report = run_cohort(tasks, scheduler, progress=False, quiet=True)
    assert report.exit_code == 0, report.table()
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()

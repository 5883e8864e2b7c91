"""Cohorts on a real Dask LocalCluster (2 worker processes, 1 thread each, CPU): the same numbers as
one process, a killed worker's slide redone, a corrupt slide failing alone, reruns that redo only
what is not done. Slides are cut to 6 spots and sampled 2 x 2 steps so the whole file stays short.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_stem.predict import DEFAULT_SAMPLER
from napari_stem.values import PredictOptions
from stem_train.cli import main
from stem_train.cohort import Scheduler, file_sha256, read_state, run_cohort, settings_fingerprint, state_path
from stem_train.predict import predict_cohort, recorded_options
from test_bad_input import few_spots
from tiny_models import save_tiny_checkpoint

SLIDES = ("SYN000", "SYN001", "SYN002", "SYN003")
#: The sampling settings of every run here (fp32: the same arithmetic on any CPU).
PREDICT_FLAGS = (
    "--samples",
    "2",
    "--steps",
    "2",
    "--device",
    "cpu",
    "--intervals",
    "",
    "--precision",
    "fp32",
    "--batch-size",
    "8",
)
OPTIONS = PredictOptions(n_samples=2, steps=2, device="cpu", precision="fp32", intervals=None, embed_batch_size=8)


def small_hest(source: Path, target: Path, n_spots: int = 6) -> Path:
    """A HEST folder with ``source``'s slides and metadata (linked) and its first ``n_spots`` spots."""
    for sub in ("wsis", "metadata"):
        (target / sub).mkdir(parents=True)
        for path in (source / sub).iterdir():
            (target / sub / path.name).symlink_to(path)
    (target / "st").mkdir()
    for path in (source / "st").glob("*.h5ad"):
        few_spots(path, target / "st" / path.name, n=n_spots)
    return target


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synthetic_hest: Path) -> dict[str, Path]:
    """Small HEST folder, tiny checkpoint and the single-process predictions (one torch thread, as the workers)."""
    import anndata
    import torch

    root = tmp_path_factory.mktemp("cohort")
    hest = small_hest(synthetic_hest, root / "hest")
    genes = list(anndata.read_h5ad(synthetic_hest / "st" / "SYN003.h5ad", backed="r").var_names[:5])
    checkpoint = save_tiny_checkpoint(root / "ckpt", genes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-equality needs the same thread count (reductions split differently)
    try:
        assert (
            main(["predict", str(hest), "--checkpoint", str(checkpoint), "--out", str(root / "single"), *PREDICT_FLAGS])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "hest": hest, "checkpoint": checkpoint, "single": root / "single"}


@pytest.fixture(scope="module")
def cluster() -> str:
    """A real LocalCluster of 2 worker processes; tests reach it by address (the existing-cluster path)."""
    from stem_train.cohort import connect

    previous = os.environ.get("NAPARI_STEM_TORCH_THREADS")
    os.environ["NAPARI_STEM_TORCH_THREADS"] = "1"  # inherited by the workers: the single-process run's thread count
    try:
        with connect(Scheduler.parse("local:2"), quiet=True) as (client, threads):
            assert threads == max(1, len(os.sched_getaffinity(0)) // 2)
            client.wait_for_workers(2)
            yield client.scheduler.address
    finally:
        if previous is None:
            os.environ.pop("NAPARI_STEM_TORCH_THREADS", None)
        else:
            os.environ["NAPARI_STEM_TORCH_THREADS"] = previous


def assert_same_predictions(out: Path, single: Path, names: tuple[str, ...] = SLIDES) -> None:
    import anndata

    for name in names:
        ours, theirs = anndata.read_h5ad(out / f"{name}.h5ad"), anndata.read_h5ad(single / f"{name}.h5ad")
        np.testing.assert_array_equal(ours.X, theirs.X)  # bit-equal means
        np.testing.assert_array_equal(ours.layers["variance"], theirs.layers["variance"])
        assert list(ours.obs_names) == list(theirs.obs_names)


def jobs_for(data: dict[str, Path], out: Path) -> list:
    from stem_train.predict import plan_jobs

    return plan_jobs(data["hest"], out)


# ---------------------------------------------------------------------- scheduler strings
def test_scheduler_strings_are_parsed_and_refused_at_parse_time(capsys: pytest.CaptureFixture) -> None:
    assert Scheduler.parse("none") == Scheduler("none") and not Scheduler.parse(None).distributed
    assert Scheduler.parse("local") == Scheduler("local") and Scheduler.parse("local:3").n_workers == 3
    assert Scheduler.parse("tcp://node7:8786").address == "tcp://node7:8786"
    for bad in ("local:0", "local:two", "node7:8786"):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "x.tif", "--checkpoint", "ckpt", "--scheduler", bad])
        assert exc.value.code == 2
        assert "--scheduler" in capsys.readouterr().err


def test_slides_done_before_predict_options_keep_their_settings_fingerprint() -> None:
    """State files written when the CLI passed its options as a dict stay valid: same settings, same fingerprint."""
    as_the_cli_passed_them = {
        "n_samples": 2,
        "steps": 2,
        "sampler": DEFAULT_SAMPLER,
        "eta": 0.0,
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "encoder_weights": None,
        "embed_batch_size": 8,
        "num_workers": 0,
        "sample_batch_size": None,
        "quantiles": None,
        "intervals": None,
        "keep_samples": False,
        "clip_x0": True,
    }
    assert recorded_options(OPTIONS, None) == as_the_cli_passed_them
    assert settings_fingerprint(recorded_options(OPTIONS, None)) == settings_fingerprint(as_the_cli_passed_them)
    median = PredictOptions(n_samples=19, quantiles=(0.5,), intervals=(0.5, 0.9))  # tuples fingerprint as lists did
    weights = Path("weights.pth")
    assert settings_fingerprint(recorded_options(median, weights)) == settings_fingerprint(
        {**recorded_options(median, None), "quantiles": [0.5], "intervals": [0.5, 0.9], "encoder_weights": weights}
    )


# ---------------------------------------------------------------------- same numbers, models once
def test_cohort_gives_the_single_process_numbers_and_loads_models_once_per_worker(data, cluster) -> None:
    out = data["root"] / "cohort"
    report = predict_cohort(
        jobs_for(data, out), data["checkpoint"], cluster, options=OPTIONS, progress=False, quiet=True
    )
    assert [o.state for o in report.outcomes] == ["done"] * 4 and report.exit_code == 0
    assert_same_predictions(out, data["single"])
    pids = {o.pid for o in report.outcomes}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers took slides; none ran here
    assert max(o.models_loaded for o in report.outcomes) <= 2  # one checkpoint + one encoder per worker process
    for name in SLIDES:
        state = read_state(out / f"{name}.h5ad")
        assert state.state == "done" and state.sha256 == file_sha256(out / f"{name}.h5ad") and state.host and state.pid
        assert state.result == {"n_spots": 6}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.h5ad" for n in SLIDES] + [f"{n}.h5ad.state.json" for n in SLIDES]
    )
    assert "4 done, 0 done earlier, 0 failed" in report.table()
    from distributed import Client

    from stem_train.cohort import PROGRESS_TOPIC

    with Client(cluster) as client:  # workers reported spots while slides ran (the live spots bar)
        reported = {message["slide"] for _, message in client.get_events(PROGRESS_TOPIC)}
    assert reported == set(SLIDES)

    again = predict_cohort(
        jobs_for(data, out), data["checkpoint"], cluster, options=OPTIONS, progress=False, quiet=True
    )
    assert [o.state for o in again.outcomes] == ["skipped"] * 4  # a rerun skips done slides
    assert all(read_state(out / f"{name}.h5ad").settings for name in SLIDES)


# ---------------------------------------------------------------------- failures and reruns
def test_a_corrupt_slide_fails_alone_and_only_it_is_retried(data, cluster, capsys) -> None:
    root = data["root"] / "corrupt"
    hest = small_hest(data["hest"], root / "hest")  # links to links: the same slides
    broken = hest / "wsis" / "SYN002.tif"
    real = broken.resolve()
    broken.unlink()
    broken.write_bytes(real.read_bytes()[:4096])  # a truncated download
    out = root / "predictions"
    args = [
        "predict",
        str(hest),
        "--checkpoint",
        str(data["checkpoint"]),
        "--out",
        str(out),
        *PREDICT_FLAGS,
        "--scheduler",
        cluster,
    ]

    assert main([*args, "--show-workers"]) == 2
    captured = capsys.readouterr()
    assert "1 of 4 slides failed (SYN002" in captured.err and "--retry-failed" in captured.err
    assert "3 done, 0 done earlier, 1 failed" in captured.out
    failed = read_state(out / "SYN002.h5ad")
    assert failed.state == "failed" and "SYN002.tif" in failed.error and not (out / "SYN002.h5ad").exists()
    assert_same_predictions(out, data["single"], ("SYN000", "SYN001", "SYN003"))
    started = {name: read_state(out / f"{name}.h5ad").started for name in SLIDES}

    assert main(args) == 2  # without --retry-failed: reported again, not run again
    assert "0 slides to run, 3 done earlier, 1 failed earlier" in capsys.readouterr().out
    assert read_state(out / "SYN002.h5ad").started == started["SYN002"]

    broken.unlink()
    broken.symlink_to(real)  # the slide is fixed
    assert main([*args, "--retry-failed"]) == 0
    assert "1 slides to run, 3 done earlier" in capsys.readouterr().out
    after = {name: read_state(out / f"{name}.h5ad") for name in SLIDES}
    assert all(after[name].started == started[name] for name in ("SYN000", "SYN001", "SYN003"))  # not rerun
    assert after["SYN002"].state == "done" and after["SYN002"].started != started["SYN002"]
    assert_same_predictions(out, data["single"])


def test_prepare_on_the_cluster_writes_the_single_process_embeddings(data, cluster, tmp_path) -> None:
    import h5py
    import torch

    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(read_genes(data["hest"])[:5]) + "\n")
    common = [
        str(data["hest"]),
        "--gene-list",
        str(genes),
        "--no-augment",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--batch-size",
        "8",
        "--held-out",
        "SYN003",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["prepare", *common, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["prepare", *common, "--out", str(tmp_path / "cohort"), "--scheduler", cluster]) == 0
    for name in SLIDES:
        with (
            h5py.File(tmp_path / "single" / "embeddings" / f"{name}.h5") as one,
            h5py.File(tmp_path / "cohort" / "embeddings" / f"{name}.h5") as many,
        ):
            np.testing.assert_array_equal(one["embeddings"][:], many["embeddings"][:])
        assert read_state(tmp_path / "cohort" / "embeddings" / f"{name}.h5").result == {
            "n_spots": 6,
            "embedding_dim": 1280,
        }
    assert (tmp_path / "cohort" / "manifest.json").read_text().count("SYN00") == (
        tmp_path / "single" / "manifest.json"
    ).read_text().count("SYN00")


def read_genes(hest: Path) -> list[str]:
    import anndata

    return list(anndata.read_h5ad(hest / "st" / "SYN000.h5ad", backed="r").var_names)


# ---------------------------------------------------------------------- in process, no Dask
def test_scheduler_none_runs_the_same_tasks_here_with_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stem_train.cohort import SlideTask

    def write(path: Path, fail: bool) -> dict:
        if fail:
            raise ValueError("broken on purpose")
        path.write_text("ok")
        return {"n_spots": 1}

    tasks = [
        SlideTask(f"s{i}", tmp_path / f"s{i}.txt", write, {"path": tmp_path / f"s{i}.txt", "fail": i == 1}, n_spots=1)
        for i in range(3)
    ]
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("NAPARI_STEM_TORCH_THREADS", str(threads + 1))  # for workers only
    report = run_cohort(tasks, "none", progress=False, quiet=True)
    assert [o.state for o in report.outcomes] == ["done", "failed", "done"] and report.exit_code == 1
    assert torch.get_num_threads() == threads  # in process, the process's own thread count stands
    assert {o.pid for o in report.outcomes} == {os.getpid()}
    assert "ValueError: broken on purpose" in read_state(tmp_path / "s1.txt").error
    assert state_path(tmp_path / "s1.txt").name == "s1.txt.state.json"
    tasks[1].kwargs["fail"] = False
    retried = run_cohort(tasks, "none", retry_failed=True, progress=False, quiet=True)
    assert [o.state for o in retried.outcomes] == ["skipped", "done", "skipped"] and retried.exit_code == 0
    from types import SimpleNamespace

    from distributed.scheduler import KilledWorker

    from stem_train.cohort import _lost

    lost = _lost(
        tasks[0], KilledWorker("stem-slide-s0-x", SimpleNamespace(address="tcp://10.0.0.7:4000"), 3)
    )  # Dask gave up
    assert lost.state == "failed" and "worker lost" in read_state(tmp_path / "s0.txt").error
    for task in tasks:
        task.settings = "other settings"  # e.g. another checkpoint or seed: done with the old ones is not done
    assert [o.state for o in run_cohort(tasks, "none", progress=False, quiet=True).outcomes] == ["done"] * 3


# ---------------------------------------------------------------------- worker loss (last: a worker restarts)
def test_a_killed_worker_s_slide_is_redone_and_the_cohort_completes(data, cluster) -> None:
    out = data["root"] / "killed"
    jobs = jobs_for(data, out)[:3]
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            report=predict_cohort(jobs, data["checkpoint"], cluster, options=OPTIONS, progress=False, quiet=True)
        )
    )
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        for job in jobs:
            state = read_state(job.out_path)
            if state is not None and state.state == "running":
                try:
                    os.kill(state.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # killed already on an earlier pass
                time.sleep(0.2)
                after = read_state(job.out_path)  # still "running" by that pid: it died mid-slide
                if after.state == "running" and after.pid == state.pid:
                    killed = state
                    break
        time.sleep(0.02)
    thread.join(timeout=240)
    assert killed is not None and not thread.is_alive()
    report = result["report"]
    assert [o.state for o in report.outcomes] == ["done"] * 3, report.table()
    redone = report.outcomes[[job.name for job in jobs].index(killed.slide)]
    assert redone.attempt == 2 and redone.pid != killed.pid  # Dask ran it again in a live worker
    assert_same_predictions(out, data["single"], SLIDES[:3])  # nothing partial under a final name, the same numbers
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(f".{killed.pid}." in name for name in leftovers), (
        leftovers
    )  # only the killed process's, removed by the next writer

"""Cohorts on Dask distributed: one task per slide, resumable from per-slide state files.

``torchrun`` shards slides statically (rank r takes slides r, r + W, ...): a dead rank loses its
share, a slow slide holds its rank and no worker can join later. Here each slide is one Dask task
(a :class:`SlideTask` the command builds: ``predict.predict_slide``, ``prepare.embed_slide_task``)
that runs the single-process per-slide code (``predict.predict_job``, ``prepare.embed_slide``), so
the numbers do not depend on the scheduler; Dask gives a lost worker's slide to another worker;
and each slide's fate is written next to its output (``<output>.state.json``: pending, running
with host/pid/start, done with the output's checksum, failed with the error), so a rerun skips
finished slides and retries failed ones when asked (``--retry-failed``). Outputs are written
atomically by the per-slide code, so a killed worker never leaves a partial file under a final
name. Each worker process loads the model and the encoder once for all its slides
(:mod:`stem_train.worker_models`). What a slide's task does is its command's business: this module
imports neither command.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from napari_stem.atomic import write_text_atomically
from napari_stem.errors import StemError
from napari_stem.validate import InputError, argument_type
from stem_train.worker_models import models_loaded

STATE_SUFFIX = ".state.json"
#: Slides' states; "skipped" is not written, it is a report of a slide done by an earlier run.
STATES = ("pending", "running", "done", "failed")


class CohortError(StemError):
    """Some slides of a cohort failed (the others are done and kept)."""


# ---------------------------------------------------------------------- where the work runs
@dataclass(frozen=True)
class Scheduler:
    """``none`` (this process), ``local[:N]`` (a Dask LocalCluster) or ``tcp://HOST:PORT`` (a running one)."""

    kind: str  # "none" | "local" | "address"
    n_workers: int | None = None
    address: str | None = None

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    @classmethod
    def parse(cls, text: str | Scheduler | None) -> Scheduler:
        if isinstance(text, Scheduler):
            return text
        text = (text or "none").strip()
        if text == "none":
            return cls("none")
        if text == "local" or text.startswith("local:"):
            count = text.partition(":")[2]
            if count and not (count.isdigit() and int(count) >= 1):
                raise InputError(f"--scheduler {text!r}: local:N needs a whole number of workers N >= 1.")
            return cls("local", int(count) if count else None)
        if "://" in text and text.partition("://")[2]:
            return cls("address", address=text)
        raise InputError(
            f"--scheduler {text!r}: give none, local, local:N or a scheduler address such as tcp://HOST:8786."
        )

    def __str__(self) -> str:
        if self.kind == "local":
            return f"local:{self.n_workers}" if self.n_workers else "local"
        return self.address if self.kind == "address" else "none"


SCHEDULER = argument_type(str, Scheduler.parse)
SCHEDULER_HELP = (
    "where slides run: none (this process, default), local[:N] (a Dask cluster on this machine: N worker processes, "
    "by default one per GPU, else one per 4 cores) or tcp://HOST:8786 (a running Dask scheduler, e.g. dask-jobqueue on "
    "SLURM). One task per slide, the single-process code path; per-slide state in <output>.state.json, a rerun skips "
    "done slides"
)


def add_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """``--scheduler`` and ``--retry-failed``, shared by ``predict`` and ``prepare``."""
    parser.add_argument(
        "--scheduler",
        type=SCHEDULER,
        default=Scheduler("none"),
        metavar="none|local[:N]|tcp://HOST:PORT",
        help=SCHEDULER_HELP,
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --scheduler: run again the slides an earlier run recorded as failed (default: report them, skip them)",
    )
    parser.add_argument(
        "--show-workers", action="store_true", help="with --scheduler: a line per Dask worker showing the slide it runs"
    )


def local_cluster_size(n_workers: int | None) -> tuple[int, int, bool]:
    """(workers, torch threads per worker, one GPU each) for ``local[:N]`` on this machine."""
    cores = _usable_cores()
    gpus = _cuda_device_count()
    if n_workers is None:
        n_workers = gpus or max(1, cores // 4)
    return n_workers, max(1, cores // n_workers), bool(gpus)


def _usable_cores() -> int:
    """Cores this process may run on (a SLURM job's allocation, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable CUDA is simply no GPU
        return 0


@contextlib.contextmanager
def connect(scheduler: Scheduler, *, quiet: bool = False) -> Iterator[tuple[Any, int | None]]:
    """(Dask client, torch threads per task or None) for the scheduler; the local cluster closes on exit."""
    from distributed import Client, LocalCluster

    say = (lambda *_: None) if quiet else print
    if scheduler.kind == "address":
        with Client(scheduler.address, timeout="30s") as client:
            n = len(client.nthreads())
            say(f"cohort: scheduler {scheduler.address}, {n} workers now; dashboard {client.dashboard_link}")
            yield client, None
        return
    n_workers, threads, gpus = local_cluster_size(scheduler.n_workers)
    dashboard = ":0" if _has_bokeh() else None
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=dashboard,
        resources={"GPU": 1} if gpus else None,
        silence_logs=40,
    )
    try:
        with Client(cluster) as client:
            where = client.dashboard_link if dashboard else "none (pip install 'bokeh>=3.1' for one)"
            say(
                f"cohort: local cluster, {n_workers} workers x {threads} torch threads{' x 1 GPU' if gpus else ''}; "
                f"scheduler {cluster.scheduler_address}; dashboard {where}"
            )
            yield client, threads
    finally:
        cluster.close()


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------- per-slide state
@dataclass
class SlideState:
    """What ``<output>.state.json`` says about one slide."""

    slide: str
    state: str
    output: str
    attempt: int = 0
    host: str = ""
    pid: int = 0
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    sha256: str = ""
    size: int = 0
    error: str = ""
    result: dict = field(default_factory=dict)
    settings: str = ""  # fingerprint of what the slide was run with (SlideTask.settings)

    def finished_output_intact(self) -> bool:
        """Done, and the output still there at the recorded size (a full checksum per rerun costs too much)."""
        path = Path(self.output)
        return self.state == "done" and path.exists() and output_size(path) == self.size


def state_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + STATE_SUFFIX)


def read_state(output: str | Path) -> SlideState | None:
    """The recorded state, or None when there is none (or it is unreadable: the slide is redone)."""
    try:
        data = json.loads(state_path(output).read_text(encoding="utf-8"))
        state = SlideState(**{key: data[key] for key in SlideState.__dataclass_fields__ if key in data})
    except (OSError, ValueError, TypeError):
        return None
    return state if state.state in STATES else None


def write_state(output: str | Path, state: SlideState) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(state_path(output), json.dumps(asdict(state), indent=1) + "\n")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (a SpatialData .zarr) with their relative names."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def output_size(path: str | Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------- tasks and their outcomes
@dataclass
class SlideTask:
    """One slide's work: ``function(**kwargs)`` writes ``output`` and returns a dict (``n_spots`` at least).

    ``settings`` fingerprints what decides the output (checkpoint, options, spots...): a slide done
    with other settings is not "done" for this run, it is run again.
    """

    name: str
    output: Path
    function: Callable[..., dict]
    kwargs: dict
    n_spots: int | None = None  # known in advance (spot files) or not (grids)
    settings: str = ""


def settings_fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able settings (paths and other objects by their str)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SlideOutcome:
    """How one slide ended in this run, for the progress bars and the summary table."""

    name: str
    state: str  # "done", "failed" or "skipped" (done by an earlier run)
    seconds: float = 0.0
    attempt: int = 0
    host: str = ""
    pid: int = 0
    error: str = ""
    result: dict = field(default_factory=dict)
    models_loaded: int = 0  # models this worker process has loaded so far (1 checkpoint + 1 encoder at most)
    log: str = ""
    earlier: bool = False  # failed in an earlier run and not retried


@dataclass
class CohortReport:
    """Every slide's outcome, in the cohort's order."""

    outcomes: list[SlideOutcome]

    @property
    def failed(self) -> list[SlideOutcome]:
        return [outcome for outcome in self.outcomes if outcome.state == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def table(self) -> str:
        rows = [("slide", "state", "seconds", "attempts", "where", "detail")]
        for o in self.outcomes:
            detail = (
                o.error if o.state == "failed" else (f"{o.result['n_spots']} spots" if "n_spots" in o.result else "")
            )
            if o.earlier:
                detail = f"(earlier run; --retry-failed retries it) {detail}"
            where = f"{o.host}:{o.pid}" if o.host else ""
            state = "done (earlier)" if o.state == "skipped" else o.state
            rows.append((o.name, state, f"{o.seconds:.1f}" if o.seconds else "", str(o.attempt or ""), where, detail))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)) + "  " + row[5]
            for row in rows
        ]
        counts = {state: sum(o.state == state for o in self.outcomes) for state in ("done", "skipped", "failed")}
        lines.append(
            f"{counts['done']} done, {counts['skipped']} done earlier, {counts['failed']} failed, of {len(self.outcomes)} slides"
        )
        return "\n".join(lines)

    def raise_if_failed(self, what: str) -> None:
        if self.failed:
            names = ", ".join(o.name for o in self.failed[:5]) + (", ..." if len(self.failed) > 5 else "")
            raise CohortError(
                f"{len(self.failed)} of {len(self.outcomes)} slides failed ({names}; reasons in the table above "
                f"and in their .state.json files); {what}. Fix them and rerun with --retry-failed: done slides are kept."
            )


def run_task(task: SlideTask, torch_threads: int | None = None, run_id: str = "") -> SlideOutcome:
    """Run one slide where this is called (a worker or this process), recording its state.

    An ordinary error is recorded as ``failed`` and returned, not raised: retrying a corrupt slide
    elsewhere would fail again. Only the death of the process makes Dask run the slide again.
    """
    previous = read_state(task.output)
    attempt = (previous.attempt if previous and previous.state == "running" else 0) + 1
    state = SlideState(
        task.name,
        "running",
        str(task.output),
        attempt=attempt,
        host=socket.gethostname(),
        pid=os.getpid(),
        started=_now(),
        settings=task.settings,
    )
    write_state(task.output, state)
    _set_torch_threads(torch_threads)
    _current.slide, _current.run_id, _current.last_report = task.name, run_id, 0.0
    start = time.perf_counter()
    printed = io.StringIO()
    try:
        # The per-slide code's own progress bars (stderr) would interleave across workers: the
        # cohort's bars replace them; what it prints (grid sizes, dropped spots) comes back.
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            result = dict(task.function(**task.kwargs) or {})
        state.sha256, state.size = file_sha256(task.output), output_size(task.output)
        state.state, state.result = "done", result
    except Exception as exc:  # one slide's failure is recorded; the others go on
        state.state, state.error = "failed", describe_error(exc)
    state.seconds, state.finished = round(time.perf_counter() - start, 3), _now()
    write_state(task.output, state)
    return SlideOutcome(
        task.name,
        state.state,
        state.seconds,
        attempt,
        state.host,
        state.pid,
        state.error,
        state.result,
        models_loaded=models_loaded(),
        log=printed.getvalue(),
    )


#: Dask event topic of live spot counts (worker log_event → client subscribe_topic).
PROGRESS_TOPIC = "napari-stem-cohort-spots"
_current = threading.local()


def report_spots(done: int, every_s: float = 0.5) -> None:
    """Tell the client how many spots of the running slide are done (on a Dask worker; at most every 0.5 s)."""
    now = time.monotonic()
    if not getattr(_current, "run_id", "") or now - _current.last_report < every_s:
        return
    _current.last_report = now
    try:
        from distributed import get_worker

        get_worker().log_event(PROGRESS_TOPIC, {"run": _current.run_id, "slide": _current.slide, "done": int(done)})
    except (ImportError, ValueError):
        pass


def describe_error(exc: BaseException) -> str:
    """The project's own errors are already one clear line; others keep their type and last frame."""
    if isinstance(exc, StemError):
        return str(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(frame[0].filename).name}:{frame[0].lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _set_torch_threads(threads: int | None) -> None:
    """Torch threads for a task on a Dask worker: NAPARI_STEM_TORCH_THREADS there, else the client's
    choice, else the worker's cores over its task slots (Dask's nanny starts workers with
    OMP_NUM_THREADS=1). In this process (``none``) the process's own setting stands."""
    try:
        from distributed import get_worker

        slots = get_worker().state.nthreads
    except (ImportError, ValueError):
        return
    threads = int(os.environ.get("NAPARI_STEM_TORCH_THREADS", 0)) or threads or max(1, _usable_cores() // max(1, slots))
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- the cohort
def run_cohort(
    tasks: Sequence[SlideTask],
    scheduler: Scheduler | str,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    quiet: bool = False,
    show_workers: bool = False,
) -> CohortReport:
    """Run every slide not done yet, on ``scheduler``; see the module docstring.

    ``none`` runs the same tasks one after the other in this process (with state files too).
    ``show_workers`` adds a line per Dask worker under the bars: the slide it is running.
    """
    scheduler = Scheduler.parse(scheduler)
    say = (lambda *_: None) if quiet else print
    names = [task.name for task in tasks]
    if len(set(names)) != len(names) or len({str(task.output) for task in tasks}) != len(tasks):
        raise InputError("the cohort names a slide or an output twice; every slide needs its own output.")
    outcomes: dict[str, SlideOutcome] = {}
    todo: list[SlideTask] = []
    for task in tasks:
        previous = read_state(task.output)
        if previous is not None and previous.settings != task.settings:
            previous = None  # done or failed with other settings: this run's slide is a new one
        if previous is not None and previous.finished_output_intact():
            outcomes[task.name] = SlideOutcome(
                task.name,
                "skipped",
                previous.seconds,
                previous.attempt,
                previous.host,
                previous.pid,
                result=previous.result,
            )
        elif previous is not None and previous.state == "failed" and not retry_failed:
            outcomes[task.name] = SlideOutcome(
                task.name,
                "failed",
                previous.seconds,
                previous.attempt,
                previous.host,
                previous.pid,
                previous.error,
                earlier=True,
            )
        else:
            write_state(task.output, SlideState(task.name, "pending", str(task.output), settings=task.settings))
            todo.append(task)
    say(
        f"cohort: {len(todo)} slides to run, {sum(o.state == 'skipped' for o in outcomes.values())} done earlier, "
        f"{sum(o.earlier for o in outcomes.values())} failed earlier{' (not retried: --retry-failed)' if any(o.earlier for o in outcomes.values()) else ''}"
    )

    with (
        connect(scheduler, quiet=quiet) if todo and scheduler.distributed else contextlib.nullcontext((None, None)) as (
            client,
            threads,
        )
    ):
        run_id = uuid.uuid4().hex[:8]
        bars = CohortProgress(todo, run_id, enabled=progress)

        def finished(outcome: SlideOutcome) -> None:
            outcomes[outcome.name] = outcome
            bars.finished(outcome, sum(o.state == "failed" and not o.earlier for o in outcomes.values()))

        try:
            if client is not None:
                _run_on_dask(
                    client,
                    todo,
                    threads,
                    finished,
                    show_workers and progress,
                    run_id,
                    bars.on_spots if progress else None,
                )
            else:
                for task in todo:
                    finished(run_task(task))
        finally:
            bars.close()
    return CohortReport([outcomes[name] for name in names])


class CohortProgress:
    """The cohort's two bars: slides, and spots (live while slides run, from the workers' reports)."""

    def __init__(self, todo: Sequence[SlideTask], run_id: str, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        known = [task.n_spots for task in todo]
        self.run_id = run_id
        self.slides = tqdm(total=len(todo), desc="cohort slides", unit="slide", disable=not enabled or not todo)
        self.spots = tqdm(
            total=sum(known) if None not in known else None,
            desc="cohort spots",
            unit="spot",
            disable=not enabled or not todo,
        )
        self.running: dict[str, int] = {}  # spots done so far in slides still running
        self.finished_names: set[str] = set()
        self.finished_spots = 0
        self.lock = threading.Lock()  # Dask calls on_spots on the client's own thread

    def on_spots(self, event: Any) -> None:
        """Dask event handler: ``{"run", "slide", "done"}`` from :func:`report_spots`."""
        message = event[1] if isinstance(event, tuple) else event
        if message.get("run") != self.run_id:
            return
        with self.lock:
            if message.get("slide") not in self.finished_names:  # a late report of a finished slide is dropped
                self.running[message["slide"]] = int(message.get("done", 0))
                self._show_spots()

    def finished(self, outcome: SlideOutcome, failed: int) -> None:
        for line in outcome.log.splitlines():
            if line.strip():
                self.slides.write(f"[{outcome.name}] {line.strip()}")
        if outcome.state == "failed":
            self.slides.write(f"[{outcome.name}] failed: {outcome.error}")
        with self.lock:
            self.finished_names.add(outcome.name)
            self.running.pop(outcome.name, None)
            self.finished_spots += int(outcome.result.get("n_spots", 0))
            self._show_spots()
        self.slides.update(1)
        self.slides.set_postfix_str(f"{failed} failed")

    def _show_spots(self) -> None:
        shown = self.finished_spots + sum(self.running.values())
        if shown > self.spots.n:  # a slide redone after a worker loss never moves the bar back
            self.spots.update(shown - self.spots.n)

    def close(self) -> None:
        self.slides.close()
        self.spots.close()


def _run_on_dask(
    client: Any,
    todo: Sequence[SlideTask],
    torch_threads: int | None,
    finished: Callable[[SlideOutcome], None],
    show_workers: bool,
    run_id: str,
    on_spots: Callable[[Any], None] | None,
) -> None:
    from distributed import as_completed

    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    resources = {"GPU": 1} if workers and all("GPU" in worker.get("resources", {}) for worker in workers) else None
    if on_spots is not None:
        client.subscribe_topic(PROGRESS_TOPIC, on_spots)
    futures = {}
    for task in todo:  # one task per slide, in the cohort's order; pure=False: never deduplicated
        future = client.submit(
            run_task,
            task,
            torch_threads,
            run_id,
            key=f"stem-slide-{task.name}-{run_id}",
            pure=False,
            resources=resources,
            retries=0,
        )
        futures[future] = task
    lines = WorkerLines(client, run_id) if show_workers else None
    pending = as_completed(futures)
    try:
        while not pending.is_empty():
            # Poll (not block) so the worker lines stay current while long slides run.
            for future in pending.next_batch(block=lines is None):
                task = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # KilledWorker (the slide killed its workers), lost scheduler, ...
                    outcome = _lost(task, exc)
                finished(outcome)
            if lines is not None:
                lines.refresh()
                time.sleep(0.5)
    finally:
        if lines is not None:
            lines.close()
        if on_spots is not None:
            client.unsubscribe_topic(PROGRESS_TOPIC)


class WorkerLines:
    """One progress line per Dask worker: the slide it runs now (``--show-workers``)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.suffix, self.bars = client, f"-{run_id}", {}

    def refresh(self) -> None:
        from tqdm.auto import tqdm

        try:
            processing = self.client.processing()
        except Exception:  # a display must never stop the cohort
            return
        prefix = "stem-slide-"
        for worker in sorted(set(processing) | set(self.bars)):
            keys = [str(key) for key in processing.get(worker, ())]
            slides = [
                key[len(prefix) : -len(self.suffix)]
                for key in keys
                if key.startswith(prefix) and key.endswith(self.suffix)
            ]
            if worker not in self.bars:
                self.bars[worker] = tqdm(total=0, bar_format="{desc}", position=2 + len(self.bars), leave=False)
            self.bars[worker].set_description_str(f"  {worker}: {', '.join(slides) or 'idle'}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _lost(task: SlideTask, exc: BaseException) -> SlideOutcome:
    """A slide Dask gave up on (its workers died, repeatedly): recorded as failed by the client."""
    previous = read_state(task.output) or SlideState(task.name, "running", str(task.output))
    name = type(exc).__name__
    why = (
        f"worker lost while running it {previous.attempt} times (killed, out of memory?): {exc}"
        if name == "KilledWorker"
        else f"{name}: {exc}"
    )
    state = SlideState(
        task.name,
        "failed",
        str(task.output),
        previous.attempt,
        previous.host,
        previous.pid,
        previous.started,
        _now(),
        error=why,
        settings=task.settings,
    )
    try:
        write_state(task.output, state)
    except OSError as write_error:  # the folder itself is the problem: say so in the report
        why = f"{why}; its state file could not be written either ({write_error})"
    return SlideOutcome(task.name, "failed", 0.0, previous.attempt, previous.host, previous.pid, why)


# ---------------------------------------------------------------------- which device a worker uses
def worker_device(requested: str) -> str:
    """``auto``/``cuda`` → this worker's GPU (local cluster workers are named 0..N-1), else the CPU."""
    if requested not in ("auto", "cuda"):
        return requested
    count = _cuda_device_count()
    if not count:
        return "cpu" if requested == "auto" else requested
    try:
        from distributed import get_worker

        index = int(get_worker().name) % count
    except (ImportError, ValueError, TypeError):
        index = 0  # a worker started with one GPU visible (dask-cuda, jobqueue)
    return f"cuda:{index}"


# ---------------------------------------------------------------------- helpers for the commands' cohorts
def file_identity(path: str | Path) -> tuple[int, int]:
    """(size, mtime) of an input, for a task's settings: a replaced slide or spot file makes its slide run again."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def refuse_under_torchrun(scheduler: Scheduler) -> None:
    """Dask and torchrun both deal slides out: refuse both at once rather than run every slide W times."""
    if scheduler.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(
            f"--scheduler {scheduler} under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): run one "
            "stem-train process and let Dask spread the slides, or use torchrun without --scheduler."
        )

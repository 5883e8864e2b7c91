"""Checks every entry point runs before any heavy work: argument ranges, memory, output paths.

``stem-train`` (through :func:`argument_type`), the widget's controller and the readers call
these so a mistake is refused in well under a second, with a message that names the value, the
file and the fix, instead of surfacing as a traceback, an OOM kill or a destroyed file after
minutes of embedding and sampling. Torch-free, so the checks never wait on a model import.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from napari_stem.errors import StemError, describe_path
from napari_stem.stem.model_config import N_TRAIN_STEPS

if TYPE_CHECKING:
    from napari_stem.values import GridSpec

T = TypeVar("T")

#: A sampler keeps 1..N_TRAIN_STEPS of the steps of the diffusion chain the model was trained on.
MAX_DIFFUSION_STEPS = N_TRAIN_STEPS
#: µm per pixel a real scan can have: 0.05 (beyond any optical scanner) to 20 (a 0.5× overview).
MPP_RANGE_UM = (0.05, 20.0)
#: Share of the machine's available memory one request may plan to use.
MEMORY_SHARE = 0.5
#: Bytes a grid spot costs while the grid is laid out (coordinates, row/col, barcode, tissue fraction).
GRID_BYTES_PER_SPOT = 400


class InputError(StemError):
    """An argument or output path is refused before any work starts."""


# ---------------------------------------------------------------------- numbers
def check_int(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> int:
    """``value`` as an int in ``[low, high]``, else an :class:`InputError` naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not low <= value <= (high if high is not None else value)
    ):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InputError(f"{name} must be a whole number {bounds}{why}, got {value!r}.")
    return int(value)


def check_float(
    name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False, why: str = ""
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    above = number > low if low_open else number >= low
    if not (math.isfinite(number) and above and number <= high):
        lower = f"greater than {low:g}" if low_open else f"at least {low:g}"
        upper = f" and at most {high:g}" if math.isfinite(high) else ""
        raise InputError(f"{name} must be a finite number {lower}{upper}{why}, got {value!r}.")
    return number


def check_samples(n_samples: Any, name: str = "samples") -> int:
    """Samples per spot: two at least, since the uncertainty (sample variance) needs two."""
    return check_int(name, n_samples, 2, why=" (the variance that shows the uncertainty needs two samples)")


def check_steps(steps: Any, name: str = "steps", sampler: str = "ancestral") -> int:
    """Steps kept of the trained chain; the few-step solvers stop before evaluating t = 0, so at most 999."""
    steps = check_int(name, steps, 1, MAX_DIFFUSION_STEPS, why=" (steps kept of the 1000 the model was trained on)")
    if sampler not in ("ancestral", "ddim") and steps >= MAX_DIFFUSION_STEPS:
        raise InputError(
            f"{name}: the {sampler} sampler stops at t = 0 without evaluating there, so it takes at most "
            f"{MAX_DIFFUSION_STEPS - 1} steps, not {steps} (the full chain is the ancestral sampler at "
            f"{MAX_DIFFUSION_STEPS} steps)."
        )
    return steps


def check_batch_size(name: str, value: Any) -> int | None:
    """A batch size (``None`` = the device's default)."""
    return None if value is None else check_int(name, value, 1)


def check_learning_rate(lr: Any, name: str = "learning rate") -> float:
    return check_float(name, lr, 0.0, 10.0, low_open=True)


def check_mpp(mpp: Any, name: str = "pixel size (µm/px)") -> float:
    low, high = MPP_RANGE_UM
    return check_float(name, mpp, low, high, why=" (e.g. 0.25 for a 40× scan, 0.5 for 20×)")


def mpp_in_range(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and MPP_RANGE_UM[0] <= mpp <= MPP_RANGE_UM[1]


def check_grid(grid: GridSpec) -> GridSpec:
    """A :class:`~napari_stem.values.GridSpec` with 0 < spot diameter ≤ pitch (spots may touch, not
    overlap) and a tissue fraction in [0, 1]; returned with plain floats."""
    diameter = check_float("grid spot diameter (µm)", grid.spot_diameter_um, 0.0, low_open=True)
    pitch = check_float("grid pitch (µm)", grid.pitch_um, diameter, why=" (the spot diameter: spots may not overlap)")
    fraction = check_float("minimum tissue fraction", grid.min_tissue_fraction, 0.0, 1.0)
    return dataclasses.replace(grid, pitch_um=pitch, spot_diameter_um=diameter, min_tissue_fraction=fraction)


def argument_type(parse: Callable[[str], T], check: Callable[[T], Any] | None = None) -> Callable[[str], T]:
    """An argparse ``type=`` that parses and checks, so ``stem-train`` refuses at parse time."""

    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a valid {parse.__name__}: {text!r}") from exc
        if check is not None:
            try:
                checked = check(value)
            except InputError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc
            value = value if checked is None else checked
        return value

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


#: argparse types of the options every subcommand shares.
SAMPLES = argument_type(int, check_samples)
STEPS = argument_type(int, check_steps)
BATCH_SIZE = argument_type(int, lambda value: check_int("the batch size", value, 1))
NON_NEGATIVE_INT = argument_type(int, lambda value: check_int("the value", value, 0))
POSITIVE_INT = argument_type(int, lambda value: check_int("the value", value, 1))
POSITIVE_FLOAT = argument_type(float, lambda value: check_float("the value", value, 0.0, low_open=True))
NON_NEGATIVE_FLOAT = argument_type(float, lambda value: check_float("the value", value, 0.0))
FRACTION = argument_type(float, lambda value: check_float("the value", value, 0.0, 1.0))
AUGMENTATION_RATIO = argument_type(int, lambda value: check_int("the augmented views per spot", value, 0, 7))
MPP = argument_type(float, check_mpp)
LEARNING_RATE = argument_type(float, check_learning_rate)


# ---------------------------------------------------------------------- memory
def available_memory_bytes() -> int:
    """Memory the kernel could give this process now (MemAvailable), or physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux/macOS
        return 1 << 62


def check_memory(n_bytes: float, what: str, fix: str) -> None:
    """Refuse a plan needing more than :data:`MEMORY_SHARE` of the available memory."""
    budget = available_memory_bytes() * MEMORY_SHARE
    if n_bytes > budget:
        raise InputError(
            f"{what} would need about {_size(n_bytes)} of memory; this machine has {_size(budget / MEMORY_SHARE)} "
            f"available. {fix}"
        )


def estimated_grid_spots(width_um: float, height_um: float, pitch_um: float) -> int:
    """Spots a hexagonal grid of ``pitch_um`` puts on a ``width_um`` × ``height_um`` slide."""
    columns = width_um / pitch_um + 1
    rows = height_um / (pitch_um * math.sqrt(3) / 2) + 1
    return int(math.ceil(columns * rows))


def check_grid_size(width_um: float, height_um: float, pitch_um: float, where: str) -> int:
    n_spots = estimated_grid_spots(width_um, height_um, pitch_um)
    check_memory(
        n_spots * GRID_BYTES_PER_SPOT,
        f"a {pitch_um:g} µm grid over {where} ({width_um / 1000:.4g} × {height_um / 1000:.4g} mm, ~{n_spots:,} spots)",
        "Use a larger grid pitch (Visium: 100 µm), or check the slide's pixel size (µm/px).",
    )
    return n_spots


# ---------------------------------------------------------------------- spots
def check_spots(
    spots: Any, slide_shape_px: tuple[int, int] | None, source: str, drop_outside: bool = False
) -> tuple[Any, int]:
    """``(spots, n_dropped)``: spots a prediction can use — some, unique barcodes, finite centres
    on the slide. With ``drop_outside`` spots centred off the slide are dropped, not refused."""
    if len(spots) == 0:
        raise InputError(f"{source} holds no spots; there is nothing to predict.")
    check_unique_barcodes(spots.barcodes, source)
    centers = np.asarray(spots.centers_px, dtype=np.float64)
    if not np.isfinite(centers).all():
        raise InputError(
            f"{source} has {int((~np.isfinite(centers).all(axis=1)).sum())} spots without finite coordinates."
        )
    if slide_shape_px is None:
        return spots, 0
    height, width = slide_shape_px
    inside = (centers[:, 0] >= 0) & (centers[:, 0] < width) & (centers[:, 1] >= 0) & (centers[:, 1] < height)
    n_outside = int((~inside).sum())
    if n_outside == 0:
        return spots, 0
    if not drop_outside or n_outside == len(spots):
        extent = f"x {centers[:, 0].min():.0f}..{centers[:, 0].max():.0f}, y {centers[:, 1].min():.0f}..{centers[:, 1].max():.0f}"
        raise InputError(
            f"{n_outside} of {len(spots)} spots of {source} lie off the slide ({width} × {height} px; spots span {extent} px): "
            "they would be predicted from blank patches. Check that the spots belong to this slide and are in "
            "full-resolution pixels"
            + (", or drop them with --drop-off-slide-spots." if n_outside < len(spots) else ".")
        )
    return spots.subset(inside), n_outside


def check_unique_barcodes(barcodes: Any, source: str) -> None:
    """Every spot needs its own barcode: rows are matched to truths and caches by it."""
    barcodes = np.asarray(barcodes).astype(str)
    unique, counts = np.unique(barcodes, return_counts=True)
    if len(unique) != len(barcodes):
        repeated = unique[counts > 1]
        raise InputError(
            f"{source} has {len(barcodes) - len(unique)} duplicated spot barcodes (e.g. "
            f"{', '.join(repeated[:3])}); every spot needs its own barcode."
        )


def check_finite_counts(matrix: Any, source: str) -> None:
    """Refuse expression counts holding NaN or infinity (they would be read as numbers)."""
    data = matrix.data if hasattr(matrix, "tocsr") else np.asarray(matrix)
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(
            f"{source} holds {bad} non-finite expression values (NaN or infinity); fix or drop those "
            "spots/genes before using it as truth or training data."
        )


# ---------------------------------------------------------------------- paths
def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_an_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is (or resolves to) one of the run's inputs."""
    for source in inputs:
        if source is not None and (same_file(out, source) or Path(out).resolve() == Path(source).resolve()):
            raise InputError(
                f"{flag} {describe_path(out)} is an input of this run ({describe_path(source)}); writing there "
                "would destroy it. Choose another output path."
            )


def is_napari_stem_h5ad(path: str | Path, *also: str) -> bool:
    """Whether ``path`` is an ``.h5ad`` napari-stem wrote (it carries ``uns['napari_stem']``), and
    holds the HDF5 keys ``also`` (e.g. ``"layers/variance"``); reads keys only, never the data."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return all(key in handle for key in ("uns/napari_stem", *also))
    except (OSError, ValueError):
        return False


#: A SpatialData prediction is a ``.zarr`` folder whose table of this name carries napari-stem's provenance.
ZARR_SUFFIX = ".zarr"
SPATIALDATA_TABLE = "table"


def is_spatialdata_prediction(path: str | Path) -> bool:
    """Cheap check (folder layout only): a SpatialData zarr whose table carries napari-stem's provenance."""
    path = Path(path)
    return path.is_dir() and (path / "tables" / SPATIALDATA_TABLE / "uns" / "napari_stem").is_dir()


def check_replaceable_zarr(path: str | Path) -> None:
    path = Path(path)
    if not is_spatialdata_prediction(path):
        raise StemError(
            f"{describe_path(path)} exists and is not a SpatialData prediction napari-stem wrote; "
            "napari-stem never replaces other files or folders. Choose another output path."
        )


def check_spatialdata_output(path: str | Path, inputs: Any, needed_bytes: float = 0, flag: str = "--out") -> None:
    """A SpatialData prediction may go to ``path``: a ``.zarr`` name, not an input, writable, and any
    folder already there is a prediction napari-stem wrote."""
    path = Path(path)
    if path.suffix != ZARR_SUFFIX:
        raise StemError(f"{flag} {describe_path(path)}: a SpatialData prediction is a folder named *.zarr.")
    check_not_an_input(path, inputs, flag)
    if path.exists():
        if not path.is_dir():
            raise StemError(
                f"{describe_path(path)} is a file; a SpatialData prediction is a .zarr folder. Choose another path."
            )
        check_replaceable_zarr(path)
    check_writable_folder(path.parent, needed_bytes, flag)


def nearest_existing_folder(path: Path) -> Path:
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable_folder(folder: str | Path, needed_bytes: float = 0, flag: str = "--out") -> None:
    """``folder`` can be created or written, and its filesystem has ``needed_bytes`` free.

    Probes by creating (and removing) a temporary file, so read-only filesystems, ``/proc`` and
    permission problems are found before the work, not at the final write.
    """
    folder = Path(folder)
    existing = nearest_existing_folder(folder)
    if not existing.is_dir():
        raise InputError(
            f"{flag} {describe_path(folder)} cannot be created: {describe_path(existing)} is a file, not a "
            "folder. Choose another output path."
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".napari-stem-probe-"):
            pass
    except OSError as exc:
        raise InputError(
            f"{flag} {describe_path(folder)} is not writable ({describe_path(existing)}: "
            f"{exc.strerror or exc}). Choose a folder you can write to."
        ) from exc
    free = shutil.disk_usage(existing).free
    if needed_bytes and free < needed_bytes:
        raise InputError(
            f"{flag} {describe_path(folder)}: about {_size(needed_bytes)} will be written but its disk has only "
            f"{_size(free)} free. Free some space or choose another disk."
        )


def check_prediction_output(
    path: str | Path, inputs: Iterable[str | Path | None], needed_bytes: float = 0, flag: str = "--out"
) -> None:
    """A prediction ``.h5ad`` may go to ``path``: not an input, writable, room for it, and any file
    already there is a prediction napari-stem wrote (nothing else is ever replaced)."""
    path = Path(path)
    if path.suffix == ".zarr":  # a SpatialData prediction folder: the same rules for a folder
        return check_spatialdata_output(path, inputs, needed_bytes, flag)
    check_not_an_input(path, inputs, flag)
    if path.is_dir():
        raise InputError(
            f"{flag} {describe_path(path)} is a folder; the prediction needs a file name (e.g. {path / 'prediction.h5ad'})."
        )
    if path.exists() and not is_napari_stem_h5ad(path):
        raise InputError(
            f"{describe_path(path)} exists and is not a prediction napari-stem wrote; napari-stem never "
            "replaces other files. Choose another output path, or move that file away."
        )
    check_writable_folder(path.parent, needed_bytes, flag)


def prediction_bytes(n_spots: int, n_genes: int, n_layers: int = 2, n_samples_kept: int = 0) -> int:
    """Size of a prediction file: float32 layers + kept samples + thumbnail and obs overhead."""
    return int(n_spots * n_genes * 4 * (n_layers + n_samples_kept) + n_spots * 200 + 4 * 2**20)


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} PiB"  # pragma: no cover

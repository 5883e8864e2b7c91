"""What a ``stem-train fit`` run keeps on disk so that ``--resume`` continues it exactly.

The run folder: ``checkpoints/step_NNNNNNN/`` (a napari-stem checkpoint with the EMA and raw
weights, and its ``training_state.pt``: optimiser, step, running log sums, RNG states, which
training rows it saw), ``checkpoints/latest`` naming the newest complete one, ``checkpoint/`` (the
final EMA checkpoint), ``log.jsonl`` and ``run.json``. Every file is written atomically, in an
order that leaves ``latest`` pointing at a complete step; a resumed run checks that it continues
the same setup and the same training rows before it restores anything. The loop in
:mod:`stem_train.fit` only calls these.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.atomic import replace_atomically, write_text_atomically
from napari_stem.errors import CheckpointError, StemError, describe_path
from stem_train.manifest import PreparedDataset

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "training_state.pt"
FINAL_CHECKPOINT = "checkpoint"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"


class TrainingError(StemError):
    """A fit run cannot start or continue as asked (options, run folder, device)."""


def training_state(
    step: int, spec: dict[str, Any], optimizer: Any, running: Any, order: Any, training_set: Any
) -> dict:
    """What resuming at ``step`` needs beside the weights: the run's spec, the optimiser, the running
    log sums, the RNGs and which training rows the run was drawing."""
    return {
        "step": step,
        "spec": spec,
        "optimizer": optimizer.state_dict(),
        "running": running.cpu(),
        "rng": rng_states(),
        "data": {
            "epoch": order.position(step)[0],
            "steps_per_epoch": order.steps_per_epoch,
            "augmentation_fingerprint": training_set.augmentation_fingerprint,
        },
    }


# ---------------------------------------------------------------------- checkpoints
def target_range(targets: np.ndarray) -> dict[str, list[float]]:
    """Per-gene min and max of the training targets, for the samplers' x_0 clipping.

    Per gene, not global: genes differ several-fold in range (a global bound would let a
    low-expressed gene diverge to a marker's level); per gene costs 2 x G numbers.
    """
    targets = np.asarray(targets, dtype=np.float64)
    return {"min": targets.min(axis=0).tolist(), "max": targets.max(axis=0).tolist()}


def _provenance(
    step: int, manifest: PreparedDataset, args: argparse.Namespace, training_set: Any, ctx: Any
) -> dict[str, Any]:
    from napari_stem import __version__

    return {
        "trainer": "stem-train fit",
        "napari_stem_version": __version__,
        "steps": step,
        "manifest": str(manifest.root / "manifest.json"),
        "data_dir": manifest.data_dir,
        "train_slides": [s.sample_id for s in manifest.split("train")],
        "held_out_slides": [s.sample_id for s in manifest.split("test")],
        "gene_selection": manifest.gene_selection,
        "args": plain_args(args),
        "world_size": ctx.world_size,
        "augmentation_fingerprint": training_set.augmentation_fingerprint,
    }


def save_step_checkpoint(
    checkpoints: Path,
    step: int,
    state: dict,
    config: Any,
    manifest: PreparedDataset,
    model: Any,
    ema: Any,
    args: argparse.Namespace,
    training_set: Any,
    ctx: Any,
) -> Path:
    """Weights folder, then its training state, then the ``latest`` pointer: each step atomic."""
    from napari_stem.stem.checkpoint import save_checkpoint

    folder = checkpoints / f"step_{step:07d}"
    save_checkpoint(
        folder,
        config=config,
        genes=manifest.genes,
        ema=ema,
        model=model,
        target_transform=args.target_transform,
        embedding=manifest.embedding_spec(),
        provenance=_provenance(step, manifest, args, training_set, ctx),
        overwrite=True,
        target_range=target_range(training_set.targets),
    )
    _torch_save_atomic(state, folder / STATE_FILE)
    write_text_atomically(checkpoints / LATEST_FILE, folder.name + "\n")
    if args.keep_last:
        for old in sorted(checkpoints.glob("step_*"))[: -args.keep_last]:
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def save_final_checkpoint(
    path: Path,
    step: int,
    config: Any,
    manifest: PreparedDataset,
    model: Any,
    ema: Any,
    args: argparse.Namespace,
    training_set: Any,
    ctx: Any,
) -> Path:
    from napari_stem.stem.checkpoint import save_checkpoint

    return save_checkpoint(
        path,
        config=config,
        genes=manifest.genes,
        ema=ema,
        target_transform=args.target_transform,
        embedding=manifest.embedding_spec(),
        provenance=_provenance(step, manifest, args, training_set, ctx),
        overwrite=True,
        target_range=target_range(training_set.targets),
    )


def resume_folder(run_dir: Path) -> Path:
    pointer = run_dir / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.exists():
        raise TrainingError(
            f"nothing to resume in {describe_path(run_dir)}: no {CHECKPOINTS_DIR}/{LATEST_FILE}; run without --resume to start it."
        )
    folder = pointer.parent / pointer.read_text().strip()
    if not (folder / STATE_FILE).exists():
        raise TrainingError(
            f"{describe_path(pointer)} names {describe_path(folder)}, which has no {STATE_FILE}; the run folder is damaged."
        )
    return folder


def read_resume_state(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The training state of ``folder``, after checking it was made by a run like this one."""
    from napari_stem.safe_load import torch_load_tensors

    state = torch_load_tensors(folder / STATE_FILE, "training state", CheckpointError)
    differences = _spec_differences(state["spec"], spec)
    if differences:
        raise CheckpointError(
            f"cannot resume from {describe_path(folder)}: it was trained with a different setup ("
            + "; ".join(differences)
            + "). Resume with the checkpoint's options and prepared folder, or start a new run with another --out."
        )
    return state


def check_same_rows(folder: Path, state: dict[str, Any], training_set: Any, order: Any) -> None:
    saved = state.get("data", {})
    now = {"steps_per_epoch": order.steps_per_epoch, "augmentation_fingerprint": training_set.augmentation_fingerprint}
    if any(saved.get(key) != value for key, value in now.items()):
        raise CheckpointError(
            f"cannot resume from {describe_path(folder)}: its training rows ({saved.get('steps_per_epoch')} steps per epoch, "
            f"augmentation draw {saved.get('augmentation_fingerprint')}) differ from this prepared folder's "
            f"({now['steps_per_epoch']}, {now['augmentation_fingerprint']}); the prepared folder changed since the run started."
        )


def restore(
    folder: Path, state: dict[str, Any], spec: dict[str, Any], model: Any, ema: Any, optimizer: Any, device: Any
):
    """Weights, EMA, optimiser and RNGs as saved; returns (step, running log sums)."""
    import torch

    from napari_stem.stem.checkpoint import load_checkpoint

    for target, weights in ((model, "model"), (ema, "ema")):
        loaded = load_checkpoint(folder, weights=weights, expected_genes=spec["genes"])
        target.load_state_dict(loaded.model.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_states(state.get("rng", {}))
    return int(state["step"]), state["running"].to(device=device, dtype=torch.float64)


def _spec_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            parts = [
                f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
            ]
            lines.append(f"{key}: checkpoint {', '.join(parts)} (checkpoint vs this run)")
        elif key == "genes":
            lines.append(
                f"genes: checkpoint has {len(old or [])} {_preview(old or [])}, the prepared folder {len(new or [])} {_preview(new or [])}"
            )
        else:
            lines.append(f"{key}: checkpoint {old!r}, this run {new!r}")
    return lines


def rng_states() -> dict[str, Any]:
    import random

    import torch

    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Global RNGs as saved (the loop itself uses per-step generators; this covers anything else)."""
    import random

    import torch

    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state(
            ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------- files
def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if not key.startswith("_") and not callable(value)
    }


def start_log(path: Path, keep_until: int) -> None:
    """Fresh log, or on resume the old one cut back to the checkpoint's step (no duplicate steps)."""
    kept = []
    if keep_until > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if record.get("step", 0) <= keep_until:
                kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))


def _torch_save_atomic(obj: Any, path: Path) -> None:
    import torch

    replace_atomically(path, lambda partial: torch.save(obj, partial))


def _preview(genes: list[str], n: int = 4) -> str:
    return "[" + ", ".join(genes[:n]) + (", ...]" if len(genes) > n else "]")

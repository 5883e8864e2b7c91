"""napari-stem checkpoints: a folder with ``weights.safetensors`` and ``config.json``.

Why our own format: the reference saves bare state dicts (no architecture, no gene list) or pickled
whole modules, which run arbitrary code when loaded. Ours holds the architecture, the ordered gene
list, the target transform, the embedding spec and provenance next to safetensors weights, and
loading it never unpickles anything. Writes are atomic: a temporary folder renamed into place.
Reference trainer checkpoints are converted into it by :mod:`napari_stem.stem.reference_import`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from napari_stem.atomic import remove_stale_temporaries, temporary_sibling
from napari_stem.devices import resolve_device_name
from napari_stem.errors import CheckpointError, describe_path
from napari_stem.values import EmbeddingSpec

if TYPE_CHECKING:  # torch is imported where weights are touched: reading metadata stays instant
    from napari_stem.stem.model import StemConfig, StemModel

FORMAT_NAME = "napari-stem-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
EMA_PREFIX, MODEL_PREFIX = "ema.", "model."


@dataclass
class StemCheckpoint:
    """A loaded checkpoint: the EMA model in eval mode plus everything needed to use it."""

    path: Path
    config: StemConfig
    genes: list[str]
    target_transform: str
    model: StemModel
    embedding: EmbeddingSpec = field(default_factory=EmbeddingSpec)
    provenance: dict = field(default_factory=dict)
    #: Per-gene {"min": [...], "max": [...]} of the training targets (stem-train fit records it);
    #: samplers clip their predicted x_0 to it. None (e.g. imported reference weights): no clipping.
    target_range: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.embedding, EmbeddingSpec):  # the config's dict form
            self.embedding = EmbeddingSpec.from_dict(self.embedding)


# -- saving ---------------------------------------------------------------------------------


def save_checkpoint(
    path,
    *,
    config: StemConfig,
    genes,
    ema,
    model=None,
    target_transform: str = "log2p1",
    embedding: EmbeddingSpec | dict | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
    target_range: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    ``ema`` (the weights used for sampling) and the optional ``model`` (raw training weights) are
    modules or state dicts of a :class:`StemModel` built from ``config``. ``embedding`` describes
    the condition (an :class:`~napari_stem.values.EmbeddingSpec`, or its dict form: encoder name,
    dim, patch spec) and ``provenance`` the run (steps, data); both are stored as given and must be
    JSON-serialisable. ``target_range``
    ({"min": G values, "max": G values}) is the training targets' per-gene range.
    """
    import torch

    path = Path(path)
    genes = [str(g) for g in genes]
    if len(genes) != config.n_genes:
        raise CheckpointError(
            f"cannot save {describe_path(path)}: {len(genes)} gene names for a model of {config.n_genes} genes"
        )
    if len(set(genes)) != len(genes):
        raise CheckpointError(f"cannot save {describe_path(path)}: the gene list has duplicates")
    if target_range is not None:
        target_range = checked_target_range(target_range, config.n_genes, describe_path(path))
    if path.exists():
        check_replaceable(path, overwrite)
    tensors = {}
    for prefix, weights in ((EMA_PREFIX, ema), (MODEL_PREFIX, model)):
        if weights is None:
            continue
        state = validated_state_dict(weights, config, f"{describe_path(path)} ({prefix[:-1]})")
        tensors.update({prefix + k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()})
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": config.to_dict(),
        "genes": genes,
        "target_transform": target_transform,
        "embedding": embedding.to_dict() if isinstance(embedding, EmbeddingSpec) else dict(embedding or {}),
        "provenance": dict(provenance or {}),
        "weights": {"file": WEIGHTS_FILE, "ema": True, "model": model is not None},
    }
    if target_range is not None:
        metadata["target_range"] = target_range
    config_text = json.dumps(metadata, indent=1, default=_json_value)  # fails before any write

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    staging = Path(tempfile.mkdtemp(prefix=temporary_sibling(path, "partial-").name, dir=path.parent))
    try:
        _write_weights(tensors, staging / WEIGHTS_FILE)
        with open(staging / CONFIG_FILE, "w", encoding="utf-8") as f:
            f.write(config_text)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def checked_target_range(target_range, n_genes: int, where: str) -> dict:
    """{"min": [...], "max": [...]} as plain floats, one per gene, finite, min <= max."""
    import math

    try:
        low = [float(v) for v in target_range["min"]]
        high = [float(v) for v in target_range["max"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: target_range must be {{'min': [...], 'max': [...]}} ({exc})") from exc
    if len(low) != n_genes or len(high) != n_genes:
        raise CheckpointError(f"{where}: target_range has {len(low)}/{len(high)} values for {n_genes} genes")
    if not all(math.isfinite(a) and math.isfinite(b) and a <= b for a, b in zip(low, high, strict=True)):
        raise CheckpointError(f"{where}: target_range must be finite with min <= max for every gene")
    return {"min": low, "max": high}


#: Files napari-stem writes into a checkpoint folder (fit adds its training state).
OWN_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, "training_state.pt"})


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Only a checkpoint napari-stem wrote, holding nothing else, is ever replaced."""
    if not overwrite:
        raise CheckpointError(
            f"{describe_path(path)} already exists; choose another output, or allow replacing an "
            "earlier checkpoint (--overwrite / overwrite=True)."
        )
    foreign = "it is a file" if not path.is_dir() else ""
    if not foreign:
        others = sorted(entry.name for entry in path.iterdir() if entry.name not in OWN_FILES)
        if others:
            foreign = f"it holds files napari-stem did not write ({', '.join(others[:5])})"
        else:
            try:
                read_metadata(path)
            except CheckpointError:
                foreign = "it is not a napari-stem checkpoint"
    if foreign:
        raise CheckpointError(
            f"refusing to replace {describe_path(path)}: {foreign}. napari-stem only replaces checkpoints "
            "it wrote; choose another output folder."
        )


def _json_value(value):
    """numpy scalars/arrays and paths in embedding specs or provenance, as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


def _write_weights(tensors: dict, file: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _swap_into_place(staging: Path, path: Path) -> None:
    """Rename the finished folder to ``path``; an old checkpoint there is removed only after."""
    if not path.exists():
        os.replace(staging, path)
        return
    retired = Path(tempfile.mkdtemp(prefix=temporary_sibling(path, "old-").name, dir=path.parent))
    os.replace(path, retired / path.name)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(retired / path.name, path)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def validated_state_dict(weights, config: StemConfig, where: str, template: StemModel | None = None) -> dict:
    """The state dict of ``weights`` (a module or a dict), refused unless it fits ``config`` exactly."""
    import torch

    from napari_stem.stem.model import StemModel

    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    # Built on the CPU, not under ``torch.device("meta")``: that context routes nn.init through
    # torch._refs, which imports torch._dynamo and triton, and triton's bundled LLVM crashes a
    # process that already holds Mesa's (napari under software OpenGL).
    template = template if template is not None else StemModel(config)
    expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"weights for {where} do not fit the architecture {config.to_dict()}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    return state


# -- loading --------------------------------------------------------------------------------


def _checkpoint_dir(path) -> Path:
    from napari_stem.hub import resolve_checkpoint  # hf-hub:owner/name[@rev] -> cached folder; paths unchanged

    path = resolve_checkpoint(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint {describe_path(path)} does not exist")
    if path.is_file():
        hint = (
            " It looks like a reference PyTorch checkpoint: convert it with import_reference_checkpoint()."
            if path.suffix in (".pt", ".pth", ".ckpt")
            else ""
        )
        raise CheckpointError(
            f"{describe_path(path)} is a file, but a napari-stem checkpoint is a folder holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}.{hint}"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {describe_path(path)} has no {name}")
    return path


def read_metadata(path) -> dict:
    """The checkpoint's JSON (architecture, genes, embedding spec...) without loading weights."""
    folder = _checkpoint_dir(path)
    try:
        metadata = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {describe_path(folder / CONFIG_FILE)}: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{describe_path(folder / CONFIG_FILE)} is not a napari-stem checkpoint config")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{describe_path(folder)} has format version {metadata['format_version']}; this "
            f"napari-stem reads up to {FORMAT_VERSION}. Update napari-stem."
        )
    architecture, genes = metadata.get("architecture"), metadata.get("genes")
    if (
        isinstance(architecture, dict)
        and isinstance(genes, list)
        and architecture.get("n_genes") not in (None, len(genes))
    ):
        raise CheckpointError(
            f"{describe_path(folder / CONFIG_FILE)} lists {len(genes)} genes but its model predicts "
            f"{architecture['n_genes']}; the file was edited or mixed with another checkpoint's. Restore the config "
            "written with these weights."
        )
    return metadata


def load_checkpoint(
    path, *, expected_genes=None, expected_cond_dim: int | None = None, map_location="cpu", weights: str = "ema"
) -> StemCheckpoint:
    """Load a checkpoint folder; the model gets the EMA weights (or ``weights="model"``), eval mode.

    ``expected_genes`` (ordered) and ``expected_cond_dim`` are what the caller will use the model
    with; a mismatch raises :class:`CheckpointError` naming both sides. ``map_location`` is a
    device, or "auto" for CUDA when available.
    """
    import torch

    from napari_stem.stem.model import StemConfig, StemModel

    folder = _checkpoint_dir(path)
    metadata = read_metadata(folder)
    try:
        config = StemConfig.from_dict(metadata["architecture"])
        genes = [str(g) for g in metadata["genes"]]
        embedding = EmbeddingSpec.from_dict(metadata.get("embedding"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{describe_path(folder / CONFIG_FILE)} is malformed: {exc}") from exc
    check_compatible(folder, genes, config.cond_dim, embedding, expected_genes, expected_cond_dim)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = _read_weights(folder / WEIGHTS_FILE, EMA_PREFIX if weights == "ema" else MODEL_PREFIX)
    damaged = [
        name for name, tensor in state.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if damaged:
        raise CheckpointError(
            f"checkpoint {describe_path(folder)} holds non-finite weights (NaN or infinity) in {len(damaged)} tensors, "
            f"e.g. '{damaged[0]}': the file is damaged or its training diverged. Use an earlier checkpoint of the run."
        )
    model = StemModel(config)
    validated_state_dict(state, config, describe_path(folder), template=model)
    map_location = resolve_device_name(map_location, torch.cuda.is_available)
    model.load_state_dict(state)
    model.to(map_location).eval()
    target_range = metadata.get("target_range")
    if target_range is not None:
        target_range = checked_target_range(target_range, config.n_genes, describe_path(folder / CONFIG_FILE))
    return StemCheckpoint(
        path=folder,
        config=config,
        genes=genes,
        target_transform=metadata.get("target_transform", "log2p1"),
        model=model,
        embedding=embedding,
        provenance=metadata.get("provenance", {}),
        target_range=target_range,
    )


def _read_weights(file: Path, prefix: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights {describe_path(file)}: {exc}") from exc
    if not state:
        raise CheckpointError(f"{describe_path(file)} holds no '{prefix[:-1]}' weights")
    return state


def check_compatible(path, genes, cond_dim, embedding, expected_genes=None, expected_cond_dim=None) -> None:
    """Raise CheckpointError when the checkpoint's genes or condition dim differ from the caller's."""
    if expected_cond_dim is not None and int(expected_cond_dim) != cond_dim:
        encoder = embedding.encoder
        made_with = f" (made with encoder '{encoder}')" if encoder else ""
        raise CheckpointError(
            f"checkpoint {describe_path(path)} expects {cond_dim}-dim embeddings{made_with}, "
            f"but the embeddings given are {expected_cond_dim}-dim. Extract embeddings with the "
            f"checkpoint's encoder."
        )
    if expected_genes is not None:
        expected = [str(g) for g in expected_genes]
        if expected != list(genes):
            raise CheckpointError(
                f"checkpoint {describe_path(path)} predicts {len(genes)} genes "
                f"{_preview(genes)}, but {len(expected)} genes {_preview(expected)} were expected: "
                f"{_gene_difference(list(genes), expected)}"
            )


def _preview(genes, n: int = 4) -> str:
    shown = ", ".join(genes[:n])
    return f"[{shown}{', ...' if len(genes) > n else ''}]"


def _gene_difference(in_checkpoint: list[str], expected: list[str]) -> str:
    only_checkpoint = [g for g in in_checkpoint if g not in set(expected)]
    only_expected = [g for g in expected if g not in set(in_checkpoint)]
    if not only_checkpoint and not only_expected:
        first = next(i for i, (a, b) in enumerate(zip(in_checkpoint, expected, strict=False)) if a != b)
        return (
            f"same genes in a different order (position {first}: '{in_checkpoint[first]}' "
            f"in the checkpoint, '{expected[first]}' expected)"
        )
    return (
        f"{len(only_expected)} expected genes are not in the checkpoint {_preview(only_expected)}; "
        f"{len(only_checkpoint)} checkpoint genes were not expected {_preview(only_checkpoint)}"
    )

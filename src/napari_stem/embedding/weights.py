"""Encoder weights files: reading them safely, identifying them cheaply, fitting them to a model.

A weights file is ``.safetensors`` or a tensors-only torch pickle (``torch.load(weights_only=True)``,
never unpickling code). Its identity (name, size, a hash of its ends) lets an embedding cache tell
which weights made it without building the model. torch is imported inside functions.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_stem.errors import EncoderError, describe_path

if TYPE_CHECKING:
    from napari_stem.embedding.encoders import EncoderSpec

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
#: How to give an encoder a weights file, appended to errors that ask for one.
CLI_WEIGHTS_HINT = "pass it as the encoder weights (CLI: --encoder-weights PATH)"


def resolve_weights_path(weights: str | Path) -> Path:
    """A local weights file, or ``hf-hub:owner/name[@rev][/file]`` fetched to the Hub cache (:mod:`napari_stem.hub`)."""
    from napari_stem.hub import resolve_weights_file

    return resolve_weights_file(weights)


def file_fingerprint(path: Path, encoder_name: str) -> str:
    """``name:size:hash`` of a weights file, hashing only its first and last MiB."""
    require_weights_file(path, encoder_name)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
            digest.update(handle.read(1 << 20))
    return f"{path.name}:{size}:{digest.hexdigest()[:16]}"


def require_weights_file(path: Path, encoder_name: str) -> None:
    """Raise an :class:`EncoderError` unless ``path`` is an existing file."""
    if not path.exists():
        raise EncoderError(
            f"weights file {describe_path(path)} for encoder '{encoder_name}' does not exist; check the path "
            f"(or omit it to use the encoder's default weights source)."
        )
    if path.is_dir():
        raise EncoderError(
            f"weights for encoder '{encoder_name}' must be a file, but {describe_path(path)} is a folder."
        )


def load_weights_file(path: str | Path, encoder_name: str) -> dict[str, Any]:
    """A flat ``{key: tensor}`` state dict from ``.safetensors`` or a tensors-only torch pickle.

    ``torch.load(weights_only=True)`` refuses pickles that would run code; wrappers such as
    ``{"state_dict": ...}`` / ``{"model": ...}`` and DistributedDataParallel's ``module.`` prefix
    are unwrapped.
    """
    import torch

    path = Path(path)
    require_weights_file(path, encoder_name)
    suffix = path.suffix.lower()
    if suffix not in WEIGHTS_SUFFIXES:
        raise EncoderError(
            f"weights file {describe_path(path)} for encoder '{encoder_name}' has an unsupported type "
            f"'{suffix}'; use one of {', '.join(WEIGHTS_SUFFIXES)}."
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise EncoderError(
                f"could not read weights file {describe_path(path)} for encoder '{encoder_name}': {first_line(exc)}. "
                "It may be truncated or not a safetensors file; re-download it."
            ) from exc
    else:
        from napari_stem.safe_load import torch_load_tensors

        state = torch_load_tensors(path, f"weights file for encoder '{encoder_name}'", EncoderError)
    for wrapper in ("state_dict", "model", "module", "teacher"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise EncoderError(
            f"weights file {describe_path(path)} for encoder '{encoder_name}' does not hold a state dict "
            "(a mapping of names to tensors)."
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def load_matching_state_dict(model: Any, state: dict[str, Any], spec: EncoderSpec, path: Path) -> None:
    """Load ``state`` strictly, or raise an :class:`EncoderError` naming the first mismatching key."""
    expected = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if classifier and getattr(model, "num_classes", None) == 0:
        # A headless model happily takes a checkpoint that still carries its classifier.
        state = {key: value for key, value in state.items() if not key.startswith(f"{classifier}.")}
    if spec.positional_keys and set(state) != set(expected):
        state = _map_positionally(state, expected)
    for key, value in expected.items():
        if key not in state:
            problem = f"'{key}' is missing from the file"
            break
        if tuple(state[key].shape) != tuple(value.shape):
            problem = f"'{key}' has shape {tuple(state[key].shape)} in the file but {tuple(value.shape)} in the model"
            break
    else:
        unexpected = [key for key in state if key not in expected]
        if not unexpected:
            model.load_state_dict(state, strict=True)
            return
        problem = f"'{unexpected[0]}' in the file is not part of the model"
    n_missing = sum(key not in state for key in expected)
    n_unexpected = sum(key not in expected for key in state)
    raise EncoderError(
        f"weights file {describe_path(path)} does not match encoder '{spec.name}' ({spec.architecture}): first "
        f"mismatching key {problem} ({n_missing} keys missing, {n_unexpected} unexpected). The file was probably "
        f"saved for another architecture; give the weights of {spec.architecture}"
        + (f", e.g. {spec.hub_file} from https://huggingface.co/{spec.hub_repo}." if spec.hub_repo else ".")
    )


def _map_positionally(state: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """Rename ``state``'s keys to ``expected``'s in order when the tensors line up shape for shape."""
    if len(state) != len(expected):
        return dict(state)
    pairs = list(zip(state.items(), expected.items(), strict=True))
    if any(tuple(value.shape) != tuple(target.shape) for (_, value), (_, target) in pairs):
        return dict(state)
    return {target_key: value for (_, value), (target_key, _) in pairs}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error that quotes it."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""

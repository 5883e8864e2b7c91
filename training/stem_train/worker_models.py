"""The models a process loads once and reuses for every slide it is given.

A cohort worker (:mod:`stem_train.cohort`) runs many slides; loading the checkpoint and building
the encoder per slide would cost more than some slides take. They are kept here per process,
keyed by what decides them. The encoder is built lazily (:class:`LazyEncoder`), so a slide whose
embeddings are cached never loads, or downloads, its weights; ``stem-train prepare`` uses the
same lazy encoder when it embeds slides one after the other in a single process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


class LazyEncoder:
    """The encoder, built on first use: a fully cached rerun never loads (or downloads) its weights.

    Its name, weights id and (for registered encoders) dimension are known without building, which
    is all the embedding cache needs to decide whether it can be reused.
    """

    def __init__(self, name: str, weights: Any, device: str | None, precision: str = "auto") -> None:
        from napari_stem.embedding.encoders import encoder_weights_id, get_encoder_spec

        self.name = name
        self.weights = weights
        self.weights_id = encoder_weights_id(name, weights)
        self._spec_dim = int(get_encoder_spec(name).dim)
        self._device = device
        self._precision = precision
        self._built = None

    def _build(self) -> Any:
        if self._built is None:
            from napari_stem.embedding.encoders import create_encoder

            self._built = create_encoder(
                self.name, weights=self.weights, device=self._device, precision=self._precision
            )
        return self._built

    @property
    def dim(self) -> int:
        if self._built is None and self._spec_dim:
            return self._spec_dim
        return int(self._build().dim)  # a generic timm name reveals its width only when built

    @property
    def device(self) -> Any:
        return getattr(self._build(), "device", None)

    @property
    def precision(self) -> str:
        return str(getattr(self._build(), "precision", "fp32"))

    def __call__(self, batch: Any) -> Any:
        return self._build()(batch)


def worker_checkpoint(path: str | Path) -> Any:
    """The checkpoint at ``path``, loaded once per process (reloaded if its weights change)."""
    from napari_stem.stem.checkpoint import load_checkpoint

    folder = Path(path).resolve()
    weights = folder / "weights.safetensors"
    key = ("checkpoint", str(folder), weights.stat().st_mtime_ns if weights.exists() else 0)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_checkpoint(folder)
        return _MODELS[key]


def worker_encoder(name: str, weights: Any, device: str, precision: str) -> LazyEncoder:
    """The encoder, built on first use once per process (a slide whose embeddings are cached never builds it)."""
    key = ("encoder", name, str(weights) if weights is not None else None, device, precision)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = LazyEncoder(name, weights, device, precision)
        return _MODELS[key]


def models_loaded() -> int:
    """Models this process has loaded so far: checkpoints, and encoders actually built."""
    return sum(
        1 for key, model in _MODELS.items() if key[0] == "checkpoint" or getattr(model, "_built", None) is not None
    )

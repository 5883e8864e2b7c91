"""What a run keeps between runs so it need not compute it again: grids over tissue and patch embeddings.

The widget's preview and its run share one :class:`GridCache` (the controller owns it), so the
spots the preview draws are the spots that get predicted, and the slide's tissue mask, the slow part
of a grid, is found once. Embedding files are named by :func:`embedding_cache_path`, the one policy
the widget and ``stem-train predict`` follow. No napari or Qt import.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.spots import Spots
from napari_stem.values import VISIUM_GRID, EmbeddingSpec, GridSpec

#: Slides (tissue masks) and grids a :class:`GridCache` keeps, each: the newest ones.
GRID_CACHE_SIZE = 8
#: Hex digits of the identity hash in a keyed embedding file name.
_KEY_LENGTH = 20


def _file_key(path: str | Path) -> tuple:
    """A slide file's identity: a file replaced in place is a new slide."""
    path = Path(path)
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


class GridCache:
    """Tissue masks per slide file and µm/px, and grids per slide file, µm/px and :class:`GridSpec`.

    The mask comes from :func:`napari_stem.tissue.mask_overview` (the file's stored thumbnail when
    it has one), so a grid for another pitch, diameter or tissue fraction needs no slide read.
    """

    def __init__(self, size: int = GRID_CACHE_SIZE) -> None:
        self.size = size
        self._tissue: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
        self._grids: OrderedDict[tuple, Spots] = OrderedDict()

    def cached_tissue(self, path: str | Path, mpp: float) -> tuple[np.ndarray, float] | None:
        """The slide's ``(mask, scale)`` if already found (instant), else None."""
        return self._tissue.get((*_file_key(path), float(mpp)))

    def tissue(self, path: str | Path, mpp: float) -> tuple[np.ndarray, float]:
        """``(mask, scale level-0 px → mask px)`` of the slide's tissue, found once per file."""
        key = (*_file_key(path), float(mpp))
        if key not in self._tissue:
            from napari_stem.slide import open_slide

            with open_slide(path, mpp=mpp) as slide:
                return self._find_tissue(key, slide)
        return self._tissue[key]

    def grid(self, path: str | Path, mpp: float, grid: GridSpec = VISIUM_GRID) -> Spots:
        """:func:`napari_stem.grid.spots_over_tissue` of a slide file over its kept tissue mask
        (the slide is opened once, for the mask too when it is not kept yet)."""
        tissue_key = (*_file_key(path), float(mpp))
        key = (*tissue_key, grid)
        if key not in self._grids:
            from napari_stem.grid import spots_over_tissue
            from napari_stem.slide import open_slide

            with open_slide(path, mpp=mpp) as slide:
                tissue = self._tissue.get(tissue_key) or self._find_tissue(tissue_key, slide)
                self._remember(self._grids, key, spots_over_tissue(slide, grid, tissue=tissue))
        return self._grids[key]

    def _find_tissue(self, key: tuple, slide: Any) -> tuple[np.ndarray, float]:
        from napari_stem.grid import tissue_mask

        mask = tissue_mask(slide)
        self._remember(self._tissue, key, mask)
        return mask

    def _remember(self, cache: OrderedDict, key: tuple, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.size:
            cache.popitem(last=False)


# ---------------------------------------------------------------------- embedding files
def default_embedding_cache_root() -> Path:
    """``<napari-stem cache>/embeddings``: where the widget keeps embedding files unless told otherwise."""
    from napari_stem.datasets import cache_dir

    return cache_dir() / "embeddings"


def embedding_cache_path(
    slide_path: str | Path,
    spots: Spots,
    embedding: EmbeddingSpec | Mapping[str, Any] | None,
    weights: str | Path | None = None,
    *,
    root: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """The HDF5 file that keeps one slide's patch embeddings.

    Two namings, both under ``root`` (default :func:`default_embedding_cache_root`):

    * ``<root>/<name>.h5`` when ``name`` is given (``stem-train predict --cache-dir DIR``, named by
      the slide's sample id): one file per slide, the HEST-Bench layout ``stem-train prepare``
      writes, so a prepared folder's ``embeddings/`` is reused. Other spots or another encoder
      re-embed into the same file (the file records what it holds; prepared training embeddings
      are never replaced).
    * ``<root>/<slide stem>-<key>.h5`` otherwise (the widget), ``key`` a hash of the resolved slide
      path, the spots (:func:`~napari_stem.embedding.cache.spots_fingerprint`), the encoder and patch
      settings of ``embedding`` (an :class:`~napari_stem.values.EmbeddingSpec` or a checkpoint's
      ``embedding`` config) and the encoder ``weights``: each spot set and encoder keeps its own file, so trying another
      region and coming back, or re-running with other sampling settings, embeds nothing.
    """
    root = Path(root) if root is not None else default_embedding_cache_root()
    slide_path = Path(slide_path)
    if name is not None:
        return root / f"{name}.h5"
    from napari_stem.embedding.cache import spots_fingerprint

    spec = embedding if isinstance(embedding, EmbeddingSpec) else EmbeddingSpec.from_dict(embedding)
    identity = spec.to_dict()
    key = json.dumps(
        [
            str(slide_path.resolve()),
            spots_fingerprint(spots),
            identity.get("encoder"),
            identity.get("patch"),
            str(weights or ""),
        ],
        sort_keys=True,
        default=str,
    )
    return root / f"{slide_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:_KEY_LENGTH]}.h5"

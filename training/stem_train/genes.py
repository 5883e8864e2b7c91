"""Choose the gene panel a model predicts: HMHVG (the reference's), plain HVG, or a user list.

HMHVG is Stem's ``dataset_preprocess.ipynb`` procedure, step for step:

1. keep the genes measured in every slide (sorted);
2. per slide: ``filter_cells(min_genes=1)``, ``filter_genes(min_cells=1)``, ``normalize_total``
   (target = median library size), ``log1p``, ``highly_variable_genes(n_top_genes=2000)`` (scanpy's
   default ``seurat`` flavour); take the union over slides;
3. drop names starting with MT, mt, RPS or RPL (before the reference's 2025-03-29 commit: MT, mt,
   RP, rp — pass those prefixes to get gene lists made like the paper's may have been);
4. stack the *raw* counts of the survivors over the slides (NaN → 0), rank genes by mean and by
   standard deviation (ddof 1) across spots;
5. keep ``top-k by mean ∩ top-k by std``, sorted by name.

The notebook sets k by hand (241 "to make final gene list of length 200"). Here k is the smallest
value whose intersection holds at least the requested count; when that k overshoots by one (two
genes can enter at the same k) the gene with the better of its two ranks is kept. Whenever some k
gives exactly the requested count, the result is exactly the notebook's for that k.

Unlike the reference, the statistics of steps 2 and 4 exclude held-out slides by default (the
reference computes them over the test slide too); step 1 always uses every slide, since the held-out
slides must be measured for the panel to be evaluated on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import DatasetError, describe_path

GENE_METHODS = ("hmhvg", "hvg", "list")
#: The reference's prefix filter since commit 8c0d8d9 (2025-03-29).
REFERENCE_PREFIXES = ("MT", "mt", "RPS", "RPL")
#: The filter before that commit; gene lists made earlier (possibly the paper's) used it.
LEGACY_PREFIXES = ("MT", "mt", "RP", "rp")
#: Per-slide highly variable genes whose union seeds HMHVG.
HVG_PER_SLIDE = 2000


@dataclass
class GeneSelection:
    """The ordered panel and how it was chosen (stored in the manifest's ``gene_selection``)."""

    genes: list[str]
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- building blocks
def common_genes(adatas: Mapping[str, Any]) -> list[str]:
    """Genes measured in every slide, sorted by name (step 1)."""
    names = None
    for adata in adatas.values():
        names = set(adata.var_names) if names is None else names & set(adata.var_names)
    if not names:
        raise DatasetError(f"the slides {', '.join(adatas)} share no gene names; are they from the same panel/species?")
    return sorted(names)


def _scanpy():
    """scanpy, imported after torch: numba (which scanpy imports) loads the system OpenMP runtime, and a
    torch imported later binds to it instead of its own (see :func:`stem_train.demo.load_torch_openmp_first`)."""
    import importlib

    importlib.import_module("torch")  # first, and not an import statement a sorter could move
    return importlib.import_module("scanpy")


def drop_prefixed(genes: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    """The genes whose names start with none of ``prefixes`` (step 3), order kept."""
    prefixes = tuple(prefixes)
    return [gene for gene in genes if not (prefixes and gene.startswith(prefixes))]


def slide_hvgs(adata: Any, genes: Sequence[str], n_top_genes: int = HVG_PER_SLIDE) -> set[str]:
    """One slide's highly variable genes among ``genes``, with the reference's scanpy recipe (step 2)."""
    sc = _scanpy()

    sub = _float_copy(adata, genes)
    sc.pp.filter_cells(sub, min_genes=1)
    sc.pp.filter_genes(sub, min_cells=1)
    if sub.n_obs < 2 or sub.n_vars < 2:
        return set()
    sc.pp.normalize_total(sub)  # target_sum=None: the median library size, as the reference
    sc.pp.log1p(sub)
    sc.pp.highly_variable_genes(sub, n_top_genes=n_top_genes)  # flavor="seurat", the default
    return set(sub.var_names[sub.var["highly_variable"].to_numpy()])


def raw_count_moments(
    adatas: Mapping[str, Any], genes: Sequence[str], chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 1) of raw counts over all spots of all slides (step 4).

    NaN counts count as 0 (the reference's ``fillna(0)``). Computed slide by slide in blocks of
    genes, in float64, so the stacked matrix is never built.
    """
    genes = list(genes)
    n_spots = sum(adata.n_obs for adata in adatas.values())
    if n_spots < 2:
        raise DatasetError("gene selection needs at least two spots over the selection slides")
    total = np.zeros(len(genes))
    for block in _count_blocks(adatas, genes, chunk):
        total[block.columns] += block.values.sum(axis=0)
    mean = total / n_spots
    squares = np.zeros(len(genes))
    for block in _count_blocks(adatas, genes, chunk):
        squares[block.columns] += ((block.values - mean[block.columns]) ** 2).sum(axis=0)
    return mean, np.sqrt(squares / (n_spots - 1))


def rank_descending(values: np.ndarray, genes: Sequence[str]) -> list[str]:
    """Genes from the highest value to the lowest; ties keep the (sorted) input order."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return [genes[i] for i in order]


def top_mean_std_intersection(by_mean: Sequence[str], by_std: Sequence[str], n_genes: int) -> tuple[list[str], int]:
    """HMHVG step 5: (``top-k by mean ∩ top-k by std`` sorted by name, k).

    k is the smallest size whose intersection reaches ``n_genes``. A gene enters the intersection
    at k = max(its rank by mean, its rank by std); at most two genes enter at one k, and on an
    overshoot the one whose better rank is smaller stays (then the name decides).
    """
    if list(sorted(by_mean)) != list(sorted(by_std)):
        raise ValueError("the mean and std rankings must hold the same genes")
    if not 1 <= n_genes <= len(by_mean):
        raise ValueError(f"n_genes must be between 1 and {len(by_mean)}, got {n_genes}")
    rank_mean = {gene: i + 1 for i, gene in enumerate(by_mean)}
    rank_std = {gene: i + 1 for i, gene in enumerate(by_std)}
    entry = {gene: max(rank_mean[gene], rank_std[gene]) for gene in by_mean}
    order = sorted(by_mean, key=lambda g: (entry[g], min(rank_mean[g], rank_std[g]), g))
    chosen = order[:n_genes]
    return sorted(chosen), entry[chosen[-1]]


# ---------------------------------------------------------------------- methods
def select_hmhvg(
    adatas: Mapping[str, Any],
    n_genes: int,
    *,
    all_adatas: Mapping[str, Any] | None = None,
    prefixes: Sequence[str] = REFERENCE_PREFIXES,
    hvg_per_slide: int = HVG_PER_SLIDE,
    progress: Any = None,
) -> GeneSelection:
    """High-mean ∩ high-variance genes of the reference (see the module docstring).

    ``adatas`` are the slides whose statistics decide (training slides, or all of them when
    held-out slides are deliberately included); ``all_adatas`` (default: the same) the slides
    every gene must be measured in. ``progress`` wraps the per-slide loop (e.g. tqdm).
    """
    shared = common_genes(all_adatas if all_adatas is not None else adatas)
    items = list(adatas.items())
    union: set[str] = set()
    for _, adata in progress(items) if progress is not None else items:
        union |= slide_hvgs(adata, shared, hvg_per_slide)
    candidates = drop_prefixed(sorted(union), prefixes)
    _require_enough(candidates, n_genes, "HMHVG candidates (union of per-slide HVGs after the prefix filter)")
    mean, std = raw_count_moments(adatas, candidates)
    selected, k = top_mean_std_intersection(
        rank_descending(mean, candidates), rank_descending(std, candidates), n_genes
    )
    info = {
        "method": "hmhvg",
        "n_requested": int(n_genes),
        "k": int(k),
        "hvg_per_slide": int(hvg_per_slide),
        "drop_prefixes": list(prefixes),
        "n_common_genes": len(shared),
        "n_candidates": len(candidates),
    }
    return GeneSelection(selected, info)


def select_hvg(
    adatas: Mapping[str, Any],
    n_genes: int,
    *,
    all_adatas: Mapping[str, Any] | None = None,
    prefixes: Sequence[str] = REFERENCE_PREFIXES,
) -> GeneSelection:
    """Plain scanpy HVGs of the stacked slides: median-normalised, log1p, top ``n_genes`` by
    normalised dispersion (``seurat`` flavour), after the same prefix filter; sorted by name."""
    import anndata

    sc = _scanpy()

    shared = common_genes(all_adatas if all_adatas is not None else adatas)
    stacked = anndata.concat([_float_copy(adata, shared) for adata in adatas.values()], join="inner", index_unique="-")
    sc.pp.filter_cells(stacked, min_genes=1)
    sc.pp.normalize_total(stacked)  # library sizes over all shared genes, before the prefix filter
    sc.pp.log1p(stacked)
    candidates = drop_prefixed(shared, prefixes)
    stacked = stacked[:, candidates].copy()
    sc.pp.filter_genes(stacked, min_cells=1)
    _require_enough(list(stacked.var_names), n_genes, "genes expressed in the selection slides after the prefix filter")
    table = sc.pp.highly_variable_genes(stacked, n_top_genes=n_genes, inplace=False)
    dispersion = np.nan_to_num(np.asarray(table["dispersions_norm"], dtype=np.float64), nan=-np.inf)
    ranked = rank_descending(dispersion, list(stacked.var_names))
    info = {
        "method": "hvg",
        "n_requested": int(n_genes),
        "drop_prefixes": list(prefixes),
        "n_common_genes": len(shared),
        "n_candidates": int(stacked.n_vars),
    }
    return GeneSelection(sorted(ranked[:n_genes]), info)


def read_gene_list_file(path: str | Path) -> list[str]:
    """A user's gene panel file (see :func:`napari_stem.gene_list.read_gene_list`)."""
    from napari_stem.gene_list import read_gene_list

    return read_gene_list(path, error=DatasetError)


def select_from_list(path: str | Path, all_adatas: Mapping[str, Any]) -> GeneSelection:
    """The user's genes in the file's order, after checking every slide measures each of them."""
    genes = read_gene_list_file(path)
    missing = {
        sample_id: [g for g in genes if g not in set(adata.var_names)] for sample_id, adata in all_adatas.items()
    }
    missing = {sample_id: names for sample_id, names in missing.items() if names}
    if missing:
        absent = sorted({gene for names in missing.values() for gene in names}, key=genes.index)
        where = "; ".join(f"{sample_id} lacks {_preview(names)}" for sample_id, names in missing.items())
        raise DatasetError(
            f"gene list {describe_path(path)} names {len(absent)} gene(s) not measured in every slide: "
            f"{_preview(absent, 10)} ({where}). Remove them from the file or leave those slides out."
        )
    return GeneSelection(genes, {"method": "list", "file": str(Path(path).resolve()), "n_requested": len(genes)})


# ---------------------------------------------------------------------- helpers
@dataclass
class _Block:
    columns: slice
    values: np.ndarray  # (n_spots, len(columns)) float64, NaN → 0


def _count_blocks(adatas: Mapping[str, Any], genes: list[str], chunk: int):
    import scipy.sparse as sp

    for adata in adatas.values():
        indices = adata.var_names.get_indexer(genes)
        if (indices < 0).any():
            raise DatasetError(
                f"a slide lacks genes {_preview([g for g, i in zip(genes, indices, strict=True) if i < 0])}"
            )
        for start in range(0, len(genes), chunk):
            columns = slice(start, min(start + chunk, len(genes)))
            values = adata.X[:, indices[columns]]
            values = values.toarray() if sp.issparse(values) else np.asarray(values)
            yield _Block(columns, np.nan_to_num(values.astype(np.float64), nan=0.0))


def _float_copy(adata: Any, genes: Sequence[str]) -> Any:
    """An in-memory float32 copy restricted to ``genes`` (scanpy normalises in place)."""
    sub = adata[:, list(genes)].copy()
    if not np.issubdtype(sub.X.dtype, np.floating):
        sub.X = sub.X.astype(np.float32)
    return sub


def _require_enough(candidates: Sequence[str], n_genes: int, what: str) -> None:
    if n_genes < 1:
        raise DatasetError(f"the number of genes to select must be at least 1, got {n_genes}")
    if n_genes > len(candidates):
        raise DatasetError(
            f"{n_genes} genes were requested but there are only {len(candidates)} {what}; pass "
            f"--n-genes {len(candidates)} or fewer."
        )


def _preview(genes: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(genes[:n])
    return f"[{shown}{', ...' if len(genes) > n else ''}]"

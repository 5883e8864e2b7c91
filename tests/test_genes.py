"""Gene selection: HMHVG on a hand-computed example, against the notebook's procedure, HVG, user lists."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stem.errors import DatasetError
from stem_train import genes as G

# Two slides of four spots. Raw counts per gene, slide 1 then slide 2 (every gene varies in both
# slides, so with 2000 HVGs per slide every gene is in the union).
COUNTS = {
    "MT-CO1": [100, 120, 90, 110, 100, 130, 95, 105],  # mitochondrial: dropped
    "MTOR": [50, 60, 55, 45, 52, 58, 50, 49],  # not mitochondrial, but starts with MT: dropped (reference quirk)
    "RPL5": [80, 70, 90, 60, 85, 75, 65, 70],  # ribosomal: dropped
    "RP11-1": [40, 10, 40, 10, 40, 10, 40, 10],  # kept by RPS/RPL, dropped by the pre-2025 RP filter
    "GA": [20, 0, 20, 0, 20, 0, 20, 0],
    "GB": [30, 32, 30, 32, 30, 32, 30, 32],
    "GC": [1, 0, 1, 0, 9, 0, 9, 0],
    "GD": [7, 3, 7, 3, 7, 3, 7, 3],
    "GE": [1, 2, 1, 2, 1, 2, 1, 2],
}
# Over the 8 spots (std with ddof 1):
#   mean: GB 31 > RP11-1 25 > GA 10 > GD 5 > GC 2.5 > GE 1.5
#   std:  RP11-1 16.04 > GA 10.69 > GC 4.04 > GD 2.14 > GB 1.07 > GE 0.53
# top-k by mean ∩ top-k by std:
#   k=2 {RP11-1}; k=3 {RP11-1, GA}; k=4 {RP11-1, GA, GD}; k=5 adds GC (std rank 3) and GB (mean rank 1).


def _slides(counts: dict[str, list[int]], extra_gene_in_second: bool = False) -> dict[str, anndata.AnnData]:
    names = list(counts)
    matrix = np.array([counts[name] for name in names], dtype=np.float32).T
    slides = {}
    for index, rows in enumerate((slice(0, 4), slice(4, 8))):
        var_names = list(names)
        block = matrix[rows]
        if extra_gene_in_second and index == 1:
            var_names.append("ONLY_HERE")
            block = np.concatenate([block, np.array([[500.0], [100.0], [500.0], [100.0]], np.float32)], axis=1)
        adata = anndata.AnnData(X=sp.csr_matrix(block))
        adata.var_names = var_names
        adata.obs_names = [f"s{index}_{i}" for i in range(4)]
        slides[f"S{index}"] = adata
    return slides


@pytest.mark.parametrize(
    "n_genes,expected,k",
    [
        (1, ["RP11-1"], 2),
        (2, ["GA", "RP11-1"], 3),
        (3, ["GA", "GD", "RP11-1"], 4),
        (4, ["GA", "GB", "GD", "RP11-1"], 5),  # k=5 overshoots to 5 genes; GB (mean rank 1) beats GC (std rank 3)
        (5, ["GA", "GB", "GC", "GD", "RP11-1"], 5),
    ],
)
def test_hmhvg_hand_computed(n_genes: int, expected: list[str], k: int) -> None:
    selection = G.select_hmhvg(_slides(COUNTS, extra_gene_in_second=True), n_genes)
    assert selection.genes == expected
    assert selection.info["k"] == k
    assert selection.info["n_common_genes"] == len(COUNTS)  # ONLY_HERE is not in every slide
    assert selection.info["n_candidates"] == 6  # MT-CO1, MTOR, RPL5 dropped


def test_hmhvg_legacy_rp_filter_drops_rp11() -> None:
    selection = G.select_hmhvg(_slides(COUNTS), 2, prefixes=G.LEGACY_PREFIXES)
    # without RP11-1: mean GB, GA, GD, GC, GE; std GA, GC, GD, GB, GE → k=3 gives {GA, GD}
    assert selection.genes == ["GA", "GD"] and selection.info["k"] == 3


def test_hmhvg_moments_match_the_stacked_raw_counts() -> None:
    mean, std = G.raw_count_moments(_slides(COUNTS), ["GA", "GC", "RP11-1"])
    np.testing.assert_allclose(mean, [10.0, 2.5, 25.0])
    np.testing.assert_allclose(std, [np.sqrt(800 / 7), np.sqrt(114 / 7), np.sqrt(1800 / 7)])


def test_too_many_genes_requested_names_the_limit() -> None:
    with pytest.raises(DatasetError, match="--n-genes 6 or fewer"):
        G.select_hmhvg(_slides(COUNTS), 7)


def _notebook_hmhvg(adatas: dict[str, anndata.AnnData], k: int, hvg_per_slide: int) -> list[str]:
    """The reference notebook's cells, restated with pandas/scanpy for a given k."""
    import scanpy as sc

    common = None
    for adata in adatas.values():
        common = set(adata.var_names) if common is None else common & set(adata.var_names)
    common = sorted(common)
    slides = [adata[:, common].copy() for adata in adatas.values()]
    union: set[str] = set()
    for adata in slides:
        adata = adata.copy()
        sc.pp.filter_cells(adata, min_genes=1)
        sc.pp.filter_genes(adata, min_cells=1)
        sc.pp.normalize_total(adata, inplace=True)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=hvg_per_slide)
        union |= set(adata.var_names[adata.var["highly_variable"]])
    union = sorted(g for g in union if not g.startswith(("MT", "mt", "RPS", "RPL")))
    frames = [pd.DataFrame(a[:, union].X.toarray(), columns=union) for a in slides]
    counts = pd.concat(frames, axis=0).fillna(0)
    by_mean = counts.mean(axis=0).sort_values(ascending=False).index
    by_std = counts.std(axis=0).sort_values(ascending=False).index
    return sorted(set(by_mean[:k]) & set(by_std[:k]))


def test_hmhvg_matches_the_notebook_procedure_on_random_slides() -> None:
    rng = np.random.default_rng(3)
    names = [f"G{i:03d}" for i in range(60)] + ["MT-ND1", "RPS6", "RPL13", "MTHFD2"]
    base = rng.gamma(0.6, 8.0, size=len(names))
    adatas = {}
    for index in range(3):
        scale = rng.gamma(2.0, 0.5, size=(120, 1))
        counts = rng.poisson(base[None, :] * scale * rng.gamma(1.0, 1.0, size=(120, len(names)))).astype(np.float32)
        adata = anndata.AnnData(X=sp.csr_matrix(counts))
        adata.var_names = names
        adata.obs_names = [f"{index}_{i}" for i in range(120)]
        adatas[f"S{index}"] = adata
    for n_genes in (5, 12, 20):
        selection = G.select_hmhvg(adatas, n_genes, hvg_per_slide=25)
        k = selection.info["k"]
        reference = _notebook_hmhvg(adatas, k, hvg_per_slide=25)
        smaller = _notebook_hmhvg(adatas, k - 1, hvg_per_slide=25)
        assert len(smaller) < n_genes <= len(reference)  # k is the smallest that reaches the count
        if len(reference) == n_genes:
            assert selection.genes == reference
        else:  # overshoot by one: ours is the reference's list minus one gene entering at k
            assert set(selection.genes) < set(reference) and len(reference) == n_genes + 1
        assert not any(g.startswith(("MT", "RPS", "RPL")) for g in selection.genes)


def test_held_out_slides_only_constrain_presence() -> None:
    """Statistics come from the deciding slides; genes must exist in all slides."""
    slides = _slides(COUNTS, extra_gene_in_second=True)
    only_second = {"S1": slides["S1"]}
    alone = G.select_hmhvg(only_second, 1)
    assert alone.genes == ["ONLY_HERE"]  # highest mean and std in S1
    constrained = G.select_hmhvg(only_second, 1, all_adatas=slides)
    assert constrained.genes != ["ONLY_HERE"] and "ONLY_HERE" not in constrained.genes


def test_plain_hvg_returns_sorted_panel_without_filtered_prefixes() -> None:
    selection = G.select_hvg(_slides(COUNTS), 3)
    assert len(selection.genes) == 3 and selection.genes == sorted(selection.genes)
    assert not set(selection.genes) & {"MT-CO1", "MTOR", "RPL5"}
    assert selection.info["method"] == "hvg"


def test_gene_list_keeps_file_order(tmp_path: Path) -> None:
    path = tmp_path / "panel.txt"
    path.write_text("GD\n\n# comment\nGA  \nMT-CO1\n")
    selection = G.select_from_list(path, _slides(COUNTS))
    assert selection.genes == ["GD", "GA", "MT-CO1"] and selection.info["method"] == "list"


def test_gene_list_with_absent_genes_names_them_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "panel.txt"
    path.write_text("GA\nNOPE1\nONLY_HERE\n")
    with pytest.raises(DatasetError) as info:
        G.select_from_list(path, _slides(COUNTS, extra_gene_in_second=True))
    message = str(info.value)
    assert "panel.txt" in message and "NOPE1" in message and "ONLY_HERE" in message and "S0 lacks" in message


@pytest.mark.parametrize("text,match", [("", "empty"), ("GA\nGA\n", "more than once")])
def test_bad_gene_list_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "panel.txt"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        G.read_gene_list_file(path)
    with pytest.raises(DatasetError, match="does not exist"):
        G.read_gene_list_file(tmp_path / "missing.txt")

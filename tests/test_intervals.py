"""Order-statistic prediction intervals: the rule, their coverage on known distributions, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_stem import intervals
from napari_stem.errors import StemError


def test_samples_needed_for_exact_levels() -> None:
    assert intervals.samples_for_levels([0.9]) == 19  # [x(1), x(19)]
    assert intervals.samples_for_levels([0.5]) == 3  # [min, max] of 3
    assert intervals.samples_for_levels([0.5, 0.9]) == 19  # K + 1 a multiple of 4 and of 20
    assert intervals.samples_for_levels([0.5, 0.9], at_least=20) == 39
    assert intervals.samples_for_levels([0.95]) == 39 and intervals.samples_for_levels([0.8]) == 9
    assert intervals.exact_rank(0.9, 19) == 1 and intervals.exact_rank(0.5, 19) == 5
    assert intervals.exact_rank(0.9, 8) is None and intervals.exact_rank(0.5, 8) is None
    with pytest.raises(StemError, match="1999 samples"):
        intervals.samples_for_levels([0.999])
    with pytest.raises(StemError, match="strictly between 0 and 1"):
        intervals.samples_for_levels([1.0])


def test_levels_few_samples_can_deliver_are_labelled_honestly() -> None:
    eight = intervals.plan_intervals([0.5, 0.9], 8)
    assert [spec.rank for spec in eight] == [2, 1]
    assert [spec.level for spec in eight] == pytest.approx([5 / 9, 7 / 9])
    assert not any(spec.exact for spec in eight)
    assert eight[1].label == "77.8 % interval from 8 samples (90 % asked; exact needs 19 samples)"
    assert (eight[1].lower_layer, eight[1].upper_layer) == ("lo77.8", "hi77.8")

    (four,) = intervals.plan_intervals([0.5, 0.9], 4)  # both asks land on [min, max]
    assert four.rank == 1 and four.level == pytest.approx(0.6) and four.name == "60"
    assert "no separate 50 % interval" in intervals.describe([0.5, 0.9], 4)

    nineteen = intervals.plan_intervals([0.9, 0.5], 19)
    assert [(s.lower_layer, s.upper_layer, s.rank, s.exact) for s in nineteen] == [
        ("lo50", "hi50", 5, True),
        ("lo90", "hi90", 1, True),
    ]
    assert nineteen[1].to_dict()["level_fraction"] == "9/10" and nineteen[1].to_dict()["n_samples"] == 19
    assert intervals.IntervalSpec.from_dict(nineteen[0].to_dict()) == nineteen[0]
    assert intervals.describe([0.5, 0.9], 19).startswith("exact: 50 % interval from 19 samples")


def test_sample_count_is_raised_with_its_cost() -> None:
    assert intervals.resolve_sample_count([0.5, 0.9], 39, default=4) == (39, None)
    assert intervals.resolve_sample_count(None, None, default=4) == (4, None)
    count, note = intervals.resolve_sample_count([0.5, 0.9], 8, default=4)
    assert count == 19 and "instead of --samples 8" in note and "2.4x as long" in note
    count, note = intervals.resolve_sample_count([0.5, 0.9], None, default=4)
    assert count == 19 and "19 samples per spot" in note and "4.8x" in note


def test_order_statistic_interval_picks_the_ranks_along_any_axis() -> None:
    samples = np.array([[5.0, 1.0, 4.0, 2.0, 3.0], [10.0, 50.0, 40.0, 20.0, 30.0]])
    lower, upper = intervals.order_statistic_interval(samples, 2, axis=1)
    np.testing.assert_array_equal(lower, [2.0, 20.0])
    np.testing.assert_array_equal(upper, [4.0, 40.0])
    lower, upper = intervals.order_statistic_interval(samples.T, 1, axis=0)
    np.testing.assert_array_equal(lower, [1.0, 10.0])
    np.testing.assert_array_equal(upper, [5.0, 50.0])
    with pytest.raises(ValueError, match="rank"):
        intervals.order_statistic_interval(samples, 4, axis=1)


@pytest.mark.parametrize("n_samples", [3, 4, 8, 19, 39])
def test_written_intervals_cover_their_label(n_samples: int) -> None:
    """Truth and samples from the same per-spot distribution (a calibrated model by construction)."""
    rng = np.random.default_rng(n_samples)
    n_spots, n_genes = 3000, 4
    centre = rng.normal(size=(n_spots, 1, n_genes)) * 3
    scale = rng.uniform(0.2, 2.0, size=(n_spots, 1, n_genes))
    samples = centre + scale * rng.standard_t(df=4, size=(n_spots, n_samples, n_genes))  # heavy tails, any shape works
    truth = (centre + scale * rng.standard_t(df=4, size=(n_spots, 1, n_genes)))[:, 0]
    specs = intervals.plan_intervals([0.5, 0.9], n_samples)
    assert specs
    for spec in specs:
        lower, upper = spec.bounds(samples, axis=1)
        coverage = ((truth >= lower) & (truth <= upper)).mean()
        error = 4 * math.sqrt(spec.level * (1 - spec.level) / truth.size)  # independent draws here
        assert abs(coverage - spec.level) < error, (spec.label, coverage)
    if n_samples == 8:  # what the old q05/q95 layers wrote: interpolated quantiles, read as "90 %"
        q05, q95 = np.quantile(samples, [0.05, 0.95], axis=1)
        assert ((truth >= q05) & (truth <= q95)).mean() < 0.75


def _prediction(n_spots: int = 12, n_samples: int = 19, levels=(0.5, 0.9)):
    from napari_stem.stem.sampling import Prediction

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(n_spots, n_samples, 3)).astype(np.float32)
    specs = intervals.plan_intervals(levels, n_samples)
    prediction = Prediction(
        mean=samples.mean(axis=1),
        variance=samples.var(axis=1, ddof=1),
        genes=["GA", "GB", "GC"],
        interval_specs=specs,
        intervals=np.stack([np.stack(spec.bounds(samples)) for spec in specs]),
        metadata={"n_samples": n_samples},
    )
    return prediction


def test_intervals_survive_h5ad_and_csv(tmp_path: Path) -> None:
    import anndata

    from napari_stem.anndata_io import read_prediction
    from napari_stem.csv_io import prediction_table
    from napari_stem.export import write_prediction
    from napari_stem.spots import spots_from_anndata

    prediction = _prediction()
    truth_like = anndata.AnnData(X=np.zeros((12, 3), dtype=np.float32))
    truth_like.obs_names = [f"bc{i}" for i in range(12)]
    truth_like.obsm["spatial"] = np.stack([np.arange(12) * 200.0 + 100, np.full(12, 150.0)], axis=1)
    truth_like.uns["spatial"] = {"ST": {"scalefactors": {"spot_diameter_fullres": 110.0}}}
    spots = spots_from_anndata(truth_like)
    path = write_prediction(tmp_path / "p.h5ad", prediction, spots)
    adata = anndata.read_h5ad(path)
    assert {"lo50", "hi50", "lo90", "hi90"} <= set(adata.layers)
    assert not any(name.startswith("q") for name in adata.layers)
    declared = json.loads(adata.uns["napari_stem"]["intervals_json"])
    assert [(d["lower_layer"], d["level"], d["n_samples"], d["exact"]) for d in declared] == [
        ("lo50", 0.5, 19, True),
        ("lo90", 0.9, 19, True),
    ]
    np.testing.assert_array_equal(adata.layers["hi90"], prediction.intervals[1, 1])

    again, _ = read_prediction(path)
    assert again.interval_specs == prediction.interval_specs
    np.testing.assert_array_equal(again.intervals, prediction.intervals)
    part = again.subset(np.array([1, 3]))
    np.testing.assert_array_equal(part.intervals, prediction.intervals[:, :, [1, 3]])

    table = prediction_table(prediction, spots)
    assert {"lo90_GA", "hi90_GA", "lo50_GC"} <= set(table.columns)
    np.testing.assert_allclose(table["lo90_GB"], prediction.intervals[1, 0, :, 1])


def test_median_is_the_only_quantile_name_kept() -> None:
    from napari_stem.anndata_io import quantile_layer_name

    assert quantile_layer_name(0.5) == "median"
    assert quantile_layer_name(0.05) == "interpolated_q05"  # never "q05", which reads as an interval end

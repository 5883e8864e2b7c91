"""Metrics against hand-computed tiny examples and known identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_stem import metrics


def test_pearson_matches_corrcoef_and_flags_constant_genes() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 4))
    prediction = truth + rng.normal(size=(30, 4))
    truth[:, 2] = 3.0  # constant truth
    prediction[:, 3] = 0.1  # constant prediction (e.g. the per-gene mean baseline)
    pcc = metrics.pearson_per_gene(truth, prediction)
    for g in (0, 1):
        assert pcc[g] == pytest.approx(np.corrcoef(truth[:, g], prediction[:, g])[0, 1])
    assert np.isnan(pcc[2]) and np.isnan(pcc[3])


def test_pearson_hand_computed() -> None:
    truth = np.array([[1.0], [2.0], [3.0]])
    assert metrics.pearson_per_gene(truth, np.array([[2.0], [4.0], [6.0]]))[0] == pytest.approx(1.0)
    assert metrics.pearson_per_gene(truth, np.array([[3.0], [2.0], [1.0]]))[0] == pytest.approx(-1.0)
    # x = (1,2,3), y = (1,3,2): cov = 0.5·(... ) → r = 0.5
    assert metrics.pearson_per_gene(truth, np.array([[1.0], [3.0], [2.0]]))[0] == pytest.approx(0.5)
    assert np.isnan(metrics.pearson_per_gene(truth, np.array([[1.0], [np.nan], [2.0]]))[0])
    assert np.isnan(metrics.pearson_per_gene(truth[:1], truth[:1])[0])  # one spot


def test_pcc_top_k_ignores_nan_and_caps_k() -> None:
    pcc = np.array([0.1, np.nan, 0.9, 0.5, -0.2])
    assert metrics.pcc_top_k(pcc, 2) == (pytest.approx(0.7), 2)
    value, used = metrics.pcc_top_k(pcc, 10)  # only 4 genes have a PCC
    assert used == 4 and value == pytest.approx((0.1 + 0.9 + 0.5 - 0.2) / 4)
    assert metrics.pcc_top_k(np.array([np.nan, np.nan]), 10)[1] == 0
    assert math.isnan(metrics.pcc_top_k(np.array([np.nan]), 10)[0])


def test_pcc_top_k_equals_reference_when_no_nan() -> None:
    """The reference: sort all per-gene PCCs descending, mean of the first k."""
    rng = np.random.default_rng(1)
    truth, prediction = rng.normal(size=(40, 25)), rng.normal(size=(40, 25))
    pcc = metrics.pearson_per_gene(truth, prediction)
    reference = [np.corrcoef(truth[:, g], prediction[:, g])[0, 1] for g in range(25)]
    assert metrics.pcc_top_k(pcc, 10)[0] == pytest.approx(np.mean(sorted(reference, reverse=True)[:10]))


def test_mse_mae_rvd_hand_computed() -> None:
    truth = np.array([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0]])
    prediction = np.array([[1.0, 1.0, 4.0], [1.0, 4.0, 6.0]])
    assert metrics.mse(truth, prediction) == pytest.approx((1 + 1 + 0 + 1 + 1 + 1) / 6)
    assert metrics.mae(truth, prediction) == pytest.approx(5 / 6)
    # var_truth = (1, 1, 0); var_pred = (0, 2.25, 1); gene 2 has zero truth variance → excluded
    rvd, excluded = metrics.relative_variance_distance(truth, prediction)
    assert excluded.tolist() == [False, False, True]
    assert rvd == pytest.approx(((0 - 1) ** 2 / 1 + (2.25 - 1) ** 2 / 1) / 2)
    assert math.isnan(metrics.relative_variance_distance(truth[:, 2:], prediction[:, 2:])[0])


def test_fixed_panel_counts_nan_and_names_missing_genes() -> None:
    pcc = np.array([0.2, np.nan, 0.6])
    result = metrics.fixed_panel_pcc(pcc, ["A", "B", "C"], ["B", "C", "A"])
    assert result["mean"] == pytest.approx(0.4) and result["n_genes"] == 3 and result["n_valid"] == 2
    assert result["nan_genes"] == ["B"]
    assert metrics.fixed_panel_pcc(pcc, ["A", "B", "C"], ["C"])["mean"] == pytest.approx(0.6)
    with pytest.raises(KeyError, match="ZZ"):
        metrics.fixed_panel_pcc(pcc, ["A", "B", "C"], ["A", "ZZ"])


def test_crps_identities() -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(5, 3))
    point = np.repeat((truth + 0.7)[:, None, :], 6, axis=1)  # all samples equal: a point mass
    np.testing.assert_allclose(metrics.crps_samples(truth, point), 0.7, atol=1e-12)
    samples = rng.normal(size=(5, 7, 3))
    brute = np.abs(samples - truth[:, None]).mean(1) - 0.5 * np.abs(samples[:, :, None] - samples[:, None]).mean((1, 2))
    np.testing.assert_allclose(metrics.crps_samples(truth, samples), brute, atol=1e-12)
    # many samples of N(0, 1) → the closed-form normal CRPS
    many = rng.normal(size=(4, 4000, 1))
    y = np.array([[0.0], [0.5], [-1.0], [2.0]])
    np.testing.assert_allclose(
        metrics.crps_samples(y, many), metrics.crps_gaussian(y, np.zeros_like(y), np.ones_like(y)), atol=0.03
    )
    # CRPS of N(0,1) at y = 0 is (√2 − 1)/√π
    assert metrics.crps_gaussian(np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1)))[0, 0] == pytest.approx(
        (math.sqrt(2) - 1) / math.sqrt(math.pi), abs=1e-6
    )
    assert metrics.crps_gaussian(np.ones((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)))[0, 0] == 1.0


def test_calibrated_gaussian_samples_cover_nominal() -> None:
    rng = np.random.default_rng(3)
    n_spots, n_genes = 400, 20
    mean = rng.normal(size=(n_spots, n_genes))
    sigma = rng.uniform(0.5, 2.0, size=(n_spots, n_genes))
    truth = mean + sigma * rng.normal(size=mean.shape)
    many = mean[:, None] + sigma[:, None] * rng.normal(size=(n_spots, 200, n_genes))
    for level in (0.5, 0.9):
        assert metrics.sample_interval_coverage(truth, many, level) == pytest.approx(level, abs=0.02)
        assert metrics.gaussian_interval_coverage(truth, mean, sigma**2, level) == pytest.approx(level, abs=0.02)
    few = mean[:, None] + sigma[:, None] * rng.normal(size=(n_spots, 4, n_genes))
    pit = metrics.pit_values(truth, few)
    assert metrics.rank_interval_coverage(pit, 0.9) == pytest.approx(0.9, abs=0.02)  # exact for any K
    assert metrics.sample_interval_coverage(truth, few, 0.9) < 0.8  # the quantile interval is too narrow
    spread = metrics.spread_error_correlation(truth, mean, sigma**2)
    assert spread["mean_over_genes"] > 0.2 and spread["pooled"] > 0.2
    overconfident = mean[:, None] + 0.3 * sigma[:, None] * rng.normal(size=(n_spots, 200, n_genes))
    assert metrics.sample_interval_coverage(truth, overconfident, 0.9) < 0.5


def test_pit_handles_ties_uniformly() -> None:
    truth = np.zeros((2000, 1))
    samples = np.zeros((2000, 3, 1))  # zero counts everywhere: every sample ties with the truth
    pit = metrics.pit_values(truth, samples)
    assert metrics.rank_interval_coverage(pit, 0.5) == pytest.approx(0.5, abs=0.04)


def test_interval_coverage_hand_computed() -> None:
    truth = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert metrics.interval_coverage(truth, truth - 1, truth + 1) == 1.0
    assert metrics.interval_coverage(truth, np.full((2, 2), 0.5), np.full((2, 2), 2.5)) == 0.5
    np.testing.assert_allclose(
        metrics.interval_coverage(truth, np.full((2, 2), 0.5), np.full((2, 2), 2.5), axis=0), [0.5, 0.5]
    )
    assert metrics.central_interval_levels(0.9) == (0.05, 0.95)


def test_score_blocks_and_point_predictions() -> None:
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(50, 6))
    truth[:, 5] = 0.0  # a gene that is constant on the test slide
    samples = truth[:, None] + rng.normal(size=(50, 8, 6))
    mean = samples.mean(axis=1)
    genes = list("ABCDEF")
    report = metrics.score(truth, mean, genes, samples=samples, variance=samples.var(axis=1, ddof=1), top_k=(2, 10))
    assert report["reference"]["pcc_nan_genes"] == ["F"] and report["reference"]["rvd_genes_excluded"] == ["F"]
    assert report["reference"]["pcc_k_used"] == {"2": 2, "10": 5}
    assert report["fixed_panel"]["nan_genes"] == ["F"] and report["fixed_panel"]["n_valid"] == 5
    calibration = report["calibration"]
    assert calibration["source"] == "samples" and calibration["n_samples"] == 8
    assert {"coverage_50", "coverage_90", "coverage_rank_90", "crps", "spread_error_correlation"} <= set(calibration)
    assert set(report["per_gene"]) >= {"gene", "pcc", "crps", "coverage_rank_90"}
    assert all(len(column) == 6 for column in report["per_gene"].values())

    quantile_report = metrics.score(
        truth, mean, genes, variance=np.ones_like(mean), quantiles={0.05: mean - 1.645, 0.95: mean + 1.645}
    )
    assert quantile_report["calibration"]["source"] == "quantile layers"
    assert "coverage_90" in quantile_report["calibration"] and "coverage_50" not in quantile_report["calibration"]
    assert "crps_gaussian" in quantile_report["calibration"]

    point = metrics.score(truth, np.zeros_like(truth) + truth.mean(axis=0), genes, variance=np.zeros_like(truth))
    assert point["calibration"]["applicable"] is False
    assert point["fixed_panel"]["n_valid"] == 0 and math.isnan(point["fixed_panel"]["mean"])


def test_target_transforms() -> None:
    counts = np.array([[0.0, 1.0, 3.0, np.nan]])
    np.testing.assert_allclose(metrics.to_target_space(counts), [[0.0, 1.0, 2.0, 0.0]])
    np.testing.assert_allclose(metrics.to_target_space(counts, "log1p"), np.log1p([[0.0, 1.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown target transform"):
        metrics.to_target_space(counts, "sqrt")


def test_written_interval_check_against_binomial_tolerance() -> None:
    truth = np.zeros((100, 2))
    lower, upper = np.full((100, 2), -1.0), np.full((100, 2), 1.0)
    upper[:20] = -0.5  # 20 of 100 spots (all genes) missed: coverage 0.80
    check = metrics.written_interval_check(truth, lower, upper, 0.9)
    assert check["coverage"] == pytest.approx(0.8) and check["tolerance"] == pytest.approx(3 * np.sqrt(0.9 * 0.1 / 100))
    assert check["verdict"] == "too narrow" and check["n_spots"] == 100 and check["n_values"] == 200
    upper[:5] = 1.0  # coverage 0.95: within 0.09 of 0.9
    assert metrics.written_interval_check(truth, lower, upper, 0.9)["verdict"] == "as stated"
    assert metrics.written_interval_check(truth, lower, np.ones((100, 2)), 0.5)["verdict"] == "wider than stated"


def test_order_statistic_curve_levels_are_exact() -> None:
    rng = np.random.default_rng(3)
    samples, truth = rng.normal(size=(4000, 9, 2)), rng.normal(size=(4000, 2))
    curve = metrics.order_statistic_curve(truth, samples)
    assert curve["level"] == pytest.approx([0.8, 0.6, 0.4, 0.2])  # (K + 1 - 2i)/(K + 1), K = 9
    np.testing.assert_allclose(curve["coverage"], curve["level"], atol=4 * np.sqrt(0.25 / 8000))


# ---------------------------------------------------------------------- bootstrap intervals
def _noisy_pair(n_spots: int, seed: int = 0, noise: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n_spots, 6))
    return truth, truth + rng.normal(scale=noise, size=truth.shape)


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_spots() -> None:
    truth, prediction = _noisy_pair(1600)
    small = metrics.bootstrap_panel_pcc(truth[:100], prediction[:100], n_resamples=400, seed=3)
    large = metrics.bootstrap_panel_pcc(truth, prediction, n_resamples=400, seed=3)
    for ci in (small, large):
        assert ci.low < ci.estimate < ci.high and ci.unit == "spots" and ci.n_resamples == 400 and ci.level == 0.95
    assert small.estimate == pytest.approx(
        metrics.fixed_panel_pcc(
            metrics.pearson_per_gene(truth[:100], prediction[:100]), list("abcdef"), list("abcdef")
        )["mean"]
    )
    assert (large.high - large.low) < 0.5 * (small.high - small.low)  # 16x the spots: ~1/4 the width
    assert (
        metrics.bootstrap_panel_pcc(truth[:100], prediction[:100], n_resamples=400, seed=3) == small
    )  # seeded, deterministic


def test_resampled_panel_pcc_is_the_pcc_of_the_resampled_spots() -> None:
    """The matrix-product moments equal scoring the drawn spots (repeated as drawn) directly."""
    truth, prediction = _noisy_pair(40, seed=1)
    truth[:, 5] = 0.0  # constant gene: undefined, left out as fixed_panel_pcc does
    weights = metrics.bootstrap_weights(40, 5, seed=2)
    resampled = metrics._weighted_panel_pcc(truth, prediction, weights)
    for row, value in zip(weights.astype(int), resampled, strict=True):
        drawn = np.repeat(np.arange(40), row)
        pcc = metrics.pearson_per_gene(truth[drawn], prediction[drawn])
        assert value == pytest.approx(np.nanmean(pcc), abs=1e-10)


def test_paired_bootstrap_of_identical_predictions_is_exactly_zero() -> None:
    truth, prediction = _noisy_pair(200)
    same = metrics.paired_bootstrap_panel_pcc(truth, prediction, prediction.copy(), n_resamples=300)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    better = truth + np.random.default_rng(5).normal(scale=0.5, size=truth.shape)
    difference = metrics.paired_bootstrap_panel_pcc(truth, better, prediction, n_resamples=300)
    alone_a = metrics.bootstrap_panel_pcc(truth, better, n_resamples=300)
    alone_b = metrics.bootstrap_panel_pcc(truth, prediction, n_resamples=300)
    assert difference.estimate == pytest.approx(alone_a.estimate - alone_b.estimate) and difference.low > 0
    assert difference.excludes_zero and difference.describe(2, signed=True).startswith("+")


def test_bootstrap_resamples_slides_when_there_are_three() -> None:
    truth, prediction = _noisy_pair(300)
    two = metrics.bootstrap_panel_pcc(truth[:200], prediction[:200], groups=["a"] * 100 + ["b"] * 100, n_resamples=200)
    three = metrics.bootstrap_panel_pcc(truth, prediction, groups=np.repeat(["a", "b", "c"], 100), n_resamples=200)
    assert (two.unit, two.n_units) == ("spots", 200) and (three.unit, three.n_units) == ("slides", 3)
    per_slide = [np.mean(metrics.pearson_per_gene(truth[i : i + 100], prediction[i : i + 100])) for i in (0, 100, 200)]
    assert three.estimate == pytest.approx(np.mean(per_slide)) and min(per_slide) <= three.low <= three.high <= max(
        per_slide
    )


def test_bootstrap_of_an_undefined_pcc_is_undefined() -> None:
    truth, _ = _noisy_pair(30)
    constant = np.broadcast_to(truth.mean(axis=0), truth.shape).copy()  # the per-gene mean baseline
    ci = metrics.bootstrap_panel_pcc(truth, constant, n_resamples=50)
    assert math.isnan(ci.estimate) and math.isnan(ci.low) and ci.n_resamples == 0 and ci.describe() == "n/a"

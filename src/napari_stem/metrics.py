"""How good is a prediction of spatial expression: the Stem paper's numbers and honest ones.

All arrays are ``(n_spots, n_genes)`` in the model's target space (e.g. log2(1 + count)) unless
said otherwise; samples are ``(n_spots, n_samples, n_genes)``. Numpy only, so the plugin can score
a prediction without torch.

Reference metrics (Stem's ``eval.ipynb``) are reproduced exactly, with its pitfalls made explicit:

* **PCC-k** ranks genes by their *test* correlation and averages the k best, so it is an
  optimistic, post-hoc number, not a fixed panel. Genes whose PCC is undefined (constant truth or
  prediction) are left out and listed instead of turning the mean into NaN; k is capped at the
  number of genes with a defined PCC.
* **RVD** divides by the truth's across-spot variance; genes with zero variance are left out and
  listed instead of giving infinity.

The primary, honest number is the **fixed-panel mean PCC**: the mean over a gene list chosen before
looking at the test slide (HEST-Bench's protocol), with undefined PCCs counted and reported.

Because Stem draws samples, the predictive *distribution* is scored too: empirical coverage of
central intervals, CRPS, and whether the predicted spread tracks the actual error. The intervals a
file *writes* are checked against the level they state (:func:`written_interval_check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: k of the reference's PCC-k.
REFERENCE_TOP_K = (10, 50, 200)
#: Central-interval levels whose coverage is reported.
COVERAGE_LEVELS = (0.5, 0.9)
#: A written interval "covers less than it says" when its coverage is below its level by more than
#: z·sqrt(p(1 − p)/n) with n = spots, not spots × genes: the genes of a spot share its image and
#: the model's error, so they are far from independent trials. One-sided z = 3 keeps false alarms
#: rare while still catching q05–q95 of 8 samples (0.65 at "0.90") on a few hundred spots.
INTERVAL_CHECK_Z = 3.0
#: ``source`` of a written interval built from order statistics (napari-stem's own layers), the
#: only kind calibration falls back on when no samples are stored.
ORDER_STATISTICS = "order statistics"

#: Count → target-space transforms (the truth must be compared in the model's space).
TARGET_TRANSFORMS = {
    "log2p1": lambda counts: np.log2(1.0 + counts),  # the reference Stem's targets
    "log1p": np.log1p,  # HEST-Bench's targets
    "none": lambda values: values,  # the truth is already in the target space
}
#: The transforms a model can be trained on (``none`` is for truths already transformed).
TRAINING_TARGET_TRANSFORMS = ("log2p1", "log1p")


def to_target_space(counts: np.ndarray, transform: str = "log2p1") -> np.ndarray:
    """Raw counts → the model's target space (NaN counts become 0, as the reference does)."""
    if transform not in TARGET_TRANSFORMS:
        raise ValueError(f"unknown target transform {transform!r}; use one of {', '.join(TARGET_TRANSFORMS)}")
    values = np.nan_to_num(np.asarray(counts, dtype=np.float64), nan=0.0)
    return TARGET_TRANSFORMS[transform](values)


# ---------------------------------------------------------------------- point-prediction metrics
def _as_pair(truth: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != prediction.shape:
        raise ValueError(
            f"truth and prediction must be (n_spots, n_genes) of one shape, got {truth.shape} and {prediction.shape}"
        )
    return truth, prediction


def pearson_per_gene(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Pearson r across spots for every gene; NaN where it is undefined.

    Undefined: fewer than two spots, a column that is exactly constant (``max == min``, tested
    exactly so float round-off cannot fake a correlation), or a non-finite value in the column.
    Equals ``np.corrcoef(truth[:, g], prediction[:, g])[0, 1]`` wherever that is finite.
    """
    truth, prediction = _as_pair(truth, prediction)
    n_spots, n_genes = truth.shape
    result = np.full(n_genes, np.nan)
    if n_spots < 2:
        return result
    finite = np.isfinite(truth).all(axis=0) & np.isfinite(prediction).all(axis=0)
    with np.errstate(invalid="ignore"):
        varying = (np.ptp(truth, axis=0) > 0) & (np.ptp(prediction, axis=0) > 0)
    valid = finite & varying
    if not valid.any():
        return result
    t = truth[:, valid] - truth[:, valid].mean(axis=0)
    p = prediction[:, valid] - prediction[:, valid].mean(axis=0)
    denominator = np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (t * p).sum(axis=0) / denominator
    result[valid] = np.clip(r, -1.0, 1.0)
    return result


def pcc_top_k(pcc: np.ndarray, k: int) -> tuple[float, int]:
    """The reference's PCC-k: mean of the ``k`` largest per-gene PCCs, and the k actually used.

    Optimistic: the genes are chosen *after* seeing their test correlations. NaN PCCs are left out
    (the reference's ``sorted`` misplaces them and its mean becomes NaN); k is capped at the number
    of defined PCCs, so PCC-200 over 150 valid genes is their plain mean. NaN when none is defined.
    """
    values = np.asarray(pcc, dtype=np.float64)
    values = np.sort(values[np.isfinite(values)])[::-1]
    k_used = int(min(int(k), values.size))
    if k_used == 0:
        return math.nan, 0
    return float(values[:k_used].mean()), k_used


def mse(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Mean squared error over all spots × genes (the reference's MSE, in the target space)."""
    truth, prediction = _as_pair(truth, prediction)
    return float(np.mean((truth - prediction) ** 2))


def mae(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Mean absolute error over all spots × genes."""
    truth, prediction = _as_pair(truth, prediction)
    return float(np.mean(np.abs(truth - prediction)))


def relative_variance_distance(truth: np.ndarray, prediction: np.ndarray) -> tuple[float, np.ndarray]:
    """The reference's RVD and the mask of genes it had to leave out.

    RVD = mean over genes of (σ²_pred − σ²_truth)² / (σ²_truth)², σ² being ``np.var`` (ddof 0)
    across spots: does the averaged prediction keep each gene's between-spot variability?
    (Regressions over-smooth and score high.) Genes whose truth variance is 0 (division by zero in
    the reference) or whose prediction is not finite are excluded; they are returned as a boolean
    mask so callers can name them. NaN when every gene is excluded.
    """
    truth, prediction = _as_pair(truth, prediction)
    var_truth = truth.var(axis=0)
    with np.errstate(invalid="ignore"):
        var_prediction = prediction.var(axis=0)
    excluded = ~(var_truth > 0) | ~np.isfinite(var_prediction) | ~np.isfinite(var_truth)
    if excluded.all():
        return math.nan, excluded
    kept_truth = var_truth[~excluded]
    value = np.mean((var_prediction[~excluded] - kept_truth) ** 2 / kept_truth**2)
    return float(value), excluded


def fixed_panel_pcc(pcc: np.ndarray, genes: Sequence[str], panel: Sequence[str]) -> dict:
    """Mean PCC over a gene panel fixed in advance: the honest primary number.

    Returns ``mean`` (over the panel genes with a defined PCC; NaN if none), ``n_genes`` (panel
    size), ``n_valid`` and ``nan_genes`` (panel genes whose PCC is undefined, e.g. a gene that is
    constant on the test slide, or a constant prediction). Genes of ``panel`` that are not in
    ``genes`` raise ``KeyError`` naming them.
    """
    index = {str(gene): i for i, gene in enumerate(genes)}
    missing = [str(g) for g in panel if str(g) not in index]
    if missing:
        raise KeyError(
            f"{len(missing)} panel genes are not predicted: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    values = np.asarray(pcc, dtype=np.float64)[[index[str(g)] for g in panel]]
    finite = np.isfinite(values)
    return {
        "mean": float(values[finite].mean()) if finite.any() else math.nan,
        "median": float(np.median(values[finite])) if finite.any() else math.nan,
        "n_genes": len(values),
        "n_valid": int(finite.sum()),
        "nan_genes": [str(g) for g, ok in zip(panel, finite, strict=True) if not ok],
    }


# ---------------------------------------------------------------------- distribution metrics
def central_interval_levels(level: float) -> tuple[float, float]:
    """Lower and upper quantile levels of the central ``level`` interval (0.9 → 0.05, 0.95)."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    return round((1 - level) / 2, 10), round((1 + level) / 2, 10)


def interval_coverage(
    truth: np.ndarray, lower: np.ndarray, upper: np.ndarray, axis: int | None = None
) -> float | np.ndarray:
    """Fraction of truth values inside ``[lower, upper]`` (all spots × genes, or along ``axis``)."""
    truth = np.asarray(truth, dtype=np.float64)
    inside = (truth >= np.asarray(lower)) & (truth <= np.asarray(upper))
    result = inside.mean(axis=axis)
    return float(result) if axis is None else result


def sample_interval_coverage(
    truth: np.ndarray, samples: np.ndarray, level: float, axis: int | None = None
) -> float | np.ndarray:
    """Coverage of the central ``level`` interval between the samples' empirical quantiles.

    With few samples per spot this interval is too narrow even for a perfectly calibrated model
    (for K exchangeable samples, ``[min, max]`` covers only (K−1)/(K+1)); see
    :func:`rank_interval_coverage` for the version that is exact for any K.
    """
    low, high = central_interval_levels(level)
    lower, upper = np.quantile(np.asarray(samples, dtype=np.float64), [low, high], axis=1)
    return interval_coverage(truth, lower, upper, axis=axis)


def written_interval_check(
    truth: np.ndarray, lower: np.ndarray, upper: np.ndarray, level: float, z: float = INTERVAL_CHECK_Z
) -> dict:
    """Coverage of a written interval against the level it states, with the binomial tolerance.

    ``verdict``: "too narrow" (coverage < level − tolerance: the label overstates it), "wider than
    stated", or "as stated"; tolerance = z·sqrt(level(1 − level)/n_spots), see :data:`INTERVAL_CHECK_Z`.
    """
    truth = np.asarray(truth, dtype=np.float64)
    coverage = interval_coverage(truth, lower, upper)
    n_spots = truth.shape[0]
    tolerance = z * math.sqrt(level * (1 - level) / max(n_spots, 1))
    if coverage < level - tolerance:
        verdict = "too narrow"
    elif coverage > level + tolerance:
        verdict = "wider than stated"
    else:
        verdict = "as stated"
    return {
        "level": float(level),
        "coverage": coverage,
        "tolerance": tolerance,
        "z": float(z),
        "n_spots": int(n_spots),
        "n_values": int(truth.size),
        "verdict": verdict,
    }


def order_statistic_curve(truth: np.ndarray, samples: np.ndarray) -> dict:
    """Coverage of every central order-statistic interval of K samples at its exact level (K+1−2i)/(K+1)."""
    from napari_stem.intervals import interval_level, order_statistic_interval

    n_samples = samples.shape[1]
    ranks = range(1, (n_samples + 1) // 2 + 1)
    levels = [float(interval_level(n_samples, rank)) for rank in ranks]
    coverage = [interval_coverage(truth, *order_statistic_interval(samples, rank, axis=1)) for rank in ranks]
    keep = [i for i, level in enumerate(levels) if level > 0]
    return {"level": [levels[i] for i in keep], "coverage": [coverage[i] for i in keep]}


def pit_values(truth: np.ndarray, samples: np.ndarray, seed: int = 0) -> np.ndarray:
    """Randomised probability-integral-transform values of the truth among the samples, in (0, 1).

    ``(#samples below + U · (1 + #ties)) / (K + 1)`` with U uniform: exactly uniform when the truth
    is exchangeable with the samples (a calibrated model), whatever K, ties included (e.g. zero
    counts). Shape ``(n_spots, n_genes)``.
    """
    truth = np.asarray(truth, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    below = (samples < truth[:, None, :]).sum(axis=1)
    ties = (samples == truth[:, None, :]).sum(axis=1)
    uniform = np.random.default_rng(seed).random(truth.shape)
    return (below + uniform * (1 + ties)) / (samples.shape[1] + 1)


def rank_interval_coverage(pit: np.ndarray, level: float, axis: int | None = None) -> float | np.ndarray:
    """Coverage of the central ``level`` interval from PIT values: exact for any number of samples."""
    low, high = central_interval_levels(level)
    pit = np.asarray(pit, dtype=np.float64)
    result = ((pit >= low) & (pit <= high)).mean(axis=axis)
    return float(result) if axis is None else result


def crps_samples(truth: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """CRPS of each spot × gene from samples, energy form ``E|X − y| − ½ E|X − X'|``.

    Both expectations are over the empirical distribution of the K samples (the CRPS of that
    distribution, as ``properscoring.crps_ensemble``), so a point mass at x scores ``|x − y|``.
    ``E|X − X'|`` uses the sorted-sample identity ``Σ_ij |x_i − x_j| = 2 Σ_i (2i − K − 1) x_(i)``:
    O(K log K), no K × K array. Lower is better; same units as the target.
    """
    truth = np.asarray(truth, dtype=np.float64)
    samples = np.sort(np.asarray(samples, dtype=np.float64), axis=1)
    n_samples = samples.shape[1]
    if samples.ndim != 3 or samples.shape[::2] != truth.shape:
        raise ValueError(f"samples must be (n_spots, K, n_genes) matching truth {truth.shape}, got {samples.shape}")
    to_truth = np.abs(samples - truth[:, None, :]).mean(axis=1)
    weights = (2 * np.arange(1, n_samples + 1) - n_samples - 1).astype(np.float64)
    pairwise = 2 * np.einsum("k,nkg->ng", weights, samples) / n_samples**2
    return to_truth - 0.5 * pairwise


def crps_gaussian(truth: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """CRPS of a normal N(mean, variance) per spot × gene (closed form); point mass where variance is 0.

    An approximation for predictions that stored only mean and variance (no samples).
    """
    truth = np.asarray(truth, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    sigma = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0, None))
    error = truth - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, error / sigma, 0.0)
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + _erf(z / math.sqrt(2)))
    gaussian = sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return np.where(sigma > 0, gaussian, np.abs(error))


def gaussian_interval_coverage(truth: np.ndarray, mean: np.ndarray, variance: np.ndarray, level: float) -> float:
    """Coverage of ``mean ± z σ`` (a normal approximation) when only mean and variance are stored."""
    z = _normal_quantile(central_interval_levels(level)[1])
    sigma = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0, None))
    return interval_coverage(truth, np.asarray(mean) - z * sigma, np.asarray(mean) + z * sigma)


def spread_error_correlation(truth: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> dict:
    """Does the predicted spread track the actual error? Pearson r of σ and |truth − mean|.

    ``per_gene``: r across spots for each gene (NaN where undefined), ``mean_over_genes``: their
    NaN-ignoring mean (does the model know *which spots* it gets wrong?); ``pooled``: r over all
    spots × genes (dominated by differences between genes).
    """
    truth, mean = _as_pair(truth, mean)
    sigma = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0, None))
    error = np.abs(truth - mean)
    per_gene = pearson_per_gene(error, sigma)
    pooled = pearson_per_gene(error.reshape(-1, 1), sigma.reshape(-1, 1))[0]
    finite = np.isfinite(per_gene)
    return {
        "per_gene": per_gene,
        "mean_over_genes": float(per_gene[finite].mean()) if finite.any() else math.nan,
        "pooled": float(pooled),
        "n_genes_undefined": int((~finite).sum()),
    }


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz–Stegun 7.1.26 (absolute error < 1.5e-7): a vectorised erf without scipy."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _normal_quantile(p: float) -> float:
    """Standard normal quantile by bisection on math.erf (exact enough, no scipy)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        middle = (low + high) / 2
        if 0.5 * (1 + math.erf(middle / math.sqrt(2))) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


# ---------------------------------------------------------------------- everything at once
def score(
    truth: np.ndarray,
    mean: np.ndarray,
    genes: Sequence[str],
    *,
    panel: Sequence[str] | None = None,
    variance: np.ndarray | None = None,
    samples: np.ndarray | None = None,
    quantiles: dict[float, np.ndarray] | None = None,
    intervals: Sequence[dict] | None = None,
    top_k: Sequence[int] = REFERENCE_TOP_K,
    coverage_levels: Sequence[float] = COVERAGE_LEVELS,
    seed: int = 0,
) -> dict:
    """All metrics of one prediction against the truth, as plain values plus per-gene arrays.

    ``panel`` defaults to all ``genes``. The predictive distribution is scored from the best thing
    available: ``samples`` (n_spots, K, n_genes), else ``quantiles`` ({level: (n_spots, n_genes)},
    e.g. the q05/q25/q75/q95 layers), else a normal approximation from ``variance``; with none of
    them (or a zero variance everywhere: a point prediction) calibration is "not applicable".
    ``intervals``: the intervals a file writes, each ``{"name", "level", "label", "lower", "upper"}``
    (plus any JSON-ready keys to echo); each is checked by :func:`written_interval_check` into
    ``calibration["written_intervals"]``.

    Returns ``{"reference", "fixed_panel", "calibration", "per_gene"}``; ``per_gene`` maps column
    names to arrays of length n_genes (for a table), everything else is JSON-ready (NaN stays NaN).
    """
    truth, mean = _as_pair(truth, mean)
    genes = [str(g) for g in genes]
    if len(genes) != truth.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {truth.shape[1]} columns")
    panel = genes if panel is None else [str(g) for g in panel]

    pcc = pearson_per_gene(truth, mean)
    rvd, rvd_excluded = relative_variance_distance(truth, mean)
    reference: dict = {
        "note": "Stem paper metrics (eval.ipynb). PCC-k averages the k genes with the best TEST correlation "
        "(chosen post hoc): optimistic, not a fixed panel.",
        "mse": mse(truth, mean),
        "mae": mae(truth, mean),
        "rvd": rvd,
        "rvd_genes_excluded": [g for g, out in zip(genes, rvd_excluded, strict=True) if out],
        "pcc_nan_genes": [g for g, r in zip(genes, pcc, strict=True) if not np.isfinite(r)],
        "pcc_k_used": {},
    }
    for k in top_k:
        reference[f"pcc_{k}"], reference["pcc_k_used"][str(k)] = pcc_top_k(pcc, k)
    fixed = fixed_panel_pcc(pcc, genes, panel)
    fixed["note"] = "mean per-gene PCC over a gene panel fixed before testing (HEST-Bench protocol): the primary number"

    with np.errstate(invalid="ignore"):
        per_gene = {
            "gene": np.asarray(genes, dtype=object),
            "pcc": pcc,
            "in_panel": np.isin(genes, panel),
            "truth_mean": truth.mean(axis=0),
            "truth_variance": truth.var(axis=0),
            "prediction_mean": mean.mean(axis=0),
            "prediction_variance": mean.var(axis=0),
            "mse": ((truth - mean) ** 2).mean(axis=0),
            "mae": np.abs(truth - mean).mean(axis=0),
        }
    calibration = _calibration(truth, mean, variance, samples, quantiles, coverage_levels, seed, per_gene, intervals)
    if intervals:
        checks = _written_intervals(truth, intervals, per_gene)
        calibration["written_intervals"] = checks
        if "curve" in calibration:
            calibration["curve"]["written"] = {
                "level": [c["level"] for c in checks],
                "coverage": [c["coverage"] for c in checks],
            }
    return {"reference": reference, "fixed_panel": fixed, "calibration": calibration, "per_gene": per_gene}


def _written_intervals(truth: np.ndarray, intervals: Sequence[dict], per_gene: dict) -> list[dict]:
    checks = []
    for interval in intervals:
        lower, upper = np.asarray(interval["lower"]), np.asarray(interval["upper"])
        described = {k: v for k, v in interval.items() if k not in ("lower", "upper")}
        checks.append({**described, **written_interval_check(truth, lower, upper, float(interval["level"]))})
        per_gene[f"written_coverage_{interval['name']}"] = interval_coverage(truth, lower, upper, axis=0)
    return checks


def _calibration(truth, mean, variance, samples, quantiles, levels, seed, per_gene, intervals=None) -> dict:
    """The calibration block of :func:`score` (fills per-gene columns in place)."""
    has_spread = variance is not None and np.nanmax(np.asarray(variance, dtype=np.float64), initial=0.0) > 0
    quantiles = {round(float(q), 10): np.asarray(v) for q, v in (quantiles or {}).items()}
    result: dict = {"applicable": True, "levels": [float(level) for level in levels]}
    if samples is not None:
        samples = np.asarray(samples, dtype=np.float64)
        if samples.shape[::2] != truth.shape:
            raise ValueError(
                f"samples must be (n_spots, K, n_genes) = ({truth.shape[0]}, K, {truth.shape[1]}), got {samples.shape}"
            )
        n_samples = samples.shape[1]
        pit = pit_values(truth, samples, seed=seed)
        crps = crps_samples(truth, samples)
        result.update(source="samples", n_samples=int(n_samples))
        for level in levels:
            name = _percent(level)
            result[f"coverage_{name}"] = sample_interval_coverage(truth, samples, level)
            result[f"coverage_rank_{name}"] = rank_interval_coverage(pit, level)
            per_gene[f"coverage_rank_{name}"] = rank_interval_coverage(pit, level, axis=0)
        result["crps"] = float(crps.mean())
        result["crps_method"] = f"energy form over the {n_samples} samples per spot"
        per_gene["crps"] = crps.mean(axis=0)
        nominal = np.round(np.arange(0.1, 0.91, 0.1), 2)
        result["curve"] = {
            "nominal": nominal.tolist(),
            "empirical_quantile_interval": [sample_interval_coverage(truth, samples, q) for q in nominal],
            "empirical_rank": [rank_interval_coverage(pit, q) for q in nominal],
            "order_statistic": order_statistic_curve(truth, samples),
        }
        result["note"] = (
            "coverage_* uses intervals between the samples' empirical quantiles, too narrow for few samples "
            f"(K={n_samples}: [min, max] covers (K-1)/(K+1) = {(n_samples - 1) / (n_samples + 1):.2f} even when "
            "calibrated); coverage_rank_* uses randomised PIT ranks and is exact for any K; the curve's "
            "order_statistic points are the intervals [x(i), x(K+1-i)] at their exact levels (K+1-2i)/(K+1)."
        )
        variance = samples.var(axis=1, ddof=1) if n_samples > 1 else variance
    elif intervals and any(interval.get("source") == ORDER_STATISTICS for interval in intervals):
        intervals = [interval for interval in intervals if interval.get("source") == ORDER_STATISTICS]
        result.update(source="interval layers")
        for interval in intervals:
            result[f"coverage_{interval['name']}"] = interval_coverage(truth, interval["lower"], interval["upper"])
        result["curve"] = {
            "nominal": [],
            "written": {
                "level": [float(interval["level"]) for interval in intervals],
                "coverage": [result[f"coverage_{interval['name']}"] for interval in intervals],
            },
        }
        result["note"] = (
            "from the stored order-statistic interval layers at their stated levels; no samples "
            "stored, so CRPS is the normal approximation crps_gaussian."
        )
    elif quantiles and any(all(q in quantiles for q in central_interval_levels(level)) for level in levels):
        result.update(source="quantile layers", quantile_levels=sorted(quantiles))
        nominal, empirical = [], []
        for level in levels:
            low, high = central_interval_levels(level)
            if low in quantiles and high in quantiles:
                name = _percent(level)
                result[f"coverage_{name}"] = interval_coverage(truth, quantiles[low], quantiles[high])
                per_gene[f"coverage_{name}"] = interval_coverage(truth, quantiles[low], quantiles[high], axis=0)
                nominal.append(float(level))
                empirical.append(result[f"coverage_{name}"])
        result["curve"] = {"nominal": nominal, "empirical_quantile_interval": empirical}
        result["note"] = (
            "from older files' interpolated quantile layers (q05-q95 from few samples are narrower than 90 %); "
            "no samples stored, so CRPS is the normal approximation crps_gaussian."
        )
    elif has_spread:
        result.update(source="normal approximation from mean and variance")
        for level in levels:
            result[f"coverage_{_percent(level)}"] = gaussian_interval_coverage(truth, mean, variance, level)
        result["curve"] = {
            "nominal": [float(level) for level in levels],
            "empirical_quantile_interval": [result[f"coverage_{_percent(level)}"] for level in levels],
        }
        result["note"] = "no samples or quantiles stored: intervals are mean ± z·σ of a normal approximation."
    else:
        return {
            "applicable": False,
            "reason": "point prediction: no samples, quantiles or non-zero variance, so there is no predictive "
            "distribution to calibrate",
        }
    if samples is None and has_spread:
        crps_normal = crps_gaussian(truth, mean, variance)
        result["crps_gaussian"] = float(crps_normal.mean())
        per_gene["crps_gaussian"] = crps_normal.mean(axis=0)
    if variance is not None and np.isfinite(variance).all():
        spread = spread_error_correlation(truth, mean, variance)
        result["spread_error_correlation"] = spread["mean_over_genes"]
        result["spread_error_correlation_pooled"] = spread["pooled"]
        per_gene["spread_error_correlation"] = spread["per_gene"]
    return result


def _percent(level: float) -> str:
    return f"{round(level * 100):d}"


# ---------------------------------------------------------------------- bootstrap confidence intervals
#: Resamples of the fixed-panel PCC bootstrap (percentile intervals; ±0.01 Monte-Carlo error at 95 %).
BOOTSTRAP_RESAMPLES = 1000
#: Confidence level of the reported intervals.
BOOTSTRAP_LEVEL = 0.95
#: Resample whole slides (not spots) when at least this many are pooled: spots of one slide are not
#: independent, slides are; with fewer, a slide bootstrap has too few distinct resamples to mean much.
MIN_SLIDES_FOR_SLIDE_BOOTSTRAP = 3
_RESAMPLE_BLOCK = 128  # resamples per matrix product: bounds memory at 128 × n_spots weights


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap interval, and how it was resampled.

    ``unit`` is what was drawn with replacement ("spots", or "slides" for a pooled figure over at
    least :data:`MIN_SLIDES_FOR_SLIDE_BOOTSTRAP` slides); ``n_units`` how many there are;
    ``n_resamples`` the resamples in which the statistic was defined (NaN bounds when none was).
    """

    estimate: float
    low: float
    high: float
    level: float
    unit: str
    n_units: int
    n_resamples: int
    seed: int
    method: str = "percentile bootstrap"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, digits: int = 3, signed: bool = False) -> str:
        """``0.412 [0.371, 0.450]`` (``+0.041 [...]`` with ``signed``); ``n/a`` when undefined."""
        if not math.isfinite(self.estimate):
            return "n/a"
        sign = "+" if signed else ""
        bounds = (
            f"[{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"
            if math.isfinite(self.low) and math.isfinite(self.high)
            else "[n/a]"
        )
        return f"{self.estimate:{sign}.{digits}f} {bounds}"

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high) and (self.low > 0 or self.high < 0)


def bootstrap_weights(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each unit is drawn in each resample, ``(n_resamples, n_units)``.

    Deterministic for a seed, so two predictions of the same slide scored with the same seed see
    exactly the same resampled spots (what makes the paired interval paired).
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(n_resamples, n_units))
    offsets = (np.arange(n_resamples) * n_units)[:, None]
    return (
        np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_units)
        .reshape(n_resamples, n_units)
        .astype(np.float64)
    )


def _weighted_panel_pcc(truth: np.ndarray, prediction: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean per-gene Pearson r for each row of resampling ``weights`` (NaN where no gene is defined).

    Weighted moments by matrix products (one BLAS call per moment, not one gather per resample);
    columns are centred on their full-sample mean first so the moments do not cancel. A gene whose
    resampled variance is below 1e-9 of its second moment is constant in that resample (undefined),
    as :func:`pearson_per_gene` treats an exactly constant column.
    """
    finite = np.isfinite(truth).all(axis=0) & np.isfinite(prediction).all(axis=0)
    t = np.where(finite, truth, 0.0)
    p = np.where(finite, prediction, 0.0)
    t, p = t - t.mean(axis=0), p - p.mean(axis=0)
    total = weights.sum(axis=1, keepdims=True)
    mean_t, mean_p = weights @ t / total, weights @ p / total
    square_t, square_p = weights @ (t * t) / total, weights @ (p * p) / total
    var_t, var_p = square_t - mean_t**2, square_p - mean_p**2
    covariance = weights @ (t * p) / total - mean_t * mean_p
    defined = finite & (var_t > 1e-9 * square_t) & (var_p > 1e-9 * square_p)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(defined, np.clip(covariance / np.sqrt(var_t * var_p), -1.0, 1.0), np.nan)
        counts = defined.sum(axis=1)
        return np.where(counts > 0, np.nansum(r, axis=1) / np.maximum(counts, 1), np.nan)


def _panel_pcc(truth: np.ndarray, prediction: np.ndarray) -> float:
    values = pearson_per_gene(truth, prediction)
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else math.nan


def _groups_of(groups: Sequence | None, n_spots: int) -> list[np.ndarray]:
    if groups is None:
        return [np.arange(n_spots)]
    groups = np.asarray(groups)
    if groups.shape != (n_spots,):
        raise ValueError(f"groups must name the slide of each of the {n_spots} spots, got shape {groups.shape}")
    return [np.flatnonzero(groups == name) for name in dict.fromkeys(groups.tolist())]


def _resampled_statistics(
    truth: np.ndarray, predictions: Sequence[np.ndarray], groups: list[np.ndarray], n_resamples: int, seed: int
) -> tuple[list[float], list[np.ndarray], str, int]:
    """Point estimates and resampled values of the (slide-averaged) panel PCC of each prediction."""
    per_slide = [[_panel_pcc(truth[rows], prediction[rows]) for rows in groups] for prediction in predictions]
    with np.errstate(invalid="ignore"):
        estimates = [float(np.nanmean(values)) if np.isfinite(values).any() else math.nan for values in per_slide]
    if len(groups) >= MIN_SLIDES_FOR_SLIDE_BOOTSTRAP:  # slides are the independent units: resample them
        weights = bootstrap_weights(len(groups), n_resamples, seed)
        resampled = []
        for values in per_slide:
            values = np.asarray(values)
            present = np.isfinite(values)
            drawn = weights[:, present]
            with np.errstate(invalid="ignore", divide="ignore"):
                resampled.append(drawn @ values[present] / drawn.sum(axis=1))
        return estimates, resampled, "slides", len(groups)
    # spots within each slide (stratified), the slide means averaged as the estimate is
    sums = [np.zeros(n_resamples) for _ in predictions]
    counts = [np.zeros(n_resamples) for _ in predictions]
    for index, rows in enumerate(groups):
        for start in range(0, n_resamples, _RESAMPLE_BLOCK):
            block = bootstrap_weights(len(rows), min(_RESAMPLE_BLOCK, n_resamples - start), seed + 7919 * index + start)
            for k, prediction in enumerate(predictions):
                values = _weighted_panel_pcc(truth[rows], prediction[rows], block)
                stop = start + len(values)
                sums[k][start:stop] += np.nan_to_num(values)
                counts[k][start:stop] += np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = [np.where(c > 0, s / c, np.nan) for s, c in zip(sums, counts, strict=True)]
    return estimates, resampled, "spots", int(sum(len(rows) for rows in groups))


def _percentile_ci(
    estimate: float, values: np.ndarray, level: float, unit: str, n_units: int, seed: int
) -> BootstrapCI:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not math.isfinite(estimate) or values.size == 0:
        return BootstrapCI(estimate, math.nan, math.nan, level, unit, n_units, int(values.size), seed)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(
        float(estimate), float(low), float(high), float(level), unit, int(n_units), int(values.size), int(seed)
    )


def bootstrap_panel_pcc(
    truth: np.ndarray,
    prediction: np.ndarray,
    *,
    groups: Sequence | None = None,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> BootstrapCI:
    """The fixed-panel PCC (mean per-gene Pearson r over the columns given) with a bootstrap interval.

    Pass only the panel's columns. Without ``groups`` the spots of one slide are resampled. With
    ``groups`` (the slide of each spot) the estimate is the mean of the slides' panel PCCs; slides
    are resampled when there are at least :data:`MIN_SLIDES_FOR_SLIDE_BOOTSTRAP`, else spots within
    each slide. The estimate equals :func:`fixed_panel_pcc`'s mean (undefined genes left out).
    """
    truth, prediction = _as_pair(truth, prediction)
    rows = _groups_of(groups, truth.shape[0])
    (estimate,), (values,), unit, n_units = _resampled_statistics(truth, [prediction], rows, n_resamples, seed)
    return _percentile_ci(estimate, values, level, unit, n_units, seed)


def paired_bootstrap_panel_pcc(
    truth: np.ndarray,
    prediction_a: np.ndarray,
    prediction_b: np.ndarray,
    *,
    groups: Sequence | None = None,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
    truth_b: np.ndarray | None = None,
) -> BootstrapCI:
    """Fixed-panel PCC of ``a`` minus that of ``b``, both scored on the *same* resampled spots (or slides).

    Pairing removes the luck of which spots are hard, which both predictions share, so the interval
    of the difference is far narrower than the two separate intervals suggest. Identical
    predictions give exactly [0, 0]. ``truth_b``: ``b``'s truth when it lives in another target
    space (default ``truth``).
    """
    truth, prediction_a = _as_pair(truth, prediction_a)
    truth_b, prediction_b = _as_pair(truth if truth_b is None else truth_b, prediction_b)
    rows = _groups_of(groups, truth.shape[0])
    if truth_b is truth:
        estimates, resampled, unit, n_units = _resampled_statistics(
            truth, [prediction_a, prediction_b], rows, n_resamples, seed
        )
    else:
        (estimate_a,), (values_a,), unit, n_units = _resampled_statistics(
            truth, [prediction_a], rows, n_resamples, seed
        )
        (estimate_b,), (values_b,), _, _ = _resampled_statistics(truth_b, [prediction_b], rows, n_resamples, seed)
        estimates, resampled = [estimate_a, estimate_b], [values_a, values_b]
    return _percentile_ci(estimates[0] - estimates[1], resampled[0] - resampled[1], level, unit, n_units, seed)

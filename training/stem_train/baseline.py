"""``stem-train baseline``: the yardsticks every Stem result is shown next to.

* **ridge probe** — HEST-Bench's linear probe (``hest/bench``): ``StandardScaler`` → ``PCA(256)``
  fitted on the training spots → ``Ridge(solver="lsqr", alpha=100 / (n_components · n_genes),
  fit_intercept=False, max_iter=1000)``. As in HEST-Bench the targets are not centred, so without
  an intercept the probe predicts roughly centred values: its PCC is meaningful, its MSE/MAE are
  not (``--fit-intercept`` fixes that, at the price of differing from HEST-Bench).
* **CV ridge** — the same probe with alpha chosen by cross-validation over a log grid on the
  training slides only, folds grouped by slide (no slide in two folds): the fixed alpha is orders of
  magnitude below the cross-validated one on HEST-Bench (mahmoodlab/HEST PR #140), which understates
  what a linear probe can do.
* **kNN** — k-nearest-neighbour regression on the same standardised PCA embeddings, k chosen by the
  same grouped cross-validation (the Stem paper's ablation baseline).
* **per-gene mean** — every spot gets the training mean of each gene: the best constant, so it has
  no spatial signal and its per-gene PCC is undefined (reported as such, never as 0).

Cross-validation scores a setting by the mean per-gene Pearson r on the held-out fold, the metric
the baselines are finally compared on.

Both are trained on the prepared folder's *train* slides (original patch embeddings, not the
dihedral augmentations) and scored on its *test* slides exactly like ``stem-train evaluate``
scores a Stem prediction: same files, same report, same plots.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import DatasetError, StemError, describe_path
from napari_stem.validate import POSITIVE_INT

METHODS = ("ridge", "cv-ridge", "knn", "mean")
METHOD_LABELS = {
    "ridge": "ridge probe (HEST-Bench)",
    "cv-ridge": "ridge, alpha by slide-grouped CV",
    "knn": "kNN on embeddings, k by slide-grouped CV",
    "mean": "per-gene mean",
}
DEFAULT_PCA_COMPONENTS = 256
#: Ridge alphas tried by cross-validation (the fixed HEST-Bench alpha is added to them): wide, because the
#: cross-validated optimum on HEST-Bench (~5000) sits six decades above the fixed one (~0.008).
ALPHA_GRID = tuple(float(10.0**e) for e in range(-3, 7))
#: Neighbour counts tried by cross-validation (those above a fold's training spots are skipped).
K_GRID = (1, 3, 5, 10, 20, 50, 100)
CV_FOLDS = 5
#: The slide name of summary rows that pool every test slide.
ALL_SLIDES = "all"
SUMMARY_COLUMNS = (
    "method",
    "slide",
    "n_spots",
    "fixed_panel_pcc",
    "fixed_panel_pcc_low",
    "fixed_panel_pcc_high",
    "ci_unit",
    "fixed_panel_nan",
    "pcc_10",
    "pcc_50",
    "pcc_200",
    "mse",
    "mae",
    "rvd",
)


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "baseline",
        help="HEST-Bench ridge probe and per-gene mean on a prepared folder, scored like evaluate",
        description=(
            "Train the baselines on the train slides of a prepared folder (stem-train prepare) and score them "
            "on its test slides with exactly the metrics, report and plots of 'stem-train evaluate'.\n\n"
            "ridge: HEST-Bench's linear probe on the original patch embeddings (StandardScaler, PCA to 256 "
            "components fitted on the training spots, Ridge with solver lsqr, alpha = 100 / (components x genes), "
            "no intercept, as in hest/bench/trainer.py).\n"
            "cv-ridge: the same probe, alpha chosen from 1e-3 ... 1e6 (and the fixed alpha) by cross-validation on "
            "the training slides only, folds grouped by slide, scored by mean per-gene Pearson r.\n"
            "knn: k-nearest-neighbour regression on the same standardised PCA embeddings, k from "
            f"{', '.join(map(str, K_GRID))} chosen by the same cross-validation.\n"
            "mean: the training mean of every gene at every spot (no spatial signal; its PCC is undefined).\n\n"
            "Targets are the selected genes' raw counts as log2(1 + count), like Stem's; training spots whose "
            "selected genes are all zero are dropped, as Stem's trainer does. Both are point predictions, so "
            "calibration is reported as not applicable (their variance layer is 0).\n\n"
            "Every fixed-panel PCC comes with a seeded bootstrap 95% CI (spots resampled; slides for the pooled "
            "'all' row when there are 3 or more test slides).\n\n"
            "Writes OUT/<method>/<slide>.h5ad (same layout as stem-train predict), OUT/<method>/<slide>/report.json "
            "with per_gene.tsv and plots, and OUT/summary.tsv + summary.json comparing all of them. Pass OUT to "
            "'stem-train evaluate --baselines OUT' for a paired verdict of a Stem prediction against the best of them."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prepared",
        type=Path,
        metavar="PREP_DIR",
        help="folder written by 'stem-train prepare' (manifest.json, embeddings/)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="output folder (default: PREP_DIR/baselines)"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        metavar="M,M",
        help=f"which baselines, comma-separated from {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--genes-panel",
        type=Path,
        default=None,
        metavar="FILE",
        help="gene panel of the fixed-panel PCC, one symbol per line (default: all selected genes)",
    )
    parser.add_argument(
        "--pca-components",
        type=POSITIVE_INT,
        default=DEFAULT_PCA_COMPONENTS,
        help="PCA components before the ridge (default: 256, HEST-Bench; capped at the number of training spots and embedding dimensions)",
    )
    parser.add_argument(
        "--fit-intercept",
        action="store_true",
        help="let the ridge fit an intercept (HEST-Bench does not; without it MSE/MAE of the probe are not meaningful)",
    )
    parser.add_argument(
        "--target-transform",
        choices=("log2p1", "log1p"),
        default="log2p1",
        help="count transform of the targets: log2p1 as Stem (default) or log1p as HEST-Bench",
    )
    parser.add_argument(
        "--cv-folds",
        type=POSITIVE_INT,
        default=CV_FOLDS,
        help=f"cross-validation folds of cv-ridge and knn, grouped by training slide (default: {CV_FOLDS}, "
        "capped at the number of training slides)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PCA / ridge random state and bootstrap seed (default: 0)")
    parser.add_argument("--no-plots", action="store_true", help="write reports and tables without PNG plots")
    return parser


def run(args: argparse.Namespace) -> int:
    from stem_train.evaluate import read_gene_panel

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise StemError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}.")
    panel = read_gene_panel(args.genes_panel) if args.genes_panel is not None else None
    rows = run_baselines(
        args.prepared,
        args.out,
        methods=methods,
        panel=panel,
        panel_source=str(args.genes_panel) if panel else None,
        pca_components=args.pca_components,
        fit_intercept=args.fit_intercept,
        target_transform=args.target_transform,
        seed=args.seed,
        plots=not args.no_plots,
        cv_folds=args.cv_folds,
    )
    print_summary(rows)
    return 0


# ---------------------------------------------------------------------- data
def load_split(manifest: Any, split: str, transform: str) -> list[dict[str, Any]]:
    """Per slide of ``split``: original embeddings (n, D), targets (n, G) and the st h5ad path.

    Read through ``fit``'s own loaders (:mod:`stem_train.data`) so the baselines see the same
    spots, counts and embeddings as the Stem model.
    """
    from napari_stem import metrics
    from stem_train.data import slide_counts, slide_embeddings

    slides = []
    for slide in manifest.split(split):
        cache = slide_embeddings(manifest, slide, augmented=False)
        counts = slide_counts(manifest, slide).astype(np.float64)
        slides.append(
            {
                "sample_id": slide.sample_id,
                "embeddings": np.asarray(cache.embeddings, dtype=np.float64),
                "targets": metrics.to_target_space(counts, transform),
                "expressed": ~(np.isnan(counts).all(axis=1) | (np.nansum(counts, axis=1) == 0)),
                "st_path": manifest.st_path(slide),
            }
        )
    return slides


# ---------------------------------------------------------------------- models
def _components(n_components: int, embeddings: np.ndarray) -> int:
    return int(min(n_components, embeddings.shape[0], embeddings.shape[1]))


def hest_bench_alpha(n_components: int, n_genes: int) -> float:
    """HEST-Bench's fixed ridge alpha, 100 / (components · genes)."""
    return 100.0 / (n_components * n_genes)


def _pipeline(model: Any, n_components: int, seed: int) -> Any:
    """StandardScaler → PCA → ``model``: the probe's features, shared by every embedding baseline."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [("scaler", StandardScaler()), ("pca", PCA(n_components=n_components, random_state=seed)), ("model", model)]
    )


def _ridge(alpha: float, fit_intercept: bool, seed: int) -> Any:
    from sklearn.linear_model import Ridge

    return Ridge(solver="lsqr", alpha=alpha, fit_intercept=fit_intercept, max_iter=1000, random_state=seed)


def _knn(k: int) -> Any:
    from sklearn.neighbors import KNeighborsRegressor

    return KNeighborsRegressor(n_neighbors=int(k))


def fit_ridge_probe(
    embeddings: np.ndarray,
    targets: np.ndarray,
    *,
    n_components: int = DEFAULT_PCA_COMPONENTS,
    fit_intercept: bool = False,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """HEST-Bench's probe fitted on training spots; returns (sklearn pipeline, its settings)."""
    components = _components(n_components, embeddings)
    alpha = hest_bench_alpha(components, targets.shape[1])
    pipeline = _pipeline(_ridge(alpha, fit_intercept, seed), components, seed)
    pipeline.fit(embeddings, targets)
    settings = {
        "pca_components": components,
        "pca_components_requested": int(n_components),
        "alpha": alpha,
        "solver": "lsqr",
        "fit_intercept": bool(fit_intercept),
        "max_iter": 1000,
        "seed": int(seed),
    }
    return pipeline, settings


@dataclass(frozen=True)
class CVChoice:
    """What cross-validation tried and chose: one score per grid value (mean over folds of the
    held-out fold's mean per-gene Pearson r; NaN where undefined or not tried)."""

    parameter: str
    grid: list[float]
    scores: list[float]
    chosen: float
    folds: str
    n_folds: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grouped_folds(groups: np.ndarray, n_folds: int = CV_FOLDS) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(train rows, validation rows) per fold, and how they were made.

    Folds are whole training slides (``GroupKFold``), so a setting is judged on slides it was not
    fitted on, as the test slides will be. With a single training slide there is no other slide to
    hold out: contiguous blocks of its spots stand in (said so in the description).
    """
    from sklearn.model_selection import GroupKFold, KFold

    groups = np.asarray(groups)
    names = list(dict.fromkeys(groups.tolist()))
    if len(names) >= 2:
        folds = min(n_folds, len(names))
        splits = list(GroupKFold(n_splits=folds).split(groups, groups=groups))
        return splits, f"{folds} folds of whole training slides (GroupKFold over {len(names)} slides)"
    folds = max(2, min(n_folds, len(groups)))
    splits = list(KFold(n_splits=folds, shuffle=False).split(groups))
    return (
        splits,
        f"{folds} contiguous blocks of spots of the one training slide {names[0]} (no second slide to hold out)",
    )


def _knn_grid_predictions(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, ks: list[float]
) -> dict[float, np.ndarray]:
    """``KNeighborsRegressor(k).predict`` for every usable k of ``ks`` from one neighbour search.

    The k nearest are the first k of the largest k's neighbours (sorted by distance), so one
    query and a running sum serve the whole grid instead of a search per k.
    """
    from sklearn.neighbors import NearestNeighbors

    usable = sorted(int(k) for k in ks if int(k) <= len(x_train))
    if not usable:
        return {}
    neighbours = NearestNeighbors(n_neighbors=usable[-1]).fit(x_train).kneighbors(x_val, return_distance=False)
    total = np.zeros((len(x_val), y_train.shape[1]))
    predictions = {}
    for j in range(usable[-1]):
        total += y_train[neighbours[:, j]]
        if j + 1 in usable:
            predictions[float(j + 1)] = total / (j + 1)
    return predictions


def cross_validate(
    embeddings: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    make_model: Any,
    grid: list[float],
    parameter: str,
    *,
    n_components: int,
    seed: int,
    n_folds: int = CV_FOLDS,
    predict_grid: Any = None,
) -> CVChoice:
    """Score every ``grid`` value of ``make_model(value)`` by grouped cross-validation on the training spots.

    The scaler and PCA are refitted on each fold's training rows only (no peeking at the fold
    held out). ``predict_grid(x_train, y_train, x_val, grid)``, when given, returns the fold's
    predictions for every value it can fit at once ({value: prediction}); values it leaves out
    (k above the fold's spots) stay unscored.
    """
    from napari_stem.metrics import pearson_per_gene

    splits, description = grouped_folds(groups, n_folds)
    scores = np.full((len(splits), len(grid)), np.nan)
    for f, (train_rows, val_rows) in enumerate(splits):
        components = _components(n_components, embeddings[train_rows])
        features = _pipeline("passthrough", components, seed).fit(embeddings[train_rows])
        x_train, x_val = features.transform(embeddings[train_rows]), features.transform(embeddings[val_rows])
        if predict_grid is not None:
            predictions = predict_grid(x_train, targets[train_rows], x_val, grid)
        else:
            predictions = {value: make_model(value).fit(x_train, targets[train_rows]).predict(x_val) for value in grid}
        for j, value in enumerate(grid):
            if float(value) not in predictions:
                continue
            pcc = pearson_per_gene(targets[val_rows], predictions[float(value)])
            if np.isfinite(pcc).any():
                scores[f, j] = np.nanmean(pcc)
    with warnings.catch_warnings():  # a grid value no fold could fit is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_scores = np.nanmean(scores, axis=0)
    if not np.isfinite(mean_scores).any():
        raise StemError(
            f"cross-validation of {parameter} found no setting with a defined PCC on any fold ({description}); "
            "the training genes may be constant. Check the prepared folder's gene panel."
        )
    chosen = grid[int(np.nanargmax(mean_scores))]
    return CVChoice(
        parameter, [float(v) for v in grid], [float(v) for v in mean_scores], float(chosen), description, len(splits)
    )


def fit_cv_ridge(
    embeddings: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    *,
    n_components: int = DEFAULT_PCA_COMPONENTS,
    fit_intercept: bool = False,
    seed: int = 0,
    alphas: tuple[float, ...] = ALPHA_GRID,
    n_folds: int = CV_FOLDS,
) -> tuple[Any, dict[str, Any]]:
    """The HEST-Bench probe with alpha chosen by slide-grouped CV on the training spots (the fixed
    alpha is one of the candidates); refitted on all training spots. Returns (pipeline, settings)."""
    components = _components(n_components, embeddings)
    fixed = hest_bench_alpha(components, targets.shape[1])
    grid = sorted({*map(float, alphas), fixed})
    choice = cross_validate(
        embeddings,
        targets,
        groups,
        lambda a: _ridge(a, fit_intercept, seed),
        grid,
        "alpha",
        n_components=n_components,
        seed=seed,
        n_folds=n_folds,
    )
    pipeline = _pipeline(_ridge(choice.chosen, fit_intercept, seed), components, seed).fit(embeddings, targets)
    settings = {
        "pca_components": components,
        "pca_components_requested": int(n_components),
        "alpha": choice.chosen,
        "hest_bench_alpha": fixed,
        "cv": choice.to_dict(),
        "solver": "lsqr",
        "fit_intercept": bool(fit_intercept),
        "max_iter": 1000,
        "seed": int(seed),
    }
    return pipeline, settings


def fit_knn(
    embeddings: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    *,
    n_components: int = DEFAULT_PCA_COMPONENTS,
    seed: int = 0,
    ks: tuple[int, ...] = K_GRID,
    n_folds: int = CV_FOLDS,
) -> tuple[Any, dict[str, Any]]:
    """k-nearest-neighbour regression (uniform mean of the k nearest training spots' targets) on the
    standardised PCA embeddings, k chosen by slide-grouped CV; refitted on all training spots."""
    components = _components(n_components, embeddings)
    grid = sorted({int(k) for k in ks if int(k) <= len(embeddings)}) or [len(embeddings)]
    choice = cross_validate(
        embeddings,
        targets,
        groups,
        _knn,
        grid,
        "k",
        n_components=n_components,
        seed=seed,
        n_folds=n_folds,
        predict_grid=_knn_grid_predictions,
    )
    k = int(choice.chosen)
    pipeline = _pipeline(_knn(k), components, seed).fit(embeddings, targets)
    settings = {
        "pca_components": components,
        "pca_components_requested": int(n_components),
        "k": k,
        "weights": "uniform",
        "metric": "euclidean on standardised PCA embeddings",
        "cv": choice.to_dict(),
        "seed": int(seed),
    }
    return pipeline, settings


# ---------------------------------------------------------------------- run
def run_baselines(
    prepared: str | Path,
    out: str | Path | None = None,
    *,
    methods: list[str] | tuple[str, ...] = METHODS,
    panel: list[str] | None = None,
    panel_source: str | None = None,
    pca_components: int = DEFAULT_PCA_COMPONENTS,
    fit_intercept: bool = False,
    target_transform: str = "log2p1",
    seed: int = 0,
    plots: bool = True,
    cv_folds: int = CV_FOLDS,
) -> list[dict[str, Any]]:
    """Fit, predict, write and evaluate every baseline; returns the summary rows (also written).

    One row per method and test slide, plus a pooled ``all`` row per method when there are several
    test slides (mean of the slides' fixed-panel PCCs; its CI resamples slides from three on).
    """
    from stem_train.evaluate import evaluate_files
    from stem_train.manifest import PreparedDataset

    manifest = PreparedDataset.load(prepared)
    out = Path(out) if out is not None else Path(manifest.root) / "baselines"
    if not manifest.split("train") or not manifest.split("test"):
        raise DatasetError(
            f"prepared folder {describe_path(prepared)} needs train and test slides (has {len(manifest.split('train'))} train, "
            f"{len(manifest.split('test'))} test); re-run 'stem-train prepare' with held-out slides."
        )
    if panel is not None:
        missing = [g for g in panel if g not in set(manifest.genes)]
        if missing:
            raise StemError(
                f"gene panel {describe_path(panel_source or 'panel')} names genes not selected in {describe_path(prepared)}: {', '.join(missing[:10])}."
            )
    train = load_split(manifest, "train", target_transform)
    test = load_split(manifest, "test", target_transform)
    x_train = np.concatenate([s["embeddings"] for s in train])
    expressed = np.concatenate([s["expressed"] for s in train])
    y_train = np.concatenate([s["targets"] for s in train])
    groups = np.concatenate([np.full(len(s["targets"]), s["sample_id"], dtype=object) for s in train])
    x_train, y_train, groups = x_train[expressed], y_train[expressed], groups[expressed]
    print(
        f"training on {len(y_train)} spots of {len(train)} slides ({int((~expressed).sum())} all-zero spots dropped), "
        f"{len(manifest.genes)} genes, {x_train.shape[1]}-d {manifest.encoder} embeddings"
    )

    predictors: dict[str, Any] = {}
    settings: dict[str, dict[str, Any]] = {}
    if "ridge" in methods:
        pipeline, settings["ridge"] = fit_ridge_probe(
            x_train, y_train, n_components=pca_components, fit_intercept=fit_intercept, seed=seed
        )
        predictors["ridge"] = pipeline.predict
    if "cv-ridge" in methods:
        pipeline, settings["cv-ridge"] = fit_cv_ridge(
            x_train,
            y_train,
            groups,
            n_components=pca_components,
            fit_intercept=fit_intercept,
            seed=seed,
            n_folds=cv_folds,
        )
        predictors["cv-ridge"] = pipeline.predict
        print(
            f"cv-ridge: alpha {settings['cv-ridge']['alpha']:.3g} (HEST-Bench's fixed {settings['cv-ridge']['hest_bench_alpha']:.3g}) "
            f"by {settings['cv-ridge']['cv']['folds']}"
        )
    if "knn" in methods:
        pipeline, settings["knn"] = fit_knn(
            x_train, y_train, groups, n_components=pca_components, seed=seed, n_folds=cv_folds
        )
        predictors["knn"] = pipeline.predict
        print(f"knn: k {settings['knn']['k']} by {settings['knn']['cv']['folds']}")
    if "mean" in methods:
        gene_means = y_train.mean(axis=0)
        predictors["mean"] = lambda x, m=gene_means: np.broadcast_to(m, (len(x), len(m))).copy()
        settings["mean"] = {}

    panel_columns = [manifest.genes.index(g) for g in panel] if panel is not None else list(range(len(manifest.genes)))
    rows = []
    for method in methods:
        pooled = []
        for slide in test:
            mean = np.asarray(predictors[method](slide["embeddings"]), dtype=np.float32)
            provenance = {
                "model": METHOD_LABELS[method],
                "baseline": method,
                **settings[method],
                "target_transform": target_transform,
                "prepared": str(Path(manifest.root).resolve()),
                "encoder": manifest.encoder,
                "train_slides": [s["sample_id"] for s in train],
                "n_train_spots": int(len(y_train)),
                "variance": "0: point prediction, no uncertainty",
            }
            h5ad = _write_baseline_prediction(
                out / method / f"{slide['sample_id']}.h5ad", mean, manifest, slide, provenance
            )
            notes = []
            if method in ("ridge", "cv-ridge") and not fit_intercept:
                notes.append(
                    "ridge without intercept, as HEST-Bench: predictions are roughly centred, so MSE/MAE are not meaningful"
                )
            if method == "mean":
                notes.append("per-gene mean: constant over spots, so every PCC is undefined by construction")
            report = evaluate_files(
                h5ad,
                slide["st_path"],
                out / method / slide["sample_id"],
                panel=panel,
                panel_source=panel_source,
                target_transform=target_transform,
                plots=plots,
                title=f"{slide['sample_id']}: {METHOD_LABELS[method]}",
                notes=notes,
                bootstrap_seed=seed,
            )
            rows.append(summary_row(method, slide["sample_id"], report))
            pooled.append((slide["targets"][:, panel_columns], mean[:, panel_columns]))
        if len(test) > 1:
            rows.append(pooled_row(method, pooled, seed))
    _write_summary(rows, out)
    return rows


def _write_baseline_prediction(path: Path, mean: np.ndarray, manifest: Any, slide: dict, provenance: dict) -> Path:
    from napari_stem.export import write_prediction
    from napari_stem.hest import hest_sample
    from napari_stem.spots import read_spots_h5ad
    from napari_stem.values import Prediction

    prediction = Prediction(mean=mean, variance=np.zeros_like(mean), genes=list(manifest.genes), metadata=provenance)
    spots = read_spots_h5ad(slide["st_path"])
    try:
        wsi = hest_sample(manifest.data_dir, slide["sample_id"]).open_slide()
    except StemError:  # no slide image: the prediction is still complete, only without a thumbnail
        wsi = None
    try:
        return write_prediction(path, prediction, spots, wsi)
    finally:
        if wsi is not None:
            wsi.close()


def summary_row(method: str, slide: str, report: dict) -> dict[str, Any]:
    """One line of the comparison table from an evaluate report."""
    reference = report["reference_metrics"]
    fixed = report["fixed_panel_pcc"]
    ci = fixed.get("ci") or {}
    return {
        "method": method,
        "slide": slide,
        "n_spots": report["n_spots"],
        "fixed_panel_pcc": fixed["mean"],
        "fixed_panel_pcc_low": ci.get("low", math.nan),
        "fixed_panel_pcc_high": ci.get("high", math.nan),
        "ci_unit": ci.get("unit", ""),
        "fixed_panel_nan": len(fixed["nan_genes"]),
        **{f"pcc_{k}": reference.get(f"pcc_{k}") for k in (10, 50, 200)},
        "mse": reference["mse"],
        "mae": reference["mae"],
        "rvd": reference["rvd"],
    }


def pooled_row(method: str, slides: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> dict[str, Any]:
    """The ``all`` row of a method: mean over test slides of the fixed-panel PCC, with its bootstrap CI
    (slides resampled from three slides on, else spots within each slide)."""
    from napari_stem.metrics import bootstrap_panel_pcc

    truth = np.concatenate([t for t, _ in slides])
    prediction = np.concatenate([p for _, p in slides])
    groups = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(slides)])
    ci = bootstrap_panel_pcc(truth, prediction, groups=groups, seed=seed)
    return {
        "method": method,
        "slide": ALL_SLIDES,
        "n_spots": int(len(truth)),
        "fixed_panel_pcc": ci.estimate,
        "fixed_panel_pcc_low": ci.low,
        "fixed_panel_pcc_high": ci.high,
        "ci_unit": ci.unit,
        "fixed_panel_nan": math.nan,
        **{f"pcc_{k}": math.nan for k in (10, 50, 200)},
        "mse": math.nan,
        "mae": math.nan,
        "rvd": math.nan,
    }


def _write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    from stem_train.evaluate import _json_ready

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).to_csv(
        out / "summary.tsv", sep="\t", index=False, na_rep="NaN", float_format="%.6g"
    )
    (out / "summary.json").write_text(
        json.dumps(
            _json_ready(
                {
                    "note": "fixed_panel_pcc is the primary number, with its bootstrap 95% CI (fixed_panel_pcc_low/high; ci_unit "
                    "says whether spots or slides were resampled); pcc_k ranks genes by test PCC (optimistic). The per-gene mean "
                    "has no spatial signal, so its PCC is undefined (NaN/null), not 0. Rows of slide 'all' pool the test slides "
                    "(mean of their fixed-panel PCCs).",
                    "rows": rows,
                }
            ),
            indent=2,
        )
    )


def print_summary(rows: list[dict[str, Any]]) -> None:
    from stem_train.evaluate import _fmt

    header = ("method", "slide", "panel PCC [95% CI]", "PCC-10", "PCC-50", "PCC-200", "MSE", "MAE", "RVD")
    lines = [header] + [
        (
            METHOD_LABELS.get(r["method"], r["method"]),
            r["slide"],
            _fmt_ci(r) + (f" ({r['fixed_panel_nan']} NaN)" if _positive(r["fixed_panel_nan"]) else ""),
            _fmt(r["pcc_10"]),
            _fmt(r["pcc_50"]),
            _fmt(r["pcc_200"]),
            _fmt(r["mse"]),
            _fmt(r["mae"]),
            _fmt(r["rvd"]),
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _fmt_ci(row: dict[str, Any]) -> str:
    from stem_train.evaluate import _fmt

    low, high = row.get("fixed_panel_pcc_low"), row.get("fixed_panel_pcc_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return _fmt(row["fixed_panel_pcc"])
    return f"{_fmt(row['fixed_panel_pcc'])} [{_fmt(low)}, {_fmt(high)}] ({row['ci_unit']})"

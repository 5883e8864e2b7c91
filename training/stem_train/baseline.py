"""``stem-train baseline``: the yardsticks every Stem result is shown next to.

* **ridge probe** — HEST-Bench's linear probe (``hest/bench``): ``StandardScaler`` → ``PCA(256)``
  fitted on the training spots → ``Ridge(solver="lsqr", alpha=100 / (n_components · n_genes),
  fit_intercept=False, max_iter=1000)``. As in HEST-Bench the targets are not centred, so without
  an intercept the probe predicts roughly centred values: its PCC is meaningful, its MSE/MAE are
  not (``--fit-intercept`` fixes that, at the price of differing from HEST-Bench).
* **per-gene mean** — every spot gets the training mean of each gene: the best constant, so it has
  no spatial signal and its per-gene PCC is undefined (reported as such, never as 0).

Both are trained on the prepared folder's *train* slides (original patch embeddings, not the
dihedral augmentations) and scored on its *test* slides exactly like ``stem-train evaluate``
scores a Stem prediction: same files, same report, same plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import DatasetError, StemError, describe_path
from napari_stem.validate import POSITIVE_INT

METHODS = ("ridge", "mean")
METHOD_LABELS = {"ridge": "ridge probe (HEST-Bench)", "mean": "per-gene mean"}
DEFAULT_PCA_COMPONENTS = 256
SUMMARY_COLUMNS = ("method", "slide", "n_spots", "fixed_panel_pcc", "fixed_panel_nan", "pcc_10", "pcc_50", "pcc_200", "mse", "mae", "rvd")


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
            "mean: the training mean of every gene at every spot (no spatial signal; its PCC is undefined).\n\n"
            "Targets are the selected genes' raw counts as log2(1 + count), like Stem's; training spots whose "
            "selected genes are all zero are dropped, as Stem's trainer does. Both are point predictions, so "
            "calibration is reported as not applicable (their variance layer is 0).\n\n"
            "Writes OUT/<method>/<slide>.h5ad (same layout as stem-train predict), OUT/<method>/<slide>/report.json "
            "with per_gene.tsv and plots, and OUT/summary.tsv + summary.json comparing all of them."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prepared", type=Path, metavar="PREP_DIR", help="folder written by 'stem-train prepare' (manifest.json, embeddings/)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default: PREP_DIR/baselines)")
    parser.add_argument("--methods", default=",".join(METHODS), metavar="M,M", help=f"which baselines, comma-separated from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--genes-panel", type=Path, default=None, metavar="FILE",
                        help="gene panel of the fixed-panel PCC, one symbol per line (default: all selected genes)")
    parser.add_argument("--pca-components", type=POSITIVE_INT, default=DEFAULT_PCA_COMPONENTS,
                        help="PCA components before the ridge (default: 256, HEST-Bench; capped at the number of training spots and embedding dimensions)")
    parser.add_argument("--fit-intercept", action="store_true",
                        help="let the ridge fit an intercept (HEST-Bench does not; without it MSE/MAE of the probe are not meaningful)")
    parser.add_argument("--target-transform", choices=("log2p1", "log1p"), default="log2p1",
                        help="count transform of the targets: log2p1 as Stem (default) or log1p as HEST-Bench")
    parser.add_argument("--seed", type=int, default=0, help="PCA / ridge random state (default: 0)")
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
        args.prepared, args.out, methods=methods, panel=panel, panel_source=str(args.genes_panel) if panel else None,
        pca_components=args.pca_components, fit_intercept=args.fit_intercept, target_transform=args.target_transform,
        seed=args.seed, plots=not args.no_plots,
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
        slides.append({
            "sample_id": slide.sample_id,
            "embeddings": np.asarray(cache.embeddings, dtype=np.float64),
            "targets": metrics.to_target_space(counts, transform),
            "expressed": ~(np.isnan(counts).all(axis=1) | (np.nansum(counts, axis=1) == 0)),
            "st_path": manifest.st_path(slide),
        })
    return slides


# ---------------------------------------------------------------------- models
def fit_ridge_probe(embeddings: np.ndarray, targets: np.ndarray, *, n_components: int = DEFAULT_PCA_COMPONENTS,
                    fit_intercept: bool = False, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """HEST-Bench's probe fitted on training spots; returns (sklearn pipeline, its settings)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    components = int(min(n_components, embeddings.shape[0], embeddings.shape[1]))
    alpha = 100.0 / (components * targets.shape[1])
    pipeline = Pipeline([
        ("scaler", StandardScaler()),
        ("pca", PCA(n_components=components, random_state=seed)),
        ("ridge", Ridge(solver="lsqr", alpha=alpha, fit_intercept=fit_intercept, max_iter=1000, random_state=seed)),
    ])
    pipeline.fit(embeddings, targets)
    settings = {"pca_components": components, "pca_components_requested": int(n_components), "alpha": alpha,
                "solver": "lsqr", "fit_intercept": bool(fit_intercept), "max_iter": 1000, "seed": int(seed)}
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
) -> list[dict[str, Any]]:
    """Fit, predict, write and evaluate every baseline; returns the summary rows (also written)."""
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
            raise StemError(f"gene panel {describe_path(panel_source or 'panel')} names genes not selected in {describe_path(prepared)}: {', '.join(missing[:10])}.")
    train = load_split(manifest, "train", target_transform)
    test = load_split(manifest, "test", target_transform)
    x_train = np.concatenate([s["embeddings"] for s in train])
    expressed = np.concatenate([s["expressed"] for s in train])
    y_train = np.concatenate([s["targets"] for s in train])
    x_train, y_train = x_train[expressed], y_train[expressed]
    print(f"training on {len(y_train)} spots of {len(train)} slides ({int((~expressed).sum())} all-zero spots dropped), "
          f"{len(manifest.genes)} genes, {x_train.shape[1]}-d {manifest.encoder} embeddings")

    predictors: dict[str, Any] = {}
    settings: dict[str, dict[str, Any]] = {}
    if "ridge" in methods:
        pipeline, settings["ridge"] = fit_ridge_probe(x_train, y_train, n_components=pca_components, fit_intercept=fit_intercept, seed=seed)
        predictors["ridge"] = pipeline.predict
    if "mean" in methods:
        gene_means = y_train.mean(axis=0)
        predictors["mean"] = lambda x, m=gene_means: np.broadcast_to(m, (len(x), len(m))).copy()
        settings["mean"] = {}

    rows = []
    for method in methods:
        for slide in test:
            mean = np.asarray(predictors[method](slide["embeddings"]), dtype=np.float32)
            provenance = {
                "model": METHOD_LABELS[method], "baseline": method, **settings[method],
                "target_transform": target_transform, "prepared": str(Path(manifest.root).resolve()),
                "encoder": manifest.encoder, "train_slides": [s["sample_id"] for s in train],
                "n_train_spots": int(len(y_train)), "variance": "0: point prediction, no uncertainty",
            }
            h5ad = _write_baseline_prediction(out / method / f"{slide['sample_id']}.h5ad", mean, manifest, slide, provenance)
            notes = []
            if method == "ridge" and not fit_intercept:
                notes.append("ridge without intercept, as HEST-Bench: predictions are roughly centred, so MSE/MAE are not meaningful")
            if method == "mean":
                notes.append("per-gene mean: constant over spots, so every PCC is undefined by construction")
            report = evaluate_files(
                h5ad, slide["st_path"], out / method / slide["sample_id"], panel=panel, panel_source=panel_source,
                target_transform=target_transform, plots=plots, title=f"{slide['sample_id']}: {METHOD_LABELS[method]}",
                notes=notes,
            )
            rows.append(summary_row(method, slide["sample_id"], report))
    _write_summary(rows, out)
    return rows


def _write_baseline_prediction(path: Path, mean: np.ndarray, manifest: Any, slide: dict, provenance: dict) -> Path:
    from napari_stem.anndata_io import write_prediction
    from napari_stem.hest import hest_sample
    from napari_stem.sampling import Prediction
    from napari_stem.spots import read_spots_h5ad

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
    return {
        "method": method, "slide": slide, "n_spots": report["n_spots"],
        "fixed_panel_pcc": fixed["mean"], "fixed_panel_nan": len(fixed["nan_genes"]),
        **{f"pcc_{k}": reference.get(f"pcc_{k}") for k in (10, 50, 200)},
        "mse": reference["mse"], "mae": reference["mae"], "rvd": reference["rvd"],
    }


def _write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    from stem_train.evaluate import _json_ready

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).to_csv(out / "summary.tsv", sep="\t", index=False, na_rep="NaN", float_format="%.6g")
    (out / "summary.json").write_text(json.dumps(_json_ready({
        "note": "fixed_panel_pcc is the primary number; pcc_k ranks genes by test PCC (optimistic). The per-gene mean "
        "has no spatial signal, so its PCC is undefined (NaN/null), not 0.",
        "rows": rows,
    }), indent=2))


def print_summary(rows: list[dict[str, Any]]) -> None:
    from stem_train.evaluate import _fmt

    header = ("method", "slide", "panel PCC", "PCC-10", "PCC-50", "PCC-200", "MSE", "MAE", "RVD")
    lines = [header] + [
        (METHOD_LABELS.get(r["method"], r["method"]), r["slide"], _fmt(r["fixed_panel_pcc"]) + (f" ({r['fixed_panel_nan']} NaN)" if r["fixed_panel_nan"] else ""),
         _fmt(r["pcc_10"]), _fmt(r["pcc_50"]), _fmt(r["pcc_200"]), _fmt(r["mse"]), _fmt(r["mae"]), _fmt(r["rvd"]))
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))

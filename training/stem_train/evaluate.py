"""``stem-train evaluate``: score a prediction ``.h5ad`` against the measured expression.

The reference's metrics (PCC-10/50/200, MSE, MAE, RVD from ``eval.ipynb``) are reported next to the
honest ones: the mean PCC over a gene panel fixed in advance (the primary number), a per-gene
table, and, because Stem samples, calibration of the predictive distribution, including whether
the intervals the file writes cover what their labels say. Spots are matched
by barcode, never by row position, and the truth is brought into the prediction's target space
(log2(1 + raw counts) for the reference's models). See :mod:`napari_stem.metrics`.

Held-out figures are only worth something on tissue the model never saw and next to yardsticks
scored on the same spots, so the fixed-panel PCC carries a bootstrap CI, ``--baselines`` adds a
paired verdict against the best baseline of ``stem-train baseline``, and a leak check warns when
the test slide (id, image bytes or patient) is among the model's training slides.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.atomic import replace_atomically, write_text_atomically
from napari_stem.errors import SpotsError, StemError, describe_path
from napari_stem.validate import POSITIVE_INT, check_finite_counts, check_not_an_input, check_writable_folder

REPORT_FILE = "report.json"
PER_GENE_FILE = "per_gene.tsv"
DEFAULT_MARKERS = 4
#: Boolean column of the truth's var marking genes driven by the image (napari_stem.synthetic's data):
#: when present, PCC and the verdict are reported per gene kind too.
GENE_KIND_COLUMN = "synthetic_image_driven"


class EvaluationError(StemError):
    """A prediction and its truth cannot be compared (missing file, genes, barcodes, coordinates)."""


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a prediction .h5ad against measured expression (paper metrics + honest ones + calibration)",
        description=(
            "Compare a prediction .h5ad (from 'stem-train predict', 'baseline' or the napari plugin) with the "
            "measured expression of the same slide. Spots are matched by barcode; the truth's raw counts are "
            "brought into the prediction's target space (log2(1 + count) by default).\n\n"
            "Reported: the fixed-panel mean PCC (primary: mean per-gene Pearson r over a gene list chosen "
            "before testing, default all predicted genes); the Stem paper's PCC-10/50/200 (mean of the k genes "
            "with the best TEST correlation, chosen post hoc, so optimistic), MSE, MAE and RVD; and, when the "
            "prediction holds samples, quantile layers or a variance, the coverage of central 50% and 90% "
            "intervals, CRPS and the spread-error correlation. Genes whose PCC is undefined (constant on the "
            "slide) are listed, never silently dropped.\n\n"
            "The intervals written in the file (lo50/hi50, lo90/hi90 ..., or an older file's q05/q95 and q25/q75 "
            "pairs) are checked against the level they state: one whose coverage falls below its level by more "
            "than 3 binomial standard errors (n = spots, since a spot's genes are not independent) is reported "
            "as too narrow in the summary, the report's 'intervals_verdict' and its warnings; --strict-intervals "
            "makes that exit with status 1.\n\n"
            "The fixed-panel PCC comes with a seeded bootstrap 95% CI over the slide's spots (report: "
            "fixed_panel_pcc.ci); with --baselines DIR (from 'stem-train baseline') every baseline's prediction of this "
            "slide is scored on the same spots and panel and a one-line verdict gives this prediction's PCC minus the "
            "best baseline's with a paired bootstrap CI (report: verdict, baselines). When the truth marks image-driven "
            "genes (var['synthetic_image_driven']) PCC and verdict are also given per gene kind (pcc_by_gene_kind).\n\n"
            "Leak check: the test slide (sample id = the truth's file name, patient from HEST metadata/, SHA-256 of the "
            "slide image) is compared with the model's training slides from --prepared or the prediction's provenance; "
            "a shared id or image is a LEAK warning (held-out figures are not valid), a shared patient a note "
            "(report: leak_check, warnings).\n\n"
            "Writes OUT/report.json, OUT/per_gene.tsv and PNG plots: gene-variation curves (the paper's 2x2 "
            "figure), per-gene PCC bars, a calibration plot and marker-gene maps (truth and prediction on one "
            "colour scale, side by side, over the slide thumbnail)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prediction",
        type=Path,
        metavar="PRED.h5ad",
        help="prediction written by stem-train predict/baseline or the plugin",
    )
    parser.add_argument(
        "--truth",
        type=Path,
        required=True,
        metavar="ST.h5ad",
        help="measured expression of the same slide (HEST st/<id>.h5ad: raw counts in X, barcodes as obs names)",
    )
    parser.add_argument(
        "--genes-panel",
        type=Path,
        default=None,
        metavar="FILE",
        help="gene panel for the primary fixed-panel PCC, one symbol per line, fixed before looking at "
        "test results (default: all predicted genes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: PRED.evaluation/ next to the prediction)",
    )
    parser.add_argument(
        "--target-transform",
        choices=("log2p1", "log1p", "none"),
        default=None,
        help="how the truth's counts map to the prediction's space: log2p1 = log2(1 + count) as the "
        "reference Stem, log1p = ln(1 + count) as HEST-Bench, none = the truth is already transformed "
        "(default: what the prediction's provenance says, else log2p1)",
    )
    parser.add_argument(
        "--marker-genes",
        default=None,
        metavar="G1,G2",
        help=f"comma-separated genes to map (default: the {DEFAULT_MARKERS} panel genes with the highest "
        "truth variance, chosen without looking at the prediction)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write report.json and per_gene.tsv only")
    parser.add_argument(
        "--strict-intervals",
        action="store_true",
        help="exit with status 1 when a written interval covers less than its stated level (beyond "
        "sampling error); by default that is a warning in the report and the summary",
    )
    parser.add_argument(
        "--baselines",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder written by 'stem-train baseline' (DIR/<method>/<slide>.h5ad): score every baseline's "
        "prediction of this slide on the same spots and panel, and give a one-line verdict of this "
        "prediction against the best of them (paired bootstrap CI of the PCC difference)",
    )
    parser.add_argument(
        "--prepared",
        type=Path,
        default=None,
        metavar="PREP_DIR",
        help="the prepared folder the model was trained on: warn when the test slide's sample id, image "
        "(SHA-256) or patient is among its training slides (default: what the prediction's provenance names)",
    )
    parser.add_argument(
        "--bootstrap-resamples",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="resamples of the bootstrap confidence intervals (default: 1000)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="bootstrap seed: the same seed resamples the same spots (default: 0)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    panel = read_gene_panel(args.genes_panel) if args.genes_panel is not None else None
    markers = [g.strip() for g in args.marker_genes.split(",") if g.strip()] if args.marker_genes else None
    out = args.out if args.out is not None else args.prediction.with_suffix(".evaluation")
    check_not_an_input(out, (args.prediction, args.truth, args.genes_panel, args.baselines, args.prepared))
    check_writable_folder(out)
    from napari_stem.metrics import BOOTSTRAP_RESAMPLES

    report = evaluate_files(
        args.prediction,
        args.truth,
        out,
        panel=panel,
        panel_source=str(args.genes_panel) if panel else None,
        target_transform=args.target_transform,
        marker_genes=markers,
        plots=not args.no_plots,
        baselines=args.baselines,
        prepared=args.prepared,
        bootstrap_seed=args.seed,
        bootstrap_resamples=args.bootstrap_resamples or BOOTSTRAP_RESAMPLES,
    )
    print_summary(report)
    print(f"report: {Path(out) / REPORT_FILE}")
    if args.strict_intervals and report["intervals_verdict"].startswith("too narrow"):
        return 1
    return 0


# ---------------------------------------------------------------------- loading
def read_gene_panel(path: str | Path) -> list[str]:
    """The fixed gene panel to score (see :func:`napari_stem.gene_list.read_gene_list`)."""
    from napari_stem.gene_list import read_gene_list

    return read_gene_list(path, error=EvaluationError)


def _read_h5ad(path: Path, role: str):
    import anndata

    if not path.exists():
        raise EvaluationError(f"{role} file {describe_path(path)} does not exist.")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:
        raise EvaluationError(
            f"{role} file {describe_path(path)} is not a readable .h5ad ({type(exc).__name__}: {exc})."
        ) from exc


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)


def _preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def load_pair(prediction_path: str | Path, truth_path: str | Path) -> tuple[Any, Any, np.ndarray]:
    """(prediction AnnData, truth AnnData, row index into the truth for each predicted spot).

    Raises :class:`EvaluationError` naming both files when predicted barcodes or genes are absent
    from the truth.
    """
    prediction_path, truth_path = Path(prediction_path), Path(truth_path)
    prediction = _read_h5ad(prediction_path, "prediction")
    truth = _read_h5ad(truth_path, "truth")
    where = f"prediction {describe_path(prediction_path)} vs truth {describe_path(truth_path)}"
    if not prediction.obs_names.is_unique:
        raise EvaluationError(f"{describe_path(prediction_path)} has duplicate barcodes; each spot must be named once.")
    truth_rows = {str(b): i for i, b in enumerate(truth.obs_names)}
    missing = [str(b) for b in prediction.obs_names if str(b) not in truth_rows]
    if missing:
        raise EvaluationError(
            f"{where}: {len(missing)} of {prediction.n_obs} predicted barcodes are not in the truth "
            f"({_preview(missing)}). Predict with the truth's spots (stem-train predict SLIDE --spots ST.h5ad, or "
            "the HEST folder) so that barcodes match."
        )
    truth_genes = list(map(str, truth.var_names))
    missing_genes = [g for g in map(str, prediction.var_names) if g not in set(truth_genes)]
    if missing_genes:
        raise EvaluationError(
            f"{where}: {len(missing_genes)} predicted genes are not measured in the truth ({_preview(missing_genes)}). "
            "Evaluate on the slide the model's gene list was selected from, or a truth with those genes."
        )
    duplicated = (
        sorted({g for g in map(str, prediction.var_names) if truth_genes.count(g) > 1})
        if not truth.var_names.is_unique
        else []
    )
    if duplicated:
        raise EvaluationError(
            f"truth {describe_path(truth_path)} has duplicate gene names {_preview(duplicated)}; make them unique."
        )
    rows = np.array([truth_rows[str(b)] for b in prediction.obs_names], dtype=np.int64)
    check_finite_counts(truth.X, f"truth {describe_path(truth_path)}")
    return prediction, truth, rows


def prediction_arrays(prediction: Any, source: Path) -> dict[str, Any]:
    """Mean, variance, samples and quantile layers of a prediction AnnData (absent ones are None)."""
    from napari_stem.anndata_io import VARIANCE_LAYER

    mean = _dense(prediction.X)
    if not np.isfinite(mean).all():
        raise EvaluationError(
            f"prediction {describe_path(source)} holds non-finite values (NaN or infinity); it "
            "was not written by a successful napari-stem run. Predict again."
        )
    n_spots, n_genes = mean.shape
    variance = _dense(prediction.layers[VARIANCE_LAYER]) if VARIANCE_LAYER in prediction.layers else None
    samples = None
    if "samples" in prediction.obsm:
        flat = np.asarray(prediction.obsm["samples"], dtype=np.float64)
        if n_genes == 0 or flat.shape[1] % n_genes:
            raise EvaluationError(
                f"{describe_path(source)}: obsm['samples'] has {flat.shape[1]} columns, not a multiple of {n_genes} genes."
            )
        samples = flat.reshape(n_spots, flat.shape[1] // n_genes, n_genes)
    quantiles = {
        int(name[1:]) / 100: _dense(prediction.layers[name])
        for name in prediction.layers
        if name.startswith("q") and name[1:].isdigit()
    }
    provenance = {}
    stem_uns = prediction.uns.get("napari_stem", {})
    if "provenance_json" in stem_uns:
        provenance = json.loads(str(stem_uns["provenance_json"]))
    return {
        "mean": mean,
        "variance": variance,
        "samples": samples,
        "quantiles": quantiles or None,
        "intervals": written_intervals(prediction, quantiles, source),
        "provenance": provenance,
    }


def written_intervals(prediction: Any, legacy_quantiles: dict[float, np.ndarray], source: Path) -> list[dict]:
    """The intervals the file offers its reader, with the level each states.

    napari-stem's order-statistic layers as declared in ``uns['napari_stem']['intervals_json']``;
    in older files, each q<p>/q<100-p> pair of interpolated quantile layers, read as the central
    (100 − 2p) % interval it was presented as.
    """
    from napari_stem.anndata_io import read_interval_specs
    from napari_stem.metrics import ORDER_STATISTICS

    intervals = []
    for spec in read_interval_specs(prediction):
        missing = [name for name in (spec.lower_layer, spec.upper_layer) if name not in prediction.layers]
        if missing:
            raise EvaluationError(
                f"{describe_path(source)} declares the {spec.label} but has no layer {', '.join(missing)}."
            )
        intervals.append(
            {
                "name": spec.name,
                "level": spec.level,
                "label": spec.label,
                "layers": [spec.lower_layer, spec.upper_layer],
                "exact": spec.exact,
                "n_samples": spec.n_samples,
                "source": ORDER_STATISTICS,
                "lower": _dense(prediction.layers[spec.lower_layer]),
                "upper": _dense(prediction.layers[spec.upper_layer]),
            }
        )
    for low in sorted(q for q in legacy_quantiles if q < 0.5):
        high = round(1 - low, 10)
        if high in legacy_quantiles:
            level = round(high - low, 10)
            names = [f"q{round(low * 100):02d}", f"q{round(high * 100):02d}"]
            intervals.append(
                {
                    "name": f"{names[0]}-{names[1]}",
                    "level": level,
                    "layers": names,
                    "label": f"{names[0]}-{names[1]} read as a {round(level * 100):d} % interval",
                    "source": "interpolated quantile layers (older file)",
                    "lower": legacy_quantiles[low],
                    "upper": legacy_quantiles[high],
                }
            )
    return intervals


def _library(adata: Any) -> dict | None:
    libraries = adata.uns.get("spatial", {})
    return next(iter(libraries.values()), None) if hasattr(libraries, "values") and len(libraries) else None


def spatial_context(prediction: Any, truth: Any, rows: np.ndarray, sources: tuple[Path, Path]) -> dict[str, Any]:
    """Spot coordinates, thumbnail, its scale and the spot diameter for the maps (truth first)."""
    coords = None
    if "spatial" in truth.obsm:
        coords = np.asarray(truth.obsm["spatial"], dtype=np.float64)[rows, :2]
    elif "spatial" in prediction.obsm:
        coords = np.asarray(prediction.obsm["spatial"], dtype=np.float64)[:, :2]
    if coords is None or not np.isfinite(coords).all():
        raise SpotsError(
            f"neither prediction {describe_path(sources[0])} nor truth {describe_path(sources[1])} has usable spot "
            "coordinates (obsm['spatial'], x/y in full-resolution pixels) for the marker maps; add them, or pass --no-plots."
        )
    context: dict[str, Any] = {"coords": coords, "thumbnail": None, "scale": 1.0, "spot_diameter_px": None}
    for adata in (truth, prediction):
        library = _library(adata)
        if not library:
            continue
        factors = library.get("scalefactors", {})
        images = library.get("images", {})
        if context["spot_diameter_px"] is None and "spot_diameter_fullres" in factors:
            context["spot_diameter_px"] = float(factors["spot_diameter_fullres"])
        if context["thumbnail"] is None:
            for key, factor in (
                ("downscaled_fullres", "tissue_downscaled_fullres_scalef"),
                ("hires", "tissue_hires_scalef"),
                ("lowres", "tissue_lowres_scalef"),
            ):
                if key in images and factor in factors:
                    context["thumbnail"], context["scale"] = np.asarray(images[key]), float(factors[factor])
                    break
    return context


# ---------------------------------------------------------------------- evaluation
def evaluate_files(
    prediction_path: str | Path,
    truth_path: str | Path,
    out_dir: str | Path,
    *,
    panel: list[str] | None = None,
    panel_source: str | None = None,
    target_transform: str | None = None,
    marker_genes: list[str] | None = None,
    plots: bool = True,
    title: str | None = None,
    notes: list[str] | None = None,
    baselines: str | Path | None = None,
    prepared: str | Path | None = None,
    bootstrap_resamples: int | None = None,
    bootstrap_seed: int = 0,
) -> dict:
    """Score ``prediction_path`` against ``truth_path``; write report, table and plots to ``out_dir``.

    ``notes`` are caller's caveats added to the report's warnings. ``baselines``: a folder of
    ``stem-train baseline`` for the paired verdict; ``prepared``: the model's prepared folder for
    the leak check (else the prediction's provenance is followed). Returns the report (also
    written as ``out_dir/report.json``; NaN becomes null there).
    """
    from napari_stem import metrics

    resamples = bootstrap_resamples or metrics.BOOTSTRAP_RESAMPLES
    prediction_path, truth_path, out_dir = Path(prediction_path), Path(truth_path), Path(out_dir)
    prediction, truth, rows = load_pair(prediction_path, truth_path)
    arrays = prediction_arrays(prediction, prediction_path)
    provenance = arrays["provenance"]
    genes = list(map(str, prediction.var_names))

    # everything that can fail is checked before the first file is written
    for role, names in (("gene panel", panel), ("--marker-genes", marker_genes)):
        missing = [g for g in names or [] if g not in set(genes)]
        if missing:
            source = f" {describe_path(panel_source)}" if role == "gene panel" and panel_source else ""
            raise EvaluationError(
                f"{role}{source} names {len(missing)} genes the prediction {describe_path(prediction_path)} does not hold "
                f"({_preview(missing)}); use genes the model predicts."
            )
    context = spatial_context(prediction, truth, rows, (prediction_path, truth_path)) if plots else None
    panel_genes = panel if panel is not None else genes
    gene_kinds = read_gene_kinds(truth, panel_genes)
    sample_id = truth_path.stem
    rivals = (
        load_baselines(baselines, sample_id, prediction, panel_genes, skip=prediction_path)
        if baselines is not None
        else []
    )
    leaks = check_leaks(sample_id, truth_path, provenance, prepared)

    declared = provenance.get("target_transform")
    transform = target_transform or declared or "log2p1"
    warnings = list(notes or [])
    if target_transform and declared and target_transform != declared:
        warnings.append(f"--target-transform {target_transform} differs from the prediction's own '{declared}'")
    first_column: dict[str, int] = {}
    for column, name in enumerate(map(str, truth.var_names)):
        first_column.setdefault(name, column)
    truth_raw = _dense(truth.X[rows][:, [first_column[g] for g in genes]])
    if transform != "none" and np.nanmax(np.abs(truth_raw - np.round(truth_raw)), initial=0.0) > 1e-6:
        warnings.append(
            f"the truth's X holds non-integer values, not raw counts; is {transform} right? (--target-transform none if it is already transformed)"
        )
    truth_values = metrics.to_target_space(truth_raw, transform)

    result = metrics.score(
        truth_values,
        arrays["mean"],
        genes,
        panel=panel,
        variance=arrays["variance"],
        samples=arrays["samples"],
        quantiles=arrays["quantiles"],
        intervals=arrays["intervals"],
    )
    per_gene = result.pop("per_gene")
    column_of = {g: i for i, g in enumerate(genes)}
    panel_columns = [column_of[g] for g in panel_genes]
    panel_truth, panel_mean = truth_values[:, panel_columns], arrays["mean"][:, panel_columns]
    result["fixed_panel"]["ci"] = metrics.bootstrap_panel_pcc(
        panel_truth, panel_mean, n_resamples=resamples, seed=bootstrap_seed
    ).to_dict()
    by_kind = {
        kind: _kind_pcc(
            panel_truth[:, columns],
            panel_mean[:, columns],
            [panel_genes[c] for c in columns],
            resamples,
            bootstrap_seed,
        )
        for kind, columns in gene_kinds.items()
    }
    model_name = provenance.get("model", "stem")
    comparison = (
        compare_with_baselines(
            rivals,
            model_name,
            truth_raw[:, panel_columns],
            panel_mean,
            transform,
            gene_kinds,
            str(Path(baselines).resolve()),
            resamples,
            bootstrap_seed,
        )
        if baselines is not None
        else None
    )
    warnings.extend(leaks.findings)
    verdict = intervals_verdict(result["calibration"].get("written_intervals", []))
    if verdict.startswith("too narrow"):
        warnings.append(f"written intervals {verdict}")
    n_truth_only = truth.n_obs - len(np.unique(rows))
    if n_truth_only:
        warnings.append(f"{n_truth_only} truth spots have no prediction and are not scored")
    report = {
        "prediction": str(prediction_path.resolve()),
        "truth": str(truth_path.resolve()),
        "model": provenance.get("model", "stem"),
        "n_spots": int(len(rows)),
        "n_genes": len(genes),
        "target_transform": transform,
        "panel": {"source": panel_source or "all predicted genes", "genes": panel if panel is not None else genes},
        "fixed_panel_pcc": result["fixed_panel"],
        **({"pcc_by_gene_kind": by_kind} if by_kind else {}),
        "verdict": comparison.verdict if comparison else None,
        **({"baselines": comparison.to_dict()} if comparison else {}),
        "leak_check": leaks.to_dict(),
        "reference_metrics": result["reference"],
        "calibration": result["calibration"],
        "intervals_verdict": verdict,
        "warnings": warnings,
        "provenance": provenance,
        "files": {"per_gene": PER_GENE_FILE},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(per_gene, out_dir / PER_GENE_FILE)
    if plots:
        report["files"].update(
            _plots(
                report, truth_values, arrays, genes, per_gene, context, prediction_path, out_dir, marker_genes, title
            )
        )
    _write_json(report, out_dir / REPORT_FILE)
    return report


# ---------------------------------------------------------------------- gene kinds
def read_gene_kinds(truth: Any, panel_genes: list[str]) -> dict[str, list[int]]:
    """Panel columns of each gene kind when the truth's var marks image-driven genes (synthetic data).

    ``{"image_driven": [...], "noise": [...]}`` (kinds without genes left out), or ``{}`` when the
    truth has no :data:`GENE_KIND_COLUMN`.
    """
    if GENE_KIND_COLUMN not in truth.var:
        return {}
    driven: dict[str, bool] = {}
    for gene, flag in zip(map(str, truth.var_names), truth.var[GENE_KIND_COLUMN].tolist(), strict=True):
        driven.setdefault(gene, bool(flag))
    kinds = {
        "image_driven": [i for i, g in enumerate(panel_genes) if driven[g]],
        "noise": [i for i, g in enumerate(panel_genes) if not driven[g]],
    }
    return {kind: columns for kind, columns in kinds.items() if columns}


def _kind_pcc(truth: np.ndarray, mean: np.ndarray, genes: list[str], resamples: int, seed: int) -> dict:
    from napari_stem.metrics import bootstrap_panel_pcc

    ci = bootstrap_panel_pcc(truth, mean, n_resamples=resamples, seed=seed)
    return {"mean": ci.estimate, "n_genes": len(genes), "genes": genes, "ci": ci.to_dict()}


# ---------------------------------------------------------------------- baselines and the verdict
@dataclass(frozen=True)
class BaselinePrediction:
    """One baseline's prediction of the evaluated slide, on the evaluated spots and panel genes."""

    method: str
    label: str
    path: Path
    mean: np.ndarray  # (evaluated spots, panel genes), rows in the evaluated prediction's order
    target_transform: str


def load_baselines(
    folder: str | Path, sample_id: str, prediction: Any, panel_genes: list[str], skip: Path | None = None
) -> list[BaselinePrediction]:
    """Every ``folder/<method>/<sample_id>.h5ad`` (the layout 'stem-train baseline' writes), aligned by barcode.

    Refuses, naming the file and the fix, a folder without this slide, a baseline missing some of
    the evaluated spots or panel genes. ``skip``: the evaluated file itself, if it is one of them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(
            f"--baselines {describe_path(folder)} is not a folder; pass the --out folder of 'stem-train baseline'."
        )
    files = [
        path
        for path in sorted(folder.glob(f"*/{sample_id}.h5ad"))
        if skip is None or path.resolve() != Path(skip).resolve()
    ]
    if not files:
        raise EvaluationError(
            f"--baselines {describe_path(folder)} holds no <method>/{sample_id}.h5ad for this slide (named after the truth "
            f"file); run 'stem-train baseline PREP_DIR --out {folder}' on a prepared folder that holds {sample_id} out."
        )
    barcodes = list(map(str, prediction.obs_names))
    loaded = []
    for path in files:
        adata = _read_h5ad(path, "baseline")
        rows = {str(b): i for i, b in enumerate(adata.obs_names)}
        columns = {str(g): i for i, g in enumerate(adata.var_names)}
        missing = [b for b in barcodes if b not in rows]
        if missing:
            raise EvaluationError(
                f"baseline {describe_path(path)} has no prediction for {len(missing)} evaluated spots "
                f"({_preview(missing)}); rerun 'stem-train baseline' on the prepared folder of this slide."
            )
        missing_genes = [g for g in panel_genes if g not in columns]
        if missing_genes:
            raise EvaluationError(
                f"baseline {describe_path(path)} does not predict {len(missing_genes)} panel genes "
                f"({_preview(missing_genes)}); evaluate on genes both predict (--genes-panel)."
            )
        stem_uns = adata.uns.get("napari_stem", {})
        provenance = json.loads(str(stem_uns["provenance_json"])) if "provenance_json" in stem_uns else {}
        mean = _dense(adata.X)[[rows[b] for b in barcodes]][:, [columns[g] for g in panel_genes]]
        if not np.isfinite(mean).all():
            raise EvaluationError(
                f"baseline {describe_path(path)} holds non-finite values; rerun 'stem-train baseline'."
            )
        method = str(provenance.get("baseline") or path.parent.name)
        loaded.append(
            BaselinePrediction(
                method,
                str(provenance.get("model", method)),
                path,
                mean,
                str(provenance.get("target_transform", "log2p1")),
            )
        )
    return loaded


@dataclass(frozen=True)
class BaselineScore:
    """A baseline's fixed-panel PCC and the paired difference of the evaluated prediction against it."""

    method: str
    label: str
    prediction: str
    target_transform: str
    pcc: Any  # napari_stem.metrics.BootstrapCI
    difference: Any  # BootstrapCI of (evaluated − baseline), same resampled spots
    by_gene_kind: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> {"pcc", "difference"} BootstrapCIs

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "label": self.label,
            "prediction": self.prediction,
            "target_transform": self.target_transform,
            "fixed_panel_pcc": self.pcc.to_dict(),
            "difference": self.difference.to_dict(),
            "by_gene_kind": {
                kind: {k: v.to_dict() for k, v in scores.items()} for kind, scores in self.by_gene_kind.items()
            },
        }


@dataclass(frozen=True)
class Comparison:
    """The evaluated prediction against every baseline of a folder, and the one-line verdicts."""

    folder: str
    scores: list[BaselineScore]
    best: str | None
    verdict: str
    by_gene_kind: dict[str, dict[str, Any]]  # kind -> {"best", "difference" (dict), "verdict"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "best": self.best,
            "verdict": self.verdict,
            "methods": [score.to_dict() for score in self.scores],
            "verdicts_by_gene_kind": self.by_gene_kind,
        }


def display_name(model: str) -> str:
    """How the verdict names the evaluated prediction ("Stem" for a Stem model's)."""
    return "Stem" if str(model).lower() == "stem" else str(model)


def verdict_line(name: str, best: str, difference: Any, what: str = "fixed-panel PCC") -> str:
    """``Stem vs best baseline (cv-ridge): +0.041 [0.012, 0.071] fixed-panel PCC (paired bootstrap 95 % CI, 73 spots); Stem ahead``."""
    if not math.isfinite(difference.low):
        conclusion = "no interval (too few defined resamples)"
    elif difference.low > 0:
        conclusion = f"{name} ahead"
    elif difference.high < 0:
        conclusion = f"{best} ahead"
    else:
        conclusion = "no clear difference"
    return (
        f"{name} vs best baseline ({best}): {difference.describe(3, signed=True)} {what} (paired bootstrap "
        f"{difference.level * 100:g} % CI, {difference.n_units} {difference.unit}); {conclusion}"
    )


def compare_with_baselines(
    rivals: list[BaselinePrediction],
    model: str,
    truth_raw: np.ndarray,
    mean: np.ndarray,
    transform: str,
    gene_kinds: dict[str, list[int]],
    folder: str,
    resamples: int,
    seed: int,
) -> Comparison:
    """Score each baseline and the paired difference against it on the same resampled spots, pick the
    best baseline by point estimate (per gene kind too) and say what the difference is.

    ``truth_raw`` and ``mean`` hold the panel's columns; each prediction is scored against the truth
    in its own target space.
    """
    from napari_stem.metrics import bootstrap_panel_pcc, paired_bootstrap_panel_pcc, to_target_space

    truth = to_target_space(truth_raw, transform)
    options = {"n_resamples": resamples, "seed": seed}
    scores = []
    for rival in rivals:
        rival_truth = to_target_space(truth_raw, rival.target_transform)
        kinds = {}
        for kind, columns in gene_kinds.items():
            kinds[kind] = {
                "pcc": bootstrap_panel_pcc(rival_truth[:, columns], rival.mean[:, columns], **options),
                "difference": paired_bootstrap_panel_pcc(
                    truth[:, columns],
                    mean[:, columns],
                    rival.mean[:, columns],
                    truth_b=rival_truth[:, columns],
                    **options,
                ),
            }
        scores.append(
            BaselineScore(
                rival.method,
                rival.label,
                str(rival.path.resolve()),
                rival.target_transform,
                bootstrap_panel_pcc(rival_truth, rival.mean, **options),
                paired_bootstrap_panel_pcc(truth, mean, rival.mean, truth_b=rival_truth, **options),
                kinds,
            )
        )
    name = display_name(model)

    def best_of(pcc_of: Any) -> BaselineScore | None:
        defined = [score for score in scores if math.isfinite(pcc_of(score).estimate)]
        return max(defined, key=lambda score: pcc_of(score).estimate) if defined else None

    def nothing(what: str) -> str:
        return f"{name} vs baselines: no baseline has a defined {what} ({', '.join(s.method for s in scores)}); nothing to compare"

    best = best_of(lambda score: score.pcc)
    verdict = verdict_line(name, best.method, best.difference) if best else nothing("fixed-panel PCC")
    by_kind = {}
    for kind, columns in gene_kinds.items():
        kind_best = best_of(lambda score, kind=kind: score.by_gene_kind[kind]["pcc"])
        what = f"PCC over the {len(columns)} {kind.replace('_', '-')} panel genes"
        by_kind[kind] = {
            "best": kind_best.method if kind_best else None,
            "difference": kind_best.by_gene_kind[kind]["difference"].to_dict() if kind_best else None,
            "verdict": verdict_line(name, kind_best.method, kind_best.by_gene_kind[kind]["difference"], what)
            if kind_best
            else nothing(what),
        }
    return Comparison(folder, scores, best.method if best else None, verdict, by_kind)


# ---------------------------------------------------------------------- leak check
@dataclass(frozen=True)
class TrainingSlide:
    """What is known of one slide the model was trained on, and where it was learnt from."""

    sample_id: str
    patient: str | None
    sha256: str | None
    source: str


@dataclass
class LeakCheck:
    """Is the test slide among the model's training slides? ``status``: "leak" (same sample id or the
    same image bytes: held-out figures are not valid), "same patient" (other tissue of a training
    patient: within-patient generalisation), "clear", or "not checked" (nothing names the training slides)."""

    status: str
    sample_id: str
    patient: str | None
    sha256: str | None
    sources: list[str]
    n_training_slides: int
    findings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_manifest_quietly(path: Any) -> Any:
    from stem_train.manifest import PreparedDataset

    try:
        return PreparedDataset.load(path) if path and Path(str(path)).exists() else None
    except (StemError, TypeError, ValueError):
        return None


def training_slides(
    prepared: str | Path | None, provenance: dict
) -> tuple[dict[str, TrainingSlide], list[str], list[Any]]:
    """Training slides by sample id from ``--prepared`` and from what the prediction's provenance names.

    Sources, in order: the ``--prepared`` manifest (an unreadable one is an error: it was asked
    for); the prepared folder a baseline records (``prepared``); the checkpoint a Stem prediction
    records, whose provenance holds its training manifest and ``train_slides``; ``train_slides``
    of the prediction itself. Returns (slides, sources, manifests read).
    """
    from napari_stem.stem.checkpoint import CONFIG_FILE
    from stem_train.manifest import PreparedDataset

    slides: dict[str, TrainingSlide] = {}
    sources: list[str] = []
    manifests = []

    def add_manifest(manifest: Any, via: str) -> None:
        source = f"{via} {describe_path(Path(manifest.root) / 'manifest.json')}"
        sources.append(source)
        manifests.append(manifest)
        for slide in manifest.split("train"):
            slides[slide.sample_id] = TrainingSlide(slide.sample_id, slide.patient, slide.image_sha256, source)

    def add_ids(ids: Any, via: str) -> None:
        new = [str(i) for i in ids or [] if str(i) not in slides]
        if new:
            sources.append(via)
            slides.update({i: TrainingSlide(i, None, None, via) for i in new})

    if prepared is not None:
        add_manifest(PreparedDataset.load(prepared), "--prepared")
    manifest = _load_manifest_quietly(provenance.get("prepared"))
    if manifest is not None:
        add_manifest(manifest, "the prediction's prepared folder")
    checkpoint = provenance.get("checkpoint")
    if checkpoint and (Path(str(checkpoint)) / CONFIG_FILE).is_file():
        try:
            trained = json.loads((Path(str(checkpoint)) / CONFIG_FILE).read_text(encoding="utf-8")).get(
                "provenance", {}
            )
        except (OSError, ValueError, AttributeError):
            trained = {}
        manifest = _load_manifest_quietly(trained.get("manifest"))
        if manifest is not None:
            add_manifest(manifest, f"checkpoint {describe_path(checkpoint)}'s training manifest")
        add_ids(trained.get("train_slides"), f"checkpoint {describe_path(checkpoint)}'s train_slides")
    add_ids(provenance.get("train_slides"), "the prediction's train_slides")
    return slides, sources, manifests


def _test_patient(sample_id: str, truth_path: Path, manifests: list[Any]) -> str | None:
    """The test slide's patient: HEST metadata/<id>.json beside st/, else a manifest's record of it."""
    metadata = truth_path.parent.parent / "metadata" / f"{sample_id}.json"
    if metadata.is_file():
        try:
            patient = json.loads(metadata.read_text(encoding="utf-8")).get("patient")
        except (OSError, ValueError, AttributeError):
            patient = None
        if patient:
            return str(patient)
    for manifest in manifests:
        for slide in manifest.slides:
            if slide.sample_id == sample_id and slide.patient and slide.patient != sample_id:
                return str(slide.patient)
    return None


def _test_image_hash(sample_id: str, truth_path: Path, provenance: dict, manifests: list[Any]) -> str | None:
    """SHA-256 of the test slide's image: recorded by prepare when it prepared this slide, else
    hashed (streamed) from the slide the prediction names or HEST's wsis/<id>.* beside st/."""
    from stem_train.manifest import sha256_file

    for manifest in manifests:
        for slide in manifest.split("test"):
            if slide.sample_id == sample_id and slide.image_sha256:
                return slide.image_sha256
    candidates = [Path(str(provenance["slide"]))] if provenance.get("slide") else []
    candidates += sorted((truth_path.parent.parent / "wsis").glob(f"{sample_id}.*"))
    image = next((path for path in candidates if path.is_file()), None)
    return sha256_file(image) if image is not None else None


def check_leaks(sample_id: str, truth_path: Path, provenance: dict, prepared: str | Path | None = None) -> LeakCheck:
    """Compare the test slide (sample id = truth file name, patient, image hash) with the model's training slides."""
    slides, sources, manifests = training_slides(prepared, provenance)
    patient = _test_patient(sample_id, truth_path, manifests)
    if not slides:
        return LeakCheck("not checked", sample_id, patient, None, [], 0, [])
    digest = (
        _test_image_hash(sample_id, truth_path, provenance, manifests)
        if any(s.sha256 for s in slides.values())
        else None
    )
    findings = []
    leaked = set()
    if sample_id in slides:
        leaked.add(sample_id)
        findings.append(
            f"LEAK: test slide {sample_id} is also a training slide of the model ({slides[sample_id].source}): "
            "held-out figures are not valid"
        )
    same_image = [s for s in slides.values() if digest and s.sha256 == digest and s.sample_id != sample_id]
    if same_image:
        leaked.update(s.sample_id for s in same_image)
        findings.append(
            f"LEAK: test slide {sample_id}'s image has the same SHA-256 as training slide(s) "
            f"{', '.join(s.sample_id for s in same_image)} ({same_image[0].source}): the same scan under another id, "
            "so held-out figures are not valid"
        )
    same_patient = [
        s.sample_id for s in slides.values() if patient and s.patient == patient and s.sample_id not in leaked
    ]
    if same_patient:
        findings.append(
            f"same patient as training slides {', '.join(same_patient)} (patient {patient}): figures measure "
            "within-patient generalisation, not generalisation to new patients"
        )
    status = "leak" if leaked else "same patient" if same_patient else "clear"
    return LeakCheck(status, sample_id, patient, digest, sources, len(slides), findings)


def intervals_verdict(checks: list[dict]) -> str:
    """One line on the written intervals: "as stated", "no intervals written" or what is too narrow."""
    if not checks:
        return "no intervals written"
    narrow = [c for c in checks if c["verdict"] == "too narrow"]
    if not narrow:
        return "as stated (each covers its stated level within sampling error)"
    return "too narrow: " + "; ".join(
        f"{'/'.join(c['layers'])} covers {c['coverage']:.2f} of the truth, not {c['level']:.2f} (tolerance "
        f"{c['tolerance']:.2f} at {c['n_spots']} spots; {c['source']})"
        for c in narrow
    )


def _plots(
    report, truth_values, arrays, genes, per_gene, context, prediction_path, out_dir, marker_genes, title
) -> dict:
    from stem_train import plots

    label = title or Path(prediction_path).stem
    files = {
        "gene_variation": plots.gene_variation_curves(
            truth_values, arrays["mean"], out_dir / "gene_variation.png", title=label
        ).name,
        "pcc_bars": plots.pcc_bars(
            genes,
            per_gene["pcc"],
            out_dir / "pcc_per_gene.png",
            title=f"{label}: per-gene PCC",
            panel_mean=report["fixed_panel_pcc"]["mean"],
        ).name,
    }
    if report["calibration"].get("applicable"):
        files["calibration"] = plots.calibration_plot(
            report["calibration"]["curve"], out_dir / "calibration.png", title=f"{label}: calibration"
        ).name
    if marker_genes:
        chosen = list(marker_genes)
    else:  # chosen from the truth alone, never by how well they are predicted
        panel = set(report["panel"]["genes"])
        ranked = sorted((i for i, g in enumerate(genes) if g in panel), key=lambda i: -per_gene["truth_variance"][i])
        chosen = [genes[i] for i in ranked[:DEFAULT_MARKERS]]
    index = [genes.index(g) for g in chosen]
    variance = arrays["variance"]
    std = (
        np.sqrt(np.clip(variance[:, index], 0, None))
        if variance is not None and np.nanmax(variance, initial=0) > 0
        else None
    )
    files["marker_maps"] = plots.marker_maps(
        context["coords"],
        truth_values[:, index],
        arrays["mean"][:, index],
        chosen,
        out_dir / "marker_maps.png",
        std=std,
        thumbnail=context["thumbnail"],
        scale=context["scale"],
        spot_diameter_px=context["spot_diameter_px"],
        value_label=_value_label(report["target_transform"]),
        title=label,
    ).name
    return files


def _value_label(transform: str) -> str:
    return {"log2p1": "log2(1 + count)", "log1p": "ln(1 + count)"}.get(transform, "target value")


# ---------------------------------------------------------------------- output
def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(data: dict, path: Path) -> None:
    write_text_atomically(path, json.dumps(_json_ready(data), indent=2))


def _write_table(per_gene: dict[str, np.ndarray], path: Path) -> None:
    import pandas as pd

    table = pd.DataFrame({name: np.asarray(values) for name, values in per_gene.items()})
    replace_atomically(
        path, lambda partial: table.to_csv(partial, sep="\t", index=False, na_rep="NaN", float_format="%.6g")
    )


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) lines of the console summary."""
    fixed = report["fixed_panel_pcc"]
    reference = report["reference_metrics"]
    nan_note = f", {len(fixed['nan_genes'])} undefined: {_preview(fixed['nan_genes'], 3)}" if fixed["nan_genes"] else ""
    k_used = reference["pcc_k_used"]
    pcc_k = " / ".join(
        _fmt(reference[f"pcc_{k}"]) + (f" (k={used})" if used != int(k) else "") for k, used in k_used.items()
    )
    rows = [
        (f"fixed-panel mean PCC ({fixed['n_genes']} genes{nan_note})", _fmt(fixed["mean"]) + _ci_note(fixed.get("ci"))),
        *[
            (f"  {kind.replace('_', '-')} genes ({scores['n_genes']})", _fmt(scores["mean"]) + _ci_note(scores["ci"]))
            for kind, scores in report.get("pcc_by_gene_kind", {}).items()
        ],
        (f"PCC-{'/'.join(k_used)} (best genes post hoc, optimistic)", pcc_k),
        ("MSE / MAE", f"{_fmt(reference['mse'])} / {_fmt(reference['mae'])}"),
        (
            f"RVD ({_count(reference['rvd_genes_excluded'], 'gene')} with constant truth excluded)",
            _fmt(reference["rvd"]),
        ),
    ]
    calibration = report["calibration"]
    if not calibration.get("applicable"):
        rows.append(("calibration", "not applicable (point prediction)"))
    else:
        rank = "coverage_rank_50" in calibration
        key = "coverage_rank_" if rank else "coverage_"
        rows.append(
            (
                f"coverage 50% / 90% ({'rank' if rank else calibration['source']})",
                f"{_fmt(calibration.get(key + '50'))} / {_fmt(calibration.get(key + '90'))}",
            )
        )
        if "crps" in calibration:
            rows.append(("CRPS (samples)", _fmt(calibration["crps"])))
        elif "crps_gaussian" in calibration:
            rows.append(("CRPS (normal approximation)", _fmt(calibration["crps_gaussian"])))
        if "spread_error_correlation" in calibration:
            rows.append(("spread-error correlation (mean over genes)", _fmt(calibration["spread_error_correlation"])))
        for check in calibration.get("written_intervals", []):
            rows.append(
                (
                    f"written {'/'.join(check['layers'])} ({check.get('label', '')})",
                    f"{_fmt(check['coverage'])} at {_fmt(check['level'])}: {check['verdict']}",
                )
            )
    for score in report.get("baselines", {}).get("methods", []):
        pcc = score["fixed_panel_pcc"]
        rows.append((f"baseline {score['method']}: fixed-panel PCC", _fmt(pcc["estimate"]) + _ci_note(pcc)))
    leak = report.get("leak_check")
    if leak:
        rows.append(("leak check (test slide vs training slides)", _leak_summary(leak)))
    return rows


def _ci_note(ci: dict | None) -> str:
    """`` [0.52, 0.63] 95% CI, 48 spots`` after a point estimate ('' without a defined interval)."""
    if not ci or ci.get("low") is None or not math.isfinite(ci["low"]) or not math.isfinite(ci["high"]):
        return ""
    return f" [{_fmt(ci['low'])}, {_fmt(ci['high'])}] {ci['level'] * 100:g}% CI, {ci['n_units']} {ci['unit']}"


def _leak_summary(leak: dict) -> str:
    if leak["status"] == "not checked":
        return "not checked: nothing names the model's training slides (pass --prepared PREP_DIR, the folder it was trained on)"
    described = {
        "leak": "LEAK (see warnings)",
        "same patient": "same patient as training slides (see warnings)",
        "clear": "clear: sample id, image and patient differ from",
    }[leak["status"]]
    return f"{described} {leak['n_training_slides']} training slides" if leak["status"] == "clear" else described


def print_summary(report: dict) -> None:
    print(
        f"{Path(report['prediction']).name} vs {Path(report['truth']).name}: {report['n_spots']} spots, "
        f"{report['n_genes']} genes, truth as {report['target_transform']}, model {report['model']}"
    )
    rows = summary_rows(report)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    comparison = report.get("baselines")
    if comparison:
        print(f"  verdict: {comparison['verdict']}")
        for kind in comparison["verdicts_by_gene_kind"].values():
            print(f"  verdict: {kind['verdict']}")
    for warning in report["warnings"]:
        print(f"  warning: {warning}")

"""``stem-train evaluate``: score a prediction ``.h5ad`` against the measured expression.

The reference's metrics (PCC-10/50/200, MSE, MAE, RVD from ``eval.ipynb``) are reported next to the
honest ones: the mean PCC over a gene panel fixed in advance (the primary number), a per-gene
table, and, because Stem samples, calibration of the predictive distribution, including whether
the intervals the file writes cover what their labels say. Spots are matched
by barcode, never by row position, and the truth is brought into the prediction's target space
(log2(1 + raw counts) for the reference's models). See :mod:`napari_stem.metrics`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.atomic import replace_atomically, write_text_atomically
from napari_stem.errors import SpotsError, StemError, describe_path
from napari_stem.validate import check_finite_counts, check_not_an_input, check_writable_folder

REPORT_FILE = "report.json"
PER_GENE_FILE = "per_gene.tsv"
DEFAULT_MARKERS = 4


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
            "Writes OUT/report.json, OUT/per_gene.tsv and PNG plots: gene-variation curves (the paper's 2x2 "
            "figure), per-gene PCC bars, a calibration plot and marker-gene maps (truth and prediction on one "
            "colour scale, side by side, over the slide thumbnail)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prediction", type=Path, metavar="PRED.h5ad", help="prediction written by stem-train predict/baseline or the plugin")
    parser.add_argument("--truth", type=Path, required=True, metavar="ST.h5ad",
                        help="measured expression of the same slide (HEST st/<id>.h5ad: raw counts in X, barcodes as obs names)")
    parser.add_argument("--genes-panel", type=Path, default=None, metavar="FILE",
                        help="gene panel for the primary fixed-panel PCC, one symbol per line, fixed before looking at "
                        "test results (default: all predicted genes)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: PRED.evaluation/ next to the prediction)")
    parser.add_argument("--target-transform", choices=("log2p1", "log1p", "none"), default=None,
                        help="how the truth's counts map to the prediction's space: log2p1 = log2(1 + count) as the "
                        "reference Stem, log1p = ln(1 + count) as HEST-Bench, none = the truth is already transformed "
                        "(default: what the prediction's provenance says, else log2p1)")
    parser.add_argument("--marker-genes", default=None, metavar="G1,G2",
                        help=f"comma-separated genes to map (default: the {DEFAULT_MARKERS} panel genes with the highest "
                        "truth variance, chosen without looking at the prediction)")
    parser.add_argument("--no-plots", action="store_true", help="write report.json and per_gene.tsv only")
    parser.add_argument("--strict-intervals", action="store_true",
                        help="exit with status 1 when a written interval covers less than its stated level (beyond "
                        "sampling error); by default that is a warning in the report and the summary")
    return parser


def run(args: argparse.Namespace) -> int:
    panel = read_gene_panel(args.genes_panel) if args.genes_panel is not None else None
    markers = [g.strip() for g in args.marker_genes.split(",") if g.strip()] if args.marker_genes else None
    out = args.out if args.out is not None else args.prediction.with_suffix(".evaluation")
    check_not_an_input(out, (args.prediction, args.truth, args.genes_panel))
    check_writable_folder(out)
    report = evaluate_files(
        args.prediction, args.truth, out, panel=panel, panel_source=str(args.genes_panel) if panel else None,
        target_transform=args.target_transform, marker_genes=markers, plots=not args.no_plots,
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


def _read_h5ad(path: Path, role: str):  # noqa: ANN202
    import anndata

    if not path.exists():
        raise EvaluationError(f"{role} file {describe_path(path)} does not exist.")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:
        raise EvaluationError(f"{role} file {describe_path(path)} is not a readable .h5ad ({type(exc).__name__}: {exc}).") from exc


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
    duplicated = sorted({g for g in map(str, prediction.var_names) if truth_genes.count(g) > 1}) if not truth.var_names.is_unique else []
    if duplicated:
        raise EvaluationError(f"truth {describe_path(truth_path)} has duplicate gene names {_preview(duplicated)}; make them unique.")
    rows = np.array([truth_rows[str(b)] for b in prediction.obs_names], dtype=np.int64)
    check_finite_counts(truth.X, f"truth {describe_path(truth_path)}")
    return prediction, truth, rows


def prediction_arrays(prediction: Any, source: Path) -> dict[str, Any]:
    """Mean, variance, samples and quantile layers of a prediction AnnData (absent ones are None)."""
    from napari_stem.anndata_io import VARIANCE_LAYER

    mean = _dense(prediction.X)
    if not np.isfinite(mean).all():
        raise EvaluationError(f"prediction {describe_path(source)} holds non-finite values (NaN or infinity); it "
                              "was not written by a successful napari-stem run. Predict again.")
    n_spots, n_genes = mean.shape
    variance = _dense(prediction.layers[VARIANCE_LAYER]) if VARIANCE_LAYER in prediction.layers else None
    samples = None
    if "samples" in prediction.obsm:
        flat = np.asarray(prediction.obsm["samples"], dtype=np.float64)
        if n_genes == 0 or flat.shape[1] % n_genes:
            raise EvaluationError(f"{describe_path(source)}: obsm['samples'] has {flat.shape[1]} columns, not a multiple of {n_genes} genes.")
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
    return {"mean": mean, "variance": variance, "samples": samples, "quantiles": quantiles or None,
            "intervals": written_intervals(prediction, quantiles, source), "provenance": provenance}


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
            raise EvaluationError(f"{describe_path(source)} declares the {spec.label} but has no layer {', '.join(missing)}.")
        intervals.append({"name": spec.name, "level": spec.level, "label": spec.label, "layers": [spec.lower_layer, spec.upper_layer],
                          "exact": spec.exact, "n_samples": spec.n_samples, "source": ORDER_STATISTICS,
                          "lower": _dense(prediction.layers[spec.lower_layer]), "upper": _dense(prediction.layers[spec.upper_layer])})
    for low in sorted(q for q in legacy_quantiles if q < 0.5):
        high = round(1 - low, 10)
        if high in legacy_quantiles:
            level = round(high - low, 10)
            names = [f"q{round(low * 100):02d}", f"q{round(high * 100):02d}"]
            intervals.append({"name": f"{names[0]}-{names[1]}", "level": level, "layers": names,
                              "label": f"{names[0]}-{names[1]} read as a {round(level * 100):d} % interval",
                              "source": "interpolated quantile layers (older file)",
                              "lower": legacy_quantiles[low], "upper": legacy_quantiles[high]})
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
            for key, factor in (("downscaled_fullres", "tissue_downscaled_fullres_scalef"), ("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
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
) -> dict:
    """Score ``prediction_path`` against ``truth_path``; write report, table and plots to ``out_dir``.

    ``notes`` are caller's caveats added to the report's warnings. Returns the report (also
    written as ``out_dir/report.json``; NaN becomes null there).
    """
    from napari_stem import metrics

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
        warnings.append(f"the truth's X holds non-integer values, not raw counts; is {transform} right? (--target-transform none if it is already transformed)")
    truth_values = metrics.to_target_space(truth_raw, transform)

    result = metrics.score(
        truth_values, arrays["mean"], genes, panel=panel, variance=arrays["variance"],
        samples=arrays["samples"], quantiles=arrays["quantiles"], intervals=arrays["intervals"],
    )
    per_gene = result.pop("per_gene")
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
        report["files"].update(_plots(report, truth_values, arrays, genes, per_gene, context, prediction_path, out_dir, marker_genes, title))
    _write_json(report, out_dir / REPORT_FILE)
    return report


def intervals_verdict(checks: list[dict]) -> str:
    """One line on the written intervals: "as stated", "no intervals written" or what is too narrow."""
    if not checks:
        return "no intervals written"
    narrow = [c for c in checks if c["verdict"] == "too narrow"]
    if not narrow:
        return "as stated (each covers its stated level within sampling error)"
    return "too narrow: " + "; ".join(
        f"{'/'.join(c['layers'])} covers {c['coverage']:.2f} of the truth, not {c['level']:.2f} (tolerance "
        f"{c['tolerance']:.2f} at {c['n_spots']} spots; {c['source']})" for c in narrow)


def _plots(report, truth_values, arrays, genes, per_gene, context, prediction_path, out_dir, marker_genes, title) -> dict:  # noqa: ANN001
    from stem_train import plots

    label = title or Path(prediction_path).stem
    files = {
        "gene_variation": plots.gene_variation_curves(truth_values, arrays["mean"], out_dir / "gene_variation.png", title=label).name,
        "pcc_bars": plots.pcc_bars(genes, per_gene["pcc"], out_dir / "pcc_per_gene.png", title=f"{label}: per-gene PCC",
                                   panel_mean=report["fixed_panel_pcc"]["mean"]).name,
    }
    if report["calibration"].get("applicable"):
        files["calibration"] = plots.calibration_plot(report["calibration"]["curve"], out_dir / "calibration.png", title=f"{label}: calibration").name
    if marker_genes:
        chosen = list(marker_genes)
    else:  # chosen from the truth alone, never by how well they are predicted
        panel = set(report["panel"]["genes"])
        ranked = sorted((i for i, g in enumerate(genes) if g in panel), key=lambda i: -per_gene["truth_variance"][i])
        chosen = [genes[i] for i in ranked[:DEFAULT_MARKERS]]
    index = [genes.index(g) for g in chosen]
    variance = arrays["variance"]
    std = np.sqrt(np.clip(variance[:, index], 0, None)) if variance is not None and np.nanmax(variance, initial=0) > 0 else None
    files["marker_maps"] = plots.marker_maps(
        context["coords"], truth_values[:, index], arrays["mean"][:, index], chosen, out_dir / "marker_maps.png",
        std=std, thumbnail=context["thumbnail"], scale=context["scale"], spot_diameter_px=context["spot_diameter_px"],
        value_label=_value_label(report["target_transform"]), title=label,
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
    replace_atomically(path, lambda partial: table.to_csv(partial, sep="\t", index=False, na_rep="NaN", float_format="%.6g"))


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
        (f"fixed-panel mean PCC ({fixed['n_genes']} genes{nan_note})", _fmt(fixed["mean"])),
        (f"PCC-{'/'.join(k_used)} (best genes post hoc, optimistic)", pcc_k),
        ("MSE / MAE", f"{_fmt(reference['mse'])} / {_fmt(reference['mae'])}"),
        (f"RVD ({_count(reference['rvd_genes_excluded'], 'gene')} with constant truth excluded)", _fmt(reference["rvd"])),
    ]
    calibration = report["calibration"]
    if not calibration.get("applicable"):
        rows.append(("calibration", "not applicable (point prediction)"))
    else:
        rank = "coverage_rank_50" in calibration
        key = "coverage_rank_" if rank else "coverage_"
        rows.append((f"coverage 50% / 90% ({'rank' if rank else calibration['source']})",
                     f"{_fmt(calibration.get(key + '50'))} / {_fmt(calibration.get(key + '90'))}"))
        if "crps" in calibration:
            rows.append(("CRPS (samples)", _fmt(calibration["crps"])))
        elif "crps_gaussian" in calibration:
            rows.append(("CRPS (normal approximation)", _fmt(calibration["crps_gaussian"])))
        if "spread_error_correlation" in calibration:
            rows.append(("spread-error correlation (mean over genes)", _fmt(calibration["spread_error_correlation"])))
        for check in calibration.get("written_intervals", []):
            rows.append((f"written {'/'.join(check['layers'])} ({check.get('label', '')})",
                         f"{_fmt(check['coverage'])} at {_fmt(check['level'])}: {check['verdict']}"))
    return rows


def print_summary(report: dict) -> None:
    print(f"{Path(report['prediction']).name} vs {Path(report['truth']).name}: {report['n_spots']} spots, "
          f"{report['n_genes']} genes, truth as {report['target_transform']}, model {report['model']}")
    rows = summary_rows(report)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for warning in report["warnings"]:
        print(f"  warning: {warning}")

"""``stem-train evaluate`` on a constructed prediction and truth: files, report, plots, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GENES = ["GA", "GB", "GC", "GD", "FLAT"]  # FLAT is constant on the slide: its PCC is undefined


def _truth_adata(n_spots: int = 48, seed: int = 0):
    """A HEST-like st h5ad: raw counts, obsm['spatial'], uns['spatial']['ST'] with a thumbnail."""
    import anndata
    import pandas as pd
    from scipy import sparse

    from napari_stem.spots import hex_grid

    rng = np.random.default_rng(seed)
    layout = hex_grid(800, 700, 100, origin_um=(50, 50)).iloc[:n_spots]
    centers = np.stack([layout["x_um"], layout["y_um"]], axis=1) / 0.5  # 0.5 µm/px
    signal = np.sin(centers[:, :1] / 300.0) + np.cos(centers[:, 1:] / 250.0)
    rates = np.exp(
        1.5 + np.hstack([signal, -signal, 0.5 * signal, rng.normal(size=(len(layout), 1)), np.zeros((len(layout), 1))])
    )
    counts = rng.poisson(rates).astype(np.float32)
    counts[:, 4] = 0.0
    obs = pd.DataFrame(index=pd.Index([f"bc{i}" for i in range(len(layout))], name="barcode"))
    adata = anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=pd.Index(GENES)))
    adata.obsm["spatial"] = centers
    thumbnail = np.full((200, 200, 3), 230, dtype=np.uint8)
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": thumbnail},
            "scalefactors": {"spot_diameter_fullres": 110.0, "tissue_downscaled_fullres_scalef": 0.1},
        }
    }
    return adata


def _write_prediction(
    path: Path,
    truth,
    *,
    n_samples: int = 6,
    keep_samples: bool = True,
    point: bool = False,
    seed: int = 1,
    legacy_quantiles: bool = False,
    interval_levels=(0.5, 0.9),
) -> Path:
    """A prediction file; ``legacy_quantiles`` writes q05/q25/q75/q95 layers as older versions did."""
    import anndata

    from napari_stem.export import write_prediction
    from napari_stem.intervals import plan_intervals
    from napari_stem.spots import spots_from_anndata
    from napari_stem.stem.sampling import Prediction

    rng = np.random.default_rng(seed)
    target = np.log2(1 + truth.X.toarray())
    # truth and samples are draws around one latent centre: a calibrated model by construction
    centre = target + rng.normal(scale=0.6, size=target.shape)
    samples = centre[:, None, :] + rng.normal(scale=0.6, size=(truth.n_obs, n_samples, truth.n_vars))
    mean = np.broadcast_to(target.mean(axis=0), target.shape) if point else samples.mean(axis=1)
    levels = (0.05, 0.25, 0.75, 0.95)
    specs = () if point or legacy_quantiles else plan_intervals(interval_levels, n_samples)
    prediction = Prediction(
        mean=mean.astype(np.float32),
        variance=np.zeros_like(mean, dtype=np.float32) if point else samples.var(axis=1, ddof=1).astype(np.float32),
        genes=list(truth.var_names),
        samples=samples.astype(np.float32) if keep_samples and not point else None,
        quantile_levels=levels if legacy_quantiles else None,
        quantiles=np.quantile(samples, levels, axis=1).astype(np.float32) if legacy_quantiles else None,
        interval_specs=specs,
        intervals=np.stack([np.stack(spec.bounds(samples)) for spec in specs]).astype(np.float32) if specs else None,
        metadata={"target_transform": "log2p1", "model": "per-gene mean" if point else "stem"},
    )
    write_prediction(path, prediction, spots_from_anndata(truth))
    if legacy_quantiles:  # the names older versions wrote
        adata = anndata.read_h5ad(path)
        for level in levels:
            adata.layers[f"q{round(level * 100):02d}"] = adata.layers.pop(f"interpolated_q{round(level * 100):02d}")
        adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    truth = _truth_adata()
    truth_path = root / "truth.h5ad"
    truth.write_h5ad(truth_path)
    return _write_prediction(root / "pred.h5ad", truth), truth_path


def test_evaluate_writes_report_table_and_plots(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from stem_train.cli import main

    prediction, truth = pair
    out = tmp_path / "eval"
    assert main(["evaluate", str(prediction), "--truth", str(truth), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fixed-panel mean PCC" in printed and "FLAT" in printed and "optimistic" in printed

    report = json.loads((out / "report.json").read_text())
    assert {"fixed_panel_pcc", "reference_metrics", "calibration", "panel", "provenance", "warnings"} <= set(report)
    assert report["n_spots"] == 48 and report["n_genes"] == 5 and report["target_transform"] == "log2p1"
    fixed = report["fixed_panel_pcc"]
    assert fixed["nan_genes"] == ["FLAT"] and fixed["n_valid"] == 4 and fixed["mean"] > 0.4
    reference = report["reference_metrics"]
    assert {"pcc_10", "pcc_50", "pcc_200", "mse", "mae", "rvd"} <= set(reference)
    assert reference["pcc_k_used"] == {"10": 4, "50": 4, "200": 4}
    assert reference["rvd_genes_excluded"] == ["FLAT"] and reference["pcc_nan_genes"] == ["FLAT"]
    calibration = report["calibration"]
    assert calibration["source"] == "samples" and calibration["n_samples"] == 6
    for key in (
        "coverage_50",
        "coverage_90",
        "coverage_rank_50",
        "coverage_rank_90",
        "crps",
        "spread_error_correlation",
    ):
        assert calibration[key] is not None
    assert calibration["coverage_rank_90"] == pytest.approx(0.9, abs=0.06)  # calibrated by construction
    assert calibration["coverage_rank_50"] == pytest.approx(0.5, abs=0.08)
    assert calibration["coverage_90"] < calibration["coverage_rank_90"]  # 6 samples: quantile intervals too narrow
    # 6 samples give one interval for both asks: [min, max], a 5/7 = 71.4 % interval, labelled so
    (written,) = calibration["written_intervals"]
    assert (
        written["layers"] == ["lo71.4", "hi71.4"]
        and written["level"] == pytest.approx(5 / 7)
        and written["n_samples"] == 6
    )
    assert written["verdict"] == "as stated" and abs(written["coverage"] - 5 / 7) <= written["tolerance"]
    assert written["tolerance"] == pytest.approx(3 * np.sqrt(5 / 7 * 2 / 7 / 48)) and written["n_spots"] == 48
    assert report["intervals_verdict"].startswith("as stated")
    order_statistic = calibration["curve"]["order_statistic"]
    assert order_statistic["level"] == pytest.approx([5 / 7, 3 / 7, 1 / 7])
    assert "lo71.4/hi71.4 (71.4 % interval from 6 samples" in printed

    table = (out / "per_gene.tsv").read_text().splitlines()
    assert table[0].split("\t")[:3] == ["gene", "pcc", "in_panel"] and len(table) == 6
    assert any(line.startswith("FLAT\tNaN") for line in table)
    for name in ("gene_variation.png", "pcc_per_gene.png", "calibration.png", "marker_maps.png"):
        png = out / name
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_panel_quantiles_and_point_prediction(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import anndata

    from stem_train.evaluate import evaluate_files

    prediction, truth = pair
    panel = tmp_path / "panel.txt"
    panel.write_text("GA\nGB  # two genes fixed in advance\n")
    # an older file's quantile layers only (no samples kept): coverage from q05/q95 and q25/q75, normal-approximation CRPS
    no_samples = tmp_path / "no_samples.h5ad"
    _write_prediction(no_samples, anndata.read_h5ad(truth), keep_samples=False, legacy_quantiles=True)
    from stem_train.evaluate import read_gene_panel

    report = evaluate_files(no_samples, truth, tmp_path / "q", panel=read_gene_panel(panel), plots=False)
    assert report["fixed_panel_pcc"]["n_genes"] == 2 and report["fixed_panel_pcc"]["nan_genes"] == []
    assert report["calibration"]["source"] == "quantile layers" and "crps_gaussian" in report["calibration"]
    assert not (tmp_path / "q" / "marker_maps.png").exists()

    point = _write_prediction(tmp_path / "point.h5ad", anndata.read_h5ad(truth), point=True)
    report = evaluate_files(point, truth, tmp_path / "p")
    assert report["calibration"]["applicable"] is False
    assert report["fixed_panel_pcc"]["n_valid"] == 0 and report["fixed_panel_pcc"]["mean"] is not None  # NaN in memory
    saved = json.loads((tmp_path / "p" / "report.json").read_text())
    assert saved["fixed_panel_pcc"]["mean"] is None and len(saved["fixed_panel_pcc"]["nan_genes"]) == 5
    assert not (tmp_path / "p" / "calibration.png").exists() and (tmp_path / "p" / "marker_maps.png").exists()


def test_evaluate_errors_name_files_and_fix(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import anndata

    from stem_train.cli import main

    prediction, truth = pair
    assert main(["evaluate", str(tmp_path / "nope.h5ad"), "--truth", str(truth)]) == 2
    assert "nope.h5ad" in capsys.readouterr().err

    fewer_spots = tmp_path / "fewer.h5ad"
    anndata.read_h5ad(truth)[5:].copy().write_h5ad(fewer_spots)
    assert main(["evaluate", str(prediction), "--truth", str(fewer_spots), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "bc0" in err and "pred.h5ad" in err and "fewer.h5ad" in err and "--spots" in err

    fewer_genes = tmp_path / "fewer_genes.h5ad"
    anndata.read_h5ad(truth)[:, :3].copy().write_h5ad(fewer_genes)
    assert main(["evaluate", str(prediction), "--truth", str(fewer_genes), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "GD" in err and "FLAT" in err and "fewer_genes.h5ad" in err

    panel = tmp_path / "bad_panel.txt"
    panel.write_text("GA\nNOT_A_GENE\n")
    assert (
        main(
            [
                "evaluate",
                str(prediction),
                "--truth",
                str(truth),
                "--genes-panel",
                str(panel),
                "--out",
                str(tmp_path / "e3"),
            ]
        )
        == 2
    )
    assert "NOT_A_GENE" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                str(prediction),
                "--truth",
                str(truth),
                "--marker-genes",
                "GA,NOPE",
                "--out",
                str(tmp_path / "e6"),
            ]
        )
        == 2
    )
    assert "NOPE" in capsys.readouterr().err and not (tmp_path / "e6").exists()

    no_coordinates = tmp_path / "no_coords.h5ad"
    bare = anndata.read_h5ad(truth)
    del bare.obsm["spatial"]
    bare.write_h5ad(no_coordinates)
    bare_prediction = tmp_path / "bare_pred.h5ad"
    stripped = anndata.read_h5ad(prediction)
    del stripped.obsm["spatial"]
    stripped.write_h5ad(bare_prediction)
    assert main(["evaluate", str(bare_prediction), "--truth", str(no_coordinates), "--out", str(tmp_path / "e4")]) == 2
    err = capsys.readouterr().err
    assert "obsm['spatial']" in err and "no_coords.h5ad" in err and "--no-plots" in err
    assert not (tmp_path / "e4").exists()  # checked before anything is written
    assert (
        main(
            [
                "evaluate",
                str(bare_prediction),
                "--truth",
                str(no_coordinates),
                "--out",
                str(tmp_path / "e5"),
                "--no-plots",
            ]
        )
        == 0
    )


def test_evaluate_flags_intervals_narrower_than_their_label(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import anndata

    from stem_train.cli import main
    from stem_train.evaluate import evaluate_files

    _, truth = pair
    # 19 calibrated samples; the file says lo90/hi90 is the 90 % interval but holds [x(5), x(15)], a 50 % one
    mislabeled = _write_prediction(
        tmp_path / "mislabeled.h5ad", anndata.read_h5ad(truth), n_samples=19, keep_samples=False
    )
    adata = anndata.read_h5ad(mislabeled)
    adata.layers["lo90"], adata.layers["hi90"] = adata.layers["lo50"].copy(), adata.layers["hi50"].copy()
    adata.write_h5ad(mislabeled)
    report = evaluate_files(mislabeled, truth, tmp_path / "m", plots=False)
    checks = {tuple(c["layers"]): c for c in report["calibration"]["written_intervals"]}
    assert checks[("lo50", "hi50")]["verdict"] == "as stated"
    narrow = checks[("lo90", "hi90")]
    assert (
        narrow["verdict"] == "too narrow" and narrow["coverage"] < 0.9 - narrow["tolerance"] and narrow["level"] == 0.9
    )
    assert (
        report["calibration"]["source"] == "interval layers"
        and report["calibration"]["coverage_90"] == narrow["coverage"]
    )
    assert report["intervals_verdict"].startswith("too narrow: lo90/hi90 covers")
    assert any("lo90/hi90" in warning for warning in report["warnings"])

    out = tmp_path / "strict"
    assert (
        main(["evaluate", str(mislabeled), "--truth", str(truth), "--out", str(out), "--no-plots"]) == 0
    )  # a warning ...
    assert "warning: written intervals too narrow: lo90/hi90" in capsys.readouterr().out
    assert (
        main(
            ["evaluate", str(mislabeled), "--truth", str(truth), "--out", str(out), "--no-plots", "--strict-intervals"]
        )
        == 1
    )  # ... or a failure

    # what older versions wrote: interpolated q05/q95 of 6 samples, read as the 90 % interval they were presented as
    legacy = _write_prediction(
        tmp_path / "legacy.h5ad", anndata.read_h5ad(truth), n_samples=6, keep_samples=False, legacy_quantiles=True
    )
    report = evaluate_files(legacy, truth, tmp_path / "l", plots=False)
    checks = {c["name"]: c for c in report["calibration"]["written_intervals"]}
    assert set(checks) == {"q05-q95", "q25-q75"} and checks["q05-q95"]["level"] == pytest.approx(0.9)
    assert checks["q05-q95"]["verdict"] == "too narrow" and checks["q05-q95"]["coverage"] < 0.75


# ---------------------------------------------------------------------- baselines, verdict, leak check
DRIVEN = {"GA": True, "GB": True, "GC": True, "GD": False, "FLAT": False}  # as napari_stem.synthetic marks its genes


@pytest.fixture(scope="module")
def hest_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A HEST-like slide SYN9 (st/, metadata/ with patient PX, wsis/), a Stem prediction of it and a
    baselines folder as 'stem-train baseline' writes it: cv-ridge (better), ridge (worse), mean (constant)."""
    import anndata

    from napari_stem.export import write_prediction
    from napari_stem.spots import spots_from_anndata
    from napari_stem.stem.sampling import Prediction

    root = tmp_path_factory.mktemp("hest_pair")
    for folder in ("st", "metadata", "wsis"):
        (root / folder).mkdir()
    truth = _truth_adata()
    truth.var["synthetic_image_driven"] = [DRIVEN[g] for g in truth.var_names]
    truth.write_h5ad(root / "st" / "SYN9.h5ad")
    (root / "metadata" / "SYN9.json").write_text(json.dumps({"patient": "PX"}))
    (root / "wsis" / "SYN9.tif").write_bytes(b"not really a slide, but bytes to hash" * 100)
    prediction = _write_prediction(root / "pred.h5ad", truth)
    target = np.log2(1 + truth.X.toarray())
    rng = np.random.default_rng(11)
    baselines = root / "baselines"
    for method, mean in (
        ("cv-ridge", target + rng.normal(scale=1.0, size=target.shape)),
        ("ridge", target + rng.normal(scale=2.0, size=target.shape)),
        ("mean", np.broadcast_to(target.mean(axis=0), target.shape)),
    ):
        (baselines / method).mkdir(parents=True)
        write_prediction(
            baselines / method / "SYN9.h5ad",
            Prediction(
                mean=mean.astype(np.float32),
                variance=np.zeros_like(mean, dtype=np.float32),
                genes=list(truth.var_names),
                metadata={"baseline": method, "model": method, "target_transform": "log2p1"},
            ),
            spots_from_anndata(truth),
        )
    anndata.read_h5ad(root / "st" / "SYN9.h5ad")  # readable as written
    return {"root": root, "truth": root / "st" / "SYN9.h5ad", "prediction": prediction, "baselines": baselines}


def test_verdict_against_the_best_baseline_with_paired_ci(
    hest_pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from stem_train.cli import main

    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(hest_pair["prediction"]),
                "--truth",
                str(hest_pair["truth"]),
                "--out",
                str(out),
                "--no-plots",
                "--baselines",
                str(hest_pair["baselines"]),
                "--bootstrap-resamples",
                "400",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    fixed = report["fixed_panel_pcc"]
    assert fixed["ci"]["low"] <= fixed["mean"] <= fixed["ci"]["high"] and fixed["ci"]["n_resamples"] == 400

    comparison = report["baselines"]
    methods = {m["method"]: m for m in comparison["methods"]}
    assert set(methods) == {"cv-ridge", "ridge", "mean"} and comparison["best"] == "cv-ridge"
    assert methods["mean"]["fixed_panel_pcc"]["estimate"] is None  # constant: undefined, never the best
    best = methods["cv-ridge"]
    difference = best["difference"]
    assert difference["estimate"] == pytest.approx(fixed["mean"] - best["fixed_panel_pcc"]["estimate"])
    assert 0 < difference["low"] <= difference["estimate"] <= difference["high"]
    line = (
        f"Stem vs best baseline (cv-ridge): {difference['estimate']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}] "
        "fixed-panel PCC (paired bootstrap 95 % CI, 48 spots); Stem ahead"
    )
    assert report["verdict"] == comparison["verdict"] == line and f"verdict: {line}" in printed

    kinds = report["pcc_by_gene_kind"]
    assert kinds["image_driven"]["genes"] == ["GA", "GB", "GC"] and kinds["noise"]["genes"] == ["GD", "FLAT"]
    for scores in kinds.values():
        assert scores["ci"]["low"] <= scores["mean"] <= scores["ci"]["high"]
    driven = comparison["verdicts_by_gene_kind"]["image_driven"]
    assert driven["verdict"].startswith(f"Stem vs best baseline ({driven['best']}): ")
    assert "PCC over the 3 image-driven panel genes (paired bootstrap 95 % CI, 48 spots)" in driven["verdict"]
    assert driven["verdict"] in printed and "image-driven genes (3)" in printed


def test_baselines_folder_without_this_slide(
    hest_pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from stem_train.cli import main

    (tmp_path / "other" / "ridge").mkdir(parents=True)
    assert (
        main(
            [
                "evaluate",
                str(hest_pair["prediction"]),
                "--truth",
                str(hest_pair["truth"]),
                "--out",
                str(tmp_path / "e"),
                "--no-plots",
                "--baselines",
                str(tmp_path / "other"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "<method>/SYN9.h5ad" in err and "stem-train baseline" in err and not (tmp_path / "e").exists()


def _manifest(folder: Path, data_dir: Path, *slides: tuple[str, str, str | None]) -> Path:
    """A prepared folder's manifest whose training slides are (sample id, patient, image sha256)."""
    from stem_train.manifest import PreparedDataset, PreparedSlide

    PreparedDataset(
        str(data_dir),
        "efficientnet_lite0",
        None,
        4,
        {},
        list(DRIVEN),
        {},
        slides=[
            PreparedSlide(sample_id, patient, "train", 10, f"embeddings/{sample_id}.h5", image_sha256=digest)
            for sample_id, patient, digest in slides
        ],
    ).save(folder)
    return folder


@pytest.mark.parametrize("case", ["same id", "same image", "same patient", "disjoint"])
def test_leak_check_against_the_training_slides(hest_pair: dict[str, Path], tmp_path: Path, case: str) -> None:
    import hashlib

    from stem_train.evaluate import evaluate_files

    image_hash = hashlib.sha256((hest_pair["root"] / "wsis" / "SYN9.tif").read_bytes()).hexdigest()
    training = {
        "same id": ("SYN9", "PQ", None),
        "same image": ("T1", "PQ", image_hash),
        "same patient": ("T2", "PX", "0" * 64),
        "disjoint": ("T3", "PY", "1" * 64),
    }[case]
    prepared = _manifest(tmp_path / "prep", hest_pair["root"], training, ("T0", "PZ", "2" * 64))
    report = evaluate_files(
        hest_pair["prediction"],
        hest_pair["truth"],
        tmp_path / "e",
        prepared=prepared,
        plots=False,
        bootstrap_resamples=50,
    )
    leak = report["leak_check"]
    assert leak["n_training_slides"] == 2 and leak["patient"] == "PX" and leak["sources"][0].startswith("--prepared")
    if case == "disjoint":
        assert leak["status"] == "clear" and leak["findings"] == [] and report["warnings"] == []
        return
    (finding,) = leak["findings"]
    assert finding in report["warnings"]
    if case == "same patient":
        assert leak["status"] == "same patient" and "LEAK" not in finding
        assert finding.startswith(
            "same patient as training slides T2 (patient PX): figures measure within-patient generalisation"
        )
    else:
        assert leak["status"] == "leak" and finding.startswith("LEAK: test slide SYN9")
        assert training[0] in finding and "held-out figures are not valid" in finding
        assert (leak["sha256"] == image_hash) if case == "same image" else True


def test_leak_check_follows_the_checkpoint_named_by_the_prediction(
    hest_pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No --prepared: a Stem prediction names its checkpoint, whose provenance names its training manifest."""
    import anndata

    from stem_train.cli import main

    prepared = _manifest(tmp_path / "prep", hest_pair["root"], ("SYN9", "PX", None))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(
        json.dumps({"provenance": {"manifest": str(prepared / "manifest.json"), "train_slides": ["SYN9"]}})
    )
    adata = anndata.read_h5ad(hest_pair["prediction"])
    adata.uns["napari_stem"]["provenance_json"] = json.dumps(
        {"target_transform": "log2p1", "checkpoint": str(checkpoint)}
    )
    adata.write_h5ad(tmp_path / "pred.h5ad")
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "pred.h5ad"),
                "--truth",
                str(hest_pair["truth"]),
                "--out",
                str(tmp_path / "e"),
                "--no-plots",
                "--bootstrap-resamples",
                "50",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "warning: LEAK: test slide SYN9 is also a training slide of the model (checkpoint" in printed
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["leak_check"]["status"] == "leak" and "training manifest" in report["leak_check"]["sources"][0]
    # nothing names the training slides: said, not silently passed
    assert (
        main(
            [
                "evaluate",
                str(hest_pair["prediction"]),
                "--truth",
                str(hest_pair["truth"]),
                "--out",
                str(tmp_path / "e2"),
                "--no-plots",
                "--bootstrap-resamples",
                "50",
            ]
        )
        == 0
    )
    assert "leak check (test slide vs training slides)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e2" / "report.json").read_text())["leak_check"]["status"] == "not checked"

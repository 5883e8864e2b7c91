"""Which training recipe makes Stem beat the ridge probe on tissue it has never seen?

Trains each recipe on the demo's disjoint-tissue split (``stem-train demo``'s data: training bands
in eight orientations, a validation band, a test band), then scores the EMA weights on the
validation slide (where recipes are chosen) and the test slide (reported, never used to choose),
next to ``stem-train baseline``'s probes on the same embeddings. Prints one markdown table:
fixed-panel PCC on image-driven and noise genes, 90 % rank coverage, CRPS, and the paired
bootstrap 95 % CI of Stem minus the best baseline (HEST-Bench ridge, CV-alpha ridge, kNN) on
image-driven genes.

    python bench/bench_recipes.py                       # every recipe, on the cached demo data
    python bench/bench_recipes.py --recipes demo,stem-small-defaults --prepared PREP --hest HEST
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _small(
    steps: int, aug: int, *, width: int | None = 64, lr: str | None = "2e-3", ema: str | None = "0.98"
) -> tuple[str, ...]:
    """`stem-train fit` options for a stem-small run; None leaves an option to the preset's default."""
    size = ("--hidden-size", str(width), "--depth", "2") if width else ()
    training = (("--lr", lr) if lr else ()) + (("--ema-decay", ema) if ema else ())
    return (
        "--preset",
        "stem-small",
        *size,
        "--max-steps",
        str(steps),
        "--global-batch-size",
        "128",
        *training,
        *(("--num-aug-ratio", str(aug)) if aug is not None else ()),
    )


#: name -> `stem-train fit` options. Each row changes one thing from the one above it where it can;
#: "demo + D4 views" is the demo's recipe (stem_train.demo.FULL), "+ D4 views" stem-small's defaults.
RECIPES: dict[str, tuple[str, ...]] = {
    "demo (64x2, 400 steps, lr 2e-3, EMA 0.98)": _small(400, 0),
    "demo, 200 steps": _small(200, 0),
    "demo, 800 steps": _small(800, 0),
    "demo + D4 views, aug ratio 4": _small(400, 4),
    "stem-small, paper defaults, 2000 steps": _small(2000, 7, width=None, lr="1e-4", ema="0.9999"),
    "stem-small, 2000 steps, lr 1e-3, EMA 0.995": _small(2000, 0, width=None, lr="1e-3", ema="0.995"),
    "  + D4 views, aug ratio 4": _small(2000, None, width=None, lr=None, ema=None),  # the preset's defaults
}


@dataclass
class Scores:
    pcc_image: float
    pcc_noise: float
    coverage90: float
    crps: float
    per_gene_pcc: np.ndarray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=None, help="prepared folder (default: the cached full demo's)")
    parser.add_argument("--hest", type=Path, default=None, help="its HEST folder (default: the cached full demo's)")
    parser.add_argument(
        "--recipes", default=None, help="comma-separated recipe names or 1-based indices (default: all)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench_recipes_runs"), help="run folders (default: ./bench_recipes_runs)"
    )
    parser.add_argument("--samples", type=int, default=19, help="samples per spot (default: 19, predict's default)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: predict's on CPU)")
    parser.add_argument("--sampler", default=None, help="sampler (default: predict's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from napari_stem.predict import DEFAULT_SAMPLER, DEFAULT_SETTINGS
    from stem_train.demo import FULL, demo_paths, ensure_demo_model

    args.sampler = args.sampler or DEFAULT_SAMPLER
    args.steps = args.steps or DEFAULT_SETTINGS["cpu"]["steps"]

    if args.prepared is None:
        paths = demo_paths(FULL) if (demo_paths(FULL).checkpoint / "config.json").exists() else ensure_demo_model(FULL)
        args.prepared, args.hest = paths.prepared, paths.hest
    validation_id, test_id = FULL.validation_id, FULL.test_id
    chosen = _chosen_recipes(args.recipes)

    from stem_train.manifest import PreparedDataset

    manifest = PreparedDataset.load(args.prepared)
    genes = list(manifest.genes)
    image_driven = _image_driven(args.hest / "st" / f"{test_id}.h5ad", genes)
    from stem_train.baseline import load_split

    # The same per-slide embeddings and targets `stem-train baseline` reads.
    held = {s["sample_id"]: (s["embeddings"], s["targets"]) for s in load_split(manifest, "test", "log2p1")}
    held = {sid: held[sid] for sid in (validation_id, test_id)}
    baselines = _baseline_means(manifest, held)
    baseline_scores = {
        name: {sid: _score(held[sid][1], means[sid], None, image_driven) for sid in held}
        for name, means in baselines.items()
    }
    # The strongest baseline on the test slide itself: the comparison least kind to Stem.
    best = max(baseline_scores, key=lambda name: baseline_scores[name][test_id].pcc_image)

    rows = []
    for name, options in chosen.items():
        run_dir = args.out / _slug(name)
        started = time.perf_counter()
        _fit(args.prepared, run_dir, options, args.seed)
        fit_s = time.perf_counter() - started
        scores, sample_means = {}, {}
        for sid, (conditions, truth) in held.items():
            samples = _sample(run_dir / "checkpoint", conditions, args.samples, args.steps, args.sampler, args.seed)
            sample_means[sid] = samples.mean(axis=1)
            scores[sid] = _score(truth, sample_means[sid], samples, image_driven)
        test_mean = sample_means[test_id]
        diff = _paired_difference(held[test_id][1], test_mean, baselines[best][test_id], image_driven, args.seed)
        rows.append((name, fit_s, scores[validation_id], scores[test_id], diff))
        print(f"done: {_row(*rows[-1])}", file=sys.stderr, flush=True)

    print(
        f"\nValidation {validation_id} ({len(held[validation_id][1])} spots) chooses; test {test_id} "
        f"({len(held[test_id][1])} spots, tissue no training or validation slide shows) reports. "
        f"{int(image_driven.sum())} image-driven and {int((~image_driven).sum())} noise genes in the panel; "
        f"{args.samples} samples, {args.sampler} sampler at {args.steps} steps.\n"
    )
    print(
        f"| recipe | fit s | val PCC img | test PCC img | test PCC noise | test cov90 | test CRPS | test − {best} (img) [95 % CI] |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, scores in baseline_scores.items():
        val, test = scores[validation_id], scores[test_id]
        print(f"| {name} | – | {val.pcc_image:.3f} | {test.pcc_image:.3f} | {test.pcc_noise:.3f} | – | – | – |")
    for row in rows:
        print(_row(*row))
    return 0


def _row(name: str, fit_s: float, val: Scores, test: Scores, diff: tuple[float, float, float]) -> str:
    delta, low, high = diff
    return (
        f"| {name} | {fit_s:.0f} | {val.pcc_image:.3f} | {test.pcc_image:.3f} | {test.pcc_noise:.3f} | "
        f"{test.coverage90:.2f} | {test.crps:.3f} | {delta:+.3f} [{low:+.3f}, {high:+.3f}] |"
    )


def _chosen_recipes(spec: str | None) -> dict[str, tuple[str, ...]]:
    if not spec:
        return dict(RECIPES)
    names = list(RECIPES)
    chosen = {}
    for item in spec.split(","):
        item = item.strip()
        name = names[int(item) - 1] if item.isdigit() else item
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {item!r}; choose from: {', '.join(names)}")
        chosen[name] = RECIPES[name]
    return chosen


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.strip()).strip("_")[:60]


def _fit(prepared: Path, run_dir: Path, options: tuple[str, ...], seed: int) -> None:
    from stem_train.cli import main as stem_train

    if (run_dir / "checkpoint" / "config.json").exists():
        return  # trained by an earlier run of this bench: reuse (delete the folder to retrain)
    code = stem_train(
        [
            "fit",
            str(prepared),
            "--out",
            str(run_dir),
            "--device",
            "cpu",
            "--val-every",
            "0",
            "--log-every",
            "500",
            "--ckpt-every",
            "100000",
            "--seed",
            str(seed),
            *options,
        ]
    )
    if code != 0:
        raise SystemExit(f"stem-train fit failed for {run_dir}")


def _image_driven(st_path: Path, genes: list[str]) -> np.ndarray:
    import anndata

    var = anndata.read_h5ad(st_path, backed="r").var
    return var.loc[genes, "synthetic_image_driven"].to_numpy(bool)


def _baseline_means(manifest, held: dict) -> dict[str, dict[str, np.ndarray]]:
    """Each baseline of ``stem-train baseline`` fitted on the training slides: {method: {slide: mean}}."""
    from stem_train.baseline import fit_cv_ridge, fit_knn, fit_ridge_probe, load_split

    train = load_split(manifest, "train", "log2p1")
    x = np.concatenate([s["embeddings"][s["expressed"]] for s in train])
    y = np.concatenate([s["targets"][s["expressed"]] for s in train])
    groups = np.concatenate([np.full(int(s["expressed"].sum()), i) for i, s in enumerate(train)])
    fitted = {
        "ridge (HEST-Bench)": fit_ridge_probe(x, y)[0],
        "cv-ridge": fit_cv_ridge(x, y, groups)[0],
        "knn": fit_knn(x, y, groups)[0],
    }
    return {
        name: {sid: model.predict(c.astype(np.float64)) for sid, (c, _) in held.items()}
        for name, model in fitted.items()
    }


def _sample(
    checkpoint: Path, conditions: np.ndarray, n_samples: int, steps: int, sampler: str, seed: int
) -> np.ndarray:
    from napari_stem.stem.sampling import sample_expression

    prediction = sample_expression(
        str(checkpoint),
        conditions,
        n_samples=n_samples,
        steps=steps,
        sampler=sampler,
        device="cpu",
        seed=seed,
        keep_samples=True,
    )
    return prediction.samples


def _score(truth: np.ndarray, mean: np.ndarray, samples: np.ndarray | None, image_driven: np.ndarray) -> Scores:
    from napari_stem import metrics

    pcc = metrics.pearson_per_gene(truth, mean)
    coverage = crps = float("nan")
    if samples is not None:
        coverage = float(metrics.rank_interval_coverage(metrics.pit_values(truth, samples), 0.9))
        crps = float(np.mean(metrics.crps_samples(truth, samples)))
    return Scores(float(np.nanmean(pcc[image_driven])), float(np.nanmean(pcc[~image_driven])), coverage, crps, pcc)


def _paired_difference(
    truth: np.ndarray, stem_mean: np.ndarray, baseline_mean: np.ndarray, image_driven: np.ndarray, seed: int
) -> tuple[float, float, float]:
    """Stem minus a baseline, fixed-panel PCC on image-driven genes, paired spot-bootstrap 95 % CI."""
    from napari_stem.metrics import paired_bootstrap_panel_pcc

    ci = paired_bootstrap_panel_pcc(
        truth[:, image_driven], stem_mean[:, image_driven], baseline_mean[:, image_driven], seed=seed
    )
    return ci.estimate, ci.low, ci.high


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmarks in bench/ still run and still compare like with like (smallest settings).

Their numbers are not asserted (speed is the benchmarks' business); what is: both sides compute
the same function, and the ratio lines the issues ask for are printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def _assert_ratio_of_printed(
    ratio: float, numerator: str, denominator: str, printed_ratio_half_step: float = 0.005
) -> None:
    """``ratio`` (printed to 2 decimals) is numerator / denominator as printed (each rounded to its own decimals)."""

    def bounds(text: str) -> tuple[float, float]:
        half = 0.5 * 10.0 ** -len(text.partition(".")[2])
        return float(text) - half, float(text) + half

    (n_low, n_high), (d_low, d_high) = bounds(numerator), bounds(denominator)
    assert n_low / d_high - printed_ratio_half_step <= ratio <= n_high / max(d_low, 1e-12) + printed_ratio_half_step, (
        ratio,
        numerator,
        denominator,
    )


def test_gpu_check_runs_the_three_benchmarks_comparing_like_with_like(tmp_path: Path) -> None:
    """``bench/gpu_check.sh --quick``: the embedding, sampler and projection benchmarks at toy sizes."""
    import os

    result = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORKDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert [line for line in out.splitlines() if line.startswith("== ")][1:4] == [
        "== 1. sampler throughput (ours vs the reference restatement)",
        "== 2. whole-slide embedding (ours vs the reference preprocessing, same device)",
        "== 3. projected whole Visium slide",
    ]
    # sampler: the same function on both sides, and the four rate rows
    assert _number(r"max \|reference - ours\| forward = ([\d.e+-]+)", out) < 1e-4
    rows = re.findall(r"^\s+(reference fp32 \(.*?\)|ours fp32|ours bf16)\s+([\d.]+)\s", out, flags=re.M)
    assert len(rows) == 4 and all(float(rate) > 0 for _, rate in rows)
    # embedding: the ratio lines are the printed sides' ratios, the same features (up to bf16 rounding),
    # both networks on one device
    rates = dict(re.findall(r"^\s*(reference|ours): +([\d.]+) patches/s", out, flags=re.M))
    peaks = re.findall(r"; peak PSS +(\d+) MiB", out)
    assert sorted(rates) == ["ours", "reference"] and len(peaks) == 2, out
    _assert_ratio_of_printed(
        _number(r"ratio patches/s ours/reference: ([\d.]+)×", out), rates["ours"], rates["reference"]
    )
    # the sides print reference first, then ours
    _assert_ratio_of_printed(_number(r"ratio peak memory ours/reference: ([\d.]+)× PSS", out), peaks[1], peaks[0])
    assert _number(r"feature checksums differ by ([\d.e+-]+)", out) < 1e-2
    assert (tmp_path / "bench_2048px_jpeg.tif").is_file()
    devices = re.findall(r"^\s+(\w+(?::\d+)?), (fp32|bf16); peak PSS", out, flags=re.M)
    assert len(devices) == 2 and devices[0][0] == devices[1][0] and devices[0][1] == "fp32", devices
    # projection: a number of seconds for the asked spot count
    assert re.search(r"3\. whole slide, 10 spots, .*?: \d+ s", out), out


def test_cohort_bench_prints_the_worker_ratio_and_the_overhead(tmp_path: Path) -> None:
    out = _run(
        "bench_cohort.py",
        "--slides",
        "2",
        "--spots",
        "2",
        "--samples",
        "2",
        "--steps",
        "1",
        "--overhead-slides",
        "5",
        "--workdir",
        str(tmp_path),
    )
    rows = re.findall(r"^\s+(\d) workers? +x (\d+) torch threads: +(\d+) slides/hour", out, flags=re.M)
    assert [row[0] for row in rows] == ["1", "2"] and all(int(row[2]) > 0 for row in rows), out
    _assert_ratio_of_printed(_number(r"ratio slides/hour 2 workers / 1 worker: ([\d.]+)×", out), rows[1][2], rows[0][2])
    assert _number(r"max \|mean, 2 workers - mean, 1 worker\| = ([\d.e+-]+)", out) < 1e-3  # the same predictions
    assert _number(r"per-slide scheduling overhead: ([\d.]+) ms on Dask", out) > 0


def test_sampler_quality_table_smoke() -> None:
    """``bench_sampler.py --quick``: the --quality table (every sampler vs the long ancestral chain) on a toy model."""
    out = _run("bench_sampler.py", "--quick", "--device", "cpu", "--threads", "1")
    assert "| sampler | evals/sample | PCC vs truth |" in out
    rows = re.findall(r"^\| ([^|]+) \| (\d+) \| ([-\d.]+) \|", out, flags=re.M)
    samplers = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "ancestral-matched")
    assert {(label.strip(), int(n)) for label, n, _ in rows} >= {(s, n) for s in samplers for n in (2, 4)}

"""Prediction intervals whose stated level is the level they have: order statistics of K samples.

For K samples exchangeable with the truth (what a calibrated model draws), the truth falls below
the i-th smallest sample x₍ᵢ₎ with probability i/(K + 1), so the interval [x₍ᵢ₎, x₍K+1−i₎] covers
it with probability exactly (K + 1 − 2i)/(K + 1), whatever the distribution. A level L is
therefore exact when i = (1 − L)(K + 1)/2 is a positive integer: K = 19 gives 90 % from [x₍₁₎,
x₍₁₉₎] and 50 % from [x₍₅₎, x₍₁₅₎]; K = 3 gives 50 % from [min, max]. Interpolated quantiles of
the same samples (the old q05/q95 layers) are narrower: q05–q95 of 8 samples covers ~0.65, not
0.9. More samples than the minimum (K + 1 a multiple of the minimum) keep the level exact and
make the ends steadier. When K cannot give a level exactly, the interval is labelled with the
level it has ("78 % interval from 8 samples"), never with the one asked for.

Numpy only: the CLI, the plugin and ``evaluate`` share it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from napari_stem.errors import StemError

#: What ``predict`` writes unless told otherwise.
DEFAULT_LEVELS = (0.5, 0.9)
#: Named choices for a menu (the plugin's), the first the default.
CHOICES = {"50 % and 90 %": (0.5, 0.9), "90 %": (0.9,), "50 %": (0.5,), "none": ()}
DEFAULT_CHOICE = "50 % and 90 %"
#: Beyond this many samples per spot a level is refused as impractical (e.g. 0.999 needs 1999).
MAX_SAMPLES = 1000


def _tail(level: float) -> Fraction:
    """(1 − level)/2 as a fraction: the probability mass left out on each side."""
    level = float(level)
    if not 0 < level < 1:
        raise StemError(f"an interval level must lie strictly between 0 and 1, got {level:g}.")
    return (1 - Fraction(level).limit_denominator(1000)) / 2


def exact_rank(level: float, n_samples: int) -> int | None:
    """i such that [x₍ᵢ₎, x₍K+1−ᵢ₎] of ``n_samples`` samples is exactly a ``level`` interval, else None."""
    rank = _tail(level) * (int(n_samples) + 1)
    return int(rank) if rank.denominator == 1 and rank >= 1 else None


def samples_for_levels(levels: Iterable[float], at_least: int = 2) -> int:
    """The smallest K ≥ ``at_least`` that makes every level exact (0.9 → 19, 0.5 → 3, both → 19).

    K + 1 must be a multiple of the denominator of (1 − L)/2 for each level L, so of their lcm.
    """
    step = 1
    for level in levels:
        step = math.lcm(step, _tail(level).denominator)
    n_samples = math.ceil((max(int(at_least), 1) + 1) / step) * step - 1
    if n_samples > MAX_SAMPLES:
        asked = ", ".join(f"{float(level):g}" for level in levels)
        raise StemError(
            f"exact intervals at {asked} need {n_samples} samples per spot (more than {MAX_SAMPLES}); "
            "ask for coarser levels such as 0.5, 0.8, 0.9 or 0.95."
        )
    return n_samples


def interval_level(n_samples: int, rank: int) -> Fraction:
    """Coverage of [x₍ᵣₐₙₖ₎, x₍K+1−ᵣₐₙₖ₎] of K samples: (K + 1 − 2·rank)/(K + 1)."""
    return Fraction(int(n_samples) + 1 - 2 * int(rank), int(n_samples) + 1)


def _percent(value: float) -> str:
    """'90', '97.5', '77.8': the shortest of up to one decimal that names the level."""
    percent = round(float(value) * 100, 1)
    return f"{percent:g}"


@dataclass(frozen=True)
class IntervalSpec:
    """One interval as written: the rank-th smallest to the rank-th largest of ``n_samples`` samples."""

    requested_level: float
    n_samples: int
    rank: int

    @property
    def level(self) -> float:
        """The interval's actual (finite-sample) coverage for a calibrated model."""
        return float(interval_level(self.n_samples, self.rank))

    @property
    def exact(self) -> bool:
        return interval_level(self.n_samples, self.rank) == 1 - 2 * _tail(self.requested_level)

    @property
    def name(self) -> str:
        """The level in layer names: the one asked for when exact, else the actual one (rounded)."""
        return _percent(self.requested_level if self.exact else self.level)

    @property
    def lower_layer(self) -> str:
        return f"lo{self.name}"

    @property
    def upper_layer(self) -> str:
        return f"hi{self.name}"

    @property
    def label(self) -> str:
        text = f"{self.name} % interval from {self.n_samples} samples"
        if not self.exact:
            text += (
                f" ({_percent(self.requested_level)} % asked; exact needs "
                f"{samples_for_levels([self.requested_level], at_least=self.n_samples)} samples)"
            )
        return text

    def bounds(self, samples: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) of this interval from ``samples`` with the K samples along ``axis``."""
        return order_statistic_interval(samples, self.rank, axis=axis)

    def to_dict(self) -> dict:
        fraction = interval_level(self.n_samples, self.rank)
        return {
            "level": self.level,
            "level_fraction": f"{fraction.numerator}/{fraction.denominator}",
            "requested_level": float(self.requested_level),
            "exact": self.exact,
            "n_samples": int(self.n_samples),
            "rank": int(self.rank),
            "lower_layer": self.lower_layer,
            "upper_layer": self.upper_layer,
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, data: dict) -> IntervalSpec:
        return cls(float(data["requested_level"]), int(data["n_samples"]), int(data["rank"]))


def plan_intervals(levels: Sequence[float] | None, n_samples: int) -> tuple[IntervalSpec, ...]:
    """The intervals ``n_samples`` samples give for the requested ``levels``, narrowest first.

    Exact where K allows; otherwise the narrowest interval covering at least the level asked for,
    or [min, max] when even that covers less. Requests that land on one interval give one (labelled
    exact if it is for one of them, else with the larger ask).
    """
    n_samples = int(n_samples)
    specs: dict[int, IntervalSpec] = {}
    if n_samples < 2:
        return ()
    for level in sorted({float(level) for level in levels or ()}, reverse=True):
        rank = exact_rank(level, n_samples)
        if rank is None:
            wide_enough = [i for i in range(1, (n_samples + 1) // 2 + 1) if interval_level(n_samples, i) >= level]
            rank = max(wide_enough) if wide_enough else 1
        spec = IntervalSpec(level, n_samples, rank)
        if rank not in specs or spec.exact and not specs[rank].exact:
            specs[rank] = spec
    return tuple(sorted(specs.values(), key=lambda spec: -spec.rank))


def order_statistic_interval(samples: np.ndarray, rank: int, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """[x₍ᵣₐₙₖ₎, x₍K+1−ᵣₐₙₖ₎] along ``axis`` (the K samples); NaN-free input assumed."""
    samples = np.asarray(samples)
    n_samples = samples.shape[axis]
    if not 1 <= rank <= (n_samples + 1) // 2:
        raise ValueError(f"rank must be in 1..{(n_samples + 1) // 2} for {n_samples} samples, got {rank}")
    ordered = np.partition(samples, (rank - 1, n_samples - rank), axis=axis)
    return np.take(ordered, rank - 1, axis=axis), np.take(ordered, n_samples - rank, axis=axis)


def resolve_sample_count(levels: Sequence[float] | None, n_samples: int | None, default: int) -> tuple[int, str | None]:
    """Samples to draw so the requested intervals are exact, and a note when that differs from the ask.

    ``n_samples`` None takes ``default`` raised to the next exact count; an explicit count too
    small, or not exact, is raised to the next exact one (the note says so and what it costs:
    sampling time grows in proportion to the samples).
    """
    asked = default if n_samples is None else int(n_samples)
    if not levels:
        return asked, None
    needed = samples_for_levels(levels, at_least=asked)
    if needed == asked:
        return asked, None
    percent = " and ".join(f"{_percent(level)} %" for level in sorted(levels))
    step = samples_for_levels(levels, at_least=1) + 1
    if n_samples is None:
        return needed, (
            f"exact {percent} intervals: {needed} samples per spot (K + 1 a multiple of {step}); "
            f"sampling takes {needed / asked:.1f}x as long as the {asked} that mean and variance alone "
            f"default to (--intervals '' for those)."
        )
    return needed, (
        f"exact {percent} intervals need K + 1 to be a multiple of {step}: drawing {needed} samples "
        f"per spot instead of --samples {asked} (sampling takes {needed / asked:.1f}x as long; "
        "--intervals '' for none)."
    )


def describe(levels: Sequence[float] | None, n_samples: int) -> str:
    """One line on what ``n_samples`` delivers for ``levels`` (for the widget's hint)."""
    if not levels:
        return "no intervals"
    specs = plan_intervals(levels, n_samples)
    if not specs:
        return f"{n_samples} sample gives no interval"
    parts = [spec.label for spec in specs]
    delivered = {round(spec.requested_level, 10) for spec in specs}
    for level in sorted({round(float(level), 10) for level in levels} - delivered):
        parts.append(
            f"no separate {_percent(level)} % interval (exact needs "
            f"{samples_for_levels([level], at_least=n_samples)} samples)"
        )
    text = "; ".join(parts)
    return f"exact: {text}" if all(spec.exact for spec in specs) and len(parts) == len(specs) else text

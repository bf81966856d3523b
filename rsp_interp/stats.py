"""Statistics shared by the analyses: prompt-level bootstrap CIs and paired tests.

Draws of the same prompt are not independent (they share the question), so every interval and
test here works on *per-prompt* values: average the draws within each prompt first
(:func:`prompt_means`, or ``groups=`` of :func:`bootstrap_ci`), then resample / test prompts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from rsp_interp.errors import InputError

DEFAULT_RESAMPLES = 2000


def group_means(values: Sequence[float] | np.ndarray, groups: Sequence[Any]) -> np.ndarray:
    """Mean of ``values`` within each group (NaNs ignored), in order of first appearance."""
    v = np.asarray(values, dtype=np.float64)
    g = pd.Series(list(groups) if not isinstance(groups, pd.Series) else groups.to_numpy())
    if len(g) != len(v):
        raise InputError(f"values ({len(v)}) and groups ({len(g)}) must have the same length.")
    means = pd.Series(v).groupby(g.to_numpy(), sort=False).mean()
    return means.to_numpy(dtype=np.float64)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.mean,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    method: str = "BCa",
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``statistic(values)`` (``scipy.stats.bootstrap``).

    With ``groups`` (e.g. prompt ids) the values are averaged within each group first and the
    groups are resampled: a cluster bootstrap with equal weight per group. NaNs are dropped.
    Fewer than two values give ``(nan, nan)``; identical values give ``(v, v)``. If BCa is
    undefined for the data it falls back to the percentile method.
    """
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}.")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be >= 1, got {n_resamples}.")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if groups is not None:
        v = group_means(v, groups)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return (float("nan"), float("nan"))
    if np.all(v == v[0]):
        point = float(statistic(v))
        return (point, point)

    vectorized = statistic is np.mean
    stat = (lambda x, axis=-1: x.mean(axis)) if vectorized else statistic

    def once(how: str) -> tuple[float, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sps.bootstrap(
                (v,),
                stat,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method=how,
                rng=np.random.default_rng(seed),
                vectorized=vectorized,
            )
        return (float(res.confidence_interval.low), float(res.confidence_interval.high))

    low, high = once(method)
    if not (np.isfinite(low) and np.isfinite(high)) and method.lower() != "percentile":
        low, high = once("percentile")
    return (low, high)


def paired_test(
    rsp: Sequence[float] | np.ndarray,
    base: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float | int]:
    """Paired comparison of two aligned arrays of per-prompt values (pairs with a NaN dropped).

    Returns n, the two means, the mean difference ``rsp - base`` with a bootstrap CI, the
    Wilcoxon signed-rank and paired t-test statistics and two-sided p-values, and the effect
    size ``dz = mean(diff) / sd(diff)`` (Cohen's d for paired data). Wilcoxon is exact when
    ``|diff|`` has no ties or zeros (n <= 50), else the normal approximation. Tests that are
    undefined (fewer than two pairs, all differences zero) give NaN, except that all-zero
    differences give p = 1.
    """
    a = np.asarray(rsp, dtype=np.float64).reshape(-1)
    b = np.asarray(base, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise InputError(f"Paired arrays must have the same length, got {len(a)} and {len(b)}.")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    nan = float("nan")
    out: dict[str, float | int] = {
        "n": int(len(d)),
        "mean_rsp": float(a.mean()) if len(d) else nan,
        "mean_base": float(b.mean()) if len(d) else nan,
        "mean_diff": float(d.mean()) if len(d) else nan,
        "diff_ci_low": nan,
        "diff_ci_high": nan,
        "wilcoxon_stat": nan,
        "wilcoxon_p": nan,
        "t_stat": nan,
        "t_p": nan,
        "effect_size_dz": nan,
    }
    if len(d) < 2:
        return out
    out["diff_ci_low"], out["diff_ci_high"] = bootstrap_ci(
        d, confidence=confidence, n_resamples=n_resamples, seed=seed
    )
    if np.all(d == 0):
        out["wilcoxon_p"] = out["t_p"] = 1.0
        return out
    sd = float(d.std(ddof=1))
    if sd > 0:
        out["effect_size_dz"] = float(d.mean() / sd)
        t = sps.ttest_rel(a, b)
        out["t_stat"], out["t_p"] = float(t.statistic), float(t.pvalue)
    # exact null distribution when it exists (no ties or zeros in |d|); with ties scipy would
    # fall back to a slow permutation test, so use the tie-corrected normal approximation
    absd = np.abs(d)
    ties = bool(np.any(absd == 0) or len(np.unique(absd)) < len(absd))
    w = sps.wilcoxon(a, b, method="approx" if ties else "auto")
    out["wilcoxon_stat"], out["wilcoxon_p"] = float(w.statistic), float(w.pvalue)
    return out


def prompt_means(
    df: pd.DataFrame, by: Sequence[str] = ("condition",), value: str = "value"
) -> pd.DataFrame:
    """Average ``value`` over draws within each prompt: one row per (``by`` ..., prompt_id)."""
    keys = [*by, "prompt_id"]
    return df.groupby(keys, observed=True, sort=True)[value].mean().reset_index()


def paired_frame(
    df: pd.DataFrame, condition: str, baseline: str, value: str = "value"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt means of two conditions, aligned on prompt_id (prompts in both only)."""
    pm = prompt_means(df[df["condition"].isin([condition, baseline])], ("condition",), value)
    wide = pm.pivot(index="prompt_id", columns="condition", values=value)
    if condition not in wide or baseline not in wide:
        raise InputError(f"Need both conditions {condition!r} and {baseline!r} in the data.")
    wide = wide[[condition, baseline]].dropna()
    return wide[condition].to_numpy(), wide[baseline].to_numpy()


def mean_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | None = None,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float | int]:
    """``{"mean", "ci_low", "ci_high", "n"}`` with a (cluster) bootstrap CI of the mean.

    ``n`` counts groups when ``groups`` is given (the unit that was resampled), else values.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    units = group_means(v, groups) if groups is not None else v
    units = units[np.isfinite(units)]
    low, high = bootstrap_ci(units, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {
        "mean": float(units.mean()) if len(units) else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "n": int(len(units)),
    }

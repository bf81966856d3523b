"""rsp_interp.stats against scipy called directly and against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from rsp_interp.errors import InputError
from rsp_interp.stats import (
    bootstrap_ci,
    group_means,
    mean_ci,
    paired_frame,
    paired_test,
    prompt_means,
)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).gamma(2.0, size=25)


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_bootstrap_ci_matches_scipy(x, method):
    direct = sps.bootstrap(
        (x,),
        np.mean,
        confidence_level=0.9,
        n_resamples=500,
        method=method,
        rng=np.random.default_rng(7),
    ).confidence_interval
    low, high = bootstrap_ci(x, confidence=0.9, n_resamples=500, seed=7, method=method)
    assert low == pytest.approx(direct.low, rel=1e-9)
    assert high == pytest.approx(direct.high, rel=1e-9)
    assert low < x.mean() < high


def test_bootstrap_ci_other_statistic_matches_scipy(x):
    direct = sps.bootstrap(
        (x,), np.median, n_resamples=300, method="percentile", rng=np.random.default_rng(3)
    ).confidence_interval
    got = bootstrap_ci(x, np.median, n_resamples=300, seed=3, method="percentile")
    assert got == pytest.approx((direct.low, direct.high))


def test_bootstrap_ci_shift_equivariant_and_wider_with_confidence(x):
    low, high = bootstrap_ci(x, method="percentile", seed=2)
    slow, shigh = bootstrap_ci(x + 10.0, method="percentile", seed=2)
    assert (slow, shigh) == pytest.approx((low + 10.0, high + 10.0))
    wlow, whigh = bootstrap_ci(x, confidence=0.99, method="percentile", seed=2)
    assert wlow < low and whigh > high


def test_bootstrap_ci_groups_resamples_group_means(x):
    groups = np.repeat(np.arange(5), 5)
    by_hand = x.reshape(5, 5).mean(1)
    assert group_means(x, groups) == pytest.approx(by_hand)
    # percentile: BCa's bias term flips on last-bit differences of tied resample means (n = 5)
    clustered = bootstrap_ci(x, groups=groups, seed=4, method="percentile")
    assert clustered == pytest.approx(bootstrap_ci(by_hand, seed=4, method="percentile"))
    # clustering matters: the cluster CI differs from the naive CI over all 25 values
    assert clustered != pytest.approx(bootstrap_ci(x, seed=4, method="percentile"))


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([2.5, 2.5, 2.5]) == (2.5, 2.5)
    assert all(np.isnan(bootstrap_ci([1.0])))
    assert all(np.isnan(bootstrap_ci([])))
    with_nan = bootstrap_ci([1.0, np.nan, 3.0, 2.0], method="percentile", seed=0)
    assert with_nan == pytest.approx(bootstrap_ci([1.0, 3.0, 2.0], method="percentile", seed=0))
    with pytest.raises(InputError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)


def test_paired_test_matches_scipy_and_hand_effect_size(x):
    base = x[::-1] * 0.8
    res = paired_test(x, base)
    d = x - base
    assert res["n"] == len(x)
    assert res["mean_diff"] == pytest.approx(d.mean())
    assert res["mean_rsp"] == pytest.approx(x.mean())
    assert res["effect_size_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert res["t_p"] == pytest.approx(sps.ttest_rel(x, base).pvalue)
    assert res["wilcoxon_p"] == pytest.approx(sps.wilcoxon(x, base).pvalue)
    assert res["diff_ci_low"] < res["mean_diff"] < res["diff_ci_high"]
    swapped = paired_test(base, x)
    assert swapped["mean_diff"] == pytest.approx(-res["mean_diff"])
    assert swapped["t_p"] == pytest.approx(res["t_p"])
    assert swapped["wilcoxon_p"] == pytest.approx(res["wilcoxon_p"])


def test_paired_test_detects_a_clear_shift_and_not_a_null():
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    shifted = paired_test(base + 1.0 + rng.normal(scale=0.1, size=40), base)
    assert shifted["t_p"] < 1e-10 and shifted["wilcoxon_p"] < 1e-6
    assert shifted["diff_ci_low"] > 0.9 and shifted["diff_ci_high"] < 1.1


def test_paired_test_degenerate_inputs():
    same = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["mean_diff"] == 0 and same["t_p"] == 1.0 and same["wilcoxon_p"] == 1.0
    one = paired_test([1.0], [0.0])
    assert one["n"] == 1 and np.isnan(one["t_p"]) and np.isnan(one["wilcoxon_p"])
    dropped = paired_test([1.0, np.nan, 3.0, 5.0], [0.0, 1.0, np.nan, 4.5])
    assert dropped["n"] == 2 and dropped["mean_diff"] == pytest.approx(0.75)
    with pytest.raises(InputError, match="same length"):
        paired_test([1.0, 2.0], [1.0])


def test_prompt_means_and_paired_frame_align_prompts():
    df = pd.DataFrame(
        {
            "condition": ["rsp", "rsp", "rsp", "none", "none", "rsp", "none"],
            "prompt_id": ["a", "a", "b", "b", "a", "c", "d"],
            "value": [1.0, 3.0, 5.0, 4.0, 0.5, 9.0, 9.0],
        }
    )
    pm = prompt_means(df)
    assert pm.set_index(["condition", "prompt_id"])["value"][("rsp", "a")] == 2.0
    rsp, base = paired_frame(df, "rsp", "none")
    assert list(rsp) == [2.0, 5.0] and list(base) == [0.5, 4.0]  # c and d are unpaired
    with pytest.raises(InputError, match="both conditions"):
        paired_frame(df, "rsp", "other")


def test_mean_ci_counts_units(x):
    groups = np.repeat(np.arange(5), 5)
    res = mean_ci(x, groups=groups)
    assert res["n"] == 5 and res["mean"] == pytest.approx(x.mean())
    assert res["ci_low"] < res["mean"] < res["ci_high"]


def test_paired_test_wilcoxon_with_ties_uses_the_normal_approximation():
    rsp = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    base = np.array([0.5, 1.5, 3.5, 3.0, 5.0, 4.0])  # |d| = .5 .5 .5 1 0 2: ties and a zero
    res = paired_test(rsp, base)
    assert res["wilcoxon_p"] == pytest.approx(sps.wilcoxon(rsp, base, method="approx").pvalue)
    no_ties = paired_test(rsp, rsp[::-1] * 0.3)
    assert no_ties["wilcoxon_p"] == pytest.approx(
        sps.wilcoxon(rsp, rsp[::-1] * 0.3, method="exact").pvalue
    )

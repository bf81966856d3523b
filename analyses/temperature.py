"""Is it just temperature? RSP vs a per-prompt temperature that flattens token 1 equally.

For each prompt, the target is the RSP runs' mean entropy of the distribution generated token 1
is sampled from (``sampling_entropy`` at step 0; with the default temperature 1 this is the
model's own entropy). From the no-RSP logits of token 1 a root-finder (``brentq``) gets the
temperature ``T*`` whose tempered no-RSP distribution has that entropy; then the prompt is
generated without RSP at ``T*``. What follows is compared between RSP, matched temperature and
plain no-RSP sampling:

* ``entropy``: entropy of the model's distribution at temperature 1 (what the model believes);
* ``sampling_entropy``: entropy of the distribution tokens are actually drawn from (tempered);
* token diversity across the samples of one prompt: distinct-1/2 (unique n-grams over all
  n-grams, pooled over samples) and the mean position where two samples first differ.

The paper's claim: RSP flattens early and then lets the response commit, unlike temperature,
which keeps every step flat.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy.optimize import brentq

from analyses.first_k import (
    DEFAULT_K,
    _clean,
    _records,
    band_traces,
    paired_steps,
    sampling_config,
    step_table,
)
from rsp_interp.captures import CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.experiment import (
    METRIC_COLUMNS,
    Condition,
    ExperimentResult,
    run_experiment,
    tokenize_problems,
)
from rsp_interp.generation import SamplingConfig, filter_logits
from rsp_interp.injection import build_batch
from rsp_interp.metrics import entropy
from rsp_interp.rsp import derive_seed
from rsp_interp.stats import mean_ci, paired_test

NAME = "temperature"
T_RANGE = (0.02, 50.0)
COLORS = {"rsp": "#d62728", "none": "#1f77b4", "temperature": "#ff7f0e"}
LABELS = {"rsp": "RSP (T=1)", "none": "no RSP (T=1)", "temperature": "no RSP, matched T*"}
DIVERSITY = ("distinct_1", "distinct_2", "first_divergence")


def capture_config(k: int) -> CaptureConfig:
    return CaptureConfig.scores_only(k, ("top1_prob", "sampling_entropy"))


@torch.no_grad()
def first_token_logits(model: Any, problems: list, batch_size: int = 16) -> torch.Tensor:
    """No-RSP logits of generated token 1 for each problem, ``[P, V]`` float32 on the CPU."""
    tps = tokenize_problems(model, problems)
    out = []
    for start in range(0, len(tps), batch_size):
        batch = build_batch(model, tps[start : start + batch_size], None)
        logits = model.bridge(
            batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


def entropy_at_temperature(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> float:
    """Entropy (nats) of the sampling distribution of one ``[V]`` logit vector at ``T``."""
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    return float(entropy(filter_logits(logits[None].float(), cfg).log_softmax(-1))[0])


def match_temperature(
    logits: torch.Tensor,
    target: float,
    top_k: int = 0,
    top_p: float = 1.0,
    t_range: tuple[float, float] = T_RANGE,
) -> tuple[float, float]:
    """``(T*, entropy at T*)``: the temperature whose sampling entropy equals ``target``.

    Entropy grows monotonically with T; a target outside the range reachable in ``t_range`` is
    clipped to the nearest end (the returned entropy then differs from the target).
    """
    lo, hi = t_range

    def f(t: float) -> float:
        return entropy_at_temperature(logits, t, top_k, top_p) - target

    f_lo, f_hi = f(lo), f(hi)
    if f_lo >= 0:
        return lo, f_lo + target
    if f_hi <= 0:
        return hi, f_hi + target
    t = float(brentq(f, lo, hi, xtol=1e-6, rtol=1e-8))
    return t, f(t) + target


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over ``sequences`` (NaN if there are none)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first generated token where ``a`` and ``b`` differ (``min(len)`` if none)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def diversity_rows(samples: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per condition and prompt: distinct-1/2 and mean pairwise first divergence of the first
    ``k`` generated tokens of its samples (needs >= 2 samples; long-format metric rows)."""
    rows = []
    for (cond, pid), g in samples.groupby(["condition", "prompt_id"], observed=True):
        seqs = [list(t)[:k] for t in g["token_ids"]]
        if len(seqs) < 2:
            continue
        pairs = [first_divergence(a, b) for a, b in combinations(seqs, 2)]
        for metric, value in (
            ("distinct_1", distinct_n(seqs, 1)),
            ("distinct_2", distinct_n(seqs, 2)),
            ("first_divergence", float(np.mean(pairs))),
        ):
            rows.append(_row(cond, pid, metric, value))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _row(cond: str, pid: str, metric: str, value: float) -> dict[str, Any]:
    return {
        "condition": cond,
        "prompt_id": pid,
        "sample": -1,
        "rsp_seed": -1,
        "step": -1,
        "layer": -1,
        "head": -1,
        "metric": metric,
        "value": float(value),
    }


def experiment(
    model: Any,
    problems: list,
    opts: Any,
    k: int = DEFAULT_K,
    reference: ExperimentResult | None = None,
) -> ExperimentResult:
    """RSP and no-RSP runs (or ``reference``, a first-k result with conditions ``rsp`` and
    ``none`` on the same problems), then one matched-temperature run per prompt.

    The matched run of prompt ``i`` uses sampling seeds derived from ``(seed, i)``.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}.")
    n_tokens = max(k, opts.max_new_tokens)
    sampling = sampling_config(opts, n_tokens)
    if reference is None:
        reference = run_experiment(
            model,
            problems,
            [Condition("rsp", opts.rsp()), Condition("none", None)],
            n_samples=opts.samples,
            sampling=sampling,
            capture=capture_config(k),
            seed=opts.seed,
            batch_size=opts.batch_size,
            progress=opts.progress,
        )
    ref = reference.metrics
    step0 = ref[(ref["metric"] == "sampling_entropy") & (ref["step"] == 0)]
    target = step0[step0["condition"] == "rsp"].groupby("prompt_id", observed=True)["value"].mean()
    missing = [p.id for p in problems if p.id not in target.index]
    if missing:
        raise InputError(f"The reference run has no RSP rows for prompts {missing[:3]}...")
    logits = first_token_logits(model, problems, opts.batch_size)
    metrics = [ref[ref["step"] < k]]
    samples = [reference.samples]
    temps = []
    for i, p in enumerate(problems):
        t_star, achieved = match_temperature(logits[i], float(target[p.id]), opts.top_k, opts.top_p)
        base_h = entropy_at_temperature(logits[i], opts.temperature, opts.top_k, opts.top_p)
        temps.append({"prompt_id": p.id, "temperature": t_star})
        res = run_experiment(
            model,
            [p],
            [Condition("temperature", None)],
            n_samples=opts.samples,
            sampling=SamplingConfig(
                max_new_tokens=n_tokens,
                temperature=t_star,
                top_k=opts.top_k,
                top_p=opts.top_p,
            ),
            capture=capture_config(k),
            seed=derive_seed(opts.seed, i, 2),
            batch_size=opts.batch_size,
            progress=False,
        )
        m = res.metrics
        metrics.append(m[m["step"] < k])
        samples.append(res.samples)
        metrics.append(
            pd.DataFrame(
                [
                    _row("temperature", p.id, "matched_temperature", t_star),
                    _row("temperature", p.id, "target_entropy", float(target[p.id])),
                    _row("temperature", p.id, "matched_entropy", achieved),
                    _row("none", p.id, "first_token_entropy_direct", base_h),
                ]
            )
        )
    all_samples = pd.concat(samples, ignore_index=True)
    metrics.append(diversity_rows(all_samples, k))
    keep = ("entropy", "sampling_entropy", "top1_prob", *DIVERSITY)
    out = pd.concat([m for m in metrics if len(m)], ignore_index=True)
    out = out[out["metric"].isin(keep) | (out["step"] == -1)]
    config = dict(reference.config)
    config.update(k=k, matched_temperatures=temps, t_range=list(T_RANGE))
    return ExperimentResult(
        metrics=_categorical(out), samples=all_samples, prefill=pd.DataFrame(), config=config
    )


def _categorical(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in ("condition", "prompt_id", "metric"):
        df[col] = df[col].astype(str).astype("category")
    for col in ("step", "layer", "head"):
        df[col] = df[col].astype("int16")
    df["sample"] = df["sample"].astype("int32")
    df["rsp_seed"] = df["rsp_seed"].astype("int64")
    return df.reset_index(drop=True)


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def _prompt_values(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    d = metrics[metrics["metric"] == metric]
    return d.groupby(["condition", "prompt_id"], observed=True)["value"].mean().unstack(0)


def _later_mean(metrics: pd.DataFrame, metric: str, first_step: int = 1) -> pd.DataFrame:
    """Per prompt and condition: mean of ``metric`` over steps >= ``first_step`` (default:
    generated tokens 2..k); each sample's mean first, then the mean over samples."""
    d = metrics[(metrics["metric"] == metric) & (metrics["step"] >= first_step)]
    per_row = d.groupby(["condition", "prompt_id", "sample"], observed=True)["value"].mean()
    return per_row.groupby(["condition", "prompt_id"], observed=True).mean().unstack(0)


def _slope(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per prompt and condition: least-squares slope (nats per token) of the sample-mean of
    ``metric`` over generated tokens 2..k. Negative = the response commits."""
    d = metrics[(metrics["metric"] == metric) & (metrics["step"] >= 1)]
    curve = d.groupby(["condition", "prompt_id", "step"], observed=True)["value"].mean()
    rows = {}
    for (cond, pid), g in curve.groupby(level=[0, 1], observed=True):
        x = g.index.get_level_values("step").to_numpy(dtype=float)
        rows[(cond, pid)] = np.polyfit(x, g.to_numpy(), 1)[0] if len(x) >= 2 else np.nan
    out = pd.Series(rows, dtype=float)
    out.index.names = ["condition", "prompt_id"]
    return out.unstack(0)


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    """Matched temperatures, then RSP vs matched temperature on later-step entropies and
    diversity (paired over prompts), with no-RSP T=1 as reference."""
    temps = _prompt_values(metrics, "matched_temperature")["temperature"].dropna()
    target = _prompt_values(metrics, "target_entropy")["temperature"]
    achieved = _prompt_values(metrics, "matched_entropy")["temperature"]
    gen = metrics[metrics["sample"] >= 0]
    k = int(gen["step"].max()) + 1
    last_quarter = max(1, k - max(1, k // 4))
    draws = gen.groupby(["condition", "prompt_id"], observed=True)["sample"].nunique()
    out: dict[str, Any] = {
        "n_prompts": int(len(temps)),
        "samples_per_prompt": {c: int(v) for c, v in draws.groupby(level=0).max().items()},
        "k": k,
        "note": "entropy = model distribution at T=1; sampling_entropy = the (tempered) "
        "distribution tokens are drawn from; 'later' = mean over generated tokens 2..k; "
        f"'last_quarter' = tokens {last_quarter + 1}..{k}; entropy_slope = nats per token over "
        "tokens 2..k (negative: the response commits); "
        "diversity over the samples of one prompt; CIs: 95% bootstrap over prompts; tests: "
        "paired over prompts, RSP - matched temperature",
        "matched_temperature": {
            **mean_ci(temps.to_numpy()),
            "median": float(temps.median()),
            "min": float(temps.min()),
            "max": float(temps.max()),
            "max_abs_entropy_mismatch": float((achieved - target).abs().max()),
        },
    }
    comparisons: dict[str, Any] = {}
    frames = {
        "token1_entropy": _prompt_values(gen[gen["step"] == 0], "entropy"),
        "token1_sampling_entropy": _prompt_values(gen[gen["step"] == 0], "sampling_entropy"),
        "later_entropy": _later_mean(gen, "entropy"),
        "last_quarter_entropy": _later_mean(gen, "entropy", last_quarter),
        "entropy_slope": _slope(gen, "entropy"),
        "later_sampling_entropy": _later_mean(gen, "sampling_entropy"),
        "later_top1_prob": _later_mean(gen, "top1_prob"),
    }
    for name in DIVERSITY:
        frames[name] = _prompt_values(metrics, name)
    for name, wide in frames.items():
        entry: dict[str, Any] = {}
        for cond in ("rsp", "temperature", "none"):
            if cond in wide:
                entry[cond] = mean_ci(wide[cond].dropna().to_numpy())
        if {"rsp", "temperature"} <= set(wide.columns):
            entry["rsp_minus_temperature"] = paired_test(wide["rsp"], wide["temperature"])
        if {"rsp", "none"} <= set(wide.columns):
            entry["rsp_minus_none"] = paired_test(wide["rsp"], wide["none"])
        comparisons[name] = entry
    out["comparisons"] = comparisons
    steps = paired_steps(gen, "rsp", "temperature", ("entropy", "sampling_entropy"))
    out["per_step_rsp_vs_temperature"] = _records(steps)
    out["per_step"] = _records(step_table(gen))
    return _clean(out)


def plot(metrics: pd.DataFrame) -> go.Figure:
    """Model entropy and sampling entropy vs generated token (RSP, matched T, no RSP), and
    per-prompt diversity."""
    gen = metrics[metrics["sample"] >= 0]
    table = step_table(gen[gen["metric"].isin(["entropy", "sampling_entropy"])])
    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.07,
        subplot_titles=(
            "model entropy (T=1), nats",
            "sampling entropy (tempered), nats",
            "diversity across samples of a prompt",
        ),
    )
    for col, metric in ((1, "entropy"), (2, "sampling_entropy")):
        for cond in ("rsp", "temperature", "none"):
            t = table[(table["metric"] == metric) & (table["condition"] == cond)]
            if not len(t):
                continue
            for tr in band_traces(t, LABELS[cond], COLORS[cond]):
                tr.showlegend = tr.showlegend is not False and col == 1
                fig.add_trace(tr, row=1, col=col)
        fig.update_xaxes(title_text="generated token (1 = first)", row=1, col=col)
    for cond in ("rsp", "temperature", "none"):
        ys, lows, highs = [], [], []
        for name in DIVERSITY[:2]:
            wide = _prompt_values(metrics, name)
            r = mean_ci(wide[cond].dropna().to_numpy()) if cond in wide else {}
            ys.append(r.get("mean", np.nan))
            lows.append(r.get("ci_low", np.nan))
            highs.append(r.get("ci_high", np.nan))
        fig.add_trace(
            go.Bar(
                x=list(DIVERSITY[:2]),
                y=ys,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=np.array(highs) - np.array(ys),
                    arrayminus=np.array(ys) - np.array(lows),
                ),
                marker_color=COLORS[cond],
                name=LABELS[cond],
                showlegend=False,
            ),
            row=1,
            col=3,
        )
    temps = _prompt_values(metrics, "matched_temperature")
    t_med = float(temps["temperature"].median()) if "temperature" in temps else float("nan")
    fig.update_layout(
        title=f"RSP vs matched temperature ({len(temps)} prompts, median T* = {t_med:.2f}; "
        "95% bootstrap bands over prompts)",
        template="plotly_white",
        barmode="group",
        width=1300,
        height=450,
    )
    return fig

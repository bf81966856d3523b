"""First-k token distributions: is the next-token distribution flatter right after an RSP?

For generated tokens 1..k (library ``step`` 0..k-1) it records the entropy, the top-1
probability and KL(p_RSP || p_noRSP) of the model's next-token distribution (temperature 1),
with and without an RSP, paired by prompt and sampling seed. KL uses a no-RSP stream that is
teacher-forced on the RSP run's tokens, so both distributions condition on the same prefix.
Prompt-level bootstrap CIs and paired tests (Wilcoxon, t) per step.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import typer
from plotly.subplots import make_subplots

from rsp_interp.captures import CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.experiment import Condition, ExperimentResult, run_experiment
from rsp_interp.generation import SamplingConfig
from rsp_interp.stats import mean_ci, paired_frame, paired_test

NAME = "first-k"
DEFAULT_K = 16
STEP_METRICS = ("entropy", "top1_prob", "sampling_entropy", "kl_to_baseline")
PAIRED_METRICS = ("entropy", "top1_prob")
COLORS = {"rsp": "#d62728", "none": "#1f77b4"}


def capture_config(k: int) -> CaptureConfig:
    """Step scores for the first ``k`` steps and the paired baseline; nothing else (fast)."""
    return CaptureConfig.scores_only(
        k, ("top1_prob", "sampling_entropy", "kl_to_baseline"), paired_baseline=True
    )


def sampling_config(opts: Any, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
    )


def cli_options(
    k: Annotated[
        int, typer.Option(help="Number of first generated tokens to analyse.")
    ] = DEFAULT_K,
) -> dict[str, Any]:
    return {"k": k}


def experiment(model: Any, problems: list, opts: Any, k: int = DEFAULT_K) -> ExperimentResult:
    """RSP vs no RSP, ``opts.samples`` RSP draws per prompt, ``k`` new tokens (at least)."""
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}.")
    result = run_experiment(
        model,
        problems,
        [Condition("rsp", opts.rsp()), Condition("none", None)],
        n_samples=opts.samples,
        sampling=sampling_config(opts, max(k, opts.max_new_tokens)),
        capture=capture_config(k),
        seed=opts.seed,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    m = result.metrics
    result.metrics = m[(m["step"] < k) & m["metric"].isin(STEP_METRICS)].reset_index(drop=True)
    result.config["k"] = k
    return result


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def prompt_source(metrics: pd.DataFrame) -> str:
    """Which prompt set the rows come from, from the prompt ids (``arith-...``, ``gsm8k-...``)."""
    ids = pd.Series(metrics["prompt_id"].astype(str).unique())
    kinds = sorted(ids.str.split("-").str[0].unique())
    return "+".join(kinds)


def step_table(metrics: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per step, metric and condition: prompt-level mean with a 95% bootstrap CI.

    Columns: metric, condition, step, mean, ci_low, ci_high, n (prompts), n_rows.
    """
    rows = []
    d = metrics[metrics["step"] >= 0]
    for (metric, cond, step), g in d.groupby(["metric", "condition", "step"], observed=True):
        res = mean_ci(g["value"].to_numpy(), groups=g["prompt_id"].astype(str), seed=seed)
        rows.append(
            {"metric": metric, "condition": cond, "step": int(step), **res, "n_rows": len(g)}
        )
    return pd.DataFrame(rows)


def paired_steps(
    metrics: pd.DataFrame,
    condition: str = "rsp",
    baseline: str = "none",
    metrics_to_test: tuple[str, ...] = PAIRED_METRICS,
) -> pd.DataFrame:
    """Per metric and step: paired test of per-prompt means, ``condition`` vs ``baseline``."""
    rows = []
    for metric in metrics_to_test:
        d = metrics[metrics["metric"] == metric]
        for step in sorted(d["step"].unique()):
            ds = d[d["step"] == step]
            if not {condition, baseline} <= set(ds["condition"].astype(str)):
                continue
            a, b = paired_frame(ds, condition, baseline)
            rows.append({"metric": metric, "step": int(step), **paired_test(a, b)})
    return pd.DataFrame(rows)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    """Headline: step-0 (= generated token 1) entropy RSP vs none, paired test, KL; per step."""
    table = step_table(metrics)
    tests = paired_steps(metrics)
    ent = table[table["metric"] == "entropy"].set_index(["condition", "step"])
    kl = table[table["metric"] == "kl_to_baseline"].set_index("step")
    t0 = tests[(tests["metric"] == "entropy") & (tests["step"] == 0)]
    rsp_rows = metrics[metrics["condition"] == "rsp"][["prompt_id", "sample"]].drop_duplicates()
    out: dict[str, Any] = {
        "prompts": prompt_source(metrics),
        "n_prompts": int(metrics["prompt_id"].nunique()),
        "draws_per_prompt": int(rsp_rows.groupby("prompt_id", observed=True).size().max()),
        "k": int(metrics["step"].max()) + 1,
        "note": "step s = generated token s+1; entropy in nats of the T=1 model distribution; "
        "CIs: 95% bootstrap over prompts (draws averaged within prompt)",
    }
    for cond in ("rsp", "none"):
        if (cond, 0) in ent.index:
            r = ent.loc[(cond, 0)]
            out[f"entropy_token1_{cond}"] = {
                "mean": r["mean"],
                "ci": [r["ci_low"], r["ci_high"]],
                "n": int(r["n"]),
            }
    if len(t0):
        r = t0.iloc[0]
        out["entropy_token1_diff"] = {
            "mean": r["mean_diff"],
            "ci": [r["diff_ci_low"], r["diff_ci_high"]],
            "wilcoxon_p": r["wilcoxon_p"],
            "t_p": r["t_p"],
            "dz": r["effect_size_dz"],
        }
    if 0 in kl.index:
        r = kl.loc[0]
        out["kl_token1"] = {"mean": r["mean"], "ci": [r["ci_low"], r["ci_high"]]}
    if len(tests):
        sig = tests[(tests["metric"] == "entropy") & (tests["wilcoxon_p"] < 0.05)]
        out["entropy_steps_wilcoxon_p_lt_0.05"] = [int(s) for s in sig["step"]]
    out["per_step"] = _records(table)
    out["paired_tests"] = _records(tests)
    return _clean(out)


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def band_traces(
    table: pd.DataFrame, name: str, color: str, x_offset: int = 1, dash: str | None = None
) -> list[go.Scatter]:
    """A mean line with a shaded CI band (x = step + ``x_offset``)."""
    t = table.sort_values("step")
    x = (t["step"] + x_offset).tolist()
    band = go.Scatter(
        x=x + x[::-1],
        y=t["ci_high"].tolist() + t["ci_low"].tolist()[::-1],
        fill="toself",
        mode="lines",
        fillcolor=_rgba(color, 0.18),
        line=dict(width=0),
        hoverinfo="skip",
        showlegend=False,
        legendgroup=name,
    )
    line = go.Scatter(
        x=x,
        y=t["mean"],
        mode="lines+markers",
        name=name,
        legendgroup=name,
        line=dict(color=color, dash=dash),
    )
    return [band, line]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def plot(metrics: pd.DataFrame) -> go.Figure:
    """Entropy and top-1 probability vs generated token, RSP vs none, and KL, with 95% bands."""
    table = step_table(metrics)
    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.07,
        subplot_titles=("entropy (nats)", "top-1 probability", "KL(p_RSP || p_noRSP) (nats)"),
    )
    for col, metric in ((1, "entropy"), (2, "top1_prob")):
        for cond in ("rsp", "none"):
            t = table[(table["metric"] == metric) & (table["condition"] == cond)]
            label = "RSP" if cond == "rsp" else "no RSP"
            for tr in band_traces(t, label, COLORS[cond]):
                tr.showlegend = tr.showlegend is not False and col == 1
                fig.add_trace(tr, row=1, col=col)
    kl = table[(table["metric"] == "kl_to_baseline") & (table["condition"] == "rsp")]
    for tr in band_traces(kl, "KL", "#2ca02c"):
        tr.showlegend = False
        fig.add_trace(tr, row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="generated token (1 = first)", row=1, col=col)
    n = int(metrics["prompt_id"].nunique())
    draws = (
        metrics[metrics["condition"] == "rsp"]
        .groupby("prompt_id", observed=True)["sample"]
        .nunique()
    )
    fig.update_layout(
        title=f"First-k next-token distributions, {prompt_source(metrics)} prompts "
        f"({n} prompts x {int(draws.max()) if len(draws) else 0} RSP draws; 95% bootstrap "
        "bands over prompts)",
        template="plotly_white",
        width=1300,
        height=450,
    )
    return fig

"""Attention sink: how much attention the random positions absorb, step by step and per layer.

Runs the prompt set with and without an RSP (paired by prompt and sampling seed) and records,
for every generated step, layer and head, the attention mass of the new query on the RSP keys,
on BOS (the first position, the classic sink), on the prompt and on generated tokens.

The summary adds the sink metric of Gu et al. ("When Attention Sink Emerges", arXiv 2410.10781):
the share of (layer, head) pairs whose mean attention to a key exceeds 0.3, for BOS with and
without the RSP and for the RSP positions, and asks whether the RSP steals the BOS sink or adds a
second one: the paired change of BOS mass per head and where the RSP's mass comes from.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import typer
from plotly.subplots import make_subplots

from rsp_interp.captures import CaptureConfig
from rsp_interp.experiment import Condition, ExperimentResult, run_experiment
from rsp_interp.generation import SamplingConfig
from rsp_interp.stats import mean_ci, paired_frame, paired_test

NAME = "attention-sink"
SINK_THRESHOLD = 0.3
"""Gu et al.'s epsilon: a head is a sink for a key when its mean attention to it exceeds this."""
GROUPS = ("rsp", "bos", "prompt", "gen")
STEAL_MAJORITY = 0.5
"""The verdict says "steals" when more than this share of the RSP's mass comes from BOS."""


def cli_options(
    paired_baseline: Annotated[
        bool, typer.Option(help="Also run a teacher-forced no-RSP stream for KL (first k steps).")
    ] = True,
) -> dict[str, Any]:
    """Extra flags of ``rsp-interp attention-sink`` -> keyword arguments of :func:`experiment`."""
    return {"paired_baseline": paired_baseline}


def experiment(
    model: Any, problems: list, opts: Any, paired_baseline: bool = True
) -> ExperimentResult:
    """RSP vs no-RSP conditions with all default captures (and KL to a paired baseline)."""
    conditions = [Condition("rsp", opts.rsp()), Condition("none", None)]
    sampling = SamplingConfig(
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
    )
    capture = CaptureConfig(paired_baseline=paired_baseline)
    return run_experiment(
        model,
        problems,
        conditions,
        n_samples=opts.samples,
        sampling=sampling,
        capture=capture,
        seed=opts.seed,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def layer_step_means(metrics: pd.DataFrame, metric: str, condition: str = "rsp") -> pd.DataFrame:
    """Mean over prompts, samples and heads: a layer x step table of ``metric``."""
    d = metrics[(metrics["metric"] == metric) & (metrics["condition"] == condition)]
    return d.groupby(["layer", "step"], observed=True)["value"].mean().unstack("step")


def _step_summary(metrics: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers: RSP and BOS mass at step 0 and at the last step, per layer; entropy."""
    rsp = layer_step_means(metrics, "attn_rsp")
    bos = layer_step_means(metrics, "attn_bos")
    bos_none = layer_step_means(metrics, "attn_bos", "none")
    last = int(rsp.columns.max())
    ent = metrics[(metrics["metric"] == "entropy") & (metrics["step"] == 0)]
    ent0 = ent.groupby("condition", observed=True)["value"].agg(["mean", "std", "count"])
    kl = metrics[(metrics["metric"] == "kl_to_baseline") & (metrics["step"] == 0)]["value"]
    reached = metrics[
        (metrics["metric"] == "entropy")
        & (metrics["condition"] == "rsp")
        & (metrics["step"] == last)
    ]
    return {
        "last_step": last,
        "rows_reaching_last_step": int(len(reached)),
        "attn_rsp_step0_mean": float(rsp[0].mean()),
        "attn_rsp_last_mean": float(rsp[last].mean()),
        "attn_bos_step0_mean_rsp": float(bos[0].mean()),
        "attn_bos_step0_mean_none": float(bos_none[0].mean()),
        "attn_rsp_by_step": {int(s): float(v) for s, v in rsp.mean().items()},
        "attn_rsp_step0_by_layer": {int(k): float(v) for k, v in rsp[0].items()},
        "attn_rsp_last_by_layer": {int(k): float(v) for k, v in rsp[last].items()},
        "attn_bos_step0_by_layer": {int(k): float(v) for k, v in bos[0].items()},
        "attn_bos_last_by_layer": {int(k): float(v) for k, v in bos[last].items()},
        "attn_bos_none_step0_by_layer": {int(k): float(v) for k, v in bos_none[0].items()},
        "entropy_step0": {
            c: {"mean": float(r["mean"]), "std": float(r["std"]), "n": int(r["count"])}
            for c, r in ent0.iterrows()
        },
        "kl_rsp_to_none_step0_mean": float(kl.mean()) if len(kl) else None,
    }


def head_masses(metrics: pd.DataFrame, steps: list[int] | None = None) -> pd.DataFrame:
    """Mean attention mass per (condition, prompt_id, sample, layer, head), over ``steps``.

    Columns ``rsp``, ``bos``, ``prompt``, ``gen`` (the key groups). This is Gu et al.'s
    alpha (mean attention on a key over queries), with the decision queries (step 0 = the last
    prefill position, then each generated token) as the queries. ``rsp`` is the mass on the
    RSP positions as a group: the engine does not record single RSP positions, so the RSP
    "sink" here is the summed mass of all L vectors (>= the mass of any one of them).
    """
    d = metrics[metrics["metric"].isin([f"attn_{g}" for g in GROUPS])]
    if steps is not None:
        d = d[d["step"].isin(steps)]
    keys = ["condition", "prompt_id", "sample", "layer", "head"]
    wide = d.groupby([*keys, "metric"], observed=True)["value"].mean().unstack("metric")
    wide = wide.rename(columns=lambda c: str(c).removeprefix("attn_")).reset_index()
    for g in GROUPS:
        if g not in wide:
            wide[g] = np.nan
    wide["condition"] = wide["condition"].astype(str)
    wide["prompt_id"] = wide["prompt_id"].astype(str)
    return wide[[*keys, *GROUPS]]


def sink_rates(masses: pd.DataFrame, threshold: float = SINK_THRESHOLD) -> pd.DataFrame:
    """Per run (condition, prompt_id, sample): share of heads whose mean mass exceeds
    ``threshold``, for BOS (``bos``) and for the RSP group (``rsp``)."""
    flags = masses[["condition", "prompt_id", "sample"]].copy()
    flags["bos"] = (masses["bos"] > threshold).astype(float)
    flags["rsp"] = (masses["rsp"] > threshold).astype(float)
    return flags.groupby(["condition", "prompt_id", "sample"], sort=True).mean().reset_index()


def _ci(df: pd.DataFrame, col: str) -> dict[str, float | int]:
    return mean_ci(df[col].to_numpy(), groups=df["prompt_id"].to_numpy())


def _paired(df: pd.DataFrame, col: str) -> dict[str, float | int]:
    a, b = paired_frame(df, "rsp", "none", value=col)
    return paired_test(a, b)


def _sink_rate_summary(masses: pd.DataFrame, threshold: float) -> dict[str, Any]:
    rates = sink_rates(masses, threshold)
    out: dict[str, Any] = {}
    for cond, label in (("none", "without_rsp"), ("rsp", "with_rsp")):
        sel = rates[rates["condition"] == cond]
        if len(sel):
            out[f"bos_{label}"] = _ci(sel, "bos")
    sel = rates[rates["condition"] == "rsp"]
    if len(sel):
        out["rsp_with_rsp"] = _ci(sel, "rsp")
    return out


def steal_analysis(masses: pd.DataFrame, threshold: float = SINK_THRESHOLD) -> dict[str, Any]:
    """Paired rsp-vs-none comparison of the attention budget, per prompt.

    The four group masses of a query sum to 1, so the RSP's mass is paid for by BOS, prompt and
    generated keys: ``source_share[g] = -(mass_g(rsp) - mass_g(none)) / mass_rsp(rsp)`` (mean
    over heads, per prompt), and the shares sum to 1. A BOS share near 1 means the RSP steals
    the BOS sink; near 0 means it is an extra sink fed by the content keys.
    """
    per_run = (
        masses.groupby(["condition", "prompt_id", "sample"], sort=True)[list(GROUPS)]
        .mean()
        .reset_index()
    )
    per_prompt = per_run.groupby(["condition", "prompt_id"], sort=True)[list(GROUPS)].mean()
    if not {"rsp", "none"} <= set(per_run["condition"]):
        return {}
    rsp, none = per_prompt.loc["rsp"], per_prompt.loc["none"]
    common = rsp.index.intersection(none.index)
    rsp, none = rsp.loc[common], none.loc[common]
    out: dict[str, Any] = {
        "bos_mass_change": paired_test(rsp["bos"].to_numpy(), none["bos"].to_numpy()),
        "rsp_mass": mean_ci(rsp["rsp"].to_numpy()),
        "rsp_mass_source_share": {},
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        for g in ("bos", "prompt", "gen"):
            share = -(rsp[g] - none[g]).to_numpy() / rsp["rsp"].to_numpy()
            out["rsp_mass_source_share"][g] = mean_ci(share)
    # the heads that are BOS sinks without the RSP: what happens to them with it?
    head_mean = masses.groupby(["condition", "layer", "head"])[list(GROUPS)].mean()
    bos_none = head_mean.loc["none", "bos"]
    sink_heads = bos_none[bos_none > threshold].index
    out["n_bos_sink_heads_without_rsp"] = int(len(sink_heads))
    if len(sink_heads):
        sel = masses.set_index(["layer", "head"]).loc[sink_heads].reset_index()
        sel = sel.groupby(["condition", "prompt_id"])[list(GROUPS)].mean()
        out["in_bos_sink_heads"] = {
            "bos_without_rsp": mean_ci(sel.loc["none", "bos"].to_numpy()),
            "bos_with_rsp": mean_ci(sel.loc["rsp", "bos"].to_numpy()),
            "rsp_with_rsp": mean_ci(sel.loc["rsp", "rsp"].to_numpy()),
        }
    return out


def head_table(masses: pd.DataFrame, threshold: float = SINK_THRESHOLD) -> pd.DataFrame:
    """One row per (layer, head): mean BOS mass without/with RSP, RSP mass, and sink flags."""
    m = masses.groupby(["condition", "layer", "head"])[["bos", "rsp"]].mean()
    t = pd.DataFrame(
        {
            "bos_none": m.loc["none", "bos"] if "none" in m.index else np.nan,
            "bos_rsp": m.loc["rsp", "bos"],
            "rsp_rsp": m.loc["rsp", "rsp"],
        }
    ).reset_index()
    t["bos_sink_none"] = t["bos_none"] > threshold
    t["bos_sink_rsp"] = t["bos_rsp"] > threshold
    t["rsp_sink"] = t["rsp_rsp"] > threshold
    return t


def _head_counts(table: pd.DataFrame) -> dict[str, int]:
    lost = table["bos_sink_none"] & ~table["bos_sink_rsp"]
    return {
        "n_heads": int(len(table)),
        "bos_sinks_without_rsp": int(table["bos_sink_none"].sum()),
        "bos_sinks_with_rsp": int(table["bos_sink_rsp"].sum()),
        "rsp_sinks": int(table["rsp_sink"].sum()),
        "bos_sinks_lost": int(lost.sum()),
        "bos_sinks_lost_to_rsp": int((lost & table["rsp_sink"]).sum()),
        "rsp_sinks_in_non_bos_sink_heads": int((table["rsp_sink"] & ~table["bos_sink_none"]).sum()),
        "rsp_sinks_that_keep_bos_sink": int((table["rsp_sink"] & table["bos_sink_rsp"]).sum()),
    }


def _verdict(rates: dict[str, Any], steal: dict[str, Any]) -> str:
    """A one-line reading of the numbers (the numbers themselves are in the summary)."""
    rsp_rate = rates.get("rsp_with_rsp", {})
    adds = bool(rsp_rate) and rsp_rate["mean"] > 0 and (rsp_rate["ci_low"] or 0) > 0
    change = steal.get("bos_mass_change", {})
    share = steal.get("rsp_mass_source_share", {}).get("bos", {}).get("mean", np.nan)
    bos_drops = bool(change) and (change["diff_ci_high"] < 0)
    steals = bos_drops and share > STEAL_MAJORITY
    if adds and steals:
        return "RSP becomes a sink and takes most of its mass from BOS (steals the sink)"
    if adds:
        return "RSP adds a second sink: most of its mass comes from non-BOS keys"
    if steals:
        return "RSP takes mass mostly from BOS but forms no sink heads above the threshold"
    if bos_drops:
        return "BOS mass drops with the RSP, but most RSP mass comes from non-BOS keys"
    return "no sink effect of the RSP detected at this sample size"


def summarize(metrics: pd.DataFrame, threshold: float = SINK_THRESHOLD) -> dict[str, Any]:
    """Headline numbers: RSP and BOS mass per step and layer (``_step_summary``), Gu et al.'s
    sink rates with prompt-level bootstrap CIs, and the steal-or-add comparison, over all steps
    and (keys ending in ``_step0``) at step 0 alone, the query that produces the first token.

    With the RSP at the end of the prompt the step-0 query is the last RSP vector itself, so
    its RSP mass includes attention to itself.
    """
    out = _step_summary(metrics)
    masses = head_masses(metrics)
    runs = masses[["condition", "prompt_id", "sample"]].drop_duplicates()
    out["n_prompts"] = int(runs["prompt_id"].nunique())
    out["n_draws"] = int(runs[runs["condition"] == "rsp"].groupby("prompt_id").size().max())
    out["sink_threshold"] = threshold
    for suffix, m in (("", masses), ("_step0", head_masses(metrics, steps=[0]))):
        out.update(_sink_summary(m, threshold, suffix))
    return out


def _sink_summary(masses: pd.DataFrame, threshold: float, suffix: str) -> dict[str, Any]:
    rates = _sink_rate_summary(masses, threshold)
    out: dict[str, Any] = {"sink_rate" + suffix: rates}
    paired = {"rsp", "none"} <= set(masses["condition"])
    if paired:
        out["bos_sink_rate_change" + suffix] = _paired(sink_rates(masses, threshold), "bos")
    steal = steal_analysis(masses, threshold)
    out.update({k + suffix: v for k, v in steal.items()})
    if paired:
        table = head_table(masses, threshold)
        out["head_counts" + suffix] = _head_counts(table)
        top = table.sort_values("rsp_rsp", ascending=False).head(5)
        out["rsp_mass_top_heads" + suffix] = {
            f"L{r.layer}H{r.head}": {
                "mean": float(r.rsp_rsp),
                "bos_without_rsp": float(r.bos_none),
                "bos_with_rsp": float(r.bos_rsp),
            }
            for r in top.itertuples()
        }
    out["verdict" + suffix] = _verdict(rates, steal)
    return out


def plot_steps(metrics: pd.DataFrame) -> go.Figure:
    """Layer x step heatmaps: attention mass on RSP keys, beside the BOS sink (RSP runs)."""
    rsp = layer_step_means(metrics, "attn_rsp")
    bos = layer_step_means(metrics, "attn_bos")
    zmax = float(max(rsp.max().max(), bos.max().max()))
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.08,
        subplot_titles=("mass on RSP positions", "mass on BOS / first position"),
    )
    for col, table in ((1, rsp), (2, bos)):
        fig.add_trace(
            go.Heatmap(
                z=table.values,
                x=table.columns,
                y=table.index,
                zmin=0,
                zmax=zmax,
                colorscale="Viridis",
                colorbar=dict(title="mass"),
                showscale=col == 2,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="generation step", row=1, col=col)
        fig.update_yaxes(title_text="layer", row=1, col=col)
    n = (
        metrics.loc[metrics["condition"] == "rsp", ["prompt_id", "sample"]]
        .drop_duplicates()
        .shape[0]
    )
    fig.update_layout(
        title=f"Attention to the RSP vs the BOS sink (mean over heads, {n} RSP runs)",
        template="plotly_white",
    )
    return fig


def plot_heads(metrics: pd.DataFrame, threshold: float = SINK_THRESHOLD) -> go.Figure:
    """Steal or add? Per head, at step 0 and over all steps: BOS mass without vs with the RSP,
    colored by the RSP's mass (a stolen sink falls below the diagonal by about its RSP mass, an
    added one stays on it); per layer: the share of sink heads."""
    tables = {
        "step 0": head_table(head_masses(metrics, steps=[0]), threshold),
        "all steps": head_table(head_masses(metrics), threshold),
    }
    cmax = max(max(float(t["rsp_rsp"].max()) for t in tables.values()), 1e-9)
    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.07,
        subplot_titles=(
            "per head, step 0: BOS mass (color: RSP mass)",
            "per head, mean over steps",
            f"share of heads with mean mass > {threshold:g}",
        ),
    )
    for col, (label, table) in enumerate(tables.items(), start=1):
        fig.add_trace(
            go.Scatter(
                x=table["bos_none"],
                y=table["bos_rsp"],
                mode="markers",
                marker=dict(
                    color=table["rsp_rsp"],
                    colorscale="Viridis",
                    cmin=0,
                    cmax=cmax,
                    size=7,
                    colorbar=dict(title="RSP mass", x=-0.12, len=0.8),
                    showscale=col == 1,
                    line=dict(width=0.5, color="black"),
                ),
                text=[f"L{r.layer} H{r.head}: RSP {r.rsp_rsp:.2f}" for r in table.itertuples()],
                hovertemplate="%{text}<br>BOS none %{x:.3f}<br>BOS rsp %{y:.3f}<extra></extra>",
                name=f"heads ({label})",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=[0, 1],
                y=[0, 1],
                mode="lines",
                line=dict(color="grey", dash="dot"),
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        line = dict(color="red", dash="dash", width=1)
        fig.add_vline(x=threshold, line=line, row=1, col=col)
        fig.add_hline(y=threshold, line=line, row=1, col=col)
        fig.update_xaxes(title_text="BOS mass without RSP", range=[-0.02, 1.02], row=1, col=col)
        fig.update_yaxes(title_text="BOS mass with RSP", range=[-0.02, 1.02], row=1, col=col)
    series = (
        ("bos_sink_none", "BOS sink, no RSP", "#1f77b4"),
        ("bos_sink_rsp", "BOS sink, with RSP", "#ff7f0e"),
        ("rsp_sink", "RSP sink (all L positions)", "#2ca02c"),
    )
    for label, table in tables.items():
        per_layer = table.groupby("layer")[[c for c, _, _ in series]].mean()
        for col, name, color in series:
            fig.add_trace(
                go.Scatter(
                    x=per_layer.index,
                    y=per_layer[col],
                    mode="lines+markers",
                    name=f"{name} ({label})",
                    line=dict(color=color, dash=None if label == "step 0" else "dot"),
                    marker=dict(size=4),
                ),
                row=1,
                col=3,
            )
    fig.update_xaxes(title_text="layer", row=1, col=3)
    fig.update_yaxes(title_text="share of heads", range=[-0.02, 1.05], row=1, col=3)
    n = metrics.loc[metrics["condition"] == "rsp", ["prompt_id", "sample"]].drop_duplicates()
    fig.update_layout(
        title=(
            "Does the RSP steal the BOS sink or add one? (Gu et al. sink metric; "
            f"{len(n)} RSP runs, paired no-RSP runs)"
        ),
        template="plotly_white",
        legend=dict(orientation="h", x=0.0, y=-0.18, font=dict(size=11)),
        margin=dict(b=140),
    )
    return fig


def plot(metrics: pd.DataFrame) -> dict[str, go.Figure]:
    """``attention_sink``: layer x step heatmaps; ``attention_sink_heads``: steal or add."""
    return {"attention_sink": plot_steps(metrics), "attention_sink_heads": plot_heads(metrics)}

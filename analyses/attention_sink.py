"""Attention sink: how much attention the random positions absorb, step by step and per layer.

Runs the prompt set with and without an RSP (paired by prompt and sampling seed) and records,
for every generated step, layer and head, the attention mass of the new query on the RSP keys,
on BOS (the first position, the classic sink), on the prompt and on generated tokens.
"""

from __future__ import annotations

from typing import Annotated, Any

import pandas as pd
import plotly.graph_objects as go
import typer
from plotly.subplots import make_subplots

from rsp_interp.captures import CaptureConfig
from rsp_interp.experiment import Condition, ExperimentResult, run_experiment
from rsp_interp.generation import SamplingConfig

NAME = "attention-sink"


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


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
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


def plot(metrics: pd.DataFrame) -> go.Figure:
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

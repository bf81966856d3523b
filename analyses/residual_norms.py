"""Residual norms and massive activations at RSP, BOS, prompt and generated positions.

Generates from the prompt set with and without an RSP (paired by prompt and sampling seed, the
same draws as ``attention-sink``) and records, for every layer (the stream entering block ``l``;
the last layer is the output of the last block) and every position: the residual norm, the
median |activation| and the ``n_top`` largest |activations| with their dimensions. Prefill
positions are recorded in the prefill pass, generated tokens at the step that processes them.

Massive activations (Sun et al., "Massive Activations in Large Language Models", arXiv
2402.17762) are activations of magnitude > 100 and about 1000x the median magnitude; they sit in
a few fixed dimensions at the first token and at delimiters. Do the random positions grow them
the way BOS does?
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import typer
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from rsp_interp.captures import CaptureConfig, RunState
from rsp_interp.errors import InputError
from rsp_interp.experiment import ROLE_NAMES, ExperimentResult, tokenize_problems
from rsp_interp.generation import Hook, Intervention, SamplingConfig, generate
from rsp_interp.injection import Role
from rsp_interp.rsp import RSPSampler, derive_seed
from rsp_interp.stats import mean_ci, paired_test

NAME = "residual-norms"
N_TOP = 3
MASSIVE_MIN = 100.0
"""Sun et al.'s absolute criterion for a massive activation (|x| > 100)."""
MASSIVE_RATIO = 1000.0
"""Sun et al.'s relative criterion: about 1000x the median |activation| of the same vector."""
ROLES = ("bos", "prompt", "rsp", "gen")
COLUMNS = [
    "condition",
    "prompt_id",
    "sample",
    "rsp_seed",
    "step",
    "layer",
    "head",
    "position",
    "role",
    "metric",
    "rank",
    "dim",
    "value",
]
"""``step``: generation step that processed a generated token (-1 for prefill positions);
``position``: position id in the sequence; ``rank``/``dim``: rank and dimension of a ``top_abs``
value (-1 for ``resid_norm`` and ``median_abs``). ``seq_median_abs`` (role ``all``, position -1)
is the median |x| over the whole prefill of the row at that layer."""


def cli_options(
    n_top: Annotated[
        int, typer.Option(help="Largest |activations| (and their dimensions) kept per position.")
    ] = N_TOP,
) -> dict[str, Any]:
    """Extra flags of ``rsp-interp residual-norms`` -> keyword arguments of :func:`experiment`."""
    return {"n_top": n_top}


class ActivationRecorder(Intervention):
    """Records norm, median |x| and top-k |x| (with dims) of the residual at every layer.

    Prefill: every position, plus the median |x| over the whole prefill (all real positions and
    dimensions: Sun et al.'s reference for "1000x the median"); cached steps: the current
    (generated) token. Changes nothing. Medians are torch's (the lower middle value).
    """

    def __init__(self, n_layers: int, n_top: int = N_TOP):
        self.n_layers, self.n_top = n_layers, n_top
        self.prefill: dict[int, tuple[torch.Tensor, ...]] = {}
        self.seq_median: dict[int, torch.Tensor] = {}
        self.steps: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def describe(self) -> dict[str, Any]:
        return {"type": "ActivationRecorder", "n_top": self.n_top}

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        self.prefill, self.seq_median, self.steps = {}, {}, {}

        def make(layer: int):
            def hook(resid: torch.Tensor, hook: Any = None) -> torch.Tensor:
                if state.phase == "baseline":
                    return resid
                x = resid.detach().float()
                if state.phase != "prefill":
                    x = x[:, -1:]
                stats = reduce_residual(x, self.n_top)
                if state.phase == "prefill":
                    self.prefill[layer] = stats
                    real = state.roles[:, : x.shape[1]] != int(Role.PAD)
                    self.seq_median[layer] = torch.stack(
                        [x[b][real[b]].abs().median() for b in range(x.shape[0])]
                    ).cpu()
                else:
                    self.steps[(state.step, layer)] = tuple(s[:, 0] for s in stats)
                return resid

            return hook

        n = self.n_layers
        hooks = [(f"blocks.{layer}.hook_resid_pre", make(layer)) for layer in range(n)]
        return hooks + [(f"blocks.{n - 1}.hook_resid_post", make(n))]


def reduce_residual(x: torch.Tensor, n_top: int) -> tuple[torch.Tensor, ...]:
    """``x`` ``[B, T, d]`` -> norm ``[B, T]``, median |x| ``[B, T]``, top-k |x| and their dims
    ``[B, T, k]`` (on the CPU)."""
    a = x.abs()
    top = a.topk(min(n_top, a.shape[-1]), dim=-1)
    return (
        x.norm(dim=-1).cpu(),
        a.median(dim=-1).values.cpu(),
        top.values.cpu(),
        top.indices.cpu(),
    )


def experiment(model: Any, problems: list, opts: Any, n_top: int = N_TOP) -> ExperimentResult:
    """RSP vs no-RSP generation with the activation recorder on every layer."""
    if n_top < 1:
        raise InputError(f"--n-top must be >= 1, got {n_top}.")
    tps = tokenize_problems(model, problems)
    sampling = SamplingConfig(
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
    )
    capture = CaptureConfig.off()
    cells = [(i, s) for i in range(len(problems)) for s in range(opts.samples)]
    conditions = [("rsp", opts.rsp()), ("none", None)]
    n_batches = len(conditions) * -(-len(cells) // opts.batch_size)
    bar = tqdm(total=n_batches, desc="generating", disable=not opts.progress, unit="batch")
    frames, samples = [], []
    for name, cfg in conditions:
        sampler = RSPSampler.for_model(model, cfg) if cfg is not None else None
        for start in range(0, len(cells), opts.batch_size):
            chunk = cells[start : start + opts.batch_size]
            rsp_seeds = [derive_seed(cfg.seed, i, s) if cfg else -1 for i, s in chunk]
            recorder = ActivationRecorder(model.n_layers, n_top)
            out = generate(
                model,
                [tps[i] for i, _ in chunk],
                sampler.draw_batch(rsp_seeds) if sampler else None,
                position=cfg.position if cfg else "end",
                sampling=sampling,
                capture=capture,
                sample_seeds=[derive_seed(opts.seed, i, s, 1) for i, s in chunk],
                interventions=[recorder],
            )
            keys = pd.DataFrame(
                {
                    "condition": name,
                    "prompt_id": [problems[i].id for i, _ in chunk],
                    "sample": [s for _, s in chunk],
                    "rsp_seed": rsp_seeds,
                }
            )
            frames.append(tidy_activations(recorder, out.batch, out.n_generated, keys))
            samples.append(
                keys.assign(
                    text=out.texts,
                    n_tokens=out.n_generated.numpy(),
                    token_ids=[[x for x in row if x >= 0] for row in out.tokens.tolist()],
                )
            )
            bar.update()
    bar.close()
    metrics = pd.concat(frames, ignore_index=True)
    for col in ("condition", "prompt_id", "role", "metric"):
        metrics[col] = metrics[col].astype("category")
    config = {
        "conditions": [{"name": n, "rsp": c.to_dict() if c else None} for n, c in conditions],
        "n_prompts": len(problems),
        "n_samples": opts.samples,
        "sampling": sampling.__dict__,
        "n_top": n_top,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "prompt_ids": [p.id for p in problems],
    }
    return ExperimentResult(metrics, pd.concat(samples, ignore_index=True), pd.DataFrame(), config)


def tidy_activations(
    rec: ActivationRecorder, batch: Any, n_generated: torch.Tensor, keys: pd.DataFrame
) -> pd.DataFrame:
    """Long rows (COLUMNS) from one batch's recordings; padding and post-stop steps dropped."""
    n_l = rec.n_layers + 1
    roles = batch.roles.cpu().numpy()
    pos = batch.position_ids.cpu().numpy()
    # prefill: [L+1, B, T] (+ [k])
    norm, med, top_v, top_i = (
        torch.stack([rec.prefill[lay][j] for lay in range(n_l)]) for j in range(4)
    )
    b_idx, t_idx = np.nonzero(roles != int(Role.PAD))
    parts = [
        _rows(norm, med, top_v, top_i, b_idx, t_idx, pos[b_idx, t_idx], roles[b_idx, t_idx], -1)
    ]
    # generated tokens: the step-t pass processes generated token t-1 (t >= 1)
    last_pos = pos[:, -1]
    for step in sorted({s for s, _ in rec.steps}):
        live = np.nonzero(step < n_generated.numpy())[0]
        if not len(live):
            continue
        norm, med, top_v, top_i = (
            torch.stack([rec.steps[(step, lay)][j] for lay in range(n_l)])[:, :, None]
            for j in range(4)
        )
        zeros = np.zeros_like(live)
        parts.append(
            _rows(
                norm,
                med,
                top_v,
                top_i,
                live,
                zeros,
                last_pos[live] + step,
                np.full(len(live), int(Role.GEN)),
                step,
            )
        )
    frames = []
    for p in parts:
        rows = keys.iloc[p.pop("row")].reset_index(drop=True)
        frames.append(pd.concat([rows, pd.DataFrame(p)], axis=1))
    seq = torch.stack([rec.seq_median[lay] for lay in range(n_l)])  # [L+1, B]
    n_rows = seq.shape[1]
    frames.append(
        keys.iloc[np.tile(np.arange(n_rows), n_l)]
        .reset_index(drop=True)
        .assign(
            layer=np.repeat(np.arange(n_l), n_rows).astype(np.int16),
            position=np.int32(-1),
            role="all",
            metric="seq_median_abs",
            rank=np.int16(-1),
            dim=np.int32(-1),
            value=seq.reshape(-1).numpy().astype(np.float64),
            step=np.int16(-1),
        )
    )
    df = pd.concat(frames, ignore_index=True)
    df["head"] = -1
    return df[COLUMNS]


def _rows(
    norm: torch.Tensor,
    med: torch.Tensor,
    top_v: torch.Tensor,
    top_i: torch.Tensor,
    b_idx: np.ndarray,
    t_idx: np.ndarray,
    position: np.ndarray,
    role: np.ndarray,
    step: int,
) -> dict[str, np.ndarray]:
    """Columns for the selected (row, token) cells of ``[L+1, B, T(, k)]`` recordings."""
    n_l, k, n = norm.shape[0], top_v.shape[-1], len(b_idx)
    layer = np.repeat(np.arange(n_l), n)
    cell = np.tile(np.arange(n), n_l)
    per_cell = lambda a: a[:, b_idx, t_idx].reshape(-1).numpy()  # noqa: E731
    blocks = [("resid_norm", per_cell(norm), -1, -1), ("median_abs", per_cell(med), -1, -1)]
    for r in range(k):
        blocks.append(("top_abs", per_cell(top_v[..., r]), r, per_cell(top_i[..., r])))
    cols: dict[str, list] = {c: [] for c in ("row", "layer", "position", "role", "metric")}
    cols |= {"rank": [], "dim": [], "value": [], "step": []}
    for metric, value, rank, dim in blocks:
        cols["row"].append(b_idx[cell])
        cols["layer"].append(layer)
        cols["position"].append(position[cell])
        cols["role"].append(role[cell])
        cols["metric"].append(np.full(len(cell), metric, dtype=object))
        cols["rank"].append(np.full(len(cell), rank))
        cols["dim"].append(np.broadcast_to(dim, len(cell)))
        cols["value"].append(value.astype(np.float64))
        cols["step"].append(np.full(len(cell), step))
    out = {c: np.concatenate(v) for c, v in cols.items()}
    out["role"] = np.array([ROLE_NAMES[int(r)] for r in range(5)], dtype=object)[out["role"]]
    for c in ("layer", "step", "rank"):
        out[c] = out[c].astype(np.int16)
    out["dim"] = out["dim"].astype(np.int32)
    out["position"] = out["position"].astype(np.int32)
    return out


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def per_position(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, prompt_id, sample, layer, role, position, step): ``norm``,
    ``median`` (of this position's |x|), ``top1`` (largest |x|), ``top1_dim``, ``seq_median``
    (median |x| over the row's whole prefill at that layer) and ``ratio`` = top1 / seq_median."""
    keys = ["condition", "prompt_id", "sample", "layer", "role", "position", "step"]
    run_keys = ["condition", "prompt_id", "sample", "layer"]
    m = metrics[(metrics["rank"] <= 0) & (metrics["metric"] != "seq_median_abs")]
    wide = m.pivot_table(
        index=keys, columns="metric", values="value", observed=True, aggfunc="first"
    )
    dims = m[m["metric"] == "top_abs"].set_index(keys)["dim"]
    out = pd.DataFrame(
        {
            "norm": wide["resid_norm"],
            "median": wide["median_abs"],
            "top1": wide["top_abs"],
        }
    )
    out["top1_dim"] = dims.reindex(out.index).to_numpy()
    out = out.reset_index()
    for col in ("condition", "prompt_id", "role"):
        out[col] = out[col].astype(str)
    seq = metrics[metrics["metric"] == "seq_median_abs"][[*run_keys, "value"]].copy()
    for col in ("condition", "prompt_id"):
        seq[col] = seq[col].astype(str)
    out = out.merge(seq.rename(columns={"value": "seq_median"}), on=run_keys, how="left")
    with np.errstate(divide="ignore"):
        out["ratio"] = out["top1"] / out["seq_median"]
    return out


def is_massive(top1: pd.Series | np.ndarray, ratio: pd.Series | np.ndarray) -> np.ndarray:
    """Sun et al.'s criterion: |x| > MASSIVE_MIN and >= MASSIVE_RATIO x the median |x| (of the
    whole hidden state: ``ratio`` from :func:`per_position`)."""
    return (np.asarray(top1) > MASSIVE_MIN) & (np.asarray(ratio) >= MASSIVE_RATIO)


def role_layer_table(pp: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, prompt_id, sample, role, layer): mean norm over the role's positions and
    the largest |activation| (max over its positions)."""
    keys = ["condition", "prompt_id", "sample", "role", "layer"]
    g = pp.groupby(keys, sort=True)
    return pd.DataFrame({"norm": g["norm"].mean(), "top1": g["top1"].max()}).reset_index()


def series_label(condition: str, role: str) -> str:
    return role if condition == "rsp" else f"{role} (no RSP)"


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    """Per role: residual norm, largest |activation|, its ratio to the median, the share of
    positions with a massive activation, and the dimensions that carry them; RSP vs BOS."""
    pp = per_position(metrics)
    runs = pp[["condition", "prompt_id", "sample"]].drop_duplicates()
    out: dict[str, Any] = {
        "n_prompts": int(runs["prompt_id"].nunique()),
        "n_draws": int(runs[runs["condition"] == "rsp"].groupby("prompt_id").size().max()),
        "massive_min": MASSIVE_MIN,
        "massive_ratio": MASSIVE_RATIO,
    }
    pp["massive"] = is_massive(pp["top1"], pp["ratio"])
    per_run = pp.groupby(["condition", "prompt_id", "sample", "role"], sort=True)
    # every position's peak over layers, then the mean/max over the role's positions
    peak = pp.groupby(["condition", "prompt_id", "sample", "role", "position", "step"]).agg(
        top1=("top1", "max"), ratio=("ratio", "max"), massive=("massive", "any")
    )
    peak_run = peak.groupby(["condition", "prompt_id", "sample", "role"]).agg(
        top1=("top1", "max"), ratio=("ratio", "max"), massive=("massive", "mean")
    )
    norm_run = per_run["norm"].mean()
    series = {}
    for cond, role in peak_run.index.droplevel(["prompt_id", "sample"]).unique():
        if cond == "none" and role != "gen" and _same_runs(norm_run, role):
            continue  # positions before the RSP: identical with and without it
        series[series_label(cond, role)] = (cond, role)
    for key, source in (
        ("resid_norm_mean", norm_run),
        ("top_abs_max", peak_run["top1"]),
        ("top_to_median_ratio_max", peak_run["ratio"]),
        ("massive_position_share", peak_run["massive"]),
    ):
        out[key] = {}
        for label, (cond, role) in series.items():
            sel = source.xs((cond, role), level=("condition", "role"))
            ids = sel.index.get_level_values("prompt_id")
            out[key][label] = mean_ci(sel.to_numpy(dtype=float), groups=ids)
    # per-layer means as lists indexed by layer (kept out of the CLI table)
    for key, col, how in (
        ("resid_norm_by_layer", "norm", "mean"),
        ("top_abs_by_layer", "top1", "max"),
    ):
        out[key] = {
            series_label(c, r): g.groupby("layer")[col].agg(how).sort_index().tolist()
            for (c, r), g in pp.groupby(["condition", "role"])
        }
    rsp_runs = pp[pp["condition"] == "rsp"]
    massive = rsp_runs[rsp_runs["massive"]]
    out["massive_dims"] = _top_dims(massive, roles=sorted(set(rsp_runs["role"])))
    out["massive_layers"] = {
        role: sorted(int(x) for x in massive.loc[massive["role"] == role, "layer"].unique())
        for role in sorted(set(rsp_runs["role"]))
    }
    out.update(_rsp_vs_bos(pp))
    out.update(_gen_paired(pp))
    return out


def _same_runs(per_run: pd.Series, role: str) -> bool:
    """True when ``role``'s per-run values are the same with and without the RSP."""
    try:
        a = per_run.xs(("rsp", role), level=("condition", "role"))
        b = per_run.xs(("none", role), level=("condition", "role"))
    except KeyError:
        return False
    a, b = a.align(b, join="inner")
    return len(a) > 0 and bool(np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5))


def _top_dims(pp: pd.DataFrame, roles: list[str], n: int = 5) -> dict[str, dict[str, float]]:
    """Per role: the dimensions holding the largest |activation| of the given (position, layer)
    cells, with their share of the cells (massive activations live in a few fixed dims)."""
    out = {}
    for role in roles:
        share = pp.loc[pp["role"] == role, "top1_dim"].value_counts(normalize=True).head(n)
        out[role] = {str(int(d)): round(float(s), 3) for d, s in share.items()}
    return out


def _rsp_vs_bos(pp: pd.DataFrame) -> dict[str, Any]:
    """RSP positions against the same run's BOS: peak |activation| ratio, and how often their
    largest activation sits in BOS's dimension at the layers where BOS's is massive."""
    r = pp[pp["condition"] == "rsp"]
    if not {"rsp", "bos"} <= set(r["role"]):
        return {}
    keys = ["prompt_id", "sample"]
    peak_rsp = r[r["role"] == "rsp"].groupby(keys)["top1"].max()
    peak_bos = r[r["role"] == "bos"].groupby(keys)["top1"].max()
    ratio = (peak_rsp / peak_bos).dropna()
    ids = lambda s: s.index.get_level_values("prompt_id")  # noqa: E731
    out: dict[str, Any] = {"rsp_to_bos_peak_ratio": mean_ci(ratio.to_numpy(), groups=ids(ratio))}
    bos = r[(r["role"] == "bos") & r["massive"]].set_index([*keys, "layer"])["top1_dim"]
    if len(bos):
        out["top1_dim_same_as_bos_massive"] = {}
        for role in ("rsp", "prompt"):
            sel = r[r["role"] == role].join(bos.rename("bos_dim"), on=[*keys, "layer"], how="inner")
            same = (sel["top1_dim"] == sel["bos_dim"]).groupby([sel["prompt_id"], sel["sample"]])
            same = same.mean()
            out["top1_dim_same_as_bos_massive"][role] = mean_ci(same.to_numpy(), groups=ids(same))
    return out


def _gen_paired(pp: pd.DataFrame) -> dict[str, Any]:
    """Generated tokens with vs without the RSP (paired by prompt): mean norm and peak |x|."""
    g = pp[pp["role"] == "gen"]
    if set(g["condition"]) != {"rsp", "none"}:
        return {}
    per = g.groupby(["condition", "prompt_id"]).agg(norm=("norm", "mean"), top1=("top1", "max"))
    a, b = per.loc["rsp"], per.loc["none"]
    common = a.index.intersection(b.index)
    return {
        "gen_norm_rsp_vs_none": paired_test(a.loc[common, "norm"], b.loc[common, "norm"]),
        "gen_top_abs_rsp_vs_none": paired_test(a.loc[common, "top1"], b.loc[common, "top1"]),
    }


COLORS = {"bos": "#1f77b4", "prompt": "#7f7f7f", "rsp": "#d62728", "gen": "#2ca02c"}


def layer_band(df: pd.DataFrame, value: str, by: list[str]) -> pd.DataFrame:
    """Mean of ``value`` per (``by``, layer) with a prompt-level bootstrap 95% CI."""
    rows = []
    for key, g in df.groupby([*by, "layer"], sort=True):
        rows.append(
            {
                **dict(zip([*by, "layer"], key, strict=True)),
                **mean_ci(g[value].to_numpy(), groups=g["prompt_id"].to_numpy()),
            }
        )
    return pd.DataFrame(rows)


def add_band(
    fig: go.Figure,
    band: pd.DataFrame,
    name: str,
    color: str,
    row: int,
    col: int,
    dash: str | None = None,
    showlegend: bool = True,
) -> None:
    """A mean line with a shaded CI band (``band`` from :func:`layer_band`)."""
    rgba = _rgba(color, 0.18)
    lo, hi = band["ci_low"].fillna(band["mean"]), band["ci_high"].fillna(band["mean"])
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([band["layer"], band["layer"][::-1]]),
            y=np.concatenate([hi, lo[::-1]]),
            fill="toself",
            fillcolor=rgba,
            line=dict(width=0),
            hoverinfo="skip",
            showlegend=False,
            legendgroup=name,
        ),
        row=row,
        col=col,
    )
    fig.add_trace(
        go.Scatter(
            x=band["layer"],
            y=band["mean"],
            mode="lines+markers",
            name=name,
            legendgroup=name,
            showlegend=showlegend,
            marker=dict(size=4),
            line=dict(color=color, dash=dash),
        ),
        row=row,
        col=col,
    )


def _same_as_rsp(band: pd.DataFrame, role: str) -> bool:
    a = band[(band["condition"] == "rsp") & (band["role"] == role)]["mean"].to_numpy()
    b = band[(band["condition"] == "none") & (band["role"] == role)]["mean"].to_numpy()
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5))


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def plot(metrics: pd.DataFrame) -> go.Figure:
    """Residual norm per layer by role (CI bands over prompts), and the largest |activation|
    per layer by role (log scale; the dashed line is Sun et al.'s |x| = 100)."""
    pp = per_position(metrics)
    table = role_layer_table(pp)
    norm = layer_band(table, "norm", ["condition", "role"])
    top = layer_band(table, "top1", ["condition", "role"])
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=(
            "residual norm (mean over the role's positions)",
            "largest |activation| (max over the role's positions)",
        ),
    )
    for (cond, role), _ in norm.groupby(["condition", "role"]):
        if cond == "none" and role != "gen" and _same_as_rsp(norm, role):
            continue  # positions before the RSP are identical with and without it
        label = series_label(cond, role)
        dash = "dot" if cond == "none" else None
        for col, band in ((1, norm), (2, top)):
            sel = band[(band["condition"] == cond) & (band["role"] == role)]
            add_band(fig, sel, label, COLORS.get(role, "black"), 1, col, dash, col == 1)
    fig.add_hline(y=MASSIVE_MIN, line=dict(color="black", dash="dash", width=1), row=1, col=2)
    fig.update_yaxes(title_text="||x||", row=1, col=1)
    fig.update_yaxes(title_text="max |x_i|", type="log", row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(
            title_text="layer (residual entering block; last = output)", row=1, col=col
        )
    runs = pp.loc[pp["condition"] == "rsp", ["prompt_id", "sample"]].drop_duplicates()
    fig.update_layout(
        title=(
            f"Residual norms and massive activations by position role ({len(runs)} RSP runs, "
            f"{runs['prompt_id'].nunique()} prompts; bands: 95% CI over prompts)"
        ),
        template="plotly_white",
    )
    return fig

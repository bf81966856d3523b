"""Controls and dose-response: which property of the RSP flattens the first tokens?

One-factor-at-a-time sweeps around the default RSP (kind ``isotropic``, length and scale from the
common flags), all in one experiment so sampling seeds are shared (paired) across conditions:

* kind: isotropic, diagonal, norm-matched, token (real embeddings: not novel), zeros;
* length L in {1, 2, 4, 8, 16} (isotropic, default scale);
* sigma scale in {0, 0.25, 0.5, 1, 2, 4} (isotropic, default L; scale 0 = L copies of the mean);
* plus the no-RSP baseline.

Per condition: entropy of generated token 1 (and its mean over the first k) with prompt-level
bootstrap CIs, paired against the baseline, and KL(p_RSP || p_noRSP) at token 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analyses.first_k import _clean, sampling_config
from rsp_interp.captures import CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.experiment import Condition, ExperimentResult, run_experiment
from rsp_interp.generation import LogitsObserver
from rsp_interp.stats import mean_ci, paired_frame, paired_test

NAME = "controls"
KINDS = ("isotropic", "diagonal", "norm-matched", "token", "zeros")
LENGTHS = (1, 2, 4, 8, 16)
SCALES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_K = 4
DEFAULT_SAMPLES = 2
BASELINE = "none"


@dataclass(frozen=True)
class Arm:
    """One condition of the sweep: which factor it varies and at which level."""

    factor: str  # "baseline" | "kind" | "length" | "scale"
    level: str
    kind: str
    length: int
    scale: float

    @property
    def name(self) -> str:
        return BASELINE if self.factor == "baseline" else f"{self.factor}={self.level}"


def arms(
    opts: Any,
    kinds: tuple[str, ...] = KINDS,
    lengths: tuple[int, ...] = LENGTHS,
    scales: tuple[float, ...] = SCALES,
) -> list[Arm]:
    """The baseline plus the three sweeps around (isotropic, opts.rsp_length, opts.rsp_scale).

    An RSP config that two sweeps share (e.g. the default isotropic RSP) runs once, under its
    first name; the plot and table place it in every panel it belongs to.
    """
    length, scale = opts.rsp_length, float(opts.rsp_scale)
    out = [Arm("baseline", "none", "none", 0, 0.0)]
    out += [Arm("kind", k, k, length, scale) for k in kinds]
    out += [Arm("length", str(n), "isotropic", n, scale) for n in lengths]
    out += [Arm("scale", f"{s:g}", "isotropic", length, float(s)) for s in scales]
    seen: set[tuple[str, int, float]] = set()
    unique = []
    for a in out:
        if (a.kind, a.length, a.scale) not in seen:
            seen.add((a.kind, a.length, a.scale))
            unique.append(a)
    return unique


class Token1Logprobs(LogitsObserver):
    """Keeps the log-probs of generated token 1 of every row, in the order rows are generated,
    so KL to the baseline needs no extra forward pass."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def observe(self, state: Any, logits: torch.Tensor) -> None:
        if state.phase == "prefill":
            self.batches.append(logits[:, -1].float().log_softmax(-1).cpu())

    def logprobs(self) -> torch.Tensor:
        return torch.cat(self.batches)


def capture_config(k: int) -> CaptureConfig:
    return CaptureConfig.scores_only(k, ("top1_prob",))


def experiment(
    model: Any,
    problems: list,
    opts: Any,
    k: int = DEFAULT_K,
    samples: int = DEFAULT_SAMPLES,
    kinds: tuple[str, ...] = KINDS,
    lengths: tuple[int, ...] = LENGTHS,
    scales: tuple[float, ...] = SCALES,
) -> ExperimentResult:
    """Every arm on every prompt, ``samples`` RSP draws each (not ``opts.samples``: the sweep
    has 16 arms), ``k`` new tokens. KL(p_arm || p_noRSP) is computed for token 1 only."""
    if k < 1:
        raise InputError(f"controls k must be >= 1, got {k}.")
    if samples < 1:
        raise InputError(f"controls samples must be >= 1, got {samples}.")
    if any(n < 1 for n in lengths):
        raise InputError(f"RSP lengths must be >= 1, got {lengths}.")
    sweep = arms(opts, kinds, lengths, scales)
    observers = {a.name: Token1Logprobs() for a in sweep}
    conditions = [
        Condition(
            a.name,
            None if a.factor == "baseline" else opts.rsp(**_rsp_fields(a)),
            interventions=(observers[a.name],),
        )
        for a in sweep
    ]
    result = run_experiment(
        model,
        problems,
        conditions,
        n_samples=samples,
        sampling=sampling_config(opts, k),
        capture=capture_config(k),
        seed=opts.seed,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    m = result.metrics
    m = m[m["metric"].isin(["entropy", "top1_prob"]) & (m["step"] < k)]
    m = pd.concat([m, _kl_rows(observers, problems, samples)], ignore_index=True)
    by_name = {a.name: a for a in sweep}
    cond = m["condition"].astype(str)
    m["condition"] = cond.astype("category")
    m["metric"] = m["metric"].astype(str).astype("category")
    m["factor"] = cond.map(lambda c: by_name[c].factor).astype("category")
    m["rsp_kind"] = cond.map(lambda c: by_name[c].kind).astype("category")
    m["rsp_length"] = cond.map(lambda c: by_name[c].length).astype("int16")
    m["rsp_scale"] = cond.map(lambda c: by_name[c].scale).astype("float64")
    result.metrics = m.reset_index(drop=True)
    result.config.update(k=k, arms=[a.__dict__ for a in sweep])
    return result


def _kl_rows(observers: dict[str, Token1Logprobs], problems: list, samples: int) -> pd.DataFrame:
    """KL(p_arm || p_noRSP) of generated token 1, per (arm, prompt, sample) row."""
    cells = [(i, s) for i in range(len(problems)) for s in range(samples)]
    base = observers[BASELINE].logprobs()  # no RSP: identical for every sample of a prompt
    rows = []
    for name, obs in observers.items():
        if name == BASELINE:
            continue
        lp = obs.logprobs()
        kl = (lp.exp() * (lp - base)).sum(-1).double().numpy()
        for (i, s), v in zip(cells, kl, strict=True):
            rows.append((name, problems[i].id, s, 0, float(v)))
    df = pd.DataFrame(rows, columns=["condition", "prompt_id", "sample", "step", "value"])
    return df.assign(rsp_seed=-1, layer=-1, head=-1, metric="kl_to_baseline").astype(
        {"step": "int16", "layer": "int16", "head": "int16", "sample": "int32"}
    )


def _rsp_fields(arm: Arm) -> dict[str, Any]:
    return {"kind": arm.kind, "length": arm.length, "scale": arm.scale}


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def per_row_first_k_mean(metrics: pd.DataFrame, metric: str = "entropy") -> pd.DataFrame:
    """Mean of ``metric`` over the first k steps for every (condition, prompt, sample) row."""
    d = metrics[(metrics["metric"] == metric) & (metrics["step"] >= 0)]
    keys = ["condition", "prompt_id", "sample"]
    return d.groupby(keys, observed=True)["value"].mean().reset_index()


def condition_table(metrics: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per arm: token-1 entropy, first-k mean entropy, top-1 prob, KL; CIs; paired
    tests against the baseline on per-prompt means."""
    step0 = metrics[metrics["step"] == 0]
    fk = per_row_first_k_mean(metrics)
    rows = []
    arm_cols = ["condition", "factor", "rsp_kind", "rsp_length", "rsp_scale"]
    arms_seen = metrics[arm_cols].drop_duplicates().to_dict("records")
    for a in arms_seen:
        row: dict[str, Any] = {
            k: (str(v) if k in ("condition", "factor", "rsp_kind") else v) for k, v in a.items()
        }
        c = row["condition"]
        for label, frame in (
            ("entropy_t1", step0[step0["metric"] == "entropy"]),
            ("entropy_firstk", fk),
            ("top1_t1", step0[step0["metric"] == "top1_prob"]),
            ("kl_t1", step0[step0["metric"] == "kl_to_baseline"]),
        ):
            g = frame[frame["condition"] == c]
            res = mean_ci(g["value"].to_numpy(), groups=g["prompt_id"].astype(str), seed=seed)
            row[label] = res["mean"]
            row[f"{label}_ci_low"], row[f"{label}_ci_high"] = res["ci_low"], res["ci_high"]
            if label == "entropy_t1":
                row["n_prompts"] = res["n"]
            if label != "kl_t1" and c != BASELINE and len(g):
                t = paired_test(*paired_frame(frame, c, BASELINE))
                row[f"{label}_diff"] = t["mean_diff"]
                row[f"{label}_diff_ci_low"] = t["diff_ci_low"]
                row[f"{label}_diff_ci_high"] = t["diff_ci_high"]
                row[f"{label}_wilcoxon_p"] = t["wilcoxon_p"]
                row[f"{label}_t_p"] = t["t_p"]
        rows.append(row)
    return pd.DataFrame(rows)


DEFAULT_ARM = "kind=isotropic"
DESCRIPTIONS = {
    "kind=zeros": "zero vectors (no randomness, zero norm)",
    "scale=0": "scale 0 (L copies of the constant vector mu: no randomness, near-zero norm)",
    "kind=norm-matched": "norm-matched (random direction, mean token norm)",
    "kind=diagonal": "diagonal (per-dimension mean and variance)",
    "kind=token": "real token embeddings (random choice, but not novel)",
}
CONTRASTS = (
    ("kind=norm-matched", DEFAULT_ARM),
    ("kind=diagonal", DEFAULT_ARM),
    ("kind=token", DEFAULT_ARM),
    ("kind=zeros", "none"),
    ("scale=0.25", "scale=0"),
    ("length=1", DEFAULT_ARM),
)


def contrasts(metrics: pd.DataFrame, seed: int = 0) -> list[dict[str, Any]]:
    """Paired token-1 entropy differences between arms (per-prompt means), e.g. token vs
    isotropic: the direct answers to "norm or novelty?"."""
    e0 = metrics[(metrics["metric"] == "entropy") & (metrics["step"] == 0)]
    present = set(e0["condition"].astype(str))
    out = []
    for a, b in CONTRASTS:
        if {a, b} <= present:
            out.append({"a": a, "b": b, **paired_test(*paired_frame(e0, a, b), seed=seed)})
    return out


def _fmt_diff(mean: float, low: float, high: float, p: float) -> str:
    return f"{mean:+.3f} nats [{low:+.3f}, {high:+.3f}], Wilcoxon p={p:.3g}"


def _reading(table: pd.DataFrame, pairs: list[dict[str, Any]]) -> list[str]:
    """Plain-language answers to "randomness, norm or novelty?" from the token-1 entropy."""
    t = table.set_index("condition")
    lines = []
    for c in (DEFAULT_ARM, *DESCRIPTIONS):
        if c in t.index and "entropy_t1_diff" in t.columns:
            r = t.loc[c]
            what = DESCRIPTIONS.get(c, "isotropic RSP (the paper's)")
            lines.append(
                f"{what} vs no RSP, token-1 entropy: "
                + _fmt_diff(
                    r["entropy_t1_diff"],
                    r["entropy_t1_diff_ci_low"],
                    r["entropy_t1_diff_ci_high"],
                    r["entropy_t1_wilcoxon_p"],
                )
            )
    for c in pairs:
        lines.append(
            f"{c['a']} vs {c['b']}, token-1 entropy: "
            + _fmt_diff(c["mean_diff"], c["diff_ci_low"], c["diff_ci_high"], c["wilcoxon_p"])
        )
    return lines


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    table = condition_table(metrics)
    pairs = contrasts(metrics)
    rows = metrics[metrics["condition"] != BASELINE][["condition", "prompt_id", "sample"]]
    draws = rows.drop_duplicates().groupby(["condition", "prompt_id"], observed=True).size()
    out = {
        "n_prompts": int(metrics["prompt_id"].nunique()),
        "draws_per_prompt": int(draws.max()) if len(draws) else 0,
        "k": int(metrics["step"].max()) + 1,
        "note": "entropy_t1 = entropy (nats, T=1) of generated token 1 (step 0); entropy_firstk "
        "= its mean over the first k tokens; *_diff = condition - no RSP on per-prompt means; "
        "CIs: 95% bootstrap over prompts",
        "reading": _reading(table, pairs),
        "contrasts": pairs,
        "conditions": table.to_dict("records"),
    }
    return _clean(out)


FACTOR_TITLES = {
    "kind": "RSP kind (L, scale at default)",
    "length": "RSP length L (isotropic)",
    "scale": "sigma scale (isotropic)",
}


def panels(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Rows of :func:`condition_table` per sweep, with an x ``level``; the shared default arm
    (isotropic at the default L and scale) appears in every sweep it belongs to."""
    arms_ = table[table["condition"] != BASELINE]
    default = {}
    for col, other in (("rsp_length", "scale"), ("rsp_scale", "length")):
        ref = arms_[arms_["factor"].isin(["kind", other])][col]
        default[col] = ref.mode().iloc[0] if len(ref) else None
    iso = arms_[arms_["rsp_kind"] == "isotropic"]
    out = {
        "kind": arms_[
            (arms_["rsp_length"] == default["rsp_length"])
            & (arms_["rsp_scale"] == default["rsp_scale"])
        ].assign(level=lambda d: d["rsp_kind"]),
        "length": iso[iso["rsp_scale"] == default["rsp_scale"]]
        .assign(level=lambda d: d["rsp_length"])
        .sort_values("level"),
        "scale": iso[iso["rsp_length"] == default["rsp_length"]]
        .assign(level=lambda d: d["rsp_scale"])
        .sort_values("level"),
    }
    present = set(arms_["factor"])
    return {f: t for f, t in out.items() if f in present and len(t)}


def plot(metrics: pd.DataFrame) -> go.Figure:
    """Token-1 entropy (and first-k mean) per arm with 95% CIs, one panel per sweep;
    horizontal lines are the no-RSP baseline."""
    table = condition_table(metrics)
    groups = panels(table)
    factors = list(groups)
    fig = make_subplots(
        rows=1,
        cols=len(factors),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[FACTOR_TITLES[f] for f in factors],
    )
    base = table[table["condition"] == BASELINE]
    for col, factor in enumerate(factors, start=1):
        t = groups[factor]
        for label, color, name, symbol in (
            ("entropy_t1", "#d62728", "generated token 1", "circle"),
            ("entropy_firstk", "#9467bd", "mean of first k", "diamond-open"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=[f"{v:g}" if not isinstance(v, str) else v for v in t["level"]],
                    y=t[label],
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=t[f"{label}_ci_high"] - t[label],
                        arrayminus=t[label] - t[f"{label}_ci_low"],
                    ),
                    mode="markers+lines" if factor != "kind" else "markers",
                    marker=dict(color=color, size=9, symbol=symbol),
                    line=dict(color=color),
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
            if len(base):
                b = base.iloc[0]
                dash = "dash" if label == "entropy_t1" else "dot"
                fig.add_hline(
                    y=b[label], line=dict(color=color, dash=dash, width=1), row=1, col=col
                )
        fig.update_xaxes(title_text=factor, type="category", row=1, col=col)
    fig.update_yaxes(title_text="entropy (nats, T=1)", row=1, col=1)
    n = int(metrics["prompt_id"].nunique())
    fig.update_layout(
        title=f"Controls and dose-response ({n} prompts; 95% bootstrap CIs over prompts; "
        "horizontal lines: no RSP)",
        template="plotly_white",
        width=1300,
        height=450,
    )
    return fig

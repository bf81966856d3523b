"""Logit lens at the first generated token: at which depth does the distribution flatten?

One prefill pass per prompt and RSP draw (no decoding) records the residual stream at the last
position -- the query whose next-token distribution is the first generated token (step 0) --
entering every block and after the last one. Each is projected to the vocabulary with the
model's own final norm and unembedding (nostalgebraist's logit lens), giving one distribution
per layer; the last layer's is exactly the model's output distribution.

Per layer: entropy, top-1 probability, KL to the final layer's distribution, whether its top-1
token is the final top-1, and (RSP runs) KL(p_RSP,l || p_noRSP,l) against the same prompt
without an RSP. The flattening depth is the first layer from which the RSP's lens entropy stays
above the no-RSP one (prompt-level bootstrap CI) through the output.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import typer
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from analyses.residual_norms import add_band, layer_band
from rsp_interp.errors import InputError
from rsp_interp.experiment import METRIC_COLUMNS, ExperimentResult, tokenize_problems
from rsp_interp.injection import build_batch
from rsp_interp.metrics import entropy
from rsp_interp.rsp import RSPSampler, derive_seed
from rsp_interp.stats import mean_ci, paired_frame, paired_test

NAME = "logit-lens"
DRAWS_PER_SAMPLE = 4
"""Default RSP draws per prompt = this x ``--samples``: the lens is prefill-only, so draws are
cheap compared with the generating analyses."""
LENS_METRICS = ("entropy", "top1_prob", "kl_to_final", "top1_is_final", "kl_to_none")


def cli_options(
    draws: Annotated[
        int | None,
        typer.Option(
            help=f"RSP draws per prompt (default {DRAWS_PER_SAMPLE} x --samples; prefill only)."
        ),
    ] = None,
) -> dict[str, Any]:
    """Extra flags of ``rsp-interp logit-lens`` -> keyword arguments of :func:`experiment`."""
    return {"draws": draws}


def lens_modules(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model's final norm and unembedding (the bridge's wrapped originals)."""
    bridge = model.bridge
    parts = []
    for name in ("ln_final", "unembed"):
        comp = getattr(bridge, name, None)
        if comp is None:
            raise InputError(
                f"The bridge of {model.model_id} has no {name!r} component, so the logit lens "
                "cannot project the residual stream; use a model TransformerLens supports."
            )
        parts.append(getattr(comp, "original_component", None) or comp)
    return parts[0], parts[1]


def lens_logprobs(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``batch``; return the lens log-probs ``[B, n_layers + 1, V]`` at the last
    position (layer ``l`` = residual entering block ``l``, last = output of the last block)
    and the model's own output log-probs ``[B, V]`` there."""
    n = model.n_layers
    store: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def hook(resid: torch.Tensor, hook: Any = None) -> torch.Tensor:
            store[layer] = resid[:, -1].detach()
            return resid

        return hook

    hooks = [(f"blocks.{layer}.hook_resid_pre", make(layer)) for layer in range(n)]
    hooks.append((f"blocks.{n - 1}.hook_resid_post", make(n)))
    ln, unembed = lens_modules(model)
    keep = {"logits_to_keep": 1} if _accepts(model.hf_model, "logits_to_keep") else {}
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge(
            batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            **keep,
        )
        resid = torch.stack([store[layer] for layer in range(n + 1)], dim=1)  # [B, L+1, d]
        lens = unembed(ln(resid)).float().log_softmax(-1)
    return lens, logits[:, -1].float().log_softmax(-1)


def _accepts(module: Any, kwarg: str) -> bool:
    try:
        return kwarg in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def layer_metrics(lens: torch.Tensor, base: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-layer scores of lens log-probs ``[B, L+1, V]``; ``base`` (same shape) adds
    ``kl_to_none`` = KL(lens || base) per layer."""
    p = lens.exp()
    final = lens[:, -1:]
    out = {
        "entropy": entropy(lens),
        "top1_prob": p.max(-1).values,
        "kl_to_final": (p * (lens - final)).sum(-1),
        "top1_is_final": (lens.argmax(-1) == final.argmax(-1)).float(),
    }
    if base is not None:
        out["kl_to_none"] = (p * (lens - base)).sum(-1)
    return out


def experiment(model: Any, problems: list, opts: Any, draws: int | None = None) -> ExperimentResult:
    """No-RSP lens once per prompt, then ``draws`` RSP draws per prompt (same seeds as the
    generating analyses: draw ``s`` of prompt ``i`` is ``derive_seed(seed, i, s)``)."""
    draws = opts.samples * DRAWS_PER_SAMPLE if draws is None else draws
    if draws < 1:
        raise InputError(f"--draws must be >= 1, got {draws}.")
    tps = tokenize_problems(model, problems)
    cfg = opts.rsp()
    sampler = RSPSampler.for_model(model, cfg)
    bs = opts.batch_size
    cells = [(i, s) for i in range(len(problems)) for s in range(draws)]
    total = -(-len(problems) // bs) + -(-len(cells) // bs)
    bar = tqdm(total=total, desc="logit lens", disable=not opts.progress, unit="batch")
    frames, base = [], {}
    for start in range(0, len(problems), bs):
        idx = list(range(start, min(start + bs, len(problems))))
        lens, out_lp = lens_logprobs(model, build_batch(model, [tps[i] for i in idx], None))
        for j, i in enumerate(idx):
            base[i] = lens[j]
        keys = _keys("none", problems, [(i, 0) for i in idx], [-1] * len(idx))
        frames.append(_tidy(keys, layer_metrics(lens), lens, out_lp))
        bar.update()
    for start in range(0, len(cells), bs):
        chunk = cells[start : start + bs]
        seeds = [derive_seed(cfg.seed, i, s) for i, s in chunk]
        batch = build_batch(
            model, [tps[i] for i, _ in chunk], sampler.draw_batch(seeds), cfg.position
        )
        lens, out_lp = lens_logprobs(model, batch)
        ref = torch.stack([base[i] for i, _ in chunk])
        keys = _keys("rsp", problems, chunk, seeds)
        frames.append(_tidy(keys, layer_metrics(lens, ref), lens, out_lp))
        bar.update()
    bar.close()
    metrics = pd.concat(frames, ignore_index=True)
    for col in ("condition", "prompt_id", "metric"):
        metrics[col] = metrics[col].astype("category")
    for col in ("step", "layer", "head"):
        metrics[col] = metrics[col].astype("int16")
    config = {
        "conditions": [{"name": "rsp", "rsp": cfg.to_dict()}, {"name": "none", "rsp": None}],
        "n_prompts": len(problems),
        "draws": draws,
        "seed": opts.seed,
        "batch_size": bs,
        "prompt_ids": [p.id for p in problems],
    }
    return ExperimentResult(metrics, pd.DataFrame(), pd.DataFrame(), config)


def _keys(
    cond: str, problems: list, cells: list[tuple[int, int]], seeds: list[int]
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "condition": cond,
            "prompt_id": [problems[i].id for i, _ in cells],
            "sample": [s for _, s in cells],
            "rsp_seed": seeds,
        }
    )


def _tidy(
    keys: pd.DataFrame, scores: dict[str, torch.Tensor], lens: torch.Tensor, out_lp: torch.Tensor
) -> pd.DataFrame:
    """Long rows: one per (row, layer, metric), plus ``lens_final_error`` per row (layer -1):
    max |log p| difference between the last lens layer and the model's output (should be ~0)."""
    n_rows, n_l = lens.shape[:2]
    frames = []
    for name, v in scores.items():
        df = keys.iloc[np.repeat(np.arange(n_rows), n_l)].reset_index(drop=True)
        df["layer"] = np.tile(np.arange(n_l), n_rows)
        df["metric"] = name
        df["value"] = v.reshape(-1).cpu().numpy().astype(np.float64)
        frames.append(df)
    err = (lens[:, -1] - out_lp).abs().amax(-1).cpu().numpy()
    frames.append(keys.assign(layer=-1, metric="lens_final_error", value=err.astype(np.float64)))
    df = pd.concat(frames, ignore_index=True)
    df["step"], df["head"] = 0, -1
    return df[METRIC_COLUMNS]


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def _by_layer(metrics: pd.DataFrame, metric: str, condition: str) -> dict[int, float]:
    d = metrics[(metrics["metric"] == metric) & (metrics["condition"] == condition)]
    return {int(k): float(v) for k, v in d.groupby("layer", observed=True)["value"].mean().items()}


def entropy_diff_by_layer(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per layer: paired test of per-prompt lens entropy, RSP minus no RSP."""
    d = metrics[metrics["metric"] == "entropy"]
    rows = []
    for layer, g in d.groupby("layer", observed=True, sort=True):
        a, b = paired_frame(g, "rsp", "none")
        rows.append({"layer": int(layer), **paired_test(a, b)})
    return pd.DataFrame(rows)


def flattening_layer(diff: pd.DataFrame) -> int | None:
    """First layer from which the entropy difference's CI stays above 0 through the output."""
    above = (diff.sort_values("layer")["diff_ci_low"] > 0).to_numpy()
    if not len(above) or not above[-1]:
        return None
    first = len(above) - int(np.argmin(above[::-1])) if not above.all() else 0
    return int(diff.sort_values("layer")["layer"].iloc[first])


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    """Final-layer (= output) entropy with and without the RSP, per-layer entropy differences,
    the flattening layer, and KL(RSP || no RSP) per layer; a self-check of the lens."""
    rsp = metrics[metrics["condition"] == "rsp"]
    n_layers = int(metrics["layer"].max())
    last = metrics[metrics["layer"] == n_layers]
    out: dict[str, Any] = {
        "n_prompts": int(metrics["prompt_id"].nunique()),
        "n_draws": int(rsp.groupby("prompt_id", observed=True)["sample"].nunique().max()),
        "output_layer": n_layers,
    }
    diff = entropy_diff_by_layer(metrics)
    for metric in ("entropy", "top1_prob"):
        d = last[last["metric"] == metric]
        out[f"output_{metric}"] = {
            c: mean_ci(g["value"].to_numpy(), groups=g["prompt_id"].to_numpy())
            for c, g in d.groupby("condition", observed=True)
        }
    out["output_entropy_rsp_minus_none"] = diff[diff["layer"] == n_layers].iloc[0].to_dict()
    out["flattening_layer"] = flattening_layer(diff)
    sig = diff.loc[diff["diff_ci_low"] > 0, "layer"]
    out["first_layer_flatter"] = int(sig.min()) if len(sig) else None
    # per-layer CIs as columns (lists indexed by layer), kept out of the CLI table
    out["entropy_diff_by_layer"] = {
        "layer": diff["layer"].tolist(),
        "mean": diff["mean_diff"].tolist(),
        "ci_low": diff["diff_ci_low"].tolist(),
        "ci_high": diff["diff_ci_high"].tolist(),
    }
    kl = metrics[metrics["metric"] == "kl_to_none"]
    kl_ci = [
        {"layer": int(layer), **mean_ci(g["value"].to_numpy(), groups=g["prompt_id"].to_numpy())}
        for layer, g in kl.groupby("layer", observed=True, sort=True)
    ]
    out["kl_to_none_by_layer"] = {
        key: [row[key] for row in kl_ci] for key in ("layer", "mean", "ci_low", "ci_high")
    }
    for cond in ("rsp", "none"):
        out[f"entropy_by_layer_{cond}"] = _by_layer(metrics, "entropy", cond)
        out[f"top1_is_final_by_layer_{cond}"] = _by_layer(metrics, "top1_is_final", cond)
    err = metrics.loc[metrics["metric"] == "lens_final_error", "value"]
    out["lens_final_max_abs_logprob_error"] = float(err.max()) if len(err) else None
    return out


COLORS = {"rsp": "#d62728", "none": "#1f77b4"}


def plot(metrics: pd.DataFrame) -> go.Figure:
    """Lens entropy, top-1 probability and KL(RSP || no RSP) per layer, 95% CI bands."""
    d = metrics[metrics["layer"] >= 0].copy()
    d["condition"] = d["condition"].astype(str)
    d["prompt_id"] = d["prompt_id"].astype(str)
    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.07,
        subplot_titles=(
            "lens entropy (nats)",
            "lens top-1 probability",
            "KL(lens RSP || lens no RSP), same layer",
        ),
    )
    for col, metric in ((1, "entropy"), (2, "top1_prob")):
        band = layer_band(d[d["metric"] == metric], "value", ["condition"])
        for cond in ("none", "rsp"):
            sel = band[band["condition"] == cond]
            name = "with RSP" if cond == "rsp" else "no RSP"
            add_band(fig, sel, name, COLORS[cond], 1, col, showlegend=col == 1)
    kl = layer_band(d[d["metric"] == "kl_to_none"], "value", ["condition"])
    add_band(fig, kl, "KL(RSP || no RSP)", "#9467bd", 1, 3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="layer (last = model output)", row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=3)
    rsp = d[d["condition"] == "rsp"]
    n_p = rsp["prompt_id"].nunique()
    n_d = int(rsp.groupby("prompt_id")["sample"].nunique().max()) if len(rsp) else 0
    fig.update_layout(
        title=(
            "Logit lens at the first generated token "
            f"({n_p} prompts x {n_d} RSP draws; bands: 95% CI over prompts)"
        ),
        template="plotly_white",
    )
    return fig

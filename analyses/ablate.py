"""Causal localisation of the first-token flattening: mask attention to the RSP, or patch it out.

The paper's "step 1" is the distribution of the first generated token (library step 0, produced
at the last prefill position). For every (prompt, RSP draw) this measures its entropy without an
RSP (E0), with the RSP (E1) and with the RSP under an intervention (Ei), and reports the share of
the increase that the intervention removes, (E1 - Ei) / (E1 - E0), as a ratio of prompt means
with a bootstrap CI over prompts. Interventions: block attention from the decision query (the
last prompt position) to the RSP keys, renormalised, in all layers, in each single layer, in
layer bands and in single heads of the most implicated layers; block it for every query; and
replace the residual stream at the RSP positions entering layer l by its value in a control run
(zeros / token RSP, same length and place).

Where the RSP sits decides what can be measured. At ``end`` (the paper's placement and the
default) the decision query is itself the last RSP vector: masking its attention leaves its own
random residual stream in place, and patching the RSP positions at any layer replaces every
position that saw the RSP, so the patching curve is flat at the control's share by construction
(the default patches only every 10th layer there; every layer elsewhere).
At ``before-assistant`` the assistant header tokens read the RSP, so masking and patching tell
apart "the header reads it" from "the decision query reads it directly".

No generation is needed: per batch the RSP-free prefix is computed once, and each intervention
reruns only the positions it can change (from the first RSP vector on, or only the last position
for decision-query masks). Defaults on SmolLM2-135M (8 prompts x 2 draws, RSP at the end): about
130 forward passes, most of them one token per row.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import typer
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from rsp_interp.captures import RunState
from rsp_interp.errors import InputError
from rsp_interp.experiment import ExperimentResult, tokenize_problems
from rsp_interp.generation import Intervention
from rsp_interp.injection import InjectedBatch, Role, build_batch
from rsp_interp.interventions import MaskAttentionToRSP, PatchResidualAtRSP, RecordResidualAtRSP
from rsp_interp.metrics import entropy
from rsp_interp.rsp import RSP_KINDS, RSPSampler, derive_seed

NAME = "ablate"
COLUMNS = [
    "condition",
    "intervention",
    "prompt_id",
    "sample",
    "rsp_seed",
    "position",
    "step",
    "layer",
    "layer_hi",
    "head",
    "metric",
    "value",
]
"""Tidy columns: ``layer``..``layer_hi`` is the (inclusive) layer range of an intervention and
``head`` its head; -1 = not applicable. ``step`` is always 0 (the first generated token)."""
DEFAULT_CONTROLS = ("zeros", "token")
MAX_KEPT_CACHE_BYTES = 1 << 30
"""Keep the pass-1 KV caches for the head pass when they fit in this (else recompute)."""
END_PATCH_EVERY = 10
"""Default patch stride at ``--position end``, where the patch curve is flat by construction."""
N_RESAMPLES = 2000
CONFIDENCE = 0.95
GLOBAL_ARMS = ("mask_all", "mask_all_queries")
COLORS = {"zeros": "#1f77b4", "token": "#ff7f0e"}


@dataclass(frozen=True)
class Arm:
    """One intervention condition: a name, a type label and where it acts."""

    name: str
    intervention: str
    layer: int = -1
    layer_hi: int = -1
    head: int = -1

    def mask(self) -> MaskAttentionToRSP:
        """The attention mask of a ``mask_*`` arm."""
        if self.intervention == "mask_all_queries":
            return MaskAttentionToRSP(queries="all")
        if self.intervention == "mask_all":
            return MaskAttentionToRSP()
        layers = range(self.layer, self.layer_hi + 1)
        return MaskAttentionToRSP(layers, None if self.head < 0 else [self.head])


def mask_arms(n_layers: int, band_width: int) -> list[Arm]:
    """Decision-query masks: all layers, each layer, and bands of ``band_width`` layers."""
    arms = [Arm("mask_all", "mask_all", 0, n_layers - 1)]
    arms += [Arm(f"mask_L{x}", "mask_layer", x, x) for x in range(n_layers)]
    if band_width > 1:
        for lo in range(0, n_layers, band_width):
            hi = min(lo + band_width, n_layers) - 1
            arms.append(Arm(f"mask_band_L{lo}-{hi}", "mask_band", lo, hi))
    return arms


def head_arms(layers: Sequence[int], n_heads: int) -> list[Arm]:
    return [Arm(f"mask_L{x}_H{h}", "mask_head", x, x, h) for x in layers for h in range(n_heads)]


def patch_layers(n_layers: int, every: int) -> list[int]:
    """Layers to patch: every ``every``-th from 0, plus the last; none when ``every`` is 0."""
    return [] if every <= 0 else sorted(set(range(0, n_layers, every)) | {n_layers - 1})


class CachedBatch:
    """An injected batch whose first positions are computed once and kept in a KV cache.

    :meth:`entropy` runs the positions after the cache with interventions (hooks see a
    :class:`~rsp_interp.captures.RunState` in the prefill phase, as in the engine) and returns
    the entropy of the last position's next-token distribution; the cache is then cut back, so
    every call starts from the same state. Interventions that act only on positions at or after
    the cached ones give exactly the full-forward result.
    """

    def __init__(self, model: Any, batch: InjectedBatch):
        self.model, self.batch = model, batch
        self.state = RunState(roles=batch.roles, prefill_len=batch.length)
        self.cache: Any = None
        self.n_cached = 0
        rsp = batch.roles == int(Role.RSP)
        firsts = rsp.int().argmax(-1)
        self.first_rsp = int(firsts.min()) if bool(rsp.any(-1).all()) else batch.length - 1
        params = _forward_params(model.hf_model)
        self._kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, stop: int, embeds: torch.Tensor | None, hooks: list) -> torch.Tensor:
        """Run positions ``n_cached..stop-1`` on top of the cache (which grows to ``stop``);
        return the log-probs ``[B, V]`` at position ``stop - 1``."""
        b, start = self.batch, self.n_cached
        x = b.inputs_embeds if embeds is None else embeds
        kw = {} if self.cache is None else {"past_key_values": self.cache}
        with torch.no_grad(), self.model.bridge.hooks(fwd_hooks=hooks):
            logits, self.cache = self.model.bridge(
                x[:, start:stop],
                attention_mask=b.attention_mask[:, :stop],
                position_ids=b.position_ids[:, start:stop],
                return_type="logits_and_cache",
                use_cache=True,
                **kw,
                **self._kw,
            )
        last = logits[:, -1].float()
        if not torch.isfinite(last).any(-1).all():
            raise InputError("Model produced NaN/inf logits; check the RSP scale and inputs.")
        return last.log_softmax(-1)

    def extend(self, stop: int) -> torch.Tensor | None:
        """Cache positions up to ``stop`` (exclusive) of this batch's own inputs, no hooks.

        Returns the next-token log-probs ``[B, V]`` at position ``stop - 1`` (None if nothing
        new was run).
        """
        if not self.n_cached <= stop < self.batch.length:
            raise ValueError(f"Cannot extend the cache from {self.n_cached} to {stop}.")
        if stop == self.n_cached:
            return None
        logprobs = self._forward(stop, None, [])
        self.n_cached = stop
        return logprobs

    def cache_nbytes(self) -> int:
        """Memory held by the KV cache."""
        layers = getattr(self.cache, "layers", [])
        return sum(t.nelement() * t.element_size() for x in layers for t in (x.keys, x.values))

    def cached_equals(self, other: InjectedBatch) -> bool:
        """Whether ``other`` is exactly the cached positions (same tokens, padding and position
        ids): true for the no-RSP batch when the RSP goes at the end."""
        p, b = self.n_cached, self.batch
        return (
            other.length == p
            and torch.equal(other.token_ids, b.token_ids[:, :p])
            and torch.equal(other.attention_mask, b.attention_mask[:, :p])
            and torch.equal(other.position_ids, b.position_ids[:, :p])
        )

    def logprobs(
        self, interventions: Sequence[Intervention] = (), embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token log-probs ``[B, V]`` at the last position, with ``interventions``.

        ``embeds`` replaces the batch's input embeddings for the rerun positions (e.g. a control
        RSP at the same places); the cached positions must be the same in both.
        """
        hooks = [h for i in interventions for h in i.hooks(self.state, self.model)]
        try:
            out = self._forward(self.batch.length, embeds, hooks)
        except BaseException:  # some layers may have grown: drop the cache, stay correct
            self.cache, self.n_cached = None, 0
            raise
        if self.n_cached:  # back to the cached positions only
            self.cache.crop(self.n_cached - self.batch.length)
        else:
            self.cache = None
        return out

    def entropy(
        self, interventions: Sequence[Intervention] = (), embeds: torch.Tensor | None = None
    ) -> np.ndarray:
        """Entropy in nats ``[B]`` of the first generated token's distribution."""
        return entropy(self.logprobs(interventions, embeds)).cpu().numpy().astype(np.float64)


def _forward_params(module: Any) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cli_options(
    band_width: Annotated[
        int, typer.Option(help="Width of the layer bands to mask together (0 or 1 = no bands).")
    ] = 5,
    top_layers: Annotated[
        int, typer.Option(help="Mask single heads in this many most implicated layers (0 = off).")
    ] = 3,
    patch_every: Annotated[
        int | None,
        typer.Option(
            help="Patch the RSP residual at every N-th layer, plus the last (0 = off). Default: "
            f"every layer, or every {END_PATCH_EVERY}th at --position end (flat by construction)."
        ),
    ] = None,
    controls: Annotated[
        str, typer.Option(help="Comma-separated control RSP kinds for residual patching.")
    ] = ",".join(DEFAULT_CONTROLS),
) -> dict[str, Any]:
    """Extra flags of ``rsp-interp ablate`` -> keyword arguments of :func:`experiment`."""
    kinds = tuple(k.strip() for k in controls.split(",") if k.strip())
    return {
        "band_width": band_width,
        "top_layers": top_layers,
        "patch_every": patch_every,
        "controls": kinds,
    }


def _validate(band_width: int, top_layers: int, patch_every: int | None, controls: tuple) -> None:
    if band_width < 0:
        raise InputError(f"--band-width must be >= 0 (0 = no bands), got {band_width}.")
    if top_layers < 0:
        raise InputError(f"--top-layers must be >= 0 (0 = no head masks), got {top_layers}.")
    if patch_every is not None and patch_every < 0:
        raise InputError(f"--patch-every must be >= 0 (0 = no patching), got {patch_every}.")
    bad = [k for k in controls if k not in RSP_KINDS or k == "tensor"]
    if bad:
        allowed = ", ".join(k for k in RSP_KINDS if k != "tensor")
        raise InputError(f"Unknown control kinds {bad}: use a comma-separated subset of {allowed}.")
    if len(set(controls)) != len(controls):
        raise InputError(f"Control kinds must be distinct, got {list(controls)}.")


def experiment(
    model: Any,
    problems: list,
    opts: Any,
    band_width: int = 5,
    top_layers: int = 3,
    patch_every: int | None = None,
    controls: Sequence[str] = DEFAULT_CONTROLS,
) -> ExperimentResult:
    """First-token entropy under every intervention, for ``opts.samples`` RSP draws per prompt.

    Pass 1 runs the baseline, the RSP, the global and per-layer/band masks, the controls and the
    residual patches; pass 2 masks single heads of the ``top_layers`` layers whose single-layer
    mask removed the largest share.
    """
    controls = tuple(controls)
    _validate(band_width, top_layers, patch_every, controls)
    top_layers = min(top_layers, model.n_layers)
    cfg = opts.rsp()
    if patch_every is None:
        patch_every = END_PATCH_EVERY if cfg.position == "end" else 1
    tps = tokenize_problems(model, problems)
    cells = [(i, s) for i in range(len(problems)) for s in range(opts.samples)]
    chunks = [cells[a : a + opts.batch_size] for a in range(0, len(cells), opts.batch_size)]
    sampler = RSPSampler.for_model(model, cfg)
    ctrl = {k: RSPSampler.for_model(model, opts.rsp(kind=k)) for k in controls}
    masks = mask_arms(model.n_layers, band_width)
    p_layers = patch_layers(model.n_layers, patch_every)
    n_pass1 = 3 + len(masks) + len(controls) * (1 + len(p_layers))
    bar = tqdm(
        total=len(chunks) * (n_pass1 + top_layers * model.n_heads),
        desc="ablate",
        disable=not opts.progress,
        unit="fwd",
    )
    arms: dict[str, Arm] = {"none": Arm("none", "baseline"), "rsp": Arm("rsp", "rsp")}
    ent: dict[str, list[np.ndarray]] = {}

    def record(arm: Arm, values: np.ndarray) -> None:
        arms[arm.name] = arm
        ent.setdefault(arm.name, []).append(values)
        bar.update()

    def rsp_batch(chunk: list[tuple[int, int]], draw: RSPSampler) -> InjectedBatch:
        seeds = [derive_seed(cfg.seed, i, s) for i, s in chunk]
        return build_batch(model, [tps[i] for i, _ in chunk], draw.draw_batch(seeds), cfg.position)

    kept: list[CachedBatch] = []  # pass-1 caches, reused by the head pass if they are small
    for n, chunk in enumerate(chunks):
        batch = rsp_batch(chunk, sampler)
        run = CachedBatch(model, batch)
        logp = run.extend(run.first_rsp)  # positions before any RSP: shared by every arm
        plain = build_batch(model, [tps[i] for i, _ in chunk], None)
        if run.cached_equals(plain):  # RSP at the end: the prefix *is* the no-RSP prompt
            record(arms["none"], entropy(logp).cpu().numpy().astype(np.float64))
        else:
            record(arms["none"], CachedBatch(model, plain).entropy())
        record(arms["rsp"], run.entropy())
        every_query = Arm("mask_all_queries", "mask_all_queries", 0, model.n_layers - 1)
        record(every_query, run.entropy([every_query.mask()]))
        for kind in controls:
            cb = rsp_batch(chunk, ctrl[kind])
            if not torch.equal(cb.roles, batch.roles):
                raise AssertionError("control batch layout differs from the RSP batch")
            rec = RecordResidualAtRSP(p_layers)
            record(Arm(f"control_{kind}", f"control_{kind}"), run.entropy([rec], cb.inputs_embeds))
            for x in p_layers:
                arm = Arm(f"patch_{kind}_L{x}", f"patch_{kind}", x, x)
                record(arm, run.entropy([PatchResidualAtRSP(x, rec.values[x])]))
        run.extend(batch.length - 1)  # decision-query masks change only the last position
        for arm in masks:
            record(arm, run.entropy([arm.mask()]))
        if n == 0 and top_layers and run.cache_nbytes() * len(chunks) <= MAX_KEPT_CACHE_BYTES:
            kept = [run]
        elif kept:
            kept.append(run)

    chosen: list[int] = []
    if top_layers:
        shares = _pooled_shares(ent, [a.name for a in masks if a.intervention == "mask_layer"])
        chosen = sorted(int(arms[n].layer) for n in shares.nlargest(top_layers).index)
        heads = head_arms(chosen, model.n_heads)
        for n, chunk in enumerate(chunks):
            if kept:
                run = kept[n]
            else:
                run = CachedBatch(model, rsp_batch(chunk, sampler))
                run.extend(run.batch.length - 1)
            for arm in heads:
                record(arm, run.entropy([arm.mask()]))
    bar.close()

    metrics = _tidy(ent, arms, chunks, problems, cfg)
    config = {
        "rsp": cfg.to_dict(),
        "controls": list(controls),
        "band_width": band_width,
        "top_layers": chosen,
        "patch_every": patch_every,
        "patch_layers": p_layers,
        "head_pass_reused_caches": bool(kept),
        "n_prompts": len(problems),
        "n_samples": opts.samples,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "prompt_ids": [p.id for p in problems],
        "arms": {n: a.__dict__ for n, a in arms.items()},
    }
    return ExperimentResult(metrics, pd.DataFrame(), pd.DataFrame(), config)


def _pooled_shares(ent: dict[str, list[np.ndarray]], names: list[str]) -> pd.Series:
    """Share removed, pooled over all rows so far (for choosing the layers to split by head)."""
    e1, e0 = np.concatenate(ent["rsp"]), np.concatenate(ent["none"])
    gap = float(np.mean(e1 - e0))
    return pd.Series({n: float(np.mean(e1 - np.concatenate(ent[n]))) / gap for n in names})


def _tidy(ent, arms, chunks, problems, cfg) -> pd.DataFrame:
    cells = [c for chunk in chunks for c in chunk]
    keys = pd.DataFrame(
        {
            "prompt_id": [problems[i].id for i, _ in cells],
            "sample": [s for _, s in cells],
            "rsp_seed": [derive_seed(cfg.seed, i, s) for i, s in cells],
        }
    )
    e1, e0 = np.concatenate(ent["rsp"]), np.concatenate(ent["none"])
    frames = []
    for name, parts in ent.items():
        arm, values = arms[name], np.concatenate(parts)
        metrics = {"entropy_step0": values}
        if name == "rsp":
            metrics["entropy_increase"] = e1 - e0
        elif name != "none":
            with np.errstate(divide="ignore", invalid="ignore"):
                metrics["share_removed"] = (e1 - values) / (e1 - e0)
        for metric, v in metrics.items():
            df = keys.copy()
            df["condition"], df["intervention"] = name, arm.intervention
            df["layer"], df["layer_hi"], df["head"] = arm.layer, arm.layer_hi, arm.head
            df["metric"], df["value"] = metric, v
            frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["position"], df["step"] = cfg.position, 0
    for col in ("condition", "intervention", "prompt_id", "metric", "position"):
        df[col] = df[col].astype("category")
    for col in ("step", "layer", "layer_hi", "head"):
        df[col] = df[col].astype("int16")
    df["sample"] = df["sample"].astype("int32")
    df["rsp_seed"] = df["rsp_seed"].astype("int64")
    return df[COLUMNS]


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


# --------------------------------------------------------------------------------------------
# aggregation


def share_table(
    metrics: pd.DataFrame,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """Share of the entropy increase each condition removes, with a prompt bootstrap CI.

    Per prompt, entropies are averaged over draws; the share is
    ``mean_p(E1 - Ei) / mean_p(E1 - E0)`` (a ratio of means: per-row ratios explode when a
    draw barely raises the entropy). The CI is the percentile interval over ``n_resamples``
    resamples of prompts, shared by all conditions. Also returns each condition's mean entropy.
    """
    ent = metrics[metrics["metric"] == "entropy_step0"]
    wide = ent.pivot_table(
        index="prompt_id", columns="condition", values="value", aggfunc="mean", observed=True
    )
    if "rsp" not in wide or "none" not in wide:
        raise InputError("Need the 'rsp' and 'none' conditions to compute shares.")
    wide = wide.dropna(subset=["rsp", "none"])
    n = len(wide)
    drop = wide["rsp"].to_numpy()[:, None] - wide.to_numpy()  # [P, C]
    gap = (wide["rsp"] - wide["none"]).to_numpy()
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (counts @ np.nan_to_num(drop)) / (counts @ gap)[:, None]  # [R, C]
        share = np.nanmean(drop, 0) / gap.mean()
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(boot, [alpha, 1 - alpha], axis=0) if n > 1 else (share, share)
    meta = (
        metrics[["condition", "intervention", "layer", "layer_hi", "head"]]
        .drop_duplicates("condition")
        .astype({"condition": str, "intervention": str})
        .set_index("condition")
    )
    out = pd.DataFrame(
        {
            "condition": wide.columns.astype(str),
            "share": share,
            "ci_low": low,
            "ci_high": high,
            "entropy": wide.mean().to_numpy(),
            "n_prompts": n,
        }
    )
    out = out.join(meta, on="condition")
    return out.reset_index(drop=True)


def _increase_ci(metrics: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    from rsp_interp.stats import mean_ci

    inc = metrics[metrics["metric"] == "entropy_increase"]
    return mean_ci(inc["value"].to_numpy(), groups=inc["prompt_id"].astype(str).to_numpy())


def _r(x: float) -> float:
    return round(float(x), 4)


def _entry(row: pd.Series) -> dict[str, float]:
    return {"share": _r(row["share"]), "ci_low": _r(row["ci_low"]), "ci_high": _r(row["ci_high"])}


def position_note(position: str) -> str:
    if position == "end":
        return (
            "RSP at the end: the decision query is the last RSP vector itself, so attention "
            "masking cannot remove its own random residual stream, and patching the RSP "
            "positions at any layer replaces every position that saw the RSP (the patch curve "
            "equals the control's share at every layer by construction)."
        )
    if position == "before-assistant":
        return (
            "RSP before the assistant header: the header tokens read the RSP, so decision-query "
            "masks only cut the direct route; mask_all_queries also cuts the header's route and "
            "leaves only the position shift; the patch curve shows by which layer the RSP's "
            "effect has left the RSP positions."
        )
    return (
        "RSP at the start: every prompt token reads the RSP, so decision-query masks cut only "
        "the last position's direct route; mask_all_queries leaves only the position shift."
    )


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    """Headline shares (with CIs) and the full tables (under ``tables``)."""
    t = share_table(metrics).set_index("condition")
    rows = metrics[metrics["metric"] == "entropy_step0"]
    n_prompts = int(rows["prompt_id"].nunique())
    n_draws = int(rows[rows["condition"] == "rsp"].groupby("prompt_id", observed=True).size().max())
    position = str(metrics["position"].iloc[0])
    inc = _increase_ci(metrics)
    out: dict[str, Any] = {
        "position": position,
        "n_prompts": n_prompts,
        "n_draws_per_prompt": n_draws,
        "entropy_none": _r(t.loc["none", "entropy"]),
        "entropy_rsp": _r(t.loc["rsp", "entropy"]),
        "entropy_increase": _r(inc["mean"]),
        "entropy_increase_ci95": [_r(inc["ci_low"]), _r(inc["ci_high"])],
    }
    for name in [*GLOBAL_ARMS, *[c for c in t.index if c.startswith("control_")]]:
        if name in t.index:
            out[f"share_{name}"] = _r(t.loc[name, "share"])
            out[f"share_{name}_ci95"] = [_r(t.loc[name, "ci_low"]), _r(t.loc[name, "ci_high"])]
    tables: dict[str, Any] = {"description": SHARE_DESCRIPTION, "note": position_note(position)}
    for kind, key, label in (
        ("mask_layer", "single_layer", lambda r: str(int(r["layer"]))),
        ("mask_band", "band", lambda r: f"{int(r['layer'])}-{int(r['layer_hi'])}"),
        ("mask_head", "head", lambda r: f"L{int(r['layer'])}H{int(r['head'])}"),
    ):
        sel = t[t["intervention"] == kind].sort_values(["layer", "head"]).reset_index()
        if len(sel):
            tables[key] = {label(r): _entry(r) for _, r in sel.iterrows()}
            best = sel.loc[sel["share"].idxmax()]
            out[f"best_{key}"] = label(best)
            out[f"best_{key}_share"] = _r(best["share"])
            out[f"best_{key}_ci95"] = [_r(best["ci_low"]), _r(best["ci_high"])]
    for kind in sorted({i for i in t["intervention"] if str(i).startswith("patch_")}):
        sel = t[t["intervention"] == kind].sort_values("layer").reset_index()
        tables[kind] = {str(int(r["layer"])): _entry(r) for _, r in sel.iterrows()}
    tables["entropy_by_condition"] = {c: _r(v) for c, v in t["entropy"].items()}
    out["tables"] = tables
    return out


SHARE_DESCRIPTION = (
    "share = mean over prompts of (E_rsp - E_intervened) / mean over prompts of "
    "(E_rsp - E_none), first-token entropy in nats, draws averaged within each prompt; "
    "95% percentile bootstrap CI over prompts. 1 = removes the whole increase, 0 = nothing, "
    "> 1 = overshoots below the no-RSP entropy, < 0 = flattens further."
)


# --------------------------------------------------------------------------------------------
# figure


def _bars(t: pd.DataFrame, x: list, color: str, name: str) -> go.Bar:
    return go.Bar(
        x=x,
        y=t["share"],
        error_y=dict(
            type="data",
            symmetric=False,
            array=(t["ci_high"] - t["share"]).to_numpy(),
            arrayminus=(t["share"] - t["ci_low"]).to_numpy(),
        ),
        marker_color=color,
        name=name,
        showlegend=False,
    )


def plot(metrics: pd.DataFrame) -> go.Figure:
    """Share of the first-token entropy increase removed: per layer, bands and global arms,
    heads of the top layers, and residual patching by layer."""
    t = share_table(metrics)
    fig = make_subplots(
        rows=2,
        cols=2,
        vertical_spacing=0.2,
        horizontal_spacing=0.14,
        subplot_titles=(
            "mask decision query -> RSP keys, single layer",
            "layer bands, all layers, controls",
            "single heads of the most implicated layers",
            "patch residual at RSP positions (from control run)",
        ),
    )
    layers = t[t["intervention"] == "mask_layer"].sort_values("layer")
    if len(layers):
        fig.add_trace(_bars(layers, layers["layer"].tolist(), "#2ca02c", "layer"), row=1, col=1)
    for name, dash, where in (
        ("mask_all", "dash", "bottom right"),
        ("mask_all_queries", "dot", "top right"),
    ):
        sel = t[t["condition"] == name]
        if len(sel):
            fig.add_hline(
                y=float(sel["share"].iloc[0]),
                line_dash=dash,
                line_color="gray",
                annotation_text=f"{name} {float(sel['share'].iloc[0]):.2f}",
                annotation_position=where,
                annotation_font_size=10,
                row=1,
                col=1,
            )
    groups = [
        t[t["intervention"] == "mask_band"].sort_values("layer"),
        t[t["condition"].isin(GLOBAL_ARMS)].sort_values("condition"),
        t[t["intervention"].str.startswith("control_")].sort_values("condition"),
    ]
    combo = pd.concat(groups, ignore_index=True)
    if len(combo):
        labels = [
            f"L{int(r.layer)}-{int(r.layer_hi)}" if r.intervention == "mask_band" else r.condition
            for r in combo.itertuples()
        ]
        fig.add_trace(_bars(combo, labels, "#9467bd", "bands"), row=1, col=2)
    heads = t[t["intervention"] == "mask_head"]
    if len(heads):
        grid = heads.pivot_table(index="layer", columns="head", values="share")
        lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[f"H{h}" for h in grid.columns],
                y=[f"L{x}" for x in grid.index],
                zmid=0,
                zmin=-lim,
                zmax=lim,
                colorscale="RdBu_r",
                text=np.round(grid.to_numpy(), 2),
                texttemplate="%{text}",
                colorbar=dict(title="share", x=0.44, y=0.2, len=0.4, thickness=12),
            ),
            row=2,
            col=1,
        )
    for kind in sorted({i for i in t["intervention"] if i.startswith("patch_")}):
        sel = t[t["intervention"] == kind].sort_values("layer")
        ctrl = kind.removeprefix("patch_")
        color = COLORS.get(ctrl, "#8c564b")
        fig.add_trace(
            go.Scatter(
                x=sel["layer"],
                y=sel["share"],
                mode="lines+markers",
                name=f"patch from {ctrl} control",
                line_color=color,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=(sel["ci_high"] - sel["share"]).to_numpy(),
                    arrayminus=(sel["share"] - sel["ci_low"]).to_numpy(),
                ),
            ),
            row=2,
            col=2,
        )
        full = t[t["condition"] == f"control_{ctrl}"]
        if len(full):
            fig.add_hline(
                y=float(full["share"].iloc[0]),
                line_dash="dot",
                line_color=color,
                row=2,
                col=2,
            )
    for row, col in ((1, 1), (1, 2), (2, 2)):
        fig.add_hline(y=0, line_color="black", line_width=1, row=row, col=col)
        fig.add_hline(y=1, line_color="black", line_width=1, line_dash="dash", row=row, col=col)
        fig.update_yaxes(title_text="share of increase removed", row=row, col=col)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=2, col=2)
    fig.update_xaxes(title_text="head", row=2, col=1)
    e = t.set_index("condition")["entropy"]
    pos = str(metrics["position"].iloc[0])
    n_p = int(t["n_prompts"].iloc[0])
    n_rows = int((metrics["metric"] == "entropy_step0").sum() / max(len(e), 1))
    fig.update_layout(
        title=dict(
            text=(
                f"Share of the first-token entropy increase removed (RSP at {pos}; {n_p} prompts, "
                f"{n_rows} draws; entropy {e['none']:.2f} -> {e['rsp']:.2f} nats; 95% CI)"
            ),
            font_size=15,
        ),
        template="plotly_white",
        width=1200,
        height=700,
        margin=dict(t=70, b=90),
        legend=dict(orientation="h", x=0.57, y=-0.12, yanchor="top"),
    )
    for a in fig.layout.annotations[:4]:
        a.font.size = 12
    return fig

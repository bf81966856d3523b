"""Run conditions x prompts x samples through the engine and return tidy DataFrames.

Seeds: row (prompt ``i``, sample ``s``) gets ``rsp_seed = derive_seed(rsp.seed, i, s)`` and
``sample_seed = derive_seed(seed, i, s, 1)``. The sampling seed is shared across conditions, so
conditions are paired (common random numbers), and any single RSP can be redrawn from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rsp_interp.captures import ATTN_GROUPS, CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.generation import GenerationOutput, Intervention, SamplingConfig, generate
from rsp_interp.injection import Role, TokenizedPrompt, tokenize_prompt
from rsp_interp.prompts import Problem, extract_answer, format_prompt, is_correct
from rsp_interp.rsp import RSPConfig, RSPSampler, derive_seed

METRIC_COLUMNS = [
    "condition",
    "prompt_id",
    "sample",
    "rsp_seed",
    "step",
    "layer",
    "head",
    "metric",
    "value",
]
ROLE_NAMES = {int(r): r.name.lower() for r in Role}


@dataclass(frozen=True)
class Condition:
    """A named arm of an experiment: an RSP config (None = no RSP) and optional interventions."""

    name: str
    rsp: RSPConfig | None = None
    interventions: tuple[Any, ...] = ()
    rsp_tensor: torch.Tensor | None = field(default=None, compare=False)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rsp": self.rsp.to_dict() if self.rsp else None,
            "interventions": [
                i.describe() if isinstance(i, Intervention) else repr(i[0])
                for i in self.interventions
            ],
        }


@dataclass
class ExperimentResult:
    """``metrics``: long format (METRIC_COLUMNS); ``samples``: one row per generation;
    ``prefill``: per-position residual norms of the prefill pass."""

    metrics: pd.DataFrame
    samples: pd.DataFrame
    prefill: pd.DataFrame
    config: dict[str, Any]


def tokenize_problems(model: Any, problems: Sequence[Problem]) -> list[TokenizedPrompt]:
    """Each problem's question, chat-formatted as ``model`` expects, tokenised; an
    :class:`InputError` when there is none."""
    if not problems:
        raise InputError("No prompts: pass at least one problem (e.g. --n-prompts 1).")
    tok = model.tokenizer
    return [tokenize_prompt(format_prompt(p.question, tok, chat=model.chat), tok) for p in problems]


def run_experiment(
    model: Any,
    problems: Sequence[Problem],
    conditions: Sequence[Condition],
    n_samples: int = 4,
    sampling: SamplingConfig | None = None,
    capture: CaptureConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> ExperimentResult:
    """Generate ``n_samples`` per prompt per condition, capture, and tidy the results."""
    tps = tokenize_problems(model, problems)
    if n_samples < 1 or batch_size < 1:
        raise InputError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}.")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise InputError(f"Condition names must be unique, got {names}.")
    sampling = sampling or SamplingConfig()
    capture = capture if capture is not None else CaptureConfig()
    cells = [(i, s) for i in range(len(problems)) for s in range(n_samples)]
    metrics, samples, prefill = [], [], []
    n_batches = sum(-(-len(cells) // batch_size) for _ in conditions)
    bar = tqdm(total=n_batches, desc="generating", disable=not progress, unit="batch")
    for cond in conditions:
        sampler = None
        if cond.rsp is not None and cond.rsp.length > 0:
            sampler = RSPSampler.for_model(model, cond.rsp, tensor=cond.rsp_tensor)
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            rsp_seeds = [derive_seed(cond.rsp.seed, i, s) if sampler else -1 for i, s in chunk]
            sample_seeds = [derive_seed(seed, i, s, 1) for i, s in chunk]
            rsps = sampler.draw_batch(rsp_seeds) if sampler else None
            out = generate(
                model,
                [tps[i] for i, _ in chunk],
                rsps,
                position=cond.rsp.position if cond.rsp else "end",
                sampling=sampling,
                capture=capture,
                sample_seeds=sample_seeds,
                interventions=cond.interventions,
            )
            keys = pd.DataFrame(
                {
                    "condition": cond.name,
                    "prompt_id": [problems[i].id for i, _ in chunk],
                    "sample": [s for _, s in chunk],
                    "rsp_seed": rsp_seeds,
                }
            )
            metrics.append(tidy_metrics(out, keys))
            samples.append(_samples_frame(out, keys, [problems[i] for i, _ in chunk], sample_seeds))
            if capture.prefill and out.prefill_resid is not None:
                prefill.append(_prefill_frame(out, keys))
            bar.update()
    bar.close()
    config = {
        "conditions": [c.describe() for c in conditions],
        "n_prompts": len(problems),
        "n_samples": n_samples,
        "sampling": sampling.__dict__,
        "capture": capture.__dict__,
        "seed": seed,
        "batch_size": batch_size,
        "prompt_ids": [p.id for p in problems],
    }
    empty = pd.DataFrame(columns=METRIC_COLUMNS)
    return ExperimentResult(
        metrics=_finish(pd.concat(metrics, ignore_index=True) if metrics else empty),
        samples=pd.concat(samples, ignore_index=True),
        prefill=pd.concat(prefill, ignore_index=True) if prefill else pd.DataFrame(),
        config=config,
    )


def _long(
    keys: pd.DataFrame, values: np.ndarray, metric: str, dims: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Flatten ``values`` (row axis first, then the axes named in ``dims``) into long rows."""
    n_rows = len(keys)
    shape = values.shape
    assert shape[0] == n_rows
    grids = np.meshgrid(np.arange(n_rows), *[np.asarray(v) for v in dims.values()], indexing="ij")
    flat = {name: g.reshape(-1) for name, g in zip(["row", *dims], grids, strict=True)}
    df = keys.iloc[flat.pop("row")].reset_index(drop=True)
    for col in ("step", "layer", "head"):
        df[col] = flat[col] if col in flat else -1
    df["metric"] = metric
    df["value"] = values.reshape(-1).astype(np.float64)
    return df[~np.isnan(df["value"].to_numpy())]


def tidy_metrics(out: GenerationOutput, keys: pd.DataFrame) -> pd.DataFrame:
    """Long-format metrics of one batch. ``-1`` in step/layer/head means "not applicable"."""
    n_steps = out.tokens.shape[1]
    frames = [
        _long(keys, out.entropy.numpy(), "entropy", {"step": np.arange(n_steps)}),
        _long(keys, out.chosen_logprob.numpy(), "chosen_logprob", {"step": np.arange(n_steps)}),
    ]
    for name, vals in out.step_scores.items():
        if name in ("entropy", "chosen_logprob"):  # already recorded for every step
            continue
        frames.append(_long(keys, vals.numpy(), name, {"step": np.arange(vals.shape[1])}))
    if out.attn is not None:
        # attn [S, L, B, H, 4] -> per group [B, S, L, H]
        a = out.attn.permute(2, 0, 1, 3, 4).numpy()
        dims = {
            "step": np.arange(a.shape[1]),
            "layer": np.arange(a.shape[2]),
            "head": np.arange(a.shape[3]),
        }
        stopped = np.arange(n_steps)[None, :] >= out.n_generated.numpy()[:, None]
        for g, group in enumerate(ATTN_GROUPS):
            v = a[..., g].copy()
            v[stopped] = np.nan
            frames.append(_long(keys, v, f"attn_{group}", dims))
    if out.resid is not None:
        r = out.resid.permute(2, 0, 1).numpy().copy()  # [B, S, L+1]
        r[np.arange(n_steps)[None, :] >= out.n_generated.numpy()[:, None]] = np.nan
        frames.append(
            _long(
                keys,
                r,
                "resid_norm_current",
                {"step": np.arange(r.shape[1]), "layer": np.arange(r.shape[2])},
            )
        )
    if out.prefill_resid is not None:
        roles = out.batch.roles.cpu().numpy()
        pr = out.prefill_resid.permute(1, 0, 2).numpy()  # [B, L+1, T]
        for role in (Role.RSP, Role.BOS, Role.PROMPT):
            m = (roles == int(role))[:, None, :]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(m, pr, 0).sum(-1) / m.sum(-1)
            frames.append(
                _long(
                    keys,
                    mean,
                    f"prefill_resid_norm_{role.name.lower()}",
                    {"layer": np.arange(mean.shape[1])},
                )
            )
    if out.prefill_attn is not None:
        pa = out.prefill_attn.permute(1, 0, 2).numpy()  # [B, L, H]
        frames.append(
            _long(
                keys,
                pa,
                "prefill_attn_prompt_to_rsp",
                {"layer": np.arange(pa.shape[1]), "head": np.arange(pa.shape[2])},
            )
        )
    return pd.concat(frames, ignore_index=True)[METRIC_COLUMNS]


def _prefill_frame(out: GenerationOutput, keys: pd.DataFrame) -> pd.DataFrame:
    roles = out.batch.roles.cpu().numpy()
    pos = out.batch.position_ids.cpu().numpy()
    pr = out.prefill_resid.permute(1, 0, 2).numpy()  # [B, L+1, T]
    b, n_l, t = pr.shape
    rows, layers, cols = np.meshgrid(np.arange(b), np.arange(n_l), np.arange(t), indexing="ij")
    rows, layers, cols = rows.reshape(-1), layers.reshape(-1), cols.reshape(-1)
    keep = roles[rows, cols] != int(Role.PAD)
    rows, layers, cols = rows[keep], layers[keep], cols[keep]
    df = keys.iloc[rows].reset_index(drop=True)
    df["layer"] = layers
    df["position"] = pos[rows, cols]
    df["role"] = pd.Categorical([ROLE_NAMES[r] for r in roles[rows, cols]])
    df["metric"] = "resid_norm"
    df["value"] = pr[rows, layers, cols].astype(np.float64)
    return df


def _samples_frame(
    out: GenerationOutput, keys: pd.DataFrame, probs: list[Problem], sample_seeds: list[int]
) -> pd.DataFrame:
    df = keys.copy()
    df["sample_seed"] = sample_seeds
    df["text"] = out.texts
    df["n_tokens"] = out.n_generated.numpy()
    df["token_ids"] = [[x for x in row if x >= 0] for row in out.tokens.tolist()]
    df["answer"] = [extract_answer(t) for t in out.texts]
    df["gold"] = [p.answer for p in probs]
    df["correct"] = [is_correct(a, p.answer) for a, p in zip(df["answer"], probs, strict=True)]
    return df


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("condition", "prompt_id", "metric"):
        df[col] = df[col].astype("category")
    for col in ("step", "layer", "head"):
        df[col] = df[col].astype("int16")
    df["sample"] = df["sample"].astype("int32")
    df["rsp_seed"] = df["rsp_seed"].astype("int64")
    return df.reset_index(drop=True)

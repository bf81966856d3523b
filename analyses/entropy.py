"""Early flattening: entropy of the first generated tokens with and without an RSP.

Three parts (``--part all`` runs them all):

first-k: entropy, top-1 probability and KL(p_RSP || p_noRSP) of the next-token distribution for
generated tokens 1..k, RSP vs no RSP, paired by prompt, with prompt-level bootstrap bands and
paired tests per token.

controls (own sizes: --controls-samples draws, --controls-k tokens, to fit the budget):
token-1 entropy for every RSP kind (isotropic, diagonal, norm-matched, token, zeros),
for RSP length L in {1, 2, 4, 8, 16} and sigma scale in {0, .25, .5, 1, 2, 4}: randomness, norm
or novelty?

temperature: per prompt, the temperature that flattens token 1 as much as the RSP does; then
later-token entropies and sample diversity, RSP vs matched temperature.

metrics.parquet has a ``part`` column; the temperature part reuses the first-k runs (its
``rsp``/``none`` rows repeat them). Steps are 0-based: step s is generated token s+1.
"""

from __future__ import annotations

from typing import Annotated, Any

import pandas as pd
import plotly.graph_objects as go
import typer

from analyses import controls, first_k, temperature
from rsp_interp.errors import InputError
from rsp_interp.experiment import ExperimentResult

NAME = "entropy"
PARTS = ("first-k", "controls", "temperature")
MODULES = {"first-k": first_k, "controls": controls, "temperature": temperature}
CONTROLS_K = controls.DEFAULT_K
CONTROLS_SAMPLES = controls.DEFAULT_SAMPLES


def cli_options(
    part: Annotated[
        str, typer.Option(help="Which part to run: all, first-k, controls or temperature.")
    ] = "all",
    k: Annotated[
        int, typer.Option(help="First-k and temperature parts: generated tokens analysed.")
    ] = first_k.DEFAULT_K,
    controls_k: Annotated[
        int, typer.Option(help="Controls part: generated tokens per condition.")
    ] = CONTROLS_K,
    controls_samples: Annotated[
        int, typer.Option(help="Controls part: RSP draws per prompt and condition (16 arms).")
    ] = CONTROLS_SAMPLES,
) -> dict[str, Any]:
    return {"part": part, "k": k, "controls_k": controls_k, "controls_samples": controls_samples}


def parts_of(part: str) -> tuple[str, ...]:
    if part == "all":
        return PARTS
    if part not in PARTS:
        raise InputError(f"Unknown --part {part!r}: choose all, {', '.join(PARTS)}.")
    return (part,)


def experiment(
    model: Any,
    problems: list,
    opts: Any,
    part: str = "all",
    k: int = first_k.DEFAULT_K,
    controls_k: int = CONTROLS_K,
    controls_samples: int = CONTROLS_SAMPLES,
) -> ExperimentResult:
    """Run the selected parts and stack their results with a ``part`` column."""
    parts = parts_of(part)
    results: dict[str, ExperimentResult] = {}
    if "first-k" in parts:
        results["first-k"] = first_k.experiment(model, problems, opts, k=k)
    if "controls" in parts:
        results["controls"] = controls.experiment(
            model, problems, opts, k=controls_k, samples=controls_samples
        )
    if "temperature" in parts:
        results["temperature"] = temperature.experiment(
            model, problems, opts, k=k, reference=results.get("first-k")
        )
    metrics, samples = [], []
    for name, res in results.items():
        metrics.append(res.metrics.assign(part=name))
        s = res.samples
        if name == "temperature" and "first-k" in results:
            s = s[s["condition"] == "temperature"]  # the rest repeats the first-k samples
        samples.append(s.assign(part=name))
    return ExperimentResult(
        metrics=_categories(pd.concat(metrics, ignore_index=True)),
        samples=_categories(pd.concat(samples, ignore_index=True)),
        prefill=pd.DataFrame(),
        config={"parts": {n: r.config for n, r in results.items()}},
    )


def _categories(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("part", "condition", "prompt_id", "metric", "factor", "rsp_kind"):
        if col in df:
            df[col] = df[col].astype(str).where(df[col].notna()).astype("category")
    return df


def run(model: Any, problems: list, opts: Any, **kw: Any) -> pd.DataFrame:
    return experiment(model, problems, opts, **kw).metrics


def split(metrics: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of each part present, without the columns only other parts use."""
    out = {}
    for name in PARTS:
        d = metrics[metrics["part"] == name].drop(columns="part")
        if len(d):
            out[name] = d.dropna(axis=1, how="all").reset_index(drop=True)
    return out


def summarize(metrics: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers first (flat, for the CLI table), then each part's full summary under
    its name (``first-k``, ``controls``, ``temperature``)."""
    parts = {name: MODULES[name].summarize(d) for name, d in split(metrics).items()}
    head: dict[str, Any] = {}
    if "first-k" in parts:
        s = parts["first-k"]
        head["first_k prompts"] = f"{s['prompts']} x{s['n_prompts']}, {s['draws_per_prompt']} draws"
        for key in ("entropy_token1_rsp", "entropy_token1_none", "entropy_token1_diff"):
            if key in s:
                head[f"first_k {key}"] = _ci_text(s[key])
        if "entropy_token1_diff" in s:
            head["first_k token1 diff wilcoxon p"] = s["entropy_token1_diff"]["wilcoxon_p"]
        if "kl_token1" in s:
            head["first_k kl_token1"] = _ci_text(s["kl_token1"])
    if "controls" in parts:
        for row in parts["controls"]["conditions"]:
            head[f"controls entropy_t1 {row['condition']}"] = _ci_text(
                {
                    "mean": row["entropy_t1"],
                    "ci": [row["entropy_t1_ci_low"], row["entropy_t1_ci_high"]],
                }
            )
    if "temperature" in parts:
        s = parts["temperature"]
        head["temperature median T*"] = s["matched_temperature"]["median"]
        for name in (
            "later_entropy",
            "last_quarter_entropy",
            "entropy_slope",
            "later_sampling_entropy",
            "distinct_2",
        ):
            c = s["comparisons"].get(name, {})
            if "rsp_minus_temperature" in c:
                t = c["rsp_minus_temperature"]
                head[f"temperature {name} rsp-T*"] = _ci_text(
                    {"mean": t["mean_diff"], "ci": [t["diff_ci_low"], t["diff_ci_high"]]}
                ) + (f", p={t['wilcoxon_p']:.3g}" if t["wilcoxon_p"] is not None else "")
    return {**head, **parts}  # each part's dict mixes scalars and tables: kept out of the CLI table


def _ci_text(d: dict[str, Any]) -> str:
    low, high = d.get("ci", [None, None])
    if d.get("mean") is None:
        return "n/a"
    if low is None or high is None:
        return f"{d['mean']:.3f}"
    return f"{d['mean']:.3f} [{low:.3f}, {high:.3f}]"


def plot(metrics: pd.DataFrame) -> dict[str, go.Figure]:
    """One figure per part: ``entropy_first_k``, ``entropy_controls``, ``entropy_temperature``."""
    return {
        f"entropy_{name.replace('-', '_')}": MODULES[name].plot(d)
        for name, d in split(metrics).items()
    }

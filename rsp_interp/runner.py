"""Shared machinery of every analysis command: common options, loading, writing outputs.

An analysis module (in ``analyses/``) provides::

    NAME: str                                  # CLI subcommand, e.g. "attention-sink"
    def experiment(model, problems, opts: CommonOptions, **kw) -> ExperimentResult
    def run(model, problems, opts, **kw) -> pd.DataFrame     # = experiment(...).metrics
    def summarize(metrics: pd.DataFrame) -> dict
    def plot(metrics: pd.DataFrame) -> plotly Figure, or {file stem: Figure}
    def cli_options(<typer-annotated extra flags>) -> dict  # optional: kwargs for experiment

:func:`run_analysis` loads the model and prompts, runs the module and writes
``metrics.parquet``, ``samples.parquet``, ``prefill.parquet`` (when captured), ``summary.json``,
``<figure>.html``/``.png``, and finally ``run.json``.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from rsp_interp import io
from rsp_interp.errors import InputError
from rsp_interp.models import DEFAULT_MODEL, LoadedModel, load_model, resolve_device
from rsp_interp.prompts import Problem, load_prompts
from rsp_interp.provenance import now, run_record
from rsp_interp.rsp import RSPConfig

ANALYSES = {
    "attention-sink": "analyses.attention_sink",
    "entropy": "analyses.entropy",
    "residual-norms": "analyses.residual_norms",
    "ablate": "analyses.ablate",
    "logit-lens": "analyses.logit_lens",
}
"""CLI name -> module. Analyses register here so the CLI and the Python API find them."""


@dataclass(frozen=True)
class CommonOptions:
    """Flags shared by every analysis command (and their Python API)."""

    model: str = DEFAULT_MODEL
    rsp_length: int = 10
    rsp_kind: str = "isotropic"
    rsp_scale: float = 1.0
    position: str = "end"
    prompts: str = "arith"
    n_prompts: int = 8
    samples: int = 2
    max_new_tokens: int = 16
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    out: str | None = None
    png: bool = True
    progress: bool = True

    def rsp(self, **changes: Any) -> RSPConfig:
        """The RSP config these options describe (``changes`` override fields)."""
        base = RSPConfig(
            kind=self.rsp_kind,
            length=self.rsp_length,
            scale=self.rsp_scale,
            position=self.position,
            seed=self.seed,
        )
        return replace(base, **changes) if changes else base

    def validate(self) -> None:
        for name in ("n_prompts", "samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}."
                )
        if self.rsp_length < 1:
            raise InputError(f"--rsp-length must be >= 1, got {self.rsp_length}.")
        self.rsp()  # validates kind, scale, position
        try:
            resolve_device(self.device)
        except ValueError as exc:
            raise InputError(f"--device {self.device!r}: {exc}") from exc


def get_analysis(name: str) -> Any:
    if name not in ANALYSES:
        raise InputError(f"Unknown analysis {name!r}: choose one of {', '.join(ANALYSES)}.")
    return importlib.import_module(ANALYSES[name])


def _load_problems(opts: CommonOptions) -> list[Problem]:
    try:
        return load_prompts(opts.prompts, opts.n_prompts, opts.seed)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"Cannot load prompts from --prompts {opts.prompts!r}: {exc}. Pass arith, arith:K, "
            "gsm8k, or the path of an existing GSM8K-format .jsonl file."
        ) from exc


def run_analysis(
    name: str,
    opts: CommonOptions,
    model: LoadedModel | None = None,
    problems: list[Problem] | None = None,
    command: list[str] | None = None,
    **kwargs: Any,
) -> tuple[pd.DataFrame, dict[str, Any], list[Path]]:
    """Run analysis ``name``; write outputs when ``opts.out`` is set.

    Returns (metrics, summary, written files).
    """
    opts.validate()
    module = get_analysis(name)
    started = now()
    problems = problems if problems is not None else _load_problems(opts)  # cheap, may fail
    out_dir = io.prepare_out_dir(opts.out) if opts.out else None  # fail before the slow part
    model = model or load_model(opts.model, device=opts.device, seed=opts.seed)
    result = module.experiment(model, problems, opts, **kwargs)
    summary = module.summarize(result.metrics)
    files: list[Path] = []
    if out_dir is not None:
        # run.json marks a finished run: drop a previous run's before overwriting its outputs
        (out_dir / "run.json").unlink(missing_ok=True)
        files.append(io.write_parquet(out_dir / "metrics.parquet", result.metrics))
        if len(result.samples):
            files.append(io.write_parquet(out_dir / "samples.parquet", result.samples))
        if len(result.prefill):
            files.append(io.write_parquet(out_dir / "prefill.parquet", result.prefill))
        files.append(io.write_json(out_dir / "summary.json", summary))
        figs = module.plot(result.metrics)
        if not isinstance(figs, dict):
            figs = {name.replace("-", "_"): figs}
        for stem, fig in figs.items():
            files += io.write_figure(fig, out_dir / stem, png=opts.png)
        record = run_record(
            model,
            {"analysis": name, "options": asdict(opts), "analysis_kwargs": kwargs, **result.config},
            started,
            command=command,
        )
        files.append(io.write_json(out_dir / "run.json", record))
    return result.metrics, summary, files

"""The ``rsp-interp`` command line (typer). Every analysis command shares the common flags."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rsp_interp.errors import RSPInterpError
from rsp_interp.runner import CommonOptions, run_analysis

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mechanistic analysis of Random Soft Prompts (RSPs).",
)
console = Console(stderr=False)
err = Console(stderr=True)

COMMON_HELP = {
    "model": "Model: smollm2-135m (embedded), tiny-llama, tiny-gpt2, a local HF dir, a .gguf file "
    "or a Hub id.",
    "rsp_length": "Number of RSP vectors L.",
    "rsp_kind": "isotropic (paper), diagonal, norm-matched, token, zeros.",
    "rsp_scale": "Scale on sigma (dose-response).",
    "position": "Where the RSP goes: end, before-assistant, start.",
    "prompts": "arith, arith:K (K steps), gsm8k (Hub), or a GSM8K-format .jsonl path.",
    "n_prompts": "Number of prompts.",
    "samples": "Samples (fresh RSP draws) per prompt.",
    "max_new_tokens": "Tokens to generate per sample.",
    "seed": "Base seed (RSPs and sampling).",
    "device": "cpu, cuda, cuda:N or auto.",
    "batch_size": "Rows per forward batch.",
    "temperature": "Sampling temperature (0 = greedy).",
    "top_p": "Nucleus sampling threshold (1 = off).",
    "top_k": "Top-k sampling (0 = off).",
    "out": "Output directory (metrics.parquet, run.json, summary.json, figure).",
    "png": "Also write the figure as PNG (needs Chromium).",
    "progress": "Show a progress bar.",
}


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command ``func(opts: CommonOptions, **extra)`` the common flags as CLI options."""
    extra = [p for name, p in inspect.signature(func).parameters.items() if name != "opts"]
    params = []
    for f in fields(CommonOptions):
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name}"] if f.type == "bool" else [flag]
        ann = {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, str | None)
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=f.default,
                annotation=Annotated[ann, typer.Option(*decls, help=COMMON_HELP.get(f.name, ""))],
            )
        )
    names = {f.name for f in fields(CommonOptions)}

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        opts = CommonOptions(**{k: v for k, v in kwargs.items() if k in names})
        return func(opts, **{k: v for k, v in kwargs.items() if k not in names})

    wrapper.__signature__ = inspect.Signature(
        params + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
    )
    return wrapper


def execute(name: str, opts: CommonOptions, **kwargs: Any) -> None:
    """Run an analysis for the CLI: clear errors, a summary table, the list of files."""
    try:
        _, summary, files = run_analysis(name, opts, command=sys.argv, **kwargs)
    except RSPInterpError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    table = Table(title=f"{name} summary", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            if all(isinstance(v, dict) for v in value.values()):
                for sub, v in value.items():
                    table.add_row(escape(f"{key} [{sub}]"), _fmt(v.get("mean", v)))
            continue  # per-layer / per-step dicts live in summary.json
        table.add_row(key, _fmt(value))
    console.print(table)
    for f in files:
        console.print(f"wrote {f}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command("models")
def models_cmd() -> None:
    """List the registered models (local directories, .gguf files and Hub ids work too)."""
    from rsp_interp.models import list_models

    table = Table(title="models")
    for col in ("name", "size", "source", "description"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m.name, m.size, m.source, m.description)
    console.print(table)


@app.command("attention-sink")
@common_options
def attention_sink_cmd(
    opts: CommonOptions,
    paired_baseline: Annotated[
        bool,
        typer.Option(help="Also run a teacher-forced no-RSP stream for KL over the first k steps."),
    ] = True,
) -> None:
    """How much attention the RSP positions absorb, per layer and step, beside the BOS sink."""
    execute("attention-sink", opts, paired_baseline=paired_baseline)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

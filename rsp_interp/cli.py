"""The ``rsp-interp`` command line (typer). Every analysis command shares the common flags."""

from __future__ import annotations

import functools
import importlib
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
from rsp_interp.runner import ANALYSES, CommonOptions, run_analysis

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
    sig = inspect.signature(func, eval_str=True)
    extra = [p for name, p in sig.parameters.items() if name != "opts"]
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


def _register_analyses() -> None:
    """One subcommand per entry of ``runner.ANALYSES``: common flags + the module's own."""
    for name, module_path in ANALYSES.items():
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            if exc.name != module_path:  # a real import error inside the module: surface it
                raise
            continue  # registered but not written yet (tests check every entry imports)
        extra = getattr(module, "cli_options", lambda: {})

        def command(opts: CommonOptions, _name: str = name, _extra: Any = extra, **kw: Any) -> None:
            execute(_name, opts, **_extra(**kw))

        params = [inspect.Parameter("opts", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += list(inspect.signature(extra, eval_str=True).parameters.values())
        command.__signature__ = inspect.Signature(params)
        paragraphs = (module.__doc__ or name).strip().split("\n\n")
        command.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        app.command(name, help=command.__doc__)(common_options(command))


def main() -> None:
    _register_analyses()
    app()


if __name__ == "__main__":
    main()

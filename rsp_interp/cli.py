"""The ``rsp-interp`` command line (typer). Every analysis command shares the common flags."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rsp_interp.errors import InputError, RSPInterpError
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
        err.print(f"[bold red]error:[/] {escape(str(exc))}")  # messages may contain [..]
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
        console.print(f"wrote {escape(str(f))}", soft_wrap=True)  # paths stay whole, literal


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


@app.command("bench")
def bench_cmd(
    out: Annotated[str, typer.Option("--out", help="JSON file to write the results to.")],
    model: Annotated[str, typer.Option("--model", help="Model to benchmark.")] = "smollm2-135m",
    quick: Annotated[
        bool, typer.Option("--quick", help="Batch 1 and 8, 100+128 tokens, 1 repeat.")
    ] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N.")] = "cpu",
    threads: Annotated[int, typer.Option("--threads", help="torch threads (0 = default).")] = 0,
    isolate: Annotated[
        bool, typer.Option("--isolate/--no-isolate", help="Each case in a fresh process.")
    ] = True,
    methods: Annotated[
        str,
        typer.Option("--methods", help="Comma-separated subset of the methods (default: all)."),
    ] = "",
    batches: Annotated[
        str, typer.Option("--batches", help="Comma-separated batch sizes (default: the grid's).")
    ] = "",
    new_tokens: Annotated[
        str,
        typer.Option("--new-tokens", help="Comma-separated generation lengths (default: grid's)."),
    ] = "",
    prompt_len: Annotated[
        int, typer.Option("--prompt-len", help="Prompt length in tokens.", min=8)
    ] = 100,
) -> None:
    """Tokens/s and memory of rsp-interp generation vs Hugging Face and TransformerLens generate."""
    from rsp_interp import bench, io

    try:
        io.prepare_out_dir(Path(out).expanduser().resolve().parent)
        chosen = [m.strip() for m in methods.split(",") if m.strip()] or list(bench.METHODS)
        cases = bench.default_cases(
            quick=quick,
            methods=chosen,
            batches=_int_list(batches, "--batches"),
            lengths=_int_list(new_tokens, "--new-tokens"),
            prompt_len=prompt_len,
        )
        report = bench.run_bench(
            model,
            cases,
            device=device,
            threads=threads,
            isolate=isolate,
            on_record=lambda r: console.print(
                f"{r['method']:>17} B={r['batch']:<3} {r['prompt_len']}+{r['new_tokens']}: "
                f"{r['tokens_per_s']:8.2f} tok/s  peak {r['peak_mem_mb']:7.1f} MB"
            ),
        )
    except RSPInterpError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    table = Table(
        title=f"bench {model} ({report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} threads)"
    )
    for col in ("method", "B", "T+N", "tok/s", "x HF", "MB", "cap B/tok", "warm s"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in report["records"]:
        ratio, cap = r["ratio_vs_hf"], r["capture_bytes_per_token"]
        table.add_row(
            r["method"],
            str(r["batch"]),
            f"{r['prompt_len']}+{r['new_tokens']}",
            f"{r['tokens_per_s']:.2f}",
            "-" if ratio is None else f"{ratio:.2f}",
            f"{r['peak_mem_mb']:.0f}",
            "-" if cap is None else f"{cap:.0f}",
            f"{r['warmup_s']:.2f}",
        )
    console.print(table)
    best = report["best"]
    console.print(
        f"matmul {report['matmul_gflops']:.1f} GFLOP/s; best {best['method']} "
        f"B={best['batch']}: {best['model_gflops']:.1f} GFLOP/s model "
        f"({best['fraction_of_matmul']:.0%} of matmul). rsp-interp rows include a "
        f"{bench.RSP_LENGTH}-vector RSP (10 extra positions)."
    )
    console.print(f"wrote {escape(str(io.write_json(Path(out), report)))}", soft_wrap=True)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(
            f"{flag} takes comma-separated integers, e.g. 8,32; got {text!r}."
        ) from None


def _register_analyses() -> None:
    """One subcommand per entry of ``runner.ANALYSES``: common flags + the module's own."""
    registered = {c.name for c in app.registered_commands}
    for name, module_path in ANALYSES.items():
        if name in registered:  # idempotent: tests may call this more than once
            continue
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

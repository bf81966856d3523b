"""Tests for the ``rsp-interp`` CLI and its Python mirror ``run_analysis``.

One real run of ``rsp-interp attention-sink`` on the tiny Llama (with PNG export) is shared by
the output tests; error tests fail before any generation.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from datetime import datetime

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from rsp_interp import cli, runner
from rsp_interp.errors import InputError
from rsp_interp.rsp import RSPConfig
from rsp_interp.runner import ANALYSES, CommonOptions, run_analysis

SMALL = ["--n-prompts", "2", "--samples", "2", "--max-new-tokens", "4"]
REQUIRED_FILES = {
    "metrics.parquet",
    "samples.parquet",
    "prefill.parquet",
    "run.json",
    "summary.json",
    "attention_sink.html",
    "attention_sink.png",
}


def invoke(*args: str):
    cli._register_analyses()  # idempotent
    return CliRunner().invoke(cli.app, list(args))


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``rsp-interp attention-sink --model tiny-llama --out DIR --no-progress`` (small sizes)."""
    out = tmp_path_factory.mktemp("attention_sink") / "results[v1]"  # [..]: not rich markup
    args = ["attention-sink", "--model", "tiny-llama", "--out", str(out), "--no-progress", *SMALL]
    argv = ["rsp-interp", *args]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result, argv


# --- a successful run ----------------------------------------------------------------------------


def test_cli_writes_every_output(cli_run):
    out, result, _ = cli_run
    names = {p.name for p in out.iterdir()}
    assert REQUIRED_FILES <= names
    assert not [n for n in names if n.endswith(".part") or n.startswith(".")]
    wrote = [line[6:] for line in result.output.splitlines() if line.startswith("wrote ")]
    assert sorted(wrote) == sorted(str(out / n) for n in names)  # whole, literal paths
    assert (out / "attention_sink.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in (out / "attention_sink.html").read_text()[:200000].lower()
    assert "attention-sink summary" in result.output


def test_run_json_has_provenance(cli_run, tiny_llama):
    out, _, argv = cli_run
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == argv
    started = datetime.fromisoformat(run["started"])
    finished = datetime.fromisoformat(run["finished"])
    assert started <= finished and started.tzinfo is not None
    assert run["model"]["model_id"] == "tiny-llama"
    assert run["model"]["weight_sha256"] == tiny_llama.weight_sha256
    assert re.fullmatch(r"[0-9a-f]{64}", run["model"]["weight_sha256"])
    assert run["packages"]["torch"] == torch.__version__
    assert run["packages"]["pandas"] == pd.__version__
    assert run["packages"]["rsp-interp"]
    cfg = run["config"]
    assert cfg["analysis"] == "attention-sink"
    assert cfg["analysis_kwargs"] == {"paired_baseline": True}
    opts = cfg["options"]
    assert (opts["model"], opts["n_prompts"], opts["samples"], opts["max_new_tokens"]) == (
        "tiny-llama",
        2,
        2,
        4,
    )
    assert cfg["seed"] == 0 and opts["seed"] == 0
    rsp = next(c for c in cfg["conditions"] if c["name"] == "rsp")["rsp"]
    assert rsp == RSPConfig().to_dict()  # defaults: isotropic, L=10, scale 1, end, seed 0
    assert cfg["sampling"]["max_new_tokens"] == 4
    assert cfg["sampling"]["temperature"] == 1.0
    assert cfg["capture"]["paired_baseline"] is True
    assert len(cfg["prompt_ids"]) == 2


def test_parquet_contents(cli_run):
    out, _, _ = cli_run
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == [
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
    assert set(metrics["condition"]) == {"rsp", "none"}
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 2 * 2 * 2  # conditions x prompts x samples
    prefill = pd.read_parquet(out / "prefill.parquet")
    assert set(prefill["role"].astype(str)) == {"bos", "prompt", "rsp"}


def test_summary_equals_recomputation_from_metrics(cli_run):
    out, _, _ = cli_run
    summary = json.loads((out / "summary.json").read_text())
    m = pd.read_parquet(out / "metrics.parquet")
    m["condition"] = m["condition"].astype(str)
    m["metric"] = m["metric"].astype(str)

    def sel(metric, condition="rsp", **eq):
        d = m[(m["metric"] == metric) & (m["condition"] == condition)]
        for col, v in eq.items():
            d = d[d[col] == v]
        return d

    last = int(sel("attn_rsp")["step"].max())
    assert summary["last_step"] == last
    # every layer has the same number of rows at a step, so the mean of per-layer means is the
    # plain mean over (prompt, sample, layer, head)
    assert sel("attn_rsp", step=0).groupby("layer").size().nunique() == 1
    approx = lambda x: pytest.approx(float(x), rel=1e-9, abs=1e-12)  # noqa: E731
    assert summary["attn_rsp_step0_mean"] == approx(sel("attn_rsp", step=0)["value"].mean())
    assert summary["attn_rsp_last_mean"] == approx(sel("attn_rsp", step=last)["value"].mean())
    assert summary["attn_bos_step0_mean_rsp"] == approx(sel("attn_bos", step=0)["value"].mean())
    assert summary["attn_bos_step0_mean_none"] == approx(
        sel("attn_bos", "none", step=0)["value"].mean()
    )
    for step, v in summary["attn_rsp_by_step"].items():
        assert v == approx(sel("attn_rsp", step=int(step))["value"].mean())
    for key, metric, cond, step in [
        ("attn_rsp_step0_by_layer", "attn_rsp", "rsp", 0),
        ("attn_rsp_last_by_layer", "attn_rsp", "rsp", last),
        ("attn_bos_step0_by_layer", "attn_bos", "rsp", 0),
        ("attn_bos_none_step0_by_layer", "attn_bos", "none", 0),
    ]:
        d = sel(metric, cond, step=step)
        assert {int(k) for k in summary[key]} == set(d["layer"])
        for layer, v in summary[key].items():
            assert v == approx(d[d["layer"] == int(layer)]["value"].mean())
    for cond in ("rsp", "none"):
        ent = sel("entropy", cond, step=0)["value"].to_numpy()
        got = summary["entropy_step0"][cond]
        assert got["n"] == len(ent) == 4
        assert got["mean"] == approx(ent.mean())
        assert got["std"] == approx(ent.std(ddof=1))
    kl = m[(m["metric"] == "kl_to_baseline") & (m["step"] == 0)]["value"].to_numpy()
    assert len(kl) == 4 and summary["kl_rsp_to_none_step0_mean"] == approx(kl.mean())
    assert summary["rows_reaching_last_step"] == len(sel("entropy", step=last))


def test_python_api_returns_what_the_cli_wrote(cli_run):
    out, _, _ = cli_run
    opts = CommonOptions(
        model="tiny-llama", n_prompts=2, samples=2, max_new_tokens=4, progress=False
    )
    metrics, summary, files = run_analysis("attention-sink", opts)
    assert files == []  # no --out: nothing written
    pd.testing.assert_frame_equal(metrics, pd.read_parquet(out / "metrics.parquet"))
    written = json.loads((out / "summary.json").read_text())
    assert json.loads(json.dumps(summary, default=float)).keys() == written.keys()
    assert summary["attn_rsp_step0_mean"] == written["attn_rsp_step0_mean"]


def test_help_lists_commands_and_flags():
    top = invoke("--help")
    assert top.exit_code == 0 and "attention-sink" in top.output and "models" in top.output
    sub = invoke("attention-sink", "--help")
    assert sub.exit_code == 0
    for flag in ("--model", "--rsp-length", "--position", "--out", "--no-png", "--paired-baseline"):
        assert flag in sub.output
    models = invoke("models")
    assert models.exit_code == 0
    for name in ("smollm2-135m", "tiny-llama", "tiny-gpt2"):
        assert name in models.output


# --- errors --------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model would be loaded (errors must come before the slow part)."""

    def refuse(*a, **k):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(runner, "load_model", refuse)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--rsp-kind", "bogus"], ["Unknown RSP kind 'bogus'", "choose one of", "isotropic"]),
        (["--position", "bogus"], ["Unknown RSP position 'bogus'", "before-assistant"]),
        (["--n-prompts", "0"], ["--n-prompts must be >= 1"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
        (["--samples", "0"], ["--samples must be >= 1"]),
        (["--rsp-length", "0"], ["--rsp-length must be >= 1"]),
        (["--rsp-scale", "-1"], ["RSP scale must be a finite number >= 0"]),
        (["--prompts", "nonexistent.jsonl"], ["--prompts", "not found", ".jsonl"]),
        (["--prompts", "bogus"], ["--prompts", "arith:K"]),
        (["--device", "bogus"], ["--device", "cpu"]),
    ],
)
def test_bad_flags_fail_fast_with_the_fix(args, expected, no_model_load, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "attention-sink", "--model", "tiny-llama", "--no-progress", "--out", str(out), *args
    )
    assert result.exit_code == 2, result.output + repr(result.exception)
    text = flat(result.output)
    assert text.startswith("error:")
    for part in expected:
        assert part in text
    assert "Traceback" not in text
    assert not out.exists()


def test_unknown_model(tmp_path):
    result = invoke("attention-sink", "--model", "bogus-model", "--no-progress")
    assert result.exit_code == 2
    text = flat(result.output)
    assert "Unknown model 'bogus-model'" in text and "rsp-interp models" in text
    assert "tiny-llama" in text


def test_prompt_longer_than_context(tmp_path):
    """Tiny models have n_ctx 512: the chat prompt + RSP + 600 new tokens cannot fit."""
    out = tmp_path / "out"
    result = invoke(
        "attention-sink",
        "--model",
        "tiny-llama",
        "--no-progress",
        "--n-prompts",
        "1",
        "--samples",
        "1",
        "--max-new-tokens",
        "600",
        "--out",
        str(out),
    )
    assert result.exit_code == 2
    text = flat(result.output)
    assert "context of 512" in text and "fewer new tokens" in text
    assert not list(out.glob("*"))  # the out dir was created but nothing written into it


def test_unwritable_out_fails_before_loading_and_writes_nothing(tmp_path, no_model_load):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    out = blocker / "results"  # the parent is a regular file (chmod does not stop root)
    result = invoke("attention-sink", "--model", "tiny-llama", "--no-progress", "--out", str(out))
    assert result.exit_code == 2
    text = flat(result.output)
    assert "--out" in text and str(out) in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert blocker.read_text() == "keep me"


def test_failure_midway_leaves_no_run_json(tmp_path, monkeypatch):
    """An earlier run's run.json must not survive a run that fails after writing metrics."""
    module = importlib.import_module(ANALYSES["attention-sink"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"from": "an earlier, finished run"}')

    def broken_plot(metrics):
        assert len(metrics) > 0  # metrics were computed
        raise RuntimeError("plot exploded")

    monkeypatch.setattr(module, "plot", broken_plot)
    result = invoke(
        "attention-sink",
        "--model",
        "tiny-llama",
        "--no-progress",
        "--no-png",
        "--n-prompts",
        "1",
        "--samples",
        "1",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, RuntimeError)
    names = {p.name for p in out.iterdir()}
    assert "run.json" not in names
    assert "metrics.parquet" in names  # written before the failure, and complete
    assert not [n for n in names if n.endswith(".part")]
    # the same through the Python API
    opts = CommonOptions(
        model="tiny-llama",
        n_prompts=1,
        samples=1,
        max_new_tokens=2,
        out=str(out),
        png=False,
        progress=False,
    )
    with pytest.raises(RuntimeError, match="plot exploded"):
        run_analysis("attention-sink", opts)
    assert not (out / "run.json").exists()


def test_error_messages_keep_square_brackets(monkeypatch):
    """Messages are printed literally, not parsed as rich markup (which would eat ``[..]``)."""

    def fail(*a, **k):
        raise InputError("RSPs must be [n_prompts=3, L, d_model=64], got [bold] (1, 2).")

    monkeypatch.setattr(cli, "run_analysis", fail)
    result = invoke("attention-sink", "--no-progress")
    assert result.exit_code == 2
    assert "[n_prompts=3, L, d_model=64], got [bold] (1, 2)." in flat(result.output)


def test_nan_rsp_tensor_via_python_api(tiny_llama):
    from rsp_interp.experiment import Condition, run_experiment
    from rsp_interp.prompts import arithmetic_problems

    bad = torch.full((2, tiny_llama.d_model), float("nan"))
    cond = Condition("x", RSPConfig(kind="tensor", length=2), rsp_tensor=bad)
    with pytest.raises(InputError, match="NaN"):
        run_experiment(tiny_llama, arithmetic_problems(1, 0, 1), [cond], progress=False)


def test_python_api_validates_options():
    with pytest.raises(InputError, match="--n-prompts"):
        run_analysis("attention-sink", CommonOptions(model="tiny-llama", n_prompts=0))
    with pytest.raises(InputError, match="Unknown analysis"):
        run_analysis("bogus", CommonOptions(model="tiny-llama"))


# --- the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_every_registered_analysis_is_complete(name):
    """Every ANALYSES entry imports and provides the analysis interface (the CLI relies on it)."""
    module = importlib.import_module(ANALYSES[name])
    assert module.NAME == name
    for fn in ("experiment", "run", "summarize", "plot"):
        assert callable(getattr(module, fn, None)), f"{ANALYSES[name]} lacks {fn}()"
    if hasattr(module, "cli_options"):
        assert isinstance(module.cli_options(), dict)
    cli._register_analyses()
    assert name in {c.name for c in cli.app.registered_commands}


def test_registry_modules_are_unique():
    assert len(set(ANALYSES.values())) == len(ANALYSES)
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in ANALYSES)

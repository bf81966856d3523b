"""Tests for the benchmark machinery (structure, ratios, memory, JSON) -- no timing assertions."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rsp_interp import bench
from rsp_interp.captures import CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.generation import SamplingConfig, generate
from rsp_interp.lean import unwrapped_hf_model
from rsp_interp.prompts import format_prompt


def test_bench_prompts_have_exact_length_and_keep_the_assistant_header(tiny_llama):
    tok = tiny_llama.tokenizer
    prompts = bench.bench_prompts(tok, batch=3, prompt_len=100)
    assert [len(p.ids) for p in prompts] == [100, 100, 100]
    assert len({p.ids for p in prompts}) == 3  # distinct rows
    header = tok(format_prompt("q", tok).assistant_header, add_special_tokens=False)["input_ids"]
    assert header
    for p in prompts:
        assert list(p.ids[p.header_start :]) == header


def test_bench_prompts_too_short_is_an_input_error(tiny_llama):
    with pytest.raises(InputError, match="prompt_len"):
        bench.bench_prompts(tiny_llama.tokenizer, batch=1, prompt_len=3)


def test_case_validation_and_grids():
    with pytest.raises(InputError, match="method"):
        bench.Case("vllm", 1, 100, 8)
    with pytest.raises(InputError, match=">= 1"):
        bench.Case("hf-generate", 0, 100, 8)
    custom = bench.default_cases(methods=["hf-generate"], batches=[4], lengths=[16, 128])
    assert [(c.batch, c.new_tokens, c.repeats) for c in custom] == [(4, 16, 3), (4, 128, 2)]
    quick = bench.default_cases(quick=True)
    assert {(c.batch, c.new_tokens) for c in quick} == {(1, 128), (8, 128)}
    full = bench.default_cases()
    assert {(c.batch, c.new_tokens) for c in full} == {
        (b, n) for b in (1, 8, 32) for n in (128, 512)
    }
    assert all(
        {c.method for c in full if (c.batch, c.new_tokens) == k} == set(bench.METHODS)
        for k in {(c.batch, c.new_tokens) for c in full}
    )


def test_ratios_are_relative_to_hf_at_the_same_shape():
    recs = [
        {
            "method": "hf-generate",
            "batch": 8,
            "prompt_len": 100,
            "new_tokens": 4,
            "tokens_per_s": 4.0,
        },
        {
            "method": "rsp-interp",
            "batch": 8,
            "prompt_len": 100,
            "new_tokens": 4,
            "tokens_per_s": 5.0,
        },
        {
            "method": "rsp-interp",
            "batch": 1,
            "prompt_len": 100,
            "new_tokens": 4,
            "tokens_per_s": 2.0,
        },
    ]
    bench.add_ratios(recs)
    assert recs[0]["ratio_vs_hf"] == 1.0
    assert recs[1]["ratio_vs_hf"] == 5.0 / 4.0
    assert recs[2]["ratio_vs_hf"] is None  # no HF record at batch 1


def test_capture_bytes_counts_every_capture_tensor(tiny_llama):
    prompts = bench.bench_prompts(tiny_llama.tokenizer, 2, 40)
    out = generate(
        tiny_llama,
        prompts,
        None,
        sampling=SamplingConfig(max_new_tokens=3, stop_at_eos=False),
        capture=CaptureConfig(top_m=2),
        sample_seeds=[0, 1],
    )
    expected = 0
    for t in (
        out.entropy,
        out.chosen_logprob,
        out.top_m_ids,
        out.top_m_probs,
        out.attn,
        out.resid,
        out.prefill_resid,
        out.prefill_attn,
        *out.step_scores.values(),
    ):
        expected += t.numel() * t.element_size()
    assert bench.capture_bytes(out) == expected
    off = generate(
        tiny_llama,
        prompts,
        None,
        sampling=SamplingConfig(max_new_tokens=3, stop_at_eos=False),
        capture=CaptureConfig.off(),
        sample_seeds=[0, 1],
    )
    assert bench.capture_bytes(off) == 2 * 2 * 3 * 4  # entropy + chosen_logprob, float32


def test_peak_memory_sees_a_large_allocation():
    with bench.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem.growth_mb > 48


def test_unwrapped_model_shares_weights_and_matches_the_bridge(tiny_model):
    lean = unwrapped_hf_model(tiny_model.hf_model)
    ours = {id(p) for p in tiny_model.hf_model.parameters()}
    assert {id(p) for p in lean.parameters()} <= ours  # no copy of any weight
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = tiny_model.bridge(tiny_model.embed(ids), attention_mask=mask, position_ids=pos)
        got = lean(inputs_embeds=tiny_model.embed(ids), attention_mask=mask, position_ids=pos)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], ref[real], atol=1e-4, rtol=0)
    # the bridge still works afterwards and its model was not switched to sdpa
    assert tiny_model.hf_model.config._attn_implementation == "eager"


def test_run_case_record_structure(tiny_llama):
    rec = bench.run_case(bench.Case("rsp-interp", 2, 40, 3, repeats=2), "tiny-llama")
    assert rec["method"] == "rsp-interp" and rec["rsp_positions"] == bench.RSP_LENGTH
    assert len(rec["seconds"]) == 2 and all(s > 0 for s in rec["seconds"])
    sorted_s = sorted(rec["seconds"])
    assert rec["tokens_per_s"] == pytest.approx(2 * 3 / ((sorted_s[0] + sorted_s[1]) / 2))
    assert rec["capture_bytes_per_token"] == rec["capture_bytes"] / (2 * 3)
    assert rec["n_params"] == bench.n_params(tiny_llama.hf_model)
    hf = bench.run_case(bench.Case("hf-generate", 2, 40, 3), "tiny-llama")
    assert hf["capture_bytes"] is None and hf["rsp_positions"] == 0
    tl = bench.run_case(bench.Case("tl-generate", 2, 40, 3), "tiny-llama")
    assert tl["tokens_per_s"] > 0
    assert rec["engine"] == "lean" and hf["engine"] is None
    via_bridge = bench.run_case(bench.Case("rsp-interp-bridge", 2, 40, 3), "tiny-llama")
    assert via_bridge["engine"] == "bridge"
    assert via_bridge["capture_bytes"] == rec["capture_bytes"]  # the same captures


def test_bench_cli_writes_json_atomically(tmp_path, monkeypatch):
    """The CLI runs the cases it is given and writes one JSON (no temp files left behind)."""
    from rsp_interp.cli import app

    cases = [bench.Case(m, 1, 40, 2) for m in ("rsp-interp", "hf-generate")]
    monkeypatch.setattr(bench, "default_cases", lambda **kw: cases)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(
        app, ["bench", "--model", "tiny-llama", "--no-isolate", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["records"]] == ["rsp-interp", "hf-generate"]
    assert report["records"][1]["ratio_vs_hf"] == 1.0
    assert report["matmul_gflops"] > 0 and report["machine"]["cores"] >= 1
    assert "torch" in report["packages"]
    best = report["best"]
    top = max(report["records"], key=lambda r: r["tokens_per_s"])
    assert best["method"] == top["method"]
    assert best["fraction_of_matmul"] == pytest.approx(
        2 * top["n_params"] * top["tokens_per_s"] / 1e9 / report["matmul_gflops"]
    )


def test_bench_cli_rejects_unknown_methods(tmp_path):
    from rsp_interp.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(
        app, ["bench", "--model", "tiny-llama", "--methods", "hf-generate,vllm", "--out", str(out)]
    )
    assert res.exit_code == 2 and "vllm" in res.output and "rsp-interp-nocap" in res.output
    assert not out.exists()
    res = CliRunner().invoke(app, ["bench", "--batches", "8,x", "--out", str(out)])
    assert res.exit_code == 2 and "--batches" in res.output


def test_bench_cli_methods_subset(tmp_path, monkeypatch):
    from rsp_interp.cli import app

    seen = {}

    def cases(quick=False, methods=(), batches=(), lengths=(), prompt_len=100):
        seen.update(methods=list(methods), batches=batches, lengths=lengths, prompt_len=prompt_len)
        return [bench.Case(m, 1, 40, 2) for m in methods]

    monkeypatch.setattr(bench, "default_cases", cases)
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tiny-llama", "--no-isolate", "--out", str(out)]
    res = CliRunner().invoke(
        app,
        [*args, "--methods", "rsp-interp-bridge, hf-generate", "--batches", "8,32"]
        + ["--new-tokens", "512", "--prompt-len", "300"],
    )
    assert res.exit_code == 0, res.output
    assert seen["methods"] == ["rsp-interp-bridge", "hf-generate"]
    assert seen["batches"] == [8, 32] and seen["lengths"] == [512] and seen["prompt_len"] == 300
    assert [r["method"] for r in json.loads(out.read_text())["records"]] == seen["methods"]

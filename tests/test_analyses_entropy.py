"""Stage-1 early-flattening analyses (first-k, controls, temperature, the `entropy` command) on
tiny random models, checked against direct forwards and direct pandas/scipy computations."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from typer.testing import CliRunner

from analyses import controls, entropy, first_k, temperature
from rsp_interp.errors import InputError
from rsp_interp.injection import tokenize_prompt
from rsp_interp.prompts import arithmetic_problems, format_prompt
from rsp_interp.rsp import RSPSampler, derive_seed
from rsp_interp.runner import CommonOptions, run_analysis

TOL = 1e-4
K = 3


def opts_for(model_name: str, **kw) -> CommonOptions:
    base = dict(model=model_name, n_prompts=3, samples=2, rsp_length=3, progress=False)
    return CommonOptions(**{**base, **kw})


def step0_logprobs(model, problem, rsp: torch.Tensor | None) -> torch.Tensor:
    """Direct, unbatched forward: prompt ids (+ RSP at the end) -> log-probs of token 1."""
    tok = model.tokenizer
    tp = tokenize_prompt(format_prompt(problem.question, tok, chat=model.chat), tok)
    emb = model.embed(torch.tensor(tp.ids))
    if rsp is not None:
        emb = torch.cat([emb, rsp.to(emb.dtype)])
    pos = torch.arange(emb.shape[0])[None]
    with torch.no_grad():
        logits = model.bridge(emb[None], attention_mask=torch.ones_like(pos), position_ids=pos)
    return logits[0, -1].double().log_softmax(-1)


def ent(lp: torch.Tensor) -> float:
    p = lp.exp()
    return float(-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum())


def value(metrics, **where) -> float:
    d = metrics
    for col, v in where.items():
        d = d[d[col] == v]
    assert len(d) == 1, where
    return float(d["value"].iloc[0])


# --- first-k ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fk_run(tiny_llama):
    problems = arithmetic_problems(3, seed=1)
    opts = opts_for("tiny-llama")
    return problems, opts, first_k.experiment(tiny_llama, problems, opts, k=K)


def test_first_k_rows_and_step0_against_direct_forward(tiny_llama, fk_run):
    problems, opts, res = fk_run
    m = res.metrics
    assert set(m["condition"]) == {"rsp", "none"}
    assert m["step"].between(0, K - 1).all()
    assert set(m["metric"]) == set(first_k.STEP_METRICS)
    assert m[m["metric"] == "kl_to_baseline"]["condition"].eq("rsp").all()
    sampler = RSPSampler.for_model(tiny_llama, opts.rsp())
    for i, p in enumerate(problems):
        base = step0_logprobs(tiny_llama, p, None)
        for s in range(opts.samples):
            rsp = sampler.draw(derive_seed(opts.seed, i, s))
            lp = step0_logprobs(tiny_llama, p, rsp)
            row = dict(prompt_id=p.id, sample=s, step=0)
            assert value(m, condition="rsp", metric="entropy", **row) == pytest.approx(
                ent(lp), abs=TOL
            )
            assert value(m, condition="none", metric="entropy", **row) == pytest.approx(
                ent(base), abs=TOL
            )
            assert value(m, condition="rsp", metric="top1_prob", **row) == pytest.approx(
                float(lp.exp().max()), abs=TOL
            )
            kl = float((lp.exp() * (lp - base)).sum())
            assert value(m, condition="rsp", metric="kl_to_baseline", **row) == pytest.approx(
                kl, abs=TOL
            )


def test_first_k_summary_matches_direct_aggregation(fk_run):
    _, opts, res = fk_run
    m = res.metrics
    s = first_k.summarize(m)
    assert s["prompts"] == "arith" and s["n_prompts"] == 3 and s["draws_per_prompt"] == 2
    assert s["k"] == K
    e0 = m[(m["metric"] == "entropy") & (m["step"] == 0)]
    per_prompt = e0.groupby(["condition", "prompt_id"], observed=True)["value"].mean().unstack(0)
    rsp, none = per_prompt["rsp"].to_numpy(), per_prompt["none"].to_numpy()
    assert s["entropy_token1_rsp"]["mean"] == pytest.approx(rsp.mean())
    assert s["entropy_token1_none"]["mean"] == pytest.approx(none.mean())
    low, high = s["entropy_token1_rsp"]["ci"]
    assert low <= rsp.mean() <= high
    diff = s["entropy_token1_diff"]
    assert diff["mean"] == pytest.approx((rsp - none).mean())
    assert diff["wilcoxon_p"] == pytest.approx(sps.wilcoxon(rsp, none).pvalue)
    assert diff["t_p"] == pytest.approx(sps.ttest_rel(rsp, none).pvalue)
    tests = pd.DataFrame(s["paired_tests"])
    assert set(tests["step"]) == set(range(K))
    kl0 = m[(m["metric"] == "kl_to_baseline") & (m["step"] == 0)]
    assert s["kl_token1"]["mean"] == pytest.approx(
        kl0.groupby("prompt_id", observed=True)["value"].mean().mean()
    )


def test_first_k_plot_and_source_label(fk_run):
    _, _, res = fk_run
    fig = first_k.plot(res.metrics)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert {t.name for t in lines} >= {"RSP", "no RSP", "KL"}
    rsp_entropy = next(t for t in lines if t.name == "RSP" and t.xaxis == "x")
    assert list(rsp_entropy.x) == list(range(1, K + 1))  # labelled as generated token 1..k
    gsm = res.metrics.assign(
        prompt_id=res.metrics["prompt_id"].astype(str).str.replace("arith", "gsm8k")
    )
    assert first_k.prompt_source(gsm) == "gsm8k"


def test_first_k_rejects_bad_k(tiny_llama):
    with pytest.raises(InputError, match="--k"):
        first_k.experiment(tiny_llama, arithmetic_problems(1), opts_for("tiny-llama"), k=0)


# --- controls --------------------------------------------------------------------------------


def test_arms_sweep_around_the_default_without_duplicates():
    arms = controls.arms(CommonOptions(rsp_length=10, rsp_scale=1.0))
    names = [a.name for a in arms]
    assert names[0] == "none" and len(names) == len(set(names))
    configs = [(a.kind, a.length, a.scale) for a in arms]
    assert len(configs) == len(set(configs))
    assert ("isotropic", 10, 1.0) in configs and "scale=1" not in names  # shared, run once
    assert {a.kind for a in arms if a.factor == "kind"} == set(controls.KINDS)
    assert sorted(a.length for a in arms if a.factor == "length") == list(controls.LENGTHS)
    assert sorted(a.scale for a in arms if a.factor == "scale") == [
        s for s in controls.SCALES if s != 1.0
    ]
    arms8 = controls.arms(CommonOptions(rsp_length=8))
    assert "length=8" not in [a.name for a in arms8]  # = kind=isotropic at L=8


@pytest.fixture(scope="module")
def controls_run(tiny_gpt2):
    problems = arithmetic_problems(3, seed=2)
    opts = opts_for("tiny-gpt2", samples=5)  # controls ignores opts.samples
    res = controls.experiment(
        tiny_gpt2,
        problems,
        opts,
        k=2,
        samples=1,
        kinds=("isotropic", "zeros", "token"),
        lengths=(1,),
        scales=(0.0, 2.0),
    )
    return problems, opts, res


def test_controls_arms_inject_what_they_say(tiny_gpt2, controls_run):
    problems, opts, res = controls_run
    m = res.metrics
    assert set(m["condition"]) == {
        "none",
        "kind=isotropic",
        "kind=zeros",
        "kind=token",
        "length=1",
        "scale=0",
        "scale=2",
    }
    w_e = tiny_gpt2.embedding_matrix.detach()
    mu = float(w_e.double().mean())
    sigma = float(w_e.double().std(unbiased=False))
    d = tiny_gpt2.d_model
    for i, p in enumerate(problems):
        seed = derive_seed(opts.seed, i, 0)
        g = torch.Generator().manual_seed(seed)
        iso = mu + sigma * torch.randn((opts.rsp_length, d), generator=g)
        g = torch.Generator().manual_seed(seed)
        iso1 = mu + sigma * torch.randn((1, d), generator=g)
        g = torch.Generator().manual_seed(seed)
        iso2 = mu + 2 * sigma * torch.randn((opts.rsp_length, d), generator=g)
        expected = {
            "none": None,
            "kind=isotropic": iso,
            "kind=zeros": torch.zeros(opts.rsp_length, d),
            "length=1": iso1,
            "scale=0": torch.full((opts.rsp_length, d), mu),
            "scale=2": iso2,
        }
        base = step0_logprobs(tiny_gpt2, p, None)
        for cond, rsp in expected.items():
            lp = step0_logprobs(tiny_gpt2, p, rsp)
            row = dict(condition=cond, prompt_id=p.id, step=0, sample=0)
            assert value(m, metric="entropy", **row) == pytest.approx(ent(lp), abs=TOL), cond
            if cond != "none":
                kl = float((lp.exp() * (lp - base)).sum())
                assert value(m, metric="kl_to_baseline", **row) == pytest.approx(kl, abs=TOL)
    assert m["sample"].max() == 0


def test_controls_table_matches_direct_paired_computation(controls_run):
    _, _, res = controls_run
    m = res.metrics
    table = controls.condition_table(m).set_index("condition")
    e0 = m[(m["metric"] == "entropy") & (m["step"] == 0)]
    pp = e0.groupby(["condition", "prompt_id"], observed=True)["value"].mean().unstack(0)
    for cond in ("kind=zeros", "scale=0", "kind=token"):
        r = table.loc[cond]
        assert r["entropy_t1"] == pytest.approx(pp[cond].mean())
        assert r["entropy_t1_diff"] == pytest.approx((pp[cond] - pp["none"]).mean())
        assert r["entropy_t1_t_p"] == pytest.approx(sps.ttest_rel(pp[cond], pp["none"]).pvalue)
        assert r["entropy_t1_ci_low"] <= r["entropy_t1"] <= r["entropy_t1_ci_high"]
    fk = m[m["metric"] == "entropy"].groupby(["condition", "prompt_id"], observed=True)["value"]
    first_k_mean = fk.mean().groupby("condition", observed=True).mean()  # k=2, no early stops
    assert table.loc["kind=zeros", "entropy_firstk"] == pytest.approx(first_k_mean["kind=zeros"])
    assert math.isnan(table.loc["none", "kl_t1"])
    assert table.loc["kind=isotropic", "kl_t1"] > 0


def test_controls_panels_share_the_default_arm_and_plot(controls_run):
    _, _, res = controls_run
    groups = controls.panels(controls.condition_table(res.metrics))
    assert set(groups) == {"kind", "length", "scale"}
    for factor in ("kind", "length", "scale"):
        assert "kind=isotropic" in set(groups[factor]["condition"]), factor
    assert list(groups["scale"]["level"]) == [0.0, 1.0, 2.0]
    assert list(groups["length"]["level"]) == [1, 3]
    s = controls.summarize(res.metrics)
    assert any("zero vectors" in line for line in s["reading"])
    e0 = res.metrics[(res.metrics["metric"] == "entropy") & (res.metrics["step"] == 0)]
    pp = e0.groupby(["condition", "prompt_id"], observed=True)["value"].mean().unstack(0)
    pairs = {(c["a"], c["b"]): c for c in s["contrasts"]}
    assert set(pairs) == {
        ("kind=token", "kind=isotropic"),
        ("kind=zeros", "none"),
        ("length=1", "kind=isotropic"),
    }
    direct = (pp["kind=token"] - pp["kind=isotropic"]).mean()
    assert pairs[("kind=token", "kind=isotropic")]["mean_diff"] == pytest.approx(direct)
    fig = controls.plot(res.metrics)
    assert len([t for t in fig.data if t.name == "generated token 1"]) == 3


# --- temperature -----------------------------------------------------------------------------


def test_entropy_at_temperature_and_matching_against_numpy():
    z = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    for t in (0.5, 1.0, 2.3):
        p = np.exp(z.double().numpy() / t - np.logaddexp.reduce(z.double().numpy() / t))
        assert temperature.entropy_at_temperature(z, t) == pytest.approx(
            -(p * np.log(p)).sum(), abs=1e-5
        )
    target = temperature.entropy_at_temperature(z, 1.7)
    t_star, achieved = temperature.match_temperature(z, target)
    assert t_star == pytest.approx(1.7, rel=1e-3) and achieved == pytest.approx(target, abs=1e-6)
    # unreachable targets are clipped to the ends of the range
    t_hi, h_hi = temperature.match_temperature(z, math.log(50) + 1)
    assert t_hi == temperature.T_RANGE[1] and h_hi < math.log(50) + 1
    t_lo, _ = temperature.match_temperature(z, -1.0)
    assert t_lo == temperature.T_RANGE[0]


def test_entropy_slope_of_a_known_line():
    rows = [
        {"condition": c, "prompt_id": p, "sample": smp, "step": t, "metric": "entropy",
         "value": 5.0 + slope * t + 0.1 * smp}
        for c, slope in (("rsp", -0.5), ("temperature", 0.25))
        for p in ("a", "b")
        for smp in (0, 1)
        for t in range(6)
    ]  # fmt: skip
    got = temperature._slope(pd.DataFrame(rows), "entropy")
    assert np.allclose(got["rsp"], -0.5) and np.allclose(got["temperature"], 0.25)
    later = temperature._later_mean(pd.DataFrame(rows), "entropy", first_step=4)
    assert np.allclose(later["rsp"], 5.0 - 0.5 * 4.5 + 0.05)


def test_diversity_measures_by_hand():
    seqs = [[1, 2, 3, 4], [1, 2, 5, 4], [7, 2, 3, 4]]
    assert temperature.distinct_n(seqs, 1) == pytest.approx(6 / 12)  # {1,2,3,4,5,7}
    assert temperature.distinct_n(seqs, 2) == pytest.approx(6 / 9)
    assert temperature.distinct_n([[1]], 2) != temperature.distinct_n([[1]], 2)  # NaN
    assert temperature.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert temperature.first_divergence([1, 2], [1, 2, 3]) == 2
    assert temperature.first_divergence([5], [6]) == 0


@pytest.fixture(scope="module")
def temp_run(tiny_llama):
    problems = arithmetic_problems(2, seed=3)
    opts = opts_for("tiny-llama", samples=3)
    return problems, opts, temperature.experiment(tiny_llama, problems, opts, k=K)


def test_matched_temperature_reproduces_the_rsp_token1_entropy(tiny_llama, temp_run):
    problems, opts, res = temp_run
    m = res.metrics
    s0 = m[(m["metric"] == "sampling_entropy") & (m["step"] == 0)]
    for p in problems:
        target = s0[(s0["condition"] == "rsp") & (s0["prompt_id"] == p.id)]["value"].mean()
        assert value(m, metric="target_entropy", prompt_id=p.id) == pytest.approx(target)
        t_star = value(m, metric="matched_temperature", prompt_id=p.id)
        # the engine's own sampling entropy at T*, for every sample of the prompt
        got = s0[(s0["condition"] == "temperature") & (s0["prompt_id"] == p.id)]["value"]
        assert len(got) == opts.samples
        assert np.allclose(got, target, atol=TOL)
        # and the same from a direct forward of the prompt, tempered by hand
        lp = step0_logprobs(tiny_llama, p, None)
        q = (lp / t_star).log_softmax(-1)
        assert ent(q) == pytest.approx(target, abs=TOL)
        # model entropy (T=1) of the matched run is the untempered no-RSP entropy
        e0 = m[
            (m["metric"] == "entropy")
            & (m["step"] == 0)
            & (m["condition"] == "temperature")
            & (m["prompt_id"] == p.id)
        ]["value"]
        assert np.allclose(e0, ent(lp), atol=TOL)


def test_temperature_diversity_rows_match_samples(temp_run):
    _, _, res = temp_run
    m, samples = res.metrics, res.samples
    assert set(samples["condition"]) == {"rsp", "none", "temperature"}
    for (cond, pid), g in samples.groupby(["condition", "prompt_id"], observed=True):
        seqs = [list(t)[:K] for t in g["token_ids"]]
        pairs = [temperature.first_divergence(a, b) for a, b in combinations(seqs, 2)]
        row = dict(condition=cond, prompt_id=pid)
        assert value(m, metric="distinct_1", **row) == pytest.approx(
            len({x for s in seqs for x in s}) / sum(len(s) for s in seqs)
        )
        assert value(m, metric="first_divergence", **row) == pytest.approx(np.mean(pairs))


def test_temperature_summary_pairs_rsp_with_matched_temperature(temp_run):
    _, _, res = temp_run
    m = res.metrics
    s = temperature.summarize(m)
    assert s["n_prompts"] == 2 and s["samples_per_prompt"]["temperature"] == 3
    assert s["matched_temperature"]["max_abs_entropy_mismatch"] < 1e-4
    later = m[(m["metric"] == "entropy") & (m["step"] >= 1)]
    per_row = later.groupby(["condition", "prompt_id", "sample"], observed=True)["value"].mean()
    pp = per_row.groupby(["condition", "prompt_id"], observed=True).mean().unstack(0)
    c = s["comparisons"]["later_entropy"]["rsp_minus_temperature"]
    assert c["mean_diff"] == pytest.approx((pp["rsp"] - pp["temperature"]).mean())
    tok1 = s["comparisons"]["token1_sampling_entropy"]["rsp_minus_temperature"]
    assert abs(tok1["mean_diff"]) < 1e-4  # matched by construction
    assert len(temperature.plot(m).data) > 0


def test_temperature_reuses_a_reference_run(tiny_llama, fk_run):
    problems, opts, fk = fk_run
    res = temperature.experiment(tiny_llama, problems, opts, k=K, reference=fk)
    rsp_ref = fk.metrics[(fk.metrics["condition"] == "rsp") & (fk.metrics["metric"] == "entropy")]
    rsp_new = res.metrics[
        (res.metrics["condition"] == "rsp") & (res.metrics["metric"] == "entropy")
    ]
    assert np.allclose(np.sort(rsp_ref["value"].to_numpy()), np.sort(rsp_new["value"].to_numpy()))
    with pytest.raises(InputError, match="no RSP rows"):
        temperature.experiment(
            tiny_llama, arithmetic_problems(4, seed=9)[3:], opts, k=K, reference=fk
        )


# --- the entropy command ---------------------------------------------------------------------


def test_entropy_command_writes_outputs(tiny_llama, tmp_path):
    opts = opts_for("tiny-llama", n_prompts=2, out=str(tmp_path / "out"), png=False)
    metrics, summary, files = run_analysis("entropy", opts, model=tiny_llama, k=2, controls_k=1)
    names = {f.name for f in files}
    assert {"metrics.parquet", "samples.parquet", "summary.json", "run.json"} <= names
    for stem in ("entropy_first_k", "entropy_controls", "entropy_temperature"):
        assert f"{stem}.html" in names
    back = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert len(back) == len(metrics)
    assert set(back["part"]) == {"first-k", "controls", "temperature"}
    assert {"first-k", "controls", "temperature"} <= set(summary)
    # each part's summary equals the part module's summary of its own rows
    parts = entropy.split(metrics)
    assert summary["first-k"] == first_k.summarize(parts["first-k"])
    assert "controls entropy_t1 kind=zeros" in summary


def test_entropy_single_part_and_bad_part(tiny_llama):
    opts = opts_for("tiny-llama", n_prompts=1)
    m = entropy.run(tiny_llama, arithmetic_problems(1), opts, part="first-k", k=2)
    assert set(m["part"]) == {"first-k"}
    assert list(entropy.plot(m)) == ["entropy_first_k"]
    with pytest.raises(InputError, match="--part"):
        entropy.run(tiny_llama, arithmetic_problems(1), opts, part="nope")


def test_entropy_cli(tmp_path):
    from rsp_interp import cli

    cli._register_analyses()
    out = tmp_path / "cli"
    args = [
        "entropy", "--model", "tiny-gpt2", "--n-prompts", "1", "--samples", "2",
        "--rsp-length", "2", "--part", "temperature", "--k", "2", "--out", str(out),
        "--no-png", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    m = pd.read_parquet(out / "metrics.parquet")
    assert set(m["part"]) == {"temperature"}
    assert (out / "entropy_temperature.html").is_file()
    bad = CliRunner().invoke(cli.app, [*args[:-4], "--part", "bogus", "--out", str(out / "x")])
    assert bad.exit_code == 2 and "--part" in bad.output

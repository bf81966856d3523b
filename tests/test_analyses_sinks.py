"""Stage-1 analyses 4, 5, 7 (attention-sink, residual-norms, logit-lens) on tiny random models.

Every number is checked against a computation that does not go through the analysis: a plain
forward of the bridge or of the Hugging Face model with its own hooks/hidden states, the engine's
own step-0 distribution, or a synthetic metrics table whose answers follow from its construction.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from analyses import attention_sink, logit_lens, residual_norms
from rsp_interp import cli
from rsp_interp.captures import CaptureConfig
from rsp_interp.experiment import ROLE_NAMES
from rsp_interp.generation import SamplingConfig, generate
from rsp_interp.injection import Role, build_batch, tokenize_prompt
from rsp_interp.prompts import Problem, format_prompt
from rsp_interp.rsp import RSPSampler, derive_seed
from rsp_interp.runner import CommonOptions, run_analysis

PROBLEMS = [
    Problem("p0", "What is 2+3?", 5, "test"),
    Problem("p1", "Tom has 4 apples and eats 1. How many are left?", 3, "test"),
]


def opts_for(model, **kw) -> CommonOptions:
    base = dict(
        model=model.model_id,
        rsp_length=3,
        samples=2,
        max_new_tokens=3,
        progress=False,
        png=False,
        seed=7,
    )
    return CommonOptions(**{**base, **kw})


def injected(model, opts: CommonOptions, i: int, s: int, rsp: bool = True):
    """The batch the analyses build for prompt ``i``, draw ``s`` (same seed derivation)."""
    tp = tokenize_prompt(
        format_prompt(PROBLEMS[i].question, model.tokenizer, model.chat), model.tokenizer
    )
    cfg = opts.rsp()
    r = RSPSampler.for_model(model, cfg).draw_batch([derive_seed(cfg.seed, i, s)]) if rsp else None
    return tp, r, build_batch(model, [tp], r, cfg.position)


def bridge_forward(model, batch, hook_names):
    """Plain bridge forward storing the named activations."""
    store = {}

    def make(name):
        def hook(x, hook=None):
            store[name] = x.detach().clone()
            return x

        return hook

    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(n, make(n)) for n in hook_names]):
        logits = model.bridge(
            batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
    return logits, store


# --- attention sink ------------------------------------------------------------------------------


def synthetic_attention() -> pd.DataFrame:
    """2 prompts x 2 samples x 2 steps x 2 layers x 2 heads, rsp and none.

    Mean over steps (per head, identical for every run):
      L0H0: none bos 0.6 -> rsp bos 0.2, rsp 0.4   (the RSP steals a BOS sink)
      L0H1: none bos 0.5 -> rsp bos 0.5, rsp 0.35  (a second sink, paid by the prompt)
      L1H*: none bos 0.1 -> rsp bos 0.1, rsp 0.05  (no sink)
    Step 0 is the mean + 0.1 on BOS (and -0.1 on the prompt), step 1 the mean - 0.1.
    """
    heads = {
        (0, 0): {"none": (0.6, 0.0), "rsp": (0.2, 0.4)},
        (0, 1): {"none": (0.5, 0.0), "rsp": (0.5, 0.35)},
        (1, 0): {"none": (0.1, 0.0), "rsp": (0.1, 0.05)},
        (1, 1): {"none": (0.1, 0.0), "rsp": (0.1, 0.05)},
    }
    rows = []
    for cond in ("rsp", "none"):
        for pid in ("a", "b"):
            for sample in (0, 1):
                for (layer, head), masses in heads.items():
                    bos, rsp = masses[cond]
                    for step, delta in ((0, 0.1), (1, -0.1)):
                        vals = {
                            "rsp": rsp,
                            "bos": bos + delta,
                            "gen": 0.05,
                            "prompt": 1 - rsp - bos - delta - 0.05,
                        }
                        for g, v in vals.items():
                            rows.append((cond, pid, sample, 1, step, layer, head, f"attn_{g}", v))
                    if cond == "rsp":
                        rows.append((cond, pid, sample, 1, 0, -1, -1, "entropy", 1.0))
    df = pd.DataFrame(
        rows,
        columns=["condition", "prompt_id", "sample", "rsp_seed", "step", "layer", "head"]
        + ["metric", "value"],
    )
    return df


def test_sink_summary_on_a_constructed_table():
    s = attention_sink.summarize(synthetic_attention())
    rate = s["sink_rate"]
    assert rate["bos_without_rsp"]["mean"] == pytest.approx(2 / 4)
    assert rate["bos_with_rsp"]["mean"] == pytest.approx(1 / 4)
    assert rate["rsp_with_rsp"]["mean"] == pytest.approx(2 / 4)
    # step 0 only: BOS masses + 0.1 -> L0H1 with RSP at 0.6; L1 heads at 0.2 stay below 0.3
    assert s["sink_rate_step0"]["bos_with_rsp"]["mean"] == pytest.approx(2 / 4)
    assert s["bos_sink_rate_change"]["mean_diff"] == pytest.approx(-1 / 4)
    assert s["bos_mass_change"]["mean_diff"] == pytest.approx((0.2 - 0.6) / 4)
    share = s["rsp_mass_source_share"]
    rsp_mass = (0.4 + 0.35 + 0.05 + 0.05) / 4
    assert share["bos"]["mean"] == pytest.approx(0.4 / 4 / rsp_mass)
    assert share["gen"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert sum(v["mean"] for v in share.values()) == pytest.approx(1.0)
    assert s["head_counts"] == {
        "n_heads": 4,
        "bos_sinks_without_rsp": 2,
        "bos_sinks_with_rsp": 1,
        "rsp_sinks": 2,
        "bos_sinks_lost": 1,
        "bos_sinks_lost_to_rsp": 1,
        "rsp_sinks_in_non_bos_sink_heads": 0,
        "rsp_sinks_that_keep_bos_sink": 1,
    }
    sink = s["in_bos_sink_heads"]
    assert sink["bos_without_rsp"]["mean"] == pytest.approx(0.55)
    assert sink["bos_with_rsp"]["mean"] == pytest.approx(0.35)
    assert sink["rsp_with_rsp"]["mean"] == pytest.approx(0.375)
    assert list(s["rsp_mass_top_heads"])[:2] == ["L0H0", "L0H1"]
    assert s["verdict"].startswith("RSP adds a second sink")  # only 47% of its mass is BOS's
    # the threshold is a parameter: at 0.55 only L0H0 is a BOS sink without the RSP
    s2 = attention_sink.summarize(synthetic_attention(), threshold=0.55)
    assert s2["sink_rate"]["bos_without_rsp"]["mean"] == pytest.approx(1 / 4)
    assert s2["sink_rate"]["rsp_with_rsp"]["mean"] == pytest.approx(0.0)


def test_attention_sink_matches_direct_attention(tiny_llama, tmp_path):
    model = tiny_llama
    opts = opts_for(model, out=str(tmp_path))
    metrics, summary, files = run_analysis(
        "attention-sink", opts, model=model, problems=PROBLEMS, paired_baseline=False
    )
    names = {f.name for f in files}
    assert {"metrics.parquet", "summary.json", "run.json"} <= names
    assert {"attention_sink.html", "attention_sink_heads.html"} <= names
    # step-0 masses per head against the attention pattern of a plain forward
    step0 = attention_sink.head_masses(metrics, steps=[0]).set_index(
        ["condition", "prompt_id", "sample", "layer", "head"]
    )
    n = model.n_layers
    for cond in ("rsp", "none"):
        for i, p in enumerate(PROBLEMS):
            _, _, batch = injected(model, opts, i, 1, rsp=cond == "rsp")
            _, store = bridge_forward(
                model, batch, [f"blocks.{layer}.attn.hook_pattern" for layer in range(n)]
            )
            roles = batch.roles[0]
            for layer in range(n):
                last = store[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]  # [H, K]
                for head in range(model.n_heads):
                    row = step0.loc[(cond, p.id, 1, layer, head)]
                    bos = float(last[head][roles == int(Role.BOS)].sum())
                    rsp = float(last[head][roles == int(Role.RSP)].sum())
                    assert row["bos"] == pytest.approx(bos, abs=1e-5)
                    assert row["rsp"] == pytest.approx(rsp, abs=1e-5)
    # sink rate and BOS mass change recomputed with plain loops over the tidy metrics
    thr = attention_sink.SINK_THRESHOLD
    att = metrics[metrics["metric"].isin(["attn_bos", "attn_rsp"])]
    per_prompt = {}
    for (cond, pid), g in att.groupby(["condition", "prompt_id"], observed=True):
        rates = []
        for _, run in g.groupby("sample"):
            bos = run[run["metric"] == "attn_bos"].groupby(["layer", "head"])["value"].mean()
            rates.append(float((bos.to_numpy() > thr).mean()))
        per_prompt[(cond, pid)] = np.mean(rates)
    for cond, key in (("none", "bos_without_rsp"), ("rsp", "bos_with_rsp")):
        expected = np.mean([per_prompt[(cond, p.id)] for p in PROBLEMS])
        assert summary["sink_rate"][key]["mean"] == pytest.approx(expected)
    shares = summary["rsp_mass_source_share"]
    assert sum(v["mean"] for v in shares.values()) == pytest.approx(1.0, abs=1e-5)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["sink_threshold"] == thr and saved["n_prompts"] == 2 and saved["n_draws"] == 2


# --- residual norms and massive activations ------------------------------------------------------


@pytest.fixture(scope="module")
def resid_run(tiny_gpt2):
    opts = opts_for(tiny_gpt2, samples=1, max_new_tokens=3, temperature=0.0)
    res = residual_norms.experiment(tiny_gpt2, PROBLEMS, opts, n_top=2)
    return tiny_gpt2, opts, res


def test_residual_records_match_a_plain_forward(resid_run):
    model, opts, res = resid_run
    m = res.metrics
    n = model.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [
        f"blocks.{n - 1}.hook_resid_post"
    ]
    for cond in ("rsp", "none"):
        for i, p in enumerate(PROBLEMS):
            tp, r, batch = injected(model, opts, i, 0, rsp=cond == "rsp")
            # the generated tokens processed at steps 1..: append them and recompute in full
            sample = res.samples.query("condition == @cond and prompt_id == @p.id").iloc[0]
            gen = torch.tensor(sample["token_ids"][:-1])[None]
            embeds = torch.cat([batch.inputs_embeds, model.embed(gen)], dim=1)
            t0, t = batch.length, embeds.shape[1]
            full = type(batch)(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, t, dtype=torch.long),
                position_ids=torch.arange(t)[None],
                roles=batch.roles,
                token_ids=batch.token_ids,
            )
            _, store = bridge_forward(model, full, names)
            rows = m[(m["condition"] == cond) & (m["prompt_id"] == p.id)]
            x = torch.stack([store[k][0] for k in names])  # [L+1, T, d]
            a = x.abs()
            top = a.topk(2, dim=-1)
            expected = {
                ("resid_norm", -1): x.norm(dim=-1),
                ("median_abs", -1): a.median(dim=-1).values,
                ("top_abs", 0): top.values[..., 0],
                ("top_abs", 1): top.values[..., 1],
            }
            for (metric, rank), want in expected.items():
                sel = rows[(rows["metric"] == metric) & (rows["rank"] == rank)]
                got = sel.pivot(index="layer", columns="position", values="value")
                assert got.shape == (n + 1, t)
                np.testing.assert_allclose(got.to_numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
                if metric == "top_abs":
                    dims = sel.pivot(index="layer", columns="position", values="dim")
                    assert (dims.to_numpy() == top.indices[..., rank].numpy()).all()
            # the median |x| over the whole prefill (all positions and dims), per layer
            seq = rows[rows["metric"] == "seq_median_abs"].sort_values("layer")["value"]
            want = a[:, :t0].reshape(n + 1, -1).median(dim=-1).values
            np.testing.assert_allclose(seq.to_numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
            # roles and steps per position
            roles = batch.roles[0].tolist() + [int(Role.GEN)] * gen.shape[1]
            cells = rows[rows["metric"] == "resid_norm"].drop_duplicates("position")
            cells = cells.sort_values("position")
            assert cells["role"].astype(str).tolist() == [ROLE_NAMES[r] for r in roles]
            steps = [pos - t0 + 1 if pos >= t0 else -1 for pos in range(t)]
            assert cells["step"].tolist() == steps


def test_residual_summary_against_direct_values(resid_run):
    model, opts, res = resid_run
    s = residual_norms.summarize(res.metrics)
    assert s["n_prompts"] == 2 and s["n_draws"] == 1
    pp = residual_norms.per_position(res.metrics)
    rsp = pp[pp["condition"] == "rsp"]
    # peak |activation| of the RSP positions relative to BOS, per prompt, then the mean
    ratios, bos_peaks = [], []
    for i, _ in enumerate(PROBLEMS):
        _, _, batch = injected(model, opts, i, 0)
        n = model.n_layers
        names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [
            f"blocks.{n - 1}.hook_resid_post"
        ]
        _, store = bridge_forward(model, batch, names)
        x = torch.stack([store[k][0] for k in names]).abs()  # [L+1, T, d]
        roles = batch.roles[0]
        bos_peaks.append(float(x[:, roles == int(Role.BOS)].max()))
        ratios.append(float(x[:, roles == int(Role.RSP)].max()) / bos_peaks[-1])
    assert s["rsp_to_bos_peak_ratio"]["mean"] == pytest.approx(np.mean(ratios), rel=1e-4)
    # norms by layer: the mean over RSP positions of the RSP runs
    expected = rsp[rsp["role"] == "rsp"].groupby("layer")["norm"].mean().tolist()
    assert s["resid_norm_by_layer"]["rsp"] == pytest.approx(expected)
    # BOS and prompt precede the RSP (position "end"), so their no-RSP copies are not repeated
    assert "bos (no RSP)" not in s["resid_norm_mean"] and "gen (no RSP)" in s["resid_norm_mean"]
    # a random tiny model has no massive activations
    assert s["massive_position_share"]["bos"]["mean"] == 0.0
    assert s["massive_layers"]["bos"] == [] and s["massive_dims"]["bos"] == {}
    assert residual_norms.is_massive([150.0, 150.0, 50.0], [2000.0, 10.0, 5000.0]).tolist() == [
        True,
        False,
        False,
    ]
    # plant one: BOS's largest activation at layer 1 becomes 1e4 in dim 5 (every RSP run)
    m = res.metrics.copy()
    plant = (
        (m["condition"] == "rsp")
        & (m["role"] == "bos")
        & (m["layer"] == 1)
        & (m["metric"] == "top_abs")
        & (m["rank"] == 0)
    )
    assert plant.sum() == len(PROBLEMS)
    m.loc[plant, "value"], m.loc[plant, "dim"] = 1e4, 5
    s2 = residual_norms.summarize(m)
    assert s2["massive_position_share"]["bos"]["mean"] == 1.0
    assert s2["massive_position_share"]["rsp"]["mean"] == 0.0
    assert s2["massive_layers"]["bos"] == [1] and s2["massive_dims"]["bos"] == {"5": 1.0}
    assert s2["top_abs_max"]["bos"]["mean"] == 1e4
    assert s2["rsp_to_bos_peak_ratio"]["mean"] == pytest.approx(
        np.mean([r * b / 1e4 for r, b in zip(ratios, bos_peaks, strict=True)]), rel=1e-4
    )
    same = rsp[(rsp["role"] == "rsp") & (rsp["layer"] == 1)]
    same = (same["top1_dim"] == 5).groupby(same["prompt_id"]).mean().mean()
    assert s2["top1_dim_same_as_bos_massive"]["rsp"]["mean"] == pytest.approx(same)
    fig = residual_norms.plot(res.metrics)
    assert {t.name for t in fig.data if t.showlegend} >= {"bos", "prompt", "rsp", "gen"}


# --- logit lens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_logit_lens_final_layer_is_the_models_step0_distribution(name, tiny_llama, tiny_gpt2):
    model = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[name]
    opts = opts_for(model)
    m = logit_lens.run(model, PROBLEMS, opts, draws=2)
    last = m[m["layer"] == model.n_layers]
    cfg = opts.rsp()
    for cond in ("rsp", "none"):
        for i, p in enumerate(PROBLEMS):
            tp, r, _ = injected(model, opts, i, 1, rsp=cond == "rsp")
            out = generate(
                model,
                [tp],
                r,
                cfg.position,
                SamplingConfig(max_new_tokens=1, greedy=True),
                CaptureConfig(attention=False, residual=False, prefill=False, first_k=1),
            )
            sample = 1 if cond == "rsp" else 0
            row = last[(last["condition"] == cond) & (last["prompt_id"] == p.id)]
            row = row[row["sample"] == sample].set_index("metric")["value"]
            assert row["entropy"] == pytest.approx(float(out.entropy[0, 0]), abs=1e-5)
            assert row["top1_prob"] == pytest.approx(
                float(out.step_scores["top1_prob"][0, 0]), abs=1e-6
            )
            assert row["kl_to_final"] == pytest.approx(0.0, abs=1e-6)
    err = m.loc[m["metric"] == "lens_final_error", "value"]
    assert len(err) == 2 * 2 + 2 and err.max() < 1e-4


def test_logit_lens_layers_match_hf_hidden_states(tiny_llama):
    model = tiny_llama
    opts = opts_for(model)
    m = logit_lens.run(model, PROBLEMS[:1], opts, draws=1)
    hf = model.hf_model
    lps = {}
    for cond in ("rsp", "none"):
        _, _, batch = injected(model, opts, 0, 0, rsp=cond == "rsp")
        with torch.no_grad():
            out = hf(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                output_hidden_states=True,
            )
            # HF's hidden_states[l] is the stream entering layer l (l < n_layers)
            h = torch.stack(out.hidden_states[: model.n_layers])[:, 0, -1]
            lps[cond] = hf.get_output_embeddings()(hf.model.norm(h)).log_softmax(-1)
    for cond, lp in lps.items():
        p = lp.exp()
        ent = -(p * lp).sum(-1)
        got = m[(m["condition"] == cond) & (m["metric"] == "entropy")].sort_values("layer")
        assert got["value"].to_numpy()[: model.n_layers] == pytest.approx(ent.numpy(), abs=1e-5)
    kl = (lps["rsp"].exp() * (lps["rsp"] - lps["none"])).sum(-1)
    got = m[m["metric"] == "kl_to_none"].sort_values("layer")["value"].to_numpy()
    assert got[: model.n_layers] == pytest.approx(kl.numpy(), abs=1e-5)


def test_flattening_layer():
    diff = pd.DataFrame({"layer": [0, 1, 2, 3], "diff_ci_low": [0.1, -0.2, 0.3, 0.5]})
    assert logit_lens.flattening_layer(diff) == 2
    assert logit_lens.flattening_layer(diff.assign(diff_ci_low=[0.1, 0.2, 0.3, 0.5])) == 0
    assert logit_lens.flattening_layer(diff.assign(diff_ci_low=[0.1, 0.2, 0.3, -0.1])) is None


# --- command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "figures", "extra"),
    [
        ("residual-norms", ["residual_norms"], ["--n-top", "2"]),
        ("logit-lens", ["logit_lens"], ["--draws", "2"]),
    ],
)
def test_cli_writes_outputs(command, figures, extra, tmp_path):
    cli._register_analyses()  # idempotent
    out = tmp_path / command
    args = [command, "--model", "tiny-llama", "--n-prompts", "2", "--samples", "1"]
    args += ["--max-new-tokens", "2", "--rsp-length", "2", "--no-png", "--no-progress"]
    res = CliRunner().invoke(cli.app, [*args, "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    for f in ["metrics.parquet", "summary.json", "run.json", *[f"{s}.html" for s in figures]]:
        assert (out / f).is_file(), f
    run = json.loads((out / "run.json").read_text())
    expected = {"n_top": 2} if command == "residual-norms" else {"draws": 2}
    assert run["config"]["analysis_kwargs"] == expected
    assert pd.read_parquet(out / "metrics.parquet")["condition"].nunique() == 2


def test_bad_options_give_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="--draws"):
        logit_lens.run(tiny_llama, PROBLEMS, opts_for(tiny_llama), draws=0)
    with pytest.raises(ValueError, match="--n-top"):
        residual_norms.run(tiny_llama, PROBLEMS, opts_for(tiny_llama), n_top=0)

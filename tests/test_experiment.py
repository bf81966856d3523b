"""Tests for rsp_interp.experiment: tidy results, seeds, pairing, stopping, input checks.

The engine's outputs are recorded by wrapping ``generate``; the tidy frames are checked against
them element by element, with indices computed here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rsp_interp import experiment as experiment_mod
from rsp_interp.captures import ATTN_GROUPS, CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.experiment import METRIC_COLUMNS, Condition, run_experiment
from rsp_interp.generation import Intervention, SamplingConfig
from rsp_interp.injection import Role
from rsp_interp.prompts import arithmetic_problems
from rsp_interp.rsp import RSPConfig, RSPSampler, derive_seed

N_STEPS, FIRST_K = 4, 2
SAMPLING = SamplingConfig(max_new_tokens=N_STEPS, stop_at_eos=False)
CAPTURE = CaptureConfig(first_k=FIRST_K, paired_baseline=True)
RSP = RSPConfig(length=4, position="start", seed=5)
PROBLEMS = arithmetic_problems(3, seed=0, steps=1)


class ForceToken(Intervention):
    """Make ``token`` the argmax of batch row ``row`` at step ``step``."""

    def __init__(self, row: int, step: int, token: int):
        self.row, self.step, self.token = row, step, token

    def hooks(self, state, model):
        def hook(logits, hook=None):
            if state.phase == "baseline" or state.step != self.step:
                return logits
            logits = logits.clone()
            logits[self.row, -1, self.token] = logits[self.row, -1].max() + 30.0
            return logits

        return [("unembed.hook_out", hook)]


@pytest.fixture
def recorded(monkeypatch):
    """Wrap the engine inside run_experiment; returns the list of (kwargs, output) per batch."""
    calls = []
    real = experiment_mod.generate

    def spy(model, prompts, rsps, **kw):
        out = real(model, prompts, rsps, **kw)
        calls.append((kw, out))
        return out

    monkeypatch.setattr(experiment_mod, "generate", spy)
    return calls


def run(model, conditions=None, **kw):
    args = dict(
        n_samples=2, sampling=SAMPLING, capture=CAPTURE, seed=3, batch_size=4, progress=False
    )
    args.update(kw)
    conditions = conditions or [Condition("rsp", RSP), Condition("none", None)]
    return run_experiment(model, PROBLEMS, conditions, **args)


def cells():
    """(prompt index, sample) in the order run_experiment batches them."""
    return [(i, s) for i in range(len(PROBLEMS)) for s in range(2)]


# --- format ----------------------------------------------------------------------------------


def test_metrics_format_and_counts(tiny_llama, recorded):
    m = tiny_llama
    res = run(m)
    df = res.metrics
    assert list(df.columns) == METRIC_COLUMNS
    assert df["value"].notna().all() and np.isfinite(df["value"]).all()
    assert str(df["step"].dtype) == "int16" and str(df["rsp_seed"].dtype) == "int64"
    n_rows, n_l, n_h = len(cells()), m.n_layers, m.n_heads
    counts = df.groupby(["condition", "metric"], observed=True).size().to_dict()
    expected = {}
    for cond in ("rsp", "none"):
        expected[(cond, "entropy")] = n_rows * N_STEPS
        expected[(cond, "chosen_logprob")] = n_rows * N_STEPS
        for name in ("top1_prob", "sampling_entropy"):
            expected[(cond, name)] = n_rows * FIRST_K
        for g in ATTN_GROUPS:
            expected[(cond, f"attn_{g}")] = n_rows * N_STEPS * n_l * n_h
        expected[(cond, "resid_norm_current")] = n_rows * N_STEPS * (n_l + 1)
        for role in ("bos", "prompt"):
            expected[(cond, f"prefill_resid_norm_{role}")] = n_rows * (n_l + 1)
    # RSP-only metrics: KL to the paired no-RSP stream, RSP residuals, prompt->RSP attention
    expected[("rsp", "kl_to_baseline")] = n_rows * FIRST_K
    expected[("rsp", "prefill_resid_norm_rsp")] = n_rows * (n_l + 1)
    expected[("rsp", "prefill_attn_prompt_to_rsp")] = n_rows * n_l * n_h
    assert counts == expected
    # -1 means "not applicable"
    per_step = df[df["metric"].isin(["entropy", "top1_prob"])]
    assert (per_step["layer"] == -1).all() and (per_step["head"] == -1).all()
    pre = df[df["metric"].astype(str).str.startswith("prefill_resid")]
    assert (pre["step"] == -1).all() and (pre["head"] == -1).all()
    assert len(recorded) == 4  # 6 cells in batches of 4, for each condition


def test_metric_values_equal_engine_outputs(tiny_llama, recorded):
    res = run(tiny_llama)
    df = res.metrics.set_index(
        ["condition", "prompt_id", "sample", "metric", "step", "layer", "head"]
    )["value"]
    assert df.index.is_unique
    batches = [cells()[:4], cells()[4:]] * 2
    conds = ["rsp"] * 2 + ["none"] * 2
    for (_, out), chunk, cond in zip(recorded, batches, conds, strict=True):
        roles = out.batch.roles.numpy()
        for b, (i, s) in enumerate(chunk):
            key = (cond, PROBLEMS[i].id, s)
            for t in range(N_STEPS):
                assert df[(*key, "entropy", t, -1, -1)] == pytest.approx(float(out.entropy[b, t]))
                assert df[(*key, "chosen_logprob", t, -1, -1)] == pytest.approx(
                    float(out.chosen_logprob[b, t])
                )
                for layer in range(tiny_llama.n_layers + 1):
                    assert df[(*key, "resid_norm_current", t, layer, -1)] == pytest.approx(
                        float(out.resid[t, layer, b])
                    )
                for layer in range(tiny_llama.n_layers):
                    for h in range(tiny_llama.n_heads):
                        for g, group in enumerate(ATTN_GROUPS):
                            assert df[(*key, f"attn_{group}", t, layer, h)] == pytest.approx(
                                float(out.attn[t, layer, b, h, g])
                            )
            for t in range(FIRST_K):
                assert df[(*key, "top1_prob", t, -1, -1)] == pytest.approx(
                    float(out.step_scores["top1_prob"][b, t])
                )
            for role in (Role.BOS, Role.PROMPT) + ((Role.RSP,) if cond == "rsp" else ()):
                sel = roles[b] == int(role)
                for layer in range(tiny_llama.n_layers + 1):
                    mean = float(out.prefill_resid[layer, b].numpy()[sel].mean())
                    name = f"prefill_resid_norm_{role.name.lower()}"
                    assert df[(*key, name, -1, layer, -1)] == pytest.approx(mean, rel=1e-6)


def test_samples_and_prefill_frames(tiny_llama, recorded):
    res = run(tiny_llama)
    samples, prefill = res.samples, res.prefill
    assert len(samples) == 2 * len(cells())
    outs = [out for _, out in recorded]
    tokens = torch.cat([o.tokens for o in outs[:2]] + [o.tokens for o in outs[2:]])
    assert samples["token_ids"].map(list).tolist() == tokens.tolist()  # no stops: all kept
    assert samples["n_tokens"].tolist() == [N_STEPS] * len(samples)
    assert samples["text"].tolist() == [t for o in outs for t in o.texts]
    assert samples["gold"].tolist() == [PROBLEMS[i].answer for i, _ in cells()] * 2
    assert samples["correct"].dtype == bool
    # prefill: one row per real position and layer, value = the captured norm
    out = outs[0]
    first = prefill[
        (prefill["condition"] == "rsp")
        & (prefill["prompt_id"] == PROBLEMS[0].id)
        & (prefill["sample"] == 0)
    ]
    real = out.batch.attention_mask[0].bool()
    assert len(first) == int(real.sum()) * (tiny_llama.n_layers + 1)
    layer0 = first[first["layer"] == 0].sort_values("position")
    assert layer0["position"].tolist() == list(range(int(real.sum())))
    np.testing.assert_allclose(layer0["value"], out.prefill_resid[0, 0][real].numpy(), rtol=1e-6)
    assert layer0["role"].astype(str).tolist() == [
        Role(int(r)).name.lower() for r in out.batch.roles[0][real]
    ]


# --- seeds and pairing ---------------------------------------------------------------------------


def test_run_experiment_is_deterministic(tiny_model):
    a, b = run(tiny_model), run(tiny_model)
    pd.testing.assert_frame_equal(a.metrics, b.metrics)
    pd.testing.assert_frame_equal(a.samples, b.samples)
    pd.testing.assert_frame_equal(a.prefill, b.prefill)
    c = run(tiny_model, seed=4)  # another sampling seed changes the tokens
    assert a.samples["token_ids"].map(list).tolist() != c.samples["token_ids"].map(list).tolist()


def test_rsp_seed_redraws_the_injected_rsp(tiny_llama, recorded):
    res = run(tiny_llama)
    sampler = RSPSampler.for_model(tiny_llama, RSP)
    samples = res.samples
    rsp_rows = samples[samples["condition"] == "rsp"].reset_index(drop=True)
    injected = []
    for _, out in recorded[:2]:
        for b in range(out.batch.n_rows):
            mask = out.batch.roles[b] == int(Role.RSP)
            injected.append(out.batch.inputs_embeds[b][mask])
    assert len(injected) == len(rsp_rows)
    for row, vecs in zip(rsp_rows.itertuples(), injected, strict=True):
        i = [p.id for p in PROBLEMS].index(row.prompt_id)
        assert row.rsp_seed == derive_seed(RSP.seed, i, row.sample)
        assert torch.equal(sampler.draw(row.rsp_seed), vecs)
    assert len(set(rsp_rows["rsp_seed"])) == len(rsp_rows)  # a fresh RSP per (prompt, sample)
    assert (samples.loc[samples["condition"] == "none", "rsp_seed"] == -1).all()
    metric_seeds = res.metrics.groupby(["condition", "prompt_id", "sample"], observed=True)[
        "rsp_seed"
    ].unique()
    assert all(len(v) == 1 for v in metric_seeds)


def test_sampling_seeds_are_shared_across_conditions(tiny_llama):
    res = run(tiny_llama)
    s = res.samples.pivot(index=["prompt_id", "sample"], columns="condition", values="sample_seed")
    assert (s["rsp"] == s["none"]).all()
    assert s["rsp"].nunique() == len(s)
    # identical conditions under two names give identical results (common random numbers)
    twin = run(tiny_llama, conditions=[Condition("a", RSP), Condition("b", RSP)]).metrics
    a = twin[twin["condition"] == "a"].drop(columns="condition").reset_index(drop=True)
    b = twin[twin["condition"] == "b"].drop(columns="condition").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_batch_size_does_not_change_results(tiny_llama):
    """Greedy decoding: tokens are identical whatever the batching; metrics agree to 1e-4."""
    sampling = SamplingConfig(max_new_tokens=N_STEPS, greedy=True, stop_at_eos=False)
    a = run(tiny_llama, batch_size=6, sampling=sampling)
    b = run(tiny_llama, batch_size=1, sampling=sampling)
    pd.testing.assert_series_equal(
        a.samples["token_ids"].map(tuple), b.samples["token_ids"].map(tuple)
    )
    keys = ["condition", "prompt_id", "sample", "metric", "step", "layer", "head"]
    pd.testing.assert_frame_equal(
        a.metrics.sort_values(keys).reset_index(drop=True),
        b.metrics.sort_values(keys).reset_index(drop=True),
        atol=1e-4,
        rtol=0,
    )


# --- stopping ------------------------------------------------------------------------------------


def test_no_metric_rows_past_a_rows_stop(tiny_llama):
    eos = tiny_llama.tokenizer.eos_token_id
    sampling = SamplingConfig(max_new_tokens=N_STEPS, greedy=True)
    cond = Condition("rsp", RSP, interventions=(ForceToken(row=0, step=1, token=eos),))
    res = run(tiny_llama, conditions=[cond], sampling=sampling)
    n_tok = res.samples.set_index(["prompt_id", "sample"])["n_tokens"]
    stopped = n_tok[n_tok < N_STEPS]
    # row 0 of each batch (cells 0 and 4) stops after 2 tokens; the others run to the end
    assert sorted(stopped.index) == [(PROBLEMS[0].id, 0), (PROBLEMS[2].id, 0)]
    assert (stopped == 2).all()
    df = res.metrics
    stepwise = df[df["step"] >= 0]
    last = stepwise.groupby(["prompt_id", "sample"], observed=True)["step"].max()
    assert (last + 1).sort_index().equals(n_tok.sort_index().astype(last.dtype))
    attn = df[df["metric"] == "attn_rsp"].groupby(["prompt_id", "sample"], observed=True).size()
    per_step = tiny_llama.n_layers * tiny_llama.n_heads
    assert (attn.sort_index() == n_tok.sort_index() * per_step).all()
    assert cond.describe()["interventions"] == [{"type": "ForceToken"}]


# --- input checks ------------------------------------------------------------------------------


def test_bad_inputs_are_input_errors(tiny_llama):
    with pytest.raises(InputError, match="No prompts"):
        run_experiment(tiny_llama, [], [Condition("none")], progress=False)
    with pytest.raises(InputError, match="n_samples"):
        run(tiny_llama, n_samples=0)
    with pytest.raises(InputError, match="unique"):
        run(tiny_llama, conditions=[Condition("x"), Condition("x", RSP)])


def test_nan_rsp_tensor_is_an_input_error(tiny_llama):
    bad = torch.zeros(3, tiny_llama.d_model)
    bad[1, 2] = float("nan")
    cond = Condition("trained", RSPConfig(kind="tensor", length=3), rsp_tensor=bad)
    with pytest.raises(InputError, match="NaN"):
        run(tiny_llama, conditions=[cond])
    good = torch.randn(3, tiny_llama.d_model) * 0.1
    ok = run(
        tiny_llama,
        conditions=[Condition("trained", RSPConfig(kind="tensor", length=3), rsp_tensor=good)],
        n_samples=1,
    )
    assert set(ok.metrics["condition"]) == {"trained"}

"""Tests for rsp_interp.generation: KV-cached sampling against full recomputation.

Every reference here is computed without the engine: a plain forward of the bridge (no cache,
no hooks) over the prompt + RSP embeddings + the embeddings of the tokens generated so far.
"""

from __future__ import annotations

import math

import pytest
import torch

from rsp_interp.captures import CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.generation import (
    Intervention,
    SamplingConfig,
    filter_logits,
    generate,
    stop_token_ids,
)
from rsp_interp.injection import Role, tokenize_prompt
from rsp_interp.prompts import arithmetic_problems, format_prompt
from rsp_interp.rsp import RSPConfig, RSPSampler

TOL = 1e-4  # log-probs / entropies of cached vs recomputed forwards (float32 noise is ~1e-6)


# --- helpers -------------------------------------------------------------------------------------


def mixed_prompts(model, n: int) -> list:
    """``n`` tokenized arithmetic prompts of different lengths (so batches get left padding)."""
    problems = [arithmetic_problems(1, seed=i, steps=1 + i % 3)[0] for i in range(n)]
    tok = model.tokenizer
    return [tokenize_prompt(format_prompt(p.question, tok, chat=model.chat), tok) for p in problems]


def draw_rsps(model, n: int, length: int = 4, seed: int = 0) -> torch.Tensor:
    sampler = RSPSampler.for_model(model, RSPConfig(length=length))
    return sampler.draw_batch([seed + i for i in range(n)])


def forward_logprobs(model, embeds, mask=None, pos=None, hooks=()) -> torch.Tensor:
    """Plain bridge forward (no KV cache) -> float32 log-probs ``[B, T, V]``."""
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if pos is None:
        pos = torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=list(hooks)):
        logits = model.bridge(embeds, attention_mask=mask, position_ids=pos)
    return logits.float().log_softmax(-1)


def extended(model, out, n_tokens: int):
    """The engine's batch (same mask / position ids) followed by its first ``n_tokens`` tokens."""
    b = out.batch
    gen = out.tokens[:, :n_tokens].clamp(min=0)
    embeds = torch.cat([b.inputs_embeds, model.embed(gen)], dim=1)
    mask = torch.cat([b.attention_mask, torch.ones_like(gen)], dim=1)
    pos = torch.cat([b.position_ids, b.position_ids[:, -1:] + 1 + torch.arange(n_tokens)], dim=1)
    return embeds, mask, pos


def row_inputs(model, tp, rsp, position: str, gen_tokens) -> torch.Tensor:
    """One row, built by hand without padding: prompt ids with ``rsp`` spliced in, then tokens."""
    ids = list(tp.ids)
    cut = {"end": len(ids), "before-assistant": tp.header_start, "start": 1}[position]
    parts = [model.embed(torch.tensor(ids[:cut]))]
    if rsp is not None:
        parts.append(rsp.to(parts[0].dtype))
    parts.append(model.embed(torch.tensor(ids[cut:], dtype=torch.long)))
    parts.append(model.embed(torch.tensor(list(gen_tokens), dtype=torch.long)))
    return torch.cat(parts)[None]


def ref_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    lp = logprobs.double()
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)


def ref_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Reference sampling distribution of one row: temperature, then top-k, then the minimal
    nucleus whose (renormalised) mass reaches top_p. Returns float64 log-probs."""
    x = logits.double() / temperature
    order = torch.argsort(x, descending=True)
    k = top_k if top_k else len(x)
    probs = torch.softmax(x[order[:k]], -1)
    cum = torch.cumsum(probs, 0)
    n = min(int((cum < top_p).sum()) + 1, k) if top_p < 1 else k
    keep = torch.zeros(len(x), dtype=torch.bool)
    keep[order[:n]] = True
    return x.masked_fill(~keep, float("-inf")).log_softmax(-1)


# --- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, flag):
    with pytest.raises(InputError, match=flag):
        SamplingConfig(**kwargs)


# --- parity: cached generation == full recompute -------------------------------------------------


def check_parity(model, out, sampling: SamplingConfig, per_step: bool = True) -> None:
    """Step t of ``out`` vs a no-cache forward over the batch + the first t generated tokens.

    ``per_step=False`` does one forward over the final sequence instead and reads every step's
    query from it (the same numbers by causality; cheaper on the real model)."""
    n_steps = out.tokens.shape[1]
    if not per_step:
        full = forward_logprobs(model, *extended(model, out, n_steps - 1))
        t0 = out.batch.length
    for t in range(n_steps):
        if per_step:
            lp = forward_logprobs(model, *extended(model, out, t))[:, -1]
        else:
            lp = full[:, t0 - 1 + t]
        chosen = out.tokens[:, t]
        assert (chosen >= 0).all()
        ref_chosen = lp.gather(-1, chosen[:, None]).squeeze(-1)
        torch.testing.assert_close(out.chosen_logprob[:, t], ref_chosen, atol=TOL, rtol=0)
        torch.testing.assert_close(
            out.entropy[:, t].double(), ref_entropy(lp), atol=TOL, rtol=0, check_dtype=False
        )
        if sampling.is_greedy:
            assert torch.equal(chosen, lp.argmax(-1)), f"greedy token differs at step {t}"


# The three forward paths of the engine: lean with the fused attention (no capture), lean with
# the pattern-returning attention (captures), and the bridge (interventions). Each must keep a
# correct KV cache; the bridge path is the one transformers 5.24/5.25 broke.
ENGINE_PATHS = {
    "lean-fused": ("auto", CaptureConfig.off(), "lean"),
    "lean-capture": ("auto", CaptureConfig(), "lean"),
    "bridge": ("bridge", CaptureConfig.off(), "bridge"),
}


@pytest.mark.parametrize("path", list(ENGINE_PATHS))
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("position", ["end", "before-assistant", "start"])
def test_cached_generation_equals_full_recompute_tiny(tiny_model, greedy, position, path):
    engine, capture, used = ENGINE_PATHS[path]
    prompts = mixed_prompts(tiny_model, 3)
    assert len({len(p.ids) for p in prompts}) == 3, "want left padding in the batch"
    sampling = SamplingConfig(max_new_tokens=6, greedy=greedy, stop_at_eos=False)
    out = generate(
        tiny_model,
        prompts,
        draw_rsps(tiny_model, 3),
        position=position,
        sampling=sampling,
        capture=capture,
        sample_seeds=[11, 12, 13],
        engine=engine,
    )
    assert out.extra["engine"] == used
    assert out.tokens.shape == (3, 6) and (out.n_generated == 6).all()
    check_parity(tiny_model, out, sampling)


def test_cached_generation_without_rsp_equals_full_recompute(tiny_llama):
    sampling = SamplingConfig(max_new_tokens=5, stop_at_eos=False)
    out = generate(
        tiny_llama, mixed_prompts(tiny_llama, 2), None, sampling=sampling, sample_seeds=[1, 2]
    )
    assert (out.batch.roles != int(Role.RSP)).all()
    check_parity(tiny_llama, out, sampling)


@pytest.mark.real
@pytest.mark.parametrize("path", list(ENGINE_PATHS))
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_cached_generation_equals_full_recompute_real(smollm, greedy, path):
    engine, capture, used = ENGINE_PATHS[path]
    sampling = SamplingConfig(max_new_tokens=4, greedy=greedy, stop_at_eos=False)
    out = generate(
        smollm,
        mixed_prompts(smollm, 2),
        draw_rsps(smollm, 2, length=5),
        sampling=sampling,
        capture=capture,
        sample_seeds=[3, 4],
        engine=engine,
    )
    assert out.extra["engine"] == used
    check_parity(smollm, out, sampling, per_step=False)


# --- step scores --------------------------------------------------------------------------------


def test_step_scores_equal_direct_computation(tiny_model):
    """Every score, per row, from a hand-built unpadded forward; KL against a no-RSP forward
    teacher-forced on the RSP run's tokens."""
    n_steps, position = 5, "before-assistant"
    sampling = SamplingConfig(
        max_new_tokens=n_steps, temperature=0.7, top_k=40, top_p=0.8, stop_at_eos=False
    )
    capture = CaptureConfig(
        first_k=n_steps,
        step_scores=(
            "entropy",
            "sampling_entropy",
            "top1_prob",
            "chosen_logprob",
            "kl_to_baseline",
        ),
        paired_baseline=True,
    )
    prompts, rsps = mixed_prompts(tiny_model, 3), draw_rsps(tiny_model, 3)
    out = generate(tiny_model, prompts, rsps, position, sampling, capture, sample_seeds=[5, 6, 7])
    for b, tp in enumerate(prompts):
        toks = out.tokens[b].tolist()
        n0 = len(tp.ids) + rsps.shape[1]
        lp = forward_logprobs(tiny_model, row_inputs(tiny_model, tp, rsps[b], position, toks))
        lp = lp[0, n0 - 1 : n0 - 1 + n_steps]  # the query that predicts token t
        base = forward_logprobs(tiny_model, row_inputs(tiny_model, tp, None, position, toks))
        base = base[0, len(tp.ids) - 1 : len(tp.ids) - 1 + n_steps]
        logits = lp  # log-probs are logits up to a constant: the filter is shift-invariant
        p = lp.double().exp()
        expected = {
            "entropy": ref_entropy(lp),
            "top1_prob": p.max(-1).values,
            "chosen_logprob": lp.double().gather(-1, torch.tensor(toks)[:, None]).squeeze(-1),
            "kl_to_baseline": (p * (lp.double() - base.double())).sum(-1),
            "sampling_entropy": torch.stack(
                [ref_entropy(ref_filter(logits[t], 0.7, 40, 0.8).float()) for t in range(n_steps)]
            ),
        }
        for name, ref in expected.items():
            torch.testing.assert_close(
                out.step_scores[name][b].double(), ref, atol=TOL, rtol=0, msg=name
            )
        torch.testing.assert_close(out.entropy[b].double(), expected["entropy"], atol=TOL, rtol=0)
        # the sampled token is always inside the filtered support
        for t in range(n_steps):
            assert torch.isfinite(ref_filter(logits[t], 0.7, 40, 0.8)[toks[t]])
    assert (out.step_scores["kl_to_baseline"] > 0).all()  # the RSP moved the distribution


def test_kl_is_nan_without_paired_baseline(tiny_llama):
    capture = CaptureConfig(first_k=2, step_scores=("kl_to_baseline",), paired_baseline=False)
    out = generate(
        tiny_llama,
        mixed_prompts(tiny_llama, 2),
        draw_rsps(tiny_llama, 2),
        sampling=SamplingConfig(max_new_tokens=3, greedy=True),
        capture=capture,
    )
    assert out.step_scores["kl_to_baseline"].shape == (2, 2)
    assert out.step_scores["kl_to_baseline"].isnan().all()


def test_unknown_step_score_is_an_input_error(tiny_llama):
    with pytest.raises(InputError, match="registered are"):
        generate(
            tiny_llama,
            mixed_prompts(tiny_llama, 1),
            None,
            sampling=SamplingConfig(max_new_tokens=1, greedy=True),
            capture=CaptureConfig(step_scores=("bogus",)),
        )


# --- filter_logits -------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 7, 50])
def test_top_k_keeps_exactly_the_k_largest(top_k):
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(top_k))
    x = filter_logits(logits, SamplingConfig(top_k=top_k))
    finite = torch.isfinite(x)
    assert (finite.sum(-1) == top_k).all()
    expected = torch.zeros_like(finite)
    expected.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
    assert torch.equal(finite, expected)
    assert torch.equal(x[finite], logits[finite])  # temperature 1: values untouched


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.95])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_top_p_keeps_the_minimal_nucleus(top_p, temperature):
    gen = torch.Generator().manual_seed(int(top_p * 100))
    logits = 2 * torch.randn(6, 200, generator=gen)
    x = filter_logits(logits, SamplingConfig(top_p=top_p, temperature=temperature))
    for row, xrow in zip(logits, x, strict=True):
        probs = torch.softmax(row.double() / temperature, -1)
        kept = torch.isfinite(xrow)
        n = int(kept.sum())
        # the kept tokens are the n most likely ones ...
        assert set(kept.nonzero().squeeze(1).tolist()) == set(probs.topk(n).indices.tolist())
        mass = probs.sort(descending=True).values.cumsum(0)
        # ... their mass reaches top_p, and one fewer would not (minimal)
        assert mass[n - 1] >= top_p - 1e-6
        assert n == 1 or mass[n - 2] < top_p + 1e-6
        torch.testing.assert_close(xrow[kept], row[kept] / temperature)


def test_top_k_then_top_p_matches_reference():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.6)
    x = filter_logits(logits, cfg)
    for row, xrow in zip(logits, x, strict=True):
        ref = ref_filter(row, 0.8, 20, 0.6)
        assert torch.equal(torch.isfinite(xrow), torch.isfinite(ref))
        torch.testing.assert_close(xrow.log_softmax(-1).double(), ref, atol=1e-5, rtol=0)


# --- determinism ------------------------------------------------------------------------------


def _run(model, prompts, rsps, seeds, greedy=False, n=6):
    return generate(
        model,
        prompts,
        rsps,
        sampling=SamplingConfig(max_new_tokens=n, greedy=greedy, stop_at_eos=False),
        capture=CaptureConfig(first_k=n),
        sample_seeds=seeds,
    )


def test_same_seeds_give_identical_tokens_and_metrics(tiny_model):
    prompts, rsps = mixed_prompts(tiny_model, 3), draw_rsps(tiny_model, 3)
    a = _run(tiny_model, prompts, rsps, [1, 2, 3])
    b = _run(tiny_model, prompts, rsps, [1, 2, 3])
    assert torch.equal(a.tokens, b.tokens)
    pairs = [(n, getattr(a, n), getattr(b, n)) for n in ("entropy", "chosen_logprob", "attn")]
    pairs += [(n, getattr(a, n), getattr(b, n)) for n in ("resid", "prefill_resid")]
    pairs += [(n, a.step_scores[n], b.step_scores[n]) for n in a.step_scores]
    for name, x, y in pairs:
        assert torch.allclose(x, y, atol=0, rtol=0, equal_nan=True), name  # bitwise equal
    assert a.texts == b.texts


def test_different_seeds_give_different_tokens(tiny_model):
    prompts, rsps = mixed_prompts(tiny_model, 3), draw_rsps(tiny_model, 3)
    a = _run(tiny_model, prompts, rsps, [1, 2, 3])
    b = _run(tiny_model, prompts, rsps, [4, 5, 6])
    for row in range(3):  # each row: its own seed decides (6 draws from a ~uniform distribution)
        assert not torch.equal(a.tokens[row], b.tokens[row])


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_row_tokens_do_not_depend_on_batch_composition(tiny_model, greedy):
    """Row 0 (the shortest prompt, so left-padded in the batch) alone vs in a batch of 3.

    Tokens must be identical; log-probs may differ by float noise from the padded matmuls
    (tolerance 1e-4; observed ~1e-6)."""
    prompts, rsps = mixed_prompts(tiny_model, 3), draw_rsps(tiny_model, 3)
    assert len(prompts[0].ids) < max(len(p.ids) for p in prompts)
    batch = _run(tiny_model, prompts, rsps, [21, 22, 23], greedy=greedy, n=8)
    alone = _run(tiny_model, prompts[:1], rsps[:1], [21], greedy=greedy, n=8)
    assert (batch.batch.attention_mask[0] == 0).any(), "row 0 should be padded in the batch"
    assert torch.equal(batch.tokens[0], alone.tokens[0])
    torch.testing.assert_close(batch.chosen_logprob[0], alone.chosen_logprob[0], atol=TOL, rtol=0)
    torch.testing.assert_close(batch.entropy[0], alone.entropy[0], atol=TOL, rtol=0)
    torch.testing.assert_close(batch.attn[:, :, 0], alone.attn[:, :, 0], atol=1e-5, rtol=0)


def test_sampling_needs_one_seed_per_row(tiny_llama):
    with pytest.raises(InputError, match="one seed per row"):
        _run(tiny_llama, mixed_prompts(tiny_llama, 2), None, [1])


def test_sampled_tokens_follow_the_model_distribution(tiny_llama):
    """Gumbel-max draws at step 0 have the model's frequencies (chi-square-free check: the
    empirical frequency of each of the 3 likeliest tokens within 4 binomial std errors)."""
    prompts = [tokenize_prompt("Hi", tiny_llama.tokenizer)]
    n = 400
    out = generate(
        tiny_llama,
        prompts * n,
        None,
        sampling=SamplingConfig(max_new_tokens=1, temperature=0.5),
        capture=CaptureConfig.off(),
        sample_seeds=list(range(n)),
    )
    lp = forward_logprobs(tiny_llama, row_inputs(tiny_llama, prompts[0], None, "end", []))
    p = torch.softmax(lp[0, -1].double() / 0.5, -1)
    for tok in p.topk(3).indices.tolist():
        freq = float((out.tokens[:, 0] == tok).double().mean())
        se = math.sqrt(p[tok] * (1 - p[tok]) / n)
        assert abs(freq - float(p[tok])) < 4 * se + 1e-9, (tok, freq, float(p[tok]))


# --- stopping ------------------------------------------------------------------------------------


class ForceToken(Intervention):
    """Make ``token`` the argmax of row ``row`` at step ``step`` (hook on the unembed output)."""

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


def test_row_stops_at_eos_and_others_continue(tiny_model):
    eos = tiny_model.tokenizer.eos_token_id
    stops = stop_token_ids(tiny_model.tokenizer, tiny_model.hf_model)
    assert eos in stops
    prompts, rsps = mixed_prompts(tiny_model, 3), draw_rsps(tiny_model, 3)
    n = 6
    sampling = SamplingConfig(max_new_tokens=n, greedy=True)
    capture = CaptureConfig(first_k=n, paired_baseline=True)
    free = generate(tiny_model, prompts, rsps, sampling=sampling, capture=capture)
    assert not any(t in stops for t in free.tokens.flatten().tolist()), "precondition: no stop"
    out = generate(
        tiny_model,
        prompts,
        rsps,
        sampling=sampling,
        capture=capture,
        interventions=[ForceToken(row=0, step=2, token=eos)],
    )
    assert out.tokens[0, 2] == eos
    assert torch.equal(out.tokens[0, :2], free.tokens[0, :2])
    assert (out.tokens[0, 3:] == -1).all()
    assert out.n_generated.tolist() == [3, n, n]
    assert torch.equal(out.tokens[1:], free.tokens[1:])  # other rows are unaffected
    for name, vals in [
        ("entropy", out.entropy),
        ("chosen_logprob", out.chosen_logprob),
        *out.step_scores.items(),
    ]:
        assert vals[0, :3].isfinite().all(), name
        assert vals[0, 3:].isnan().all(), name
        assert vals[1:].isfinite().all(), name
    # captures of steps a row never generated are NaN, not values from a dummy token
    assert out.attn[:3, :, 0].isfinite().all() and out.attn[3:, :, 0].isnan().all()
    assert out.resid[:3, :, 0].isfinite().all() and out.resid[3:, :, 0].isnan().all()
    assert out.attn[:, :, 1:].isfinite().all() and out.resid[:, :, 1:].isfinite().all()
    # the stop token itself is excluded from the text
    assert out.texts[0] == tiny_model.tokenizer.decode(out.tokens[0, :2].tolist())


def test_stop_at_eos_false_keeps_generating(tiny_llama):
    eos = tiny_llama.tokenizer.eos_token_id
    out = generate(
        tiny_llama,
        mixed_prompts(tiny_llama, 2),
        None,
        sampling=SamplingConfig(max_new_tokens=5, greedy=True, stop_at_eos=False),
        interventions=[ForceToken(row=0, step=1, token=eos)],
    )
    assert out.tokens[0, 1] == eos
    assert (out.tokens >= 0).all() and out.n_generated.tolist() == [5, 5]


def test_all_rows_stopping_ends_the_run_early(tiny_llama):
    eos = tiny_llama.tokenizer.eos_token_id
    out = generate(
        tiny_llama,
        mixed_prompts(tiny_llama, 2),
        None,
        sampling=SamplingConfig(max_new_tokens=8, greedy=True),
        interventions=[ForceToken(0, 0, eos), ForceToken(1, 0, eos)],
    )
    assert out.n_generated.tolist() == [1, 1]
    assert (out.tokens[:, 0] == eos).all() and (out.tokens[:, 1:] == -1).all()
    assert out.attn[1:].isnan().all()  # no forward ran for steps 1..7


# --- input checks ------------------------------------------------------------------------------


def test_context_overflow_is_an_input_error(tiny_llama):
    prompts = mixed_prompts(tiny_llama, 1)
    with pytest.raises(InputError, match="context"):
        generate(
            tiny_llama,
            prompts,
            None,
            sampling=SamplingConfig(max_new_tokens=tiny_llama.n_ctx, greedy=True),
        )


def test_nan_rsp_is_an_input_error(tiny_llama):
    rsps = draw_rsps(tiny_llama, 1)
    rsps[0, 1, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        generate(
            tiny_llama,
            mixed_prompts(tiny_llama, 1),
            rsps,
            sampling=SamplingConfig(max_new_tokens=1, greedy=True),
        )

"""Tests for rsp_interp.captures (live reductions) and rsp_interp.interventions.

References come from plain forwards of the bridge over the final sequence (no KV cache), with
full attention patterns / residuals stored by our own hooks.
"""

from __future__ import annotations

import pytest
import torch

from rsp_interp.captures import ATTN_GROUPS, CaptureConfig
from rsp_interp.generation import GenerationOutput, SamplingConfig, generate
from rsp_interp.injection import Role, build_batch, tokenize_prompt
from rsp_interp.interventions import (
    MaskAttentionToRSP,
    PatchResidualAtRSP,
    capture_rsp_residual,
)
from rsp_interp.prompts import arithmetic_problems, format_prompt
from rsp_interp.rsp import RSPConfig, RSPSampler

GROUP_ROLES = {"rsp": Role.RSP, "bos": Role.BOS, "prompt": Role.PROMPT, "gen": Role.GEN}


def mixed_prompts(model, n: int) -> list:
    problems = [arithmetic_problems(1, seed=i, steps=1 + i % 3)[0] for i in range(n)]
    tok = model.tokenizer
    return [tokenize_prompt(format_prompt(p.question, tok, chat=model.chat), tok) for p in problems]


def draw_rsps(model, n: int, length: int = 4, seed: int = 0) -> torch.Tensor:
    return RSPSampler.for_model(model, RSPConfig(length=length)).draw_batch(
        [seed + i for i in range(n)]
    )


def final_sequence(model, out: GenerationOutput):
    """The engine's batch followed by all generated tokens but the last (never fed back)."""
    b, n = out.batch, out.tokens.shape[1] - 1
    gen = out.tokens[:, :n].clamp(min=0)
    embeds = torch.cat([b.inputs_embeds, model.embed(gen)], dim=1)
    mask = torch.cat([b.attention_mask, torch.ones_like(gen)], dim=1)
    pos = torch.cat([b.position_ids, b.position_ids[:, -1:] + 1 + torch.arange(n)], dim=1)
    roles = torch.cat([b.roles, torch.full_like(gen, int(Role.GEN), dtype=b.roles.dtype)], dim=1)
    return embeds, mask, pos, roles


def stored_forward(model, embeds, mask, pos, names, hooks=()):
    """Forward with our own storing hooks; returns (log-probs, {hook name: tensor})."""
    store: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(x, hook=None):
            store[name] = x.detach().clone()
            return x

        return hook

    fwd = list(hooks) + [(name, keep(name)) for name in names]
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=fwd):
        logits = model.bridge(embeds, attention_mask=mask, position_ids=pos)
    return logits.float().log_softmax(-1), store


def full_dist(out: GenerationOutput, t: int) -> torch.Tensor:
    """Step t's whole distribution ``[B, V]`` from a run with ``top_m`` = vocabulary size."""
    probs = torch.zeros(out.top_m_probs.shape[0], out.top_m_probs.shape[-1])
    return probs.scatter_(-1, out.top_m_ids[:, t], out.top_m_probs[:, t])


def max_logprob_change(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the largest |log p - log q| (float noise is ~1e-6; RSP effects ~1e-2)."""
    return (p.log() - q.log()).abs().max(-1).values


def run(model, prompts, rsps, position="end", n=5, capture=None, interventions=(), **kw):
    return generate(
        model,
        prompts,
        rsps,
        position=position,
        sampling=SamplingConfig(max_new_tokens=n, greedy=True, stop_at_eos=False),
        capture=capture or CaptureConfig(),
        interventions=interventions,
        **kw,
    )


# --- reductions == full patterns / residuals --------------------------------------------------


@pytest.mark.parametrize("position", ["end", "before-assistant", "start"])
def test_reductions_equal_full_cache(tiny_model, position):
    m = tiny_model
    prompts, rsps = mixed_prompts(m, 3), draw_rsps(m, 3)
    out = run(m, prompts, rsps, position)
    embeds, mask, pos, roles = final_sequence(m, out)
    n_l = m.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_l)]
    names += [f"blocks.{layer}.hook_resid_pre" for layer in range(n_l)]
    names += [f"blocks.{n_l - 1}.hook_resid_post"]
    _, cache = stored_forward(m, embeds, mask, pos, names)
    t0, n_steps = out.batch.length, out.tokens.shape[1]
    assert out.attn.shape == (n_steps, n_l, 3, m.n_heads, 4)

    # attention mass of the query that predicts token t, summed over each key group
    for layer in range(n_l):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [B, H, T, T]
        for t in range(n_steps):
            q = t0 - 1 + t
            for g, group in enumerate(ATTN_GROUPS):
                keys = roles == int(GROUP_ROLES[group])  # [B, T]; gen includes the query itself
                keys[:, q + 1 :] = False
                expected = (pattern[:, :, q, :] * keys[:, None, :]).sum(-1)  # [B, H]
                torch.testing.assert_close(
                    out.attn[t, layer, :, :, g].double(), expected, atol=1e-5, rtol=0
                )
    torch.testing.assert_close(
        out.attn.sum(-1), torch.ones_like(out.attn[..., 0]), atol=1e-5, rtol=0
    )
    if position == "end":  # step 0's query is the last RSP vector: it sees no generated token
        assert (out.attn[0, ..., ATTN_GROUPS.index("gen")] == 0).all()
    assert (out.attn[1:, ..., ATTN_GROUPS.index("gen")] > 0).all()  # self is a gen key

    # residual norms at the current token; layer n_layers = output of the last block
    resid = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_l)]
    resid.append(cache[f"blocks.{n_l - 1}.hook_resid_post"])
    norms = torch.stack([r.double().norm(dim=-1) for r in resid])  # [L+1, B, T]
    for t in range(n_steps):
        torch.testing.assert_close(
            out.resid[t].double(), norms[:, :, t0 - 1 + t], atol=1e-5, rtol=1e-5
        )
    # prefill residual norms at every real prefill position
    real = out.batch.attention_mask.bool()
    pr = out.prefill_resid.double()
    assert pr.shape == (n_l + 1, 3, t0)
    torch.testing.assert_close(pr[:, real], norms[:, :, :t0][:, real], atol=1e-5, rtol=1e-5)

    # prefill_attn: mean over prompt queries after the RSP of their mass on RSP keys
    rsp_keys = out.batch.roles == int(Role.RSP)
    for b in range(3):
        last_rsp = int(rsp_keys[b].nonzero().max())
        queries = [q for q in range(last_rsp + 1, t0) if out.batch.roles[b, q] == int(Role.PROMPT)]
        for layer in range(n_l):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()[b]  # [H, T, T]
            if not queries:  # position "end": no prompt query sees the RSP
                assert out.prefill_attn[layer, b].isnan().all()
                continue
            mass = pattern[:, queries][:, :, :t0][:, :, rsp_keys[b]].sum(-1)  # [H, Q]
            torch.testing.assert_close(
                out.prefill_attn[layer, b].double(), mass.mean(-1), atol=1e-5, rtol=0
            )
    if position == "start":
        assert out.prefill_attn.isfinite().all() and (out.prefill_attn > 0).all()


def test_rsp_mass_is_zero_without_rsp(tiny_llama):
    out = run(tiny_llama, mixed_prompts(tiny_llama, 2), None, n=3)
    assert (out.attn[..., ATTN_GROUPS.index("rsp")] == 0).all()
    assert out.prefill_attn.isnan().all()  # no RSP: nothing to attend to
    torch.testing.assert_close(out.attn.sum(-1), torch.ones_like(out.attn[..., 0]))


def test_capture_off_records_nothing(tiny_llama):
    out = run(
        tiny_llama,
        mixed_prompts(tiny_llama, 2),
        draw_rsps(tiny_llama, 2),
        n=3,
        capture=CaptureConfig.off(),
    )
    assert out.attn is None and out.resid is None
    assert out.prefill_resid is None and out.prefill_attn is None
    assert out.step_scores == {} and out.top_m_ids is None


def test_top_m_are_the_most_likely_tokens(tiny_llama):
    capture = CaptureConfig(first_k=3, top_m=5)
    out = run(
        tiny_llama, mixed_prompts(tiny_llama, 2), draw_rsps(tiny_llama, 2), n=4, capture=capture
    )
    assert out.top_m_ids.shape == (2, 3, 5) and out.top_m_probs.shape == (2, 3, 5)
    embeds, mask, pos, _ = final_sequence(tiny_llama, out)
    lp, _ = stored_forward(tiny_llama, embeds, mask, pos, [])
    t0 = out.batch.length
    for t in range(3):
        v, i = lp[:, t0 - 1 + t].topk(5, dim=-1)
        assert torch.equal(out.top_m_ids[:, t], i)
        torch.testing.assert_close(out.top_m_probs[:, t], v.exp(), atol=1e-5, rtol=1e-4)
    assert torch.equal(out.top_m_ids[:, :, 0], out.tokens[:, :3])  # greedy = top-1


# --- memory ------------------------------------------------------------------------------------


def _tensors(obj, prefix=""):
    """Every tensor reachable from a GenerationOutput (fields, dicts, the batch)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, k), f"{prefix}.{k}")


def test_capture_memory_grows_linearly_with_steps(tiny_llama):
    m, s = tiny_llama, 6
    prompts, rsps = mixed_prompts(m, 2), draw_rsps(m, 2)
    a = run(m, prompts, rsps, n=s)
    b = run(m, prompts, rsps, n=2 * s)
    nbytes = lambda x: x.numel() * x.element_size()  # noqa: E731
    assert nbytes(b.attn) == 2 * nbytes(a.attn)
    assert nbytes(b.resid) == 2 * nbytes(a.resid)
    assert a.attn.numel() == s * m.n_layers * 2 * m.n_heads * len(ATTN_GROUPS)
    assert a.resid.numel() == s * (m.n_layers + 1) * 2
    # prefill captures do not depend on the number of steps at all
    assert a.prefill_resid.shape == b.prefill_resid.shape
    assert a.prefill_attn.shape == b.prefill_attn.shape
    # nothing quadratic in the sequence length is kept
    t = b.batch.length
    assert t > max(m.d_model, 2 * s)  # so a [.., T, T] tensor would be recognisable
    for name, x in _tensors(b):
        big = [d for d in x.shape if d >= t]
        assert len(big) <= 1, f"{name} has shape {tuple(x.shape)}: looks like a T x T tensor"


# --- interventions -------------------------------------------------------------------------------


def mask_decision_queries(roles_full: torch.Tensor, first_decision: int):
    """Our own masking hook: for queries >= first_decision, zero RSP keys and renormalise."""

    def hook(pattern, hook=None):
        p = pattern.clone()
        rsp = (roles_full[:, : p.shape[-1]] == int(Role.RSP))[:, None, None, :]
        sel = p[:, :, first_decision:, :].masked_fill(rsp, 0.0)
        p[:, :, first_decision:, :] = sel / sel.sum(-1, keepdim=True)
        return p

    return hook


def test_mask_attention_to_rsp_zeroes_rsp_mass_and_matches_manual_masking(tiny_model):
    m, n = tiny_model, 5
    prompts, rsps = mixed_prompts(m, 3), draw_rsps(m, 3)
    capture = CaptureConfig(first_k=n, top_m=len(m.tokenizer))  # full distribution per step
    plain = run(m, prompts, rsps, n=n, capture=capture)
    masked = run(m, prompts, rsps, n=n, capture=capture, interventions=[MaskAttentionToRSP()])
    rsp_mass = masked.attn[..., ATTN_GROUPS.index("rsp")]
    assert (rsp_mass == 0).all()
    torch.testing.assert_close(masked.attn.sum(-1), torch.ones_like(rsp_mass), atol=1e-5, rtol=0)
    assert (plain.attn[..., ATTN_GROUPS.index("rsp")] > 0).all()
    # positions before the last prefill position are no decision queries: untouched
    real = masked.batch.attention_mask.bool().clone()
    real[:, -1] = False
    torch.testing.assert_close(masked.prefill_resid[:, real], plain.prefill_resid[:, real])
    assert (masked.prefill_resid[1:, :, -1] != plain.prefill_resid[1:, :, -1]).all()

    # reference: our own hook on every layer's pattern, over the final sequence, no cache
    embeds, mask, pos, roles = final_sequence(m, masked)
    t0 = masked.batch.length
    hook = mask_decision_queries(roles, t0 - 1)
    hooks = [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(m.n_layers)]
    lp, _ = stored_forward(m, embeds, mask, pos, [], hooks=hooks)
    for t in range(n):
        ref = lp[:, t0 - 1 + t].exp()
        torch.testing.assert_close(full_dist(masked, t), ref, atol=1e-5, rtol=1e-4)
        assert torch.equal(masked.tokens[:, t], ref.argmax(-1))
    change = max_logprob_change(full_dist(masked, 0), full_dist(plain, 0))
    assert (change > 1e-3).all(), "masking all layers should change the step-0 distribution"


def test_mask_attention_to_rsp_single_layer_and_head(tiny_llama):
    m = tiny_llama
    prompts, rsps = mixed_prompts(m, 2), draw_rsps(m, 2)
    out = run(m, prompts, rsps, n=3, interventions=[MaskAttentionToRSP(layers=[1], heads=[2])])
    rsp = out.attn[..., ATTN_GROUPS.index("rsp")]  # [S, L, B, H]
    assert (rsp[:, 1, :, 2] == 0).all()
    assert (rsp[:, 0] > 0).all() and (rsp[:, 1, :, [0, 1, 3]] > 0).all()
    with pytest.raises(ValueError, match="out of range"):
        run(m, prompts, rsps, n=1, interventions=[MaskAttentionToRSP(layers=[m.n_layers])])
    with pytest.raises(ValueError, match="out of range"):
        run(m, prompts, rsps, n=1, interventions=[MaskAttentionToRSP(heads=[m.n_heads])])


def _gap_forward(model, prompts, position_gap: int, tokens, header_gap: bool, rsps=None):
    """Rows one at a time, unpadded. Without ``rsps``: the no-RSP prompt whose position ids skip
    ``position_gap`` slots where the RSP would sit (after the prompt, or before the assistant
    header). With ``rsps``: the RSP spliced in there, and our own hook masking RSP keys for
    *every* query after the RSP (not only decision queries) in every layer."""
    out = []
    for b, tp in enumerate(prompts):
        ids = list(tp.ids) + [int(x) for x in tokens[b]]
        cut = tp.header_start if header_gap else len(tp.ids)
        embeds = model.embed(torch.tensor(ids))
        hooks = []
        if rsps is None:
            pos = torch.arange(len(ids))
            pos[cut:] += position_gap
        else:
            embeds = torch.cat([embeds[:cut], rsps[b], embeds[cut:]])
            pos = torch.arange(len(embeds))
            roles = torch.full((1, len(embeds)), int(Role.PROMPT))
            roles[0, cut : cut + rsps.shape[1]] = int(Role.RSP)
            hook = mask_decision_queries(roles, cut + rsps.shape[1])
            hooks = [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(model.n_layers)]
        mask = torch.ones(1, len(embeds), dtype=torch.long)
        lp, _ = stored_forward(model, embeds[None], mask, pos[None], [], hooks=hooks)
        first = len(embeds) - len(tokens[b]) - 1  # the query that predicts token 0
        out.append(lp[0, first:])
    return out


def test_masking_all_layers_removes_rsp_influence_only_when_nothing_else_reads_it(tiny_model):
    """What does masking decision queries in all layers buy?

    ``end``: the RSP sits after every prompt token, so only decision queries could read it.
    With them masked in every layer, generated tokens (steps >= 1) see exactly what a no-RSP run
    sees, once positions skip the L slots the RSP occupied (rotary / learned positions still
    count them). Step 0's query is the last RSP vector itself, so step 0 does differ.

    ``before-assistant``: the assistant-header tokens come after the RSP and are *not* decision
    queries; they attend to it in every layer, and the step-0 query reads their (RSP-tainted)
    residuals in later layers. So the step-0 distribution must NOT equal the no-RSP one, even
    with the same position gap: masking decision queries is not the same as removing the RSP.
    Positive control: masking the header queries too (our own hook) does give the no-RSP one.

    Short prompts and L=16 make the RSP a larger share of the keys: on these random tiny models
    the header leak is ~1e-4..1e-3 in log-prob, against float noise ~2e-6 (measured below).
    """
    m, n, length = tiny_model, 4, 16
    tok = m.tokenizer
    prompts = [
        tokenize_prompt(format_prompt(q, tok, chat=m.chat), tok) for q in ("2+2?", "What is 7*6?")
    ]
    rsps = draw_rsps(m, 2, length=length)
    capture = CaptureConfig(first_k=n, top_m=len(tok))

    end = run(m, prompts, rsps, "end", n=n, capture=capture, interventions=[MaskAttentionToRSP()])
    ref = _gap_forward(m, prompts, length, end.tokens[:, : n - 1], header_gap=False)
    noise = 0.0
    for b in range(2):
        for t in range(1, n):
            torch.testing.assert_close(full_dist(end, t)[b], ref[b][t].exp(), atol=1e-5, rtol=1e-4)
            noise = max(noise, float(max_logprob_change(full_dist(end, t)[b], ref[b][t].exp())))
        # step 0's query is an RSP vector
        assert max_logprob_change(full_dist(end, 0)[b], ref[b][0].exp()) > 1e-3

    before = run(
        m,
        prompts,
        rsps,
        "before-assistant",
        n=1,
        capture=capture,
        interventions=[MaskAttentionToRSP()],
    )
    no_tokens = torch.zeros(2, 0, dtype=torch.long)
    ref = _gap_forward(m, prompts, length, no_tokens, header_gap=True)
    control = _gap_forward(m, prompts, length, no_tokens, header_gap=True, rsps=rsps)
    for b in range(2):
        change = max_logprob_change(full_dist(before, 0)[b], ref[b][0].exp())
        assert change > max(1e-4, 20 * noise), "header tokens carry RSP information to step 0"
        torch.testing.assert_close(control[b][0].exp(), ref[b][0].exp(), atol=1e-5, rtol=1e-4)


def test_patch_residual_with_own_residual_is_a_no_op(tiny_model):
    m, n, layer = tiny_model, 3, 1
    prompts, rsps = mixed_prompts(m, 2), draw_rsps(m, 2)
    capture = CaptureConfig(first_k=n, top_m=len(m.tokenizer))
    plain = run(m, prompts, rsps, "before-assistant", n=n, capture=capture)
    batch = build_batch(m, prompts, rsps, "before-assistant")
    own = capture_rsp_residual(m, batch, layer)
    assert own.shape == (2, rsps.shape[1], m.d_model)
    same = run(
        m,
        prompts,
        rsps,
        "before-assistant",
        n=n,
        capture=capture,
        interventions=[PatchResidualAtRSP(layer, own)],
    )
    assert torch.equal(same.tokens, plain.tokens)
    torch.testing.assert_close(same.top_m_probs, plain.top_m_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(same.attn, plain.attn, atol=1e-6, rtol=1e-5)

    other = capture_rsp_residual(
        m, build_batch(m, prompts, draw_rsps(m, 2, seed=99), "before-assistant"), layer
    )
    patched = run(
        m,
        prompts,
        rsps,
        "before-assistant",
        n=n,
        capture=capture,
        interventions=[PatchResidualAtRSP(layer, other)],
    )
    assert (max_logprob_change(full_dist(patched, 0), full_dist(plain, 0)) > 1e-3).all()
    # the patched residual is what the capture sees entering block `layer` at RSP positions
    rsp_pos = patched.batch.roles == int(Role.RSP)
    torch.testing.assert_close(
        patched.prefill_resid[layer][rsp_pos], other.norm(dim=-1).reshape(-1), rtol=1e-5, atol=1e-5
    )


def test_patch_residual_rejects_wrong_shape(tiny_llama):
    m = tiny_llama
    prompts, rsps = mixed_prompts(m, 2), draw_rsps(m, 2)
    with pytest.raises(ValueError, match="RSP positions"):
        run(
            m,
            prompts,
            rsps,
            n=1,
            interventions=[PatchResidualAtRSP(0, torch.zeros(2, rsps.shape[1] + 1, m.d_model))],
        )
    with pytest.raises(ValueError, match="out of range"):
        run(
            m,
            prompts,
            rsps,
            n=1,
            interventions=[PatchResidualAtRSP(m.n_layers, torch.zeros(2, 4, m.d_model))],
        )

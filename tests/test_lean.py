"""The lean forward path (rsp_interp.lean) against the bridge it replaces."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from rsp_interp.captures import CaptureConfig
from rsp_interp.errors import InputError
from rsp_interp.generation import SamplingConfig, generate
from rsp_interp.interventions import MaskAttentionToRSP
from rsp_interp.lean import FewRowsLinear, grouped_eager_attention, lean_model
from rsp_interp.prompts import format_prompt

QUESTIONS = ["What is 12 + 7?", "A farmer has 3 cows and buys 5 more. How many?", "Hi"]
CAPTURED = ("entropy", "chosen_logprob", "attn", "resid", "prefill_resid", "prefill_attn")


def prompts_and_rsps(model, n: int = 3, length: int = 4):
    from rsp_interp.injection import tokenize_prompt

    prompts = [
        tokenize_prompt(format_prompt(q, model.tokenizer), model.tokenizer) for q in QUESTIONS
    ]
    gen = torch.Generator().manual_seed(0)
    return prompts[:n], torch.randn(n, length, model.d_model, generator=gen) * 0.05


def both_engines(model, greedy: bool, n_steps: int = 6):
    prompts, rsps = prompts_and_rsps(model)
    kw = dict(
        sampling=SamplingConfig(max_new_tokens=n_steps, greedy=greedy, stop_at_eos=False),
        capture=CaptureConfig(paired_baseline=True, top_m=3),
        sample_seeds=[5, 6, 7],
    )
    return (
        generate(model, prompts, rsps, engine="bridge", **kw),
        generate(model, prompts, rsps, **kw),
    )


def assert_same_captures(a, b, atol: float) -> None:
    assert torch.equal(a.tokens, b.tokens)
    for name in CAPTURED + ("top_m_probs",):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.isnan(), y.isnan()), name
        torch.testing.assert_close(y.nan_to_num(), x.nan_to_num(), atol=atol, rtol=1e-6)
    for name, x in a.step_scores.items():
        torch.testing.assert_close(
            b.step_scores[name].nan_to_num(), x.nan_to_num(), atol=atol, rtol=0
        )


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_lean_engine_records_what_the_bridge_records(tiny_model, greedy):
    bridge, lean = both_engines(tiny_model, greedy)
    assert bridge.extra["engine"] == "bridge" and lean.extra["engine"] == "lean"
    assert not bridge.attn.isnan().all()
    assert_same_captures(bridge, lean, atol=1e-5)


@pytest.mark.real
def test_lean_engine_records_what_the_bridge_records_real(smollm):
    bridge, lean = both_engines(smollm, greedy=True, n_steps=4)
    # residual norms reach ~1e3 at massive-activation positions: compare relatively there
    torch.testing.assert_close(lean.resid, bridge.resid, rtol=1e-5, atol=1e-4, equal_nan=True)
    bridge.resid = lean.resid
    assert_same_captures(bridge, lean, atol=1e-4)


def test_interventions_and_tl_hooks_run_through_the_bridge(tiny_llama):
    prompts, rsps = prompts_and_rsps(tiny_llama, 2)
    kw = dict(sampling=SamplingConfig(max_new_tokens=2, greedy=True), capture=CaptureConfig.off())
    out = generate(tiny_llama, prompts, rsps, interventions=[MaskAttentionToRSP()], **kw)
    assert out.extra["engine"] == "bridge"
    seen = []
    hook = ("blocks.0.hook_resid_pre", lambda x, hook=None: seen.append(x.shape) or x)
    out = generate(tiny_llama, prompts, rsps, interventions=[hook], **kw)
    assert out.extra["engine"] == "bridge" and len(seen) == 2  # prefill + one cached step


def test_unknown_engine_is_an_input_error(tiny_llama):
    prompts, rsps = prompts_and_rsps(tiny_llama, 1)
    with pytest.raises(InputError, match="engine"):
        generate(tiny_llama, prompts, rsps, sampling=SamplingConfig(greedy=True), engine="vllm")


def test_hooks_on_the_lean_copy_stay_off_the_bridge(tiny_llama):
    lean = lean_model(tiny_llama)
    calls = []
    handle = lean.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            tiny_llama.bridge(torch.tensor([[1, 2, 3]]))
        assert calls == []
        with torch.no_grad():
            lean.module(input_ids=torch.tensor([[1, 2, 3]]))
        assert calls == [1]
    finally:
        handle.remove()


class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_eager_attention_equals_the_models_eager(groups, q_len):
    gen = torch.Generator().manual_seed(1)
    b, hkv, k_len, d = 2, 2, 7, 8
    query = torch.randn(b, q_len, hkv * groups, d, generator=gen).transpose(1, 2)  # as q_proj's
    key = torch.randn(b, hkv, k_len, d, generator=gen)
    value = torch.randn(b, hkv, k_len, d, generator=gen)
    mask = torch.zeros(b, 1, q_len, k_len)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # left padding in row 0
    module = _Attn(groups).eval()
    ref_out, ref_w = modeling_llama.eager_attention_forward(
        module, query, key, value, mask, scaling=d**-0.5
    )
    out, w = grouped_eager_attention(module, query, key, value, mask, scaling=d**-0.5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    assert w.shape == (b, hkv * groups, q_len, k_len)


def test_grouped_eager_attention_hands_soft_capping_to_the_models_eager(monkeypatch):
    called = {}

    def own_eager(module, *args, **kwargs):
        called.update(kwargs)
        return "own"

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", own_eager)
    module = modeling_llama.LlamaAttention.__new__(modeling_llama.LlamaAttention)
    torch.nn.Module.__init__(module)
    module.num_key_value_groups = 1
    q = torch.zeros(1, 2, 1, 4)
    kv = torch.zeros(1, 2, 3, 4)
    assert grouped_eager_attention(module, q, kv, kv, None, scaling=1.0, softcap=30.0) == "own"
    assert called["softcap"] == 30.0


@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (3, 5, 24), (128, 24), (129, 24), (300, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 40, bias=bias)
    fast = torch.nn.Linear(24, 40, bias=bias)
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = FewRowsLinear
    x = torch.randn(*shape)
    with torch.no_grad():
        got, want = fast(x), ref(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lean_copy_uses_few_rows_linear_and_the_bridge_keeps_nn_linear(tiny_llama):
    lean = lean_model(tiny_llama)
    lean_types = {type(m) for m in lean.module.modules()}
    bridge_types = {type(m) for m in tiny_llama.hf_model.modules()}
    assert FewRowsLinear in lean_types and torch.nn.Linear not in lean_types
    assert FewRowsLinear not in bridge_types


def test_attention_code_that_does_not_dispatch_is_captured_through_the_bridge(tiny_llama):
    """An attention module whose forward does not pick its kernel from AttentionInterface
    cannot be made to return its pattern: the engine then records through the bridge."""
    import dataclasses

    from rsp_interp import lean as lean_mod

    assert lean_mod._dispatches(type(lean_model(tiny_llama).attns[0]))

    class Custom(torch.nn.Module):
        def forward(self, x):
            return x, None

    assert not lean_mod._dispatches(Custom)
    model = dataclasses.replace(tiny_llama, extra={})
    lean = lean_model(model)
    lean.layers = lean.attns = None  # as lean_model leaves them for such a model
    prompts, rsps = prompts_and_rsps(tiny_llama, 1)
    out = generate(model, prompts, rsps, sampling=SamplingConfig(max_new_tokens=2, greedy=True))
    assert out.extra["engine"] == "bridge"
    off = generate(
        model,
        prompts,
        rsps,
        sampling=SamplingConfig(max_new_tokens=2, greedy=True),
        capture=CaptureConfig.off(),
    )
    assert off.extra["engine"] == "lean"  # nothing to capture: the fused path still applies


def test_logits_observers_see_every_forward_and_keep_the_lean_path(tiny_llama):
    from rsp_interp.generation import LogitsObserver

    class Keep(LogitsObserver):
        def __init__(self):
            self.seen = []

        def observe(self, state, logits):
            self.seen.append((state.phase, state.step, logits[:, -1].clone()))

    prompts, rsps = prompts_and_rsps(tiny_llama, 2)
    obs = Keep()
    sampling = SamplingConfig(max_new_tokens=3, greedy=True, stop_at_eos=False)
    out = generate(tiny_llama, prompts, rsps, sampling=sampling, interventions=[obs])
    assert out.extra["engine"] == "lean"
    assert [(p, s) for p, s, _ in obs.seen] == [("prefill", 0), ("step", 1), ("step", 2)]
    for t, (_, _, logits) in enumerate(obs.seen):  # the logits the tokens were chosen from
        lp = logits.float().log_softmax(-1)
        assert torch.equal(lp.argmax(-1), out.tokens[:, t])
        torch.testing.assert_close(
            lp.gather(-1, out.tokens[:, t : t + 1])[:, 0], out.chosen_logprob[:, t]
        )

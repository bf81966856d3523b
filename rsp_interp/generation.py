"""Batched, KV-cached sampling from input embeddings, with live captures.

:func:`generate` runs one left-padded batch (each row may carry its own RSP) through the
bridge: a prefill pass, then one cached step per new token. Capture hooks
(:mod:`rsp_interp.captures`) and user interventions stay registered for the whole run.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rsp_interp.captures import CaptureConfig, Recorder, RunState
from rsp_interp.errors import InputError
from rsp_interp.injection import InjectedBatch, Role, TokenizedPrompt, build_batch
from rsp_interp.lean import (
    CAPTURE_ATTENTION,
    bridge_grouped_attns,
    kv_groups_of_one,
    lean_model,
    preallocated_cache,
)
from rsp_interp.metrics import STEP_SCORES, StepContext, entropy

Hook = tuple[str, Callable]
Forward = Callable[..., tuple[torch.Tensor, Any]]
ENGINES = ("auto", "bridge")
"""``auto``: the lean HF path unless a TransformerLens hook is needed; ``bridge``: always the
bridge (every hook point fires)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``greedy=True`` (or temperature 0) ignores the other knobs."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    greedy: bool = False
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0 or self.temperature != self.temperature:
            raise InputError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class Intervention:
    """Base for interventions: return TransformerLens hooks that may read the live run state."""

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"type": type(self).__name__}


class LogitsObserver(Intervention):
    """Reads the logits of every forward of the run (prefill, then each cached step) and changes
    nothing. It needs no hook point, so a run with observers keeps the lean path."""

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        return []

    def observe(self, state: RunState, logits: torch.Tensor) -> None:
        """``logits`` ``[B, Q, V]`` of the forward just run (see ``state.phase`` and ``step``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "effect": "none (observer)"}


@dataclass
class GenerationOutput:
    """Everything one batch produced; capture tensors are on the CPU."""

    tokens: torch.Tensor  # [B, S] long; -1 after a row stopped
    n_generated: torch.Tensor  # [B] tokens generated per row (incl. the stop token)
    texts: list[str]
    entropy: torch.Tensor  # [B, S] nats, NaN after stop
    chosen_logprob: torch.Tensor  # [B, S]
    step_scores: dict[str, torch.Tensor]  # name -> [B, K]
    top_m_ids: torch.Tensor | None  # [B, K, m]
    top_m_probs: torch.Tensor | None
    attn: torch.Tensor | None  # [S, n_layers, B, H, 4] mass on rsp, bos, prompt, gen keys
    resid: torch.Tensor | None  # [S, n_layers + 1, B] residual norm at the current token
    prefill_resid: torch.Tensor | None  # [n_layers + 1, B, T]
    prefill_attn: torch.Tensor | None  # [n_layers, B, H] mean prompt->RSP mass
    batch: InjectedBatch
    extra: dict[str, Any] = field(default_factory=dict)


def stop_token_ids(tokenizer: Any, hf_model: Any = None) -> set[int]:
    """EOS ids: the tokenizer's, the generation config's, and a chat end-of-turn token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(hf_model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return ids


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[B, V]`` logits (float32)."""
    x = logits / cfg.temperature if cfg.temperature not in (0, 1) else logits
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = x.topk(cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, idx = x.sort(dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def _sample(logits: torch.Tensor, gens: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Gumbel-max with one CPU generator per row: a row's draw ignores the rest of the batch.

    Uniforms are float32 on the CPU (24-bit resolution, so the Gumbel tail is cut at ~16.6 and
    probabilities below ~1e-7 are resolved only approximately); the transform and the argmax
    run on the logits' device.
    """
    if gens is None:
        return logits.argmax(-1)
    u = torch.empty((len(gens), logits.shape[-1]), dtype=torch.float32)
    for row, g in zip(u, gens, strict=True):
        row.uniform_(generator=g)
    u = u.to(logits.device).clamp_(min=torch.finfo(torch.float32).tiny)
    return (logits.float() - u.log_().neg_().log_()).argmax(-1)


def generate(
    model: Any,
    prompts: list[TokenizedPrompt],
    rsps: torch.Tensor | None,
    position: str = "end",
    sampling: SamplingConfig | None = None,
    capture: CaptureConfig | None = None,
    sample_seeds: Sequence[int] | None = None,
    interventions: Sequence[Intervention | Hook] = (),
    engine: str = "auto",
) -> GenerationOutput:
    """Generate from one batch; ``rsps[b]`` (``[B, L, d]``) goes into prompt ``b`` (None: no RSP).

    ``sample_seeds[b]`` seeds row ``b``'s token sampling, so a row's tokens depend only on its
    own seed, prompt and RSP: same seed, same tokens, whatever the batch composition.
    Interventions and TransformerLens hooks run through the bridge; otherwise (``engine="auto"``)
    the HF modules run directly (:mod:`rsp_interp.lean`), with the same captures.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    sampling = sampling or SamplingConfig()
    capture = capture if capture is not None else CaptureConfig()
    unknown = [s for s in capture.step_scores if s not in STEP_SCORES]
    if unknown:
        raise InputError(f"Unknown step scores {unknown}: registered are {sorted(STEP_SCORES)}.")
    batch = build_batch(model, prompts, rsps, position)
    b, t0 = batch.n_rows, batch.length
    n_steps = sampling.max_new_tokens
    if t0 + n_steps > model.n_ctx:
        raise InputError(
            f"Prompt ({t0} positions incl. RSP) + max_new_tokens ({n_steps}) exceeds the model's "
            f"context of {model.n_ctx}: use shorter prompts, a shorter RSP or fewer new tokens."
        )
    gens = None
    if not sampling.is_greedy:
        if sample_seeds is None or len(sample_seeds) != b:
            raise InputError(f"Sampling needs one seed per row: got {sample_seeds!r} for {b} rows.")
        gens = [torch.Generator().manual_seed(int(s)) for s in sample_seeds]
    dev = model.device
    roles = torch.full((b, t0 + n_steps), int(Role.PAD), dtype=torch.int8, device=dev)
    roles[:, :t0] = batch.roles
    state = RunState(roles=roles, prefill_len=t0)
    rec = Recorder(capture, state, model.n_layers, model.n_heads, n_steps, dev)
    # interventions first, so captures on the same hook point see the intervened values
    hooks: list[Hook] = []
    for item in interventions:
        hooks += item.hooks(state, model) if isinstance(item, Intervention) else [item]
    observers = [x for x in interventions if isinstance(x, LogitsObserver)]
    stops = torch.tensor(sorted(stop_token_ids(model.tokenizer, model.hf_model)), device=dev)
    k = min(capture.first_k, n_steps)
    fwd_kwargs = {"logits_to_keep": 1} if _accepts(model.hf_model, "logits_to_keep") else {}

    tokens = torch.full((b, n_steps), -1, dtype=torch.long, device=dev)
    ent = torch.full((b, n_steps), float("nan"), device=dev)
    chosen_lp = torch.full((b, n_steps), float("nan"), device=dev)
    scores = {name: torch.full((b, k), float("nan"), device=dev) for name in capture.step_scores}
    top_ids = (
        torch.zeros((b, k, capture.top_m), dtype=torch.long, device=dev) if capture.top_m else None
    )
    top_p = torch.full((b, k, capture.top_m), float("nan"), device=dev) if capture.top_m else None
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    attn_mask = torch.zeros((b, t0 + n_steps), dtype=torch.long, device=dev)
    attn_mask[:, :t0] = batch.attention_mask
    next_pos = batch.position_ids[:, -1:] + 1
    lean = lean_model(model) if engine == "auto" and not hooks else None
    needs_modules = rec.attn is not None or rec.resid is not None
    if lean is not None and needs_modules and lean.layers is None:
        lean = None  # layers not matched to the bridge's blocks: capture through the bridge
    contexts: list[contextlib.AbstractContextManager] = []  # entered below, inside no_grad
    if lean is not None:
        # eager attention returns the pattern the capture reduces; otherwise the fused kernel
        impl = CAPTURE_ATTENTION if rec.attn is not None else lean.fast_attention
        forward, gqa = lean.forward, []
        contexts.append(lean.attention(impl))
        if needs_modules:
            contexts.append(rec.attached(lean.layers, lean.attns))
    else:
        forward = _bridge_forward(model)
        gqa = bridge_grouped_attns(model)
        contexts.append(model.bridge.hooks(fwd_hooks=hooks + rec.hooks()))
    n_rep = gqa[0].num_key_value_groups if gqa else 1
    cache = preallocated_cache(model.hf_model, t0 + n_steps, n_rep)
    if cache is None and gqa:  # cannot hold repeated K/V: let attention repeat them
        gqa, n_rep = [], 1
    base = None
    if capture.paired_baseline and rsps is not None and k:
        base = _Baseline(model, prompts, forward, fwd_kwargs)
        base.cache = preallocated_cache(model.hf_model, base.batch.length + k, n_rep)

    contexts.append(kv_groups_of_one(gqa))

    with torch.no_grad(), contextlib.ExitStack() as running:
        for cm in contexts:
            running.enter_context(cm)
        logits, cache = forward(
            batch.inputs_embeds, batch.attention_mask, batch.position_ids, cache, fwd_kwargs
        )
        for obs in observers:
            obs.observe(state, logits)
        if base is not None:
            state.phase = "baseline"
            base.prefill()
        for t in range(n_steps):
            last = logits[:, -1].float()
            logprobs = last.log_softmax(-1)
            samp = filter_logits(last, sampling) if not sampling.is_greedy else last
            nxt = _sample(samp, gens)
            live = ~done
            if sampling.stop_at_eos:
                nxt = torch.where(live, nxt, torch.full_like(nxt, -1))
            tokens[:, t] = nxt
            ent[:, t] = torch.where(live, entropy(logprobs), float("nan"))
            safe = nxt.clamp(min=0)
            chosen_lp[:, t] = torch.where(
                live, logprobs.gather(-1, safe[:, None]).squeeze(-1), float("nan")
            )
            if t < k:
                ctx = StepContext(
                    logprobs,
                    logprobs if samp is last else samp.log_softmax(-1),
                    safe,
                    base.logprobs if base is not None else None,
                )
                for name in capture.step_scores:
                    scores[name][:, t] = torch.where(live, STEP_SCORES[name](ctx), float("nan"))
                if top_ids is not None:
                    v, i = logprobs.topk(capture.top_m, dim=-1)
                    top_ids[:, t], top_p[:, t] = (
                        i,
                        torch.where(live[:, None], v.exp(), float("nan")),
                    )
            if sampling.stop_at_eos:
                done = done | (live & torch.isin(nxt, stops))
            if t == n_steps - 1 or (sampling.stop_at_eos and bool(done.all())):
                break
            pos = t0 + t
            roles[:, pos] = int(Role.GEN)
            rec.mark_generated(pos)
            attn_mask[:, pos] = 1
            if base is not None and t + 1 < k:
                state.phase = "baseline"
                base.step(safe)
            state.phase, state.step = "step", t + 1
            logits, cache = forward(
                model.embed(safe[:, None]), attn_mask[:, : pos + 1], next_pos + t, cache, {}
            )
            for obs in observers:
                obs.observe(state, logits)

    # NaN/inf logits make a live row's entropy NaN; checked once here instead of every step.
    bad = ent.isnan() & (tokens >= 0)
    if bool(bad.any()):
        step = int(bad.any(0).nonzero()[0, 0])
        raise InputError(
            f"Model produced NaN/inf logits at step {step}; check RSP scale and inputs."
        )
    n_gen = (tokens >= 0).sum(-1)
    # steps a row never generated (it had stopped) hold values computed from a dummy token
    not_generated = torch.arange(n_steps, device=dev)[:, None] >= n_gen[None, :]  # [S, B]
    if rec.attn is not None:
        rec.attn.masked_fill_(not_generated[:, None, :, None, None], float("nan"))
    if rec.resid is not None:
        rec.resid.masked_fill_(not_generated[:, None, :], float("nan"))
    texts = [
        model.tokenizer.decode([x for x in row if x >= 0], skip_special_tokens=True)
        for row in tokens.tolist()
    ]
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    return GenerationOutput(
        tokens=tokens.cpu(),
        n_generated=n_gen.cpu(),
        texts=texts,
        entropy=ent.cpu(),
        chosen_logprob=chosen_lp.cpu(),
        step_scores={n: s.cpu() for n, s in scores.items()},
        top_m_ids=cpu(top_ids),
        top_m_probs=cpu(top_p),
        attn=cpu(rec.attn),
        resid=cpu(rec.resid),
        prefill_resid=cpu(rec.prefill_resid),
        prefill_attn=cpu(rec.prefill_attn),
        batch=batch,
        extra={"engine": "lean" if lean is not None else "bridge"},
    )


class _Baseline:
    """The paired no-RSP stream, teacher-forced on the RSP run's tokens (for KL)."""

    def __init__(
        self, model: Any, prompts: list[TokenizedPrompt], forward: Forward, fwd_kwargs: dict
    ) -> None:
        self.model, self.forward, self.fwd_kwargs = model, forward, fwd_kwargs
        self.batch = build_batch(model, prompts, None)
        self.logprobs: torch.Tensor | None = None
        self.cache = None
        self.mask = self.batch.attention_mask
        self.pos = self.batch.position_ids[:, -1:]

    def prefill(self) -> None:
        logits, self.cache = self.forward(
            self.batch.inputs_embeds,
            self.mask,
            self.batch.position_ids,
            self.cache,
            self.fwd_kwargs,
        )
        self.logprobs = logits[:, -1].float().log_softmax(-1)

    def step(self, token: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos + 1
        logits, self.cache = self.forward(
            self.model.embed(token[:, None]), self.mask, self.pos, self.cache, {}
        )
        self.logprobs = logits[:, -1].float().log_softmax(-1)


def _accepts(module: Any, kwarg: str) -> bool:
    try:
        return kwarg in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _bridge_forward(model: Any) -> Forward:
    """One (cached) forward through the bridge, so every hook point fires."""

    def forward(embeds, mask, pos, cache, kwargs):
        return model.bridge(
            embeds,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            return_type="logits_and_cache",
            use_cache=True,
            **kwargs,
        )

    return forward

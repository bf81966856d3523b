"""Per-step scores as named, pluggable pieces (in the spirit of Inseq's step-score registry).

A step score maps a :class:`StepContext` to one value per row. Register new ones with
``@register_step_score("name")``; the engine computes the ones named in ``CaptureConfig``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """What a step score can look at, for one generation step of a batch."""

    logprobs: torch.Tensor  # [B, V] model distribution (temperature 1), float32
    sampling_logprobs: torch.Tensor  # [B, V] the distribution tokens are drawn from
    chosen: torch.Tensor  # [B] the token chosen at this step
    baseline_logprobs: torch.Tensor | None = None  # [B, V] paired no-RSP run on the same prefix


StepScore = Callable[[StepContext], torch.Tensor]
STEP_SCORES: dict[str, StepScore] = {}


def register_step_score(name: str) -> Callable[[StepScore], StepScore]:
    def deco(fn: StepScore) -> StepScore:
        STEP_SCORES[name] = fn
        return fn

    return deco


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of a log-probability matrix (0 log 0 = 0)."""
    p = logprobs.exp()
    return -(p * logprobs.nan_to_num(neginf=0.0)).sum(-1)


@register_step_score("entropy")
def _entropy(ctx: StepContext) -> torch.Tensor:
    return entropy(ctx.logprobs)


@register_step_score("sampling_entropy")
def _sampling_entropy(ctx: StepContext) -> torch.Tensor:
    return entropy(ctx.sampling_logprobs)


@register_step_score("top1_prob")
def _top1(ctx: StepContext) -> torch.Tensor:
    return ctx.logprobs.max(-1).values.exp()


@register_step_score("chosen_logprob")
def _chosen(ctx: StepContext) -> torch.Tensor:
    return ctx.logprobs.gather(-1, ctx.chosen[:, None]).squeeze(-1)


@register_step_score("kl_to_baseline")
def _kl(ctx: StepContext) -> torch.Tensor:
    """KL(p_RSP || p_baseline) in nats; NaN when no paired baseline ran."""
    if ctx.baseline_logprobs is None:
        return torch.full_like(ctx.logprobs[:, 0], float("nan"))
    p = ctx.logprobs.exp()
    return (p * (ctx.logprobs - ctx.baseline_logprobs)).sum(-1)

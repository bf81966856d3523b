"""Capture reductions computed inside hooks, on the fly.

Full ``T x T`` attention patterns are never stored: at each generation step and layer the
recorder reduces the new query's attention row to its mass on four key groups, and the residual
stream to a norm. Memory grows with steps x layers x heads, not with steps squared.

Step ``t`` is the forward pass that produces the distribution of generated token ``t``; step 0 is
the last position of the prefill. Residual "layer ``l``" is the stream entering block ``l``
(TransformerLens's ``resid_pre``); layer ``n_layers`` is the output of the last block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rsp_interp.injection import Role

ATTN_GROUPS = ("rsp", "bos", "prompt", "gen")
"""Key groups of the attention-mass capture; ``gen`` includes the current query token itself."""


@dataclass(frozen=True)
class CaptureConfig:
    """Which reductions to record. ``CaptureConfig.off()`` records none (fastest)."""

    attention: bool = True
    residual: bool = True
    prefill: bool = True
    first_k: int = 16
    step_scores: tuple[str, ...] = ("top1_prob", "sampling_entropy", "kl_to_baseline")
    top_m: int = 0
    paired_baseline: bool = False

    @classmethod
    def scores_only(
        cls, k: int, step_scores: tuple[str, ...], paired_baseline: bool = False
    ) -> CaptureConfig:
        """Only per-step scores for the first ``k`` steps: no attention/residual (fast)."""
        return cls(
            attention=False,
            residual=False,
            prefill=False,
            first_k=k,
            step_scores=step_scores,
            paired_baseline=paired_baseline,
        )

    @classmethod
    def off(cls) -> CaptureConfig:
        return cls(attention=False, residual=False, prefill=False, first_k=0, step_scores=())


@dataclass
class RunState:
    """Live state of one generation run, shared with capture and intervention hooks."""

    roles: torch.Tensor  # [B, T + S] int8, generated positions marked Role.GEN as they appear
    prefill_len: int
    phase: str = "prefill"  # "prefill" | "step" | "baseline"
    step: int = 0

    @property
    def kv_len(self) -> int:
        return self.prefill_len + self.step if self.phase == "step" else self.prefill_len


class Recorder:
    """Holds preallocated capture buffers and produces the hooks that fill them."""

    def __init__(
        self,
        cfg: CaptureConfig,
        state: RunState,
        n_layers: int,
        n_heads: int,
        n_steps: int,
        device: torch.device,
    ):
        self.cfg, self.state = cfg, state
        b = state.roles.shape[0]
        t = state.prefill_len
        f32 = dict(device=device, dtype=torch.float32)
        # one-hot key groups [B, T+S, 4]: rsp, bos, prompt, gen
        roles = state.roles
        self.groups = torch.stack(
            [
                roles == int(Role.RSP),
                roles == int(Role.BOS),
                roles == int(Role.PROMPT),
                roles == int(Role.GEN),
            ],
            dim=-1,
        ).to(**f32)
        self.attn = (
            torch.full((n_steps, n_layers, b, n_heads, 4), float("nan"), **f32)
            if cfg.attention
            else None
        )
        self.resid = (
            torch.full((n_steps, n_layers + 1, b), float("nan"), **f32) if cfg.residual else None
        )
        self.prefill_resid = (
            torch.full((n_layers + 1, b, t), float("nan"), **f32)
            if cfg.residual and cfg.prefill
            else None
        )
        self.prefill_attn = (
            torch.full((n_layers, b, n_heads), float("nan"), **f32)
            if cfg.attention and cfg.prefill
            else None
        )
        self.n_layers = n_layers
        rsp_keys = roles[:, :t] == int(Role.RSP)
        # prompt queries that can see at least one RSP key (RSP before them)
        seen = rsp_keys.long().cumsum(-1) > 0
        self._prefill_queries = (
            (roles[:, :t] != int(Role.RSP)) & (roles[:, :t] != int(Role.PAD)) & seen
        ).to(**f32)  # [B, T]
        self._rsp_keys = rsp_keys.to(**f32)

    def mark_generated(self, position: int) -> None:
        self.groups[:, position, 3] = 1.0

    def hooks(self) -> list[tuple[str, Callable]]:
        hooks: list[tuple[str, Callable]] = []
        if self.attn is not None:
            hooks += [
                (f"blocks.{layer}.attn.hook_pattern", self._attn_hook(layer))
                for layer in range(self.n_layers)
            ]
        if self.resid is not None:
            hooks += [
                (f"blocks.{layer}.hook_resid_pre", self._resid_hook(layer))
                for layer in range(self.n_layers)
            ]
            hooks.append(
                (f"blocks.{self.n_layers - 1}.hook_resid_post", self._resid_hook(self.n_layers))
            )
        return hooks

    def _attn_hook(self, layer: int) -> Callable:
        def hook(pattern: torch.Tensor, hook=None) -> torch.Tensor:
            st = self.state
            if st.phase == "baseline":
                return pattern
            k = pattern.shape[-1]
            last = pattern[:, :, -1, :].float()  # [B, H, K]
            self.attn[st.step, layer] = torch.bmm(last, self.groups[:, :k, :])
            if st.phase == "prefill" and self.prefill_attn is not None:
                to_rsp = (pattern.float() * self._rsp_keys[:, None, None, :k]).sum(-1)  # [B,H,Q]
                q = self._prefill_queries[:, None, :]
                self.prefill_attn[layer] = (to_rsp * q).sum(-1) / q.sum(-1)
            return pattern

        return hook

    def _resid_hook(self, layer: int) -> Callable:
        def hook(resid: torch.Tensor, hook=None) -> torch.Tensor:
            st = self.state
            if st.phase == "baseline":
                return resid
            norms = resid.float().norm(dim=-1)  # [B, Q]
            self.resid[st.step, layer] = norms[:, -1]
            if st.phase == "prefill" and self.prefill_resid is not None:
                self.prefill_resid[layer] = norms
            return resid

        return hook

"""Capture reductions computed inside hooks, on the fly.

Full ``T x T`` attention patterns are never stored: at each generation step and layer the
recorder reduces the new query's attention row to its mass on four key groups, and the residual
stream to a norm. Memory grows with steps x layers x heads, not with steps squared.

Step ``t`` is the forward pass that produces the distribution of generated token ``t``; step 0 is
the last position of the prefill. Residual "layer ``l``" is the stream entering block ``l``
(TransformerLens's ``resid_pre``); layer ``n_layers`` is the output of the last block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
        """TransformerLens hooks (bridge path) that fill the buffers."""
        hooks: list[tuple[str, Callable]] = []
        if self.attn is not None:
            hooks += [
                (f"blocks.{layer}.attn.hook_pattern", self._tl_hook(self.record_attention, layer))
                for layer in range(self.n_layers)
            ]
        if self.resid is not None:
            hooks += [
                (f"blocks.{layer}.hook_resid_pre", self._tl_hook(self.record_residual, layer))
                for layer in range(self.n_layers)
            ]
            hooks.append(
                (
                    f"blocks.{self.n_layers - 1}.hook_resid_post",
                    self._tl_hook(self.record_residual, self.n_layers),
                )
            )
        return hooks

    @contextlib.contextmanager
    def attached(
        self, layers: Sequence[torch.nn.Module], attns: Sequence[torch.nn.Module]
    ) -> Iterator[None]:
        """Fill the buffers from plain PyTorch hooks on HF decoder layers and attention modules
        (lean path): a layer's input is ``resid_pre``, the last layer's output ``resid_post``, and
        an attention module's second output its pattern (eager attention)."""
        handles = []
        if self.attn is not None:
            for layer, module in enumerate(attns):
                handles.append(module.register_forward_hook(self._attn_module_hook(layer)))
        if self.resid is not None:
            for layer, module in enumerate(layers):
                handles.append(
                    module.register_forward_pre_hook(
                        self._layer_input_hook(layer), with_kwargs=True
                    )
                )
            handles.append(layers[-1].register_forward_hook(self._layer_output_hook()))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def record_attention(self, layer: int, pattern: torch.Tensor) -> None:
        """Reduce one layer's pattern ``[B, H, Q, K]`` of the current forward."""
        st = self.state
        if st.phase == "baseline":
            return
        k = pattern.shape[-1]
        last = pattern[:, :, -1, :].float()  # [B, H, K]
        self.attn[st.step, layer] = torch.bmm(last, self.groups[:, :k, :])
        if st.phase == "prefill" and self.prefill_attn is not None:
            to_rsp = (pattern.float() * self._rsp_keys[:, None, None, :k]).sum(-1)  # [B, H, Q]
            q = self._prefill_queries[:, None, :]
            self.prefill_attn[layer] = (to_rsp * q).sum(-1) / q.sum(-1)

    def record_residual(self, layer: int, resid: torch.Tensor) -> None:
        """Reduce the residual stream ``[B, Q, d]`` entering block ``layer`` to norms."""
        st = self.state
        if st.phase == "baseline":
            return
        norms = resid.float().norm(dim=-1)  # [B, Q]
        self.resid[st.step, layer] = norms[:, -1]
        if st.phase == "prefill" and self.prefill_resid is not None:
            self.prefill_resid[layer] = norms

    @staticmethod
    def _tl_hook(record: Callable, layer: int) -> Callable:
        def hook(x: torch.Tensor, hook=None) -> torch.Tensor:
            record(layer, x)
            return x

        return hook

    def _attn_module_hook(self, layer: int) -> Callable:
        def hook(module, args, output) -> None:
            pattern = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if pattern is None:
                raise RuntimeError(
                    f"{type(module).__name__} returned no attention pattern: the attention "
                    "capture needs eager attention (or pass engine='bridge')."
                )
            self.record_attention(layer, pattern)

        return hook

    def _layer_input_hook(self, layer: int) -> Callable:
        def hook(module, args, kwargs) -> None:
            self.record_residual(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def _layer_output_hook(self) -> Callable:
        def hook(module, args, output) -> None:
            self.record_residual(self.n_layers, output[0] if isinstance(output, tuple) else output)

        return hook

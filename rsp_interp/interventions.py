"""Causal interventions that run inside the engine (prefill and every cached step).

Each is an :class:`~rsp_interp.generation.Intervention`: it returns TransformerLens hooks that
read the live :class:`~rsp_interp.captures.RunState` (roles of every position, phase, step), so
the same captures are recorded with the intervention in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rsp_interp.captures import RunState
from rsp_interp.generation import Hook, Intervention
from rsp_interp.injection import Role


class MaskAttentionToRSP(Intervention):
    """Block attention from decision queries to RSP keys, then renormalise.

    Decision queries are the positions whose next-token distribution drives generation: the
    last prefill position (step 0) and every generated token. ``layers``/``heads`` of None mean
    all. Runs on the attention pattern, so it works for any architecture the bridge hooks.
    """

    def __init__(self, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None):
        self.layers = None if layers is None else sorted(set(int(x) for x in layers))
        self.heads = None if heads is None else sorted(set(int(x) for x in heads))

    def describe(self) -> dict[str, Any]:
        return {"type": "MaskAttentionToRSP", "layers": self.layers, "heads": self.heads}

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        layers = range(model.n_layers) if self.layers is None else self.layers
        bad = [x for x in layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"Layers {bad} out of range: the model has {model.n_layers} layers.")
        if self.heads is not None and any(not 0 <= h < model.n_heads for h in self.heads):
            raise ValueError(f"Heads {self.heads} out of range: the model has {model.n_heads}.")
        heads = self.heads

        def hook(pattern: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if state.phase == "baseline":
                return pattern
            k = pattern.shape[-1]
            rsp = (state.roles[:, :k] == int(Role.RSP)).to(pattern.dtype)  # [B, K]
            keep = 1.0 - rsp[:, None, None, :]
            new = pattern.clone()
            sel = slice(None) if heads is None else heads
            last = new[:, sel, -1:, :] * keep
            denom = last.sum(-1, keepdim=True).clamp(min=torch.finfo(pattern.dtype).tiny)
            new[:, sel, -1:, :] = last / denom
            return new

        return [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in layers]


class PatchResidualAtRSP(Intervention):
    """Replace the residual stream entering block ``layer`` at the RSP positions (prefill).

    ``replacement`` is ``[B, L_rsp, d_model]``, e.g. the same positions' residual from a control
    run (``zeros`` or ``token`` sampler); see :func:`capture_rsp_residual`.
    """

    def __init__(self, layer: int, replacement: torch.Tensor):
        self.layer, self.replacement = int(layer), replacement

    def describe(self) -> dict[str, Any]:
        return {
            "type": "PatchResidualAtRSP",
            "layer": self.layer,
            "shape": list(self.replacement.shape),
        }

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        if not 0 <= self.layer < model.n_layers:
            raise ValueError(f"Layer {self.layer} out of range: the model has {model.n_layers}.")

        def hook(resid: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if state.phase != "prefill":
                return resid
            mask = state.roles[:, : resid.shape[1]] == int(Role.RSP)
            n = int(mask.sum())
            if n != self.replacement[:, :, 0].numel():
                raise ValueError(
                    f"Replacement has {tuple(self.replacement.shape)} RSP vectors but the batch "
                    f"has {n} RSP positions: capture it from a control run with the same rows "
                    "and L."
                )
            resid = resid.clone()
            resid[mask] = self.replacement.to(resid.device, resid.dtype).reshape(n, -1)
            return resid

        return [(f"blocks.{self.layer}.hook_resid_pre", hook)]


def capture_rsp_residual(model: Any, batch: Any, layer: int) -> torch.Tensor:
    """Residual entering block ``layer`` at the RSP positions of an injected batch ``[B, L, d]``."""
    store: dict[str, torch.Tensor] = {}

    def hook(resid: torch.Tensor, hook: Any = None) -> torch.Tensor:
        store["x"] = resid.detach()
        return resid

    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)]):
        model.bridge(
            batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
    mask = batch.roles == int(Role.RSP)
    n_rows = batch.n_rows
    return store["x"][mask].reshape(n_rows, -1, store["x"].shape[-1])

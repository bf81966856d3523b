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

QUERY_SETS = ("decision", "all")
"""Which queries :class:`MaskAttentionToRSP` blocks from the RSP keys."""


def _query_roles(state: RunState, n_queries: int) -> torch.Tensor:
    """Roles of the ``n_queries`` positions of the current forward pass ``[B, n_queries]``.

    They are the last ``n_queries`` of the ``state.kv_len`` positions seen so far: the whole
    prompt in a full prefill, the new token in a cached step, and a suffix of the prompt when the
    prefill runs on top of a cached prefix.
    """
    end = state.kv_len
    return state.roles[:, end - n_queries : end]


class MaskAttentionToRSP(Intervention):
    """Block attention from decision queries to RSP keys, then renormalise.

    Decision queries are the positions whose next-token distribution drives generation: the
    last prefill position (step 0) and every generated token. ``layers``/``heads`` of None mean
    all. Runs on the attention pattern, so it works for any architecture the bridge hooks.

    ``queries="all"`` masks the RSP keys for *every* query of the forward pass (prompt and header
    tokens after the RSP, and the RSP positions themselves): the RSP is then invisible to
    attention in those layers and reaches the output only through its own residual streams.
    """

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        queries: str = "decision",
    ):
        if queries not in QUERY_SETS:
            raise ValueError(f"queries must be one of {', '.join(QUERY_SETS)}, got {queries!r}.")
        self.layers = None if layers is None else sorted(set(int(x) for x in layers))
        self.heads = None if heads is None else sorted(set(int(x) for x in heads))
        self.queries = queries

    def describe(self) -> dict[str, Any]:
        out = {"type": "MaskAttentionToRSP", "layers": self.layers, "heads": self.heads}
        if self.queries != "decision":
            out["queries"] = self.queries
        return out

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        layers = range(model.n_layers) if self.layers is None else self.layers
        bad = [x for x in layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"Layers {bad} out of range: the model has {model.n_layers} layers.")
        if self.heads is not None and any(not 0 <= h < model.n_heads for h in self.heads):
            raise ValueError(f"Heads {self.heads} out of range: the model has {model.n_heads}.")
        heads, every_query = self.heads, self.queries == "all"

        def hook(pattern: torch.Tensor, hook: Any = None) -> torch.Tensor:
            if state.phase == "baseline":
                return pattern
            k = pattern.shape[-1]
            rsp = (state.roles[:, :k] == int(Role.RSP)).to(pattern.dtype)  # [B, K]
            keep = 1.0 - rsp[:, None, None, :]
            new = pattern.clone()
            sel = slice(None) if heads is None else heads
            rows = slice(None) if every_query else slice(-1, None)
            last = new[:, sel, rows, :] * keep
            denom = last.sum(-1, keepdim=True).clamp(min=torch.finfo(pattern.dtype).tiny)
            new[:, sel, rows, :] = last / denom
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
            mask = _query_roles(state, resid.shape[1]) == int(Role.RSP)
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


class RecordResidualAtRSP(Intervention):
    """Record (without changing it) the residual entering blocks ``layers`` at the RSP positions.

    Prefill only. After the run, ``values[layer]`` is ``[B, L_rsp, d_model]``, the replacement
    :class:`PatchResidualAtRSP` expects: one forward pass of a control run records every layer.
    Rows must all hold the same number of RSP positions (they do for batches of one RSP length).
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = sorted(set(int(x) for x in layers))
        self.values: dict[int, torch.Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {"type": "RecordResidualAtRSP", "layers": self.layers}

    def hooks(self, state: RunState, model: Any) -> list[Hook]:
        bad = [x for x in self.layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"Layers {bad} out of range: the model has {model.n_layers} layers.")

        def make(layer: int) -> Any:
            def hook(resid: torch.Tensor, hook: Any = None) -> torch.Tensor:
                if state.phase != "prefill":
                    return resid
                mask = _query_roles(state, resid.shape[1]) == int(Role.RSP)
                picked = resid[mask].detach().clone()
                self.values[layer] = picked.reshape(resid.shape[0], -1, resid.shape[-1])
                return resid

            return hook

        return [(f"blocks.{layer}.hook_resid_pre", make(layer)) for layer in self.layers]


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

"""The lean forward path: the wrapped Hugging Face modules run without the bridge.

The TransformerLens bridge puts hook points on every module and re-implements attention in
Python; on a CPU that costs about 0.1 s per forward whatever the batch (measured on
SmolLM2-135M, where a whole batch-8 step takes 0.3 s). When a run needs no TransformerLens hook
(no intervention, no user hook) the engine runs the original HF modules instead:

- with no capture, with the fused ``sdpa`` attention where the model supports it;
- with captures, with an eager attention that returns the pattern
  (:func:`grouped_eager_attention`) and plain PyTorch hooks on each decoder layer and attention
  module, feeding the same :class:`~rsp_interp.captures.Recorder` reductions as the bridge's
  hook points;
- in both, linear layers that pick a faster CPU kernel for a few rows (:class:`FewRowsLinear`).

Models whose attention code does not dispatch through transformers' ``AttentionInterface``
record captures through the bridge instead.

Both share every weight with the bridge (no copy). Tests check that logits and every capture
match the bridge path.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

CAPTURE_ATTENTION = "rsp_interp_eager"
"""Attention implementation of the lean capture path (registered with transformers below)."""


def grouped_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that returns the pattern, without copying grouped K/V per query head.

    Same result as the usual eager code (``repeat_kv``, ``QK^T``, mask, softmax, ``PV``), but
    the query heads of a group share one matmul against their K/V head, so a decoding step
    does not copy the whole cache ``num_key_value_groups`` times. Anything beyond plain
    attention (logit soft-capping, attention sinks, dropout in training) goes to the model's own
    eager function.
    """
    h, hkv = query.shape[1], key.shape[1]
    plain = (
        kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and getattr(module, "sinks", None) is None
        and getattr(module, "attn_logit_softcapping", None) is None
        and not (module.training and dropout)
        and h % hkv == 0
    )
    if not plain:
        return _model_eager(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    b, _, q, d = query.shape
    rep = h // hkv
    scaling = d**-0.5 if scaling is None else scaling
    grouped = query.reshape(b, hkv, rep * q, d)
    weights = torch.matmul(grouped, key.transpose(2, 3)).view(b, h, q, -1) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.view(b, hkv, rep * q, -1), value).view(b, h, q, -1)
    return out.transpose(1, 2).contiguous(), weights


def _model_eager(module: torch.nn.Module) -> Any:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"{type(module).__name__} needs its own eager attention, which rsp-interp could not "
            "find: run with engine='bridge'."
        )
    return fn


AttentionInterface.register(CAPTURE_ATTENTION, grouped_eager_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, eager_mask)


@dataclass
class LeanModel:
    """An unwrapped HF model plus its decoder layers and attention modules, in layer order.

    ``layers``/``attns`` are None when they could not be matched to the bridge's blocks; the
    engine then records captures through the bridge.
    """

    module: torch.nn.Module
    layers: list[torch.nn.Module] | None
    attns: list[torch.nn.Module] | None
    fast_attention: str  # "sdpa" where supported, else the model's own implementation

    def forward(self, embeds, mask, pos, cache, kwargs) -> tuple[torch.Tensor, Any]:
        """One (cached) forward; returns logits and the cache."""
        out = self.module(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits, out.past_key_values

    @contextlib.contextmanager
    def attention(self, implementation: str) -> Iterator[None]:
        """Run with attention ``implementation`` (``CAPTURE_ATTENTION``, ``fast_attention``)
        for the duration of the block."""
        config = self.module.config
        saved = config._attn_implementation
        config._attn_implementation = implementation
        try:
            yield
        finally:
            config._attn_implementation = saved


def lean_model(model: Any) -> LeanModel:
    """The :class:`LeanModel` of a loaded model, built once and kept in ``model.extra``."""
    lean = model.extra.get("_lean")
    if lean is None:
        module, memo = _unwrap(model.hf_model)
        layers = attns = None
        blocks = getattr(model.bridge, "blocks", None)
        if blocks:
            layers = [memo.get(id(getattr(b, "original_component", None))) for b in blocks]
            attns = [
                memo.get(id(getattr(getattr(b, "attn", None), "original_component", None)))
                for b in blocks
            ]
            if any(x is None for x in layers + attns) or not all(
                map(_dispatches, {type(a) for a in attns})
            ):
                layers = attns = None
        # _unwrap already chose the copy's fast implementation (sdpa where supported)
        lean = model.extra["_lean"] = LeanModel(
            module, layers, attns, module.config._attn_implementation
        )
    return lean


def _dispatches(attn_class: type) -> bool:
    """Whether an HF attention class picks its kernel from transformers' AttentionInterface
    (so the capture path can make it return the pattern); older or custom code may not."""
    try:
        source = inspect.getsource(attn_class.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def unwrapped_hf_model(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model with every bridge component swapped back for the module it wraps.

    The bridge replaces the HF modules in place (adding hook points and an eager re-implementation
    of attention). This returns a structural copy that shares every parameter and buffer (no
    weight is copied) and runs the original HF forward code, with its own copy of the config so
    its attention implementation can change without touching the bridge.
    """
    return _unwrap(hf_model)[0]


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _unwrap(hf_model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, torch.nn.Module]]:
    """:func:`unwrapped_hf_model` plus a map from id(original HF module) to its copy."""
    config = copy.deepcopy(hf_model.config)
    if getattr(hf_model, "_supports_sdpa", False):
        config._attn_implementation = "sdpa"
    memo: dict[int, torch.nn.Module] = {}

    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        orig = getattr(module, "original_component", None)
        src = orig if isinstance(orig, torch.nn.Module) else module
        if id(src) in memo:
            return memo[id(src)]
        new = copy.copy(src)
        memo[id(src)] = new
        new._modules = {n: (None if c is None else unwrap(c)) for n, c in src._modules.items()}
        for name in _HOOK_DICTS:  # copy.copy shares them: hooks on the copy stay on the copy
            if hasattr(src, name):
                setattr(new, name, type(getattr(src, name))())
        if getattr(src, "config", None) is hf_model.config:
            new.config = config
        if type(src) is torch.nn.Linear:
            new.__class__ = FewRowsLinear
        return new

    return unwrap(hf_model).eval(), memo


class FewRowsLinear(torch.nn.Linear):
    """``nn.Linear`` that computes ``(W @ x.T).T`` when the input has few rows, on the CPU.

    For a handful of rows (a batch of cached decoding steps) MKL's kernel for ``x @ W.T`` is far
    from its best: on 2 cores, SmolLM2-135M's linear layers plus LM head per decoding step took
    126 ms at 8 rows and 268 ms at 32 with ``F.linear``, 66 ms and 201 ms as ``W @ x.T`` (same
    FLOPs, another kernel), and the transposed form loses from about 256 rows on. Results agree
    to float32 rounding (another summation order). Only the lean path's copies use it.
    """

    min_rows, max_rows = 2, 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not self.min_rows <= rows <= self.max_rows or x.device.type != "cpu":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], self.weight.shape[0])


class PreallocLayer(DynamicLayer):
    """A dynamic KV-cache layer that writes into a buffer sized for the whole run (no re-copy of
    the cache at every step, as ``torch.cat`` does); keys/values are views of the buffer.

    ``n_rep > 1`` stores grouped-query K/V already repeated per query head (as ``repeat_kv``
    would), so attention code run with ``num_key_value_groups = 1`` does not copy the whole
    cache at every step; see :func:`kv_groups_of_one`.
    """

    def __init__(self, capacity: int, n_rep: int = 1) -> None:
        super().__init__()
        self.capacity, self.n_rep = capacity, n_rep

    def update(self, key_states, value_states, *args, **kwargs):
        if self.n_rep > 1:
            key_states = key_states.repeat_interleave(self.n_rep, dim=1)
            value_states = value_states.repeat_interleave(self.n_rep, dim=1)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self._n = 0
        n, q = self._n, key_states.shape[-2]
        if n + q > self.capacity:  # more positions than planned: fall back to growing
            self._k = torch.cat([self._k[..., :n, :], key_states], dim=-2)
            self._v = torch.cat([self._v[..., :n, :], value_states], dim=-2)
            self.capacity = n + q
        else:
            self._k[..., n : n + q, :] = key_states
            self._v[..., n : n + q, :] = value_states
        self._n = n + q
        self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]
        return self.keys, self.values


def preallocated_cache(hf_model: Any, capacity: int, n_rep: int = 1) -> Any:
    """A ``DynamicCache`` for ``hf_model`` whose plain (full-attention) layers are preallocated;
    None (the model builds its own) when the model's cache layers are not all plain."""
    try:
        cache = DynamicCache(config=hf_model.config)
    except Exception:  # unusual configs: let the model create its cache
        return None
    if not cache.layers:
        cache = DynamicCache()
        cache.layer_class_to_replicate = lambda: PreallocLayer(capacity, n_rep)
        return cache
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None if n_rep > 1 else cache  # sliding windows etc.: keep HF's own layers
    cache.layers = [PreallocLayer(capacity, n_rep) for _ in cache.layers]
    return cache


def bridge_grouped_attns(model: Any) -> list[torch.nn.Module]:
    """The HF attention modules whose bridge repeats grouped K/V heads at every step.

    Only for bridges that re-implement attention via ``num_key_value_groups`` on the wrapped
    module (``PositionEmbeddingsAttentionBridge``: Llama, Qwen, Mistral, ...), with one group
    size for all layers; otherwise empty (the bridge then repeats K/V as usual).
    """
    blocks = getattr(model.bridge, "blocks", None)
    if not blocks:
        return []
    mods = []
    for block in blocks:
        attn = getattr(block, "attn", None)
        if type(attn).__name__ != "PositionEmbeddingsAttentionBridge":
            return []
        mods.append(attn.original_component)
    groups = {getattr(m, "num_key_value_groups", 1) for m in mods}
    return mods if len(groups) == 1 and groups.pop() > 1 else []


@contextlib.contextmanager
def kv_groups_of_one(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Temporarily tell attention modules that K/V come already repeated (see PreallocLayer)."""
    saved = [m.num_key_value_groups for m in modules]
    try:
        for m in modules:
            m.num_key_value_groups = 1
        yield
    finally:
        for m, g in zip(modules, saved, strict=True):
            m.num_key_value_groups = g

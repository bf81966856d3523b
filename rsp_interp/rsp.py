"""Random Soft Prompts: fit embedding-table statistics and draw RSP vectors.

The paper's RSP (``isotropic``, the default) draws every entry i.i.d. from N(mu, sigma^2), with
mu and sigma^2 the scalar mean and variance over *all* entries of W_E. The other kinds are
controls that separate randomness, norm and novelty.

Every draw is made on the CPU from its own ``torch.Generator`` seeded with an explicit
``rsp_seed``, so any single RSP can be redrawn exactly (and identically on any device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from rsp_interp.errors import InputError

RSP_KINDS = ("isotropic", "diagonal", "norm-matched", "token", "zeros", "tensor")
"""``tensor`` is a user-supplied ``[L, d_model]`` tensor (e.g. a trained soft prompt)."""


@dataclass(frozen=True)
class RSPConfig:
    """What to inject: kind, length L, sigma scale (dose), placement and base seed.

    ``scale`` multiplies sigma (isotropic, diagonal), the target norm (norm-matched) or the
    deviation from the mean embedding (token, tensor); ``zeros`` ignores it.
    ``length=0`` means no RSP (the baseline condition).
    """

    kind: str = "isotropic"
    length: int = 10
    scale: float = 1.0
    position: str = "end"
    seed: int = 0

    def __post_init__(self) -> None:
        from rsp_interp.injection import POSITIONS

        if self.kind not in RSP_KINDS:
            raise InputError(
                f"Unknown RSP kind {self.kind!r}: choose one of {', '.join(RSP_KINDS)}."
            )
        if self.length < 0:
            raise InputError(f"RSP length must be >= 0 (0 = no RSP), got {self.length}.")
        if not np.isfinite(self.scale) or self.scale < 0:
            raise InputError(f"RSP scale must be a finite number >= 0, got {self.scale}.")
        if self.position not in POSITIONS:
            raise InputError(
                f"Unknown RSP position {self.position!r}: choose one of {', '.join(POSITIONS)}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EmbeddingStats:
    """Statistics of W_E that the samplers need (all on the CPU, float64 where scalar)."""

    mean: float  # over all entries
    var: float  # over all entries (population variance)
    dim_mean: torch.Tensor  # [d_model]
    dim_var: torch.Tensor  # [d_model]
    mean_row_norm: float
    vocab_size: int
    d_model: int

    @classmethod
    def fit(cls, w_e: torch.Tensor) -> EmbeddingStats:
        w = w_e.detach().to("cpu", torch.float64)
        if w.ndim != 2:
            raise InputError(f"W_E must be [vocab, d_model], got shape {tuple(w.shape)}.")
        if not torch.isfinite(w).all():
            raise InputError("W_E contains NaN or inf; the model's embedding table is corrupt.")
        return cls(
            mean=float(w.mean()),
            var=float(w.var(unbiased=False)),
            dim_mean=w.mean(0).float(),
            dim_var=w.var(0, unbiased=False).float(),
            mean_row_norm=float(w.norm(dim=1).mean()),
            vocab_size=w.shape[0],
            d_model=w.shape[1],
        )

    def summary(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.var**0.5, "mean_row_norm": self.mean_row_norm}


def derive_seed(base_seed: int, *keys: int) -> int:
    """A 63-bit seed for one (prompt, sample, ...) cell, stable across runs and platforms."""
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, *[int(k) for k in keys]])
    hi, lo = (int(w) for w in state.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)  # exact integer math: all 63 bits vary


class RSPSampler:
    """Draws ``[L, d_model]`` RSPs of one kind from fitted statistics.

    ``w_e`` is needed for ``token``; ``exclude_token_ids`` keeps special tokens out of it.
    ``tensor`` is needed for ``tensor``.
    """

    def __init__(
        self,
        stats: EmbeddingStats,
        config: RSPConfig,
        w_e: torch.Tensor | None = None,
        exclude_token_ids: list[int] | None = None,
        tensor: torch.Tensor | None = None,
    ):
        self.stats, self.config = stats, config
        self._w_e = w_e.detach().to("cpu", torch.float32) if w_e is not None else None
        allowed = torch.ones(stats.vocab_size, dtype=torch.bool)
        if exclude_token_ids:
            allowed[torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)] = False
        self._token_pool = allowed.nonzero().squeeze(1)
        if config.kind == "token" and self._w_e is None:
            raise InputError("The 'token' RSP kind needs the embedding table: pass w_e=W_E.")
        self._tensor = None
        if config.kind == "tensor":
            self._tensor = _check_user_tensor(tensor, config.length, stats.d_model)

    @classmethod
    def for_model(cls, model: Any, config: RSPConfig, tensor: torch.Tensor | None = None):
        """Fit W_E of a :class:`~rsp_interp.models.LoadedModel` and build its sampler."""
        w_e = model.embedding_matrix
        special = list(getattr(model.tokenizer, "all_special_ids", []) or [])
        return cls(
            EmbeddingStats.fit(w_e), config, w_e=w_e, exclude_token_ids=special, tensor=tensor
        )

    def draw(self, rsp_seed: int) -> torch.Tensor:
        """One RSP, ``[L, d_model]`` float32 on the CPU. Same seed, same vectors."""
        cfg, st = self.config, self.stats
        g = torch.Generator().manual_seed(int(rsp_seed))
        shape = (cfg.length, st.d_model)
        if cfg.kind == "isotropic":
            return st.mean + cfg.scale * st.var**0.5 * torch.randn(shape, generator=g)
        if cfg.kind == "diagonal":
            return st.dim_mean + cfg.scale * st.dim_var.sqrt() * torch.randn(shape, generator=g)
        if cfg.kind == "norm-matched":
            x = st.mean + st.var**0.5 * torch.randn(shape, generator=g)
            return x / x.norm(dim=1, keepdim=True) * (st.mean_row_norm * cfg.scale)
        if cfg.kind == "token":
            idx = self._token_pool[torch.randint(len(self._token_pool), (cfg.length,), generator=g)]
            return self._rescale(self._w_e[idx])
        if cfg.kind == "zeros":
            return torch.zeros(shape)
        assert self._tensor is not None
        return self._rescale(self._tensor)

    def _rescale(self, x: torch.Tensor) -> torch.Tensor:
        """``mean + scale * (x - mean)``; exactly ``x`` at scale 1 (no float round trip)."""
        if self.config.scale == 1:
            return x.clone()
        return self.stats.mean + self.config.scale * (x - self.stats.mean)

    def draw_token_ids(self, rsp_seed: int) -> torch.Tensor:
        """For ``token``: which token ids the draw with this seed used."""
        g = torch.Generator().manual_seed(int(rsp_seed))
        return self._token_pool[
            torch.randint(len(self._token_pool), (self.config.length,), generator=g)
        ]

    def draw_batch(self, rsp_seeds: list[int]) -> torch.Tensor:
        """``[B, L, d_model]``, one fresh RSP per seed."""
        if not rsp_seeds:
            return torch.zeros(0, self.config.length, self.stats.d_model)
        return torch.stack([self.draw(s) for s in rsp_seeds])


def _check_user_tensor(tensor: torch.Tensor | None, length: int, d_model: int) -> torch.Tensor:
    if tensor is None:
        raise InputError("RSP kind 'tensor' needs a tensor of shape [L, d_model]: pass tensor=...")
    t = torch.as_tensor(tensor).detach().to("cpu", torch.float32)
    if t.ndim != 2 or t.shape[1] != d_model:
        raise InputError(
            f"User RSP tensor must be [L, d_model={d_model}], got {tuple(t.shape)}. "
            "Reshape it, or check it was trained for this model."
        )
    if t.shape[0] != length:
        raise InputError(
            f"User RSP tensor has L={t.shape[0]} rows but the config says length={length}; "
            f"set length={t.shape[0]}."
        )
    if not torch.isfinite(t).all():
        raise InputError("User RSP tensor contains NaN or inf; clean it before injecting.")
    return t

"""Tests for rsp_interp.rsp: embedding statistics, every RSP kind, seeding and config checks.

Statistical checks derive their tolerance from the sample size (a few standard errors), and the
synthetic embedding table has dimensions with very different means and variances, so an
isotropic sampler that used per-dimension statistics (or the reverse) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rsp_interp.errors import InputError
from rsp_interp.rsp import RSP_KINDS, EmbeddingStats, RSPConfig, RSPSampler, derive_seed

VOCAB, D = 400, 24
Z = 5.0  # tolerance in standard errors


@pytest.fixture(scope="module")
def w_e() -> torch.Tensor:
    """A synthetic W_E whose dimensions differ in mean (-0.2..0.3) and std (0.05..0.4)."""
    g = torch.Generator().manual_seed(1234)
    dim_mu = torch.linspace(-0.2, 0.3, D)
    dim_sd = torch.linspace(0.05, 0.4, D)
    return dim_mu + dim_sd * torch.randn(VOCAB, D, generator=g)


@pytest.fixture(scope="module")
def stats(w_e) -> EmbeddingStats:
    return EmbeddingStats.fit(w_e)


def sampler(stats, w_e=None, **cfg) -> RSPSampler:
    return RSPSampler(stats, RSPConfig(**cfg), w_e=w_e)


def many_rows(s: RSPSampler, n_seeds: int = 10) -> torch.Tensor:
    """Rows from ``n_seeds`` independent draws, stacked to ``[n_seeds * L, d]`` float64."""
    return torch.cat([s.draw(seed) for seed in range(n_seeds)]).double()


def check_fit(w: torch.Tensor, st: EmbeddingStats) -> None:
    """Compare fitted statistics with numpy's float64 computations on the same table."""
    a = w.detach().cpu().double().numpy()
    assert st.mean == pytest.approx(a.mean(), rel=1e-9, abs=1e-12)
    assert st.var == pytest.approx(a.var(), rel=1e-9)
    np.testing.assert_allclose(st.dim_mean.numpy(), a.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.dim_var.numpy(), a.var(0), rtol=1e-5, atol=1e-9)
    assert st.mean_row_norm == pytest.approx(np.linalg.norm(a, axis=1).mean(), rel=1e-9)
    assert (st.vocab_size, st.d_model) == a.shape


# --- EmbeddingStats -----------------------------------------------------------------------------


def test_fit_matches_direct_statistics(w_e, stats):
    check_fit(w_e, stats)
    assert stats.summary()["std"] == pytest.approx(math.sqrt(stats.var))


@pytest.mark.real
def test_fit_on_real_embedding_table(smollm):
    w = smollm.embedding_matrix
    st = EmbeddingStats.fit(w)
    check_fit(w, st)
    assert (st.vocab_size, st.d_model) == (w.shape[0], smollm.d_model)


def test_fit_rejects_bad_tables():
    with pytest.raises(InputError, match=r"\[vocab, d_model\]"):
        EmbeddingStats.fit(torch.zeros(10))
    bad = torch.zeros(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(InputError, match="NaN or inf"):
        EmbeddingStats.fit(bad)


# --- isotropic (the paper's RSP) ----------------------------------------------------------------


def test_isotropic_entries_have_scalar_mean_and_variance(stats):
    x = many_rows(sampler(stats, length=2000))  # 20000 vectors
    n_vec, n_entries = x.shape[0], x.numel()
    mu, var = stats.mean, stats.var
    sd = math.sqrt(var)
    assert abs(x.mean().item() - mu) < Z * sd / math.sqrt(n_entries)
    assert abs(x.var(unbiased=False).item() - var) < Z * var * math.sqrt(2 / n_entries)
    # isotropy: every dimension has mean mu and variance sigma^2 (not W_E's per-dim values) ...
    se_mean, se_var = sd / math.sqrt(n_vec), var * math.sqrt(2 / n_vec)
    assert (x.mean(0) - mu).abs().max().item() < Z * se_mean
    assert (x.var(0, unbiased=False) - var).abs().max().item() < Z * se_var
    # ... and dimensions are uncorrelated
    centred = x - x.mean(0)
    cov = centred.T @ centred / n_vec
    off = cov[~torch.eye(D, dtype=torch.bool)]
    assert off.abs().max().item() < Z / math.sqrt(n_vec) * var
    # sanity: the table itself is far from isotropic, so the test can tell the kinds apart
    assert (stats.dim_var - var).abs().max().item() > 20 * se_var


def test_isotropic_scale_multiplies_the_std(stats):
    base, scaled = sampler(stats, length=2000), sampler(stats, length=2000, scale=2.5)
    for seed in (0, 1):
        torch.testing.assert_close(
            scaled.draw(seed) - stats.mean, 2.5 * (base.draw(seed) - stats.mean)
        )
    x = many_rows(scaled)
    sd = 2.5 * math.sqrt(stats.var)
    assert abs(x.std().item() - sd) < Z * sd / math.sqrt(2 * x.numel())  # SE of a std


# --- controls -----------------------------------------------------------------------------------


def test_diagonal_matches_per_dimension_statistics(stats):
    x = many_rows(sampler(stats, kind="diagonal", length=2000))
    n = x.shape[0]
    dv = stats.dim_var.double()
    assert ((x.mean(0) - stats.dim_mean.double()).abs() < Z * (dv / n).sqrt()).all()
    assert ((x.var(0, unbiased=False) - dv).abs() < Z * dv * math.sqrt(2 / n)).all()
    y = many_rows(sampler(stats, kind="diagonal", length=2000, scale=0.5))
    assert ((y.var(0, unbiased=False) - 0.25 * dv).abs() < Z * 0.25 * dv * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_norm_matched_rows_have_the_mean_row_norm(stats, scale):
    x = sampler(stats, kind="norm-matched", length=50, scale=scale).draw(3)
    target = torch.full((50,), stats.mean_row_norm * scale)
    torch.testing.assert_close(x.norm(dim=1), target, rtol=1e-5, atol=0)
    assert not torch.allclose(x[0], x[1])  # random directions


def test_token_rows_are_exact_rows_and_never_excluded(w_e, stats):
    excluded = [0, 3, 7, 399]
    s = RSPSampler(stats, RSPConfig(kind="token", length=4000), w_e=w_e, exclude_token_ids=excluded)
    x = s.draw(11)
    match = (x[:, None, :] == w_e[None, :, :]).all(-1)  # [L, vocab] exact row equality
    assert (match.sum(1) == 1).all(), "every RSP row must be exactly one row of W_E"
    used = match.float().argmax(1)
    assert torch.equal(used, s.draw_token_ids(11))
    assert not set(used.tolist()) & set(excluded)
    assert set(used.tolist()) == set(range(VOCAB)) - set(excluded)  # 4000 draws cover the rest
    s2 = RSPSampler(stats, RSPConfig(kind="token", length=50, scale=2.0), w_e=w_e)
    ids = s2.draw_token_ids(5)
    torch.testing.assert_close(s2.draw(5), stats.mean + 2.0 * (w_e[ids] - stats.mean))


def test_token_kind_needs_the_table(stats):
    with pytest.raises(InputError, match="needs the embedding table"):
        sampler(stats, kind="token")


@pytest.mark.real
def test_token_kind_on_real_model_skips_special_tokens(smollm):
    special = set(smollm.tokenizer.all_special_ids)
    assert special
    s = RSPSampler.for_model(smollm, RSPConfig(kind="token", length=20000))
    ids = s.draw_token_ids(0)
    # 20000 draws from ~49k ids would hit the special ids (the first ones) ~7 times by chance
    assert not set(ids.tolist()) & special
    assert torch.equal(s.draw(0), smollm.embedding_matrix.detach()[ids])


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_zeros_are_zeros(stats, scale):
    x = sampler(stats, kind="zeros", length=7, scale=scale).draw(1)
    assert torch.equal(x, torch.zeros(7, D))


def test_tensor_kind_returns_the_tensor_and_validates(stats):
    t = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    s = RSPSampler(stats, RSPConfig(kind="tensor", length=6), tensor=t)
    assert torch.equal(s.draw(0), t) and torch.equal(s.draw(99), t)
    s2 = RSPSampler(stats, RSPConfig(kind="tensor", length=6, scale=2.0), tensor=t)
    torch.testing.assert_close(s2.draw(0), stats.mean + 2.0 * (t - stats.mean))
    cfg = RSPConfig(kind="tensor", length=6)
    with pytest.raises(InputError, match="pass tensor="):
        RSPSampler(stats, cfg)
    with pytest.raises(InputError, match=f"d_model={D}"):
        RSPSampler(stats, cfg, tensor=torch.zeros(6, D + 1))
    with pytest.raises(InputError, match=f"d_model={D}"):
        RSPSampler(stats, cfg, tensor=torch.zeros(6 * D))
    with pytest.raises(InputError, match="set length=5"):
        RSPSampler(stats, cfg, tensor=torch.zeros(5, D))
    nan = t.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(InputError, match="NaN or inf"):
        RSPSampler(stats, cfg, tensor=nan)


# --- seeding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "norm-matched", "token"])
def test_same_seed_same_vectors_different_seed_different(w_e, stats, kind):
    a = sampler(stats, w_e=w_e, kind=kind, length=8)
    b = sampler(stats, w_e=w_e, kind=kind, length=8)
    torch.manual_seed(0)
    x = a.draw(42)
    torch.manual_seed(1)  # the global RNG must not matter
    assert torch.equal(x, b.draw(42))
    assert x.shape == (8, D) and x.dtype == torch.float32
    assert not torch.equal(x, a.draw(43))
    batch = a.draw_batch([5, 6, 42])
    assert torch.equal(batch, torch.stack([a.draw(5), a.draw(6), a.draw(42)]))
    assert not torch.equal(batch[0], batch[1])
    assert a.draw_batch([]).shape == (0, 8, D)


def test_derive_seed_deterministic_distinct_and_63_bit():
    grid = [(p, s) for p in range(30) for s in range(30)]
    seeds = [derive_seed(7, p, s) for p, s in grid]
    assert seeds == [derive_seed(7, p, s) for p, s in grid]
    assert len(set(seeds)) == len(grid)
    assert all(0 <= x < 2**63 for x in seeds)
    # all 63 bits vary: the top bit of the range is set about half the time, and the low bits
    # are not rounded away (they were when the seed went through float arithmetic)
    assert 300 < sum(x >= 2**62 for x in seeds) < 600
    assert len({x & 0xFFFF for x in seeds}) > 0.95 * len(seeds)
    # extra keys and other base seeds give other streams
    sample_seeds = {derive_seed(7, p, s, 1) for p, s in grid}
    assert not sample_seeds & set(seeds)
    assert not {derive_seed(8, p, s) for p, s in grid} & set(seeds)
    torch.Generator().manual_seed(max(seeds))  # usable as a torch seed


# --- config validation --------------------------------------------------------------------------


def test_config_defaults_are_the_paper_setting():
    cfg = RSPConfig()
    assert (cfg.kind, cfg.scale, cfg.position) == ("isotropic", 1.0, "end")
    assert cfg.to_dict()["length"] == cfg.length
    assert "isotropic" in RSP_KINDS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "gaussian"}, "Unknown RSP kind 'gaussian': choose one of isotropic"),
        ({"length": -1}, r"length must be >= 0"),
        ({"scale": -0.5}, r"scale must be a finite number >= 0"),
        ({"scale": float("nan")}, r"scale must be a finite number >= 0"),
        ({"scale": float("inf")}, r"scale must be a finite number >= 0"),
        ({"position": "middle"}, "Unknown RSP position 'middle': choose one of end"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        RSPConfig(**kwargs)
    with pytest.raises(ValueError):  # InputError is a ValueError for plain callers
        RSPConfig(**kwargs)

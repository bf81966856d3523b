"""Tests for rsp_interp.injection: tokenisation, batch layout and roles, and exactness.

Exactness: injecting the token embeddings of some tokens through the RSP path must give exactly
the logits of a plain forward on the token ids with those tokens at the same place -- on a
rotary (tiny-llama) and a learned-position (tiny-gpt2) model, at every position, with left
padding, and once on the real model.
"""

from __future__ import annotations

import pytest
import torch

from rsp_interp.errors import InputError
from rsp_interp.injection import POSITIONS, Role, build_batch, tokenize_prompt
from rsp_interp.prompts import FormattedPrompt, format_prompt
from rsp_interp.tiny import byte_tokenizer

QUESTIONS = ("What is 2+3?", "Tom has 5 apples and eats 2 of them. How many are left?")
SYSTEM = "Be brief."  # short, so real-model forwards stay cheap (SmolLM adds a long default)
L = 3


def formatted(model) -> list[FormattedPrompt]:
    return [format_prompt(q, model.tokenizer, system=SYSTEM) for q in QUESTIONS]


def expected_cut(fp: FormattedPrompt, ids: list[int], tok, position: str) -> int:
    """Where the RSP goes, computed from the header's own tokenisation."""
    header = tok(fp.assistant_header, add_special_tokens=False)["input_ids"]
    assert ids[len(ids) - len(header) :] == header
    return {"end": len(ids), "before-assistant": len(ids) - len(header), "start": 1}[position]


def insert_ids(model, n_rows: int) -> torch.Tensor:
    """``[n_rows, L]`` ordinary (non-special) token ids to inject, different per row."""
    ids = model.tokenizer(" seven apples and pears", add_special_tokens=False)["input_ids"]
    assert len(ids) >= L + n_rows - 1
    return torch.tensor([ids[r : r + L] for r in range(n_rows)])


def token_forward(model, rows: list[list[int]]) -> torch.Tensor:
    """Plain forward of the bridge on left-padded token ids (independent of build_batch)."""
    t = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    pos = torch.tensor([[0] * (t - len(r)) + list(range(len(r))) for r in rows])
    with torch.no_grad():
        return model.bridge(ids, attention_mask=mask, position_ids=pos)


def embed_forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.bridge(
            batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )


def check_layout(model, position: str) -> None:
    tok = model.tokenizer
    fps = formatted(model)
    tps = [tokenize_prompt(fp, tok) for fp in fps]
    rsps = torch.randn(2, L, model.d_model, generator=torch.Generator().manual_seed(0))
    batch = build_batch(model, tps, rsps, position)
    n = [len(tp.ids) for tp in tps]
    assert n[0] != n[1]
    t = max(n) + L
    assert batch.inputs_embeds.shape == (2, t, model.d_model)
    for b, (fp, tp) in enumerate(zip(fps, tps, strict=True)):
        ids = list(tp.ids)
        cut, off = expected_cut(fp, ids, tok, position), t - n[b] - L
        roles = [Role.PAD] * off + [Role.BOS] + [Role.PROMPT] * (cut - 1)
        roles += [Role.RSP] * L + [Role.PROMPT] * (n[b] - cut)
        assert batch.roles[b].tolist() == [int(r) for r in roles]
        assert batch.mask(Role.RSP)[b].sum().item() == L
        assert batch.token_ids[b].tolist() == [-1] * off + ids[:cut] + [-1] * L + ids[cut:]
        assert batch.attention_mask[b].tolist() == [0] * off + [1] * (n[b] + L)
        assert batch.position_ids[b, off:].tolist() == list(range(n[b] + L))
        rsp_at = off + cut
        assert torch.equal(batch.inputs_embeds[b, rsp_at : rsp_at + L], rsps[b])
        with torch.no_grad():
            emb = model.embed(torch.tensor(ids))
        assert torch.equal(batch.inputs_embeds[b, off : off + cut], emb[:cut])
        assert torch.equal(batch.inputs_embeds[b, rsp_at + L :], emb[cut:])
        after = tok.decode(ids[cut:])
        if position == "before-assistant":
            assert after == fp.assistant_header
        if position == "end":
            assert tok.decode(ids).endswith(fp.assistant_header) and after == ""
        if position == "start":
            assert tok.decode(ids[:1]) + after == fp.text


def check_exact(model, position: str, alone_rows: tuple[int, ...] = (0, 1)) -> None:
    tok = model.tokenizer
    fps = formatted(model)
    tps = [tokenize_prompt(fp, tok) for fp in fps]
    ins = insert_ids(model, 2)
    with torch.no_grad():
        rsps = model.embed(ins)
    batch = build_batch(model, tps, rsps, position)
    got = embed_forward(model, batch)
    rows = []
    for fp, tp, extra in zip(fps, tps, ins.tolist(), strict=True):
        ids = list(tp.ids)
        cut = expected_cut(fp, ids, tok, position)
        rows.append(ids[:cut] + extra + ids[cut:])
    want = token_forward(model, rows)
    real = batch.attention_mask.bool()
    assert torch.equal(got[real], want[real]), (got[real] - want[real]).abs().max()
    # left padding in the batch changes nothing: each row alone gives the same logits
    for b in alone_rows:
        alone = embed_forward(model, build_batch(model, [tps[b]], rsps[b : b + 1], position))
        diff = (got[b, real[b]] - alone[0]).abs().max().item()
        assert diff < 1e-5, (b, diff)


# --- tokenisation -------------------------------------------------------------------------------


def test_tokenize_prompt_marks_the_assistant_header():
    tok = byte_tokenizer(chat=True)
    fp = format_prompt("What is 2+3?", tok)
    assert fp.assistant_header.startswith("<|im_start|>assistant")
    tp = tokenize_prompt(fp, tok)
    assert tp.ids[tp.header_start] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(tp.ids[tp.header_start :]) == fp.assistant_header
    assert tok.decode(tp.ids[: tp.header_start]) == fp.body
    assert tp.insertion_index("before-assistant") == tp.header_start
    assert tp.insertion_index("end") == len(tp.ids)
    assert tp.insertion_index("start") == 1
    plain = tokenize_prompt("just text", tok)
    assert plain.header_start == len(plain.ids) == len("just text")
    with pytest.raises(InputError, match="Unknown RSP position 'middle'"):
        tp.insertion_index("middle")


def test_tokenize_empty_prompt_is_an_error():
    tok = byte_tokenizer(chat=True)
    with pytest.raises(InputError, match="Empty prompt"):
        tokenize_prompt("", tok)
    with pytest.raises(InputError, match="Empty prompt"):
        tokenize_prompt(FormattedPrompt(body="", assistant_header=""), tok)


# --- layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
def test_roles_and_positions(tiny_model, position):
    check_layout(tiny_model, position)


def test_no_rsp_batch_has_no_rsp_roles(tiny_model):
    tps = [tokenize_prompt(fp, tiny_model.tokenizer) for fp in formatted(tiny_model)]
    batch = build_batch(tiny_model, tps, None)
    n = [len(tp.ids) for tp in tps]
    assert batch.length == max(n)
    assert not batch.mask(Role.RSP).any()
    assert batch.mask(Role.BOS).sum(1).tolist() == [1, 1]
    assert batch.mask(Role.PAD).sum(1).tolist() == [max(n) - k for k in n]


def test_build_batch_errors(tiny_llama):
    tps = [tokenize_prompt(fp, tiny_llama.tokenizer) for fp in formatted(tiny_llama)]
    d = tiny_llama.d_model
    with pytest.raises(InputError, match=rf"RSPs must be \[n_prompts=2, L, d_model={d}\]"):
        build_batch(tiny_llama, tps, torch.zeros(3, L, d))
    with pytest.raises(InputError, match="RSPs must be"):
        build_batch(tiny_llama, tps, torch.zeros(2, L, d + 1))
    with pytest.raises(InputError, match="RSPs must be"):
        build_batch(tiny_llama, tps, torch.zeros(2, d))
    nan = torch.zeros(2, L, d)
    nan[1, 0, 5] = float("nan")
    with pytest.raises(InputError, match="NaN or inf"):
        build_batch(tiny_llama, tps, nan)
    with pytest.raises(InputError, match="No prompts"):
        build_batch(tiny_llama, [], None)
    with pytest.raises(InputError, match="Unknown RSP position"):
        build_batch(tiny_llama, tps, torch.zeros(2, L, d), position="middle")


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
def test_injecting_token_embeddings_reproduces_the_plain_forward(tiny_model, position):
    check_exact(tiny_model, position)


def test_injection_changes_the_logits(tiny_model):
    """The exactness tests above are not vacuous: other vectors give other logits."""
    tps = [tokenize_prompt(fp, tiny_model.tokenizer) for fp in formatted(tiny_model)]
    with torch.no_grad():
        a = tiny_model.embed(insert_ids(tiny_model, 2))
    la = embed_forward(tiny_model, build_batch(tiny_model, tps, a, "start"))
    lb = embed_forward(tiny_model, build_batch(tiny_model, tps, a.flip(1), "start"))
    after = slice(la.shape[1] - min(len(tp.ids) for tp in tps) + 1, None)  # prompt after RSP
    assert (la[:, after] - lb[:, after]).abs().max().item() > 1e-2


@pytest.mark.real
def test_injection_on_real_model(smollm):
    for position in POSITIONS:
        check_layout(smollm, position)
    check_exact(smollm, "before-assistant", alone_rows=(0,))  # row 0 is the padded one

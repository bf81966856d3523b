"""Build input embeddings with an RSP spliced into a (chat-formatted) prompt.

Rows are left-padded to a common length. Every position carries a role (pad, BOS/first token,
prompt, RSP, generated), so captures can sum attention over the right keys. Position ids count
real positions only (RSP vectors take positions like tokens), which is what both rotary and
learned-position models need under left padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from rsp_interp.errors import InputError

POSITIONS = ("end", "before-assistant", "start")
"""``end``: after the whole prompt incl. the assistant header (the paper's placement);
``before-assistant``: after the user turn, before the assistant header;
``start``: right after the first token (BOS, or the first template token)."""


class Role(IntEnum):
    PAD = 0
    BOS = 1  # the first real position: BOS, or the first template token (the classic sink)
    PROMPT = 2
    RSP = 3
    GEN = 4


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids of a formatted prompt and where its assistant header starts."""

    ids: tuple[int, ...]
    header_start: int

    def insertion_index(self, position: str) -> int:
        if position == "end":
            return len(self.ids)
        if position == "before-assistant":
            return self.header_start
        if position == "start":
            return 1
        raise InputError(
            f"Unknown RSP position {position!r}: choose one of {', '.join(POSITIONS)}."
        )


def tokenize_prompt(prompt: Any, tokenizer: Any) -> TokenizedPrompt:
    """Tokenise a :class:`~rsp_interp.prompts.FormattedPrompt` (or a plain string).

    Body and assistant header are tokenised separately so the header boundary is a token
    boundary; the tokenizer's own special tokens (e.g. BOS) are added to the body only.
    """
    body, header = (
        (prompt, "") if isinstance(prompt, str) else (prompt.body, prompt.assistant_header)
    )
    body_ids = tokenizer(body, add_special_tokens=True)["input_ids"]
    header_ids = tokenizer(header, add_special_tokens=False)["input_ids"] if header else []
    if not body_ids and not header_ids:
        raise InputError("Empty prompt: nothing to tokenise.")
    return TokenizedPrompt(tuple(body_ids) + tuple(header_ids), len(body_ids))


@dataclass
class InjectedBatch:
    """Model inputs for a left-padded batch, plus the role of every position."""

    inputs_embeds: torch.Tensor  # [B, T, d]
    attention_mask: torch.Tensor  # [B, T] long, 0 at padding
    position_ids: torch.Tensor  # [B, T]
    roles: torch.Tensor  # [B, T] int8, values of Role
    token_ids: torch.Tensor  # [B, T] long, -1 at RSP and padding positions

    @property
    def n_rows(self) -> int:
        return self.inputs_embeds.shape[0]

    @property
    def length(self) -> int:
        return self.inputs_embeds.shape[1]

    def mask(self, role: Role) -> torch.Tensor:
        return self.roles == int(role)


def build_batch(
    model: Any,
    prompts: list[TokenizedPrompt],
    rsps: torch.Tensor | None,
    position: str = "end",
) -> InjectedBatch:
    """Splice ``rsps[b]`` (``[B, L, d]``, or None for no RSP) into prompt ``b`` at ``position``."""
    n = len(prompts)
    if n == 0:
        raise InputError("No prompts to build a batch from.")
    d = model.d_model
    if rsps is not None:
        if rsps.ndim != 3 or rsps.shape[0] != n or rsps.shape[2] != d:
            raise InputError(
                f"RSPs must be [n_prompts={n}, L, d_model={d}], got {tuple(rsps.shape)}."
            )
        if not torch.isfinite(rsps).all():
            raise InputError(
                "RSP vectors contain NaN or inf; check the sampler or tensor you passed."
            )
    n_rsp = 0 if rsps is None else rsps.shape[1]
    lengths = [len(p.ids) + n_rsp for p in prompts]
    t_max = max(lengths)
    pad_id = model.tokenizer.pad_token_id
    token_ids = torch.full((n, t_max), -1, dtype=torch.long)
    roles = torch.full((n, t_max), int(Role.PAD), dtype=torch.int8)
    for b, p in enumerate(prompts):
        off = t_max - lengths[b]
        cut = p.insertion_index(position) if n_rsp else len(p.ids)
        ids = list(p.ids)
        token_ids[b, off : off + cut] = torch.tensor(ids[:cut], dtype=torch.long)
        token_ids[b, off + cut + n_rsp : t_max] = torch.tensor(ids[cut:], dtype=torch.long)
        roles[b, off:t_max] = int(Role.PROMPT)
        roles[b, off + cut : off + cut + n_rsp] = int(Role.RSP)
        roles[b, off] = int(Role.BOS)
    attention_mask = (roles != int(Role.PAD)).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    dev = model.device
    with torch.no_grad():
        embeds = model.embed(token_ids.clamp(min=0).where(token_ids >= 0, pad_id).to(dev))
        if n_rsp:
            rsp_mask = (roles == int(Role.RSP)).to(dev)
            embeds[rsp_mask] = rsps.to(dev, embeds.dtype).reshape(-1, d)
    return InjectedBatch(
        inputs_embeds=embeds,
        attention_mask=attention_mask.to(dev),
        position_ids=position_ids.to(dev),
        roles=roles.to(dev),
        token_ids=token_ids.to(dev),
    )

"""Python API mirroring the CLI, for notebooks: one call per analysis returns its DataFrame.

import rsp_interp as ri
model = ri.load_model("smollm2-135m")
df = ri.attention_sink(model, n_prompts=4, samples=2)          # like `rsp-interp attention-sink`
df = ri.analysis("entropy", model, part="first-k", out="runs/e")  # any registered analysis
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pandas as pd
import torch

from rsp_interp.injection import build_batch, tokenize_prompt
from rsp_interp.models import LoadedModel, load_model
from rsp_interp.prompts import format_prompt
from rsp_interp.runner import CommonOptions, run_analysis

_COMMON = {f.name for f in fields(CommonOptions)}


def analysis(name: str, model: LoadedModel | str | None = None, **options: Any) -> pd.DataFrame:
    """Run analysis ``name`` (see ``rsp-interp --help``) and return its tidy metrics.

    ``options`` are the CLI's common flags in snake_case (``n_prompts=4``, ``out="runs/x"``...)
    plus the analysis's own keyword arguments. ``model`` may be a loaded model (no reload).
    """
    common = {k: v for k, v in options.items() if k in _COMMON}
    extra = {k: v for k, v in options.items() if k not in _COMMON}
    common.setdefault("progress", False)
    loaded = None
    if isinstance(model, LoadedModel):
        loaded = model
        common["model"] = model.model_id
    elif model is not None:
        common["model"] = model
    metrics, _, _ = run_analysis(name, CommonOptions(**common), model=loaded, **extra)
    return metrics


def attention_sink(model: LoadedModel | str | None = None, **options: Any) -> pd.DataFrame:
    """``rsp-interp attention-sink`` as a function."""
    return analysis("attention-sink", model, **options)


def next_token_probs(
    model: LoadedModel, question: str, rsp: torch.Tensor | None = None, position: str = "end"
) -> torch.Tensor:
    """The next-token distribution ``[vocab]`` after a (chat-formatted) question, with ``rsp``
    (``[L, d_model]``) spliced in at ``position``, or without an RSP when ``rsp`` is None."""
    tp = tokenize_prompt(format_prompt(question, model.tokenizer, chat=model.chat), model.tokenizer)
    batch = build_batch(model, [tp], None if rsp is None else rsp[None], position)
    with torch.no_grad():
        logits = model.bridge(
            batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
    return logits[0, -1].float().softmax(-1)


__all__ = ["analysis", "attention_sink", "load_model", "next_token_probs"]

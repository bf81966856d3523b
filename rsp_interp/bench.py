"""Throughput benchmark of the sampling engine against Hugging Face and TransformerLens generate.

Every method generates exactly ``new_tokens`` tokens per row (EOS ignored) with plain
temperature-1 sampling from the same ~100-token chat-formatted prompts, at the same batch size:

* ``rsp-interp``: :func:`rsp_interp.generation.generate` with an isotropic RSP (L=10, so the
  model sees 10 more positions than the other methods) and all default captures on;
* ``rsp-interp-nocap``: the same with ``CaptureConfig.off()``;
* ``rsp-interp-bridge``: captures on, forced through the TransformerLens bridge
  (``engine="bridge"``, as when an intervention runs): what the bridge's hook points cost;
* ``hf-generate``: ``generate()`` of a freshly loaded Hugging Face model (the bridge modifies its
  wrapped model in place), no hooks, default attention (sdpa);
* ``tl-generate``: TransformerLens's ``TransformerBridge.generate`` (KV cache on).

Each (method, case) runs in a fresh ``spawn`` subprocess by default, so its peak memory can be
read as the peak resident set size during the generation calls minus the RSS after loading
(on CUDA: peak allocated minus allocated after loading). The first call of each case is a
short warm-up, timed and reported separately; ``tokens_per_s`` is over the timed repeats.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from rsp_interp.errors import InputError

METHODS = ("rsp-interp", "rsp-interp-nocap", "rsp-interp-bridge", "hf-generate", "tl-generate")
RSP_LENGTH = 10
WARMUP_TOKENS = 4
REFERENCE = "hf-generate"


@dataclass(frozen=True)
class Case:
    """One measurement: a method at a batch size, prompt length and number of new tokens."""

    method: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"Unknown bench method {self.method!r}: choose from {METHODS}.")
        if min(self.batch, self.prompt_len, self.new_tokens, self.repeats) < 1:
            raise InputError(f"Batch, lengths and repeats must be >= 1, got {self}.")


def default_cases(
    quick: bool = False,
    methods: Sequence[str] = METHODS,
    prompt_len: int = 100,
    batches: Sequence[int] = (),
    lengths: Sequence[int] = (),
) -> list[Case]:
    """The standard grid: batch 1/8/32 x 128/512 new tokens (``quick``: batch 1/8, 128 only);
    ``batches``/``lengths`` replace the grid's.

    Repeats shrink with the work per call: 3 repeats up to 256 generated tokens per call, 2 up
    to 1024, then 1 (``quick``: always 1).
    """
    grid_b, grid_n = ((1, 8), (128,)) if quick else ((1, 8, 32), (128, 512))
    batches, lengths = tuple(batches) or grid_b, tuple(lengths) or grid_n
    cases = []
    for n in lengths:
        for b in batches:
            work = b * n
            reps = 1 if quick else 3 if work <= 256 else 2 if work <= 1024 else 1
            cases += [Case(m, b, prompt_len, n, reps) for m in methods]
    return cases


# --- inputs ----------------------------------------------------------------------------------


def bench_prompts(tokenizer: Any, batch: int, prompt_len: int, seed: int = 0) -> list[Any]:
    """``batch`` distinct chat-formatted arithmetic prompts of exactly ``prompt_len`` tokens.

    Questions are concatenated until the prompt is long enough, then the user turn is trimmed
    (the assistant header is kept), so no row needs padding.
    """
    from rsp_interp.injection import TokenizedPrompt, tokenize_prompt
    from rsp_interp.prompts import arithmetic_problems, format_prompt

    out = []
    for row in range(batch):
        problems = arithmetic_problems(64, seed=seed + row)
        question, tp = "", None
        for p in problems:
            question = f"{question} {p.question}".strip()
            tp = tokenize_prompt(format_prompt(question, tokenizer), tokenizer)
            if len(tp.ids) >= prompt_len:
                break
        header = tp.ids[tp.header_start :]
        keep = prompt_len - len(header)
        if keep < 1 or len(tp.ids) < prompt_len:
            raise InputError(f"Cannot build a {prompt_len}-token prompt: use a longer prompt_len.")
        out.append(TokenizedPrompt(tp.ids[:keep] + header, keep))
    return out


# --- measurement helpers ---------------------------------------------------------------------


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Measured fp32 throughput of an ``n x n`` matmul on this process's threads (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth (bytes) over a baseline taken at construction.

    CPU: the resident set size, polled by a background thread every ``interval`` s while
    active. CUDA: ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.cuda = device.type == "cuda"
        self.interval = interval
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.device = device
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if not self.cuda:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def capture_bytes(out: Any) -> int:
    """Bytes of every per-run result tensor of a ``GenerationOutput`` except the tokens."""
    tensors = [
        out.entropy,
        out.chosen_logprob,
        *out.step_scores.values(),
        out.top_m_ids,
        out.top_m_probs,
        out.attn,
        out.resid,
        out.prefill_resid,
        out.prefill_attn,
    ]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def n_params(module: torch.nn.Module) -> int:
    """Parameters, each shared tensor (e.g. tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# --- the methods ----------------------------------------------------------------------------


def _fresh_hf_model(name: str, device: torch.device) -> tuple[Any, Any]:
    """A Hugging Face model loaded from scratch (not bridge-wrapped), with its tokenizer."""
    from rsp_interp import embedded, models
    from rsp_interp.tiny import TINY_CONFIGS, byte_tokenizer, tiny_model

    if name in TINY_CONFIGS:
        tok = byte_tokenizer(chat=True)
        hf = tiny_model(name, vocab_size=len(tok), seed=0)
    else:
        path = Path(name).expanduser()
        if name == "smollm2-135m":
            hf_dir = embedded.converted_smollm2()[0]
        elif path.suffix == ".gguf":
            hf_dir = embedded.converted_gguf(path)[0]
        elif path.is_dir():
            hf_dir = path
        else:
            raise InputError(
                f"The bench loads a fresh HF model for {name!r} and supports registered names, "
                "local directories and .gguf files; download Hub models to a directory first."
            )
        hf, tok = models._load_hf_dir(Path(hf_dir), torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return hf.to(device).eval(), tok


def _prepare(case: Case, model_name: str, device: torch.device) -> tuple[Callable, Any, int]:
    """Load what ``case.method`` needs; return (run(n_new) -> output, model, n_params)."""
    from rsp_interp.captures import CaptureConfig
    from rsp_interp.generation import SamplingConfig, generate
    from rsp_interp.models import load_model
    from rsp_interp.rsp import RSPConfig, RSPSampler

    b = case.batch
    if case.method == "hf-generate":
        hf, tok = _fresh_hf_model(model_name, device)
        prompts = bench_prompts(tok, b, case.prompt_len)
        ids = torch.tensor([p.ids for p in prompts], device=device)
        mask = torch.ones_like(ids)

        def run(k: int) -> Any:
            torch.manual_seed(0)
            with torch.no_grad():
                seqs = hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    min_new_tokens=k,
                    max_new_tokens=k,
                    pad_token_id=tok.pad_token_id,
                )
            _check_len(seqs.shape[1] - ids.shape[1], k, case.method)
            return None

        return run, hf, n_params(hf)

    model = load_model(model_name, device=str(device))
    prompts = bench_prompts(model.tokenizer, b, case.prompt_len)
    if case.method == "tl-generate":
        ids = torch.tensor([p.ids for p in prompts], device=device)

        def run(k: int) -> Any:
            torch.manual_seed(0)
            with torch.no_grad():
                toks = model.bridge.generate(
                    ids,
                    max_new_tokens=k,
                    stop_at_eos=False,
                    do_sample=True,
                    temperature=1.0,
                    use_past_kv_cache=True,
                    return_type="tokens",
                    verbose=False,
                )
            _check_len(toks.shape[1] - ids.shape[1], k, case.method)
            return None

        return run, model, n_params(model.hf_model)

    rsps = RSPSampler.for_model(model, RSPConfig(length=RSP_LENGTH)).draw_batch(list(range(b)))
    capture = CaptureConfig.off() if case.method == "rsp-interp-nocap" else CaptureConfig()
    engine = "bridge" if case.method == "rsp-interp-bridge" else "auto"

    def run(k: int) -> Any:
        out = generate(
            model,
            prompts,
            rsps,
            sampling=SamplingConfig(max_new_tokens=k, temperature=1.0, stop_at_eos=False),
            capture=capture,
            sample_seeds=list(range(b)),
            engine=engine,
        )
        _check_len(int(out.n_generated.min()), k, case.method)
        return out

    return run, model, n_params(model.hf_model)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _touch_weights(module: torch.nn.Module) -> None:
    """Read every parameter once, so memory-mapped weights are resident before the baseline."""
    with torch.no_grad():
        for p in module.parameters():
            p.sum()


def _check_len(got: int, want: int, method: str) -> None:
    if got != want:
        raise RuntimeError(f"{method} generated {got} tokens instead of {want}.")


def run_case(
    case: Case, model_name: str, device: str = "cpu", threads: int = 0, watch_parent: bool = False
) -> dict:
    """Measure one case in this process: load, warm up, time ``case.repeats`` calls.

    ``watch_parent``: exit when the parent process dies (for bench subprocesses).
    """
    if watch_parent:
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    t = time.perf_counter()
    run, model, params = _prepare(case, model_name, dev)
    _touch_weights(getattr(model, "hf_model", model))
    load_s = time.perf_counter() - t
    mem = PeakMemory(dev)
    with mem:
        t = time.perf_counter()
        run(min(WARMUP_TOKENS, case.new_tokens))
        warmup_s = time.perf_counter() - t
        times, out = [], None
        for _ in range(case.repeats):
            t = time.perf_counter()
            out = run(case.new_tokens)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
    generated = case.batch * case.new_tokens
    cap = capture_bytes(out) if out is not None else None
    return {
        **asdict(case),
        "rsp_positions": RSP_LENGTH if case.method.startswith("rsp-interp") else 0,
        "seconds": times,
        "tokens_per_s": generated / statistics.median(times),
        "warmup_s": warmup_s,
        "warmup_tokens": min(WARMUP_TOKENS, case.new_tokens),
        "load_s": load_s,
        "peak_mem_mb": mem.growth_mb,
        "capture_bytes": cap,
        "capture_bytes_per_token": None if cap is None else cap / generated,
        "engine": None if out is None else out.extra.get("engine"),
        "n_params": params,
        "torch_threads": torch.get_num_threads(),
    }


def add_ratios(records: list[dict]) -> list[dict]:
    """Set ``ratio_vs_hf`` = tokens/s over HF generate's at the same batch and lengths."""
    ref = {
        (r["batch"], r["prompt_len"], r["new_tokens"]): r["tokens_per_s"]
        for r in records
        if r["method"] == REFERENCE
    }
    for r in records:
        hf = ref.get((r["batch"], r["prompt_len"], r["new_tokens"]))
        r["ratio_vs_hf"] = r["tokens_per_s"] / hf if hf else None
    return records


def run_bench(
    model_name: str,
    cases: Sequence[Case],
    device: str = "cpu",
    threads: int = 0,
    isolate: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Run every case (each in a fresh subprocess when ``isolate``) and return the report."""
    from rsp_interp.provenance import now, package_versions

    if threads:
        torch.set_num_threads(threads)
    started = now()
    gflops = matmul_gflops()
    records = []
    for case in cases:
        if isolate:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                rec = pool.submit(run_case, case, model_name, device, threads, True).result()
        else:
            rec = run_case(case, model_name, device, threads)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    add_ratios(records)
    best = max(records, key=lambda r: r["tokens_per_s"])
    achieved = 2 * best["n_params"] * best["tokens_per_s"] / 1e9
    return {
        "model": model_name,
        "device": device,
        "started": started,
        "finished": now(),
        "machine": machine_info(),
        "packages": package_versions(),
        "matmul_gflops": gflops,
        "matmul_note": "fp32 2048x2048 matmul, best of 3, same threads, same run",
        "best": {
            "method": best["method"],
            "batch": best["batch"],
            "new_tokens": best["new_tokens"],
            "tokens_per_s": best["tokens_per_s"],
            "model_gflops": achieved,
            "fraction_of_matmul": achieved / gflops,
            "note": "model FLOP/s = 2 x params (tied unembedding counted once) x tokens/s",
        },
        "notes": [
            f"rsp-interp methods see {RSP_LENGTH} more positions (the RSP) than the others.",
            "Every method generates exactly new_tokens tokens per row (EOS ignored), "
            "temperature 1 sampling, no top-k/top-p.",
            f"warm-up: a first call with {WARMUP_TOKENS} new tokens, excluded from tokens_per_s.",
            "peak_mem_mb: peak RSS (CUDA: allocated) during warm-up + timed calls minus the value "
            "after loading and reading every weight once (weights are memory-mapped); "
            "isolate=True runs each case in a fresh process.",
        ],
        "isolated": isolate,
        "records": records,
    }

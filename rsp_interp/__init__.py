"""rsp-interp: measure how Random Soft Prompts change a causal LM's computation.

Data flows one way: model + prompts + RSP config -> generation with captures -> tidy long-format
DataFrames (Parquet) -> analyses -> plotly figures.
"""

from rsp_interp.api import analysis, attention_sink, next_token_probs
from rsp_interp.captures import CaptureConfig
from rsp_interp.experiment import Condition, ExperimentResult, run_experiment
from rsp_interp.generation import SamplingConfig, generate
from rsp_interp.injection import POSITIONS, Role, build_batch, tokenize_prompt
from rsp_interp.metrics import STEP_SCORES, entropy, register_step_score
from rsp_interp.models import LoadedModel, list_models, load_model
from rsp_interp.prompts import arithmetic_problems, format_prompt, load_gsm8k, load_prompts
from rsp_interp.rsp import RSP_KINDS, EmbeddingStats, RSPConfig, RSPSampler, derive_seed

__version__ = "0.1.0"

__all__ = [
    "POSITIONS",
    "RSP_KINDS",
    "STEP_SCORES",
    "CaptureConfig",
    "Condition",
    "EmbeddingStats",
    "ExperimentResult",
    "LoadedModel",
    "RSPConfig",
    "RSPSampler",
    "Role",
    "SamplingConfig",
    "analysis",
    "arithmetic_problems",
    "attention_sink",
    "build_batch",
    "derive_seed",
    "entropy",
    "format_prompt",
    "generate",
    "list_models",
    "load_gsm8k",
    "load_model",
    "load_prompts",
    "next_token_probs",
    "register_step_score",
    "run_experiment",
    "tokenize_prompt",
]

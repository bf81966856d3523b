"""rsp-interp: measure how Random Soft Prompts change a causal LM's computation."""

__version__ = "0.1.0"

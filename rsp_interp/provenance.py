"""Provenance for every result: model and weights, package versions, configs, seeds, command."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

PACKAGES = (
    "rsp-interp",
    "torch",
    "transformers",
    "transformer-lens",
    "gguf",
    "numpy",
    "pandas",
    "scipy",
    "plotly",
    "kaleido",
    "pyarrow",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_record(
    model: Any, config: dict[str, Any], started: str, command: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """The ``run.json`` content for one run."""
    return {
        "command": command if command is not None else sys.argv,
        "started": started,
        "finished": now(),
        "model": model.provenance(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "config": config,
        **extra,
    }

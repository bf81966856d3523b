"""Atomic output: a file is either absent or complete, never half-written.

Each file is written to a temporary sibling and renamed into place. A results directory gets
``run.json`` last, so its presence marks a finished run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from rsp_interp.errors import OutputError


def prepare_out_dir(out: str | Path) -> Path:
    """Create ``out`` (and parents) and check it is writable, with a clear error if not."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(
            f"Cannot write to output directory {str(path)!r} ({exc.strerror or exc}). "
            "Pass a writable --out directory."
        ) from exc
    return path


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp's own is 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _clean(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null. numpy/torch values become Python ones."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # arrays, tensors, scalars
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_clean(v) for v in (sorted(obj, key=repr) if isinstance(obj, set) else obj)]
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(_clean(data), indent=2, default=_json_default)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def write_parquet(path: str | Path, df: pd.DataFrame) -> Path:
    return atomic_write(path, lambda p: df.to_parquet(p, index=False))


def write_figure(
    fig: Any, stem: str | Path, png: bool = True, width: int = 1200, height: int = 600
) -> list[Path]:
    """Write ``stem.html`` (self-contained) and ``stem.png`` (kaleido; needs Chromium)."""
    stem = Path(stem)
    paths = [
        atomic_write(
            stem.with_suffix(".html"), lambda p: fig.write_html(str(p), include_plotlyjs=True)
        )
    ]
    if png:
        try:
            paths.append(
                atomic_write(
                    stem.with_suffix(".png"),
                    lambda p: p.write_bytes(fig.to_image(format="png", width=width, height=height)),
                )
            )
        except Exception as exc:  # kaleido without a browser
            raise OutputError(
                f"PNG export failed ({type(exc).__name__}: {str(exc)[:200]}). "
                "Plotly's static export needs Chromium: `apt-get install -y chromium` "
                "(or `plotly_get_chrome`), or pass --no-png."
            ) from exc
    return paths

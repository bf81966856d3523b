"""Tests for rsp_interp.io: atomic writes, JSON/parquet/figure output, the output directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from rsp_interp import io
from rsp_interp.errors import OutputError


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def test_failed_write_leaves_no_target_and_no_part_file(tmp_path):
    target = tmp_path / "metrics.parquet"

    def writer(p: Path) -> None:
        p.write_text("half of it")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(target, writer)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    def writer(p: Path) -> None:
        p.write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(tmp_path / "a.json", writer)
    assert list(tmp_path.iterdir()) == []


def test_second_write_replaces_atomically(tmp_path):
    target = tmp_path / "summary.json"
    io.atomic_write(target, lambda p: p.write_text("v1"))
    seen = {}

    def writer(p: Path) -> None:
        p.write_text("v2")
        # mid-write, readers still see the complete old version, never a partial new one
        seen["during"] = target.read_text()
        seen["tmp_is_sibling"] = p.parent == target.parent and p.name.endswith(".part")

    io.atomic_write(target, writer)
    assert seen == {"during": "v1", "tmp_is_sibling": True}
    assert target.read_text() == "v2"
    assert leftovers(tmp_path) == []


def test_failed_rewrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "run.json"
    io.write_json(target, {"ok": 1})

    def writer(p: Path) -> None:
        p.write_text("{broken")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        io.atomic_write(target, writer)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert leftovers(tmp_path) == []


def test_written_files_get_normal_permissions(tmp_path):
    """Like a plain open(): not mkstemp's private 0o600 (results are meant to be shared)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = io.atomic_write(tmp_path / "atomic.txt", lambda p: p.write_text("x"))
    assert os.stat(target).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_write_json_handles_nan_numpy_torch_and_paths(tmp_path):
    data = {
        "nan": float("nan"),
        "inf": float("inf"),
        "nested": [1.5, float("-inf"), {"x": float("nan")}],
        "np_float": np.float32(0.25),
        "np_int": np.int64(7),
        "array": np.arange(3),
        "tensor": torch.tensor([1.0, float("nan")]),
        "scalar_tensor": torch.tensor(0.5),
        "nan_array": np.array([np.nan, 1.0]),
        "set": {2, 1},
        "path": Path("/a/b"),
        "tuple": (1, 2),
        3: "int key",
    }
    path = io.write_json(tmp_path / "d.json", data)
    back = json.loads(path.read_text())  # strict JSON: no NaN tokens
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert back == {
        "nan": None,
        "inf": None,
        "nested": [1.5, None, {"x": None}],
        "np_float": 0.25,
        "np_int": 7,
        "array": [0, 1, 2],
        "tensor": [1.0, None],
        "scalar_tensor": 0.5,
        "nan_array": [None, 1.0],
        "set": [1, 2],
        "path": "/a/b",
        "tuple": [1, 2],
        "3": "int key",
    }


def test_write_parquet_roundtrip_keeps_dtypes(tmp_path):
    df = pd.DataFrame(
        {
            "condition": pd.Categorical(["rsp", "none", "rsp"]),
            "step": np.array([0, 1, -1], dtype="int16"),
            "rsp_seed": np.array([2**62, -1, 5], dtype="int64"),
            "value": [0.5, math.pi, -1.0],
        }
    )
    path = io.write_parquet(tmp_path / "m.parquet", df)
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)
    assert leftovers(tmp_path) == []


def test_write_figure_html_only(tmp_path):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    paths = io.write_figure(fig, tmp_path / "fig", png=False)
    assert paths == [tmp_path / "fig.html"]
    assert "plotly" in (tmp_path / "fig.html").read_text()[:100000].lower()
    assert not (tmp_path / "fig.png").exists()


def test_write_figure_png_failure_names_the_fix(tmp_path, monkeypatch):
    fig = go.Figure()
    monkeypatch.setattr(
        go.Figure, "to_image", lambda self, **kw: (_ for _ in ()).throw(RuntimeError("no chrome"))
    )
    with pytest.raises(OutputError, match="--no-png"):
        io.write_figure(fig, tmp_path / "fig", png=True)
    assert (tmp_path / "fig.html").exists() and not (tmp_path / "fig.png").exists()
    assert leftovers(tmp_path) == []


def test_prepare_out_dir_creates_parents(tmp_path):
    out = io.prepare_out_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is removed


@pytest.mark.parametrize("kind", ["under_file", "is_file"])
def test_prepare_out_dir_rejects_unwritable_paths(tmp_path, kind):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    out = blocker / "results" if kind == "under_file" else blocker
    with pytest.raises(OutputError, match="--out"):
        io.prepare_out_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]
    assert blocker.read_text() == "x"

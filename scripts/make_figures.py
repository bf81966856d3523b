"""Regenerate every committed figure: run each stage-1 analysis with its defaults on a model.

    .venv/bin/python scripts/make_figures.py [--model smollm2-135m] [--only NAME ...]

Full outputs go to runs/figures/<analysis>/; the PNGs, summary.json and run.json are copied to
figures/<analysis>/ (committed). Timings go to figures/timings.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rsp_interp.io import write_json
from rsp_interp.models import load_model
from rsp_interp.provenance import now
from rsp_interp.runner import ANALYSES, CommonOptions, run_analysis

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", nargs="*", default=list(ANALYSES), choices=list(ANALYSES))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = load_model(args.model)
    timings = {"model": args.model, "started": now(), "load_s": time.perf_counter() - t0}
    for name in args.only:
        run_dir = ROOT / "runs" / "figures" / name
        t = time.perf_counter()
        run_analysis(
            name, CommonOptions(model=args.model, out=str(run_dir)), model=model, command=sys.argv
        )
        timings[name + "_s"] = round(time.perf_counter() - t, 1)
        print(f"{name}: {timings[name + '_s']} s", flush=True)
        dest = ROOT / "figures" / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in [*run_dir.glob("*.png"), run_dir / "summary.json", run_dir / "run.json"]:
            shutil.copy2(f, dest / f.name)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total: {timings['total_s']} s")
    if set(args.only) == set(ANALYSES):
        write_json(ROOT / "figures" / "timings.json", timings)


if __name__ == "__main__":
    main()

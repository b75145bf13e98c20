"""Study wall time with 1 and with N parallel Ray workers, on the same spec, measured in one run.

    python benchmarks/bench_study_workers.py                      # quickstart, 1 vs 2 workers
    python benchmarks/bench_study_workers.py studies/degradation.yaml --workers 1 2

Each run starts from an empty store in a temporary folder and a fresh local Ray, so both pay the
same start-up; the ratio is wall(1 worker) / wall(N workers).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import ray

from _results import RESULTS, append_rows, source_commit
from resnet_ablate.spec import load_spec
from resnet_ablate.study import RunOptions, run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="studies/quickstart.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--csv", default=RESULTS / "study_workers.csv")
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as runs_dir:
            print(f"== {spec.study} with {workers} worker(s)", flush=True)
            summary = run_study(spec, RunOptions(workers=workers, runs_dir=Path(runs_dir),
                                                 keep_weights=False))
            ray.shutdown()
        rows.append({"study": spec.study, "workers": workers, "trials": summary.completed,
                     "wall_seconds": round(summary.wall_seconds, 2),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "commit": source_commit()})
        print(f"   {summary.completed} trials in {summary.wall_seconds:.1f} s", flush=True)
    base = rows[0]["wall_seconds"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["wall_seconds"], 3)
        print(f"{row['workers']} worker(s): {row['wall_seconds']:.1f} s, "
              f"{row['speedup_vs_first']:.2f}x vs {rows[0]['workers']} worker(s)")
    append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

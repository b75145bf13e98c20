"""Study wall time with 1 and with N parallel Ray workers, and with each grid point's seeds alone
or stacked into one model (resources.stack_seeds), on the same spec, measured in one run.

    python benchmarks/bench_study_workers.py                      # quickstart, 1 vs 2 workers
    python benchmarks/bench_study_workers.py studies/degradation.yaml --workers 1 2
    python benchmarks/bench_study_workers.py --workers 2 --stack-seeds 1 2   # stacked or not

Each run starts from an empty store in a temporary folder and a fresh local Ray, so all pay the
same start-up; the ratio is the first run's wall time over each run's.
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
from resnet_ablate.spec import load_spec, parse_spec
from resnet_ablate.study import RunOptions, run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="studies/quickstart.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stack-seeds", type=int, nargs="+", default=[1],
                        help="resources.stack_seeds to run the spec with, each")
    parser.add_argument("--csv", default=RESULTS / "study_workers.csv")
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    rows = []
    for stack_seeds in args.stack_seeds:
        # The spec's own checks: a stack needs what train_seeds can train (resources.stack_seeds).
        stacked = parse_spec({**spec.raw, "resources": {**(spec.raw.get("resources") or {}),
                                                         "stack_seeds": stack_seeds}},
                             source=spec.source)
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as runs_dir:
                print(f"== {spec.study} with {workers} worker(s), stack_seeds {stack_seeds}",
                      flush=True)
                summary = run_study(stacked, RunOptions(workers=workers, runs_dir=Path(runs_dir),
                                                        keep_weights=False))
                ray.shutdown()
            rows.append({"study": spec.study, "workers": workers, "trials": summary.completed,
                         "wall_seconds": round(summary.wall_seconds, 2),
                         "machine": f"{platform.processor() or platform.machine()}, "
                                    f"{os.cpu_count()} CPUs",
                         "commit": source_commit(), "stack_seeds": stack_seeds})
            print(f"   {summary.completed} trials in {summary.wall_seconds:.1f} s", flush=True)
    base = rows[0]["wall_seconds"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["wall_seconds"], 3)
        print(f"{row['workers']} worker(s), stack_seeds {row['stack_seeds']}: "
              f"{row['wall_seconds']:.1f} s, {row['speedup_vs_first']:.2f}x vs the first")
    append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The quickstart as its user runs it, timed whole: `resnet-ablate run studies/quickstart.yaml` from
process start to exit (imports, a local Ray's start and stop, the trials, the closing table).

    python benchmarks/bench_quickstart.py                 # 3 runs of the quickstart
    python benchmarks/bench_quickstart.py SPEC --repeats 5

Each run starts from an empty runs folder. Beside the command's wall time, a row has the time the
study reported for itself ("... this run in X s") and its trials' training time summed: that sum
over the workers is the floor no start-up work can go below; the rest is what the toolkit adds.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

from _results import RESULTS, append_rows, source_commit
from resnet_ablate.results import load
from resnet_ablate.spec import load_spec

_STUDY_SECONDS = re.compile(r"this run in ([0-9.]+) s")


def run_once(spec_path: str) -> dict[str, float]:
    """One whole command in a fresh runs folder: its wall seconds, the study's own, the trials'."""
    with tempfile.TemporaryDirectory() as runs_dir:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "resnet_ablate", "run", spec_path, "--runs-dir", runs_dir,
             "--quiet"], capture_output=True, text=True)
        command_seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"the run exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        study_seconds = float(_STUDY_SECONDS.search(done.stdout).group(1))
        trials = load(load_spec(spec_path).study, runs_dir=runs_dir).completed()
        return {"command_seconds": round(command_seconds, 2), "study_seconds": study_seconds,
                "trials": len(trials),
                "training_seconds_sum": round(float(trials["wall_seconds"].sum()), 2)}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="studies/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default=RESULTS / "quickstart.csv")
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    rows: list[dict[str, object]] = []
    for repeat in range(1, args.repeats + 1):
        print(f"== {spec.study}: run {repeat}/{args.repeats}", flush=True)
        times = run_once(args.spec)
        rows.append({"study": spec.study, "epochs": spec.train.epochs,
                     "workers": spec.resources.workers, "repeat": repeat, **times,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "commit": source_commit()})
        floor = times["training_seconds_sum"] / spec.resources.workers
        print(f"   command {times['command_seconds']:.1f} s | study {times['study_seconds']:.1f} s"
              f" | training floor {floor:.1f} s ({times['trials']} trials over "
              f"{spec.resources.workers} workers)", flush=True)
    walls = [float(r["command_seconds"]) for r in rows]
    print(f"{spec.study}: median {statistics.median(walls):.1f} s, range {min(walls):.1f}-"
          f"{max(walls):.1f} s over {len(walls)} runs of the whole command")
    append_rows(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()

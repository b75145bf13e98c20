"""How long does reading a study back take? The trials frame that every table, comparison and
plot starts from (results/store_reading.py's `trials_frame`), built from a study's rows as the
toolkit builds it (each column once, in its type) beside the way it was built before (a frame of
the rows, then each typed column cast in place), timed side by side on the same rows, the two
frames compared for equality.

    python benchmarks/bench_results.py            # studies of 8, 100 and 1,000 trials
    python benchmarks/bench_results.py --small    # seconds: checks that the script works

Simulations build hundreds of small studies (tests/helpers.py's study_in_memory), where the
frame was about a third of each study's cost; a user's study is built once a command.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _results import append_rows, results_csv, run_context  # noqa: E402

from resnet_ablate.results.store_reading import (  # noqa: E402
    _FLOAT_COLUMNS, _INT_COLUMNS, TRIAL_COLUMNS, trials_frame,
)


def cast_after(rows: list[dict]) -> pd.DataFrame:
    """The trials frame as it was built before: a frame of the rows, then each typed column
    cast in place (the reference the toolkit's frame must equal)."""
    frame = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    for column in _INT_COLUMNS:
        with contextlib.suppress(OverflowError, TypeError, ValueError):
            frame[column] = frame[column].astype("Int64")
    frame["fused"] = frame["fused"].astype("boolean")
    for column in _FLOAT_COLUMNS:
        frame[column] = frame[column].astype(float)
    return frame


def study_rows(trials: int) -> list[dict]:
    """Rows as a study of `trials` trials records them: depths and shortcuts swept, 5 seeds,
    one trial in ten failed (its metrics missing)."""
    rows = []
    for number in range(trials):
        failed = number % 10 == 9
        depth = (20, 32, 44, 56, 110)[number // 5 % 5]
        rows.append({
            **dict.fromkeys(TRIAL_COLUMNS),  # every column, as store_reading.trial_row gives
            "number": number, "state": "FAIL" if failed else "COMPLETE",
            "arch_name": f"resnet{depth}-cifar", "depth": depth, "shortcut": "AB"[number % 2],
            "fused": True, "seed": number % 5, "params": None if failed else depth * 15_000,
            "flops": None if failed else depth * 2_500_000,
            "test_error": None if failed else 0.07 + number % 7 / 1000,
            "test_accuracy": None if failed else 0.93 - number % 7 / 1000,
            "test_images": None if failed else 10_000, "epochs": 164,
            "wall_seconds": 60.0 + number, "images_per_second": 5_000.0,
            "precision": "bf16", "device": "cpu", "replicas": 1, "restarts": 0,
            "failure_kind": "diverged" if failed else None,
        })
    return rows


def fastest_ms(build, rows: list[dict], repeats: int) -> float:
    """The fastest of `repeats` builds, in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        build(rows)
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes: the script works")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("results_frame.csv", args.small)
    sizes, repeats = ((8,), 3) if args.small else ((8, 100, 1000), args.repeats)
    rows = []
    for trials in sizes:
        study = study_rows(trials)
        pd.testing.assert_frame_equal(trials_frame(study), cast_after(study))
        typed, cast = (fastest_ms(build, study, repeats) for build in (trials_frame, cast_after))
        rows.append({**run_context(torch.device("cpu")), "trials": trials,
                     "typed_columns_ms": round(typed, 3), "cast_after_ms": round(cast, 3),
                     "speedup": round(cast / typed, 2), "repeats": repeats})
        print(f"{trials:5d} trials: typed columns {typed:7.2f} ms, cast after {cast:7.2f} ms "
              f"({cast / typed:.2f}x)", flush=True)
    append_rows(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()

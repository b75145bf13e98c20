"""What every benchmark shares: where figures go and how a row names its machine.

One CSV per benchmark under benchmarks/results/, rows appended so that runs on several devices
(each row names its device and versions) sit side by side and are never compared by accident.
One layout for every row: `run_context()` first (when, which machine, which commit and versions),
then the benchmark's own columns, with the peak memory (`peak_memory_mb`) beside the times.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import resource
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch

_T = TypeVar("_T")
RESULTS = Path(__file__).resolve().parent / "results"
# A smoke run's rows (--small: tiny sizes that check a script works, not figures to keep).
SMOKE_RESULTS = Path(tempfile.gettempdir()) / "resnet-ablate-benchmarks"


def results_csv(name: str, smoke: bool) -> Path:
    """Where a benchmark's rows go unless --csv says: benchmarks/results/NAME, or for a smoke
    run a scratch folder, so that checking a script leaves the tracked results as they were."""
    return (SMOKE_RESULTS if smoke else RESULTS) / name


def append_rows(path: str | Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Append rows under the file's own header (a new file gets the rows' keys as header).

    Rows with columns the file lacks widen it: the file is rewritten once with the new columns
    at the end, blank in its older rows, so figures from before a benchmark grew a column stay
    in the same file. A column the rows lack is left blank in them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists() or path.stat().st_size == 0
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    if not is_new:
        with path.open(newline="") as f:
            old_rows = list(csv.DictReader(f))
            f.seek(0)
            header = next(csv.reader(f))
        added = [name for name in fieldnames if name not in header]
        fieldnames = header + added
        if added:  # rewrite once under the wider header
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        if is_new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")
    return path


def run_context(device: torch.device) -> dict[str, str]:
    """The columns every benchmark row starts with: when, on which machine, with which code."""
    import resnet_ablate

    return {"timestamp": timestamp(), "device": device_name(device), "commit": source_commit(),
            "torch": torch.__version__, "triton": triton_version(),
            "resnet_ablate": resnet_ablate.__version__, "python": platform.python_version()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: the GPU's allocated tensors on CUDA; on a CPU the
    process's peak resident size over its whole life (the operating system keeps no other)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def timed_epochs(epochs: Sequence[_T]) -> Sequence[_T]:
    """The epochs a run's rate is timed over: those after the first, which holds what a run pays
    once (a CUDA graph's warm-up steps and capture, a trial's set-up), or the only one."""
    return epochs[1:] or epochs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Names the measured code's commit where the checkout travelled without its git folder (a copy
# of the working tree on a lent GPU machine): benchmarks/gpu_check.sh sets it from git here.
COMMIT_ENV = "RESNET_ABLATE_COMMIT"


def source_commit() -> str:
    """The measured code's commit, with "+changes" when the tracked files differ from it, or
    $RESNET_ABLATE_COMMIT (else "") outside a git checkout: so that figures can be tied to the
    code that produced them."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                capture_output=True, check=True).stdout.strip()
        # Figures appended by an earlier benchmark do not make the measured code different.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", ":(exclude,top)benchmarks/results"], cwd=here,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(COMMIT_ENV, "")
    return commit + ("+changes" if dirty else "")

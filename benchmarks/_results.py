"""What every benchmark shares: where figures go and how a row names its machine.

One CSV per benchmark under benchmarks/results/, rows appended so that runs on several devices
(each row names its device and versions) sit side by side and are never compared by accident.
"""

from __future__ import annotations

import csv
import datetime
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def append_rows(path: str | Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Append rows under the file's own header (a new file gets the rows' keys as header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    is_new = not path.exists() or path.stat().st_size == 0
    fieldnames = list(rows[0])
    if not is_new:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
        if set(header) != set(fieldnames):
            raise ValueError(f"{path} has columns {header}, these rows {fieldnames}: write them "
                             "to another file (--csv) or move the old one aside")
        fieldnames = header
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        if is_new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")
    return path


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def source_commit() -> str:
    """The measured code's commit, with "+changes" when the tracked files differ from it, or ""
    outside a git checkout: so that figures can be tied to the code that produced them."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                capture_output=True, check=True).stdout.strip()
        # Figures appended by an earlier benchmark do not make the measured code different.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", ":(exclude,top)benchmarks/results"], cwd=here,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+changes" if dirty else "")

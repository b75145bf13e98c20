"""The cores this process may run on: what a local Ray's trials share, and what the dry run's
estimate and oversubscription warning count alike."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: its affinity where the system keeps one (taskset,
    a container's cpuset, a batch scheduler's share), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

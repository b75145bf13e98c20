"""What several test files share: small study specs on synthetic data, and the small study that
the results tests read (built once per session by the `runs` fixture in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

SYNTHETIC = {"num_classes": 4, "channels": 1, "image_size": 8, "train_size": 128,
             "test_size": 64, "noise": 1.5}

# The study the results tests read back.
RESULTS_STUDY = "results-small"
RESULTS_DEPTHS, RESULTS_SHORTCUTS, RESULTS_SEEDS = (8, 14), ("A", "none"), (0, 1, 2)


def raw_spec(name, *, epochs=2, seeds=2, **overrides) -> dict:
    """A small study spec (plain values, as YAML gives them): depth-8 CIFAR nets, synthetic data."""
    raw = {
        "study": name,
        "dataset": {"name": "synthetic", "synthetic": SYNTHETIC},
        "model": {"family": "cifar", "depth": 8},
        "space": {"shortcut": ["A", "none"]},
        "seeds": seeds,
        "train": {"epochs": epochs, "batch_size": 32},
        "resources": {"cpus": 1, "workers": 2},
        "max_attempts": 2,
    }
    raw.update(overrides)
    return raw


def write_spec(folder: Path, raw: dict) -> Path:
    path = folder / f"{raw['study']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def results_study_spec() -> dict:
    return {"study": RESULTS_STUDY, "question": "Do shortcuts help deeper nets?",
            "dataset": {"name": "synthetic", "synthetic": SYNTHETIC},
            "model": {"family": "cifar"},
            "space": {"depth": list(RESULTS_DEPTHS), "shortcut": list(RESULTS_SHORTCUTS)},
            "seeds": len(RESULTS_SEEDS), "train": {"epochs": 2, "batch_size": 32},
            "resources": {"cpus": 1, "workers": 2}}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program (initdb, pg_ctl) on PATH or in Debian's versioned folders."""
    import glob
    import shutil

    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)

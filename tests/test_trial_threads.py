"""A trial's torch threads come from its CPUs alone (study/loop.py's `trial_task`): the number of
image-decoding processes (`dataset.loader_workers`) never changes them, and so never changes a
result, to the last bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_ablate.arch import ResNetArch
from resnet_ablate.spec import parse_spec
from resnet_ablate.study.loop import trial_task
from resnet_ablate.worker import execute

CPUS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four classes of noisy solid colours, 4 training and 2 validation JPEGs each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(4):
        colour = np.array([60 * label + 20, 255 - 50 * label, (90 * label) % 256], np.float64)
        for split, count in (("train", 4), ("val", 2)):
            (root / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 12, (20 + i, 24, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"c{label}" / f"{i}.jpg")
    return root


def _spec(folder, loader_workers):
    return parse_spec({
        "study": "threads", "model": {"family": "imagenet", "widths": [4, 8, 8, 8],
                                      "stages": [1, 1, 1, 1], "block": "basic"},
        "dataset": {"name": "imagefolder", "root": str(folder), "image_size": 16,
                    "loader_workers": loader_workers},
        "space": {"shortcut": ["A"]}, "seeds": 1,
        "train": {"preset": "imagenet", "epochs": 1, "batch_size": 8, "eval_batch_size": 8},
        "resources": {"cpus": CPUS, "workers": 1}})


def test_loader_workers_change_neither_the_threads_nor_the_results(folder):
    outcomes = []
    for loader_workers in (0, 2):
        spec = _spec(folder, loader_workers)
        arch = spec.arch({"shortcut": "A"})
        assert isinstance(arch, ResNetArch)
        task = trial_task(spec, 0, arch, seed=3, keep_weights=True, checkpoints=None)
        assert task.threads == CPUS  # the trial's CPUs, whatever decodes beside them
        assert task.dataset["loader_workers"] == loader_workers
        outcomes.append(execute(task))
    serial, parallel = outcomes
    assert serial.status == parallel.status == "completed", (serial.reason, parallel.reason)

    def measured(outcome):  # every number of each epoch but its duration
        return [{k: v for k, v in epoch.items() if k not in ("seconds", "train_seconds")}
                for epoch in outcome.curves]

    assert measured(serial) == measured(parallel)
    weights = [torch.load(io.BytesIO(o.weights), weights_only=True) for o in outcomes]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

"""What a study's data set and architectures cost: the data set's shape (checked before anything
runs), each architecture's parameters and FLOPs, computed once per architecture, and the training
FLOPs they make; the dry run's notes gathered from advice.py.

FLOPs are counted by tracing the built model (profile.py, fvcore), so the model layer loads here at
the first architecture profiled."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..arch import ResNetArch
from ..data import DatasetShape, dataset_shape, load_dataset
from ..data.shards import ShardError
from ..spec import SpecError, StudySpec
from .advice import packing_advice, stacked_tasks, stacking_advice, start_up_cost, \
    trials_use_cuda_graphs

if TYPE_CHECKING:
    from ..profile import ModelProfile

# What reading a data set raises for a missing or damaged one: OSError, ValueError, a tar or
# gzip stream cut short, a shard that cannot be read.
DATA_ERRORS = (OSError, ValueError, EOFError, tarfile.TarError, ShardError)


class StudyCosts:
    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self._shape: DatasetShape | None = None
        self._profiles: dict[str, ModelProfile] = {}

    def check_dataset(self) -> None:
        """Read (or download) the data set once here, so that a bad one stops the run early."""
        try:
            load_dataset(**self.spec.dataset.load_kwargs())
        except DATA_ERRORS as error:
            raise SpecError(f"{self.spec.source}: dataset: {error}") from None

    def shape(self) -> DatasetShape:
        if self._shape is None:
            try:
                self._shape = dataset_shape(**self.spec.dataset.load_kwargs())
            except DATA_ERRORS as error:
                raise SpecError(f"{self.spec.source}: dataset: {error}") from None
        return self._shape

    def profile(self, arch: ResNetArch) -> ModelProfile:
        """Parameters and FLOPs of an architecture, computed once per architecture."""
        if arch.digest not in self._profiles:
            from ..models import build
            from ..profile import profile

            data = self.shape()
            model = build(arch, num_classes=data.num_classes, in_channels=data.in_channels)
            self._profiles[arch.digest] = profile(
                model, (data.in_channels, data.image_size, data.image_size))
        return self._profiles[arch.digest]

    def over_budget(self, arch: ResNetArch) -> bool:
        ceiling = self.spec.budget.max_gflops
        return ceiling is not None and self.profile(arch).flops / 1e9 > ceiling

    def data_note(self) -> str:
        """The dry run's line on the data set a trial will read: its images and classes as found
        (a folder's index, a shard's count, or the sizes the spec states for shards behind URLs),
        so that a user sees before training that the data set is the one meant."""
        shape, dataset = self.shape(), self.spec.dataset
        where = f" at {Path(dataset.root).expanduser().resolve()}" if dataset.root else ""
        return (f"data: {dataset.name}{where}: {shape.train_size:,} training images in "
                f"{shape.num_classes:,} classes, {shape.test_size:,} {shape.eval_split} images "
                f"scored, {shape.image_size}x{shape.image_size} pixels a model sees")

    def packing_advice(self) -> list[str]:
        """The dry run's packing recommendation for this study (see `packing_advice`)."""
        resources = self.spec.resources
        return packing_advice(resources.gpus, resources.cpus, resources.replica_count,
                              self.shape().image_size, trials_use_cuda_graphs(self.spec))

    def dry_run_notes(self, configurations: Sequence[str]) -> list[str]:
        """What a dry run prints under its plan, given the configuration of each trial to run (a
        key per grid point, its seed left out): the packing advice, the tasks that stacking
        seeds makes of them, and the start-up their data-parallel trials pay (see
        `packing_advice`, `stacked_tasks`, `start_up_cost`)."""
        resources = self.spec.resources
        stacking = [] if self.spec.sampler != "grid" else stacking_advice(
            resources.gpus, resources.replica_count, self.shape().image_size,
            len(self.spec.seeds), resources.stack_seeds)
        return [*self.packing_advice(), *stacking,
                *stacked_tasks(resources.stack_seeds, configurations),
                *start_up_cost(resources.replica_count, len(configurations))]

    def train_tflops(self, arch: ResNetArch) -> float:
        """Forward + backward (3x forward) over every training image and epoch, in the paper's
        FLOPs (1 a multiply-add, as profile counts them; a GPU's peak counts 2)."""
        return 3 * self.profile(arch).flops * self.shape().train_size * self.spec.train.epochs / 1e12

"""What a study's data set and architectures cost: the data set's shape (checked before anything
runs), and each architecture's parameters and FLOPs, computed once per architecture.

FLOPs are counted by tracing the built model (profile.py, fvcore), so the model layer loads here at
the first architecture profiled, not when the driver is imported."""

from __future__ import annotations

import tarfile
from typing import TYPE_CHECKING, Any

from ..arch import ResNetArch
from ..data import DatasetShape, SyntheticSpec, dataset_shape, load_dataset
from ..data.shards import ShardError
from ..spec import SpecError, StudySpec

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

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs = self.spec.dataset.load_kwargs()
        if kwargs["synthetic"] is not None:
            kwargs["synthetic"] = SyntheticSpec(**kwargs["synthetic"])
        return kwargs

    def check_dataset(self) -> None:
        """Read (or download) the data set once here, so that a bad one stops the run early."""
        try:
            load_dataset(**self._load_kwargs())
        except DATA_ERRORS as error:
            raise SpecError(f"{self.spec.source}: dataset: {error}") from None

    def shape(self) -> DatasetShape:
        if self._shape is None:
            try:
                self._shape = dataset_shape(**self._load_kwargs())
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

    def train_tflops(self, arch: ResNetArch) -> float:
        """Forward + backward (3x forward) over every training image and epoch."""
        return 3 * self.profile(arch).flops * self.shape().train_size * self.spec.train.epochs / 1e12

"""The training recipe: a plain, torch-free description of how a trial trains.

The paper's CIFAR-10 recipe (He et al., CVPR 2016, section 4.2) by default, plus the choices of
how a trial executes on its device (precision, memory format, compilation, CUDA graphs), which
execution.py resolves for a device. Specs build it from YAML; train/ runs it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]
MemoryFormat = Literal["channels_last", "nchw"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS: tuple[str, ...] = ("channels_last", "nchw")
# Fields that change how fast a trial runs, not what it learns (precision is not among them: it
# moves the numbers; nor is decode: the GPU's JPEG decoder rounds differently; nor is
# divergence_check_every: it can change which runs count as diverged).
# A study may be resumed with other values of these.
EXECUTION_ONLY: tuple[str, ...] = ("memory_format", "compile", "cuda_graphs")
SCHEDULES: tuple[str, ...] = ("step", "plateau")
# The paper's ImageNet protocol (Sec. 3.4): how inputs are centred, and the test-time views.
MEANS: tuple[str, ...] = ("channel", "pixel")
TEST_VIEWS: tuple[str, ...] = ("ten_crop", "multi_scale")
# Where a streamed data set's training crops are decoded (data/device_decode.py).
DECODES: tuple[str, ...] = ("cpu", "gpu", "auto")


# A bound far above any recipe's (a billion epochs is a typo that would be planned in silence).
MAX_EPOCHS = 10_000
# Images a step: far above any published batch (64k on ImageNet); 1e9 would run full-batch.
MAX_BATCH_SIZE = 1_000_000


@dataclass(frozen=True)
class TrainRecipe:
    """How to train: the paper's CIFAR-10 recipe by default, with milestones as fractions of epochs.

    The default 164 epochs are the paper's 64k iterations of batch 128 on 50k images; the decays
    then fall on epochs 82 and 123, its 32k and 48k iterations. A decay applies from the first
    epoch that starts at or after its fraction of training.
    Warm-up (`warmup=True`) trains at `warmup_lr` until the training error over the last
    `WARMUP_WINDOW` (10) batches falls below `warmup_until_error`, or for `warmup_max_steps` steps,
    whichever comes first; set one of them to None to use only the other. It never raises the
    lr above the schedule's.

    The last five fields choose how the run executes (execution.py): `precision` (auto | fp32 |
    bf16 | fp16: autocast; auto is bf16 on GPUs that have it, else fp32; it moves the numbers a
    little), `memory_format` (channels_last | nchw), `compile` (torch.compile the model; its
    compile time is recorded apart), `cuda_graphs` (true | false | auto: replay each full-batch
    step from one CUDA graph; auto wherever a graph can capture the step) and
    `divergence_check_every` (steps between the host reads of the running loss that stop a
    diverged run; also read at each epoch's end). EXECUTION_ONLY lists those that change nothing
    but speed.
    """

    epochs: int = 164
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    # "step": multiply the lr by gamma at each milestone. "plateau": multiply it by gamma when the
    # epoch's training loss has not fallen by plateau_threshold (relative) for plateau_patience
    # epochs in a row, as the paper does on ImageNet; milestones are then unused.
    schedule: str = "step"
    plateau_patience: int = 5
    plateau_threshold: float = 0.01
    warmup: bool = False
    warmup_lr: float = 0.01
    warmup_until_error: float | None = 0.8
    warmup_max_steps: int | None = None
    augment: bool = True
    # The paper's preprocessing and ImageNet protocol (Sec. 3.4, 4.2). `mean: pixel` subtracts the
    # training images' per-pixel mean (the paper's, on every data set) where "channel" normalises
    # with the channels' mean and std alone (ImageNet's for streamed sets, the training set's for
    # in-memory ones, whose images are held so: data/bundle.py's pixel_centred). For streamed
    # image data sets: AlexNet's PCA lighting on training crops (`lighting`: the std of its
    # alphas, the paper's 0.1; 0 is none); `test_views`, scored after the last epoch beside the
    # centre crop: "ten_crop" (10-crop testing, Tables 2-3) and "multi_scale" (fully
    # convolutional, scores averaged over shorter sides {224, 256, 384, 480, 640}, Table 4).
    lighting: float = 0.0
    mean: str = "channel"
    test_views: tuple[str, ...] = ()
    # Streamed image data sets: where training crops are decoded. "cpu": by the loader's workers
    # (Pillow). "gpu": the workers read each file and draw its crop, the GPU decodes the batch
    # (nvJPEG through torchvision, which must be installed) and resamples the crops: the same
    # boxes and flips, pixels within resampling differences. "auto": gpu where a trial runs on a
    # GPU with that decoder installed, else cpu. Evaluation always decodes on the CPU.
    decode: str = "cpu"
    # Data-parallel trials only: BatchNorm normalises with the statistics of the global batch
    # (all replicas), so that the replicas compute what one process does, instead of each
    # replica's own (the default; the paper does not say which its multi-GPU training used).
    sync_bn: bool = False
    eval_batch_size: int = 1000
    precision: str = "auto"
    memory_format: str = "channels_last"
    compile: bool = False
    cuda_graphs: bool | str = "auto"
    divergence_check_every: int = 25

    def __post_init__(self) -> None:
        def fail(name: str, valid: str) -> None:
            raise ValueError(f"TrainRecipe.{name} must be {valid}, got {getattr(self, name)!r}")

        for name in ("epochs", "batch_size", "eval_batch_size", "divergence_check_every",
                     "plateau_patience"):
            value = getattr(self, name)
            if isinstance(value, float):  # YAML reads 1e3 as a float
                fail(name, "an int >= 1, written as digits (it is a float)")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "an int >= 1")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) > MAX_BATCH_SIZE:
                fail(name, f"at most {MAX_BATCH_SIZE:,} images a step")
        if self.epochs > MAX_EPOCHS:
            fail("epochs", f"at most {MAX_EPOCHS} (the paper trains 164 on CIFAR-10, ~120 on "
                           "ImageNet)")
        for name in ("lr", "warmup_lr", "gamma"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                fail(name, "a number > 0")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            fail("momentum", "a number in [0, 1)")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "a number >= 0")
        if self.nesterov and self.momentum == 0:
            fail("nesterov", "False when momentum is 0 (Nesterov needs momentum)")
        # Lists come from YAML/JSON specs; the stored form is a tuple so the recipe stays hashable.
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if not all(_is_number(m) and 0 < m < 1 for m in self.milestones) or list(
            self.milestones
        ) != sorted(self.milestones):
            fail("milestones", "increasing fractions of training, each in (0, 1)")
        if self.warmup_until_error is not None and not (
            _is_number(self.warmup_until_error) and 0 <= self.warmup_until_error <= 1
        ):
            fail("warmup_until_error", "None or a training error in [0, 1]")
        if self.warmup_max_steps is not None and (
            isinstance(self.warmup_max_steps, bool)
            or not isinstance(self.warmup_max_steps, int)
            or self.warmup_max_steps < 1
        ):
            fail("warmup_max_steps", "None or an int >= 1")
        if self.warmup and self.warmup_until_error is None and self.warmup_max_steps is None:
            fail("warmup_until_error", "set (or warmup_max_steps set) when warmup is on")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"one of {', '.join(SCHEDULES)}")
        if not _is_number(self.plateau_threshold) or not 0 <= self.plateau_threshold < 1:
            fail("plateau_threshold", "a relative improvement in [0, 1)")
        self._check_protocol(fail)
        if self.precision not in PRECISIONS:
            fail("precision", f"one of {', '.join(PRECISIONS)}")
        if self.memory_format not in MEMORY_FORMATS:
            fail("memory_format", f"one of {', '.join(MEMORY_FORMATS)}")
        for name in ("compile", "sync_bn", "augment", "nesterov", "warmup"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto"):
            fail("cuda_graphs", "auto, true or false")

    def _check_protocol(self, fail: Callable[[str, str], None]) -> None:
        """The paper's ImageNet protocol fields: lighting, mean, test_views; and decode."""
        if not _is_number(self.lighting) or not 0 <= self.lighting <= 1:
            fail("lighting", "a number in [0, 1] (the std of AlexNet's PCA lighting; 0.1 is the "
                             "paper's, 0 none)")
        if self.mean not in MEANS:
            fail("mean", f"one of {', '.join(MEANS)}")
        if isinstance(self.test_views, str):  # a view's name alone: not its letters
            fail("test_views", f"a list of distinct views out of {', '.join(TEST_VIEWS)} (a "
                               f"list even for one: [{self.test_views}])")
        object.__setattr__(self, "test_views", tuple(self.test_views))
        if not set(self.test_views) <= set(TEST_VIEWS) or len(set(self.test_views)) != len(
                self.test_views):
            fail("test_views", f"a list of distinct views out of {', '.join(TEST_VIEWS)}")
        # In one order, whatever the spec's: the views are scored and recorded alike in any, and
        # a study reopened with them listed otherwise is the same study.
        object.__setattr__(self, "test_views", tuple(v for v in TEST_VIEWS
                                                     if v in self.test_views))
        if self.decode not in DECODES:
            fail("decode", f"one of {', '.join(DECODES)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "recipe") -> TrainRecipe:
        """Build from a mapping (a study spec's section); `where` names it in errors. A `preset`
        key (see PRESETS) starts from that recipe; the other keys override its fields."""
        values = dict(values)
        preset = values.pop("preset", None)
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ValueError(f"{where}: preset {preset!r} is not a recipe; valid: "
                                 f"{', '.join(PRESETS)}")
            values = {**PRESETS[preset].to_dict(), **values}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid)}, preset"
            )
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            # In the section's words ("train.epochs must be ..."), not the class's.
            field = f"{cls.__name__}."
            message = str(error)
            if message.startswith(field):
                raise ValueError(f"{where}.{message[len(field):]}") from error
            raise ValueError(f"{where}: {message}") from error

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["milestones"] = list(self.milestones)
        values["test_views"] = list(self.test_views)
        return values

    def lr_at(self, epoch: int) -> float:
        """The step schedule's learning rate of `epoch` (1-based), warm-up aside. A plateau
        schedule's depends on the run's losses (train/schedule.py follows it)."""
        if self.schedule != "step":
            raise ValueError(f"lr_at follows the step schedule; this recipe's is {self.schedule!r}")
        if not 1 <= epoch <= self.epochs:
            raise ValueError(f"epoch must be in [1, {self.epochs}], got {epoch}")
        completed = epoch - 1
        # The tolerance keeps 0.75 * 164 == 123.00000000000001-style float noise from moving a
        # decay by a whole epoch.
        decays = sum(1 for m in self.milestones if completed >= m * self.epochs - 1e-9)
        return self.lr * self.gamma**decays


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The paper's recipes by name (a spec's `train: {preset: imagenet}`):
# - cifar: Section 4.2, the defaults above.
# - imagenet: Section 3.4 with the decays at set epochs (the paper divides by 10 when the error
#   plateaus, about every 30 epochs of its 60e4 iterations): SGD, momentum 0.9, weight decay 1e-4,
#   batch 256, lr 0.1 divided by 10 at epochs 30 and 60 of 90.
# - imagenet_plateau: the same, divided by 10 when the training loss plateaus (5 epochs without
#   a 1% fall), over the paper's ~120 epochs (60e4 iterations of 256 images).
# - imagenet_paper: imagenet_plateau with the rest of Sec. 3.4: PCA lighting (0.1), the
#   per-pixel mean subtracted, and 10-crop and multi-scale testing beside the centre crop.
PRESETS: dict[str, TrainRecipe] = {
    "cifar": TrainRecipe(),
    "imagenet": TrainRecipe(epochs=90, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
                            milestones=(1 / 3, 2 / 3), eval_batch_size=256),
    "imagenet_plateau": TrainRecipe(epochs=120, batch_size=256, lr=0.1, momentum=0.9,
                                    weight_decay=1e-4, schedule="plateau", plateau_patience=5,
                                    eval_batch_size=256),
    "imagenet_paper": TrainRecipe(epochs=120, batch_size=256, lr=0.1, momentum=0.9,
                                  weight_decay=1e-4, schedule="plateau", plateau_patience=5,
                                  eval_batch_size=256, lighting=0.1, mean="pixel",
                                  test_views=("ten_crop", "multi_scale")),
}

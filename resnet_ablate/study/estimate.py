"""A dry run's estimate of a grid study's wall time, from trials' training timed on this machine.

Two architectures, the one with the most training work pending and (where it has under half its
FLOPs) the lightest, are each trained as a trial would train them (recipe, threads and device) for
two short epochs of `PROBE_STEPS` batches, with an evaluation set in the data set's own proportion
to its training set; the second epoch is timed (the first pays for allocations and caches: what it
took beyond the second is each trial's start). A trial's time is then that start plus its images
and epochs at its seconds per training image, read off the line through the two timed
architectures' by its FLOPs (small nets run fewer FLOPs a second: a step's fixed costs weigh more;
the progress line's ETA, eta.py, scales by FLOPs alone). Trials run side by side as many at a time
as the workers, the trials and this machine's cores (or GPUs) allow; the study takes no less than
its longest trial. An adaptive study's seeds listed "if open" are timed apart, as the most it may
take.

A rough figure, to tell minutes from hours before a run: packing trials on one GPU and stacking
seeds, which speed a study up, are not counted, nor the paper's test-time views scored after the
last epoch, nor Ray's own start and stop; more trials started at once than the cores (or GPUs) hold
side by side share them, no faster, and the estimate says so. Not estimated (the reason is printed
instead) for streamed data sets (the loader's rate is not probed), data-parallel trials, trials on
a cluster (--address), GPU trials on a machine without one, and a probe too large to time quickly
on a CPU.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..arch import ResNetArch
from ..spec import StudySpec
from ..spec.catalogue import STREAMED_DATASETS
from .cores import usable_cores
from .grid import PlannedTrial

PROBE_STEPS = 3  # training batches in each of the probe's two epochs
# Above this many training FLOPs (the paper's: a multiply-add is one) in the probe's two epochs, a
# CPU would take minutes to time them: no estimate. About 30 s on the 2-CPU development machine.
MAX_PROBE_CPU_TFLOPS = 1.0
LIGHTER = 0.5  # the lightest architecture is timed too where it has under this share of FLOPs


@dataclass(frozen=True)
class TimeEstimate:
    """What the dry run prints of a study's time (see the module docstring)."""

    seconds: float  # wall time of the trials to run, at `parallel` trials at a time
    parallel: int
    probed: tuple[str, ...]  # the architectures timed: the heaviest, and a light one or none
    images_per_second: float  # the first one's training rate here, evaluation included
    device: str
    # An adaptive study's seeds listed "if open": how many, and the time with them run too.
    if_open: int = 0
    if_open_seconds: float = 0.0
    budget_minutes: float | None = None  # budget.minutes, which stops the run there
    stack_seeds: int = 1  # resources.stack_seeds: not counted (each seed timed as alone)
    # The trials the run starts at once where that is more than `parallel`: a local Ray holds
    # workers x cpus CPUs whatever the cores (trials then share them), and trials packed on a
    # GPU share it (neither counted as faster).
    at_once: int = 0

    def line(self, trials: int) -> str:
        more = (f" ({_duration(self.if_open_seconds)} if the {self.if_open} 'if open' trials "
                "run too)" if self.if_open else "")
        longest = max(self.seconds, self.if_open_seconds)
        if self.budget_minutes is not None and longest > 60 * self.budget_minutes:
            more += f"; budget.minutes stops the run at {self.budget_minutes:g} min"
        if self.stack_seeds > 1:
            more += (f"; each seed timed as if it trained alone (stack_seeds {self.stack_seeds} "
                     "not counted: it pays on a GPU that one trial leaves idle)")
        rate = f"{self.images_per_second:.0f} training images/s, evaluation included"
        timed = (f"{self.probed[0]} timed here at {rate}; the others scaled by their FLOPs"
                 if len(self.probed) == 1 else
                 f"{' and '.join(self.probed)} timed here, the first at {rate}; the others "
                 "placed between by their FLOPs")
        pace = (f"{self.at_once} at once, timed as if {self.parallel} at a time (trials "
                "sharing cores or a GPU not counted faster),"
                if self.at_once > self.parallel else f"{self.parallel} at a time")
        return (f"time: about {_duration(self.seconds)} for the {trials} trials to run{more}, "
                f"{pace} on this machine's {self.device} ({timed}: a rough figure, Ray's start "
                "and stop not counted)")


def estimate_time(spec: StudySpec, planned: Sequence[PlannedTrial], workers: int,
                  announce: Callable[[str], None] | None = None, *,
                  cluster: bool = False) -> TimeEstimate | str:
    """The wall time of `planned`'s pending trials on this machine, or why it is not estimated
    (also where they run on a `cluster`, whose machines are not this one); `announce` is told
    what is timed before the probes train (a few seconds)."""
    pending = [p for p in planned if p.status == "pending"]
    reason = _why_not(spec, pending, cluster)
    if reason is not None:
        return reason
    train_images = _train_images(spec)
    probes = _probes(spec, pending, train_images)
    if isinstance(probes, str):
        return probes
    if announce is not None:
        announce(f"timing the training of {' and '.join(p.arch.name for p in probes)} here for "
                 f"the estimate ({2 * PROBE_STEPS} batches each)...")
    on_gpu = spec.resources.gpus > 0
    timed = [_probe(spec, p.arch, "cuda" if on_gpu else "cpu") for p in probes]
    if any(t is None for t in timed):
        return "time: not estimated: an architecture diverged in the probe's first epoch"
    per_image = _per_image([p.gflops for p in probes], [t[0] for t in timed])  # type: ignore
    start = max(t[2] for t in timed)  # type: ignore[index]

    def wall(trials: Sequence[PlannedTrial]) -> tuple[float, int]:
        # Each trial: its start, then its images and epochs at its FLOPs' time per image; the
        # study: trials side by side, never less than its longest trial.
        times = [start + train_images * spec.recipe_for(p.arch).epochs * per_image(p.gflops)
                 for p in trials]
        parallel = _parallel(spec, workers, len(trials), on_gpu)
        return max(sum(times) / parallel, max(times)), parallel

    seconds, parallel = wall(pending)
    if_open = [p for p in planned if p.status == "if open"]
    import torch

    where = torch.cuda.get_device_name() if on_gpu else f"{usable_cores()} CPUs"
    names = tuple(p.arch.name for p in probes)
    return TimeEstimate(seconds, parallel, names, timed[0][1], where,  # type: ignore[index]
                        len(if_open), wall([*pending, *if_open])[0] if if_open else 0.0,
                        spec.budget.minutes, spec.resources.stack_seeds,
                        _at_once(spec, workers, len(pending), on_gpu))


def _probes(spec: StudySpec, pending: Sequence[PlannedTrial], train_images: int
            ) -> list[PlannedTrial] | str:
    """The trials whose architectures are timed: the one with the most work pending, and the
    lightest where it has under `LIGHTER` of its FLOPs (small nets run fewer FLOPs a second: a
    step's fixed costs weigh more); or why none is (too large to time on a CPU)."""
    work: dict[ResNetArch, float] = {}
    for p in pending:
        work[p.arch] = work.get(p.arch, 0.0) + p.train_tflops
    heaviest = max(work, key=lambda arch: work[arch])
    first = next(p for p in pending if p.arch == heaviest)
    recipe = spec.recipe_for(heaviest)
    # Its training FLOPs in the probe's two short epochs, from those of its whole trial.
    probe_tflops = (first.train_tflops * 2 * PROBE_STEPS * recipe.batch_size
                    / (train_images * recipe.epochs))
    if spec.resources.gpus <= 0 and probe_tflops > MAX_PROBE_CPU_TFLOPS:
        return (f"time: not estimated: two short epochs of {heaviest.name} ({probe_tflops:.1f} "
                "TFLOPs of training) would take minutes to time on this CPU")
    lightest = min(pending, key=lambda p: p.gflops)
    return [first] + ([lightest] if lightest.gflops < LIGHTER * first.gflops else [])


def _per_image(gflops: Sequence[float], seconds: Sequence[float]) -> Callable[[float], float]:
    """Seconds per training image as a function of an architecture's GFLOPs: through one probe,
    proportional to them; through two, the line through both (never below zero, nor falling
    with more FLOPs)."""
    if len(gflops) == 1:
        return lambda g: seconds[0] * g / gflops[0]
    (g0, g1), (s0, s1) = gflops, seconds
    slope = max(0.0, (s1 - s0) / (g1 - g0))
    return lambda g: max(0.0, s0 + slope * (g - g0))


def _why_not(spec: StudySpec, pending: Sequence[PlannedTrial], cluster: bool) -> str | None:
    if not pending:
        return "time: nothing to run"
    if cluster:
        return ("time: not estimated for a cluster (--address): its machines are not this one; "
                "the progress line gives an ETA once trials end")
    if spec.dataset.name in STREAMED_DATASETS:
        return ("time: not estimated for a streamed data set (the loader's rate is not probed); "
                "the progress line gives an ETA once trials end")
    if spec.resources.replica_count > 1:
        return ("time: not estimated for data-parallel trials; the progress line gives an ETA "
                "once trials end")
    if spec.resources.gpus > 0:
        import torch

        if not torch.cuda.is_available():
            return ("time: not estimated: the trials run on GPUs (resources.gpus) and this "
                    "machine has none")
    return None


def _train_images(spec: StudySpec) -> int:
    from ..data import dataset_shape

    return dataset_shape(**spec.dataset.load_kwargs()).train_size


def _probe(spec: StudySpec, arch: ResNetArch, device: str) -> tuple[float, float, float] | None:
    """Seconds per training image (its share of the evaluation included) of `arch` trained as a
    trial trains it, the training images per second that makes, and the seconds its start took
    (the first epoch's beyond the second's); None where it diverged in its first epoch."""
    from ..recipe import TrainRecipe
    from ..train import train
    from ..trial import TrialInputs
    from .loop import trial_task

    task = trial_task(spec, 0, arch, spec.seeds[0], keep_weights=False, checkpoints=None)
    inputs = TrialInputs.of(task)
    data = inputs.data
    train_images = min(len(data.train_y), PROBE_STEPS * inputs.recipe.batch_size)
    test_images = max(1, round(train_images * len(data.test_y) / len(data.train_y)))
    sample = dataclasses.replace(data, train_x=data.train_x[:train_images],
                                 train_y=data.train_y[:train_images],
                                 test_x=data.test_x[:test_images], test_y=data.test_y[:test_images])
    # No warm-up: a trial warms up for a few hundred of its thousands of steps, reading its
    # error on the host at each, which would be every step the probe times.
    recipe = TrainRecipe.from_dict({**inputs.recipe.to_dict(), "epochs": 2, "test_views": [],
                                    "warmup": False})
    result = train(inputs.model, sample, recipe, seed=task.seed, device=device,
                   threads=task.threads)
    if not result.history:
        return None
    seconds = result.history[-1].seconds  # the first epoch's where the second diverged
    # What the first epoch took beyond the second: a trial's own start (allocations, caches).
    start = result.wall_seconds - len(result.history) * seconds
    return seconds / train_images, train_images / seconds, max(0.0, start)


def _parallel(spec: StudySpec, workers: int, trials: int, on_gpu: bool) -> int:
    """Trials at a time, as the time counts them: those started at once (`_at_once`), as many
    as this machine holds side by side (the CPUs each takes; packed trials share one GPU, not
    counted as faster)."""
    if on_gpu:
        import torch

        room = torch.cuda.device_count()
    else:
        room = int(usable_cores() // max(1.0, spec.resources.cpus))
    return max(1, min(_at_once(spec, workers, trials, on_gpu), room))


def _at_once(spec: StudySpec, workers: int, trials: int, on_gpu: bool) -> int:
    """Trials a local run starts at once: its Ray holds workers x cpus CPUs (cluster.py), so
    every worker runs on a CPU; on GPUs, as many as their shares of this machine's GPUs hold."""
    if on_gpu:
        import torch

        # As Ray places them: a fraction of a GPU shares one GPU (0.4 of 2 GPUs: 2 a GPU, 4 in
        # all, not 5); whole GPUs are taken whole.
        gpus, devices = spec.resources.gpus, torch.cuda.device_count()
        held = devices * int(1 / gpus + 1e-9) if gpus < 1 else int(devices / gpus + 1e-9)
        return max(1, min(workers, trials, held))
    return max(1, min(workers, trials))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["TimeEstimate", "estimate_time"]

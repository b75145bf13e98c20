"""What a dry run advises beside a study's plan: how many small trials to pack on one GPU and how
many seeds to stack into one model (from what the GPU check measured on each GPU model), the
tasks that stacking makes, and the start-up Ray Train adds to each data-parallel trial.

Measurements live here as typed constants, filled from the GPU check's summary
(benchmarks/gpu_summary.py prints the entries to add)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..execution import cuda_graphs_by_default
from ..spec import StudySpec
from ..spec.catalogue import STREAMED_DATASETS
from ..spec.sections import trial_threads

# Images up to this side make trials small enough that one leaves a large GPU mostly idle.
SMALL_IMAGE_SIZE = 64


@dataclass(frozen=True)
class PackingMeasurement:
    """The trials per GPU that trained the most images per second together on one GPU model
    (benchmarks/bench_packing.py, run by benchmarks/gpu_check.sh), and that aggregate's gain
    over one trial alone."""

    device: str
    trials_per_gpu: int
    speedup: float
    cuda_graphs: bool  # whether each trial replayed its steps from a CUDA graph
    mps: bool = False  # whether the trials shared the GPU through CUDA's Multi-Process Service
    # The CPU threads each trial ran (bench_packing.py --threads, 1 unless given): the host's
    # share that the gain holds for (a 16-core node packs 8 trials of 4 threads only by
    # sharing its cores, slower than measured).
    cpus: float = 1
    model: str = "ResNet-56"  # the trials measured (bench_packing.py --depth)


# One entry per GPU model, CUDA graphs on or off, and MPS or not; the GPU check's summary.md gives
# the entry to add. ResNet-56 trials of 10,240 CIFAR-sized images, 1, 2, 4 and 8 at once
# (benchmarks/bench_packing.py, benchmarks/results/packing.csv): without graphs a trial is bound
# by its host, and trials sharing the GPU fill each other's gaps (4 trials gave 3.56x, 8 3.61x);
# with graphs one trial keeps the GPU busy launching, and separate processes time-slice it (4 gave
# 1.34x, 8 1.10x in an earlier run); through CUDA's MPS their kernels run side by side (8: 2.48x).
MEASURED_PACKINGS: tuple[PackingMeasurement, ...] = (
    PackingMeasurement("NVIDIA H200", 8, 3.61, cuda_graphs=False),
    PackingMeasurement("NVIDIA H200", 4, 1.34, cuda_graphs=True),
    PackingMeasurement("NVIDIA H200", 8, 2.48, cuda_graphs=True, mps=True),
)


@dataclass(frozen=True)
class StackingMeasurement:
    """Seeds of one configuration trained as one stacked model (resources.stack_seeds) on one GPU
    model: how many, and the images/s of all of them together over one seed's alone
    (benchmarks/bench_seed_stack.py, run by benchmarks/gpu_check.sh; median over ResNet-20, 56
    and 110, each step replayed from a CUDA graph)."""

    device: str
    seeds: int
    speedup: float


# One entry per GPU model; the GPU check's summary.md gives the entry to add. None measured yet.
MEASURED_STACKINGS: tuple[StackingMeasurement, ...] = ()

# What Ray Train costs a data-parallel trial beside its training, whatever its size: a worker
# group, a process group and a checkpoint folder set up and taken down per trial (seconds:
# 2-replica, 1-epoch ResNet-20 digits studies of 2 and 6 trials, one trial at a time, took
# 62-68 s and 162 s where the same studies in one process took 27 s and 32 s: 18-22 s a trial,
# on the idle 2-CPU development machine on 2026-12-03; a loaded one takes longer). It was
# 45-60 s on a loaded machine while Ray Train's placement-group cleaner still held each trial
# 12 s at its end (data_parallel.py).
RAY_TRAIN_START_UP_SECONDS = (18, 22)


def fastest_packing(aggregate_by_trials: Mapping[int, float]) -> int:
    """The trials per GPU with the highest aggregate images/s (the fewest among equals)."""
    if not aggregate_by_trials:
        raise ValueError("no packing measured: need the aggregate images/s of at least one "
                         "number of trials per GPU")
    return max(sorted(aggregate_by_trials), key=lambda trials: aggregate_by_trials[trials])


def packing_advice(gpus: float, cpus: float, replicas: int, image_size: int, cuda_graphs: bool,
                   measured: Sequence[PackingMeasurement] = MEASURED_PACKINGS) -> list[str]:
    """What a dry run recommends for a study whose trials each hold `gpus` GPUs and `cpus` CPUs,
    with CUDA graphs or without: for small one-process trials on GPUs, the fastest packing
    measured on each GPU model for trials like these, with the CPUs each trial had there and
    whether the GPU was shared through CUDA's MPS (nothing for CPU trials, data-parallel ones
    or large images)."""
    if gpus <= 0 or replicas > 1 or image_size > SMALL_IMAGE_SIZE:
        return []
    graphs = "with CUDA graphs" if cuda_graphs else "without CUDA graphs"
    measured = [m for m in measured if m.cuda_graphs == cuda_graphs]
    if not measured:
        return [f"packing: trials of {image_size}-px images leave a GPU mostly idle; no packing "
                f"of trials {graphs} is measured yet (bash benchmarks/gpu_check.sh on a GPU "
                "measures 1, 2, 4 and 8 trials per GPU)"]
    lines = []
    for m in measured:
        share = 1 / m.trials_per_gpu
        held = "as this spec has" if abs(gpus - share) < 1e-9 else f"this spec has {gpus:g}"
        sharing = ("through CUDA's MPS, whose daemon must run on the node: "
                   "nvidia-cuda-mps-control -d" if m.mps else "without MPS")
        threads = f"{m.cpus:g} CPU thread{'s' * (m.cpus != 1)}"
        # More threads a trial than measured: a node needs the CPUs they add up to, or Ray
        # runs fewer trials at once on a cluster and a local one shares its cores, slower than
        # measured.
        cores = (f"; this spec's cpus: {cpus:g} make {m.trials_per_gpu * cpus:g} CPUs a GPU "
                 f"for {m.trials_per_gpu} trials, where they were measured at {m.cpus:g} each"
                 if trial_threads(cpus) > m.cpus else "")
        lines.append(f"packing: on {m.device}, {m.trials_per_gpu} {m.model} trials per GPU of "
                     f"{threads} each ({graphs}, as this spec's trials run; {sharing}) trained "
                     f"{m.speedup:.2f}x the images/s of one: recommended resources.gpus: "
                     f"{share:g} and workers: {m.trials_per_gpu} per GPU ({held}){cores}")
    return lines


def stacking_advice(gpus: float, replicas: int, image_size: int, seeds: int, stack_seeds: int,
                    measured: Sequence[StackingMeasurement] = MEASURED_STACKINGS) -> list[str]:
    """What a dry run says of stacking for a grid study of `seeds` seeds per point whose trials
    each hold `gpus` GPUs: for small one-process GPU trials, the gain measured on each GPU model
    (nothing for CPU trials, data-parallel ones, large images or a single seed)."""
    if gpus <= 0 or replicas > 1 or image_size > SMALL_IMAGE_SIZE or seeds < 2:
        return []
    if not measured:
        return [f"stacking: seeds of a configuration trained as one model (resources.stack_seeds) "
                f"are not measured on a GPU yet (bash benchmarks/gpu_check.sh measures 5 seeds "
                f"as one against one); this spec stacks {stack_seeds}"]
    lines = []
    for m in measured:
        verdict = (f"recommended resources.stack_seeds: {min(m.seeds, seeds)}" if m.speedup > 1
                   else "not recommended")
        lines.append(f"stacking: on {m.device}, {m.seeds} seeds of a configuration as one model "
                     f"trained {m.speedup:.2f}x the images/s of one seed: {verdict} (this spec "
                     f"stacks {stack_seeds}; a stack packs on a GPU as one trial above)")
    return lines


def trials_use_cuda_graphs(spec: StudySpec) -> bool:
    """Whether the study's trials will replay their steps from CUDA graphs, as a GPU trial
    resolves its recipe (`resolve_execution`)."""
    recipe = spec.train
    if isinstance(recipe.cuda_graphs, bool):
        return recipe.cuda_graphs
    return cuda_graphs_by_default(spec.resources.gpus > 0, spec.dataset.name not in
                                  STREAMED_DATASETS, spec.resources.replica_count,
                                  recipe.precision, bool(recipe.compile))


def start_up_cost(replicas: int, trials: int,
                  seconds: tuple[float, float] = RAY_TRAIN_START_UP_SECONDS) -> list[str]:
    """What a dry run says of the fixed start-up that Ray Train adds to each of `trials`
    data-parallel trials (nothing for one-process trials, which start as plain Ray tasks)."""
    if replicas <= 1 or trials <= 0:
        return []
    low, high = seconds
    return [f"start-up: Ray Train adds {low:g}-{high:g} s to each data-parallel trial, starting "
            f"and stopping its replicas (measured on 2 idle CPUs): {trials} trials to run spend "
            f"{trials * low / 60:.1f}-{trials * high / 60:.1f} trial-minutes starting, beside "
            "the training above"]


def stacked_tasks(stack_seeds: int, configurations: Sequence[str]) -> list[str]:
    """What a dry run says of resources.stack_seeds: how many tasks the trials to run make, each
    grid point's seeds taken up to `stack_seeds` at a time (nothing where seeds run alone)."""
    if stack_seeds <= 1 or not configurations:
        return []
    seeds = Counter(configurations)
    tasks = sum(-(-count // stack_seeds) for count in seeds.values())
    return [f"stacked: up to {stack_seeds} seeds of a configuration train as one model in one "
            f"task (resources.stack_seeds), each seed still a trial of its own: "
            f"{len(configurations)} trials to run in {tasks} task{'' if tasks == 1 else 's'}"]

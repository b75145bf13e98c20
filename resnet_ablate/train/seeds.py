"""Several seeds of one configuration trained at once, stacked into one model: `train_seeds`.

Each seed gets what `train(model, data, recipe, seed=s)` would give it: initial weights built
under its seed, its own data order and augmentation (a feed seeded from it), the recipe's
schedule, and its own evaluation and record. They train as one stacked model (seed_stack.py:
every launch computes all of them, which is what a GPU that one small trial leaves idle needs),
on the sum of their losses, so each seed's weights follow its own gradients exactly, and are
scored after each epoch in one pass of the stacked model over the test images, which every seed
is given (evaluate.py's evaluate_stacked); the results differ from separate runs only by
floating-point rounding (grouped convolutions, wider reductions). At the end each seed's model
(built by the factory) holds its own final weights.

Each seed keeps its own schedule: warm-up ends on the seed's own training error and the plateau
schedule decays on its own loss, so where a recipe has either, the seeds step with a rate each
(SeedSGD, seed_sgd.py); else they share PyTorch's fused SGD, as train() steps one seed.
What the seeds share limits what it runs: an in-memory data set in one process; not fp16, whose
gradient scaler they would share (one seed's overflow would skip every seed's step); no
`compile`. A seed whose loss diverges is recorded as diverged at that point; its channels keep
their NaN to themselves and the other seeds train on; so do they past a seed its caller stops
(a pruner). Randomness inside the model (dropout) draws from one generator for all seeds: the
same distribution as alone, not the same draws. No checkpoints or resumption (train each seed
alone for those). Each seed's `images_per_second` is its own images over the shared training
time (the stacked run's rate divided by the seeds), its epochs' `seconds` are the stacked
run's, and its `wall_seconds` its share of the stacked run's time until its own run ended (while
k seeds run, each is charged 1/k), so that the seeds' times add up to the run's: a trial's cost
as a study compares costs, whether its seeds trained stacked or alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..data import DataBundle
from ..data.bundle import pixel_centred
from ..data.feed import Placement, feed_for
from ..execution import resolve_execution, with_safe_layout
from ..recipe import TrainRecipe
from ..record import EpochRecord
from ..replicas import Replicas
from ..seed_stack import check_stacked, seed_state_dict, stack_models
from .divergence import Diverged, DivergenceWatch
from .evaluate import Evaluation, evaluate_stacked
from .loop import _check_seed_and_threads, _seeded_on
from .result import TrainResult, epoch_line, require_images, result_of
from .schedule import Schedule
from .step import Step


# Training images the stacked model is checked on against each seed's model before training.
EXAMPLE_IMAGES = 4


def train_seeds(model: Callable[[], nn.Module], data: DataBundle, recipe: TrainRecipe, *,
                seeds: Iterable[int], device: str | torch.device = "cpu",
                threads: int | None = None,
                log: Callable[[str], None] | None = None,
                on_epoch: Callable[[int, EpochRecord], bool | None] | None = None,
                on_end: Callable[[int, TrainResult], None] | None = None
                ) -> list[TrainResult]:
    """Train `model` (a factory: each seed's initial weights are built under that seed) on
    `data` with `recipe` for every seed of `seeds` at once; one `TrainResult` per seed, in order.
    `on_epoch(index, record)` is called with each seed's record of each epoch (`index` into
    `seeds`); where it returns True, that seed is stopped there (status "stopped", as a pruner
    stops a trial) while the others train on. `on_end(index, result)` is called as each seed's
    run ends: a seed that diverges or is stopped there and then, the others at the end; so a
    caller whose run raises later still knows how the seeds that had ended did. See the module's
    docstring for what it runs and what it refuses."""
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds must be a list of ints, one per seed to train; got {seeds!r}")
    seeds = list(seeds)
    _check(model, data, recipe, seeds)
    for seed in seeds:
        _check_seed_and_threads(seed, threads)
    device = torch.device(device)
    execution = resolve_execution(recipe, device, in_memory=True)
    if execution.compile or execution.precision == "fp16":
        raise ValueError("train_seeds runs neither compile nor fp16 (its gradient scaler would "
                         "be every seed's: one seed's overflow would skip all their steps): "
                         "use compile: false and bf16 or fp32")
    models = []
    for seed in seeds:
        with _seeded_on(device, seed, threads):
            built = model()
            if not isinstance(built, nn.Module):
                raise TypeError(f"the model factory returned {type(built).__name__}, "
                                "not an nn.Module")
            models.append(built.to(device))
    with _seeded_on(device, seeds[0], threads):
        # Checked on a few training images: a forward that mixes the seeds is refused, not
        # trained.
        stacked = stack_models(models)
        execution = with_safe_layout(execution, stacked, log)
        for module in (stacked, *models):
            module.to(memory_format=execution.torch_memory_format)
        check_stacked(stacked, models, execution.images(data.train_x[:EXAMPLE_IMAGES].to(device)))
        run = _StackedRun(stacked, models, data, recipe, execution, seeds, log, on_epoch, on_end)
        return run.run()


def _check(model, data, recipe: TrainRecipe, seeds: list[int]) -> None:
    if not callable(model) or isinstance(model, nn.Module):
        raise TypeError("train_seeds takes a model factory (a function of no arguments), so "
                        "that each seed's initial weights are built under that seed")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, at least one; got {seeds!r}")
    if not isinstance(data, DataBundle):
        raise TypeError("train_seeds trains on an in-memory data set (a DataBundle); train "
                         "each seed of a streamed one alone")


class _StackedRun:
    """The epoch loop of train_seeds: loop.py's, with a feed, a divergence watch, an
    evaluation and a history per seed."""

    def __init__(self, stacked: nn.Module, models: list[nn.Module], data: DataBundle,
                 recipe: TrainRecipe, execution, seeds: list[int],
                 log: Callable[[str], None] | None,
                 on_epoch: Callable[[int, EpochRecord], bool | None] | None,
                 on_end: Callable[[int, TrainResult], None] | None) -> None:
        device = torch.device(execution.device)
        self.models, self.recipe, self.execution, self.seeds, self.log = (
            models, recipe, execution, seeds, log)
        self.on_epoch, self.on_end = on_epoch, on_end
        replicas = Replicas()
        # Warm-up and the plateau schedule set each seed's rate apart.
        self.rate_per_seed = bool(recipe.warmup) or recipe.schedule == "plateau"
        self.step = Step(stacked, recipe, execution, replicas, seeds=len(seeds),
                         rate_per_seed=self.rate_per_seed)
        # Each seed's feed, placed as train(seed=...) places it, all on one copy of the data.
        data = placed_once(data, device, execution.images, recipe.mean == "pixel")
        self.feeds = [feed_for(data, Placement(device, execution.images, seed, recipe.augment,
                                               replicas.rank, replicas.world, recipe.lighting,
                                               recipe.mean == "pixel", recipe.test_views,
                                               replicas.sums))
                      for seed in seeds]
        self.schedules = [Schedule(recipe, _prefixed(log, seed)) for seed in seeds]
        self.watches = [DivergenceWatch(data.num_classes, recipe.divergence_check_every)
                        for _ in seeds]
        self.evaluations = [Evaluation(feed, recipe.eval_batch_size, execution, replicas,
                                       data.eval_split) for feed in self.feeds]
        self.eval_split = data.eval_split
        self.histories: list[list[EpochRecord]] = [[] for _ in seeds]
        self.diverged: list[str | None] = [None for _ in seeds]
        self.stopped: list[str | None] = [None for _ in seeds]  # by on_epoch
        self.results: dict[int, TrainResult] = {}  # each seed's, as its run ends
        self.train_images, self.train_seconds = 0, 0.0
        # Each seed's share of the stacked run's time: while k seeds run, each is charged 1/k
        # of it, so that the seeds' wall_seconds add up to the run's, as trials alone do.
        self.charged = [0.0 for _ in seeds]
        self.charging = set(range(len(seeds)))  # the seeds whose runs have not ended
        self.charged_until = 0.0  # as run() starts

    def run(self) -> list[TrainResult]:
        self.charged_until = time.perf_counter()
        for epoch in range(1, self.recipe.epochs + 1):
            self._epoch(epoch)
            if not self._training():
                break
        for index, history in enumerate(self.histories):
            if self._trains(index):  # its model gets its weights (kept by studies)
                self.models[index].load_state_dict(seed_state_dict(self.step.model, index))
                self.diverged[index] = self.watches[index].never_learned(history)
                if self.diverged[index] is not None and self.log:
                    self.log(f"seed {self.seeds[index]} diverged: {self.diverged[index]}")
                self._end(index)
        return [self.results[index] for index in range(len(self.seeds))]

    def _epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        epoch_lrs = [schedule.epoch_lr(epoch) for schedule in self.schedules]
        self.step.start_epoch()
        for watch in self.watches:
            watch.start_epoch()
        seen = step = 0
        batches = zip(*(feed.train_batches(epoch, self.recipe.batch_size)
                        for feed in self.feeds))
        for step, per_seed in enumerate(batches, start=1):
            images = torch.cat([images for images, _, _ in per_seed], dim=1)
            labels = torch.stack([labels for _, labels, _ in per_seed], dim=1)
            lrs = [s.step_lr(lr) for s, lr in zip(self.schedules, epoch_lrs)]
            self.step.set_lr(lrs if self.rate_per_seed else lrs[0])
            self.step(images.contiguous(memory_format=self.execution.torch_memory_format),
                      labels, 1.0)
            seen += labels.shape[0]
            self._after_step(labels.shape[0])
            if step % self.watches[0].check_every == 0:
                self._watch(epoch, step, seen)
                if not self._training():
                    return  # as train() stops at the check that finds its seed diverged
        self._watch(epoch, step, seen)  # also waits for the device: the epoch's time is real
        if not self._training():
            return
        trained = time.perf_counter()
        require_images(seen, f"epoch {epoch}'s training", 0)
        self.train_images += seen * len(self.seeds)
        self.train_seconds += trained - started
        self._record_epoch(epoch, started, trained, seen)

    def _record_epoch(self, epoch: int, started: float, trained: float, seen: int) -> None:
        """Each seed's record of the epoch, from the step's sums and one evaluation of all."""
        losses, wrong = self.step.loss_sum.tolist(), self.step.wrong.tolist()
        lrs = self.step.current_lr
        # Every seed scored in one pass of the stacked model; a diverged or stopped seed keeps
        # the test record of its last completed epoch, as train() leaves it.
        out = {index for index in range(len(self.seeds)) if not self._trains(index)}
        scores = evaluate_stacked(self.step.model, self.evaluations, skip=out)
        for index, model in enumerate(self.models):
            if index in out:
                continue
            self.schedules[index].end_epoch(losses[index] / seen)
            test_loss, test_error, top5 = scores[index]  # type: ignore[misc]
            views = {}
            if epoch == self.recipe.epochs and self.evaluations[index].feed.test_views:
                model.load_state_dict(seed_state_dict(self.step.model, index))
                views = self.evaluations[index].views(model)
            record = EpochRecord(
                epoch=epoch, lr=lrs[index] if isinstance(lrs, list) else lrs,
                train_loss=losses[index] / seen, train_error=wrong[index] / seen,
                test_loss=test_loss, test_error=test_error,
                seconds=time.perf_counter() - started, test_top5_error=top5,
                train_seconds=trained - started, **views)
            self.histories[index].append(record)
            if self.on_epoch and self.on_epoch(index, record):
                self.stopped[index] = f"stopped after epoch {epoch}"
                self._end(index)
            if self.log:
                self.log(f"seed {self.seeds[index]} "
                         f"{epoch_line(record, self.recipe.epochs, self.eval_split)}")

    def _after_step(self, images: int) -> None:
        """Warm-up's count for each seed still warming up, on its own batch error (the step's
        one wait for the device, as train()'s while it warms up)."""
        warming = [index for index, schedule in enumerate(self.schedules)
                   if schedule.warming_up and self._trains(index)]
        if not warming:
            return
        wrong = self.step.batch_wrong.tolist()
        for index in warming:
            self.schedules[index].after_step(wrong[index] / images)

    def _watch(self, epoch: int, step: int, seen: int) -> None:
        """Each seed's divergence watch on its own running loss; a seed that diverges is
        recorded so and left out from then on."""
        losses = self.step.loss_sum.tolist()
        for index, watch in enumerate(self.watches):
            if not self._trains(index):
                continue
            try:
                watch.read(losses[index], seen, epoch, step)
            except Diverged as diverged:
                self.diverged[index] = str(diverged)
                if self.log:
                    self.log(f"seed {self.seeds[index]} diverged: {diverged}")
                self._end(index)

    def _trains(self, index: int) -> bool:
        """Whether seed `index` still trains: neither diverged nor stopped."""
        return self.diverged[index] is None and self.stopped[index] is None

    def _training(self) -> bool:
        """Whether any seed still trains (else the run ends, as a run alone would)."""
        return any(self._trains(index) for index in range(len(self.seeds)))

    def _charge(self) -> None:
        """Splits the time since the last charge among the seeds whose runs go on."""
        now = time.perf_counter()
        for index in self.charging:
            self.charged[index] += (now - self.charged_until) / len(self.charging)
        self.charged_until = now

    def _end(self, index: int) -> None:
        """Seed `index`'s run has ended: its result, as of now (its time so far, its record that
        of its last completed epoch), kept and handed to on_end."""
        self._charge()
        self.charging.discard(index)
        stopped, diverged = self.stopped[index], self.diverged[index]
        status = "stopped" if stopped else "diverged" if diverged else "completed"
        self.results[index] = result = result_of(
            status, stopped or diverged, self.histories[index],
            wall_seconds=self.charged[index],
            # Each seed's share of the stacked run's images over its training time.
            images_per_second=(self.train_images / len(self.seeds) / self.train_seconds
                               if self.train_seconds else 0.0),
            compile_seconds=0.0,
            execution=self.execution.record(stacked_seeds=len(self.seeds)),
            warmup_steps=self.schedules[index].warmup_steps, seed=self.seeds[index],
            eval_split=self.eval_split,
            recipe=self.recipe, **self.evaluations[index].test_record)
        if self.on_end:
            self.on_end(index, result)


def placed_once(data: DataBundle, device: torch.device,
                prepare: Callable[[torch.Tensor], torch.Tensor],
                pixel_mean: bool = False) -> DataBundle:
    """`data` with its tensors on `device`, the per-pixel mean subtracted where the recipe asks,
    and its images prepared (the run's memory format): each seed's feed, placing it the same
    way, then finds them there and copies nothing, so that K seeds hold one copy of the data set
    on the device, not K."""
    data = dataclasses.replace(data, train_x=data.train_x.to(device),
                               train_y=data.train_y.to(device), test_x=data.test_x.to(device),
                               test_y=data.test_y.to(device))
    if pixel_mean:
        data = pixel_centred(data)
    return dataclasses.replace(data, train_x=prepare(data.train_x), test_x=prepare(data.test_x))


def _prefixed(log: Callable[[str], None] | None, seed: int) -> Callable[[str], None] | None:
    """`log` with each line naming the seed it is about (a schedule's warm-up ending)."""
    if log is None:
        return None
    return lambda line: log(f"seed {seed} {line}")

"""Training one model on one dataset with the recipe of He et al. (CVPR 2016), scaled by epochs:
`train` and its epoch loop.

The paper (section 4.2) trains CIFAR-10 ResNets with SGD, momentum 0.9, weight decay 1e-4,
batch 128, lr 0.1 divided by 10 at 32k and 48k of 64k iterations (50% and 75%), and for
ResNet-110 warms up at lr 0.01 until the training error is below 80% (about 400 iterations).
`TrainRecipe` (recipe.py, a plain description) holds all of it; `train` runs it and returns a
`TrainResult` record.

`train` is what a study runner calls inside a worker process: it is seeded and reproducible
(bitwise on CPU), uses exactly the threads it is given, reports every epoch through `on_epoch`,
and returns a result marked "diverged" instead of raising when the loss blows up (divergence.py
gives the rule).

The loop is only the loop; its parts each live apart and each carry their own checkpoint state:
the data set placed on the device (data/feed.py), the step (step.py: optimizer, scaler, compile, CUDA
graphs, device-side sums), the learning rate (schedule.py: schedule, plateau, warm-up), the
divergence watch (divergence.py) and the evaluation (evaluate.py). It follows GPU practice (see
execution.py for the choices): data and augmentation live on the device, a step never waits for
the host (loss and error accumulate on the device and are read every `divergence_check_every`
steps and at epoch end; only warm-up, the paper's rule for ResNet-110, reads each of its few
hundred steps' error), channels_last, bf16 autocast by default on CUDA, fused SGD, optional
`torch.compile` (its compile time recorded apart from training) and whole-step CUDA graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import DataBundle, Streamed
from ..execution import Execution, resolve_execution, with_safe_layout
from ..recipe import TrainRecipe
from ..replicas import Replicas, synchronise_batch_norms
from .divergence import Diverged, DivergenceWatch
from .evaluate import Evaluation
from ..data.device_decode import nvjpeg_decoder
from ..data.feed import Placement, feed_for
from ..record import EpochRecord
from .result import TrainResult, TrainStatus, epoch_line, require_images, result_of
from .schedule import Schedule
from .step import Step


def train(
    model: nn.Module | Callable[[], nn.Module],
    data: DataBundle | Streamed,
    recipe: TrainRecipe,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    log: Callable[[str], None] | None = None,
    compile_backend: str = "inductor",
    replicas: Replicas | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train `model` on `data` with `recipe`; returns the record of the run.

    Pass a zero-argument factory instead of a module to make the initial weights part of what
    `seed` fixes: it is built under the seed. Data order and augmentation draw from their own
    generators seeded from `seed`, so switching augmentation off leaves the data order unchanged.
    The process's global RNG state is restored afterwards.
    `threads` sets torch's intra-op threads for the run and restores the previous count.
    An exception from `on_epoch` (e.g. optuna.TrialPruned) propagates unchanged.
    `compile_backend` is torch.compile's backend when `recipe.compile` is on.

    With `replicas` of a process group (replicas.py), this process is one replica of a
    data-parallel run: it trains its share of each global batch (`recipe.batch_size`) through
    DistributedDataParallel, with BatchNorm statistics per replica or, with `recipe.sync_bn`, of
    the global batch; every number it records (losses, errors, images) is the run's, and
    `on_epoch` and `on_checkpoint` are called on every replica with the same values.
    `on_checkpoint(state)` gets the run's whole state after each epoch (after `on_epoch`; its
    tensors are the run's own, to be saved before it returns); `resume=state` continues a run
    from such a state, at the epoch after it.
    """
    _check_seed_and_threads(seed, threads)
    device = torch.device(device)
    replicas = replicas or Replicas()
    streamed = isinstance(data, Streamed)
    execution = resolve_execution(
        recipe, device, in_memory=not streamed, processes=replicas.world,
        gpu_decoder=streamed and recipe.decode != "cpu" and nvjpeg_decoder(device) is not None)
    with _seeded_on(device, seed, threads):
        if not isinstance(model, nn.Module):
            model = model()
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"the model factory returned {type(model).__name__}, not an nn.Module"
                )
        execution = with_safe_layout(execution, model, log)
        if replicas.parallel and recipe.sync_bn:
            synchronise_batch_norms(model)
        run = _Run(model, data, recipe, execution, seed, replicas,
                   _Hooks(on_epoch, on_checkpoint, log, compile_backend))
        if resume is not None:
            run.load_state_dict(resume)
        return run.run()


@contextlib.contextmanager
def _seeded_on(device: torch.device, seed: int, threads: int | None) -> Iterator[None]:
    """Torch seeded with `seed`, `threads` intra-op threads and cuDNN's benchmark mode set for a
    run on `device`; the RNG state, thread count and mode are put back afterwards."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    # fork_rng saves and restores the RNG of the CUDA device trained on, no other.
    cuda_devices: list[int] = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    previous_cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            # cuDNN picks the fastest convolution per shape once; a trial reuses few shapes.
            torch.backends.cudnn.benchmark = device.type == "cuda"
            yield
    finally:
        torch.backends.cudnn.benchmark = previous_cudnn_benchmark
        torch.set_num_threads(previous_threads)


def _check_seed_and_threads(seed: Any, threads: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")


@dataclass(frozen=True)
class _Hooks:
    """What the caller of `train` gave besides the run itself (see `train`)."""

    on_epoch: Callable[[EpochRecord], None] | None
    on_checkpoint: Callable[[dict[str, Any]], None] | None
    log: Callable[[str], None] | None
    compile_backend: str


class _Run:
    """One training run: the epoch loop over its parts, whose combined state is its checkpoint."""

    def __init__(self, model: nn.Module, data: DataBundle | Streamed, recipe: TrainRecipe,
                 execution: Execution, seed: int, replicas: Replicas, hooks: _Hooks) -> None:
        device = torch.device(execution.device)
        self.model = model.to(device, memory_format=execution.torch_memory_format)
        self.recipe, self.execution, self.seed = recipe, execution, seed
        self.replicas, self.hooks = replicas, hooks
        replicas.batch_share(recipe.batch_size)  # refuses a batch the replicas cannot split
        self.step = Step(self.model, recipe, execution, replicas)
        self.feed = feed_for(data, Placement(device, execution.images, seed, recipe.augment,
                                             replicas.rank, replicas.world, recipe.lighting,
                                             recipe.mean == "pixel", recipe.test_views,
                                             replicas.sums, execution.decode == "gpu"))
        if not self.feed.fixed_shapes and (execution.compile or execution.cuda_graphs):
            self.feed.example_batches(recipe.batch_size, recipe.eval_batch_size)  # says why not
        self.schedule = Schedule(recipe, hooks.log)
        self.watch = DivergenceWatch(data.num_classes, recipe.divergence_check_every)
        self.evaluation = Evaluation(self.feed, recipe.eval_batch_size, execution, replicas,
                                     data.eval_split)
        self.eval_split = data.eval_split
        self.history: list[EpochRecord] = []
        self.train_images, self.train_seconds = 0, 0.0
        self.compile_seconds = 0.0
        self.elapsed_before = 0.0  # wall seconds of the epochs a resumed run starts after
        # When the run first started (the Unix clock: a resumed run is another process, maybe on
        # another node): a resumed run's wall time counts from it, so it includes the epochs
        # redone after the checkpoint and the restart. None until the run starts.
        self.first_started: float | None = None

    def parts(self) -> dict[str, Any]:
        """The parts whose `state_dict()`s make the checkpoint, by name."""
        return {"step": self.step, "feed": self.feed, "schedule": self.schedule,
                "divergence": self.watch, "evaluation": self.evaluation}

    def state_dict(self, elapsed: float) -> dict[str, Any]:
        """Everything the run needs to go on after the epoch it has finished."""
        return {
            **{name: part.state_dict() for name, part in self.parts().items()},
            # The history under its own key: data_parallel.py counts a checkpoint's epochs by it.
            "history": [dataclasses.asdict(record) for record in self.history],
            "throughput": {"train_images": self.train_images,
                           "train_seconds": self.train_seconds, "elapsed": elapsed,
                           "started_at": self.first_started},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (see `state_dict`): the run's next epoch is the one after it."""
        for name, part in self.parts().items():
            part.load_state_dict(state[name])
        self.history = [EpochRecord(**record) for record in state["history"]]
        throughput = state["throughput"]
        self.train_images, self.train_seconds = throughput["train_images"], throughput["train_seconds"]
        self.elapsed_before = throughput["elapsed"]
        self.first_started = throughput.get("started_at")  # absent from older checkpoints

    def run(self) -> TrainResult:
        if not self.execution.compile:
            return self._run()
        # A recompile past the limit fails the trial instead of silently running eager.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return self._run()

    def _run(self) -> TrainResult:
        now = time.time()
        if self.first_started is None:
            self.first_started = now - self.elapsed_before
        # Never less than the checkpointed epochs' own time, were the clocks of two nodes apart.
        started = time.perf_counter() - max(self.elapsed_before, now - self.first_started)
        if self.execution.compile:
            self.compile_seconds = self.step.compile(
                self.hooks.compile_backend,
                *self.feed.example_batches(self.recipe.batch_size, self.recipe.eval_batch_size))
        for epoch in range(len(self.history) + 1, self.recipe.epochs + 1):
            try:
                record = self._epoch(epoch)
            except Diverged as diverged:
                return self._result("diverged", str(diverged), started)
            self.history.append(record)
            self.schedule.end_epoch(record.train_loss)
            self._log(epoch_line(record, self.recipe.epochs, self.eval_split))
            if self.hooks.on_epoch:
                self.hooks.on_epoch(record)
            if self.hooks.on_checkpoint:
                self.hooks.on_checkpoint(self.state_dict(time.perf_counter() - started))
        never_learned = self.watch.never_learned(self.history)
        if never_learned is not None:
            return self._result("diverged", never_learned, started)
        return self._result("completed", None, started)

    def _epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch and evaluate; raises Diverged when the running loss blows up."""
        started = time.perf_counter()
        epoch_lr = lr = self.schedule.epoch_lr(epoch)
        self.step.start_epoch()
        self.watch.start_epoch()
        self.feed.skipped = seen = step = 0
        sums = self.replicas.sums
        for step, (images, labels, loss_scale) in enumerate(
                self.feed.train_batches(epoch, self.recipe.batch_size), start=1):
            lr = self.schedule.step_lr(epoch_lr)
            self.step.set_lr(lr)
            self.step(images, labels, loss_scale)
            seen += labels.shape[0]
            if self.schedule.warming_up:
                wrong, images_in_batch = sums([self.step.batch_wrong, labels.shape[0]])
                self.schedule.after_step(wrong / images_in_batch)
            if step % self.watch.check_every == 0:
                self.watch.read(*sums([self.step.loss_sum, seen]), epoch, step)
        # The last read also waits for the device: the epoch's time is real.
        self.watch.read(*sums([self.step.loss_sum, seen]), epoch, step)
        trained = time.perf_counter()
        loss_sum, wrong, seen, skipped = sums(
            [self.step.loss_sum, self.step.wrong, seen, self.feed.skipped])
        require_images(seen, f"epoch {epoch}'s training", skipped)
        self.train_images += int(seen)
        self.train_seconds += trained - started
        self.replicas.average_buffers(self.model)  # every replica evaluates the same model
        test_loss, test_error, top5 = self.evaluation(self.step.eval_model)
        # The paper's test-time views cost up to 10x an evaluation: scored after the last epoch.
        views = self.evaluation.views(self.step.eval_model) if epoch == self.recipe.epochs \
            else {}
        return EpochRecord(
            epoch=epoch, lr=lr, train_loss=loss_sum / seen, train_error=wrong / seen,
            test_loss=test_loss, test_error=test_error,
            seconds=time.perf_counter() - started, test_top5_error=top5,
            skipped_images=int(sums([self.feed.skipped])[0]), train_seconds=trained - started,
            **views,
        )

    def _log(self, line: str) -> None:
        if self.hooks.log:
            self.hooks.log(line)

    def _result(self, status: TrainStatus, reason: str | None, started: float) -> TrainResult:
        if reason is not None:
            self._log(f"diverged: {reason}")
        return result_of(
            status, reason, self.history,
            wall_seconds=time.perf_counter() - started,
            images_per_second=self.train_images / self.train_seconds if self.train_seconds else 0.0,
            compile_seconds=self.compile_seconds,
            execution=self.execution.record(),
            warmup_steps=self.schedule.warmup_steps,
            seed=self.seed,
            eval_split=self.eval_split,
            recipe=self.recipe,
            **self.evaluation.test_record,
        )

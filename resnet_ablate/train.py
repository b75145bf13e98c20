"""Training one model on one dataset with the recipe of He et al. (CVPR 2016), scaled by epochs.

The paper (section 4.2) trains CIFAR-10 ResNets with SGD, momentum 0.9, weight decay 1e-4,
batch 128, lr 0.1 divided by 10 at 32k and 48k of 64k iterations (50% and 75%), and for
ResNet-110 warms up at lr 0.01 until the training error is below 80% (about 400 iterations).
`TrainRecipe` (recipe.py, a plain description) holds all of it; `train` runs it and returns a
`TrainResult` record.

`train` is what a study runner calls inside a worker process: it is seeded and reproducible
(bitwise on CPU), uses exactly the threads it is given, reports every epoch through `on_epoch`,
and returns a result marked "diverged" instead of raising when the loss blows up: non-finite,
staying orders of magnitude above the loss of guessing, or settling back at it after a blow-up
(`_Run._check_diverged` and `_Run._check_learned_after_blowup` give the rule).

The loop follows GPU practice (see execution.py for the choices): data and augmentation live on
the device, a step never waits for the host (loss and error accumulate on the device and are read
every `divergence_check_every` steps and at epoch end; only warm-up, the paper's rule for ResNet-110,
reads each of its few hundred steps' error), channels_last, bf16 autocast by default on CUDA,
fused SGD, optional `torch.compile` (its compile time recorded apart from training) and
whole-step CUDA graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import DataBundle, Streamed, draw_crops, gather_crops
from .execution import Execution, GraphedStep, resolve_execution, side_stream
from .recipe import TrainRecipe
from .record import pack_outcomes
from .replicas import Replicas, synchronise_batch_norms

# The paper's rule ends warm-up when "the training error is below 80%"; a single batch is too
# noisy to judge that, so the error is averaged over this many recent batches (1,280 images).
WARMUP_WINDOW = 10
# A training loss this many times the loss of guessing (ln of the class count), at two reads in a
# row, is a blow-up, not learning: healthy runs start near 1x and go down.
DIVERGED_LOSS_FACTOR = 1000.0
# A blow-up that settles: a read above BLOWUP_LOSS_FACTOR x the loss of guessing, then a last
# epoch whose training loss and training error are still at or above SETTLED_AT_CHANCE x those of
# guessing (ln C and 1 - 1/C), is a run that never learned (lr 10: loss 21.6 falling to 4.0 at
# 90% test error), diverged rather than a result. A bad start that recovers has learned: its
# error is well below guessing even where its loss is still high (over-confident logits).
BLOWUP_LOSS_FACTOR = 5.0
SETTLED_AT_CHANCE = 0.95
# CUDA graph capture wants a few eager steps first (on a side stream), so the optimizer's state
# exists; they are the run's first real steps, not extra ones.
GRAPH_WARMUP_STEPS = 3


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch. Train loss/error run over the epoch (train mode, augmented batches);
    test loss/error are on the whole evaluation set in eval mode after the epoch. `lr` is the
    rate of the epoch's last step; `seconds` covers training and evaluation."""

    epoch: int
    lr: float
    train_loss: float
    train_error: float
    test_loss: float
    test_error: float
    seconds: float
    # Streamed data sets only: top-5 error (a 1000-class task's second measure) and the images
    # left out because they could not be decoded (training and evaluation together).
    test_top5_error: float | None = None
    skipped_images: int = 0


TrainStatus = Literal["completed", "diverged"]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced. Accuracies are None when no epoch was completed.

    `images_per_second` counts training alone (no evaluation, no compilation); `compile_seconds`
    is the time `torch.compile` took before training (0 without it); `execution` is how the run
    executed (`Execution.to_dict()`: device, precision, memory format, compile, CUDA graphs).
    """

    status: TrainStatus
    reason: str | None
    history: tuple[EpochRecord, ...]
    epochs_completed: int
    final_test_accuracy: float | None
    best_test_accuracy: float | None
    final_train_accuracy: float | None
    wall_seconds: float
    images_per_second: float
    compile_seconds: float
    execution: Mapping[str, Any]
    warmup_steps: int
    seed: int
    eval_split: str
    recipe: TrainRecipe
    # The final evaluation's test-set size and errors, and which images it got wrong (packed by
    # record.pack_outcomes, in the evaluation's order; in-memory data sets in one process only):
    # what honest intervals and per-image paired comparisons need (resnet_ablate/stats.py).
    test_images: int | None = None
    test_wrong: int | None = None
    test_outcomes: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain floats, lists and dicts)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["history"] = [dataclasses.asdict(record) for record in self.history]
        values["recipe"] = self.recipe.to_dict()
        values["execution"] = dict(self.execution)
        return values


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
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    device = torch.device(device)
    execution = resolve_execution(recipe, device)
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
            if not isinstance(model, nn.Module):
                model = model()
                if not isinstance(model, nn.Module):
                    raise TypeError(
                        f"the model factory returned {type(model).__name__}, not an nn.Module"
                    )
            replicas = replicas or Replicas()
            if replicas.parallel and recipe.sync_bn:
                synchronise_batch_norms(model)
            run = _Run(model, data, recipe, execution, seed, on_epoch, log, compile_backend,
                       replicas, on_checkpoint)
            if resume is not None:
                run.load_state(resume)
            return run.run()
    finally:
        torch.backends.cudnn.benchmark = previous_cudnn_benchmark
        torch.set_num_threads(previous_threads)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 1000,
    execution: Execution | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy loss, error rate) of `model` in eval mode; inputs on its device.

    Loss and error accumulate on the device and are read once at the end. With `execution`, the
    forward runs in its precision and memory format.
    """
    loss_sum, wrong, count = _evaluation_sums(model, images, labels, batch_size, execution)
    _require_images(count, "evaluation", 0)
    return loss_sum.item() / count, wrong.item() / count


@torch.no_grad()
def _evaluation_sums(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
    execution: Execution | None, per_image: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed loss, wrong answers, images) of an in-memory evaluation, sums on the device;
    each batch's per-image wrong answers appended to `per_image` where it is given."""
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    autocast = execution.autocast() if execution is not None else contextlib.nullcontext()
    with autocast:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            if execution is not None:
                batch = execution.images(batch)
            logits = model(batch)
            targets = labels[start : start + batch_size]
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
            missed = logits.argmax(dim=1) != targets
            wrong += missed.sum()
            if per_image is not None:
                per_image.append(missed)
    return loss_sum, wrong, images.shape[0]


def evaluate_streamed(
    model: nn.Module,
    data: Streamed,
    *,
    batch_size: int = 256,
    execution: Execution,
) -> tuple[float, float, float, int]:
    """(mean cross-entropy loss, top-1 error, top-5 error, images that could not be decoded) of
    `model` in eval mode over a streamed data set's evaluation split, single centre crops."""
    loss_sum, wrong, wrong5, count, skipped = _streamed_evaluation_sums(
        model, data, batch_size, execution)
    _require_images(count, f"the {data.eval_split} split's evaluation", skipped)
    return loss_sum.item() / count, wrong.item() / count, wrong5.item() / count, skipped


@torch.no_grad()
def _streamed_evaluation_sums(
    model: nn.Module, data: Streamed, batch_size: int, execution: Execution, part: int = 0,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(summed loss, top-1 and top-5 wrong answers, images, images not decoded) of the `part`-th
    of `parts` shares of a streamed evaluation, sums on the device."""
    model.eval()
    device = torch.device(execution.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    wrong5 = torch.zeros((), dtype=torch.int64, device=device)
    count = skipped = 0
    loader = data.test_loader(batch_size, pin_memory=device.type == "cuda", part=part, parts=parts)
    with execution.autocast():
        for images, labels, left_out in loader:
            skipped += left_out
            if labels.shape[0] == 0:
                continue
            images = execution.images(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            wrong += (logits.argmax(dim=1) != labels).sum()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            wrong5 += (top != labels[:, None]).all(dim=1).sum()
            count += labels.shape[0]
    return loss_sum, wrong, wrong5, count, skipped


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed per random stream, so one stream's draws never shift another's."""
    entropy = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


class NoImages(ValueError):
    """Training or evaluation saw no image at all (an empty split, or every image skipped as
    undecodable): a score would be a number from nothing, so the trial fails. Deterministic: the
    same data fails the same way."""


def _require_images(count: float, what: str, skipped: float) -> None:
    """NoImages, naming `what` and the images skipped, where `count` images is none."""
    if count < 1:
        raise NoImages(f"{what} had no image to score: {int(skipped)} image(s) skipped as "
                       "undecodable or unlabelled, none read; check the data set's files")


class _Diverged(Exception):
    """The training loss blew up (see `_Run._check_diverged`); the message says where."""


class _Run:
    """One training run's state; a class only to keep `train`'s loop readable."""

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle | Streamed,
        recipe: TrainRecipe,
        execution: Execution,
        seed: int,
        on_epoch: Callable[[EpochRecord], None] | None,
        log: Callable[[str], None] | None,
        compile_backend: str,
        replicas: Replicas,
        on_checkpoint: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        device = torch.device(execution.device)
        self.device = device
        self.execution = execution
        self.model = model.to(device, memory_format=execution.torch_memory_format)
        self.replicas = replicas
        if replicas.parallel and (execution.compile or execution.cuda_graphs):
            raise ValueError("compile and cuda_graphs run one-process trials; this one has "
                             f"{replicas.world} replicas")
        # What trains: DistributedDataParallel with several replicas, compiled with `compile`.
        self.step_model: nn.Module = replicas.wrap(self.model, device)
        self.batch_share = replicas.batch_share(recipe.batch_size)
        self.on_checkpoint = on_checkpoint
        self.elapsed_before = 0.0  # wall seconds of the epochs a resumed run starts after
        self.data = data
        self.recipe = recipe
        self.seed = seed
        self.on_epoch = on_epoch
        self.log = log
        self.compile_backend = compile_backend
        self.streamed = not isinstance(data, DataBundle)
        if self.streamed and (execution.compile or execution.cuda_graphs):
            raise ValueError("compile and cuda_graphs need an in-memory data set (their batches "
                             f"are precompiled or captured); {data.name} is streamed from disk")
        if not self.streamed:
            # Moved once: a whole dataset is small next to a model's activations, and per-batch
            # host-to-device copies would dominate short trials.
            self.train_x = execution.images(data.train_x.to(device))
            self.train_y = data.train_y.to(device)
            share = replicas.positions(data.test_x.shape[0])
            self.test_x = execution.images(data.test_x[share].to(device))
            self.test_y = data.test_y[share].to(device)
        self.augmentation = data.augmentation if recipe.augment and not self.streamed else None
        self.order_generator = torch.Generator().manual_seed(_derived_seed(seed, _ORDER_STREAM))
        self.augment_generator = torch.Generator().manual_seed(_derived_seed(seed, _AUGMENT_STREAM))
        # A CUDA graph replays the lr it was captured with from device memory: keep it a tensor.
        lr: float | torch.Tensor = recipe.lr
        if execution.cuda_graphs:
            lr = torch.tensor(recipe.lr, dtype=torch.float32, device=device)
        self.current_lr = recipe.lr
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=recipe.nesterov,
            fused=device.type in ("cuda", "cpu"),  # one kernel for all parameters
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=execution.scales_gradients)
        # Running sums of the epoch, on the device so that a step never waits for the host.
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.wrong = torch.zeros((), dtype=torch.int64, device=device)
        self.batch_wrong = torch.zeros((), dtype=torch.int64, device=device)
        self.graphed: GraphedStep | None = None
        self.steps_taken = 0
        self.read_loss_sum, self.read_images = 0.0, 0
        self.above_limit_at_last_read = False
        self.peak_read = (0.0, 0)  # the highest training loss a read saw, and its epoch
        self.warming_up = recipe.warmup
        self.warmup_steps = 0
        self.recent_errors: deque[float] = deque(maxlen=WARMUP_WINDOW)
        self.history: list[EpochRecord] = []
        # The plateau schedule's state (see _follow_plateau).
        self.best_train_loss, self.bad_epochs, self.plateau_decays = math.inf, 0, 0
        self.train_images = 0
        self.train_seconds = 0.0
        self.compile_seconds = 0.0
        # The last evaluation's test-set record (TrainResult.test_images, test_wrong,
        # test_outcomes).
        self.test_record: dict[str, Any] = {}

    def run(self) -> TrainResult:
        if not self.execution.compile:
            return self._run()
        # A recompile past the limit fails the trial instead of silently running eager.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return self._run()

    def _run(self) -> TrainResult:
        started = time.perf_counter() - self.elapsed_before
        if self.execution.compile:
            self.compile_seconds = self._compile()
        for epoch in range(len(self.history) + 1, self.recipe.epochs + 1):
            try:
                record = self._epoch(epoch)
            except _Diverged as diverged:
                if self.log:
                    self.log(f"diverged: {diverged}")
                return self._result("diverged", str(diverged), started)
            self.history.append(record)
            self._follow_plateau(record.train_loss)
            if self.log:
                self.log(
                    f"epoch {record.epoch}/{self.recipe.epochs} lr {record.lr:g}"
                    f" train loss {record.train_loss:.4f} error {record.train_error:.4f}"
                    f" {self.data.eval_split} error {record.test_error:.4f}"
                    f" ({record.seconds:.1f}s)"
                )
            if self.on_epoch:
                self.on_epoch(record)
            if self.on_checkpoint:
                self.on_checkpoint(self.state(time.perf_counter() - started))
        never_learned = self._check_learned_after_blowup()
        if never_learned is not None:
            if self.log:
                self.log(f"diverged: {never_learned}")
            return self._result("diverged", never_learned, started)
        return self._result("completed", None, started)

    def state(self, elapsed: float) -> dict[str, Any]:
        """Everything the run needs to go on after the epoch it has finished (`load_state`)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "order_generator": self.order_generator.get_state(),
            "augment_generator": self.augment_generator.get_state(),
            "history": [dataclasses.asdict(record) for record in self.history],
            "warming_up": self.warming_up, "warmup_steps": self.warmup_steps,
            "recent_errors": list(self.recent_errors),
            "plateau": (self.best_train_loss, self.bad_epochs, self.plateau_decays),
            "above_limit_at_last_read": self.above_limit_at_last_read,
            "peak_read": list(self.peak_read),
            "steps_taken": self.steps_taken, "current_lr": self.current_lr,
            "train_images": self.train_images, "train_seconds": self.train_seconds,
            "test_record": self.test_record, "elapsed": elapsed,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (see `state`): the run's next epoch is the one after it."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.order_generator.set_state(state["order_generator"])
        self.augment_generator.set_state(state["augment_generator"])
        self.history = [EpochRecord(**record) for record in state["history"]]
        self.warming_up, self.warmup_steps = state["warming_up"], state["warmup_steps"]
        self.recent_errors.extend(state["recent_errors"])
        self.best_train_loss, self.bad_epochs, self.plateau_decays = state["plateau"]
        self.above_limit_at_last_read = state["above_limit_at_last_read"]
        peak_loss, peak_epoch = state.get("peak_read", (0.0, 0))
        self.peak_read = (float(peak_loss), int(peak_epoch))
        self.steps_taken = state["steps_taken"]
        self.test_record = dict(state.get("test_record") or {})
        self._set_lr(state["current_lr"])
        self.train_images, self.train_seconds = state["train_images"], state["train_seconds"]
        self.elapsed_before = state["elapsed"]

    def _compile(self) -> float:
        """Compile the model for every batch shape and mode the run will use, before training, so
        that training time excludes compilation; returns the seconds it took.

        The trial forwards and backwards change no parameter (no optimizer step), and the
        BatchNorm buffers they update are put back.
        """
        started = time.perf_counter()
        # Compiled code is cached per Python function across models: a worker's earlier trials
        # would use up the recompile limit and send this one back to eager without a word.
        torch._dynamo.reset()
        # Static shapes: each batch size of the run gets its own graph, none a slower dynamic one.
        self.step_model = torch.compile(self.model, backend=self.compile_backend, dynamic=False)
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        self.model.train()
        for size in _batch_sizes(self.train_x.shape[0], self.recipe.batch_size):
            with self.execution.autocast():
                loss = F.cross_entropy(self.step_model(self.train_x[:size]), self.train_y[:size])
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
            self.model.eval()
            with self.execution.autocast():
                for size in _batch_sizes(self.test_x.shape[0], self.recipe.eval_batch_size):
                    self.step_model(self.test_x[:size])
        self.loss_sum.item()  # waits for the device
        return time.perf_counter() - started

    def _epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch and evaluate; raises _Diverged when the running loss blows up."""
        started = time.perf_counter()
        scheduled_lr = self._scheduled_lr(epoch)
        self.model.train()
        self.loss_sum.zero_()
        self.wrong.zero_()
        self.read_loss_sum, self.read_images = 0.0, 0  # what the last divergence read saw
        self.seen, self.skipped = 0, 0
        lr = scheduled_lr
        check_every = self.recipe.divergence_check_every
        batches = self._streamed_batches(epoch) if self.streamed else self._memory_batches()
        step = 0
        for step, (images, labels, loss_scale) in enumerate(batches, start=1):
            lr = min(self.recipe.warmup_lr, scheduled_lr) if self.warming_up else scheduled_lr
            self._set_lr(lr)
            self._step(images, labels, loss_scale)
            self.seen += labels.shape[0]
            if self.warming_up:
                wrong, images_in_batch = self.replicas.sums([self.batch_wrong, labels.shape[0]])
                self._advance_warmup(wrong / images_in_batch)
            if step % check_every == 0:
                self._check_diverged(epoch, step)
        self._check_diverged(epoch, step)  # also waits for the device: the epoch's time is real
        trained = time.perf_counter()
        loss_sum, wrong, seen, skipped = self.replicas.sums(
            [self.loss_sum, self.wrong, self.seen, self.skipped])
        _require_images(seen, f"epoch {epoch}'s training", skipped)
        self.train_images += int(seen)
        self.train_seconds += trained - started
        test_loss, test_error, top5 = self._evaluate()
        return EpochRecord(
            epoch=epoch,
            lr=lr,
            train_loss=loss_sum / seen,
            train_error=wrong / seen,
            test_loss=test_loss,
            test_error=test_error,
            seconds=time.perf_counter() - started,
            test_top5_error=top5,
            skipped_images=int(self.replicas.sums([self.skipped])[0]),
        )

    @property
    def eval_model(self) -> nn.Module:
        """What evaluates: the trained model (compiled with `compile`), never the replicas'
        DistributedDataParallel wrapper, whose collectives every replica would have to join
        while each evaluates its own share of the images."""
        return self.model if self.replicas.parallel else self.step_model

    def _evaluate(self) -> tuple[float, float, float | None]:
        """(loss, top-1 error, top-5 error or None) on the evaluation set, each replica taking
        its share of the images after the replicas' running statistics are made the same."""
        self.replicas.average_buffers(self.model)
        if self.streamed:
            sums = _streamed_evaluation_sums(self.eval_model, self.data,
                                             self.recipe.eval_batch_size, self.execution,
                                             self.replicas.rank, self.replicas.world)
            loss_sum, wrong, wrong5, count, skipped = self.replicas.sums(sums)
            self.skipped += sums[4]
            _require_images(count, f"the {self.data.eval_split} split's evaluation", skipped)
            self.test_record = {"test_images": int(count), "test_wrong": int(wrong)}
            return loss_sum / count, wrong / count, wrong5 / count
        # Per image only where one process sees every image in one order: the replicas' shares
        # would have to be gathered back into the data set's order.
        per_image: list[torch.Tensor] | None = None if self.replicas.parallel else []
        loss_sum, wrong, count = self.replicas.sums(_evaluation_sums(
            self.eval_model, self.test_x, self.test_y, self.recipe.eval_batch_size,
            self.execution, per_image))
        _require_images(count, f"the {self.data.eval_split} split's evaluation", 0)
        self.test_record = {"test_images": int(count), "test_wrong": int(wrong)}
        if per_image:
            self.test_record["test_outcomes"] = pack_outcomes(torch.cat(per_image).cpu().numpy())
        return loss_sum / count, wrong / count, None

    def _scheduled_lr(self, epoch: int) -> float:
        if self.recipe.schedule == "plateau":
            return self.recipe.lr * self.recipe.gamma**self.plateau_decays
        return self.recipe.lr_at(epoch)

    def _follow_plateau(self, train_loss: float) -> None:
        """The plateau schedule after an epoch, with the rule of PyTorch's ReduceLROnPlateau
        (mode min, relative threshold): an epoch whose training loss is not below the best by
        the threshold is a bad one; after more than `plateau_patience` bad epochs in a row the
        rate is multiplied by gamma and the count starts over."""
        if self.recipe.schedule != "plateau":
            return
        if train_loss < self.best_train_loss * (1 - self.recipe.plateau_threshold):
            self.best_train_loss, self.bad_epochs = train_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.recipe.plateau_patience:
            self.plateau_decays += 1
            self.bad_epochs = 0

    def _memory_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """The epoch's batches of an in-memory data set, each with the factor its mean loss is
        scaled by before backward: a seeded order, crops drawn for the whole epoch at once and
        cut on the device. A replica takes every `world`-th image of each global batch (the
        same order and crops on every replica), and its loss is weighted by its share of the
        batch, so that averaging the replicas' gradients gives the global batch's."""
        count = self.train_x.shape[0]
        batch_size, rank, world = self.recipe.batch_size, self.replicas.rank, self.replicas.world
        order = torch.randperm(count, generator=self.order_generator).to(self.device)
        crops = None
        if self.augmentation is not None:
            crops = draw_crops(count, self.augmentation, self.augment_generator).to(self.device)
        # A last batch too small to give every replica an image is left out.
        if 0 < count % batch_size < world:
            count -= count % batch_size
        for start in range(0, count, batch_size):
            in_batch = min(batch_size, count - start)
            share = slice(start + rank, start + in_batch, world)
            index = order[share]
            images, labels = self.train_x[index], self.train_y[index]
            if crops is not None:
                c = crops[share]
                images = gather_crops(images, self.augmentation.pad, c.top, c.left, c.flip)
            yield self.execution.images(images), labels, world * index.shape[0] / in_batch

    def _streamed_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """The epoch's batches of a streamed data set (this replica's share of each), decoded by
        the loader's workers; the copies to the device overlap the step before them (pinned
        memory, non-blocking). Full batches split evenly, so the losses are not reweighted."""
        loader = self.data.train_loader(self.batch_share, epoch, self.order_generator,
                                        augment=self.recipe.augment,
                                        pin_memory=self.device.type == "cuda",
                                        part=self.replicas.rank, parts=self.replicas.world,
                                        augment_seed=_derived_seed(self.seed, _AUGMENT_STREAM))
        for images, labels, skipped in loader:
            self.skipped += skipped
            if labels.shape[0] == 0:
                if self.replicas.parallel:  # the others would wait for this step forever
                    raise ValueError(
                        f"replica {self.replicas.rank}: none of the {skipped} images of a batch "
                        "could be decoded, and the replicas of a data-parallel run step together")
                continue
            images = images.to(self.device, non_blocking=True)
            yield self.execution.images(images), labels.to(self.device, non_blocking=True), 1.0

    def _step(self, images: torch.Tensor, labels: torch.Tensor, loss_scale: float) -> None:
        """One optimizer step, replayed from a CUDA graph when the run uses them and can (a
        one-process run: its losses are never reweighted)."""
        self.steps_taken += 1
        if not self.execution.cuda_graphs:
            self.optimizer.zero_grad(set_to_none=True)
            self._forward_backward_update(images, labels, loss_scale)
            return
        if self.graphed is not None and self.graphed.shape() == (images.shape, labels.shape):
            self.graphed(images, labels)
            return
        # Eager: the first steps (capture's warm-up) and any other batch shape (the last one).
        with side_stream(self.device):
            self.optimizer.zero_grad(set_to_none=True)
            self._forward_backward_update(images, labels)
        if self.graphed is None and self.steps_taken >= GRAPH_WARMUP_STEPS \
                and images.shape[0] == self.recipe.batch_size:
            self.graphed = GraphedStep(
                self._forward_backward_update, self.optimizer, images, labels
            )

    def _forward_backward_update(self, images: torch.Tensor, labels: torch.Tensor,
                                 loss_scale: float = 1.0) -> None:
        """Forward, backward, optimizer step and the running sums: no host sync anywhere."""
        with self.execution.autocast():
            logits = self.step_model(images)
            loss = F.cross_entropy(logits, labels)
        weighted = loss if loss_scale == 1.0 else loss * loss_scale
        self.scaler.scale(weighted).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.batch_wrong.copy_((logits.detach().argmax(dim=1) != labels).sum())
        self.wrong.add_(self.batch_wrong)
        self.loss_sum.add_(loss.detach().float() * labels.shape[0])

    def _set_lr(self, lr: float) -> None:
        if lr == self.current_lr:
            return
        self.current_lr = lr
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _check_diverged(self, epoch: int, step: int) -> None:
        """Stop a run whose training loss blew up: non-finite at any read, or a mean over the
        steps since the last read above DIVERGED_LOSS_FACTOR times the loss of guessing (ln of
        the class count) at two reads in a row. A learning run starts near that loss and goes
        down, and a bad start recovers within a read or two; one that stays orders of magnitude
        above it (lr 100 gives 1e20) is recorded as diverged, not as a result. Each read's loss
        also feeds the run's peak, which `_check_learned_after_blowup` judges at the end."""
        loss_sum, seen = self.replicas.sums([self.loss_sum, self.seen])
        images = seen - self.read_images
        interval_loss = (loss_sum - self.read_loss_sum) / max(images, 1)
        self.read_loss_sum, self.read_images = loss_sum, seen
        if images > 0 and interval_loss > self.peak_read[0]:
            self.peak_read = (float(interval_loss), epoch)
        chance = self.chance_loss
        if not math.isfinite(loss_sum):
            problem = "non-finite training loss"
        elif interval_loss > DIVERGED_LOSS_FACTOR * chance and self.above_limit_at_last_read:
            problem = (f"training loss {interval_loss:.3g}, over {DIVERGED_LOSS_FACTOR:g}x "
                       f"the {chance:.3g} of guessing at two reads in a row,")
        else:
            self.above_limit_at_last_read = interval_loss > DIVERGED_LOSS_FACTOR * chance
            return
        raise _Diverged(
            f"{problem} at epoch {epoch}, seen at step {step} "
            f"(read every {self.recipe.divergence_check_every} steps)"
        )

    @property
    def chance_loss(self) -> float:
        """The training loss of guessing: ln of the class count."""
        return math.log(max(self.data.num_classes, 2))

    def _check_learned_after_blowup(self) -> str | None:
        """Why a finished run is diverged although no read stopped it, or None: its loss went
        above BLOWUP_LOSS_FACTOR x the loss of guessing at some read, and its last epoch's
        training loss and training error are both still at or above SETTLED_AT_CHANCE x those
        of guessing (ln C, 1 - 1/C for C classes), so it never learned. A healthy run starts
        near the loss of guessing and ends well below it; a bad start that recovers ends with an
        error well below guessing."""
        if not self.history:
            return None
        chance = self.chance_loss
        chance_error = 1 - 1 / max(self.data.num_classes, 2)
        peak, peak_epoch = self.peak_read
        final = self.history[-1]
        if (peak <= BLOWUP_LOSS_FACTOR * chance
                or final.train_loss < SETTLED_AT_CHANCE * chance
                or final.train_error < SETTLED_AT_CHANCE * chance_error):
            return None
        return (f"training loss rose to {peak:.3g} at epoch {peak_epoch}, over "
                f"{BLOWUP_LOSS_FACTOR:g}x the {chance:.3g} of guessing, and ended at "
                f"{final.train_loss:.3g} (training error {final.train_error:.3g}) at epoch "
                f"{final.epoch}, not below {SETTLED_AT_CHANCE:g}x guessing: it never learned")

    def _advance_warmup(self, batch_error: float) -> None:
        self.warmup_steps += 1
        self.recent_errors.append(batch_error)
        threshold = self.recipe.warmup_until_error
        learned = (
            threshold is not None
            and len(self.recent_errors) == WARMUP_WINDOW
            and sum(self.recent_errors) / WARMUP_WINDOW < threshold
        )
        cap = self.recipe.warmup_max_steps
        capped = cap is not None and self.warmup_steps >= cap
        if learned or capped:
            self.warming_up = False
            if self.log:
                self.log(
                    f"warm-up at lr {self.recipe.warmup_lr:g} ended after {self.warmup_steps} steps"
                )

    def _result(self, status: TrainStatus, reason: str | None, started: float) -> TrainResult:
        last = self.history[-1] if self.history else None
        return TrainResult(
            status=status,
            reason=reason,
            history=tuple(self.history),
            epochs_completed=len(self.history),
            final_test_accuracy=None if last is None else 1.0 - last.test_error,
            best_test_accuracy=None
            if last is None
            else 1.0 - min(r.test_error for r in self.history),
            final_train_accuracy=None if last is None else 1.0 - last.train_error,
            wall_seconds=time.perf_counter() - started,
            images_per_second=self.train_images / self.train_seconds if self.train_seconds else 0.0,
            compile_seconds=self.compile_seconds,
            execution=self.execution.to_dict(),
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            eval_split=self.data.eval_split,
            recipe=self.recipe,
            **self.test_record,
        )


def _batch_sizes(count: int, batch_size: int) -> list[int]:
    """The distinct batch sizes of one pass over `count` items: full batches and the remainder."""
    return sorted({min(batch_size, count), count % batch_size} - {0})

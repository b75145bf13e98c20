"""The training step: optimizer, gradient scaler, optional `torch.compile` and CUDA graphs, and
the epoch's running loss and error summed on the device, so that a step never waits for the host.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..execution import Execution, GraphedStep, side_stream
from ..recipe import TrainRecipe
from ..replicas import Replicas
from .seed_sgd import SeedSGD

# CUDA graph capture wants a few eager steps first (on a side stream), so the optimizer's state
# exists; they are the run's first real steps, not extra ones.
GRAPH_WARMUP_STEPS = 3


class Step:
    """One optimizer step at a time on `model`, replayed from a CUDA graph where the run uses
    them and can (a one-process run: its losses are never reweighted).

    With `seeds`, `model` is that many seeds stacked into one (seed_stack.py): its labels are
    (N, seeds), it trains on the sum of the seeds' losses (each seed as it trains alone), and the
    running sums (`loss_sum`, `wrong`, `batch_wrong`) hold one value per seed. With
    `rate_per_seed` too, each seed has a learning rate of its own (SeedSGD): `set_lr` then takes
    one rate per seed."""

    def __init__(self, model: nn.Module, recipe: TrainRecipe, execution: Execution,
                 replicas: Replicas, seeds: int | None = None,
                 rate_per_seed: bool = False) -> None:
        device = torch.device(execution.device)
        if replicas.parallel and (execution.compile or execution.cuda_graphs):
            raise ValueError("compile and cuda_graphs run one-process trials; this one has "
                             f"{replicas.world} replicas")
        self.model = model
        self.device = device
        self.execution = execution
        self.batch_size = recipe.batch_size
        self.replicas = replicas
        # What trains: DistributedDataParallel with several replicas, compiled with `compile`.
        self.step_model: nn.Module = replicas.wrap(model, device)
        self.current_lr: float | list[float] = recipe.lr
        self.optimizer: torch.optim.Optimizer
        if rate_per_seed:
            if seeds is None:
                raise ValueError("rate_per_seed needs stacked seeds (seeds=K)")
            self.current_lr = [recipe.lr] * seeds
            # Its rates are tensors on the device already, refilled in place: graphs replay them.
            self.optimizer = SeedSGD(model.parameters(), seeds=seeds, lr=recipe.lr,
                                     momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                     nesterov=recipe.nesterov)
        else:
            # A CUDA graph replays the lr it was captured with from device memory: a tensor.
            lr: float | torch.Tensor = recipe.lr
            if execution.cuda_graphs:
                lr = torch.tensor(recipe.lr, dtype=torch.float32, device=device)
            self.optimizer = torch.optim.SGD(
                model.parameters(),
                lr=lr,
                momentum=recipe.momentum,
                weight_decay=recipe.weight_decay,
                nesterov=recipe.nesterov,
                fused=device.type in ("cuda", "cpu"),  # one kernel for all parameters
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=execution.scales_gradients)
        # Running sums of the epoch, on the device so that a step never waits for the host.
        self.seeds = seeds
        shape = () if seeds is None else (seeds,)
        self.loss_sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.wrong = torch.zeros(shape, dtype=torch.int64, device=device)
        self.batch_wrong = torch.zeros(shape, dtype=torch.int64, device=device)
        self.graphed: GraphedStep | None = None
        self.steps_taken = 0

    @property
    def eval_model(self) -> nn.Module:
        """What evaluates: the trained model (compiled with `compile`), never the replicas'
        DistributedDataParallel wrapper, whose collectives every replica would have to join
        while each evaluates its own share of the images."""
        return self.model if self.replicas.parallel else self.step_model

    def start_epoch(self) -> None:
        self.model.train()
        self.loss_sum.zero_()
        self.wrong.zero_()

    def set_lr(self, lr: float | list[float]) -> None:
        """The rate of the next steps: one, or with `rate_per_seed` a list of one per seed."""
        if lr == self.current_lr:
            return
        self.current_lr = list(lr) if isinstance(lr, list) else lr
        if isinstance(self.optimizer, SeedSGD):
            self.optimizer.set_lrs(lr)  # type: ignore[arg-type]
            return
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, loss_scale: float) -> None:
        """One optimizer step on a batch, its loss scaled by `loss_scale` before backward."""
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
                and images.shape[0] == self.batch_size:
            self.graphed = GraphedStep(
                self._forward_backward_update, self.optimizer, images, labels
            )

    def _forward_backward_update(self, images: torch.Tensor, labels: torch.Tensor,
                                 loss_scale: float = 1.0) -> None:
        """Forward, backward, optimizer step and the running sums: no host sync anywhere."""
        with self.execution.autocast():
            logits = self.step_model(images)
            if self.seeds is None:
                # A data-parallel replica whose share of a batch decoded nothing steps with
                # the others on no image (StreamFeed.train_batches): a sum, 0, whose gradients
                # are all 0, where a mean would be NaN.
                loss = per_seed = F.cross_entropy(
                    logits, labels, reduction="mean" if labels.shape[0] else "sum")
            else:  # each seed's mean loss, summed: each seed trains as it would alone
                per_seed = F.cross_entropy(logits, labels, reduction="none").mean(dim=0)
                loss = per_seed.sum()
        weighted = loss if loss_scale == 1.0 else loss * loss_scale
        self.scaler.scale(weighted).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.batch_wrong.copy_((logits.detach().argmax(dim=1) != labels).sum(dim=0))
        self.wrong.add_(self.batch_wrong)
        self.loss_sum.add_(per_seed.detach().float() * labels.shape[0])

    def compile(self, backend: str, train_batches: list[tuple[torch.Tensor, torch.Tensor]],
                eval_batches: list[torch.Tensor]) -> float:
        """Compile the model for every batch shape and mode the run will use (one example batch
        of each), before training, so that training time excludes compilation; returns the
        seconds it took.

        The trial forwards and backwards change no parameter (no optimizer step), and the
        BatchNorm buffers they update are put back.
        """
        started = time.perf_counter()
        # Compiled code is cached per Python function across models: a worker's earlier trials
        # would use up the recompile limit and send this one back to eager without a word.
        torch._dynamo.reset()
        # Static shapes: each batch size of the run gets its own graph, none a slower dynamic one.
        self.step_model = torch.compile(self.model, backend=backend, dynamic=False)
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        self.model.train()
        for images, labels in train_batches:
            with self.execution.autocast():
                loss = F.cross_entropy(self.step_model(images), labels)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
            self.model.eval()
            with self.execution.autocast():
                for images in eval_batches:
                    self.step_model(images)
        self.loss_sum.item()  # waits for the device
        return time.perf_counter() - started

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "steps_taken": self.steps_taken,
                "current_lr": self.current_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps_taken = state["steps_taken"]
        self.set_lr(state["current_lr"])

"""The learning rate of every step: the recipe's schedule per epoch (steps, cosine or plateau) and
the paper's warm-up for the deepest nets, which holds a low rate until training error falls."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ..recipe import TrainRecipe

# The paper's rule ends warm-up when "the training error is below 80%"; a single batch is too
# noisy to judge that, so the error is averaged over this many recent batches (1,280 images).
WARMUP_WINDOW = 10


class Schedule:
    """The rate for each step of a run, with the state the plateau rule and warm-up carry."""

    def __init__(self, recipe: TrainRecipe, log: Callable[[str], None] | None = None) -> None:
        self.recipe = recipe
        self.log = log
        self.warming_up = recipe.warmup
        self.warmup_steps = 0
        self.recent_errors: deque[float] = deque(maxlen=WARMUP_WINDOW)
        # The plateau rule's state (see `end_epoch`).
        self.best_train_loss, self.bad_epochs, self.plateau_decays = math.inf, 0, 0

    def epoch_lr(self, epoch: int) -> float:
        """The schedule's rate for `epoch`, warm-up aside."""
        if self.recipe.schedule == "plateau":
            return self.recipe.lr * self.recipe.gamma**self.plateau_decays
        return self.recipe.lr_at(epoch)

    def step_lr(self, epoch_lr: float) -> float:
        """The rate of the next step of an epoch whose scheduled rate is `epoch_lr`."""
        return min(self.recipe.warmup_lr, epoch_lr) if self.warming_up else epoch_lr

    def after_step(self, batch_error: float) -> None:
        """Warm-up's count after a step with `batch_error` (only read while warming up): it ends
        when the mean error of the last WARMUP_WINDOW batches is below the recipe's threshold,
        or at its step cap."""
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

    def end_epoch(self, train_loss: float) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        return {"warming_up": self.warming_up, "warmup_steps": self.warmup_steps,
                "recent_errors": list(self.recent_errors),
                "plateau": (self.best_train_loss, self.bad_epochs, self.plateau_decays)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warming_up, self.warmup_steps = state["warming_up"], state["warmup_steps"]
        self.recent_errors.clear()
        self.recent_errors.extend(state["recent_errors"])
        self.best_train_loss, self.bad_epochs, self.plateau_decays = state["plateau"]

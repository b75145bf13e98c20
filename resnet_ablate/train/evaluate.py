"""Evaluation: a model's loss and errors over a data set's evaluation batches, summed on the
device and read once; `Evaluation` is the run's part that scores it after every epoch."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..execution import Execution
from ..record import VIEW_METRIC_NAMES, pack_outcomes
from ..replicas import Replicas
from ..data.feed import Feed
from .result import require_images


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
    prepare = execution.images if execution is not None else (lambda batch: batch)
    batches = ((prepare(images[start : start + batch_size]), labels[start : start + batch_size])
               for start in range(0, images.shape[0], batch_size))
    loss_sum, wrong, _, count = evaluation_sums(model, batches, images.device, execution)
    require_images(count, "evaluation", 0)
    return loss_sum.item() / count, wrong.item() / count


@torch.no_grad()
def evaluation_sums(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    execution: Execution | None, top5: bool = False, per_image: list[torch.Tensor] | None = None,
    seeds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(summed loss, wrong answers, top-5 wrong answers (with `top5`), images) of `model` in eval
    mode over `batches`, sums on the device; each batch's per-image wrong answers appended to
    `per_image` where it is given. With `seeds`, `model` is that many seeds stacked into one
    (seed_stack.py), each scored on the same batches: each sum holds a value per seed, and
    the per-image wrong answers are (images, seeds)."""
    model.eval()
    shape = () if seeds is None else (seeds,)
    loss_sum = torch.zeros(shape, dtype=torch.float64, device=device)
    wrong = torch.zeros(shape, dtype=torch.int64, device=device)
    wrong5 = torch.zeros(shape, dtype=torch.int64, device=device)
    count = 0
    autocast = execution.autocast() if execution is not None else contextlib.nullcontext()
    with autocast:
        for images, labels in batches:
            targets = labels
            if seeds is not None:  # every seed's channels take the batch; logits (N, C, K)
                images = _for_each_seed(images, seeds, execution)
                targets = labels[:, None].expand(-1, seeds)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, targets, reduction="none").sum(0)
            missed = logits.argmax(dim=1) != targets
            wrong += missed.sum(0)
            if top5:
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                wrong5 += (top != targets.unsqueeze(1)).all(dim=1).sum(0)
            if per_image is not None:
                per_image.append(missed)
            count += labels.shape[0]
    return loss_sum, wrong, wrong5, count


def _for_each_seed(images: torch.Tensor, seeds: int, execution: Execution | None) -> torch.Tensor:
    """A batch given to each of `seeds` stacked seeds: its channels repeated, in the run's
    memory format."""
    repeated = images.repeat(1, seeds, 1, 1)
    return repeated if execution is None else repeated.contiguous(
        memory_format=execution.torch_memory_format)


@torch.no_grad()
def view_sums(
    model: nn.Module, batches: Iterable[tuple[list[torch.Tensor], torch.Tensor]],
    device: torch.device, execution: Execution | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(wrong answers, top-5 wrong answers, images) of `model` in eval mode over batches of
    views (Feed.view_batches): an image's answer is the mean of its views' softmax scores, as
    the paper averages its 10 crops and its scales."""
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    wrong5 = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    autocast = execution.autocast() if execution is not None else contextlib.nullcontext()
    with autocast:
        for views, labels in batches:
            images = labels.shape[0]
            scores = torch.zeros((), device=device)
            for view in views:  # (images * V, C, h, w): V views of each image
                logits = model(view).float()
                scores = scores + F.softmax(logits, dim=1).view(images, -1, logits.shape[1]).sum(1)
            wrong += (scores.argmax(dim=1) != labels).sum()
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            wrong5 += (top != labels[:, None]).all(dim=1).sum()
            count += images
    return wrong, wrong5, count


class Evaluation:
    """The run's evaluation after each epoch, each replica taking its share of the images; keeps
    the last one's test-set record (TrainResult.test_images, test_wrong, test_outcomes)."""

    def __init__(self, feed: Feed, batch_size: int, execution: Execution, replicas: Replicas,
                 eval_split: str) -> None:
        self.feed = feed
        self.batch_size = batch_size
        self.execution = execution
        self.replicas = replicas
        self.eval_split = eval_split
        self.test_record: dict[str, Any] = {}

    def __call__(self, model: nn.Module) -> tuple[float, float, float | None]:
        """(loss, top-1 error, top-5 error or None) of `model` on the evaluation set."""
        feed = self.feed
        per_image: list[torch.Tensor] | None = [] if feed.ordered_evaluation else None
        skipped_before = feed.skipped
        sums = evaluation_sums(model, feed.eval_batches(self.batch_size),
                               torch.device(self.execution.device), self.execution,
                               feed.measures_top5, per_image)
        loss_sum, wrong, wrong5, count, skipped = self.replicas.sums(
            [*sums, feed.skipped - skipped_before])
        require_images(count, f"the {self.eval_split} split's evaluation", skipped)
        feed.check_evaluation_read(int(count + skipped))
        outcomes = torch.cat(per_image).cpu().numpy() if per_image else None
        return self._scores(loss_sum, wrong, wrong5, count, outcomes)

    def _scores(self, loss_sum: float, wrong: float, wrong5: float, count: float,
                outcomes: Any) -> tuple[float, float, float | None]:
        """(loss, top-1 error, top-5 error or None) from the sums, the test record kept."""
        self.test_record = {"test_images": int(count), "test_wrong": int(wrong)}
        if outcomes is not None:
            self.test_record["test_outcomes"] = pack_outcomes(outcomes)
        return loss_sum / count, wrong / count, wrong5 / count if self.feed.measures_top5 else None

    def views(self, model: nn.Module) -> dict[str, float]:
        """The errors of each of the feed's test-time views (EpochRecord's test_error_10crop,
        test_top5_error_10crop, ...), each replica taking its share of the images."""
        found = {}
        for view in self.feed.test_views:
            skipped_before = self.feed.skipped
            sums = view_sums(model, self.feed.view_batches(view, self.batch_size),
                             torch.device(self.execution.device), self.execution)
            wrong, wrong5, count, skipped = self.replicas.sums(
                [*sums, self.feed.skipped - skipped_before])
            require_images(count, f"the {self.eval_split} split's {view} evaluation", skipped)
            # The images a view skips are those the centre-crop pass skipped and counted.
            self.feed.skipped = skipped_before
            error, top5_error = VIEW_METRIC_NAMES[view]
            found[error] = wrong / count
            found[top5_error] = wrong5 / count if self.feed.measures_top5 else None
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"test_record": dict(self.test_record)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.test_record = dict(state["test_record"])


def evaluate_stacked(model: nn.Module, evaluations: Sequence[Evaluation],
                     skip: Collection[int] = ()) -> list[tuple[float, float, float | None] | None]:
    """Each seed's (loss, top-1 error, top-5 error or None) of `model`, its seeds stacked
    (seed_stack.py), `evaluations[k]` being seed k's and keeping its test record as its own call
    would: in one pass of the stacked model over the first's evaluation batches, which every
    seed's feed gives alike (an in-memory data set's test images, in order). The seeds in `skip`
    (diverged ones) get None, and their evaluations keep the record they had. One process (no
    replicas), as train_seeds trains."""
    first = evaluations[0]
    feed = first.feed
    per_image: list[torch.Tensor] | None = [] if feed.ordered_evaluation else None
    sums = evaluation_sums(model, feed.eval_batches(first.batch_size),
                           torch.device(first.execution.device), first.execution,
                           feed.measures_top5, per_image, seeds=len(evaluations))
    loss_sum, wrong, wrong5 = (s.tolist() for s in sums[:3])
    count = sums[3]
    require_images(count, f"the {first.eval_split} split's evaluation", 0)
    outcomes = torch.cat(per_image).cpu().numpy() if per_image else None
    return [None if k in skip else
            evaluation._scores(loss_sum[k], wrong[k], wrong5[k], count,
                               None if outcomes is None else outcomes[:, k])
            for k, evaluation in enumerate(evaluations)]

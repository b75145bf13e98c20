"""The replicas of one data-parallel training run: how they split the data, agree on numbers and
decisions, and share BatchNorm statistics (torch.distributed only; which engine started the
processes is the caller's business).

A data-parallel run trains the same global batches as one process would: every replica draws the
epoch's order from the same seeded generator and takes every `world`-th position of it, so a
global batch of B images is B / world images per replica and the union of their k-th batches is
the single process's k-th batch. Each replica's loss is scaled so that DistributedDataParallel's
gradient average is the gradient of the global batch's mean loss, also when the epoch's last
batch does not split evenly.

BatchNorm statistics are per replica, as in the paper's multi-GPU ImageNet training, unless the
run asks for synchronised ones (`sync_bn`): then every BatchNorm normalises with the statistics of
the global batch, all-reduced with autograd, and the run computes what one process would. The
running statistics are averaged over the replicas before each evaluation and checkpoint, so that
every replica evaluates and saves the same model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .blocks import with_state_of
from .fusion import unfuse


@dataclass(frozen=True)
class Replicas:
    """This process's place among the replicas of a run: `rank` of `world` (0 of 1 alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of_process_group(cls) -> Replicas:
        """The replicas of the initialised default process group (one replica without one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """The replica that speaks for the run: reports epochs, keeps checkpoints and weights."""
        return self.rank == 0

    def batch_share(self, batch_size: int) -> int:
        """Each replica's part of a global batch (specs check that it divides evenly)."""
        if batch_size % self.world:
            raise ValueError(f"a global batch of {batch_size} does not split evenly over "
                             f"{self.world} replicas; use a multiple of {self.world}")
        return batch_size // self.world

    def positions(self, count: int) -> slice:
        """This replica's positions in a sequence of `count` items it shares with the others."""
        return slice(self.rank, count, self.world)

    def sums(self, values: Sequence[torch.Tensor | float]) -> list[float]:
        """Each value summed over the replicas, read on the host (one collective for all)."""
        if not self.parallel:
            return [float(v) for v in values]
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
        device = _collective_device(device)
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                               for v in values])
        dist.all_reduce(stacked)
        return stacked.tolist()

    def agree(self, decision: bool) -> bool:
        """The leader's decision, for every replica (a stop must be taken by all of them at once:
        one that trains on would wait for the others' gradients forever)."""
        if not self.parallel:
            return decision
        flag = torch.tensor([int(decision)], device=_collective_device(None))
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm's running statistics) over the replicas,
        so that every replica evaluates and saves the same model."""
        if not self.parallel:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.world)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module a replica trains through: DistributedDataParallel when there are several."""
        if not self.parallel:
            return model
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _collective_device(device: torch.device | None) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return device if device is not None and device.type == "cuda" else \
            torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _SummedOverReplicas(torch.autograd.Function):
    """A tensor summed over the replicas; its gradient is the replicas' gradients summed, as the
    sum feeds every replica's loss."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across the replicas.

    Each replica's count, mean and sum of squared deviations per channel are gathered with
    autograd (summed over replicas, each in its own slot) and merged as Chan et al. merge
    partial variances, so each replica's gradient flows through the shared statistics (what
    `nn.SyncBatchNorm` does on GPUs, in plain operations that also run on gloo and CPUs). A
    replica with no image adds nothing. The merge keeps the two-pass variance's accuracy, where
    a sum of squares less the squared mean loses it to cancellation once the mean is large
    beside the spread (a last stage's few values a channel). Alone, it is `nn.BatchNorm2d`.
    State and state_dict keys are BatchNorm2d's, so its weights load into any twin.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        x = input.float()
        if dist.get_backend() != "nccl" and x.device.type != "cpu":
            raise ValueError("SyncedBatchNorm2d: gloo reduces CPU tensors; use nccl on GPUs")
        mean, var, n = self._global_statistics(x)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        out = x * scale[None, :, None, None] + shift[None, :, None, None]
        return out.to(input.dtype)

    @staticmethod
    def _global_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, biased variance, count) of each channel over every replica's batch."""
        channels, rank, world = x.shape[1], dist.get_rank(), dist.get_world_size()
        count = x.numel() // channels
        local_mean = x.sum((0, 2, 3)) / max(count, 1)
        squares = ((x - local_mean[None, :, None, None]) ** 2).sum((0, 2, 3))
        slots = x.new_zeros(world, 2 * channels + 1)
        slots = slots.index_put((torch.tensor([rank], device=x.device),), torch.cat(
            [local_mean, squares, x.new_full((1,), float(count))])[None])
        gathered = _SummedOverReplicas.apply(slots)
        means, squares, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (squares + counts * (means - mean) ** 2).sum(0) / n
        return mean, var, n

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        # nn.BatchNorm2d's rule: momentum (or a cumulative average when it is None), with the
        # unbiased variance of the global batch.
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def synchronise_batch_norms(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm2d synchronised across the replicas (in place, the same
    parameter and buffer tensors): fused epilogues are unfused first, as their kernels compute
    per-replica statistics. Returns the model."""
    unfuse(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, with_state_of(SyncedBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine,
                    child.track_running_stats, device="meta"), child))
    return model


@contextlib.contextmanager
def process_group(rank: int, world: int, init_method: str, backend: str = "gloo") -> Iterator[Replicas]:
    """Within: this process is replica `rank` of `world` in a default process group (for runs
    started without an engine that makes one, such as tests)."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        yield Replicas.of_process_group()
    finally:
        dist.destroy_process_group()

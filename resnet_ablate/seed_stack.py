"""Several seeds of one architecture trained as one model: `stack_models`.

A CIFAR ResNet leaves a large GPU mostly idle: its convolutions are small and a step is hundreds
of kernels of microseconds each, so one trial's step is bound by launch latency even when
replayed from a CUDA graph (on an H200, ResNet-20 trained 3.4% of the bf16 peak). The seeds of one
configuration share every shape, so they can share every launch: stacked along the channels,
seed k's channels at [k*C, (k+1)*C) of every activation, each convolution becomes a grouped
convolution with K times the groups, each BatchNorm normalises K*C channels (its statistics are
per channel, hence per seed: exactly each seed's own), and the classifier a batched matrix
product. The seeds never mix: each output channel depends on its own seed's inputs and weights
alone, so the gradient of the summed losses with respect to seed k's weights is seed k's
gradient, and SGD (momentum and weight decay are per element) steps each seed as it would alone.

The stacked model takes its K inputs concatenated along the channels, (N, K*C_in, H, W), one
batch per seed (each seed keeps its own data order and augmentation), and returns logits shaped
(N, classes, K): `F.cross_entropy(logits, labels)` with labels (N, K) is then the mean over the
seeds of each seed's mean loss, so the sum that trains each seed as alone is K times it.

Stacked: nn.Conv2d, nn.BatchNorm2d (FusedBatchNorm2d included: its residual and ReLU are per
channel), nn.Linear and the option-A shortcut (`ZeroPadShortcut`, whose zero channels go after
each seed's own). Modules without parameters or buffers (ReLU, pooling, containers, blocks'
forward code) are kept as they are and must treat channels alike, as all of the toolkit's do;
anything else with parameters is refused by name. `seed_state_dict` gives seed k's own
state_dict back, loadable into the architecture it came from.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ZeroPadShortcut


class SeedLinear(nn.Module):
    """K `nn.Linear` layers of one shape applied at once: (N, K*in) -> (N, out, K)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.seeds = len(linears)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        self.weight = nn.Parameter(torch.stack([l.weight.detach() for l in linears]))
        has_bias = linears[0].bias is not None
        self.bias = (nn.Parameter(torch.stack([l.bias.detach() for l in linears]))
                     if has_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (K, N, in) @ (K, in, out): one batched product for all seeds.
        per_seed = x.unflatten(1, (self.seeds, self.in_features)).transpose(0, 1)
        out = torch.bmm(per_seed, self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias[:, None, :]
        return out.permute(1, 2, 0)  # (N, out, K): classes on dim 1, as cross_entropy wants

    def extra_repr(self) -> str:
        return f"{self.seeds} x ({self.in_features} -> {self.out_features})"


class SeedZeroPadShortcut(nn.Module):
    """Option A for K stacked seeds: each seed's channels subsampled and padded with zeros of
    its own, so seed k's channels stay at [k*C_out, (k+1)*C_out)."""

    def __init__(self, shortcut: ZeroPadShortcut, seeds: int) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.seeds = seeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, extra = self.shortcut.stride, self.shortcut.out_channels - self.shortcut.in_channels
        if stride != 1:
            x = x[:, :, ::stride, ::stride]
        per_seed = x.unflatten(1, (self.seeds, self.shortcut.in_channels))
        return F.pad(per_seed, (0, 0, 0, 0, 0, extra)).flatten(1, 2)


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One module computing all of `models` (one architecture, K seeds) in each of its launches;
    see the module's docstring for its inputs, outputs and what it stacks. The models are left
    as they are: the stacked one holds copies of their weights and buffers."""
    if len(models) < 1:
        raise ValueError("stack_models needs at least one model")
    structures = [_structure(m) for m in models]
    for index, structure in enumerate(structures[1:], start=1):
        if structure != structures[0]:
            raise ValueError(f"stack_models stacks seeds of one architecture; model {index} "
                             "differs from model 0 in its modules or their shapes")
    stacked = copy.deepcopy(models[0])  # its own attributes and forward code; leaves replaced
    for name, module in list(stacked.named_modules()):
        replacement = _stacked_leaf([m.get_submodule(name) for m in models])
        if replacement is None:
            continue
        if not name:
            stacked = replacement
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(stacked.get_submodule(parent), attribute, replacement)
    stacked.stacked_seeds = len(models)
    return stacked


def _structure(model: nn.Module) -> list[tuple[str, str, tuple]]:
    return [(name, type(module).__name__, tuple(
        (n, tuple(t.shape)) for n, t in _own_tensors(module)))
        for name, module in model.named_modules()]


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*module.named_parameters(recurse=False),
                                *module.named_buffers(recurse=False)] if t is not None]


def _stacked_leaf(modules: Sequence[nn.Module]) -> nn.Module | None:
    """The stacked module standing for `modules` (one per seed), or None where the first is kept
    as it is (no parameters or buffers of its own: its children are stacked in turn)."""
    first = modules[0]
    if isinstance(first, nn.Conv2d):
        return _stacked_conv(modules)  # type: ignore[arg-type]
    if isinstance(first, nn.modules.batchnorm._BatchNorm):
        return _stacked_batch_norm(modules)  # type: ignore[arg-type]
    if isinstance(first, nn.Linear):
        return SeedLinear(modules)  # type: ignore[arg-type]
    if isinstance(first, ZeroPadShortcut):
        return SeedZeroPadShortcut(copy.deepcopy(first), len(modules))
    own = [n for n, _ in _own_tensors(first)]
    if own:
        raise ValueError(f"stack_models cannot stack a {type(first).__name__} (it holds "
                         f"{', '.join(own)}): it stacks Conv2d, BatchNorm2d (fused too), Linear "
                         "and ZeroPadShortcut, and keeps modules without parameters or buffers")
    return None


def _stacked_conv(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    first, seeds = convs[0], len(convs)
    stacked = nn.Conv2d(first.in_channels * seeds, first.out_channels * seeds, first.kernel_size,
                        first.stride, first.padding, first.dilation, first.groups * seeds,
                        first.bias is not None, first.padding_mode,
                        device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([c.weight for c in convs]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([c.bias for c in convs]))
    return stacked


def _stacked_batch_norm(norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> nn.Module:
    stacked = copy.deepcopy(norms[0])
    stacked.num_features = norms[0].num_features * len(norms)
    for name, tensor in [*norms[0].named_parameters(recurse=False),
                         *norms[0].named_buffers(recurse=False)]:
        if tensor is None or tensor.dim() == 0:  # num_batches_tracked: every seed's is the same
            continue
        joined = torch.cat([getattr(n, name).detach() for n in norms])
        if isinstance(tensor, nn.Parameter):
            setattr(stacked, name, nn.Parameter(joined, requires_grad=tensor.requires_grad))
        else:
            setattr(stacked, name, joined.clone())
    return stacked


def seed_state_dict(stacked: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seed `seed`'s own state_dict, out of a model made by `stack_models`: its keys and shapes
    are those of the models that were stacked."""
    seeds = getattr(stacked, "stacked_seeds", None)
    if seeds is None:
        raise ValueError("not a model made by stack_models (it has no stacked_seeds)")
    if not 0 <= seed < seeds:
        raise ValueError(f"seed must be in 0..{seeds - 1} for {seeds} stacked seeds, got {seed}")
    state: dict[str, torch.Tensor] = {}
    for prefix, module in stacked.named_modules():
        for name, tensor in _own_tensors(module):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(module, SeedLinear):
                state[key] = tensor[seed]
            elif tensor.dim() == 0:  # num_batches_tracked: every seed's is the same
                state[key] = tensor
            else:
                state[key] = tensor.chunk(seeds)[seed]
    return state

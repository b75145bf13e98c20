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

Stacked: nn.Conv2d, nn.BatchNorm2d (FusedBatchNorm2d and SyncBatchNorm included: their
residual and ReLU are per channel), nn.Linear and the option-A shortcut (`ZeroPadShortcut`, whose
zero channels go after each seed's own). Kept as they are: the element-wise and pooling layers of
CHANNELWISE, and containers (modules with children: blocks, stages, the network), whose forward
code must treat channels alike, as all of the toolkit's does (a torch.cat along the channels
would mix the seeds: `check_stacked`, on an example batch, catches that). Anything else is refused by name: a subclass with a forward of its own, or
a layer that mixes channels (GroupNorm, LocalResponseNorm, softmax over channels). So are seeds
that differ in any setting or state the stacked model could hold only once (strides, eps,
frozen parameters, dtype, device, BatchNorm's step count) and tied parameters or shared modules.
What stays shared: randomness drawn per sample (stochastic depth's masks) and fp16's gradient
scaler (one seed's overflow skips every seed's step: stack in bf16 or fp32). `seed_state_dict`
gives seed k's own state_dict back, loadable into the architecture it came from.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ZeroPadShortcut
from .kernels import FusedBatchNorm2d

# Layers without parameters that keep each seed's channels apart, kept as they are when stacked.
CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Flatten,
)
BATCH_NORMS = (nn.BatchNorm2d, FusedBatchNorm2d, nn.SyncBatchNorm)


class SeedLinear(nn.Module):
    """K `nn.Linear` layers of one shape applied at once: (N, K*in) -> (N, out, K)."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.seeds = len(linears)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        self.weight = _joined(linears, "weight", torch.stack)
        self.bias = _joined(linears, "bias", torch.stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K*in) features, or (N, in, K) from a SeedLinear before it: (N, out, K)."""
        if x.dim() == 3:
            per_seed = x.permute(2, 0, 1)
        else:  # (K, N, in) @ (K, in, out): one batched product for all seeds
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
        # The layout the one-seed shortcut keeps (its 4-D pad does): padded in 5-D, the seeds'
        # channels would come back NCHW, and the fused residual add would copy them.
        layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                  and not x.is_contiguous() else torch.contiguous_format)
        if stride != 1:
            x = x[:, :, ::stride, ::stride]
        per_seed = x.unflatten(1, (self.seeds, self.shortcut.in_channels))
        padded = F.pad(per_seed, (0, 0, 0, 0, 0, extra)).flatten(1, 2)
        return padded.contiguous(memory_format=layout)


def stack_models(models: Iterable[nn.Module], example: torch.Tensor | None = None) -> nn.Module:
    """One module computing all of `models` (one architecture, K seeds) in each of its launches;
    see the module's docstring for its inputs, outputs, what it stacks and what it refuses. The
    models are left as they are: the stacked one holds copies of their weights and buffers.

    With `example` (a batch of one seed's inputs, (N, C, ...)), the stacked model is checked on
    it against each model (`check_stacked`): the safety net for forward code that stacking
    cannot see, such as a container's torch.cat along the channels."""
    if isinstance(models, nn.Module):
        raise TypeError("stack_models takes a list of models, one per seed, not one module")
    models = list(models)
    if not models:
        raise ValueError("stack_models needs at least one model")
    _check_unshared(models[0])
    reference = _structure(models[0])
    for index, model in enumerate(models[1:], start=1):
        structure = _structure(model)
        differs = next((_difference(mine, first) for mine, first in zip(structure, reference)
                        if mine != first), None)
        if differs is None and len(structure) != len(reference):
            differs = f"its number of modules ({len(structure)} against {len(reference)})"
        if differs:
            raise ValueError(f"stack_models stacks seeds of one architecture with one setting; "
                             f"model {index} differs from model 0 in {differs}")
    stacked = copy.deepcopy(models[0])  # its own attributes and forward code; leaves replaced
    for name, module in list(stacked.named_modules()):
        replacement = _stacked_leaf(name, [m.get_submodule(name) for m in models])
        if replacement is None:
            continue
        if not name:
            stacked = replacement
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(stacked.get_submodule(parent), attribute, replacement)
    stacked.stacked_seeds = len(models)
    if example is not None:
        check_stacked(stacked, models, example)
    return stacked


@torch.no_grad()
def check_stacked(stacked: nn.Module, models: Sequence[nn.Module], example: torch.Tensor) -> None:
    """Raise a ValueError where `stacked` (from stack_models) does not compute each of `models`
    on `example` (one seed's batch, given to every seed), to float rounding: what a forward that
    mixes the seeds' channels gives (a torch.cat or slice along them in a container, a layer
    that pools over channels). In eval mode, so that no running statistic moves; each module's
    mode is put back. A seed whose outputs are NaN must be NaN alone too."""
    modules = [stacked, *models]
    modes = [[m.training for m in module.modules()] for module in modules]
    try:
        for module in modules:
            module.eval()
        logits = stacked(example.repeat(1, len(models), *[1] * (example.dim() - 2)))
        for seed, model in enumerate(models):
            alone = model(example)
            # A classifier's logits carry the seeds last (SeedLinear); a convolutional output
            # carries them along the channels.
            mine = (logits[..., seed] if logits.dim() == alone.dim() + 1
                    else logits.chunk(len(models), dim=1)[seed])
            scale = alone.abs().nan_to_num(0, 0, 0).max().item() or 1.0
            close = torch.isclose(mine, alone, rtol=1e-3, atol=1e-3 * scale, equal_nan=True)
            if mine.shape != alone.shape or not bool(close.all()):
                worst = (mine - alone).abs().nan_to_num(float("inf")).max().item()
                raise ValueError(
                    f"stack_models: the stacked model does not compute seed {seed}'s model on "
                    f"the example batch (outputs {tuple(mine.shape)} against "
                    f"{tuple(alone.shape)}, largest difference {worst:.3g}): its forward mixes "
                    "the seeds' channels somewhere stacking cannot see (a torch.cat, a slice "
                    "or a reduction along the channels in a container's forward); train each "
                    "seed alone")
    finally:
        for module, flags in zip(modules, modes):
            for m, flag in zip(module.modules(), flags):
                m.training = flag


def _check_unshared(model: nn.Module) -> None:
    """Refuse tied parameters and modules used under two names: stacking copies each place."""
    for kind, named in (("module", model.named_modules(remove_duplicate=False)),
                        ("parameter", model.named_parameters(remove_duplicate=False))):
        seen: dict[int, str] = {}
        for name, item in named:
            if id(item) in seen:
                raise ValueError(f"stack_models cannot stack a shared {kind}: {seen[id(item)]} "
                                 f"is also {name}")
            seen[id(item)] = name


def _structure(model: nn.Module) -> list[tuple]:
    """Per module: its name, type, settings (extra_repr: strides, eps, momentum, ...), and for
    each of its own tensors the shape, dtype, device and whether it trains; plus the values of
    its scalar buffers (BatchNorm's step count)."""
    return [(name, type(module).__name__, module.extra_repr(), tuple(
        (n, tuple(t.shape), t.dtype, t.device, t.requires_grad,
         t.item() if t.dim() == 0 else None) for n, t in _own_tensors(module)))
        for name, module in model.named_modules()]


def _difference(mine: tuple, first: tuple) -> str:
    """What differs between two modules' `_structure` entries, in words."""
    name = mine[0] or "the model"
    if mine[:2] != first[:2]:
        return f"{name} (a {mine[1]} where model 0 has {first[0] or 'the model'}, a {first[1]})"
    if mine[2] != first[2]:
        return f"{name}'s settings ({mine[2]} against {first[2]})"
    for tensor, other in zip(mine[3], first[3]):
        if tensor != other:
            fields = ("shape", "dtype", "device", "requires_grad", "value")
            changed = ", ".join(f"{field} {a} against {b}" for field, a, b
                                in zip(fields, tensor[1:], other[1:]) if a != b)
            return f"{name}.{tensor[0]} ({changed})"
    return f"{name}'s tensors ({[t[0] for t in mine[3]]} against {[t[0] for t in first[3]]})"


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in [*module.named_parameters(recurse=False),
                                *module.named_buffers(recurse=False)] if t is not None]


def _stacked_leaf(name: str, modules: Sequence[nn.Module]) -> nn.Module | None:
    """The stacked module standing for `modules` (one per seed, at `name`), or None where the
    first is kept as it is (a channel-wise layer, or a container whose children are stacked)."""
    first, kind = modules[0], type(modules[0])
    if kind is nn.Conv2d:
        return _stacked_conv(modules)  # type: ignore[arg-type]
    if kind in BATCH_NORMS:
        return _stacked_batch_norm(modules)  # type: ignore[arg-type]
    if kind is nn.Linear:
        return SeedLinear(modules)  # type: ignore[arg-type]
    if kind is ZeroPadShortcut:
        return SeedZeroPadShortcut(copy.deepcopy(first), len(modules))
    if kind in CHANNELWISE or (next(first.children(), None) is not None
                               and not _own_tensors(first)):
        return None
    raise ValueError(
        f"stack_models cannot stack {name or 'the model'}, a {kind.__name__}: it stacks "
        "Conv2d, BatchNorm2d (fused and sync too), Linear and ZeroPadShortcut (not subclasses "
        "with a forward of their own), keeps the channel-wise layers of seed_stack.CHANNELWISE "
        "and containers without tensors of their own, and refuses layers that could mix the "
        "seeds' channels")


def _joined(modules: Sequence[nn.Module], name: str, join=torch.cat) -> nn.Parameter | None:
    """The seeds' parameter `name` joined (concatenated, or stacked with torch.stack), trainable
    as theirs are; None where they have none."""
    first = getattr(modules[0], name)
    if first is None:
        return None
    joined = join([getattr(m, name).detach() for m in modules])
    return nn.Parameter(joined, requires_grad=first.requires_grad)


def _stacked_conv(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    first, seeds = convs[0], len(convs)
    # On the meta device: no initialisation drawn (from the caller's random stream) and thrown
    # away, since the seeds' own weights replace it.
    stacked = nn.Conv2d(first.in_channels * seeds, first.out_channels * seeds, first.kernel_size,
                        first.stride, first.padding, first.dilation, first.groups * seeds,
                        first.bias is not None, first.padding_mode, device="meta",
                        dtype=first.weight.dtype)
    stacked.weight = _joined(convs, "weight")
    stacked.bias = _joined(convs, "bias")
    return stacked


def _stacked_batch_norm(norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> nn.Module:
    stacked = copy.deepcopy(norms[0])
    stacked.num_features = norms[0].num_features * len(norms)
    for name, tensor in _own_tensors(norms[0]):
        if tensor.dim() == 0:  # num_batches_tracked: every seed's is the same (checked)
            continue
        if isinstance(tensor, nn.Parameter):
            setattr(stacked, name, _joined(norms, name))
        else:
            setattr(stacked, name, torch.cat([getattr(n, name) for n in norms]).clone())
    return stacked


def seed_state_dict(stacked: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seed `seed`'s own state_dict, out of a model made by `stack_models`: its keys and shapes
    are those of the models that were stacked, its tensors copies of the seed's own (saved
    alone, and writing to them leaves the stacked model as it is)."""
    seeds = getattr(stacked, "stacked_seeds", None)
    if seeds is None:
        raise ValueError("not a model made by stack_models (it has no stacked_seeds)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < seeds:
        raise ValueError(f"seed must be an int in 0..{seeds - 1} for {seeds} stacked seeds, "
                         f"got {seed!r}")
    # Each tensor's key, and whether the classifier stacked it on a new first dimension.
    in_classifier = {f"{prefix}.{name}" if prefix else name: isinstance(module, SeedLinear)
                     for prefix, module in stacked.named_modules()
                     for name, _ in _own_tensors(module)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in stacked.state_dict().items():
        if in_classifier.get(key):
            state[key] = tensor[seed].clone()
        elif key in in_classifier and tensor.dim() > 0:
            state[key] = tensor.chunk(seeds)[seed].clone()
        else:  # a scalar buffer every seed shares, or a key the model adds (ResNet's V1_KEY)
            state[key] = tensor.clone()
    return state

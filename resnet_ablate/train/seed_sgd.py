"""SGD with a learning rate per seed, for a model made by stack_models: `SeedSGD`.

Seeds stacked into one model share its parameters, so PyTorch's SGD would give them one learning
rate. The paper's warm-up (ResNet-110 trains at 0.01 until its training error falls below 80%)
and the plateau schedule decide a seed's rate from that seed's own error or loss, so the seeds'
rates part ways. Every parameter of a stacked model holds its seeds' values in K equal blocks
along its first dimension (seed_stack.py), so a rate per seed is a tensor of the parameter's
shape whose block k holds seed k's rate; the step is PyTorch's SGD (weight decay added to the
gradient, momentum buffer started as the gradient's copy, Nesterov's look-ahead) with
`param -= rate * update` in place of `param -= lr * update`. Per element, then, each seed steps
exactly as SGD steps it alone (to the rounding of one product), whatever the other seeds' rates.

The rates live on the parameters' device and are refilled in place only when a rate changes, so
a step captured in a CUDA graph replays whatever rates were set last.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


class SeedSGD(torch.optim.Optimizer):
    """SGD (momentum, weight decay, Nesterov, as torch.optim.SGD with dampening 0) over the
    parameters of `seeds` stacked seeds, seed k's rate `lrs[k]` (`set_lrs`)."""

    def __init__(self, params: Iterable[torch.Tensor], *, seeds: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds must be a positive int, got {seeds!r}")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not 0 <= value < math.inf:  # torch.optim.SGD's bounds (NaN fails too)
                raise ValueError(f"SeedSGD's {name} must be a finite number >= 0, got {value!r}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above 0")
        defaults = dict(lr=[float(lr)] * seeds, momentum=momentum, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults)
        self.seeds = seeds
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0 or p.shape[0] % seeds:
                    raise ValueError(
                        f"SeedSGD steps parameters whose first dimension holds {seeds} seeds' "
                        f"blocks (a model made by stack_models); one has shape {tuple(p.shape)}")
        # Each parameter's rates, built at its first step from its group's lrs.
        self._rates: dict[torch.Tensor, torch.Tensor] = {}

    @property
    def lrs(self) -> list[float]:
        """The seeds' rates (every group has the same)."""
        return list(self.param_groups[0]["lr"])

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Seed k steps at `lrs[k]` from the next step on."""
        lrs = [float(lr) for lr in lrs]
        if len(lrs) != self.seeds:
            raise ValueError(f"set_lrs takes one rate per seed ({self.seeds}), got {len(lrs)}")
        if not all(0 <= lr < math.inf for lr in lrs):
            raise ValueError(f"set_lrs takes finite rates >= 0, got {lrs}")
        if lrs == self.lrs:
            return
        for group in self.param_groups:
            group["lr"] = lrs
        for rates in self._rates.values():
            _fill(rates, lrs, self.seeds)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for rates in self._rates.values():  # the loaded groups' rates
            _fill(rates, self.lrs, self.seeds)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            started = [i for i, b in enumerate(buffers) if b is not None]
            if started:  # buf = momentum * buf + grad
                ongoing = [buffers[i] for i in started]
                torch._foreach_mul_(ongoing, momentum)
                torch._foreach_add_(ongoing, [grads[i] for i in started])
            for i, buffer in enumerate(buffers):
                if buffer is None:  # SGD's first step: the buffer is the gradient
                    buffers[i] = self.state[params[i]]["momentum_buffer"] = grads[i].clone()
            if group["nesterov"]:
                grads = torch._foreach_add(grads, buffers, alpha=momentum)
            else:
                grads = buffers
        rates = [self._rates_of(p, group["lr"]) for p in params]
        torch._foreach_addcmul_(params, grads, rates, value=-1.0)

    def _rates_of(self, parameter: torch.Tensor, lrs: list[float]) -> torch.Tensor:
        rates = self._rates.get(parameter)
        if rates is None:
            rates = self._rates[parameter] = torch.empty_like(parameter)
            _fill(rates, lrs, self.seeds)
        return rates


def _fill(rates: torch.Tensor, lrs: list[float], seeds: int) -> None:
    """Block k of `rates` (along its first dimension) set to `lrs[k]`, in place, whatever its
    strides (a channels_last convolution's weight keeps them)."""
    per_seed = torch.tensor(lrs, dtype=rates.dtype).to(rates.device)
    rates.unflatten(0, (seeds, -1)).copy_(per_seed.view(seeds, *[1] * rates.dim()))

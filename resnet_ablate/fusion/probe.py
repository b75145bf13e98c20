"""The checks every conversion is proved with: a seeded probe input, a context that evaluates
modules without changing their state, the tolerance two outputs must agree within, and, for a
rewritten forward, what its module's call received, returned and drew when the whole model ran
the probe batch (`inputs_on_probe`), which the rewrite must reproduce."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .forward_facts import RandomStreams, random_streams_kept
from .held_state import HeldState
from .records import FuseWarning

PROBE_SIDE = 32


def probe_input(like: torch.Tensor, channels: int, side: int, batch: int = 2) -> torch.Tensor:
    """A seeded random batch (batch, channels, side, side) on `like`'s device and dtype: the
    input a conversion is checked on."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(batch, channels, side, side, generator=generator, device=like.device,
                       dtype=like.dtype)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Within: every module in eval mode and no gradients; after, each module's mode restored and
    each buffer that a forward changed in place (a call counter, which eval mode does not stop)
    given its values back, and what the modules hold beside (a list a forward appends to, a
    tensor it counts in: held_state.py) as it was, so a check changes no state. Where a container
    of the user's refuses its items back (its own clear() raising, no builtin type beneath), it
    keeps what the check's forward added, and a FuseWarning says where."""
    modes = {m: m.training for module in modules for m in module.modules()}
    buffers = {id(b): (b, b._version, b.clone()) for module in modules for b in module.buffers()}
    held = [HeldState.of(module) for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, version, values in buffers.values():
                if buffer._version != version:
                    buffer.copy_(values)
        refused = [where for state in held for where in state.restore()]
        if refused:
            warnings.warn(f"a check of fuse ran the model's forward and could not give "
                          f"{refused[0]} its items back: it keeps what that forward added "
                          f"({len(refused)} container(s) in all)", FuseWarning, stacklevel=3)


def changed_in_place(given: torch.Tensor, left: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether a forward changed an argument in place (`given` before it, `left` after it) and
    another forward, given the same, left it otherwise (`other`): a caller reading it
    afterwards would see another tensor. Exact where the values are not floats, or none."""
    if torch.equal(given, left):
        return False  # unchanged (a NaN counts as changed, and is then compared below)
    if other.shape != left.shape or other.dtype != left.dtype:
        return True
    if not left.is_floating_point() or left.numel() == 0:
        return not torch.equal(left, other)
    return beyond_tolerance(left, other) is not None


def beyond_tolerance(expected: torch.Tensor, actual: torch.Tensor) -> float | None:
    """The largest difference of two outputs where it exceeds what their dtype's rounding
    explains (relative to the outputs' scale), else None."""
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    error = (expected.float() - actual.float()).abs().max().item()
    return error if error > tolerance * (expected.abs().max().item() + 1.0) else None


def tensors_in(value: Any) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def mismatch(expected: Any, actual: Any) -> str | None:
    """Why the rewritten forward's output (`actual`) is not the module's own (`expected`) on the
    probe call, if it is not: another structure (a list where a tensor was: tensors beyond the
    expected ones went unseen before), other shapes or dtypes, or values beyond rounding."""
    (expected_leaves, expected_spec), (actual_leaves, actual_spec) = (
        torch.utils._pytree.tree_flatten(expected), torch.utils._pytree.tree_flatten(actual))
    if expected_spec != actual_spec or any(type(e) is not type(a) for e, a in zip(
            expected_leaves, actual_leaves) if not isinstance(e, torch.Tensor)):
        return ("the rewritten forward returns another structure than the model's call on the "
                "probe input (its trace took another branch than the call: a test such as "
                "isinstance(x, tuple) on a traced value, which is a Proxy)")
    pairs = [(e, a) for e, a in zip(expected_leaves, actual_leaves) if isinstance(e, torch.Tensor)]
    if any(not isinstance(a, torch.Tensor) or e.shape != a.shape for e, a in pairs):
        return ("the rewritten forward returns outputs of other shapes on the probe input (its "
                "trace took another branch than the call: a test of a traced value's shape?)")
    # The fused op keeps the BN output's dtype (out += residual), where `bn(x) + r` promotes.
    promoted = [(e.dtype, a.dtype) for e, a in pairs if e.dtype != a.dtype]
    if promoted:
        return (f"the rewritten forward returns {promoted[0][1]} where the model returns "
                f"{promoted[0][0]} on the probe input (a residual add that promotes the dtype)")
    errors = [error for e, a in pairs if (error := beyond_tolerance(e, a)) is not None]
    return f"the rewritten forward differs on the probe input (max difference {max(errors):.3g})" if errors else None


def changed_inputs(given: Any, left: Any, actual: Any) -> str | None:
    """Why the rewritten forward leaves its arguments otherwise than the model's did, if it does
    (`given`: the arguments before either ran; `left`, `actual`: after the model's forward and
    after the rewritten one): a traced forward records `x += y` as `x + y`, so a block that adds
    into its input in place (which its caller may read afterwards) would change it no longer."""
    if any(changed_in_place(g, l, a) for g, l, a in zip(tensors_in(given), tensors_in(left),
                                                        tensors_in(actual))):
        return ("its forward changes a tensor it was given in place (as `x += y` does), which the "
                "traced rewrite would not: its caller may read that tensor afterwards")
    return None


def cloned(value: Any) -> Any:
    """`value` with each tensor in it cloned."""
    return torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def inputs_on_probe(model: nn.Module, owners: list[str], example: Any
                     ) -> tuple[dict[str, Any], str | None]:
    """What each owner receives when the model runs a probe batch (eval mode, no state change):
    its arguments as they were before its forward ran (a forward may change them in place), its
    output, and its arguments as its forward left them. An owner the model calls in training
    mode only (GoogLeNet's and Inception's auxiliary heads) is probed on a copy of the model in
    training mode. `example`: the model's input, or a tuple of its positional arguments."""
    given = example is not None
    if example is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            return {}, "no example_input was given and the model has no Conv2d to size a probe input by"
        example = probe_input(conv.weight, conv.in_channels, PROBE_SIDE)
    arguments = example if isinstance(example, tuple) else (example,)
    try:
        with evaluating(model):
            seen = _calls_recorded(model, owners, arguments)
    except Exception as error:  # noqa: BLE001 - reported as the reason nothing was rewritten
        shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__
                           for a in arguments)
        fix = "check example_input (the batch, or a tuple of the model's positional " \
            "arguments)" if given else "pass example_input"
        return {}, f"the model's forward failed on a probe input ({shapes}) " \
                   f"({type(error).__name__}: {error}); {fix}"
    unreached = [owner for owner in owners if owner not in seen]
    if unreached:
        seen.update(_reached_in_training(model, unreached, arguments))
    return seen, None


def _reached_in_training(model: nn.Module, owners: list[str], arguments: tuple[Any, ...]
                         ) -> dict[str, Any]:
    """What `owners` receive when a copy of the model runs the probe batch in training mode, and
    what each returns, given that in eval mode, as the check runs it; the model and the caller's
    random streams left as they were. None where the model cannot be copied or a forward fails
    (each is then named as never reached)."""
    try:
        copied = copy.deepcopy(model).train()
    except Exception:  # noqa: BLE001 - a lock, a client: any copy failure
        return {}
    devices = sorted({t.device.index or 0 for t in (*arguments, *model.parameters())
                      if isinstance(t, torch.Tensor) and t.is_cuda})
    seen: dict[str, Any] = {}
    try:
        with torch.random.fork_rng(devices=devices), random_streams_kept(copied), \
                torch.no_grad():
            reached = _calls_recorded(copied, owners, arguments)
        with evaluating(model):  # (once for all: it takes and gives back the model's state)
            for owner, (args, kwargs, streams, _, _) in reached.items():
                given = cloned((args, kwargs))
                with streams.replayed():
                    output = model.get_submodule(owner)(*given[0], **given[1])
                seen[owner] = (args, kwargs, streams, cloned(output), cloned(given))
    except Exception:  # noqa: BLE001 - the eval-mode probe passed: these stay unreached
        return {}
    return seen


def _calls_recorded(model: nn.Module, owners: list[str], arguments: tuple[Any, ...]
                    ) -> dict[str, Any]:
    """The model called on `arguments`; for each owner it called, of its first call: (args,
    kwargs, random streams, as they were before its forward ran; its output; (args, kwargs) as
    its forward left them)."""
    seen: dict[str, Any] = {}
    before: dict[str, Any] = {}

    def pre_recorder(owner: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if owner not in before:
                before[owner] = (cloned(args), cloned(kwargs), RandomStreams.of(module))
        return hook

    def recorder(owner: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            seen.setdefault(owner, (*before[owner], cloned(output), cloned((args, kwargs))))
        return hook

    handles = [handle for o in owners for handle in (
        model.get_submodule(o).register_forward_pre_hook(pre_recorder(o), with_kwargs=True),
        model.get_submodule(o).register_forward_hook(recorder(o), with_kwargs=True))]
    try:
        model(*arguments)
    finally:
        for handle in handles:
            handle.remove()
    return seen

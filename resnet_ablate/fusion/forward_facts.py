"""What a traced forward cannot keep, read from the forward's source and from the tracing itself.

torch.fx records tensor operations only. A rewritten forward therefore loses:
- the state a `with` block sets for the ops inside it (no_grad, autocast, activation
  checkpointing): the block vanishes and its ops run in the caller's state;
- assignments to the module (`self.last = x`) and changes to a container or tensor it holds
  (`self.feats.append(x)`: held_state.py): they run once, at tracing, on a proxy;
- Python values the forward reads from the module (`self.scale`, `if self.return_features:`):
  they are baked in as constants.
The first two are refused (`Untraceable`: the module is searched child by child instead, as a
forward that cannot be traced at all; where it is a child traced into from its caller's
forward, the caller calls it as it is and is traced on); the third is guarded: the values read are recorded when
the forward is rewritten (those its source names, here, and every one read while it is traced,
wherever the code that reads it is: reads.py), and a call after one of them changed raises
(`StaleForward`) rather than compute with the old value. Tracing also fails where the autograd or autocast state differs
while a node is recorded from where tracing began (a helper function's `with` block, which the
source check does not see), and where the random generators moved while tracing (a random
choice made in Python, which tracing would bake in). The submodules a rewrite absorbs or inlines
are checked too, on every call (`guarded`): where one was swapped, given another layer or hooks,
the module's own forward runs.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import pickle
import random
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .arguments import Fixed, holds
from .reads import Baked, changed_field, held_value, shown
from .records import FuseWarning

# The values the source check takes from a forward's own `self.<name>` reads: scalars only, as a
# read in the source may sit on a path the trace never took; what tracing records (reads.py),
# read for certain, adds containers and plain objects.
_PLAIN = (bool, int, float, str, type(None))


class Untraceable(Exception):
    """A forward that a traced copy would not compute exactly; the message says why."""


class StaleForward(RuntimeError):
    """A value a rewritten forward baked in has changed since `fuse` rewrote it."""


@dataclass(frozen=True)
class ForwardSource:
    """What a forward's own source shows: its `with` blocks' first lines, the attributes of its
    module (its first parameter) it assigns and reads, and every name and attribute it names."""

    with_blocks: tuple[str, ...]
    assigned: frozenset[str]
    read: frozenset[str]
    names: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=512)
def source_of(forward: Callable[..., Any]) -> ForwardSource | None:
    """The facts of `forward`'s source; None where it has none to read (generated code)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    function = next((n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if function is None or not function.args.args:
        return None
    me = function.args.args[0].arg
    withs, assigned, read, names = [], set(), set(), set()
    for node in ast.walk(function):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            withs.append(ast.unparse(node.items[0].context_expr))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == me):
            (assigned if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.attr)
        if isinstance(node, (ast.Name, ast.Attribute)):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return ForwardSource(tuple(withs), frozenset(assigned), frozenset(read), frozenset(names))


def may_apply_relu(bn: nn.BatchNorm2d) -> bool:
    """Whether a BatchNorm subclass's forward may apply a ReLU after normalising (timm's
    BatchNormAct2d with a ReLU as its `act`), and so be a site of its own: not where the forward
    is nn.BatchNorm2d's, nor where its source names no ReLU and calls nothing of the module but
    its children that are not one (a SiLU `act`, an inherited method, as detectron2's
    synchronised BatchNorm); where its source cannot be read, or it calls a function the module
    holds (`self.act_fn = F.relu`), it may."""
    forward = type(bn).forward
    if forward is nn.BatchNorm2d.forward:
        return False
    children = dict(bn.named_children())
    facts = source_of(forward)
    if facts is None or any(type(c) is nn.ReLU for c in children.values()) \
            or any("relu" in name.lower() for name in facts.names):
        return True
    inherited = set(dir(nn.BatchNorm2d))
    return any(name not in children and name not in inherited and callable(value)
               and not isinstance(value, (nn.Module, torch.Tensor))
               for name in facts.read if (value := getattr(bn, name, None)) is not None)


def check_forward(module: nn.Module) -> dict[str, Any]:
    """Raise Untraceable where `module`'s forward has a `with` block or assigns to the module;
    else the plain values it reads from the module (name -> value), which a rewrite bakes in."""
    facts = source_of(type(module).forward)
    if facts is None:
        return {}
    name = type(module).__name__
    if facts.with_blocks:
        raise Untraceable(f"the forward of {name} runs code under `with {facts.with_blocks[0]}`, "
                          "which a traced forward drops")
    public = sorted(a for a in facts.assigned if not a.startswith("__"))
    if public:
        raise Untraceable(f"the forward of {name} sets self.{public[0]}, which a traced forward "
                          "would not")
    values = vars(module)
    baked = {attr: values[attr] for attr in facts.read
             if attr in values and attr != "training" and _plain(values[attr])}
    # A submodule the forward tests for None (an optional downsample): its absence is baked too.
    baked.update({attr: None for attr in facts.read if module._modules.get(attr, 0) is None})
    return baked


def _plain(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def autograd_state() -> tuple[Any, ...]:
    """The state a `with` block may set for the ops inside it: a node recorded in another state
    than tracing began in was inside one."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch._C._autograd._top_saved_tensors_default_hooks(True))


def random_draws(module: nn.Module | None = None) -> tuple[Any, ...]:
    """The state of the CPU generators a forward may draw from in Python: torch's, Python's
    `random` and numpy's global one (`np.random.rand()`, as a supernet's path choice makes), and
    those `module` holds (`held_generators`: `self.rng = np.random.default_rng()`). (Tracing runs
    no tensor op, so a draw while tracing is one made in Python.)"""
    numpy_state = np.random.get_state()
    return (torch.get_rng_state().numpy().tobytes(), random.getstate(),
            (numpy_state[0], numpy_state[1].tobytes(), *numpy_state[2:]),
            *(pickle.dumps(_state_of(g)) for g in held_generators(module)))


# The random generators a module may hold as an attribute: numpy's (new and legacy), Python's,
# torch's.
_GENERATORS = (np.random.Generator, np.random.RandomState, random.Random, torch.Generator)


def held_generators(module: nn.Module | None) -> list[Any]:
    """The random generators `module` and its submodules hold as attributes, each once."""
    found: dict[int, Any] = {}
    for sub in () if module is None else module.modules():
        found.update({id(v): v for v in vars(sub).values() if isinstance(v, _GENERATORS)})
    return list(found.values())


def _state_of(generator: Any) -> Any:
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, np.random.RandomState):
        return generator.get_state(legacy=False)
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return generator.getstate()


def _set_state(generator: Any, state: Any) -> None:
    if isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    elif isinstance(generator, torch.Generator):
        generator.set_state(state)
    else:
        generator.setstate(state)


@dataclass(frozen=True)
class RandomStreams:
    """The random streams a forward may draw from in Python, as they were when taken (torch's
    CPU generator, Python's and numpy's global ones, those `module` holds): `replayed` runs a
    block from them, so that a rewritten forward checked on a probe call takes the choices the
    original took there (a child's inline stochastic depth)."""

    torch_state: torch.Tensor
    python_state: Any
    numpy_state: Any
    held: tuple[tuple[Any, Any], ...]

    @classmethod
    def of(cls, module: nn.Module | None) -> RandomStreams:
        return cls._taken(held_generators(module))

    @classmethod
    def _taken(cls, generators: Iterable[Any]) -> RandomStreams:
        return cls(torch.get_rng_state(), random.getstate(), np.random.get_state(),
                   tuple((g, _state_of(g)) for g in generators))

    def _restore(self) -> None:
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)
        np.random.set_state(self.numpy_state)
        for generator, state in self.held:
            _set_state(generator, state)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """The block run from these streams; the caller's as they were after it."""
        now = RandomStreams._taken(g for g, _ in self.held)
        self._restore()
        try:
            yield
        finally:
            now._restore()


@contextlib.contextmanager
def random_streams_kept(module: nn.Module | None = None) -> Iterator[None]:
    """Python's and numpy's global random streams, and the generators `module` holds, as they
    were before the block (and torch's CPU one; its others: `torch.random.fork_rng`): a forward
    traced draws from them, which the caller's own draws must not feel."""
    taken = RandomStreams.of(module)
    try:
        yield
    finally:
        taken._restore()


Guards = tuple[tuple[str, str, Baked], ...]  # (submodule path from the owner, attribute, value)
# The owner and the submodules its rewritten forward absorbed or inlined, as they were: (path
# from the owner, in parts; class, None for the owner, whose class the rewrite sets; the names of
# its own submodules; whether it was absorbed). The owner holds them as `KEPT_MODULES`: plain
# values, which copies and data-parallel replicas share as they are.
KEPT_MODULES = "_fused_forward_kept_modules"
# The sites fuse left below a forward it rewrote (path from the owner -> why), which a later fuse,
# calling that forward rather than tracing it, names again.
LEFT_BELOW = "_fused_forward_left_below"
KeptModules = tuple[tuple[tuple[str, ...], type | None, tuple[str, ...], bool], ...]


def kept_module(module: nn.Module, path: str, absorbed: bool
                ) -> tuple[tuple[str, ...], type | None, tuple[str, ...], bool]:
    """What `guarded` checks of a submodule (at `path` from the owner, "" the owner itself) on
    every call."""
    return (tuple(path.split(".")) if path else (), type(module) if path else None,
            _own_names(module), absorbed)


def guarded(forward: Callable[..., Any], guards: Guards, fixed: Sequence[Fixed] = ()
            ) -> Callable[..., Any]:
    """`forward`, first checking that the call passes the arguments it was traced with as
    constants as they were (`fixed`; else the module's own forward runs, exact and unfused in
    that call: arguments.py), that every value it baked in is still the module's (else
    StaleForward), and that the submodules it absorbed (a ReLU it no longer calls, a BatchNorm
    it calls with the ReLU on) or inlined (their forwards are part of it) are still of their
    class, with the submodules they had, and, where absorbed, without hooks (a ReLU's would not
    run, a fused BatchNorm's would see its output after the ReLU). Where one is not
    (an ablation's swapped activation, an appended layer, a hook that must run), the module's
    own forward runs instead: exact, unfused there; a FuseWarning says so once, but for hooks
    (profilers hook every module while they count)."""

    @functools.wraps(forward)  # its signature, which torch.fx reads through the wrapper
    def checked_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if fixed and not holds(fixed, args, kwargs):
            return self.unfused_class.forward(self, *args, **kwargs)
        for path, attr, expected in guards:
            module = self.get_submodule(path) if path else self
            now = held_value(module, attr, _MISSING)
            if not expected.holds(now):
                where = f"{path}.{attr}" if path else attr
                field = changed_field(expected, now)
                raise StaleForward(
                    f"{type(self).__name__}.{where} is "
                    f"{'gone' if now is _MISSING else shown(now)}"
                    f"{f' (its {field} changed)' if field else ''}, but resnet_ablate.fuse rewrote "
                    f"this forward when it was {expected.shown} and baked that value in: call "
                    "resnet_ablate.unfuse(model), set it, then fuse(model) again")
        for parts, kind, names, absorbed in getattr(self, KEPT_MODULES, ()):
            now = self
            for part in parts:
                now = now._modules.get(part) if now is not None else None
            if (now is None or not (kind is None or type(now) is kind or _parametrized(now, kind))
                    or (tuple(now._modules) != names and _own_names(now) != names)
                    or (absorbed and (now._forward_hooks or now._forward_pre_hooks
                                      or now._backward_hooks or now._backward_pre_hooks))):
                _say_unfused(self, ".".join(parts), kind, now, names)
                return self.unfused_class.forward(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    return checked_forward


def by_mode(training: Callable[..., Any], evaluation: Callable[..., Any],
             modes_read: tuple[str, ...]) -> Callable[..., Any]:
    """One forward of the two rewritten from a forward that branches on self.training: each
    mode's own where the modules whose mode it read (the owner, a BN it tests: `modes_read`)
    share that mode; where they do not (a frozen BN it tests while the model trains: neither
    graph was traced so), the module's own forward, exact and unfused there."""

    @functools.wraps(training)  # its signature, which torch.fx reads through the wrapper
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        mode = self.training
        if any(self.get_submodule(path).training != mode for path in modes_read):
            return self.unfused_class.forward(self, *args, **kwargs)  # type: ignore[attr-defined]
        return (training if mode else evaluation)(self, *args, **kwargs)

    return forward


def _own_names(module: nn.Module) -> tuple[str, ...]:
    """A module's submodules' names, but for the one a parametrization adds."""
    return tuple(name for name in module._modules if name != "parametrizations")


def _parametrized(module: nn.Module, kind: type | None) -> bool:
    """Whether `module` is a `kind` given a parametrization (its class then derives from it)."""
    return type(module).__bases__ == (kind,) and parametrize.is_parametrized(module)


def _say_unfused(owner: nn.Module, path: str, kind: type | None, now: nn.Module | None,
                 names: tuple[str, ...]) -> None:
    swapped = now is not None and not (kind is None or type(now) is kind
                                       or _parametrized(now, kind))
    if now is not None and not swapped and _own_names(now) == names:
        return  # hooks: the module's own forward runs them, as before fusing
    where = f"{type(owner).__name__}.{path}" if path else type(owner).__name__
    change = (f"is {type(now).__name__}, not the {kind.__name__} it was" if swapped
              else "is gone" if now is None
              else f"has submodules {list(_own_names(now))}, not {list(names)}")
    warnings.warn(f"{where} {change} when resnet_ablate.fuse rewrote this forward: the module's "
                  "own forward runs (exact, unfused there); resnet_ablate.unfuse(model) then "
                  "fuse(model) fuses the model as it is now", FuseWarning, stacklevel=3)


_MISSING = object()

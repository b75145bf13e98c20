"""The Python values a forward reads from its modules while it is traced, which a rewritten forward
bakes in as constants: recorded as they are read, wherever the code that reads them is (a helper
method, `super().forward()`, a child's attribute, a value inside a dict or a namespace, a class
attribute), and guarded on every later call (forward_facts.guarded).

A forward's source shows only the reads it writes itself (`self.scale`); the values it reaches
through other code were baked in unguarded, so that changing one changed nothing but the answer.
Here every module of the traced tree is, while tracing, an instance of a subclass of its own class
that notes each attribute read (`recorded_reads`); what was read is then looked up as it is held
(`baked_values`) and snapshotted: plain values, containers of them (a dict is compared whole: a
change to any entry raises, read or not) and plain objects (their fields without a snapshot left
out) are compared by value on each call. A tensor held as an attribute is read live by the traced
forward (torch.fx's get_attr), so it is not baked; functions, modules and other objects are not
guarded, nor are containers of more than 64 entries (compared on every call, they would cost
more than the layer). Modules, parameters, buffers, methods and nn.Module's own bookkeeping are
not values a trace bakes in: calls and tensors become nodes of the graph.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
# What every module holds (hooks, flags, its dicts) and nn.Module's own class attributes
# (`_compiled_call_impl`, which `Module.compile` sets).
MODULE_OWN = frozenset(vars(nn.Module())) | frozenset(vars(nn.Module))
_SNAPSHOT_DEPTH = 6  # deeper (or cyclic) containers are not guarded
# A container is compared whole on every call: one larger than this is not guarded (a per-call
# cost that grows with it, for a forward that reads one entry).
_SNAPSHOT_ENTRIES = 64
_NAN = ("nan",)  # a NaN, as snapshots compare it: equal to itself
_OPAQUE = ("opaque",)  # a field of an object that has no snapshot: left out of the comparison


@dataclass(frozen=True)
class Baked:
    """A value a rewritten forward baked in, and its snapshot, compared with a snapshot of what
    the module holds on each call."""

    value: Any
    snapshot: Any
    shown: str  # as it was when baked in (a dict's items may change since)

    def holds(self, now: Any) -> bool:
        if now is self.value and isinstance(now, _PLAIN):  # (a dict may have changed inside)
            return True
        try:
            return snapshot(now) == self.snapshot
        except _NoSnapshot:
            return False


class _NoSnapshot(Exception):
    """A value a guard cannot compare by value: left unguarded."""


def snapshot(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """A copy of `value` that compares equal to a later snapshot exactly where every plain
    value inside is the same (types included: 1 and 1.0 and True differ; a NaN equals a NaN);
    an object's fields that have none are left out; _NoSnapshot for a value that has none
    (a tensor, a module, a function, a deep or large structure)."""
    budget = [_SNAPSHOT_ENTRIES] if budget is None else budget
    budget[0] -= 1
    if depth > _SNAPSHOT_DEPTH or budget[0] < 0:
        raise _NoSnapshot
    if isinstance(value, _PLAIN):
        if isinstance(value, float) and math.isnan(value):
            return (float, _NAN)
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(snapshot(v, depth + 1, budget) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((snapshot(k, depth + 1, budget),
                                    snapshot(v, depth + 1, budget)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(snapshot(v, depth + 1, budget) for v in value))
    if isinstance(value, types.SimpleNamespace) or _plain_object(value):
        return (type(value), tuple((name, _field(field, depth + 1, budget))
                                   for name, field in vars(value).items()))
    raise _NoSnapshot


def _field(value: Any, depth: int, budget: list[int]) -> Any:
    """An object's field as its snapshot holds it: _OPAQUE where it has none (a config's
    device or callback), so that the object's other fields are still compared."""
    try:
        return snapshot(value, depth, budget)
    except _NoSnapshot:
        if budget[0] < 0:
            raise
        return _OPAQUE


# What has a __dict__ that is not its state: modules (their own state is what they hold), tensors,
# classes, functions and Python modules.
NOT_PLAIN = (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType,
             functools.partial)


def _plain_object(value: Any) -> bool:
    """An instance of a plain Python class (a config object, a dataclass): its attributes are
    its state."""
    return hasattr(value, "__dict__") and not isinstance(value, NOT_PLAIN) and not callable(value)


def changed_field(baked: Baked, now: Any) -> str | None:
    """Where `now` is a dict, namespace or plain object of the baked value's type, the first key
    or field whose value is not the baked one's (a message would otherwise show an object's
    repr twice, unchanged); None elsewhere."""
    if not isinstance(now, (dict, types.SimpleNamespace)) and not _plain_object(now):
        return None
    try:
        kind, items = snapshot(now)
    except _NoSnapshot:
        return None
    if kind is not baked.snapshot[0]:
        return None
    before, after = dict(baked.snapshot[1]), dict(items)
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key, _OPAQUE) != after.get(key, _OPAQUE) or key not in after:
            return repr(key[1]) if isinstance(now, dict) else key
    return None


def baked(value: Any) -> Baked | None:
    """`value` as a guard holds it; None where it has no snapshot (not guarded)."""
    try:
        return Baked(value, snapshot(value), shown(value))
    except _NoSnapshot:
        return None


def shown(value: Any) -> str:
    """A value as a message shows it: on one line, at most 80 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


_RECORDS: dict[int, set[str]] = {}  # id(module) -> the names read, while recording


def _recording_class(cls: type) -> type | None:
    """A subclass of `cls` that notes each attribute read of an instance being recorded, and is
    otherwise `cls` (its name and module too: torch.fx decides what it traces into by them);
    made for one trace and dropped after it. None where a class of `cls`'s defines
    `__init_subclass__`, which making one would run (a registry of subclasses would keep it)."""
    if any("__init_subclass__" in vars(c) for c in cls.__mro__ if c is not object):
        return None

    class Recording(cls):  # type: ignore[misc, valid-type]
        def __getattribute__(self, name: str) -> Any:
            names = _RECORDS.get(id(self))
            if names is not None:
                names.add(name)
            return super().__getattribute__(name)

    Recording.__name__, Recording.__qualname__ = cls.__name__, cls.__qualname__
    Recording.__module__ = cls.__module__
    return Recording


@contextlib.contextmanager
def recorded_reads(root: nn.Module) -> Iterator[dict[str, set[str]]]:
    """Within: the names read from `root` and each of its submodules, by module path. A module
    whose class cannot take a subclass (a TorchScript module, a class with __init_subclass__)
    is not recorded: the source check (forward_facts.check_forward) still guards what its own
    forward reads. (While recording, `type(module)` is the subclass: a forward that tests
    `type(self) is X` takes its other branch, which the probe then refuses.)"""
    swapped: list[tuple[nn.Module, type]] = []
    reads: dict[str, set[str]] = {}
    recording_classes: dict[type, type | None] = {}
    try:
        for path, module in root.named_modules(remove_duplicate=True):
            cls = type(module)
            if isinstance(module, torch.jit.ScriptModule):
                continue
            if cls not in recording_classes:
                recording_classes[cls] = _recording_class(cls)
            recording = recording_classes[cls]
            if recording is None:
                continue
            try:
                object.__setattr__(module, "__class__", recording)
            except TypeError:
                continue
            swapped.append((module, cls))
            reads[path] = _RECORDS[id(module)] = set()
        yield reads
    finally:
        for module, cls in swapped:
            _RECORDS.pop(id(module), None)
            object.__setattr__(module, "__class__", cls)


def baked_values(root: nn.Module, reads: dict[str, set[str]]) -> list[tuple[str, str, Baked]]:
    """(module path, attribute, Baked) for each value the reads took from a module: held by the
    instance or, not a method or property, by its class; a submodule held as None (an optional
    downsample) too. Not nn.Module's own attributes (`training` among them: a rewrite is proved
    in both modes), dunders, modules, parameters or buffers."""
    found = []
    for path, names in reads.items():
        module = root.get_submodule(path) if path else root
        for name in sorted(names):
            if name.startswith("__") or name in MODULE_OWN:
                continue
            if name in module.__dict__:
                value = module.__dict__[name]
            elif name in module._modules:
                if module._modules[name] is not None:
                    continue
                value = None
            elif name in module._parameters or name in module._buffers:
                continue
            else:
                value = _class_value(type(module), name)
                if value is _NOT_A_VALUE:
                    continue
            # (A tensor held as an attribute has no snapshot: torch.fx reads it live, get_attr.)
            guard = baked(value)
            if guard is not None:
                found.append((path, name, guard))
    return found


_NOT_A_VALUE = object()


def _class_value(cls: type, name: str) -> Any:
    """The class attribute `name` where it is a value (not a method, property or other
    descriptor), else _NOT_A_VALUE."""
    for owner in cls.__mro__:
        if name in vars(owner):
            value = vars(owner)[name]
            if callable(value) or hasattr(value, "__get__"):
                return _NOT_A_VALUE
            return value
    return _NOT_A_VALUE


def held_value(module: nn.Module, name: str, missing: Any) -> Any:
    """What `module` holds as `name` now, looked up as `baked_values` looked it up."""
    if name in module.__dict__:
        return module.__dict__[name]
    if name in module._modules:
        return module._modules[name]
    value = _class_value(type(module), name)
    return missing if value is _NOT_A_VALUE else value

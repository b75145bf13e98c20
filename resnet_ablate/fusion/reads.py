"""The Python values a forward reads from its modules while it is traced, which a rewritten forward
bakes in as constants: recorded as they are read, wherever the code that reads them is (a helper
method, `super().forward()`, a child's attribute, a value inside a dict or a namespace, a class
attribute), and guarded on every later call (forward_facts.guarded).

A forward's source shows only the reads it writes itself (`self.scale`); the values it reaches
through other code were baked in unguarded, so that changing one changed nothing but the answer.
Here every module of the traced tree is, while tracing, an instance of a subclass of its own class
that notes each attribute read (`recorded_reads`); what was read is then looked up as it is held
(`baked_values`): plain values and containers of them are compared by value on each call (a
snapshot taken now, so that a mutated dict is seen), other objects by identity (a tensor or an
object replaced is seen; one changed inside is not, as a forward that mutates such objects is
beyond a guard). Modules, parameters, buffers, methods and nn.Module's own bookkeeping are not
values a trace bakes in: calls and tensors become nodes of the graph.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_MODULE_OWN = frozenset(vars(nn.Module()))  # hooks, flags and the dicts every module holds
_SNAPSHOT_DEPTH = 6  # deeper (or cyclic) containers are compared by identity


@dataclass(frozen=True)
class Baked:
    """A value a rewritten forward baked in: its snapshot (compared by equality) or, where it
    has none, the object itself (compared by identity)."""

    value: Any
    snapshot: Any
    by_identity: bool
    shown: str  # as it was when baked in (a dict's items may change since)

    def holds(self, now: Any) -> bool:
        if self.by_identity:
            return now is self.value
        if now is self.value and isinstance(now, _PLAIN):  # (a dict may have changed inside)
            return True
        try:
            return snapshot(now) == self.snapshot
        except _NoSnapshot:
            return False


class _NoSnapshot(Exception):
    pass


def snapshot(value: Any, depth: int = 0) -> Any:
    """A copy of `value` that compares equal to a later snapshot exactly where every plain
    value inside is the same (types included: 1 and 1.0 and True differ); _NoSnapshot for
    anything else (tensors, modules, functions, deep or cyclic structures)."""
    if depth > _SNAPSHOT_DEPTH:
        raise _NoSnapshot
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(snapshot(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((snapshot(k, depth + 1), snapshot(v, depth + 1))
                                   for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(snapshot(v, depth + 1) for v in value))
    if isinstance(value, types.SimpleNamespace) or _plain_object(value):
        return (type(value), snapshot(vars(value), depth + 1))
    raise _NoSnapshot


def _plain_object(value: Any) -> bool:
    """An instance of a plain Python class (a config object, a dataclass): its attributes are
    its state."""
    return (hasattr(value, "__dict__") and not isinstance(
        value, (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType,
                types.ModuleType, functools.partial)) and not callable(value))


def baked(value: Any) -> Baked:
    shown = _shown(value)
    try:
        return Baked(value, snapshot(value), False, shown)
    except _NoSnapshot:
        return Baked(value, None, True, shown)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_RECORDS: dict[int, set[str]] = {}  # id(module) -> the names read, while recording


@functools.lru_cache(maxsize=None)
def _recording_class(cls: type) -> type:
    """A subclass of `cls` that notes each attribute read of an instance being recorded, and is
    otherwise `cls` (its name and module too: torch.fx decides what it traces into by them)."""

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
    whose class cannot take a subclass (a TorchScript module) is not recorded: the source
    check (forward_facts.check_forward) still guards what its own forward reads."""
    swapped: list[tuple[nn.Module, type]] = []
    reads: dict[str, set[str]] = {}
    try:
        for path, module in root.named_modules(remove_duplicate=True):
            cls = type(module)
            if isinstance(module, torch.jit.ScriptModule):
                continue
            try:
                object.__setattr__(module, "__class__", _recording_class(cls))
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
            if name.startswith("__") or name in _MODULE_OWN:
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
            if isinstance(value, nn.Module):
                continue
            found.append((path, name, baked(value)))  # a function held: by identity
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

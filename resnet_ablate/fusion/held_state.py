"""What a module holds beside its parameters, buffers and submodules that a forward may change in
place: lists, dicts, sets, deques, namespaces and the attributes of plain objects (a helper of
the user's class), at any depth (within a bound), and the tensors held in them or alone
(`self.count = torch.zeros(())`).

Tracing runs a forward once, on proxies: a change it makes to them (`self.feats.append(x)`,
`self.count.add_(1)`) happens once, while traced, with proxies in a user's list, and a rewrite
would never make it again; and fuse's probe batch, run on real tensors, would leave what it
appended. `HeldState` takes them as they are, names what changed and gives it back (an audit
found proxies left in a deque, an OrderedDict, a list in a dict, and a counter bumped by the
trace and never after fusing; another, proxy keys left in the dict of a helper object that the
forward called, `self.hooks.get_output(device)` as timm's feature hooks do, which then broke
deep copies, and a rewrite that no longer emptied it).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterator, MutableMapping, MutableSequence, MutableSet
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .reads import MODULE_OWN, NOT_PLAIN

_CONTAINERS = (MutableSequence, MutableMapping, MutableSet)
_DEEPEST = 4  # containers nested deeper are not watched
_MOST_ITEMS = 10_000  # items walked at most in one module tree: a larger holding is watched less
_SMALL = 1 << 20  # elements: a changed tensor up to this size is given its values back


@dataclass(frozen=True)
class HeldState:
    """Each mutable container with a shallow copy, each tensor with its version counter (and its
    values, where small), as they were when taken."""

    containers: tuple[tuple[str, Any, Any], ...]  # (where, the container, a shallow copy)
    tensors: tuple[tuple[str, torch.Tensor, int, torch.Tensor | None], ...]

    @classmethod
    def of(cls, root: nn.Module) -> HeldState:
        containers: list[tuple[str, Any, Any]] = []
        tensors: list[tuple[str, torch.Tensor, int, torch.Tensor | None]] = []
        seen: set[int] = set()
        budget = [_MOST_ITEMS]

        def visit(where: str, value: Any, depth: int) -> None:
            if id(value) in seen or depth > _DEEPEST or budget[0] <= 0:
                return
            if isinstance(value, torch.Tensor):
                if value.is_inference():  # (no version counter: made to stay as it is)
                    return
                seen.add(id(value))
                values = value.detach().clone() if value.numel() <= _SMALL else None
                tensors.append((where, value, value._version, values))
                return
            attributes = _attributes(value)
            if not isinstance(value, (*_CONTAINERS, tuple)) and attributes is None:
                return  # (a module's own state is watched where it is a submodule)
            seen.add(id(value))
            if isinstance(value, _CONTAINERS) or attributes is not None:
                containers.append((where, value, _plain_copy(value)))
            for key, item in itertools.islice(_items(value), max(budget[0], 0)):
                budget[0] -= 1
                visit(f"{where}.{key}" if attributes is not None else f"{where}[{key!r}]", item,
                      depth + 1)

        for path, module in root.named_modules():
            for name, value in vars(module).items():
                if name not in MODULE_OWN:
                    visit(f"{path}.{name}" if path else name, value, 0)
        return cls(tuple(containers), tuple(tensors))

    def changed(self) -> list[str]:
        """Where a container holds other items, or a tensor was changed in place, since taken."""
        return ([where for where, now, then in self.containers if not _same_items(now, then)]
                + [where for where, tensor, version, _ in self.tensors
                   if tensor._version != version])

    def restore(self) -> list[str]:
        """Each container its items back, and each changed tensor its values where they were
        kept (a larger one stays as it was left); where a container would not take them back (a
        class of the user's refusing it), where and why."""
        failed = []
        for where, now, then in self.containers:
            if not _same_items(now, then):
                try:
                    _refill(now, then)
                except Exception as error:  # noqa: BLE001 - the user's class: any failure
                    failed.append(f"{where} ({type(error).__name__}: {error})")
        with torch.no_grad():
            for _, tensor, version, values in self.tensors:
                if tensor._version != version and values is not None:
                    tensor.copy_(values)
        return failed


def _attributes(value: Any) -> dict[str, Any] | None:
    """The attribute dict of a namespace or a plain object, callable ones too (read as stored:
    no __getattr__ of the user's is called), else None. (Not of a Python module: a forward's
    `self.F = F` would have torch's globals walked; nor of a logger, whose level cache a
    forward's `self.log.debug(...)` fills: a refusal for what the model does not compute.)"""
    if isinstance(value, (*NOT_PLAIN, *_CONTAINERS, tuple, logging.Logger, logging.LoggerAdapter)):
        return None
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except AttributeError:  # (builtin values, and classes of __slots__ only)
        return None
    return attributes if type(attributes) is dict else None


def _plain_copy(value: Any) -> Any:
    """The items of `value` in a builtin container of its kind, its keys' order kept (read, not
    rebuilt: `copy.copy` of a dict subclass calls its __setitem__ for each item)."""
    if (attributes := _attributes(value)) is not None:
        return dict(attributes)
    if isinstance(value, MutableMapping):
        return dict(value.items())
    return set(value) if isinstance(value, MutableSet) else list(value)


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    if (attributes := _attributes(value)) is not None:
        return iter(attributes.items())
    return iter(value.items()) if isinstance(value, MutableMapping) else enumerate(value)


def _same_items(now: Any, then: Any) -> bool:
    """Whether a container holds the very items it held (by identity: a proxy's `==` would be
    traced); `then` is its `_plain_copy`."""
    if (attributes := _attributes(now)) is not None:
        now = attributes
    if isinstance(now, MutableMapping):
        items = list(now.items())
        return [id(k) for k, _ in items] == [id(k) for k in then] and all(
            v is then[k] for k, v in items)
    if isinstance(now, MutableSet):
        return {id(x) for x in now} == {id(x) for x in then}
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))


def _refill(now: Any, then: Any) -> None:
    """`now` given the items of `then` (its `_plain_copy`): by its own methods, or where they
    refuse (a subclass's clear() that raises), by its builtin type's."""
    if (attributes := _attributes(now)) is not None:
        attributes.clear()
        attributes.update(then)
        return
    try:
        now.clear()
        now.update(then) if isinstance(now, (MutableMapping, MutableSet)) else now.extend(then)
    except Exception:
        base = next((b for b in (list, collections.deque, dict, set) if isinstance(now, b)), None)
        if base is None:
            raise
        base.clear(now)
        base.update(now, then) if base in (dict, set) else base.extend(now, then)

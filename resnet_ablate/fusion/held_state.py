"""What a module holds beside its parameters, buffers and submodules that a forward may change in
place: lists, dicts, sets, deques and namespaces, at any depth (within a bound), and the tensors
held in them or alone (`self.count = torch.zeros(())`).

Tracing runs a forward once, on proxies: a change it makes to them (`self.feats.append(x)`,
`self.count.add_(1)`) happens once, while traced, with proxies in a user's list, and a rewrite
would never make it again; and fuse's probe batch, run on real tensors, would leave what it
appended. `HeldState` takes them as they are, names what changed and gives it back (an audit
found proxies left in a deque, an OrderedDict, a list in a dict, and a counter bumped by the
trace and never after fusing).
"""

from __future__ import annotations

import copy
import types
from collections.abc import MutableMapping, MutableSequence, MutableSet
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .reads import MODULE_OWN

_MUTABLE = (MutableSequence, MutableMapping, MutableSet, types.SimpleNamespace)
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
                seen.add(id(value))
                values = value.detach().clone() if value.numel() <= _SMALL else None
                tensors.append((where, value, value._version, values))
                return
            if not isinstance(value, (*_MUTABLE, tuple)):
                return  # (a module's own state is watched where it is a submodule)
            seen.add(id(value))
            if isinstance(value, _MUTABLE):
                containers.append((where, value, copy.copy(value)))
            for key, item in _items(value):
                budget[0] -= 1
                visit(f"{where}[{key!r}]", item, depth + 1)

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

    def restore(self) -> None:
        """Each container its items back, and each changed tensor its values where they were
        kept (a larger one stays as it was left)."""
        for _, now, then in self.containers:
            if not _same_items(now, then):
                _refill(now, then)
        with torch.no_grad():
            for _, tensor, version, values in self.tensors:
                if tensor._version != version and values is not None:
                    tensor.copy_(values)


def _items(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, types.SimpleNamespace):
        return list(vars(value).items())
    if isinstance(value, MutableMapping):
        return list(value.items())
    return list(enumerate(value))


def _same_items(now: Any, then: Any) -> bool:
    """Whether a container holds the very items it held (by identity: a proxy's `==` would be
    traced)."""
    if isinstance(now, types.SimpleNamespace):
        now, then = vars(now), vars(then)
    if isinstance(now, MutableMapping):
        return [id(k) for k in now] == [id(k) for k in then] and all(
            now[k] is then[k] for k in then)
    if isinstance(now, MutableSet):
        return {id(x) for x in now} == {id(x) for x in then}
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))


def _refill(now: Any, then: Any) -> None:
    if isinstance(now, types.SimpleNamespace):
        vars(now).clear()
        vars(now).update(vars(then))
    elif isinstance(now, MutableMapping):
        now.clear()
        now.update(then)
    elif isinstance(now, MutableSet):
        now.clear()
        now |= then
    else:
        now.clear()
        now.extend(then)

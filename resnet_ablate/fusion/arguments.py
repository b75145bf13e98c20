"""The arguments of a forward that a rewrite traces as constants, and the check each call of the
rewritten forward makes that it passes them so.

torch.fx traces every argument of a forward as a tensor stand-in (a proxy): a branch on an
optional one (`if shortcut is None: shortcut = x`) is traced as not None, one on a flag
(`if return_features:`) fails to trace, and an identity or type test (`if mode is Mode.A:`,
`isinstance(shortcut, list)`) is decided while tracing, silently. So every argument the probe's
call passes as anything but a tensor or a container (None, a flag, a number, a string, an Enum
member, any other object: its default or one given) is traced with that value fixed (fx's
`concrete_args`), and each call of the rewritten forward checks that it passes the same value
(`holds`), and a tensor or a container of the type the probe passed where it passed one; a call
that passes anything else runs the module's own forward: exact, unfused in that call. A forward
whose flags a caller never sets is fused as the probe called it.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

_PLAIN = (bool, int, float, str, type(None))
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@dataclass(frozen=True)
class _Traced:
    """A Fixed's value where the argument was traced as a stand-in: a tensor, or a container (as
    fx records it: indexed, not iterated); a call must pass one of that type."""

    kind: type


@dataclass(frozen=True)
class Fixed:
    """An argument of a rewritten forward as it was traced: its `value` fixed, or `_Traced`
    (given a tensor or a container on the probe)."""

    name: str
    position: int | None  # among the call's positional arguments (self left out); None: keyword-only
    default: Any
    value: Any

    def given(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        return self.default

    def holds_for(self, value: Any) -> bool:
        if isinstance(self.value, _Traced):
            return isinstance(value, self.value.kind)
        if value is self.value:
            return True
        # (Same type: True == 1 and 1 == 1.0, but a forward may branch on either; an object
        # whose == is not a truth value, as an array's, does not hold.)
        try:
            return type(value) is type(self.value) and bool(value == self.value)
        except Exception:  # noqa: BLE001 - any failure to compare: the module's own forward
            return False


def holds(fixed: Sequence[Fixed], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call with `args` and `kwargs` passes every argument as it was traced."""
    return all(f.holds_for(f.given(args, kwargs)) for f in fixed)


def fixed_on_probe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[Fixed, ...]:
    """The arguments of `module`'s forward as the probe's call (`args`, `kwargs`) passed them:
    a tensor or a container traced as a stand-in (`_traced_as`), anything else fixed. None of
    them where the call does not bind to the forward's signature, or where the forward takes
    *args or **kwargs (the tracer gives them no stand-ins)."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return ()
    fixed = []
    for position, parameter in enumerate(signature.parameters.values()):
        if parameter.kind in _VARIADIC:
            return ()
        value = bound.get(parameter.name, parameter.default)
        at = None if parameter.kind is inspect.Parameter.KEYWORD_ONLY else position
        fixed.append(Fixed(parameter.name, at, parameter.default, _traced_as(value)))
    return tuple(fixed)


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _traced_as(value: Any) -> Any:
    """What a Fixed holds for an argument the probe passed `value` to: a container is traced
    as a stand-in too (fixed, its tensors would be baked into the graph, and fx would trace the
    forward over its flattened items), checked for its type; so the probe's check is what
    proves a forward that tests one by identity."""
    if isinstance(value, torch.Tensor):
        return _Traced(torch.Tensor)
    if isinstance(value, _CONTAINERS):
        return _Traced(type(value))
    return value


def plain_defaults(module: nn.Module) -> tuple[Fixed, ...]:
    """Every argument of `module`'s forward with a plain default, fixed at it: what a forward
    that cannot be traced with proxies for them is searched with."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(Fixed(p.name, None, p.default, p.default) for p in parameters
                 if p.default is not inspect.Parameter.empty and isinstance(p.default, _PLAIN)
                 and p.kind not in _VARIADIC)


def concrete_args(fixed: Sequence[Fixed]) -> dict[str, Any] | None:
    """What torch.fx's tracer takes as `concrete_args` for `fixed`; None where nothing is fixed."""
    values = {f.name: f.value for f in fixed if not isinstance(f.value, _Traced)}
    return values or None


# What fx adds after a fixed argument's placeholder to check its value.
_SPECIALIZATION_CHECKS = {torch.fx._symbolic_trace._assert_is_none, torch._assert, operator.eq}


def as_declared(graph: fx.Graph, fixed: Sequence[Fixed]) -> None:
    """Give the placeholders of fixed arguments their own names back (fx renames them `name_1`,
    so that a caller passing `shortcut=None` by keyword would be refused) and drop fx's checks
    of their values (`holds` makes them before the forward runs, and falls back instead of
    raising)."""
    names = {f"{f.name}_1": f.name for f in fixed if not isinstance(f.value, _Traced)}
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.target in names]:
        checks: list[fx.Node] = []
        frontier = list(node.users)
        while frontier:
            user = frontier.pop()
            if user in checks:
                continue
            checks.append(user)
            frontier.extend(user.users)
        if not all(c.op == "call_function" and c.target in _SPECIALIZATION_CHECKS
                   for c in checks):
            continue  # (fx checks a fixed value only; anything else is the forward's own)
        for check in reversed(_in_graph_order(graph, checks)):
            graph.erase_node(check)
        node.target = names[str(node.target)]


def _in_graph_order(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    chosen = set(nodes)
    return [n for n in graph.nodes if n in chosen]

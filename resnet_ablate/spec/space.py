"""The `space` section of a spec: the swept architecture fields, each with its levels (a list,
or an int range for the random and tpe samplers), no level listed twice, every point of the grid
a buildable architecture and no two the same network."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from ..arch import ArchError, ResNetArch
from .catalogue import MAX_TRIALS
from .checker import Checker, shown
from .sections import ARCH_FIELDS, IntRange, values_of


def _level_key(value: Any) -> Any:
    """A level as duplicates compare: strings case-folded (the architecture reads `a` as `A`),
    numbers by value (8 and 8.0), lists element by element; a bool stays apart from 1 and 0."""
    if isinstance(value, str):
        return ("str", value.casefold())
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (tuple, list)):
        return ("list", tuple(_level_key(v) for v in value))
    return ("value", value)


def _check_distinct_levels(check: Checker, where: str, levels: tuple[Any, ...]) -> None:
    """Refuse a level listed twice: it would train the same configuration twice, and the summary
    would then count one configuration's seeds twice (n doubled, a falsely narrow interval)."""
    first: dict[Any, Any] = {}
    for level in levels:
        key = _level_key(level)
        try:
            seen = key in first
        except TypeError:
            continue  # an unhashable level: the architecture check below refuses it
        if not seen:
            first[key] = level
        else:
            earlier = first[key]
            same = "" if repr(earlier) == repr(level) else f" (the same level as {shown(earlier)})"
            raise check.fail(where, f"{shown(level)} is listed twice{same}; list each level once "
                                    "(strings compare ignoring case, and 8 equals 8.0): a repeated "
                                    "level trains the same configuration twice")


def space_section(check: Checker, value: Any, sampler: str, model: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """`space`: each swept ResNetArch field's levels (a list; random and tpe also take an int
    range), none also fixed in `model`, and every point a buildable architecture."""
    section = check.mapping("space", value, ARCH_FIELDS)
    if not section:
        raise check.fail("space", f"empty; sweep at least one of: {', '.join(ARCH_FIELDS)}")
    space: dict[str, Any] = {}
    for name, choices in section.items():
        where = f"space.{name}"
        if name in model:
            raise check.fail(where, f"also fixed in model.{name}; sweep it or fix it, not both")
        if isinstance(choices, Mapping):
            if sampler == "grid":
                raise check.fail(where, "the grid sampler needs a list of values, not a range")
            check.mapping(where, choices, ("low", "high", "step"))
            if "low" not in choices or "high" not in choices:
                raise check.fail(where, "a range needs low and high (and optionally step)")
            for key, bound in choices.items():
                check.typed(f"{where}.{key}", bound, int, "an int")
            if choices.get("step", 1) < 1:
                raise check.fail(f"{where}.step", f"must be >= 1, got {choices['step']}")
            space[name] = IntRange(choices["low"], choices["high"], choices.get("step", 1))
            if not space[name].values():
                raise check.fail(where, f"the range {dict(choices)} holds no value")
            if len(space[name].values()) > MAX_TRIALS:
                raise check.fail(where, f"the range {dict(choices)} holds "
                                        f"{len(space[name].values())} values; at most {MAX_TRIALS}")
        else:
            if not isinstance(choices, list):
                choices = [choices]
            if not choices:
                raise check.fail(where, "empty list of values; give at least one")
            space[name] = tuple(tuple(c) if isinstance(c, list) else c for c in choices)
            _check_distinct_levels(check, where, space[name])

    # Every combination must be a buildable architecture (checked up to a large space's first 10k).
    points = list(itertools.islice(
        itertools.product(*[[(n, v) for v in values_of(c)] for n, c in space.items()]), 10_000))
    built: dict[str, tuple[tuple[str, Any], ...]] = {}
    for point in points:
        try:
            digest = ResNetArch.from_dict({**model, **dict(point)}).digest
        except (ArchError, TypeError) as error:
            # A field the model section fixes (and the space does not sweep) is that section's.
            swept = {name for name, _ in point}
            fixed = [name for name in re.findall(r"\b(\w+)=", str(error))
                     if name in model and name not in swept]
            if fixed:
                raise check.fail(f"model.{fixed[0]}", str(error)) from None
            raise check.fail("space", f"the point {_point(point)} is not a valid architecture: "
                                      f"{error}") from None
        if digest in built:
            raise check.fail("space", f"the points {_point(built[digest])} and {_point(point)} "
                                      "build the same network (null means the family's default; "
                                      "basic blocks have no inner width or downsampling choice): "
                                      "it would train twice under two names; sweep levels that "
                                      "differ")
        built[digest] = point
    return space


def _point(point: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in point)

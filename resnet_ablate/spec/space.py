"""The `space` section of a spec: the swept architecture fields, each with its levels (a list,
or an int range for the random and tpe samplers), no level listed twice, every point of the grid
a buildable architecture, no two levels of a factor the same networks."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from ..arch import ArchError, ResNetArch
from .catalogue import MAX_TRIALS
from .checker import Checker, shown
from .sections import ARCH_FIELDS, IntRange, values_of

# The points of a space built when a spec is checked: all but a huge random space's.
CHECKED_POINTS = 10_000


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

    # Every combination must be a buildable architecture (checked up to a large space's first
    # CHECKED_POINTS).
    points = list(itertools.islice(
        itertools.product(*[[(n, v) for v in values_of(c)] for n, c in space.items()]),
        CHECKED_POINTS))
    built: dict[tuple[tuple[str, Any], ...], str] = {}
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
        built[point] = digest
    _check_no_synonyms(check, space, built)
    return space


def _check_no_synonyms(check: Checker, space: Mapping[str, Any],
                       built: Mapping[tuple[tuple[str, Any], ...], str]) -> None:
    """Refuse two levels of one factor that build the same network whatever the other factors
    (null and the family's default, `stages: [3, 3, 3]` and depth 20's own): every configuration
    would train twice under two names, and a comparison of the two would be of one network with
    itself. A level that differs only at some levels of another factor (downsampling v1 and v1.5,
    alike for basic blocks, not for bottlenecks) is a crossed design's, and kept."""
    for index, name in enumerate(space):
        networks: dict[Any, list[str]] = {}
        for point, digest in sorted(built.items(), key=lambda item: _others_key(item[0], index)):
            networks.setdefault(_level_key(point[index][1]), []).append(digest)
        levels = {_level_key(point[index][1]): point[index][1] for point in built}
        seen: dict[tuple[str, ...], Any] = {}
        for key, digests in networks.items():
            if tuple(digests) in seen:
                raise check.fail(f"space.{name}", f"{shown(seen[tuple(digests)])} and "
                                 f"{shown(levels[key])} build the same networks whatever the "
                                 "other factors (null means the family's default): each "
                                 "configuration would train twice under two names; list one")
            seen[tuple(digests)] = levels[key]


def _others_key(point: tuple[tuple[str, Any], ...], index: int) -> str:
    """A point's values but the one at `index`, as text that sorts whatever their types."""
    return repr([value for i, (_, value) in enumerate(point) if i != index])


def _point(point: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in point)

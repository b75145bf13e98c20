"""The `seeds` section of a spec: a count, a list of distinct seeds, or the adaptive rule
(AdaptiveSeeds: seeds spent where the answer is still open); and that rule read back from a
stored study's spec (adaptive_rule)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .catalogue import MAX_ADAPTIVE_SEEDS, MAX_TRIALS
from .checker import Checker
from .sections import AdaptiveSeeds, values_of


def adaptive_rule(seeds: Any, space: Mapping[str, Any], *, source: str = "<spec>"
                  ) -> AdaptiveSeeds | None:
    """The adaptive-seed rule of a spec's `seeds` as written (None for fixed seeds): what a
    reader of a stored study needs without parsing the rest of its spec again."""
    if not isinstance(seeds, dict):
        return None
    levels = {name: tuple(values) if isinstance(values, list) else ()
              for name, values in space.items()}
    return _adaptive_seeds(Checker(source), seeds, levels)[1]


ADAPTIVE_KEYS = ("min", "max", "until")
UNTIL_KEYS = ("width", "decided", "margin", "familywise")
MAX_SEED = 2**32 - 1  # numpy's and Optuna's generators take seeds from 0 to this


def seeds_section(check: Checker, value: Any, space: Mapping[str, Any]
           ) -> tuple[list[int], AdaptiveSeeds | None]:
    """`seeds`: a count, a list of distinct ints, or the adaptive mapping (AdaptiveSeeds)."""
    if isinstance(value, dict):
        return _adaptive_seeds(check, value, space)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_TRIALS:  # before a list of them is made
            raise check.fail("seeds", f"a count of seeds from 1 to {MAX_TRIALS}, got {value}")
        value = list(range(value))
    check.typed("seeds", value, list, "a count (int), a list of int seeds, or {min, max, until}")
    for i, seed in enumerate(value):  # before the set below, which a list or map would break
        check.typed(f"seeds[{i}]", seed, int, "an int")
    if not value or len(set(value)) != len(value):
        raise check.fail("seeds", f"expected distinct int seeds, got {value!r}")
    for i, seed in enumerate(value):
        if not 0 <= seed <= MAX_SEED:
            raise check.fail(f"seeds[{i}]", f"must be an int from 0 to {MAX_SEED} (2**32 - 1), "
                                            f"got {seed}")
    return value, None


def _adaptive_seeds(check: Checker, value: dict, space: Mapping[str, Any]
                    ) -> tuple[list[int], AdaptiveSeeds]:
    section = check.mapping("seeds", value, list(ADAPTIVE_KEYS))
    bounds = {}
    for name in ("min", "max"):
        if name not in section:
            raise check.fail("seeds", f"adaptive seeds need min, max and until; {name} is missing")
        number = check.typed(f"seeds.{name}", section[name], int, "an int")
        if not 2 <= number <= MAX_ADAPTIVE_SEEDS:
            raise check.fail(f"seeds.{name}", f"must be an int from 2 (the fewest seeds an "
                                              f"interval needs) to {MAX_ADAPTIVE_SEEDS}, got "
                                              f"{number!r}")
        bounds[name] = number
    if bounds["max"] < bounds["min"]:
        raise check.fail("seeds.max", f"must be >= seeds.min ({bounds['min']}), got "
                                      f"{bounds['max']}")
    until = check.mapping("seeds.until", section.get("until"), list(UNTIL_KEYS))
    if ("width" in until) == ("decided" in until):
        raise check.fail("seeds.until", "give one rule: {width: W} (stop where the test error's "
                                        "interval is at most W wide) or {decided: FACTOR, "
                                        "margin: M} (stop where its comparison is decided)")
    width = decided = None
    margin, family = 0.0, 1
    if "width" in until:
        for key in ("margin", "familywise"):
            if key in until:
                raise check.fail(f"seeds.until.{key}", "goes with `decided` (a comparison's "
                                                       f"{_DECIDED_KEYS[key]}); the width rule "
                                                       "has none: give {width: W} alone")
        width = check.typed("seeds.until.width", until["width"], (int, float), "a number")
        if not 0 < width <= 1:
            raise check.fail("seeds.until.width", f"an interval width of an error rate, in "
                                                  f"(0, 1] (0.02 is 2 points), got {width!r}")
    else:
        decided = check.typed("seeds.until.decided", until["decided"], str, "a swept factor's name")
        swept = [name for name, levels in space.items() if len(values_of(levels)) >= 2]
        if decided not in swept:
            listed = (f"; space lists it with one level, {values_of(space[decided])[0]!r}: a "
                      "choice is decided between two levels or more" if decided in space else "")
            raise check.fail("seeds.until.decided", f"{decided!r} is not a swept factor with two "
                                                    f"levels or more{listed}; swept: "
                                                    f"{', '.join(swept) or '(no factor)'}")
        margin = check.typed("seeds.until.margin", until.get("margin", 0.0), (int, float),
                             "a number")
        if not 0 <= margin < 1:
            raise check.fail("seeds.until.margin", f"a difference of error rates in [0, 1) "
                                                   f"(0.005 is half a point), got {margin!r}")
        if check.typed("seeds.until.familywise", until.get("familywise", False), bool,
                       "true or false"):
            family = _comparisons(space, decided)
    rule = AdaptiveSeeds(bounds["min"], bounds["max"], None if width is None else float(width),
                         decided, float(margin), family)
    return list(range(rule.max)), rule


_DECIDED_KEYS = {"margin": "equivalence margin", "familywise": "error rate over the study"}


def _comparisons(space: Mapping[str, Any], decided: str) -> int:
    """The comparisons a `decided` rule makes over a grid: each level of `decided` but its
    baseline, in each configuration of the other factors."""
    count = len(values_of(space[decided])) - 1
    for name, levels in space.items():
        if name != decided:
            count *= max(len(values_of(levels)), 1)
    return count

"""The parser's one way to refuse a value: `Checker` builds each section of a spec and raises a
SpecError naming the file, the field and what is valid on the first problem. A dataclass section's
fields are checked against the field types themselves (typing.get_type_hints), so a field added
to Budget, Resources or DatasetSpec is checked without a word here."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any


class SpecError(ValueError):
    """A study spec that cannot run; the message names the file, the field and what is valid."""


class SpecFieldError(SpecError):
    """A section built in Python (no file behind it) that cannot run: the message names the field
    and what is valid; the parser names its file (Checker.named)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def accepted_types(hint: Any) -> tuple[type, ...]:
    """The types of the values a YAML document may give a field annotated `hint`, None aside:
    `float` takes ints too (YAML's `1`), `X | None` what X takes, `Mapping[str, Any]` a mapping.
    A hint outside these is a TypeError, so that no field of a section goes unchecked."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return tuple(kind for arg in typing.get_args(hint) if arg is not type(None)
                     for kind in accepted_types(arg))
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return (Mapping,)
    if hint is float:
        return (int, float)
    if hint in (int, str, bool):
        return (hint,)
    raise TypeError(f"no YAML check for a field annotated {hint!r}")


def accepts_none(hint: Any) -> bool:
    return typing.get_origin(hint) in (types.UnionType, typing.Union) and \
        type(None) in typing.get_args(hint)


class Checker:
    """Builds one section of a spec, raising SpecError with the file and field on the first
    problem."""

    def __init__(self, source: str | None) -> None:
        self.source = source  # None: a section built in Python, its problems SpecFieldErrors

    def fail(self, where: str, problem: str) -> SpecError:
        if self.source is None:
            return SpecFieldError(where or "the spec", problem)
        return SpecError(f"{self.source}: {where or 'the spec'}: {problem}")

    def named(self, error: SpecFieldError) -> SpecError:
        """A section's own refusal (from its __post_init__) as this file's SpecError."""
        return self.fail(error.where, error.problem)

    def mapping(self, where: str, value: Any, valid_keys: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__} {shown(value)}")
        unknown = [k for k in value if k not in valid_keys]
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}" if where else str(unknown[0]),
                            f"unknown key; valid keys: {', '.join(valid_keys)}")
        return value

    def typed(self, where: str, value: Any, kind: type | tuple[type, ...], valid: str) -> Any:
        # bool is an int: `workers: yes` must not pass as 1
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(where, f"expected {valid}, got {shown(value)}")
        if not isinstance(value, kind):
            raise self.fail(where, f"expected {valid}, got {type(value).__name__} {shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            # `.nan` compares false with every bound and would pass them all; `.inf` is no limit
            raise self.fail(where, f"expected a finite number, got {value}")
        return value

    def dataclass_section(self, where: str, value: Any, cls: type) -> dict[str, Any]:
        """A section whose keys are `cls`'s fields, each value of its field's type (null only
        where the field allows None); what is left out takes the field's default. A value of
        another type is refused saying what is valid: the field's `valid` (`valid_as`), or else
        its type."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        section = dict(self.mapping(where, value, list(fields)))
        for name, item in section.items():
            if item is None and accepts_none(hints[name]):
                continue
            expected = accepted_types(hints[name])
            valid = fields[name].metadata.get("valid") or " or ".join(
                "a mapping" if t is Mapping else t.__name__ for t in expected)
            self.typed(f"{where}.{name}", item, expected, valid)
        return section


def valid_as(default: Any, valid: str) -> Any:
    """A section's field with its `default`, and what values are `valid` (in words, as a refusal
    says them: "an int from 1 to 32")."""
    return dataclasses.field(default=default, metadata={"valid": valid})


def checked_fields(where: str, section: Any) -> Checker:
    """For a section's __post_init__: every field of the dataclass `section` checked against its
    type; the Checker returned refuses what else is wrong with SpecFieldErrors naming fields
    under `where`."""
    check = Checker(None)
    check.dataclass_section(where, {f.name: getattr(section, f.name)
                                    for f in dataclasses.fields(section)}, type(section))
    return check

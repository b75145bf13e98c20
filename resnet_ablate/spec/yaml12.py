"""Reading a spec file: YAML 1.2 (not PyYAML's 1.1), a key given twice refused, a document
bounded in depth and in its values with aliases expanded, and every problem one SpecError line
naming the file. What it returns is plain values for the parser (parse.py)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .checker import SpecError, shown


def read_spec_file(path: str | os.PathLike[str]) -> Any:
    """A spec file's YAML as plain values (mappings, lists, scalars), read by YAML 1.2's rules
    (_SpecLoader); raises SpecError naming the file for what is no spec to parse."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{source}: cannot read the spec: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{source}: not a text file (not UTF-8); a spec is a YAML file such as "
                        "studies/quickstart.yaml") from None
    if "\x00" in text:
        raise SpecError(f"{source}: not a text file (it holds NUL bytes); a spec is a YAML file "
                        "such as studies/quickstart.yaml")
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise SpecError(f"{source}: not a spec: nested too deeply for YAML to read (a spec is "
                        f"at most {MAX_SPEC_DEPTH} levels deep)") from None
    return raw


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own message spans several,
    quoting the text)."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return shown(str(error), 200)
    what = "; ".join(part for part in (error.context, error.problem) if part)
    mark = error.problem_mark or error.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{what or 'cannot be read'}{where}"


# Bounds on a spec's shape, far above any real one (studies/ nest 4 deep in a few hundred
# values): a document nested thousands deep, or aliases that expand to millions of values (476
# bytes of `&a [*b, *b, ...]` levels make 1.5 GB), is refused before anything reads it.
MAX_SPEC_DEPTH = 64
MAX_SPEC_VALUES = 100_000


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 (core schema), not 1.1: `1e-3` is a number, `010` is
    10, while `1:30`, `0b100`, `yes`, `on` and `2020-01-01` are strings (1.1 reads 90, 4, true,
    true and a date); a key given twice in one mapping is an error rather than the last one
    winning; and a document is bounded in depth and in its values counted with aliases expanded
    (MAX_SPEC_DEPTH, MAX_SPEC_VALUES). Merge keys (`<<: *base`) still merge."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[type, Any], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; keys written here override merged ones, as in YAML
            key = self.construct_object(key_node, deep=deep)
            try:
                typed = (type(key), key)  # so that 1 and true are different keys
                first = seen.get(typed)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got {key!r}", key_node.start_mark
                ) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first + 1})",
                    key_node.start_mark)
            seen[typed] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        for prefix, base in (("0o", 8), ("0x", 16)):
            if text.startswith(prefix):
                return int(text[2:], base)
        try:
            return int(text, 10)  # `010` is 10: YAML 1.2 has no leading-zero octal
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not a YAML 1.2 integer", node.start_mark) from None

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = self.construct_scalar(node)
        special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
        if text.lower() in special:
            return special[text.lower()]
        try:
            return float(text)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not a YAML 1.2 number", node.start_mark) from None


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document deeper than MAX_SPEC_DEPTH or holding more than MAX_SPEC_VALUES nodes
    with its aliases expanded: counted once per distinct node (an alias is the node it names),
    so the count costs the document's size, never its expansion."""
    sizes: dict[int, int] = {}
    # Depth-first without recursion: (node, depth, children counted yet).
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, counted = stack.pop()
        if depth > MAX_SPEC_DEPTH:
            raise yaml.constructor.ConstructorError(
                None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels; a spec is a few levels "
                            "of mappings and lists", node.start_mark)
        children = _children(node)
        if counted:
            size = 1 + sum(sizes[id(child)] for child in children)
            if size > MAX_SPEC_VALUES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"expands to more than {MAX_SPEC_VALUES} values (its aliases "
                                "repeat what their anchors hold); a spec is a few hundred",
                    node.start_mark)
            sizes[id(node)] = size
        elif id(node) not in sizes:
            stack.append((node, depth, True))
            if any(child is node for child in children):
                raise yaml.constructor.ConstructorError(
                    None, None, "holds itself through an alias", node.start_mark)
            stack.extend((child, depth + 1, False) for child in children
                         if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# YAML 1.2's core schema in place of PyYAML's 1.1 resolvers for booleans, numbers, timestamps and
# `=`: whatever else looks like one (yes, on, 1:30, 0b100, 1_000, 2020-01-01) is a string.
_YAML_11_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                 "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")
_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))
_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)
_SpecLoader.add_constructor("tag:yaml.org,2002:float", _SpecLoader.construct_yaml_float)

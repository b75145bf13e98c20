"""The filter language of `--where` and `Results.where`: columns compared with values, nothing else.

    depth == 20 and shortcut == 'A'
    depth >= 56 or not fused
    shortcut in ['A', 'B'] and test_error < 0.1

A filter is parsed (with Python's own expression parser) and then interpreted over the table's
columns; it is never evaluated, so no text a user types can call a function, read an attribute or
reach a module. The grammar:

    filter      := filter "and" filter | filter "or" filter | "not" filter | "(" filter ")"
                 | comparison | column
    comparison  := operand (("==" | "!=" | "<" | "<=" | ">" | ">=") operand)+
                 | column ("in" | "not in") list
    operand     := column | value
    value       := number | 'string' | "string" | True | False | None
    list        := "[" value ("," value)* "]"   (or parentheses)

Rates (errors, accuracies) are fractions from 0 to 1, which tables show in %: `test_error < 0.05`
selects errors under 5%, and a rate compared with a number outside 0 to 1 (`test_error < 5`,
which matched every trial) is refused, naming the fraction meant.

A bare column is true where it is true (e.g. `fused`). Missing values follow pandas: a comparison
with one is unknown, `and`/`or`/`not` carry unknowns through (Kleene logic), and rows still unknown
at the end are left out, so a filter selects what `DataFrame.query` would, but that text
compares without case, as specs read levels (`shortcut == 'a'` selects option A).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Collection
from typing import Any

import pandas as pd

_COMPARISONS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_ALLOWED = "comparisons (== != < <= > >=), in / not in [values], and / or / not, and parentheses"


class FilterError(ValueError):
    """A filter that is not in the language, or names a column the table does not have."""


def filter_mask(frame: pd.DataFrame, text: str, rates: Collection[str] = ()) -> pd.Series:
    """The rows of `frame` that `text` selects, as a boolean Series aligned with it; `rates`:
    its columns of fractions from 0 to 1 (see above)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise FilterError(f"{text!r} is not a filter ({error.msg}); use {_ALLOWED}") from None
    except (RecursionError, MemoryError):
        raise FilterError(f"{text[:80]!r}...: nested too deeply") from None
    interpreter = _Interpreter(frame, text, rates)
    try:
        return interpreter.mask(tree.body).fillna(False).astype(bool)
    except RecursionError:
        raise FilterError(f"{text[:80]!r}...: nested too deeply") from None
    except FilterError:
        raise  # the interpreter's own message (a ValueError too) says what is wrong, as it is
    except (TypeError, ValueError) as error:  # e.g. a text column compared with a number
        raise FilterError(f"{text!r}: the columns and values do not compare ({error})") from None


def _holds_text(column: pd.Series, *, alone: bool) -> bool:
    """Whether `column` holds text: every value it has (`alone`), or its first."""
    present = column.dropna()
    if present.empty:
        return False
    return bool(present.map(lambda v: isinstance(v, str)).all()) if alone \
        else isinstance(present.iloc[0], str)


def _folded(operand: Any) -> Any:
    """Text as levels are told apart (a spec refuses `[A, a]` as one level listed twice): without
    case, so that `shortcut == 'a'` selects the trials of level A."""
    if isinstance(operand, str):
        return operand.casefold()
    if isinstance(operand, pd.Series) and (operand.dtype == object or pd.api.types.is_string_dtype(operand)):
        return operand.map(lambda v: v.casefold() if isinstance(v, str) else v)
    return operand


class _Interpreter:
    def __init__(self, frame: pd.DataFrame, text: str, rates: Collection[str] = ()) -> None:
        self.frame = frame
        self.text = text
        self.rates = rates

    def fail(self, node: ast.AST, what: str) -> FilterError:
        piece = ast.get_source_segment(self.text.strip(), node) or type(node).__name__
        where = "" if repr(piece) in what else f" ({piece!r})"
        return FilterError(f"{self.text!r}: {what}{where}; a filter has only {_ALLOWED}, "
                           f"over the columns: {', '.join(map(str, self.frame.columns))}")

    def mask(self, node: ast.AST) -> pd.Series:
        if isinstance(node, ast.BoolOp):
            masks = [self.mask(value) for value in node.values]
            combined = masks[0]
            for other in masks[1:]:
                combined = combined & other if isinstance(node.op, ast.And) else combined | other
            return combined
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.mask(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):
            column = self.column(node)
            if not pd.api.types.is_bool_dtype(column.dtype):
                raise self.fail(node, f"column {node.id!r} is not true/false; compare it with a value")
            return column.astype("boolean")
        raise self.fail(node, "not a condition")

    def compare(self, node: ast.Compare) -> pd.Series:
        result = pd.Series(True, index=self.frame.index, dtype="boolean")
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                values = self.values(right)
                column = self.column(left)
                for value in values:
                    self._check_comparable(left, column, right, value, ordered=False)
                if any(isinstance(v, str) for v in values):
                    column, values = _folded(column), [_folded(v) for v in values]
                selected = column.isin(values)
                result &= ~selected if isinstance(op, ast.NotIn) else selected
            elif type(op) in _COMPARISONS:
                a, b = self.operand(left), self.operand(right)
                if not isinstance(a, pd.Series) and not isinstance(b, pd.Series):
                    raise self.fail(node, "a comparison needs a column on one side")
                self._check_comparable(left, a, right, b,
                                       ordered=not isinstance(op, (ast.Eq, ast.NotEq)))
                if isinstance(op, (ast.Eq, ast.NotEq)) and (isinstance(a, str) or isinstance(b, str)):
                    a, b = _folded(a), _folded(b)
                result &= _COMPARISONS[type(op)](a, b).astype("boolean")
            else:
                raise self.fail(node, "not a comparison the language has")
            left = right
        return result

    def _check_comparable(self, left: ast.AST, a: Any, right: ast.AST, b: Any, *,
                          ordered: bool) -> None:
        """A column of numbers compared with text, or one of text with a number: said in the
        filter's own words, not numpy's; for == and `in` too, where it would match nothing (an
        audit: `depth == '20'` matched none and the error listed depth: 20), there only where
        the column holds nothing else (one of text and numbers, as `['none', 0.1]`, compares
        with either)."""
        for side, value, other in ((left, a, b), (right, b, a)):
            if isinstance(value, pd.Series) and side.id in self.rates and \
                    isinstance(other, (int, float)) and not isinstance(other, bool) and \
                    not 0 <= other <= 1:
                raise FilterError(
                    f"{self.text!r}: {side.id} is a fraction from 0 to 1 (tables show it in %), "
                    f"and {other!r} is outside it; for {other:g}% write {other / 100:g}")
            if isinstance(value, pd.Series) and isinstance(other, (str, bool, int, float)):
                numeric = pd.api.types.is_numeric_dtype(value.dtype) and \
                    not pd.api.types.is_bool_dtype(value.dtype)
                if numeric and isinstance(other, str):
                    raise FilterError(f"{self.text!r}: {side.id} holds numbers and {other!r} is "
                                      "text; compare it with a number (no quotes)")
                if not numeric and not isinstance(other, str) and \
                        _holds_text(value, alone=not ordered):
                    raise FilterError(f"{self.text!r}: {side.id} holds text and {other!r} is a "
                                      f"number; compare it with text in quotes")

    def column(self, node: ast.AST) -> pd.Series:
        if not isinstance(node, ast.Name):
            raise self.fail(node, "expected a column name")
        if node.id not in self.frame.columns:
            raise self.fail(node, f"no column {node.id!r} (a value of text is written in "
                                  f"quotes: '{node.id}')")
        return self.frame[node.id]

    def operand(self, node: ast.AST) -> pd.Series | Any:
        return self.column(node) if isinstance(node, ast.Name) else self.value(node)

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and (
            node.value is None or isinstance(node.value, (bool, int, float, str))
        ):
            return node.value
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
                and isinstance(node.operand, ast.Constant)
                and isinstance(node.operand.value, (int, float))
                and not isinstance(node.operand.value, bool)):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        raise self.fail(node, "not a value (a number, a quoted string, True, False or None)")

    def values(self, node: ast.AST) -> list[Any]:
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            raise self.fail(node, "`in` takes a list of values, e.g. ['A', 'B']")
        return [self.value(element) for element in node.elts]

"""How a table of results is shown: as text with units for a terminal or the report (errors in %,
params in M, FLOPs in G), with the statistics' methods and notes as footnotes, or as exact CSV or
JSON."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from ..record import METRICS, Metric


def natural_order(value: Any) -> tuple:
    """A sort key: numbers by value, before names (8 before 14, which as text come the other
    way)."""
    return (0, float(value), "") if isinstance(value, (int, float, np.number)) \
        else (1, 0.0, str(value))


def _percent(value: Any) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.2f}%"


def _number(value: Any) -> str:
    if pd.isna(value):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def display_frame(frame: pd.DataFrame, *, max_text: int | None = 60) -> pd.DataFrame:
    """A copy as text with units: errors and accuracies in %, params in M, FLOPs in G."""
    shown = pd.DataFrame(index=frame.index)
    unit = _difference_unit(frame)
    for column in frame.columns:
        values = frame[column]
        name = column
        numeric = pd.api.types.is_numeric_dtype(values)
        if numeric and column.startswith("diff_") and unit is not None:
            label, show = unit
            name, text = f"{column} ({label})", values.map(lambda v: "-" if pd.isna(v) else show(v))
        elif numeric and ("error" in column or "accuracy" in column
                          or column.startswith("diff_")):
            text = values.map(_percent)
        elif column in METRICS:
            metric = METRICS[column]
            name, text = metric.label, values.map(lambda v: "-" if pd.isna(v) else metric.show(v))
        elif numeric and (metric := _statistic_of(column)) is not None:
            # flops_mean, wall_seconds_baseline, ...: in the metric's unit, named in the header.
            name = f"{column} ({metric.label})"
            text = values.map(lambda v, m=metric: "-" if pd.isna(v) else m.show(v))
        elif column in ("p_value", "p_holm"):
            text = values.map(lambda v: "-" if pd.isna(v) else f"{v:.3g}")
        else:
            text = values.map(_number).map(
                lambda s: s if max_text is None or len(s) <= max_text else s[: max_text - 3] + "...")
        shown[name] = text.astype(object).to_numpy()
    return shown


# The columns summary, compare and pareto make of a metric: its name and one of these.
_STATISTICS = ("_mean", "_std", "_ci95_low", "_ci95_high", "_baseline", "_level")


def _statistic_of(column: str) -> Metric | None:
    """The metric a statistic's column is of (`flops_mean` is of flops), or None."""
    for suffix in _STATISTICS:
        if column.endswith(suffix) and column[:-len(suffix)] in METRICS:
            return METRICS[column[:-len(suffix)]]
    return None


def _difference_unit(frame: pd.DataFrame) -> tuple[str, Any] | None:
    """The label and format of compare's and effects' differences where their metric is not a
    rate (wall seconds, FLOPs); None where they are rates, shown in %."""
    metrics = set(frame["metric"]) if "metric" in frame.columns else set()
    if len(metrics) != 1:
        return None
    metric = metrics.pop()
    if "error" in metric or "accuracy" in metric:
        return None
    if metric in METRICS:
        return METRICS[metric].label, METRICS[metric].show
    return "value", _number


# Columns a terminal table leaves to `footnotes`: sentences do not fit a column.
FOOTNOTE_COLUMNS = ("method", "note")


def format_table(frame: pd.DataFrame) -> str:
    """Aligned for a terminal, with units: % error, M params, GFLOPs; the method and notes of
    statistics are `footnotes`, not columns."""
    if frame.empty:
        return "(no rows)"
    shown = frame.drop(columns=[c for c in FOOTNOTE_COLUMNS if c in frame.columns])
    return display_frame(shown).to_string(index=False)


def footnotes(frame: pd.DataFrame) -> list[str]:
    """The lines that go with a table of statistics: how its intervals were made (each method
    once) and each row's note, the row named by its leading columns."""
    lines = [f"method: {m}" for m in frame.attrs.get("methods", [])]
    lines += [f"note: {line}" for line in frame.attrs.get("notes", [])]
    if "note" not in frame.columns:
        return lines
    columns = list(frame.columns)
    # The row's own columns come first: summary's `by`, compare's factor, baseline and others.
    first_value = next(i for i, c in enumerate(columns)
                       if c in ("arch_name", "n", "n_pairs", "seeds"))
    keys = columns[: max(first_value, 1)]
    shared = _shared_note(list(frame["note"]))
    if shared:  # once, not on every row ("few seeds (n=2)" where all have two)
        lines.append(f"note (every row): {shared}")
    for _, row in frame[frame["note"] != ""].iterrows():
        text = row["note"].removeprefix(shared).removeprefix("; ") if shared else row["note"]
        if text:
            name = ", ".join(f"{k}={_number(row[k])}" for k in keys)
            lines.append(f"note: {name}: {text}")
    return lines


def _shared_note(notes: list[str]) -> str:
    """The first part of the notes (up to its "; ") where every row of two or more starts with
    it, else ""."""
    first = notes[0].split("; ")[0] if notes else ""
    if len(notes) < 2 or not first:
        return ""
    starts = all(n == first or n.startswith(first + "; ") for n in notes)
    return first if starts else ""


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


def write_frame(frame: pd.DataFrame, fmt: str = "table") -> str:
    """`frame` as text: "table" (aligned, with units), "csv" or "json" (exact values)."""
    if fmt == "table":
        return format_table(frame)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":  # json.dumps writes floats with repr: they read back bit for bit
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        return json.dumps(records, indent=1, default=_json_value)
    raise ValueError(f"unknown format {fmt!r}; valid: table, csv, json")


__all__ = ["FOOTNOTE_COLUMNS", "display_frame", "footnotes", "format_table", "natural_order",
           "write_frame"]

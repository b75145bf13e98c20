"""A study's report: one static, self-contained HTML page (tables, comparisons, plots as base64 PNG).

    from resnet_ablate import results
    from resnet_ablate.results import report
    report.write_report(results.load("quickstart"), "report.html")

Nothing is fetched when the page is opened: styles are inline and the plots are data: URIs.
A section that cannot be drawn yet (no kept weights for Fig. 7, a study still running) says why
instead of failing the whole page.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd

from ..record import VIEW_METRICS
from ..spec import adaptive_rule
from ..storage import refuse_to_lose_results
from .answer import ALPHA, answer
from .contrasts import LOOKED
from .display import FOOTNOTE_COLUMNS, display_frame, footnotes
from .store_reading import scalar_value
from .study_results import Results, ResultsError

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1em; max-width: 90em; color: #222; }
p, ul, h1, h2, h3 { max-width: 70em; }
.wide { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.45em; text-align: right; }
.wide td { white-space: nowrap; }  /* a number is never cut across lines */
.wide.prose td:last-child, .wide.prose th:last-child {
  white-space: normal; min-width: 24em; text-align: left;
}
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #777; font-style: italic; }
"""


def _table(frame: pd.DataFrame, *, prose_last: bool = False) -> str:
    """A table that scrolls sideways inside the page rather than widening it; methods and notes
    go under it (`_footnotes`). `prose_last`: its last column is sentences, wrapped within the
    page (an adaptive verdict's reason, longer than a terminal's cut) where numbers never are."""
    frame = frame.drop(columns=[c for c in FOOTNOTE_COLUMNS if c in frame.columns])
    with pd.option_context("display.max_colwidth", None):
        html = display_frame(frame, max_text=None).to_html(index=False, border=0, escape=True)
    return f'<div class="wide{" prose" if prose_last else ""}">{html}</div>'


def _setup(results: Results) -> str:
    """What the trials ran on: data set, training recipe, devices and library versions."""
    dataset = results.spec.get("dataset") or "digits"
    recipe = results.spec.get("train") or {}
    done = results.completed()
    first = results.attrs.get(int(done["number"].iloc[0]), {}) if len(done) else {}
    recipe_text = ", ".join(f"{k}: {v}" for k, v in (first.get("recipe") or recipe).items())
    versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
    # Resumed across toolkit versions: how many trials each trained, in the order they ran.
    trained_by = Counter(done.sort_values("number")["version"].dropna())
    if len(trained_by) > 1:
        versions += "; completed trials by toolkit version: " + ", ".join(
            f"{version} {count}" for version, count in trained_by.items())
    devices = ", ".join(sorted(str(d) for d in done["device"].dropna().unique())) or "-"
    rows = [("Data set", dataset), ("Training recipe", recipe_text or "the defaults"),
            ("Devices", devices), ("Libraries", versions or "-")]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>"
                    f"{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def summary_with_training_error(results: Results) -> pd.DataFrame:
    """The summary over seeds with the mean training error beside the test error: the paper's
    degradation problem shows in training error."""
    table = results.summary()
    try:
        training = results.summary(metric="train_error")
    except ResultsError:  # no trial recorded one (an older store): the column stays empty
        training = None
    column = pd.Series(float("nan"), index=table.index)
    if training is not None:  # by configuration: one may lack the training error, or the test
        keys = [c for c in results.configuration_columns() if c in table.columns]
        found = {_key(row[:-1]): row[-1]
                 for row in training[[*keys, "train_error_mean"]].itertuples(index=False)}
        column = pd.Series([found.get(_key(row), float("nan"))
                            for row in table[keys].itertuples(index=False)], index=table.index)
    table.insert(table.columns.get_loc("test_error_mean"), "train_error_mean", column)
    return table


def _key(values: tuple) -> tuple:
    """A configuration as a key: a factor a configuration lacks (NaN) matches across tables."""
    return tuple(None if pd.isna(v) else v for v in values)


def _plot(results: Results, kind: str, alt: str) -> str:
    # Here, not at the top: `run` prints the summary table above as a study ends, and matplotlib
    # is a third of a second of that wait.
    from . import plots

    try:
        data = plots.png_bytes(plots.plot(results, kind))
    except ResultsError as error:
        return f'<p class="note">{html.escape(str(error))}</p>'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _footnotes(table: pd.DataFrame) -> str:
    """How a table's intervals were made and each row's note, under the table."""
    lines = footnotes(table)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f'<ul class="note">{items}</ul>'


def comparisons(results: Results) -> list[tuple[str, object, pd.DataFrame]]:
    """(factor, baseline, table) for every swept factor with two or more completed levels; the
    baseline is the level listed first in the spec (shortcut: "A" where present)."""
    from .effects import factor_levels

    found = []
    for factor, levels in factor_levels(results).items():
        try:
            found.append((factor, levels[0], results.compare(factor, levels[0])))
        except ResultsError:
            continue  # no pairs yet
    return found


def _effects(results: Results) -> str:
    """Main effects and two-factor interactions of every factor, and fANOVA's importance."""
    from .effects import effects, importance

    parts = ["<h2>Effects of each factor</h2>"]
    try:
        table = effects(results)
    except ResultsError as error:
        return "\n".join([*parts, f'<p class="note">{html.escape(str(error))}</p>'])
    parts.append("<p>Main effects: each level against the factor's baseline, averaged over the "
                 "configurations of the other factors (the comparisons' stratified rows). "
                 "Interactions: how much one factor's effect changes when the other leaves its "
                 "baseline, the difference of differences [y(l, g) - y(b, g)] - [y(l, g0) - "
                 "y(b, g0)], paired by seed and by test image, stratified over the remaining "
                 "factors; zero when the two effects add. Test error; 95% intervals and the "
                 "two-sided p-value of no effect.</p>")
    parts += [_table(table), _footnotes(table)]
    try:
        shares = importance(results)
    except ResultsError as error:  # e.g. every trial scored alike: no variance to share
        return "\n".join([*parts, f'<p class="note">{html.escape(str(error))}</p>'])
    parts.append("<p>A second view: each factor's share of the part of the test error's "
                 "variance over the trials that the factors explain (Optuna's fANOVA); how large "
                 "that part is, the note below says.</p>")
    parts += [_table(shares), _footnotes(shares)]
    return "\n".join(parts)


def render_report(results: Results, *, responses: bool = True) -> str:
    """The report page as an HTML string: one section after another, each from its own function."""
    parts = [*_header(results), _setup(results)]
    try:
        summary = _summary(results)
    except ResultsError as error:  # no completed trial: what there is, and why trials failed
        parts += ["<h2>Summary over seeds</h2>", f'<p class="note">{html.escape(str(error))}</p>',
                  _trials(results), "</body></html>"]
        return "\n".join(parts)
    found = comparisons(results)
    parts += [*_answers(results, found), "<h2>Summary over seeds</h2>", *summary]
    parts += _views(results)
    parts += _comparisons(found)
    parts.append(_effects(results))
    parts += _seed_decisions(results)
    parts += _pareto(results)
    parts += _figures(results, responses=responses)
    parts += [_trials(results), "</body></html>"]
    return "\n".join(parts)


def _header(results: Results) -> list[str]:
    """The page's head, title, question and one line on the store and its trials."""
    title = f"resnet-ablate: {results.title}"
    counts = ", ".join(f"{n} {state}" for state, n in results.state_counts().items()) or "no trials"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if results.question:
        parts.append(f"<p><b>Question:</b> {html.escape(results.question)}</p>")
    parts.append(f"<p>Storage <code>{html.escape(results.storage)}</code>; trials: "
                 f"{html.escape(counts)}; swept: {html.escape(', '.join(results.swept) or '-')}.</p>")
    if results.selection:
        parts.append(f'<p class="note">Only the trials selected by <code>--where '
                     f'{html.escape(results.selection)}</code>: {len(results.trials)} of the '
                     f"study's {len(results.all_trials())}. Every table, comparison and figure "
                     "below is over them alone.</p>")
    if "RUNNING" in results.state_counts():
        parts.append('<p class="note">Trials are recorded as running: the study is still '
                     "running, and these results are partial (or its driver was killed, and its "
                     "next run marks them).</p>")
    return parts


def _without_names(frame: pd.DataFrame, results: Results) -> pd.DataFrame:
    """A table over configurations without their architecture names where its swept columns tell
    them apart: a name such as resnet29-cifar-bottleneck-B-bw16-v1 pushed the cost columns out
    of a 1280-pixel window (the trials table keeps them)."""
    if "arch_name" in frame.columns and any(c in frame.columns for c in results.swept):
        return frame.drop(columns=["arch_name"])
    return frame


def _summary(results: Results) -> list[str]:
    """The summary table over seeds; raises ResultsError while no trial has completed."""
    summary = summary_with_training_error(results)
    return [_table(_without_names(summary, results)), _footnotes(summary)]


def _views(results: Results) -> list[str]:
    """The summary over seeds of each other evaluation the trials recorded (10-crop and
    multi-scale testing, the paper's protocol for its ImageNet tables): their headline figures,
    which the centre-crop tables above are not."""
    done = results.completed()
    recorded = [m for m in VIEW_METRICS if m in done.columns and done[m].notna().any()]
    parts = []
    for metric in recorded:
        table = results.summary(metric=metric)
        parts += [f"<h3>{html.escape(metric)}</h3>", _table(_without_names(table, results)),
                  _footnotes(table)]
    if parts:
        parts.insert(0, "<h2>The paper's test protocol: other views of the test set</h2>")
    return parts


def _answers(results: Results, found: list[tuple[str, object, pd.DataFrame]]) -> list[str]:
    """The answer first (answer.py): each level against its factor's baseline, a line each,
    with its interval, the answer's own Holm p-value, its word, and what its comparison notes."""
    lines = answer(results, found)
    if not lines:
        return []
    items = []
    for line in lines:
        if line.has_interval:
            numbers = (f"95% interval {100 * line.low:+.2f} to {100 * line.high:+.2f}"
                       + (f", Holm p = {line.p_holm:.3g}" if math.isfinite(line.p_holm) else ""))
        else:
            numbers = "no interval"
        pairs = f"{line.n_pairs} paired seed{'s' if line.n_pairs != 1 else ''}"
        where = f", {line.where}" if line.where else ""
        shown = line.note.replace(LOOKED, "").strip("; ")
        note = f' <span class="note">({html.escape(shown)})</span>' if shown else ""
        items.append(
            f"<li><b>{html.escape(line.factor)}={html.escape(str(line.level))}</b> against "
            f"{html.escape(str(line.baseline))}: test error {100 * line.diff:+.2f} points "
            f"({numbers}; {pairs}){html.escape(where)}: <b>{html.escape(line.verdict)}</b>"
            f"{note}</li>")
    tested = sum(math.isfinite(line.p_holm) for line in lines)
    intro = ("Each level against its factor's baseline, paired by seed and test image (the "
             "comparisons' method, below), with its own 95% interval.")
    if tested:
        intro += (f" The word is \"a difference\" where Holm's adjustment over the answer's "
                  f"{tested} tested line{'s' if tested != 1 else ''} puts the p-value below "
                  f"{ALPHA:.0%}, so that an answer of many lines is not wrong somewhere by chance "
                  "more often than that.")
    if any(line.verdict.startswith("the adaptive rule") for line in lines):
        intro += " The question the study's seed rule decided takes that rule's verdict."
    return ["<h2>The answer</h2>", f"<p>{intro}</p>",
            f"<ul>{''.join(items)}</ul>"]


def _comparisons(found: list[tuple[str, object, pd.DataFrame]]) -> list[str]:
    """Every swept factor's levels against its baseline, paired by seed and test image."""
    parts = ["<h2>Paired comparisons</h2>"]
    if not found:
        parts.append('<p class="note">no factor has two levels with paired completed trials</p>')
    for factor, baseline, table in found:
        parts.append(f"<h3>{html.escape(factor)} against {html.escape(str(baseline))}</h3>")
        parts.append("<p>Difference of test error, level minus baseline, paired by seed and by "
                     "test image; its 95% interval and the two-sided p-value of no difference "
                     "(the 'all' row is stratified: the mean of the configurations' "
                     "differences, seed by seed and image by image over the seeds all of them "
                     "have).</p>")
        parts.append(_table(table))
        parts.append(_footnotes(table))
    return parts


def _seed_decisions(results: Results) -> list[str]:
    """Why each configuration stopped adding seeds; nothing for a study with fixed seeds."""
    decisions = results.seed_decisions()
    if not len(decisions):
        return []
    rule = results.seed_rule
    space = results.spec.get("space") or {}
    adaptive = adaptive_rule(rule, space)
    decided = adaptive.decided
    # Every configuration but the baseline level's is one comparison (with the baseline's).
    comparisons = 0 if decided is None else int(
        (decisions[decided].astype(str) != str(scalar_value(space[decided][0]))).sum())
    family = ""
    if comparisons >= 2 and adaptive.family > 1:
        family = (f" Its {comparisons} comparisons share a 5% chance of any wrong verdict "
                  "(familywise: Bonferroni over the study's comparisons).")
    elif comparisons >= 2:
        family = (f" Each of its {comparisons} comparisons keeps its own chance of a wrong "
                  "\"differs\" at 5%; that some one of them is wrong is more likely, up to "
                  f"{min(comparisons * 5, 100)}% (Bonferroni).")
    return ["<h2>Adaptive seeds: why each configuration stopped</h2>",
            f"<p>The rule <code>seeds: {html.escape(json.dumps(rule))}</code>: seeds "
            f"were added to a configuration only while its question stayed open.{family}</p>",
            _table(decisions, prose_last=True), _footnotes(decisions)]


def _pareto(results: Results) -> list[str]:
    """The configurations' front of test error against FLOPs, as a table and a plot."""
    front = results.pareto(["test_error", "flops"])
    return ["<h2>Pareto front: test error against FLOPs</h2>",
            "<p>Over configurations: each one's mean over its seeds, with 95% intervals; "
            "a point on the front is not shown better than one off it unless their "
            "intervals say so.</p>",
            _table(_without_names(front, results)), _footnotes(front),
            _plot(results, "pareto", "test error against FLOPs")]


def _figures(results: Results, *, responses: bool) -> list[str]:
    """Training curves, error against depth (when depth varies) and layer responses."""
    parts = ["<h2>Training curves (Fig. 6)</h2>", _plot(results, "curves", "training curves")]
    if results.completed()["depth"].nunique() > 1:
        parts.append("<h2>Error against depth</h2>")
        parts.append(_plot(results, "depth", "test error against depth"))
    if responses:
        parts.append("<h2>Layer responses (Fig. 7)</h2>")
        parts.append("<p>Std of each 3x3 layer's BN output (before the add and ReLU) on the "
                     "evaluation images, mean over seeds.</p>")
        parts.append(_plot(results, "responses", "layer responses"))
    return parts


def _trials(results: Results) -> str:
    """Every trial with its state, and the reason for each failed or pruned one; how many seeds
    each trained beside where some were stacked (their wall_seconds are shares of one run's)."""
    stacked = (results.trials["stacked_seeds"].fillna(1) > 1).any()
    columns = ["number", "state", *results.swept, "seed", "params", "flops", "test_error",
               "train_error", "epochs", "wall_seconds", *(["stacked_seeds"] if stacked else []),
               "failure"]
    return "<h2>Trials</h2>\n" + _table(results.trials[list(dict.fromkeys(columns))])


def write_report(results: Results, path: str | Path, *, responses: bool = True) -> Path:
    """Write the report page to `path`; returns the path."""
    path = Path(path)
    refuse_to_lose_results(path)  # a store, saved weights, a study's own folder
    if path.suffix.lower() not in (".html", ".htm"):
        raise ResultsError(f"cannot write the report as {path.name!r}: it is an HTML page, so "
                           "the file name must end in .html (or .htm)")
    text = render_report(results, responses=responses)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["comparisons", "render_report", "summary_with_training_error", "write_report"]

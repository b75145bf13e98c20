"""The calibration of resnet_ablate.stats' generalized pivot, made and checked under its model.

The variance of a configuration's mean error is a seeds' part, estimated with n - 1 degrees of
freedom, plus a test-image part known almost exactly (stats' module docstring). A generalized
pivot for such a sum over-covers at few degrees of freedom (up to ~99% for a 95% interval at
n = 2) wherever both parts count. Coverage under the model depends only on the degrees of freedom
and the seeds' true share of the variance, and on the seed x image residual's share of the
seeds' part (stats takes the seeds' mean square no lower than the residual allows, and at two
seeds, or where that floor binds, no draw of it); this script computes it exactly enough (quadrature over the seeds'
chi-square, the pivot's own mixture-of-normals quantiles) for

    python benchmarks/calibrate_pivot.py            # coverage, uncalibrated and as calibrated
    python benchmarks/calibrate_pivot.py --fit      # refit pivot.PIVOT_CALIBRATION (minutes per df)

and writes the curves to benchmarks/results/pivot_calibration.csv and .png. The calibration is
the pivot's level as a piecewise-linear function of the seeds' share the table shows and of the
residual's share of theirs it shows, at fixed knots, fitted (Nelder-Mead) to minimise the largest
|coverage - 95.5%| over a grid of true shares, from three seeds on (two seeds keep the pivot as it
is: the comment on pivot.PIVOT_CALIBRATION says why); the figure shows as a band how the coverage
moves with the residual's true share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks._results import RESULTS, append_rows, run_context  # noqa: E402
from resnet_ablate.stats import pivot  # noqa: E402

DRAWS = 128  # chi-square cells of the pivot (stats uses 1024; 128 is within 0.1 point here)
QUADRATURE = 48  # cells of the seeds' observed mean square
# Half a point above 95%: the model's Bernoulli form (tests/test_stats.py) departs from the normal
# theory the curves assume by about a point either way; the margin keeps it on the safe side.
TARGET = 0.955
SHARES = (0.02, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.87, 0.95, 0.99)
# The residual's true share of the seeds' part: the calibration's second step is fitted over
# them, and the figure shows the coverage over them as a band. Small shares too: there a table
# whose seeds happen to agree shows a large one (at 3 seeds a fit without 0.05 and 0.1 narrowed
# such tables until the paired test rejected 6.4% of null comparisons where seeds vary much).
RESIDUAL_SHARES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
DEGREES_OF_FREEDOM = tuple(range(1, 10))
# A committed row without a residual that covers within this of TARGET is kept by --fit rather
# than fitted again: fits of equal worst case differ in power (a refit of 3 seeds' row, as good
# under the model, found a 2-point difference where seeds dominate in 7.3% of studies where the
# committed row finds it in 8.9%: a statistician's audit of 0.4.0), and a fit from the starts
# below does not reproduce the committed rows, made by an earlier version of this script.
KEEP_WITHIN = 0.005


def _half_width(seed_estimate: float, seed_df: int, alpha: float, chi2: np.ndarray,
                draw_floor: float = 0.0) -> float:
    """The pivot's half-width with the test-image part 1, the seeds' estimate given and their
    draws floored at `draw_floor` (pivot.seed_draw_floor): stats' own solver on these draws."""
    variances = np.maximum(seed_estimate * seed_df / chi2, draw_floor) + 1.0
    return pivot.Pivot(variances).half_width(alpha)


Levels = tuple[tuple[float, ...], ...]  # pivot.PIVOT_CALIBRATION's: a row per residual knot


def coverage(share: float, seed_df: int, levels: Levels | None,
             residual_share: float = 0.0) -> float:
    """Coverage of the 95% interval when the seeds' true share of the variance is `share` and
    the residual's true share of the seeds' part `residual_share` (what stats takes the seeds'
    mean square no lower than, in proportion): `levels` the calibration at
    pivot.RESIDUAL_KNOTS x pivot.CALIBRATION_KNOTS (None: uncalibrated)."""
    chi2 = scipy_stats.chi2.ppf((np.arange(DRAWS) + 0.5) / DRAWS, seed_df)
    seeds = share / (1 - share)  # the test-image part is 1
    observed = seeds * scipy_stats.chi2.ppf((np.arange(QUADRATURE) + 0.5) / QUADRATURE,
                                            seed_df) / seed_df
    residual = residual_share * seeds
    least = residual * pivot.least_plausible_ratio(seed_df)
    covered = []
    for seen in observed:
        estimate = max(seen, least)
        floor = pivot.seed_draw_floor(residual, seed_df, seen < least)
        level = 0.95 if levels is None else pivot.calibrated_level(
            levels, estimate / (estimate + 1),
            pivot.residual_share_shown(residual, estimate, floor > 0))
        half = _half_width(estimate, seed_df, 1 - level, chi2, floor)
        covered.append(2 * scipy_stats.norm.cdf(half / np.sqrt(seeds + 1)) - 1)
    return float(np.mean(covered))


def _minimax(worst, start: np.ndarray) -> np.ndarray:
    """Nelder-Mead from `start`, its simplex a step of 0.02 down each level."""
    simplex = np.vstack([start] + [start - 0.02 * np.eye(len(start))[i]
                                   for i in range(len(start))])
    result = optimize.minimize(worst, start, method="Nelder-Mead",
                               options={"maxfev": 170 * len(start) // 6, "xatol": 1e-4,
                                        "fatol": 1e-5, "initial_simplex": simplex})
    return np.round(result.x, 4)


def _out_of_range(levels: np.ndarray) -> bool:
    return bool(np.any(levels < 0.6) or np.any(levels > 0.97))


def fit(seed_df: int) -> Levels | None:
    """The levels, in two steps (pivot.PIVOT_CALIBRATION's comment); None where neither beats
    the pivot as it is.

    Without a residual: the committed row where it holds (KEEP_WITHIN); else the levels at the
    share knots minimising the largest |coverage - TARGET| over SHARES, from a start narrowed in
    the middle (as few seeds need); where that fit does no better than the pivot as it is (a flat
    95%), the fit from the flat start (at 9 and 10 seeds the first one strayed below 95%). (Fits of
    equal worst case can differ in power: from the flat start, 3 seeds' interaction test found a
    large interaction in 71% of studies, not 81%; so the first start is kept wherever it does its
    job.) With one: the rows at the other residual knots, from the first row repeated, over SHARES
    and RESIDUAL_SHARES, none above the first."""
    knots = len(pivot.CALIBRATION_KNOTS)

    def worst_alone(row: np.ndarray) -> float:
        if _out_of_range(row):
            return 1.0
        levels = (tuple(row),) * len(pivot.RESIDUAL_KNOTS)  # a table without a residual reads one
        return max(abs(coverage(s, seed_df, levels) - TARGET) for s in SHARES)

    uncalibrated = np.full(knots, 0.95)
    bound, first = worst_alone(uncalibrated), None
    committed = pivot.PIVOT_CALIBRATION.get(seed_df)
    if committed is not None and worst_alone(np.array(committed[0])) <= KEEP_WITHIN:
        first = np.array(committed[0])  # it holds: kept (see KEEP_WITHIN)
    starts = () if first is not None else (
        np.array([0.95, 0.92, 0.92, 0.93, 0.94, 0.95] if seed_df < 3
                 else [0.95, 0.93, 0.93, 0.94, 0.945, 0.95]), uncalibrated)
    for start in starts:
        row = _minimax(worst_alone, start)
        if worst_alone(row) < bound:
            first = row
            break
    if first is None:
        return None

    def worst(rows: np.ndarray) -> float:
        levels = np.vstack([first, rows.reshape(-1, knots)])
        # No level above the first row's: the residual's share only narrows the interval, so
        # that no p-value rises (fitted freely, the rows rose at intermediate shares and cost
        # the paired test power where seeds dominate: 6.2% -> 5.5% at 3 seeds).
        if _out_of_range(levels) or np.any(levels[1:] > first):
            return 1.0
        table = tuple(tuple(r) for r in levels)
        return max(abs(coverage(s, seed_df, table, r) - TARGET)
                   for s in SHARES for r in RESIDUAL_SHARES if r > 0)

    others = _minimax(worst, np.tile(first, len(pivot.RESIDUAL_KNOTS) - 1))
    return tuple(tuple(float(v) for v in row)
                 for row in np.vstack([first, others.reshape(-1, knots)]))


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "coverage_uncalibrated", "uncalibrated pivot"),
                           (axes[1], "coverage_calibrated",
                            "calibrated from 3 seeds on")):
        for seed_df in sorted({r["seed_df"] for r in rows}):
            mine = [r for r in rows if r["seed_df"] == seed_df]
            shares = sorted({r["true_seed_share"] for r in mine})
            by_share = [[100 * r[key] for r in mine if r["true_seed_share"] == s] for s in shares]
            without = [100 * r[key] for r in mine if r["true_residual_share"] == 0]
            line, = ax.plot(shares, without, marker="o", ms=3, label=f"n = {seed_df + 1} seeds")
            ax.fill_between(shares, [min(c) for c in by_share], [max(c) for c in by_share],
                            color=line.get_color(), alpha=0.15, lw=0)
        ax.axhspan(94, 96, color="0.9", zorder=0)
        ax.axhline(95, color="0.4", lw=0.8)
        ax.set_title(f"95% interval, {title}")
        ax.set_xlabel("seeds' true share of the variance of the mean")
    axes[0].set_ylabel("coverage under the model (%): line without a\n"
                       "residual, band over the residual's share")
    axes[1].legend(fontsize=8, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit the calibration (slow)")
    parser.add_argument("--df", type=int, nargs="*", default=list(DEGREES_OF_FREEDOM),
                        help="seed degrees of freedom (n - 1) to compute")
    args = parser.parse_args()
    rows = []
    for seed_df in args.df:
        levels = pivot.PIVOT_CALIBRATION.get(seed_df)
        if args.fit and seed_df > 1:  # two seeds stay uncalibrated: see pivot.PIVOT_CALIBRATION
            levels = fit(seed_df)
            print(f"    {seed_df}: None,  # the pivot as it is" if levels is None else
                  f"    {seed_df}: (" + "".join(f"\n        {row}," for row in levels) + "\n    ),",
                  flush=True)
        for share in SHARES:
            for residual_share in RESIDUAL_SHARES:
                before = coverage(share, seed_df, None, residual_share)
                after = coverage(share, seed_df, levels, residual_share)
                rows.append({**run_context(torch.device("cpu")), "seed_df": seed_df,
                             "true_seed_share": share, "true_residual_share": residual_share,
                             "coverage_uncalibrated": round(before, 4),
                             "coverage_calibrated": round(after, 4)})
                print(f"df {seed_df}  share {share:4.2f}  residual {residual_share:4.2f}  coverage "
                      f"{100 * before:5.1f}% -> {100 * after:5.1f}%", flush=True)
    append_rows(RESULTS / "pivot_calibration.csv", rows)
    plot(rows, RESULTS / "pivot_calibration.png")
    print(f"wrote {RESULTS / 'pivot_calibration.csv'} and .png")


if __name__ == "__main__":
    main()

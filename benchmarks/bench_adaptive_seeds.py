"""What adaptive seeds save: seeds spent and error rates against fixed-seed designs, by simulation.

    python benchmarks/bench_adaptive_seeds.py            # 200 replications a cell (a few minutes)
    python benchmarks/bench_adaptive_seeds.py --small    # seconds: checks that the script works

One comparison (a level against its baseline, e.g. shortcut none vs A at one depth) is simulated
many times for several true differences of test error, from the documented model of
resnet_ablate/stats/intervals.py: each test image has a difficulty shared by both configurations
(logistic, sd 1.5), each seed a training effect (logistic sd 0.05: seeds about 0.35 points of error
apart), a baseline error of 8% on 2,000 test images. Each design decides with the toolkit's own code
(`resnet_ablate.stats.adaptive.decide`, margin 1 point):

- adaptive: seeds {min: 2, max: 10, until: {decided, margin: 0.01}}: seeds added up to the next
  look (2, 3, 4, 6, 9, 10) while the comparison is open, intervals at the rule's per-look level;
- fixed N: N seeds for both configurations, one decision at the end at the 95% level.

Per design and true difference: mean seeds per configuration, and how often the answer was
"differs", "within the margin" or still open. Rows go to benchmarks/results/adaptive_seeds.csv.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _results import append_rows, results_csv, source_commit, timestamp  # noqa: E402

from resnet_ablate.stats.adaptive import SeedResult, decide  # noqa: E402
from resnet_ablate.spec import AdaptiveSeeds  # noqa: E402

IMAGES = 2000
BASE_ERROR = 0.08
SEED_SD, IMAGE_SD = 0.05, 1.5  # seeds: about 0.35 points of error apart, as CIFAR nets are
MARGIN = 0.01
LEVELS = {"shortcut": ["A", "none"]}
BASE, OTHER = (("shortcut", "A"),), (("shortcut", "none"),)


def _true_error(offset: float) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float((w * expit(offset + math.hypot(SEED_SD, IMAGE_SD) * x)).sum() / w.sum())


def _offset_for(error: float) -> float:
    low, high = -10.0, 10.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _true_error(middle) < error else (low, middle)
    return (low + high) / 2


def _seed(rng, seed: int, offset: float, difficulty: np.ndarray) -> SeedResult:
    wrong = (rng.random(IMAGES) < expit(offset + rng.normal(0, SEED_SD) + difficulty)).astype(float)
    return SeedResult(seed, float(wrong.mean()), IMAGES, wrong)


def _answer(rule: AdaptiveSeeds, base: list[SeedResult], other: list[SeedResult]) -> str:
    reason = decide(rule, LEVELS, {BASE: base, OTHER: other})[OTHER].reason
    if "differs" in reason:
        return "differs"
    if "within" in reason:
        return "equivalent"
    return "open"


def _adaptive(rng, rule: AdaptiveSeeds, offsets, difficulty) -> tuple[str, int]:
    base = [_seed(rng, s, offsets[0], difficulty) for s in range(rule.min)]
    other = [_seed(rng, s, offsets[1], difficulty) for s in range(rule.min)]
    while True:
        decision = decide(rule, LEVELS, {BASE: base, OTHER: other})[OTHER]
        if not decision.open:
            return _answer(rule, base, other), len(base)
        for seed in range(len(base), rule.next_look(len(base))):
            base.append(_seed(rng, seed, offsets[0], difficulty))
            other.append(_seed(rng, seed, offsets[1], difficulty))


def _fixed(rng, seeds: int, offsets, difficulty) -> tuple[str, int]:
    base = [_seed(rng, s, offsets[0], difficulty) for s in range(seeds)]
    other = [_seed(rng, s, offsets[1], difficulty) for s in range(seeds)]
    # One look at the 95% level: min = max makes the rule's level 1 - 0.05.
    return _answer(AdaptiveSeeds(seeds, seeds, decided="shortcut", margin=MARGIN), base, other), \
        seeds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few replications: the script works")
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/, a scratch folder with --small")
    args = parser.parse_args(argv)
    args.csv = args.csv or results_csv("adaptive_seeds.csv", args.small)
    replications = 4 if args.small else args.replications
    differences = (0.0, 0.03) if args.small else (0.0, 0.005, 0.01, 0.02, 0.04)
    designs = ("adaptive", "fixed 3") if args.small else ("adaptive", "fixed 3", "fixed 5",
                                                           "fixed 10")
    rule = AdaptiveSeeds(2, 10, decided="shortcut", margin=MARGIN)
    base_offset = _offset_for(BASE_ERROR)
    rows = []
    for difference in differences:
        offsets = (base_offset, _offset_for(BASE_ERROR + difference))
        for design in designs:
            rng = np.random.default_rng([int(difference * 1e4), len(design)])
            started = time.perf_counter()
            answers, seeds = [], []
            for _ in range(replications):
                difficulty = rng.normal(0, IMAGE_SD, IMAGES)  # one test set for both
                answer, used = _adaptive(rng, rule, offsets, difficulty) if design == "adaptive" \
                    else _fixed(rng, int(design.split()[1]), offsets, difficulty)
                answers.append(answer)
                seeds.append(used)
            share = {a: answers.count(a) / replications for a in ("differs", "equivalent", "open")}
            rows.append({
                "design": design, "true_difference": difference,
                "seeds_per_configuration": float(np.mean(seeds)), "differs": share["differs"],
                "equivalent": share["equivalent"], "open": share["open"],
                "replications": replications, "test_images": IMAGES, "base_error": BASE_ERROR,
                "margin": MARGIN, "seconds": round(time.perf_counter() - started, 1),
                "commit": source_commit(), "timestamp": timestamp(),
            })
            row = rows[-1]
            print(f"true diff {100 * difference:4.1f} pt  {design:9s}  "
                  f"seeds {row['seeds_per_configuration']:5.2f}"
                  f"  differs {row['differs']:.3f}  within margin {row['equivalent']:.3f}"
                  f"  open {row['open']:.3f}", flush=True)
    append_rows(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()

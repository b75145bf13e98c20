"""The statistics of an ablation's answer, torch-free and store-free: the study driver asks them
which configurations still get seeds (adaptive.py), and results (resnet_ablate.results) put them
beside every number they show.

intervals.py  intervals and tests over seeds and test images (the model and methods documented
              there); its names are this package's
pivot.py      the generalized pivot's draws and calibration behind those intervals
floors.py     the least variance a table of test-image outcomes can claim
multiple.py   Holm's adjustment of a table's p-values
seed_tables.py what the intervals take, checked
apart.py      seeds that stand apart from their configuration's others
adaptive.py   which configurations have an open question, and so get another seed
"""

from .intervals import (
    BINOMIAL_BOUND, CROSSED, FEW_SEEDS, LEVEL, ONE_SEED, SEEDS_ONLY, SIZE_UNKNOWN, TIED_SEEDS,
    TIED_SIZE_UNKNOWN, Estimate, SeedRecordsError, contrast, error_rate, paired_difference,
    seed_mean,
)
from .multiple import holm

__all__ = ["BINOMIAL_BOUND", "CROSSED", "FEW_SEEDS", "LEVEL", "ONE_SEED", "SEEDS_ONLY",
           "SIZE_UNKNOWN", "TIED_SEEDS", "TIED_SIZE_UNKNOWN", "Estimate", "SeedRecordsError",
           "contrast", "error_rate", "holm", "paired_difference", "seed_mean"]

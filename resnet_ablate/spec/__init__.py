"""Study specs: the YAML files under studies/, loaded and validated before anything runs.

A spec is one question from the paper, asked as a sweep over the architecture description:

    study: quickstart                    # the study's name in storage and its files' names:
                                         #   letters, digits, . _ - (storage.py)
    question: Does depth hurt plain nets but not residual ones?
    dataset: digits                      # a name, or its fields (DatasetSpec):
                                         #   name: digits | cifar10 | cifar100 | synthetic
                                         #     | imagefolder | webdataset
                                         #   root: the folder holding it (cifar, imagefolder)
                                         #   download: false (cifar: fetch a missing archive)
                                         #   validation: false (evaluate on a seeded 10% of
                                         #     the training set instead of the test set)
                                         #   split_seed: 0 (that split's seed, the digits'
                                         #     train/test split's and the synthetic data's)
                                         #   synthetic: {num_classes: 4, channels: 1,
                                         #     image_size: 8, train_size: 256, test_size: 128,
                                         #     noise: 1.0} (SyntheticSpec)
                                         #   image_size: 224, augmentation: scale |
                                         #     random_resized_crop, loader_workers: 2
                                         #     (streamed sets: crop side, training crops,
                                         #     decoding processes)
                                         #   val_labels: ILSVRC's flat val/ label file
                                         #     (imagefolder, relative to root)
                                         #   shards: {train: PATTERN, val: PATTERN,
                                         #     num_classes: N, train_size, val_size}
                                         #     (webdataset; sizes needed for URLs)
    model: {family: cifar}               # fixed ResNetArch fields
    space:                               # swept ResNetArch fields: a list of values each
      depth: [8, 20]                     #   (random/tpe also take {low, high, step} for ints)
      shortcut: [A, none]
    sampler: grid                        # grid (the full factorial) | random | tpe
    objectives: [test_error]             # and e.g. flops for a multi-objective study
    seeds: [0, 1]                        # repeats (an int n means seeds 0..n-1), or adaptive:
                                         #   {min: 2, max: 10, until: {width: 0.02}} or
                                         #   {min: 2, max: 10, until: {decided: shortcut,
                                         #   margin: 0.005}} (AdaptiveSeeds)
    train: {epochs: 8}                   # TrainRecipe fields, the recipe's and how it executes:
                                         #   precision, memory_format, compile, cuda_graphs,
                                         #   decode (streamed data: cpu | gpu | auto)
    warmup_from_depth: 110               # warm up (train.warmup) only nets this deep or deeper
    budget: {trials: null, minutes: null, max_gflops: null}
    resources: {cpus: 1, gpus: 0, workers: 2}
                                         # gpus: 8 (or {gpus: 4, nodes: 2}) makes each trial a
                                         #   data-parallel run, a replica per GPU; on CPUs,
                                         #   {cpus: 2, replicas: 2}; stack_seeds: K trains up
                                         #   to K seeds of a grid point as one stacked model
                                         #   in one task, each seed still its own trial
    storage: null                        # any Optuna storage URL; default runs/<study>.db
    pruner: none                         # none | median | successive_halving (one objective)
    max_attempts: 3                      # tries per grid point and seed before giving up
    max_restarts: 2                      # data-parallel trials: lost replicas replaced, resuming
                                         #   from the last epoch's checkpoint, this many times
    checkpoints: null                    # where those checkpoints go: a folder all nodes see, or
                                         #   a URI (s3://...); default runs/<study>.checkpoints

Every problem is reported as one `SpecError` that names the file, the field and what is valid.

The package, read in this order: catalogue.py (the data sets, samplers, pruners and bounds a spec
may name), sections.py (the frozen sections and StudySpec), yaml12.py (reading the file),
parse.py (parse_spec: one function per section), dataset.py, space.py and seeds.py (the larger
sections), checker.py (how a value is refused: one SpecError naming the file and field).
"""

from __future__ import annotations

from .catalogue import (DATASETS, DEFAULT_LOADER_WORKERS, MAX_ADAPTIVE_SEEDS, MAX_CPUS,
                        MAX_SYNTHETIC_BYTES, MAX_SYNTHETIC_IMAGES, MAX_TRIALS, MAX_WORKERS,
                        PRUNERS, SAMPLERS, STREAMED_DATASETS)
from .checker import SpecError
from .parse import load_spec, parse_spec
from .seeds import adaptive_rule
from .sections import (ARCH_FIELDS, AdaptiveSeeds, Budget, DatasetSpec, IntRange, Resources,
                       StudySpec)

__all__ = ["ARCH_FIELDS", "DATASETS", "DEFAULT_LOADER_WORKERS", "MAX_ADAPTIVE_SEEDS", "MAX_CPUS",
           "MAX_SYNTHETIC_BYTES", "MAX_SYNTHETIC_IMAGES", "MAX_TRIALS", "MAX_WORKERS", "PRUNERS",
           "SAMPLERS", "STREAMED_DATASETS", "AdaptiveSeeds", "Budget", "DatasetSpec",
           "IntRange", "Resources", "SpecError", "StudySpec", "adaptive_rule", "load_spec",
           "parse_spec"]

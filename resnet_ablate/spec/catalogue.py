"""What a spec may name and the bounds it is held to: the data sets (resnet_ablate.data loads
them), the samplers and pruners, and limits far above any real study, so that a typo (a billion
trials, a million workers) is an error before anything runs rather than a plan that never ends.
Plain values: the data layer and the driver read them without importing the parser."""

from __future__ import annotations

# The data sets a spec can name; resnet_ablate.data loads them.
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder", "webdataset",
                             "synthetic")
# The data sets read batch by batch from disk or the network, rather than held in memory.
STREAMED_DATASETS: tuple[str, ...] = ("imagefolder", "webdataset")
DEFAULT_LOADER_WORKERS = 2  # image-decoding processes of a streamed data set, per trial
# The training augmentations of a streamed data set (folders.py, shards.py).
STREAMED_AUGMENTATIONS = ("scale", "random_resized_crop")
# The keys of a webdataset's `shards` section, and those it cannot do without.
SHARD_KEYS = ("train", "val", "num_classes", "train_size", "val_size")
REQUIRED_SHARD_KEYS = ("train", "val", "num_classes")

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving")

MAX_TRIALS = 10_000  # grid points x seeds, budget.trials, and values in one range
MAX_WORKERS = 1024  # trials at once, and replicas of one trial
# Seeds stacked into one model: past the adaptive rule's most seeds a stack's memory grows
# with no configuration to fill it.
MAX_STACKED_SEEDS = 32
MAX_CPUS = 1024  # per trial process, and GPUs per trial (per node): above any one machine
MAX_ADAPTIVE_SEEDS = 100
# Synthetic data sets are made in memory: at most this many images, and this many bytes of them.
MAX_SYNTHETIC_IMAGES = 10_000_000
MAX_SYNTHETIC_BYTES = 16 * 2**30
# Each integer field of `dataset.synthetic` (SyntheticSpec) and its range.
SYNTHETIC_INTS = {"num_classes": (2, 100_000), "channels": (1, 64), "image_size": (1, 1024),
                  "train_size": (1, MAX_SYNTHETIC_IMAGES), "test_size": (1, MAX_SYNTHETIC_IMAGES)}

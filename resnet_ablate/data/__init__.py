"""Data sets for the ablation studies, each serving the training loop through one protocol
(`feed.Feed`), whether held in memory or streamed; `load_dataset` is the one entry point.

- ``digits`` (digits.py): scikit-learn's bundled 8x8 handwritten digits, no download; the default.
- ``cifar10`` / ``cifar100`` (cifar.py): the official python archives, with the paper's recipe.
- ``synthetic`` (synthetic.py): small, seeded, learnable random data for tests.
- ``imagefolder`` (folders.py): the ImageNet layout on disk (ILSVRC's flat val/ with its label
  file: val_labels.py; converted by imagenet_layout.py), and ``webdataset`` (shards.py): tar
  shards (shard_format.py), local or behind URLs (shard_urls.py opens them); both streamed,
  each image cropped where crops.py says and decoded by decode.py (the paper's test-time views
  and preprocessing too).
  A missing folder or shard is `DataUnavailable`, a split with no decodable image `NoImages`,
  a shard URL's stated size that a pass over it does not read `SizeMisstated` (errors.py): none
  is worth a retry.

In-memory data sets are `DataBundle`s (bundle.py) of normalised tensors, augmented on the device
in whole batches (augment.py); feed.py places either kind on a run's device.
"""

from .augment import (Augmentation, CropDraws, crop_and_flip, draw_crops, gather_crops,
                      random_crop_flip)
from .bundle import DataBundle
from .cifar import (CIFAR10, CIFAR100, CIFAR_FORMATS, CifarArrays, CifarFormat, download_cifar,
                    read_cifar, read_cifar10, read_cifar100)
from .digits import DIGITS_TEST_FRACTION
from .errors import DataUnavailable, NoImages, SizeMisstated
from .folders import FolderData, load_image_folder
from .load import DatasetShape, Streamed, clear_dataset_cache, dataset_shape, load_dataset
from .shard_format import CorruptShard, ShardError
from .shards import ShardData, load_shards
from .synthetic import SyntheticSpec

__all__ = [
    "Augmentation", "CIFAR10", "CIFAR100", "CIFAR_FORMATS", "CifarArrays", "CifarFormat",
    "CorruptShard", "CropDraws", "DIGITS_TEST_FRACTION", "DataBundle", "DataUnavailable",
    "DatasetShape", "FolderData", "NoImages", "ShardData", "ShardError", "SizeMisstated",
    "Streamed", "SyntheticSpec", "clear_dataset_cache", "crop_and_flip", "dataset_shape",
    "download_cifar", "draw_crops", "gather_crops", "load_dataset", "load_image_folder", "load_shards",
    "random_crop_flip", "read_cifar", "read_cifar10", "read_cifar100",
]

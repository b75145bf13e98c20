"""Training: `train` runs a recipe on a model and a data set and returns a `TrainResult`.

loop.py holds `train` and the epoch loop (seeds.py: `train_seeds`, several seeds stacked into one
model); its parts live apart, each with its checkpoint state:
step.py (optimizer, scaler, compile, CUDA graphs), schedule.py (learning rate, plateau, warm-up),
divergence.py (the divergence watch), evaluate.py (evaluation) and the data set placed for the
run (resnet_ablate/data/feed.py); result.py holds the record a run returns (each epoch's,
`EpochRecord`, is resnet_ablate.record's).
"""

from ..recipe import TrainRecipe
from .divergence import BLOWUP_LOSS_FACTOR, DIVERGED_LOSS_FACTOR, SETTLED_AT_CHANCE
from .evaluate import evaluate
from .loop import train
from .result import NoImages, TrainResult, TrainStatus
from .schedule import WARMUP_WINDOW
from .seeds import train_seeds
from .step import GRAPH_WARMUP_STEPS

__all__ = [
    "BLOWUP_LOSS_FACTOR", "DIVERGED_LOSS_FACTOR", "GRAPH_WARMUP_STEPS", "SETTLED_AT_CHANCE",
    "WARMUP_WINDOW", "NoImages", "TrainRecipe", "TrainResult", "TrainStatus",
    "evaluate", "train", "train_seeds",
]

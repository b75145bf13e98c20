"""Analyses that reload what a study trained: its data set, a trial's model from its kept weights,
and the paper's Fig. 7 (layer responses). They need torch and the model layer; study_results.py,
which reads tables and statistics only, calls them on demand.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..arch import ResNetArch
from ..data import DataBundle, Streamed, load_dataset
from ..data.bundle import pixel_centred
from ..kernels import FusedBatchNorm2d
from ..models import build
from ..recipe import TrainRecipe
from ..record import TrialKey
from ..spec import DatasetSpec
from ..storage import ResultsError

if TYPE_CHECKING:
    from .study_results import Results


def study_dataset(results: Results) -> DataBundle | Streamed:
    """The evaluation data the study's trials were trained and tested on, as they saw it: an
    in-memory set's images with the per-pixel mean subtracted where the recipe did (a streamed
    set's loader subtracts it as it decodes)."""
    section = results.spec.get("dataset", "digits")
    section = {"name": section} if isinstance(section, str) else dict(section or {})
    try:
        data = load_dataset(**DatasetSpec(**section).load_kwargs())
        recipe = TrainRecipe.from_dict(results.spec.get("train") or {}, where="train")
    except (OSError, TypeError, ValueError) as error:
        raise ResultsError(f"cannot load the data set of study {results.study!r} "
                           f"({section}): {error}") from None
    if isinstance(data, DataBundle) and recipe.mean == "pixel":
        return pixel_centred(data)
    return data


def trained_model(results: Results, number: int, *, fused: bool | None = None,
                  data: DataBundle | Streamed | None = None) -> nn.Module:
    """Trial `number`'s trained model from its kept weights, in eval mode. `fused=False`
    rebuilds it from plain BatchNorm2d + ReLU modules (the same state_dict keys)."""
    results.check_numbers([number])
    attrs = results.attrs.get(int(number), {})
    path = results.weights_path(number)
    if path is None or not path.is_file():
        recorded = attrs.get(TrialKey.WEIGHTS)
        where = f"{recorded}, looked in {path}" if path is not None else recorded or "none recorded"
        raise ResultsError(f"trial {number} of study {results.study!r} has no kept weights "
                           f"({where})")
    arch = dict(attrs[TrialKey.ARCH])
    if fused is not None:
        arch["fused"] = fused
    data = data or study_dataset(results)
    model = build(ResNetArch.from_dict(arch), num_classes=data.num_classes,
                  in_channels=data.in_channels)
    _load_weights(model, path, f"trial {number} of study {results.study!r}")
    return model.eval()


def _load_weights(model: nn.Module, path: Path, whose: str) -> None:
    """Load the weights file `path` into `model`, or one ResultsError naming the file: a file
    damaged, cut short, of another network, or holding anything but tensors."""
    try:
        # Tensors only: a weights file never runs code, whatever torch's default.
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a state_dict")
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ResultsError(f"the weights of {whose}, {path}, cannot be loaded (damaged, cut "
                           f"short or of another network): {type(error).__name__}: "
                           f"{first[:200]}") from None


def layer_responses(results: Results, numbers: int | Sequence[int] | None = None, *,
                    max_images: int | None = None, batch_size: int = 256) -> pd.DataFrame:
    """The paper's Fig. 7: for each trained model (default: every completed trial with kept
    weights) and each 3x3 conv layer, the standard deviation of its BatchNorm output, before
    the residual add and the ReLU, over the evaluation images (all elements: images, channels
    and positions). Models are rebuilt unfused, since a fused BN's output is after add + ReLU.
    Rows: number, configuration, seed, layer (1-based, forward order), module, std."""
    if numbers is not None:
        numbers = results.trial_numbers(numbers)
    else:
        done = results.require_completed("analyse")
        numbers = [int(n) for n in done["number"] if _kept(results, int(n))]
        if not numbers:
            raise ResultsError(f"no completed trial of study {results.study!r} has its weights "
                               "file (they are kept unless the run had --no-weights, and "
                               "read from beside the store): no layer responses to analyse")
    data = study_dataset(results)
    if not isinstance(data, DataBundle):
        raise ResultsError(f"layer responses read the evaluation images in memory; study "
                           f"{results.study!r} streams {data.name} from disk")
    images = data.test_x if max_images is None else data.test_x[:max_images]
    info = results.trials.set_index("number")
    keep = list(dict.fromkeys(["arch_name", *results.configuration_columns(), "seed"]))
    rows = []
    for number in numbers:
        model = trained_model(results, number, fused=False, data=data)
        layers = three_by_three_batch_norms(model)
        sums = np.zeros((len(layers), 3))  # count, sum, sum of squares (float64)

        def hook(index: int):
            def record(_module, _inputs, output):
                values = output.detach().double()
                sums[index] += (values.numel(), values.sum().item(), values.square().sum().item())
            return record

        handles = [bn.register_forward_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
        try:
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    model(images[start:start + batch_size])
        finally:
            for handle in handles:
                handle.remove()
        for index, ((name, _), (count, total, squares)) in enumerate(zip(layers, sums), start=1):
            variance = (squares - total * total / count) / (count - 1)
            rows.append({"number": int(number), **info.loc[number, keep].to_dict(),
                         "layer": index, "module": name, "std": math.sqrt(max(variance, 0.0))})
    return pd.DataFrame(rows, columns=["number", *keep, "layer", "module", "std"])


def _kept(results: Results, number: int) -> bool:
    path = results.weights_path(number)
    return path is not None and path.is_file()


def three_by_three_batch_norms(model: nn.Module) -> list[tuple[str, Any]]:
    """(name, BN) for every BatchNorm that directly follows a 3x3 conv (convK -> bnK), in forward
    order: the stem of a CIFAR net, both layers of a basic block, a bottleneck's middle layer."""
    found = []
    for prefix, module in model.named_modules():
        for k in (1, 2, 3):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) \
                    and tuple(conv.kernel_size) == (3, 3):
                if isinstance(bn, FusedBatchNorm2d):
                    raise ValueError(f"{prefix}.bn{k} is fused: its output is after the add and "
                                     "ReLU; rebuild the model with fused=False")
                found.append((f"{prefix}.bn{k}" if prefix else f"bn{k}", bn))
    return found

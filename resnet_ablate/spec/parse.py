"""From a spec's plain values to a StudySpec: each top-level section checked by its own function,
then what the sections must agree on (the sampler and the budget, the data set and the recipe,
the resources and the replicas). Every problem is one SpecError naming the file and the field."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from ..recipe import TrainRecipe
from ..record import OBJECTIVES
from ..storage import study_name_problem
from .catalogue import MAX_TRIALS, PRUNERS, SAMPLERS, STREAMED_DATASETS
from .checker import Checker, SpecError, SpecFieldError
from .dataset import dataset_section, shard_urls
from .seeds import seeds_section
from .sections import ARCH_FIELDS, Budget, DatasetSpec, Resources, StudySpec, values_of
from .space import space_section
from .yaml12 import read_spec_file

TOP_LEVEL_KEYS = (
    "study", "question", "dataset", "model", "space", "sampler", "objectives", "seeds", "train",
    "budget", "resources", "storage", "pruner", "max_attempts", "warmup_from_depth",
    "max_restarts", "checkpoints",
)
REQUIRED_KEYS = ("study", "space")


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study spec file; raises SpecError naming the file and field."""
    return parse_spec(read_spec_file(path), source=str(path))


def parse_spec(raw: Any, *, source: str = "<spec>") -> StudySpec:
    """Validate a spec already parsed into plain values (see resnet_ablate.spec for the format)."""
    check = Checker(source)
    if raw is None or raw == {}:  # an empty file, or one of comments only
        raise check.fail("", "empty; it needs at least study (a name) and space (the fields "
                             "to sweep), as studies/quickstart.yaml has")
    top = check.mapping("", raw, TOP_LEVEL_KEYS)
    for key in REQUIRED_KEYS:
        if key not in top:
            raise check.fail(key, "required key is missing")
    study = top["study"]
    if isinstance(study, (int, float)) and not isinstance(study, bool):  # YAML read `study: 123`
        raise check.fail("study", f"expected a study name (str), got the number {study!r}: "
                                  f"quote it (study: \"{study}\") to name a study so")
    study = check.typed("study", study, str, "a study name (str)")
    problem = study_name_problem(study)
    if problem is not None:
        raise check.fail("study", problem)

    dataset = dataset_section(check, top.get("dataset", "digits"))
    model = dict(check.mapping("model", top.get("model"), ARCH_FIELDS))
    sampler = _choice(check, "sampler", top.get("sampler", "grid"), SAMPLERS, "a sampler")
    space = space_section(check, top["space"], sampler, model)
    objectives = _objectives(check, top.get("objectives", ["test_error"]))
    pruner = _pruner(check, top.get("pruner", "none") or "none", objectives)
    seeds, adaptive = seeds_section(check, top.get("seeds", [0]), space)
    if adaptive is not None and pruner != "none":
        raise check.fail("pruner", "adaptive seeds decide on each seed's final error, and a "
                                   "pruner stops seeds before it: their questions would be "
                                   "decided on the seeds that happened to look good; use "
                                   "pruner: none with adaptive seeds")
    recipe = _recipe(check, top.get("train"))
    budget = _budget(check, top.get("budget"))
    _check_plan(check, sampler, space, seeds, adaptive is not None, budget)
    resources = _resources(check, top.get("resources"), dataset)
    _check_recipe_fits(check, recipe, dataset, resources)
    _check_replicas(check, resources, recipe)
    _check_shards_feed_replicas(check, resources, dataset)
    _check_stacking(check, resources, sampler, recipe, dataset)
    return StudySpec(
        study=study, question=check.typed("question", top.get("question", ""), str,
                                          "a sentence (str)"),
        dataset=dataset, model=model, space=space, sampler=sampler,
        objectives=tuple(objectives), seeds=tuple(seeds), adaptive_seeds=adaptive, train=recipe,
        budget=budget, resources=resources, pruner=pruner,
        storage=_text(check, top, "storage", "an Optuna storage URL (str) or null",
                      empty="give an Optuna storage URL, or null for runs/<study>.db"),
        max_attempts=_count(check, top, "max_attempts", 3, low=1),
        max_restarts=_count(check, top, "max_restarts", 2, low=0),
        checkpoints=_text(check, top, "checkpoints", "a folder every node sees, a URI, or null",
                          empty="give a folder every node sees, a URI, or null for "
                                "runs/<study>.checkpoints"),
        warmup_from_depth=_optional_int(check, top, "warmup_from_depth", "a depth (int) or null"),
        source=source, raw=raw,
    )


def _choice(check: Checker, where: str, value: Any, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise check.fail(where, f"{value!r} is not {what}; valid: {', '.join(valid)}")
    return value


def _objectives(check: Checker, value: Any) -> list[str]:
    """`objectives`: one metric name or a list of distinct ones."""
    objectives = [value] if isinstance(value, str) else value
    check.typed("objectives", objectives, list, "a list of metric names")
    if not objectives:
        raise check.fail("objectives", f"empty; valid metrics: {', '.join(OBJECTIVES)}")
    for i, name in enumerate(objectives):
        check.typed(f"objectives[{i}]", name, str, "a metric name")
        if name not in OBJECTIVES:
            raise check.fail(f"objectives[{i}]", f"{name!r} is not a metric; valid: "
                                                 f"{', '.join(OBJECTIVES)}")
        if name in objectives[:i]:
            raise check.fail(f"objectives[{i}]", f"{name!r} is listed twice; name each metric "
                                                 "once")
    return objectives


def _pruner(check: Checker, value: Any, objectives: list[str]) -> str:
    pruner = _choice(check, "pruner", value, PRUNERS, "a pruner")
    if pruner != "none" and len(objectives) > 1:
        raise check.fail("pruner", "pruning needs a single objective; use pruner: none for "
                                   f"the {len(objectives)} objectives {objectives}")
    return pruner


def _recipe(check: Checker, value: Any) -> TrainRecipe:
    """`train`: TrainRecipe fields (and a preset), checked by the recipe itself."""
    section = check.mapping("train", value,
                            [*(f.name for f in dataclasses.fields(TrainRecipe)), "preset"])
    try:
        return TrainRecipe.from_dict(section, where="train")
    except ValueError as error:
        raise SpecError(f"{check.source}: {error}") from None


def _budget(check: Checker, value: Any) -> Budget:
    try:
        return Budget(**check.mapping("budget", value, _fields(Budget)))
    except SpecFieldError as error:  # Budget's own checks (__post_init__)
        raise check.named(error) from None


def _check_plan(check: Checker, sampler: str, space: Mapping[str, Any], seeds: list[int],
                adaptive: bool, budget: Budget) -> None:
    """The sampler, the seeds and the budget agree on a plan that ends."""
    points = math.prod(len(values_of(c)) for c in space.values())
    if sampler == "grid" and points * len(seeds) > MAX_TRIALS:
        raise check.fail("space", f"the grid's {points} points x {len(seeds)} seed(s) make "
                                  f"{points * len(seeds)} trials; at most {MAX_TRIALS}: sweep "
                                  "fewer values, or use sampler: random or tpe with a budget")
    if adaptive and (sampler != "grid" or budget.trials is not None):
        raise check.fail("seeds", "adaptive seeds need sampler: grid and no budget.trials (they "
                                  "decide how many trials run; budget.minutes still applies)")
    if sampler != "grid" and budget.trials is None and budget.minutes is None:
        raise check.fail("budget", f"the {sampler} sampler needs budget.trials or budget.minutes "
                                   "to know when to stop")


def _resources(check: Checker, value: Any, dataset: DatasetSpec) -> Resources:
    try:
        resources = Resources(**check.mapping("resources", value, _fields(Resources)))
    except SpecFieldError as error:  # Resources' own checks (__post_init__)
        raise check.named(error) from None
    decoding = dataset.decoding_workers
    if decoding and resources.cpus < decoding + 1:
        raise check.fail("resources.cpus", f"{resources.cpus:g} CPUs per trial cannot hold the "
                                           f"{decoding} image-decoding workers "
                                           "(dataset.loader_workers) and a training thread; give "
                                           f"cpus >= {decoding + 1}")
    return resources


def _check_recipe_fits(check: Checker, recipe: TrainRecipe, dataset: DatasetSpec,
                       resources: Resources) -> None:
    """Compile and CUDA graphs need what they capture: an in-memory data set, a GPU, no scaler;
    the paper's ImageNet lighting and test views need a streamed one."""
    if dataset.name in STREAMED_DATASETS and (recipe.compile or recipe.cuda_graphs is True):
        raise check.fail("train.compile" if recipe.compile else "train.cuda_graphs",
                         f"needs an in-memory data set (batches precompiled or captured); "
                         f"{dataset.name} is streamed from disk: set it to false")
    protocol = [name for name, on in (("lighting", recipe.lighting),
                                      ("test_views", recipe.test_views)) if on]
    if protocol and dataset.name not in STREAMED_DATASETS:
        raise check.fail(f"train.{protocol[0]}", f"applies to {' and '.join(STREAMED_DATASETS)} "
                                                 f"(the paper's ImageNet protocol), not to "
                                                 f"{dataset.name}, normalised and augmented in "
                                                 "memory")
    if recipe.decode == "gpu" and dataset.name not in STREAMED_DATASETS:
        raise check.fail("train.decode", f"gpu applies to {' and '.join(STREAMED_DATASETS)} "
                                         f"(images decoded as they stream), not to {dataset.name}, "
                                         "held in memory: set it to cpu")
    if recipe.decode == "gpu" and resources.gpus == 0:
        raise check.fail("train.decode", "gpu needs a GPU per trial: set resources.gpus > 0, or "
                                         "decode: cpu (or auto)")
    if recipe.cuda_graphs is True and recipe.precision == "fp16":
        raise check.fail("train.cuda_graphs", "runs precision bf16 or fp32, not fp16 (its gradient "
                                              "scaler is not captured); set precision: bf16")
    if recipe.cuda_graphs is True and resources.gpus == 0:
        raise check.fail("train.cuda_graphs", "needs a GPU per trial: set resources.gpus > 0, or "
                                              "cuda_graphs: false to train on CPUs")


def _check_replicas(check: Checker, resources: Resources, recipe: TrainRecipe) -> None:
    """A data-parallel trial's recipe (its resources check themselves), each problem named."""
    count = resources.replica_count
    if count == 1:
        if recipe.sync_bn:
            raise check.fail("train.sync_bn", "synchronises BatchNorm across the replicas of a "
                                              "data-parallel trial, and this one has a single "
                                              "process: set resources.gpus >= 2 or "
                                              "resources.replicas >= 2, or sync_bn: false")
        return
    if recipe.batch_size % count:
        raise check.fail("train.batch_size", f"{recipe.batch_size} is the global batch, split "
                                             f"evenly over the {count} replicas: use a multiple "
                                             f"of {count}")
    if recipe.compile or recipe.cuda_graphs is True:
        raise check.fail("train.compile" if recipe.compile else "train.cuda_graphs",
                         f"runs one-process trials; this one has {count} replicas: set it to "
                         "false")


def _check_shards_feed_replicas(check: Checker, resources: Resources,
                                dataset: DatasetSpec) -> None:
    """Each replica of a data-parallel trial reads shards of its own: at least one each."""
    if dataset.shards is None or resources.replica_count == 1:
        return
    shards = len(shard_urls(str(dataset.shards["train"])))
    if shards < resources.replica_count:
        raise check.fail("dataset.shards.train", f"{shards} training shard(s) cannot feed the "
                         f"{resources.replica_count} replicas of each trial: each replica "
                         "reads shards of its own; write at least as many shards as replicas "
                         "(convert-imagenet --shard-size), or fewer replicas")


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _text(check: Checker, top: Mapping[str, Any], key: str, valid: str, *, empty: str
          ) -> str | None:
    """A free-text option, or None; `empty`: what to say of a blank one."""
    value = top.get(key)
    if value is None:
        return None
    check.typed(key, value, str, valid)
    if not value.strip():
        raise check.fail(key, f"empty; {empty}")
    return value


def _count(check: Checker, top: Mapping[str, Any], key: str, default: int, *, low: int) -> int:
    value = check.typed(key, top.get(key, default), int, f"an int >= {low}")
    if value < low:
        raise check.fail(key, f"must be >= {low}, got {value}")
    return value


def _optional_int(check: Checker, top: Mapping[str, Any], key: str, valid: str) -> int | None:
    value = top.get(key)
    return None if value is None else check.typed(key, value, int, valid)


def _check_stacking(check: Checker, resources: Resources, sampler: str,
                    recipe: TrainRecipe, dataset: DatasetSpec) -> None:
    """Seeds stacked into one model (resources.stack_seeds) train as train_seeds can train them:
    a grid point's seeds, in one process, from memory, without a shared gradient scaler or
    compilation."""
    if resources.stack_seeds == 1:
        return
    problem = None
    if sampler != "grid":
        problem = (f"stacks the seeds of a grid point, and the {sampler} sampler gives each "
                   "trial parameters of its own: use sampler: grid")
    elif resources.replica_count > 1:
        problem = (f"trains a stack in one process, and these trials have "
                   f"{resources.replica_count} replicas")
    elif dataset.name in STREAMED_DATASETS:
        problem = (f"trains a stack from memory, and {dataset.name} is streamed from disk (each "
                   "seed would need a loader of its own)")
    elif recipe.precision == "fp16" or recipe.compile:
        problem = ("trains a stack without fp16's gradient scaler (one seed's overflow would "
                   "skip every seed's step) and without compile: use precision bf16 or fp32 "
                   "and compile: false")
    if problem:
        raise check.fail("resources.stack_seeds", f"{problem}; or stack_seeds: 1 (each seed "
                                                  "alone)")

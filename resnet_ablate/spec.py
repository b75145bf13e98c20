"""Study specs: the YAML files under studies/, loaded and validated before anything runs.

A spec is one question from the paper, asked as a sweep over the architecture description:

    study: quickstart                    # the study's name in storage and its files' names:
                                         #   letters, digits, . _ - (storage.py)
    question: Does depth hurt plain nets but not residual ones?
    dataset: digits                      # or {name: cifar10, root: data/, validation: true}
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
                                         #   precision, memory_format, compile, cuda_graphs
    warmup_from_depth: 110               # warm up (train.warmup) only nets this deep or deeper
    budget: {trials: null, minutes: null, max_gflops: null}
    resources: {cpus: 1, gpus: 0, workers: 2}
                                         # gpus: 8 (or {gpus: 4, nodes: 2}) makes each trial a
                                         #   data-parallel run, a replica per GPU; on CPUs,
                                         #   {cpus: 2, replicas: 2}
    storage: null                        # any Optuna storage URL; default runs/<study>.db
    pruner: none                         # none | median | successive_halving (one objective)
    max_attempts: 3                      # tries per grid point and seed before giving up
    max_restarts: 2                      # data-parallel trials: lost replicas replaced, resuming
                                         #   from the last epoch's checkpoint, this many times
    checkpoints: null                    # where those checkpoints go: a folder all nodes see, or
                                         #   a URI (s3://...); default runs/<study>.checkpoints

Every problem is reported as one `SpecError` that names the file, the field and what is valid.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .arch import ArchError, ResNetArch
from .record import OBJECTIVES  # each objective has one sensible direction: specs name metrics
from .recipe import TrainRecipe
from .storage import default_storage, study_name_problem

SAMPLERS = ("grid", "random", "tpe")
# Bounds far above any real study, so that a typo (a billion trials, a million workers) is an
# error here rather than a plan that never ends.
MAX_TRIALS = 10_000  # grid points x seeds, budget.trials, and values in one range
MAX_WORKERS = 1024
MAX_CPUS = 1024  # per trial process, and GPUs per trial (per node): above any one machine
# Synthetic data sets are made in memory: at most this many images, and this many bytes of them.
MAX_SYNTHETIC_IMAGES = 10_000_000
MAX_SYNTHETIC_BYTES = 16 * 2**30
PRUNERS = ("none", "median", "successive_halving")
# The data sets read batch by batch from disk or the network, rather than held in memory.
STREAMED: tuple[str, ...] = ("imagefolder", "webdataset")
DEFAULT_LOADER_WORKERS = 2  # image-decoding processes of a streamed data set, per trial
# The data sets a spec can name; resnet_ablate.data loads them.
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder", "webdataset",
                             "synthetic")
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ResNetArch))
TOP_LEVEL_KEYS = (
    "study", "question", "dataset", "model", "space", "sampler", "objectives", "seeds", "train",
    "budget", "resources", "storage", "pruner", "max_attempts", "warmup_from_depth",
    "max_restarts", "checkpoints",
)
REQUIRED_KEYS = ("study", "space")


def _shown(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class SpecError(ValueError):
    """A study spec that cannot run; the message names the file, the field and what is valid."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "digits"
    root: str | None = None
    validation: bool = False
    download: bool = False
    split_seed: int = 0
    synthetic: Mapping[str, Any] | None = None  # SyntheticSpec fields
    # imagefolder only: crop size, training augmentation ("scale" or "random_resized_crop"), and
    # decoding processes per trial (counted in resources.cpus).
    image_size: int | None = None
    augmentation: str | None = None
    loader_workers: int | None = None
    # webdataset only: {train: PATTERN, val: PATTERN, num_classes: N[, train_size, val_size]}.
    shards: Mapping[str, Any] | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `resnet_ablate.data.load_dataset` (plain values: Ray ships them)."""
        kwargs = {
            "name": self.name, "root": self.root, "validation": self.validation,
            "download": self.download, "seed": self.split_seed,
            "synthetic": dict(self.synthetic) if self.synthetic is not None else None,
        }
        for name in ("image_size", "augmentation", "loader_workers"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.shards is not None:
            kwargs["shards"] = dict(self.shards)
        return kwargs

    @property
    def decoding_workers(self) -> int:
        """CPUs of a trial that decode images rather than train (imagefolder's loader)."""
        if self.name not in STREAMED:
            return 0
        return DEFAULT_LOADER_WORKERS if self.loader_workers is None else self.loader_workers


@dataclass(frozen=True)
class Budget:
    trials: int | None = None  # most trials to run (grid: points x seeds otherwise)
    minutes: float | None = None  # stop launching trials after this much wall time
    max_gflops: float | None = None  # skip architectures above this forward cost


@dataclass(frozen=True)
class Resources:
    """What each trial holds, and how many run at once. A trial of several replicas (two GPUs or
    more, or `replicas` on CPUs) is one data-parallel run (data_parallel.py)."""

    cpus: float = 1  # per trial process (each replica's): its torch threads and loader workers
    gpus: float = 0  # per trial, per node with nodes > 1; fractions pack trials on one GPU
    workers: int = 2  # trials running at once
    nodes: int = 1  # nodes a data-parallel trial spans, `gpus` GPUs on each
    replicas: int | None = None  # CPU data-parallel processes of a trial (GPUs: one per GPU)

    def __post_init__(self) -> None:
        # Here, so that Resources built in Python are held to what a spec's parser checks.
        if not (self.cpus > 0 and self.gpus >= 0 and self.workers >= 1):
            raise ValueError(f"need cpus > 0, gpus >= 0 and workers >= 1, got {self}")

    @property
    def replica_count(self) -> int:
        """The processes that train one trial together (1: an ordinary trial)."""
        if self.gpus >= 1:
            return int(self.gpus) * self.nodes
        return self.replicas or 1


@dataclass(frozen=True)
class AdaptiveSeeds:
    """Seeds spent only where the answer is still open (grid studies): every configuration gets
    seeds 0..min-1; then, each time all of a configuration's seeds have ended, it gets one more
    seed (up to max) while its question is open (adaptive.py decides):

    - `width`: its test error's interval (the summary's method) is wider than this (a rate:
      0.02 is 2 points);
    - `decided` (a swept factor) with `margin`: its comparison with the configuration that has
      the factor's baseline level (the first listed) and the same other factors is neither a
      difference (the interval excludes zero) nor an equivalence (the interval lies within
      +-margin). Both configurations of an open comparison get a seed.

    A configuration is looked at when it has min seeds, then at about 1.5 times as many each
    time (`looks`: 2, 3, 5, 8, 10 for min 2, max 10), the seeds up to the next look added at
    once: fewer looks than one seed at a time, so each decision spends less of the error rate,
    and the added seeds train in parallel. A "differs" decision uses intervals at
    1 - 0.05/looks, a Bonferroni share per look, so that stopping at any look keeps the chance
    of a wrong "differs" at most 5%; "within the margin" is two one-sided tests at the same
    share (the interval at 1 - 2 x 0.05/looks)."""

    min: int
    max: int
    width: float | None = None
    decided: str | None = None
    margin: float = 0.0

    @property
    def looks(self) -> tuple[int, ...]:
        """The seed counts at which a configuration's question is looked at."""
        counts = [self.min]
        while counts[-1] < self.max:
            counts.append(min(self.max, max(counts[-1] + 1, round(counts[-1] * 1.5))))
        return tuple(counts)

    def next_look(self, seeds: int) -> int:
        """How many seeds a configuration with `seeds` of them gets at its next look."""
        return next((n for n in self.looks if n > seeds), self.max)

    @property
    def level(self) -> float:
        """The two-sided level of a "differs" decision's interval."""
        return 1 - 0.05 / len(self.looks)

    @property
    def equivalence_level(self) -> float:
        """The level of the interval whose lying within +-margin is a "within" decision."""
        return 1 - 2 * 0.05 / len(self.looks)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1

    def values(self) -> range:
        return range(self.low, self.high + 1, self.step)


@dataclass(frozen=True)
class StudySpec:
    study: str
    space: Mapping[str, tuple[Any, ...] | IntRange]
    question: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    model: Mapping[str, Any] = field(default_factory=dict)
    sampler: str = "grid"
    objectives: tuple[str, ...] = ("test_error",)
    seeds: tuple[int, ...] = (0,)  # with adaptive seeds: every seed a configuration may get
    adaptive_seeds: AdaptiveSeeds | None = None
    train: TrainRecipe = field(default_factory=TrainRecipe)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    storage: str | None = None
    pruner: str = "none"
    max_attempts: int = 3
    warmup_from_depth: int | None = None
    max_restarts: int = 2
    checkpoints: str | None = None
    source: str = "<spec>"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # parse_spec has said so already, naming the file; this catches a spec built in Python
        # (or changed with dataclasses.replace) before its name becomes a file.
        problem = study_name_problem(self.study)
        if problem is not None:
            raise SpecError(f"{self.source}: study: {problem}")

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    def arch(self, params: Mapping[str, Any]) -> ResNetArch:
        """The architecture of one point of the space."""
        return ResNetArch.from_dict({**self.model, **params})

    def grid(self) -> Iterator[dict[str, Any]]:
        """Every point of the space (the full factorial), in a stable order."""
        names = list(self.space)
        choices = [_values(self.space[name]) for name in names]
        for combination in itertools.product(*choices):
            yield dict(zip(names, combination))

    def recipe_for(self, arch: ResNetArch) -> TrainRecipe:
        """The training recipe of one architecture: warm-up switched on for the deepest ones."""
        if self.warmup_from_depth is not None and (arch.depth or 0) >= self.warmup_from_depth:
            return dataclasses.replace(self.train, warmup=True)
        return self.train

    def storage_url(self, runs_dir: str | os.PathLike[str] | None = None) -> str:
        return self.storage or default_storage(self.study, runs_dir)


def _values(choice: tuple[Any, ...] | IntRange) -> Sequence[Any]:
    return choice.values() if isinstance(choice, IntRange) else choice


class _Checker:
    """Builds one section of a spec, raising SpecError with the file and field on the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> SpecError:
        return SpecError(f"{self.source}: {where or 'the spec'}: {problem}")

    def mapping(self, where: str, value: Any, valid_keys: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__} {_shown(value)}")
        unknown = [k for k in value if k not in valid_keys]
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}" if where else str(unknown[0]),
                            f"unknown key; valid keys: {', '.join(valid_keys)}")
        return value

    def typed(self, where: str, value: Any, kind: type | tuple[type, ...], valid: str) -> Any:
        # bool is an int: `workers: yes` must not pass as 1
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(where, f"expected {valid}, got {_shown(value)}")
        if not isinstance(value, kind):
            raise self.fail(where, f"expected {valid}, got {type(value).__name__} {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            # `.nan` compares false with every bound and would pass them all; `.inf` is no limit
            raise self.fail(where, f"expected a finite number, got {value}")
        return value

    def dataclass_section(self, where: str, value: Any, cls: type) -> Any:
        names = [f.name for f in dataclasses.fields(cls)]
        section = self.mapping(where, value, names)
        for f in dataclasses.fields(cls):
            if f.name in section and section[f.name] is not None:
                expected = {"int | None": (int,), "float | None": (int, float), "float": (int, float),
                            "int": (int,), "str | None": (str,), "bool": (bool,), "str": (str,),
                            "int | float": (int, float)}.get(str(f.type))
                if expected:
                    self.typed(f"{where}.{f.name}", section[f.name], expected,
                               f"{' or '.join(t.__name__ for t in expected)}")
        return section


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study spec file; raises SpecError naming the file and field."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{source}: cannot read the spec: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{source}: not a text file (not UTF-8); a spec is a YAML file such as "
                        "studies/quickstart.yaml") from None
    if "\x00" in text:
        raise SpecError(f"{source}: not a text file (it holds NUL bytes); a spec is a YAML file "
                        "such as studies/quickstart.yaml")
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise SpecError(f"{source}: not a spec: nested too deeply for YAML to read (a spec is "
                        f"at most {MAX_SPEC_DEPTH} levels deep)") from None
    return parse_spec(raw, source=source)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own message spans several,
    quoting the text)."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return _shown(str(error), 200)
    what = "; ".join(part for part in (error.context, error.problem) if part)
    mark = error.problem_mark or error.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{what or 'cannot be read'}{where}"


# Bounds on a spec's shape, far above any real one (studies/ nest 4 deep in a few hundred
# values): a document nested thousands deep, or aliases that expand to millions of values (476
# bytes of `&a [*b, *b, ...]` levels make 1.5 GB), is refused before anything reads it.
MAX_SPEC_DEPTH = 64
MAX_SPEC_VALUES = 100_000


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 (core schema), not 1.1: `1e-3` is a number, `010` is
    10, while `1:30`, `0b100`, `yes`, `on` and `2020-01-01` are strings (1.1 reads 90, 4, true,
    true and a date); a key given twice in one mapping is an error rather than the last one
    winning; and a document is bounded in depth and in its values counted with aliases expanded
    (MAX_SPEC_DEPTH, MAX_SPEC_VALUES). Merge keys (`<<: *base`) still merge."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[type, Any], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; keys written here override merged ones, as in YAML
            key = self.construct_object(key_node, deep=deep)
            try:
                typed = (type(key), key)  # so that 1 and true are different keys
                first = seen.get(typed)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got {key!r}", key_node.start_mark
                ) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first + 1})",
                    key_node.start_mark)
            seen[typed] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        for prefix, base in (("0o", 8), ("0x", 16)):
            if text.startswith(prefix):
                return int(text[2:], base)
        try:
            return int(text, 10)  # `010` is 10: YAML 1.2 has no leading-zero octal
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not a YAML 1.2 integer", node.start_mark) from None

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = self.construct_scalar(node)
        special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
        if text.lower() in special:
            return special[text.lower()]
        try:
            return float(text)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not a YAML 1.2 number", node.start_mark) from None


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document deeper than MAX_SPEC_DEPTH or holding more than MAX_SPEC_VALUES nodes
    with its aliases expanded: counted once per distinct node (an alias is the node it names),
    so the count costs the document's size, never its expansion."""
    sizes: dict[int, int] = {}
    # Depth-first without recursion: (node, depth, children counted yet).
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, counted = stack.pop()
        if depth > MAX_SPEC_DEPTH:
            raise yaml.constructor.ConstructorError(
                None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels; a spec is a few levels "
                            "of mappings and lists", node.start_mark)
        children = _children(node)
        if counted:
            size = 1 + sum(sizes[id(child)] for child in children)
            if size > MAX_SPEC_VALUES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"expands to more than {MAX_SPEC_VALUES} values (its aliases "
                                "repeat what their anchors hold); a spec is a few hundred",
                    node.start_mark)
            sizes[id(node)] = size
        elif id(node) not in sizes:
            stack.append((node, depth, True))
            if any(child is node for child in children):
                raise yaml.constructor.ConstructorError(
                    None, None, "holds itself through an alias", node.start_mark)
            stack.extend((child, depth + 1, False) for child in children
                         if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# YAML 1.2's core schema in place of PyYAML's 1.1 resolvers for booleans, numbers, timestamps and
# `=`: whatever else looks like one (yes, on, 1:30, 0b100, 1_000, 2020-01-01) is a string.
_YAML_11_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                 "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")
_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))
_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)
_SpecLoader.add_constructor("tag:yaml.org,2002:float", _SpecLoader.construct_yaml_float)


def parse_spec(raw: Any, *, source: str = "<spec>") -> StudySpec:
    """Validate a spec already parsed into plain values (see the module docstring for the format)."""
    check = _Checker(source)
    top = check.mapping("", raw, TOP_LEVEL_KEYS)
    for key in REQUIRED_KEYS:
        if key not in top:
            raise check.fail(key, "required key is missing")
    study = check.typed("study", top["study"], str, "a study name (str)")
    problem = study_name_problem(study)
    if problem is not None:
        raise check.fail("study", problem)

    dataset = _dataset(check, top.get("dataset", "digits"))
    model = dict(check.mapping("model", top.get("model"), ARCH_FIELDS))
    sampler = top.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise check.fail("sampler", f"{sampler!r} is not a sampler; valid: {', '.join(SAMPLERS)}")
    space = _space(check, top["space"], sampler, model)

    objectives = top.get("objectives", ["test_error"])
    if isinstance(objectives, str):
        objectives = [objectives]
    check.typed("objectives", objectives, list, "a list of metric names")
    if not objectives:
        raise check.fail("objectives", f"empty; valid metrics: {', '.join(OBJECTIVES)}")
    for i, name in enumerate(objectives):
        if name not in OBJECTIVES:
            raise check.fail(f"objectives[{i}]", f"{name!r} is not a metric; valid: {', '.join(OBJECTIVES)}")
        if name in objectives[:i]:
            raise check.fail(f"objectives[{i}]", f"{name!r} is listed twice; name each metric once")
    pruner = top.get("pruner", "none") or "none"
    if pruner not in PRUNERS:
        raise check.fail("pruner", f"{pruner!r} is not a pruner; valid: {', '.join(PRUNERS)}")
    if pruner != "none" and len(objectives) > 1:
        raise check.fail("pruner", "pruning needs a single objective; use pruner: none for "
                                   f"the {len(objectives)} objectives {objectives}")

    seeds, adaptive = _seeds(check, top.get("seeds", [0]), space)

    train_section = check.mapping("train", top.get("train"),
                                  [*(f.name for f in dataclasses.fields(TrainRecipe)), "preset"])
    try:
        recipe = TrainRecipe.from_dict(train_section, where="train")
    except ValueError as error:
        raise SpecError(f"{source}: {error}") from None

    budget = Budget(**check.dataclass_section("budget", top.get("budget"), Budget))
    for name in ("trials", "minutes", "max_gflops"):
        value = getattr(budget, name)
        if value is not None and value <= 0:
            raise check.fail(f"budget.{name}", f"must be > 0 (or null for no limit), got {value}")
    if budget.trials is not None and budget.trials > MAX_TRIALS:
        raise check.fail("budget.trials", f"at most {MAX_TRIALS}, got {budget.trials}")
    points = math.prod(len(_values(c)) for c in space.values())
    if sampler == "grid" and points * len(seeds) > MAX_TRIALS:
        raise check.fail("space", f"the grid's {points} points x {len(seeds)} seed(s) make "
                                  f"{points * len(seeds)} trials; at most {MAX_TRIALS}: sweep fewer "
                                  "values, or use sampler: random or tpe with a budget")
    if adaptive is not None and (sampler != "grid" or budget.trials is not None):
        raise check.fail("seeds", "adaptive seeds need sampler: grid and no budget.trials (they "
                                  "decide how many trials run; budget.minutes still applies)")
    if sampler != "grid" and budget.trials is None and budget.minutes is None:
        raise check.fail("budget", f"the {sampler} sampler needs budget.trials or budget.minutes "
                                   "to know when to stop")
    resource_values = check.dataclass_section("resources", top.get("resources"), Resources)
    try:
        resources = Resources(**resource_values)
    except ValueError as error:
        raise check.fail("resources", str(error)) from None
    for name in ("cpus", "gpus"):
        if getattr(resources, name) > MAX_CPUS:
            raise check.fail(f"resources.{name}", f"at most {MAX_CPUS} per trial, got "
                                                  f"{getattr(resources, name):g}")
    decoding = dataset.decoding_workers
    if decoding and resources.cpus < decoding + 1:
        raise check.fail("resources.cpus", f"{resources.cpus:g} CPUs per trial cannot hold the "
                                           f"{decoding} image-decoding workers "
                                           "(dataset.loader_workers) and a training thread; give "
                                           f"cpus >= {decoding + 1}")
    if resources.workers > MAX_WORKERS:
        raise check.fail("resources.workers", f"at most {MAX_WORKERS} trials at once, got "
                                              f"{resources.workers}")
    if dataset.name in STREAMED and (recipe.compile or recipe.cuda_graphs):
        raise check.fail("train.compile" if recipe.compile else "train.cuda_graphs",
                         f"needs an in-memory data set (batches precompiled or captured); "
                         f"{dataset.name} is streamed from disk: set it to false")
    if recipe.cuda_graphs and recipe.precision == "fp16":
        raise check.fail("train.cuda_graphs", "runs precision bf16 or fp32, not fp16 (its gradient "
                                              "scaler is not captured); set precision: bf16")
    if recipe.cuda_graphs and resources.gpus == 0:
        raise check.fail("train.cuda_graphs", "needs a GPU per trial: set resources.gpus > 0, or "
                                              "cuda_graphs: false to train on CPUs")
    if resources.gpus > 1 and resources.gpus != int(resources.gpus):
        raise check.fail("resources.gpus", f"above 1 must be a whole number, got {resources.gpus}")
    _check_replicas(check, resources, recipe)

    storage = top.get("storage")
    if storage is not None:
        check.typed("storage", storage, str, "an Optuna storage URL (str) or null")
        if not storage.strip():
            raise check.fail("storage", "empty; give an Optuna storage URL, or null for "
                                        "runs/<study>.db")
    max_attempts = check.typed("max_attempts", top.get("max_attempts", 3), int, "an int >= 1")
    if max_attempts < 1:
        raise check.fail("max_attempts", f"must be >= 1, got {max_attempts}")
    max_restarts = check.typed("max_restarts", top.get("max_restarts", 2), int, "an int >= 0")
    if max_restarts < 0:
        raise check.fail("max_restarts", f"must be >= 0, got {max_restarts}")
    checkpoints = top.get("checkpoints")
    if checkpoints is not None:
        check.typed("checkpoints", checkpoints, str, "a folder every node sees, a URI, or null")
        if not checkpoints.strip():
            raise check.fail("checkpoints", "empty; give a folder every node sees, a URI, or null "
                                            "for runs/<study>.checkpoints")
    warmup_from_depth = top.get("warmup_from_depth")
    if warmup_from_depth is not None:
        check.typed("warmup_from_depth", warmup_from_depth, int, "a depth (int) or null")
    question = top.get("question", "")
    check.typed("question", question, str, "a sentence (str)")

    return StudySpec(
        study=study, question=question, dataset=dataset, model=model, space=space, sampler=sampler,
        objectives=tuple(objectives), seeds=tuple(seeds), adaptive_seeds=adaptive, train=recipe,
        budget=budget,
        resources=resources, storage=storage, pruner=pruner, max_attempts=max_attempts,
        warmup_from_depth=warmup_from_depth, max_restarts=max_restarts, checkpoints=checkpoints,
        source=source, raw=raw,
    )


def adaptive_rule(seeds: Any, space: Mapping[str, Any], *, source: str = "<spec>"
                  ) -> AdaptiveSeeds | None:
    """The adaptive-seed rule of a spec's `seeds` as written (None for fixed seeds): what a
    reader of a stored study needs without parsing the rest of its spec again."""
    if not isinstance(seeds, dict):
        return None
    levels = {name: tuple(values) if isinstance(values, list) else () for name, values in space.items()}
    return _adaptive_seeds(_Checker(source), seeds, levels)[1]


MAX_ADAPTIVE_SEEDS = 100
ADAPTIVE_KEYS = ("min", "max", "until")
UNTIL_KEYS = ("width", "decided", "margin")


def _seeds(check: _Checker, value: Any, space: Mapping[str, Any]
           ) -> tuple[list[int], AdaptiveSeeds | None]:
    """`seeds`: a count, a list of distinct ints, or the adaptive mapping (AdaptiveSeeds)."""
    if isinstance(value, dict):
        return _adaptive_seeds(check, value, space)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise check.fail("seeds", f"a count of seeds must be >= 1, got {value}")
        value = list(range(value))
    check.typed("seeds", value, list, "a count (int), a list of int seeds, or {min, max, until}")
    if not value or len(set(value)) != len(value):
        raise check.fail("seeds", f"expected distinct int seeds, got {value!r}")
    for i, seed in enumerate(value):
        check.typed(f"seeds[{i}]", seed, int, "an int")
    return value, None


def _adaptive_seeds(check: _Checker, value: dict, space: Mapping[str, Any]
                    ) -> tuple[list[int], AdaptiveSeeds]:
    section = check.mapping("seeds", value, list(ADAPTIVE_KEYS))
    bounds = {}
    for name in ("min", "max"):
        if name not in section:
            raise check.fail("seeds", f"adaptive seeds need min, max and until; {name} is missing")
        number = check.typed(f"seeds.{name}", section[name], int, "an int")
        if not 2 <= number <= MAX_ADAPTIVE_SEEDS:
            raise check.fail(f"seeds.{name}", f"must be an int from 2 (the fewest seeds an "
                                              f"interval needs) to {MAX_ADAPTIVE_SEEDS}, got "
                                              f"{number!r}")
        bounds[name] = number
    if bounds["max"] < bounds["min"]:
        raise check.fail("seeds.max", f"must be >= seeds.min ({bounds['min']}), got "
                                      f"{bounds['max']}")
    until = check.mapping("seeds.until", section.get("until"), list(UNTIL_KEYS))
    if ("width" in until) == ("decided" in until):
        raise check.fail("seeds.until", "give one rule: {width: W} (stop where the test error's "
                                        "interval is at most W wide) or {decided: FACTOR, "
                                        "margin: M} (stop where its comparison is decided)")
    width = decided = None
    margin = 0.0
    if "width" in until:
        width = check.typed("seeds.until.width", until["width"], (int, float), "a number")
        if not 0 < width <= 1:
            raise check.fail("seeds.until.width", f"an interval width of an error rate, in "
                                                  f"(0, 1] (0.02 is 2 points), got {width!r}")
    else:
        decided = until["decided"]
        swept = [name for name, levels in space.items() if len(_values(levels)) >= 2]
        if decided not in swept:
            raise check.fail("seeds.until.decided", f"{decided!r} is not a swept factor with two "
                                                    f"levels or more; swept: "
                                                    f"{', '.join(swept) or 'none'}")
        margin = check.typed("seeds.until.margin", until.get("margin", 0.0), (int, float),
                             "a number")
        if not 0 <= margin < 1:
            raise check.fail("seeds.until.margin", f"a difference of error rates in [0, 1) "
                                                   f"(0.005 is half a point), got {margin!r}")
    rule = AdaptiveSeeds(bounds["min"], bounds["max"], None if width is None else float(width),
                         decided, float(margin))
    return list(range(rule.max)), rule


def _check_replicas(check: _Checker, resources: Resources, recipe: TrainRecipe) -> None:
    """A data-parallel trial's resources and recipe, each problem named."""
    nodes, replicas = resources.nodes, resources.replicas
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise check.fail("resources.nodes", f"must be an int >= 1, got {_shown(nodes)}")
    if nodes > 1 and resources.gpus < 1:
        raise check.fail("resources.nodes", f"{nodes} nodes of how many GPUs? Set resources.gpus "
                                            "(per node); CPU replicas are counted by "
                                            "resources.replicas")
    if replicas is not None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise check.fail("resources.replicas", f"must be an int >= 1, got {_shown(replicas)}")
        if resources.gpus > 0:
            raise check.fail("resources.replicas", "counts CPU replicas; a GPU trial has one per "
                                                   f"GPU (gpus x nodes = {resources.replica_count}"
                                                   "): leave replicas out")
    count = resources.replica_count
    if count > MAX_WORKERS:
        raise check.fail("resources", f"at most {MAX_WORKERS} replicas per trial, got {count}")
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
    if recipe.compile or recipe.cuda_graphs:
        raise check.fail("train.compile" if recipe.compile else "train.cuda_graphs",
                         f"runs one-process trials; this one has {count} replicas: set it to "
                         "false")


def _dataset(check: _Checker, value: Any) -> DatasetSpec:
    if isinstance(value, str):
        value = {"name": value}
    section = check.dataclass_section("dataset", value, DatasetSpec)
    if "name" not in section:
        raise check.fail("dataset.name", f"required; valid: {', '.join(DATASETS)}")
    if section["name"] not in DATASETS:
        raise check.fail("dataset.name", f"{section['name']!r} is not a dataset; valid: {', '.join(DATASETS)}")
    if section.get("synthetic") is not None:
        _synthetic(check, section["synthetic"])
    streamed_only = [k for k in ("image_size", "augmentation", "loader_workers")
                     if section.get(k) is not None]
    if section["name"] not in STREAMED and streamed_only:
        raise check.fail(f"dataset.{streamed_only[0]}", f"applies to {' and '.join(STREAMED)} "
                                                        f"only, not to {section['name']}")
    if section.get("shards") is not None and section["name"] != "webdataset":
        raise check.fail("dataset.shards", f"applies to webdataset only, not to {section['name']}")
    if section["name"] == "webdataset":
        shards = check.mapping("dataset.shards", section.get("shards"),
                               ("train", "val", "num_classes", "train_size", "val_size"))
        for key in ("train", "val", "num_classes"):
            if key not in shards:
                raise check.fail(f"dataset.shards.{key}", "required: webdataset needs shards: "
                                 "{train: PATTERN, val: PATTERN, num_classes: N}")
        for key in ("train", "val"):
            check.typed(f"dataset.shards.{key}", shards[key], str,
                        "one pattern (str), e.g. \"train-{000..099}.tar\"; brace ranges name "
                        "several shards")
            if not shards[key].strip():
                raise check.fail(f"dataset.shards.{key}", "empty; name the shards, e.g. "
                                                          "\"train-{000..099}.tar\"")
        for key, low in (("num_classes", 2), ("train_size", 1), ("val_size", 1)):
            if shards.get(key) is not None:
                number = check.typed(f"dataset.shards.{key}", shards[key], int, "an int")
                if not low <= number <= MAX_SYNTHETIC_IMAGES * 100:
                    raise check.fail(f"dataset.shards.{key}", f"must be an int from {low} to "
                                                              f"{MAX_SYNTHETIC_IMAGES * 100:.0e}, "
                                                              f"got {number}")
        if section.get("root"):
            raise check.fail("dataset.root", "webdataset reads dataset.shards, not a root folder")
    if section["name"] in STREAMED:
        if section["name"] == "imagefolder" and not section.get("root"):
            raise check.fail("dataset.root", "imagefolder needs the folder that holds "
                                             "train/<class>/ and val/<class>/")
        if section.get("validation"):
            raise check.fail("dataset.validation", f"{section['name']} evaluates on its val split")
        for key, low in (("image_size", 8), ("loader_workers", 0)):
            if section.get(key) is not None:
                check.typed(f"dataset.{key}", section[key], int, "an int")
                if section[key] < low:
                    raise check.fail(f"dataset.{key}", f"must be >= {low}, got {section[key]}")
        if section.get("augmentation") not in (None, "scale", "random_resized_crop"):
            raise check.fail("dataset.augmentation", f"{section['augmentation']!r} is not an "
                                                     "augmentation; valid: scale, random_resized_crop")
    if section["name"] in ("cifar10", "cifar100") and not section.get("root"):
        archive = section["name"].replace("cifar", "cifar-") + "-python.tar.gz"
        raise check.fail("dataset.root", f"{section['name']} needs the folder that holds (or will "
                                         f"hold) {archive}")
    return DatasetSpec(**section)


SYNTHETIC_INTS = {"num_classes": (2, 100_000), "channels": (1, 64), "image_size": (1, 1024),
                  "train_size": (1, MAX_SYNTHETIC_IMAGES), "test_size": (1, MAX_SYNTHETIC_IMAGES)}


def _synthetic(check: _Checker, value: Any) -> None:
    """`dataset.synthetic`: each field in its range, and the images few enough to hold in memory
    (a trial makes them all as float32 before it trains)."""
    section = check.mapping("dataset.synthetic", value, (*SYNTHETIC_INTS, "noise"))
    for name, (low, high) in SYNTHETIC_INTS.items():
        if name in section:
            number = check.typed(f"dataset.synthetic.{name}", section[name], int, "an int")
            if not low <= number <= high:
                raise check.fail(f"dataset.synthetic.{name}", f"must be an int from {low} to "
                                                              f"{high:,}, got {number}")
    if "noise" in section:
        noise = check.typed("dataset.synthetic.noise", section["noise"], (int, float), "a number")
        if noise < 0:
            raise check.fail("dataset.synthetic.noise", f"must be >= 0, got {noise}")
    sizes = {name: section.get(name, default) for name, default in
             (("channels", 1), ("image_size", 8), ("train_size", 256), ("test_size", 128))}
    images = sizes["train_size"] + sizes["test_size"]
    size = images * sizes["channels"] * sizes["image_size"] ** 2 * 4
    if size > MAX_SYNTHETIC_BYTES:
        raise check.fail("dataset.synthetic", f"{images:,} images of {sizes['channels']}x"
                                              f"{sizes['image_size']}x{sizes['image_size']} "
                                              f"float32 hold {size / 2**30:.1f} GiB; at most "
                                              f"{MAX_SYNTHETIC_BYTES / 2**30:.0f} GiB")


def _level_key(value: Any) -> Any:
    """A level as duplicates compare: strings case-folded (the architecture reads `a` as `A`),
    numbers by value (8 and 8.0), lists element by element; a bool stays apart from 1 and 0."""
    if isinstance(value, str):
        return ("str", value.casefold())
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (tuple, list)):
        return ("list", tuple(_level_key(v) for v in value))
    return ("value", value)


def _check_distinct_levels(check: _Checker, where: str, levels: tuple[Any, ...]) -> None:
    """Refuse a level listed twice: it would train the same configuration twice, and the summary
    would then count one configuration's seeds twice (n doubled, a falsely narrow interval)."""
    first: dict[Any, Any] = {}
    for level in levels:
        key = _level_key(level)
        try:
            seen = key in first
        except TypeError:
            continue  # an unhashable level: the architecture check below refuses it
        if not seen:
            first[key] = level
        else:
            earlier = first[key]
            same = "" if repr(earlier) == repr(level) else f" (the same level as {_shown(earlier)})"
            raise check.fail(where, f"{_shown(level)} is listed twice{same}; list each level once "
                                    "(strings compare ignoring case, and 8 equals 8.0): a repeated "
                                    "level trains the same configuration twice")


def _space(check: _Checker, value: Any, sampler: str, model: Mapping[str, Any]) -> dict[str, Any]:
    section = check.mapping("space", value, ARCH_FIELDS)
    if not section:
        raise check.fail("space", f"empty; sweep at least one of: {', '.join(ARCH_FIELDS)}")
    space: dict[str, Any] = {}
    for name, choices in section.items():
        where = f"space.{name}"
        if name in model:
            raise check.fail(where, f"also fixed in model.{name}; sweep it or fix it, not both")
        if isinstance(choices, Mapping):
            if sampler == "grid":
                raise check.fail(where, "the grid sampler needs a list of values, not a range")
            check.mapping(where, choices, ("low", "high", "step"))
            if "low" not in choices or "high" not in choices:
                raise check.fail(where, "a range needs low and high (and optionally step)")
            for key, bound in choices.items():
                check.typed(f"{where}.{key}", bound, int, "an int")
            if choices.get("step", 1) < 1:
                raise check.fail(f"{where}.step", f"must be >= 1, got {choices['step']}")
            space[name] = IntRange(choices["low"], choices["high"], choices.get("step", 1))
            if not space[name].values():
                raise check.fail(where, f"the range {dict(choices)} holds no value")
            if len(space[name].values()) > MAX_TRIALS:
                raise check.fail(where, f"the range {dict(choices)} holds "
                                        f"{len(space[name].values())} values; at most {MAX_TRIALS}")
        else:
            if not isinstance(choices, list):
                choices = [choices]
            if not choices:
                raise check.fail(where, "empty list of values; give at least one")
            space[name] = tuple(tuple(c) if isinstance(c, list) else c for c in choices)
            _check_distinct_levels(check, where, space[name])

    # Every combination must be a buildable architecture (checked up to a large space's first 10k).
    points = list(itertools.islice(
        itertools.product(*[[(n, v) for v in _values(c)] for n, c in space.items()]), 10_000))
    for point in points:
        try:
            ResNetArch.from_dict({**model, **dict(point)})
        except (ArchError, TypeError) as error:
            bad = ", ".join(f"{n}={v!r}" for n, v in point)
            raise check.fail("space", f"the point {bad} is not a valid architecture: {error}") from None
    return space

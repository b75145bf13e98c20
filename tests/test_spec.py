"""Study specs: the shipped ones load, and every kind of mistake gives one error naming file and field."""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

import resnet_ablate.spec as spec_package
from resnet_ablate.spec import Budget, IntRange, SpecError, load_spec, parse_spec
from resnet_ablate.spec.checker import accepted_types

STUDIES = Path(__file__).resolve().parent.parent / "studies"
MINIMAL = {"study": "s", "space": {"depth": [8, 20]}}


def _error(raw, source="studies/x.yaml") -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, source=source)
    return str(info.value)


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_load_and_build_every_grid_point(path):
    spec = load_spec(path)
    points = list(spec.grid()) if spec.sampler == "grid" else []
    for params in points:
        assert spec.arch(params).name  # every point is a buildable description
    assert spec.study == path.stem


def test_grid_is_the_full_factorial_in_order():
    spec = parse_spec({"study": "s", "space": {"depth": [20, 32], "shortcut": ["A", "B", "none"]},
                       "seeds": 3})
    assert list(spec.grid()) == [{"depth": d, "shortcut": s} for d in (20, 32) for s in ("A", "B", "none")]
    assert spec.seeds == (0, 1, 2)
    assert spec.directions == ["minimize"]


def test_defaults_and_storage_url(tmp_path):
    spec = parse_spec(MINIMAL)
    assert spec.dataset.name == "digits" and spec.sampler == "grid" and spec.pruner == "none"
    assert spec.storage_url(tmp_path) == f"sqlite:///{tmp_path}/s.db"
    assert parse_spec({**MINIMAL, "storage": "postgresql://h/db"}).storage_url() == "postgresql://h/db"


def test_warmup_only_for_the_deepest_nets():
    spec = parse_spec({**MINIMAL, "space": {"depth": [56, 110]}, "warmup_from_depth": 110})
    assert [spec.recipe_for(spec.arch(p)).warmup for p in spec.grid()] == [False, True]


def test_ranges_for_random_and_tpe():
    spec = parse_spec({"study": "s", "sampler": "tpe", "budget": {"trials": 4},
                       "space": {"depth": {"low": 20, "high": 56, "step": 6}}})
    assert spec.space["depth"] == IntRange(20, 56, 6)
    assert list(spec.space["depth"].values()) == [20, 26, 32, 38, 44, 50, 56]


@pytest.mark.parametrize("raw,expected", [
    ({**MINIMAL, "epochs": 3}, "studies/x.yaml: epochs: unknown key; valid keys: study, question"),
    ({"space": {"depth": [20]}}, "studies/x.yaml: study: required key is missing"),
    (None, "studies/x.yaml: the spec: empty; it needs at least study (a name) and space (the "
           "fields to sweep)"),
    ({}, "studies/x.yaml: the spec: empty; it needs at least study"),
    ({**MINIMAL, "space": {}}, "studies/x.yaml: space: empty; sweep at least one of: family, depth"),
    ({**MINIMAL, "space": {"depth": []}}, "space.depth: empty list of values"),
    ({**MINIMAL, "space": {"colour": ["red"]}}, "space.colour: unknown key; valid keys: family, depth"),
    ({**MINIMAL, "space": {"depth": [20, 21]}},
     "the point depth=21 is not a valid architecture: ResNetArch.depth=21"),
    ({**MINIMAL, "sampler": "bayes"}, "sampler: 'bayes' is not a sampler; valid: grid, random, tpe"),
    ({**MINIMAL, "objectives": ["speed"]}, "objectives[0]: 'speed' is not a metric; valid: test_error"),
    ({**MINIMAL, "train": {"epoch": 3}}, "train.epoch: unknown key; valid keys: epochs, batch_size"),
    ({**MINIMAL, "train": {"epochs": 0}}, "train.epochs must be an int >= 1, got 0"),
    ({**MINIMAL, "resources": {"workers": "two"}},
     "resources.workers: expected an int from 1 to 1024 (trials at once), got str 'two'"),
    ({**MINIMAL, "resources": {"workers": True}},
     "resources.workers: expected an int from 1 to 1024 (trials at once), got True"),
    ({**MINIMAL, "resources": {"stack_seeds": 2.5}},
     "resources.stack_seeds: expected an int from 1 (each seed alone) to 32, got float 2.5"),
    ({**MINIMAL, "dataset": "mnist"}, "dataset.name: 'mnist' is not a dataset; valid: digits, cifar10"),
    ({**MINIMAL, "dataset": {"name": "cifar10"}}, "dataset.root: cifar10 needs the folder"),
    ({**MINIMAL, "dataset": {"name": "cifar100"}},
     "dataset.root: cifar100 needs the folder that holds (or will hold) cifar-100-python.tar.gz"),
    ({**MINIMAL, "seeds": [1, 1]}, "seeds: expected distinct int seeds, got [1, 1]"),
    ({**MINIMAL, "model": {"family": "vgg"}},
     "model.family: ResNetArch.family='vgg' is not valid; valid: cifar, imagenet"),
    ({**MINIMAL, "model": {"fused": "maybe"}}, "model.fused: ResNetArch.fused='maybe' is not valid"),
    ({**MINIMAL, "model": {"depth": 21}, "space": {"shortcut": ["A"]}},
     "model.depth: ResNetArch.depth=21 is not a CIFAR depth"),
    ({**MINIMAL, "seeds": [-1]}, "seeds[0]: must be an int from 0 to 4294967295 (2**32 - 1), got -1"),
    ({**MINIMAL, "seeds": [0, 2**64]}, "seeds[1]: must be an int from 0 to 4294967295"),
    ({**MINIMAL, "pruner": "median", "objectives": ["test_error", "flops"]},
     "pruner: pruning needs a single objective"),
    ({**MINIMAL, "model": {"depth": 20}}, "space.depth: also fixed in model.depth"),
    ({**MINIMAL, "space": {"depth": {"low": 20, "high": 32}}},
     "space.depth: the grid sampler needs a list of values, not a range"),
    ({**MINIMAL, "sampler": "tpe"}, "budget: the tpe sampler needs budget.trials or budget.minutes"),
    ({**MINIMAL, "budget": {"max_gflops": -1}}, "budget.max_gflops: must be > 0"),
    ("just text", "studies/x.yaml: the spec: expected a mapping, got str"),
    ({**MINIMAL, "train": {"precision": "fp8"}},
     "train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ({**MINIMAL, "train": {"memory_format": "nhwc"}},
     "train.memory_format must be one of channels_last, nchw"),
    ({**MINIMAL, "train": {"cuda_graphs": True}},
     "train.cuda_graphs: needs a GPU per trial: set resources.gpus > 0"),
    ({**MINIMAL, "train": {"cuda_graphs": True, "precision": "fp16"}, "resources": {"gpus": 1}},
     "train.cuda_graphs: runs precision bf16 or fp32, not fp16"),
    ({**MINIMAL, "train": {"cuda_graphs": "always"}},
     "train.cuda_graphs must be auto, true or false, got 'always'"),
    ({**MINIMAL, "objectives": ["test_error", "test_error"]},
     "objectives[1]: 'test_error' is listed twice"),
    ({**MINIMAL, "study": ".."}, "study: '..' is not a usable name"),
    ({**MINIMAL, "study": "a/b"}, "study: 'a/b' is not a usable name"),
    ({**MINIMAL, "study": "x\x00y"}, "is not a usable name"),
    ({**MINIMAL, "study": "x.db"}, "study: 'x.db' is not a usable name"),
    # Bounds: a typo far past any real study is refused, not planned (or built) for minutes.
    ({**MINIMAL, "space": {"depth": [20, 60002]}},
     "ResNetArch.depth=60002 is above the deepest network the toolkit builds, 2000 layers"),
    ({**MINIMAL, "train": {"epochs": 10**9}}, "train.epochs must be at most 10000"),
    ({**MINIMAL, "space": {"depth": [20, 32]}, "seeds": 6000},
     "space: the grid's 2 points x 6000 seed(s) make 12000 trials; at most 10000"),
    ({**MINIMAL, "sampler": "random", "space": {"depth": {"low": 2, "high": 10**9}},
      "budget": {"trials": 4}}, "space.depth: the range {'low': 2, 'high': 1000000000} holds "
                                "999999999 values; at most 10000"),
    ({**MINIMAL, "sampler": "random", "space": {"depth": {"low": 20, "high": 32, "step": 0}},
      "budget": {"trials": 4}}, "space.depth.step: must be >= 1, got 0"),
    ({**MINIMAL, "budget": {"trials": 10**6}}, "budget.trials: at most 10000, got 1000000"),
    ({**MINIMAL, "resources": {"workers": 10**6}}, "resources.workers: at most 1024 trials at once"),
    ({**MINIMAL, "dataset": {"name": "imagefolder", "root": "data/imagenet"},
      "train": {"compile": True}, "resources": {"cpus": 3}},
     "train.compile: needs an in-memory data set"),
    ({**MINIMAL, "dataset": {"name": "imagefolder", "root": "data/imagenet"},
      "resources": {"cpus": 2}}, "resources.cpus: 2 CPUs per trial cannot hold the 2 image-decoding"),
    ({**MINIMAL, "train": {"decode": "gpu"}, "resources": {"gpus": 1}},
     "train.decode: gpu applies to imagefolder and webdataset (images decoded as they stream), "
     "not to digits"),
    ({**MINIMAL, "dataset": {"name": "imagefolder", "root": "data/imagenet"},
      "train": {"decode": "gpu"}, "resources": {"cpus": 3}},
     "train.decode: gpu needs a GPU per trial: set resources.gpus > 0"),
    ({**MINIMAL, "dataset": {"name": "webdataset", "shards": {"train": "t.tar", "val": "v.tar"}}},
     "dataset.shards.num_classes: required"),
])
def test_invalid_specs_name_file_field_and_what_is_valid(raw, expected):
    assert expected in _error(raw)


@pytest.mark.parametrize("raw, expected", [
    # A list or map where a name or a seed goes: one line, where `in` or a set raised TypeError.
    ({**MINIMAL, "objectives": [["test_error"]]},
     "objectives[0]: expected a metric name, got list ['test_error']"),
    ({**MINIMAL, "seeds": [[0]]}, "seeds[0]: expected an int, got list [0]"),
    ({**MINIMAL, "seeds": [{"a": 1}]}, "seeds[0]: expected an int, got dict {'a': 1}"),
    ({**MINIMAL, "space": {"depth": [20], "shortcut": ["A", "B"]},
      "seeds": {"min": 2, "max": 4, "until": {"decided": ["shortcut"]}}},
     "seeds.until.decided: expected a swept factor's name, got list ['shortcut']"),
    ({**MINIMAL, "train": {"preset": ["imagenet"]}},
     "train: preset ['imagenet'] is not a recipe; valid: cifar"),
    # A count is bounded before its seeds are listed (50M took 5 GB; 1e38 overflowed).
    ({**MINIMAL, "seeds": 10**38}, f"seeds: a count of seeds from 1 to 10000, got {10**38}"),
])
def test_a_wrong_type_or_an_enormous_count_is_one_line(raw, expected):
    assert expected in _error(raw)


WEBDATASET = {"name": "webdataset", "shards": {"train": "t.tar", "val": "v.tar", "num_classes": 10}}


@pytest.mark.parametrize("raw, expected", [
    # An architecture too large to allocate is refused before anything builds it.
    ({**MINIMAL, "model": {"widths": [640000, 640000, 640000]}, "space": {"depth": [20]}},
     "holds about 6.64e+13 convolution weights, above the 1e+10 the toolkit builds"),
    # Non-finite and absurd numbers: NaN passes every comparison, so it is refused by name.
    ({**MINIMAL, "resources": {"cpus": float("inf")}}, "resources.cpus: expected a finite number, got inf"),
    ({**MINIMAL, "resources": {"cpus": float("nan")}}, "resources.cpus: expected a finite number, got nan"),
    ({**MINIMAL, "resources": {"gpus": float("nan")}}, "resources.gpus: expected a finite number, got nan"),
    ({**MINIMAL, "resources": {"cpus": 1e300}}, "resources.cpus: at most 1024 per trial, got 1e+300"),
    ({**MINIMAL, "resources": {"gpus": 1e300}}, "resources.gpus: at most 1024 per trial, got 1e+300"),
    ({**MINIMAL, "budget": {"max_gflops": float("nan")}},
     "budget.max_gflops: expected a finite number, got nan"),
    ({**MINIMAL, "train": {"batch_size": 10**9}},
     "train.batch_size must be at most 1,000,000 images a step, got 1000000000"),
    ({**MINIMAL, "storage": ""}, "storage: empty; give an Optuna storage URL"),
    ({**MINIMAL, "checkpoints": " "}, "checkpoints: empty"),
    # Synthetic data is made in memory: bounded in images and bytes, each field in its range.
    ({**MINIMAL, "dataset": {"name": "synthetic", "synthetic": {"train_size": 10**9}}},
     "dataset.synthetic.train_size: must be an int from 1 to 10,000,000, got 1000000000"),
    ({**MINIMAL, "dataset": {"name": "synthetic", "synthetic": {"train_size": 1e9}}},
     "dataset.synthetic.train_size: expected an int, got float 1000000000.0"),
    ({**MINIMAL, "dataset": {"name": "synthetic", "synthetic": {"train_size": -5}}},
     "dataset.synthetic.train_size: must be an int from 1 to 10,000,000, got -5"),
    ({**MINIMAL, "dataset": {"name": "synthetic", "synthetic": {"num_classes": 1}}},
     "dataset.synthetic.num_classes: must be an int from 2 to 100,000, got 1"),
    ({**MINIMAL, "dataset": {"name": "synthetic", "synthetic": {"noise": float("nan")}}},
     "dataset.synthetic.noise: expected a finite number, got nan"),
    ({**MINIMAL, "dataset": {"name": "synthetic",
                             "synthetic": {"train_size": 10**7, "image_size": 64, "channels": 3}}},
     "dataset.synthetic: 10,000,128 images of 3x64x64 float32 hold 457.8 GiB; at most 16 GiB"),
    # Shards: one pattern each (a YAML list is not one), sizes counted from 1.
    ({**MINIMAL, "dataset": {**WEBDATASET, "shards": {**WEBDATASET["shards"], "train": ["a.tar"]}}},
     "dataset.shards.train: expected one pattern (str)"),
    ({**MINIMAL, "dataset": {**WEBDATASET, "shards": {**WEBDATASET["shards"], "train_size": -5}}},
     "dataset.shards.train_size: must be an int from 1 to"),
    # Each replica reads shards of its own: refused before anything runs (it failed in the trial,
    # after 9 replica-group starts).
    ({**MINIMAL, "dataset": WEBDATASET, "resources": {"cpus": 3, "replicas": 2}},
     "dataset.shards.train: 1 training shard(s) cannot feed the 2 replicas of each trial"),
    ({**MINIMAL, "dataset": {**WEBDATASET, "shards": {**WEBDATASET["shards"], "num_classes": 1}}},
     "dataset.shards.num_classes: must be an int from 2 to"),
])
def test_unbounded_and_non_finite_values_are_refused_in_one_line(raw, expected):
    message = _error(raw)
    assert expected in message and len(message.splitlines()) == 1, message


@pytest.mark.parametrize("text, field, expected", [
    ("010", "epochs", 10),  # YAML 1.1 reads 8 (octal)
    ("0o10", "epochs", 8),
    ("1e1", "epochs", None),  # a float: refused for an int field
])
def test_yaml_numbers_are_read_as_yaml_1_2_reads_them(text, field, expected, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(f"study: x\nspace: {{depth: [20]}}\ntrain: {{{field}: {text}}}\n")
    if expected is None:
        with pytest.raises(SpecError, match=f"train.{field} must be an int"):
            load_spec(path)
    else:
        assert getattr(load_spec(path).train, field) == expected


@pytest.mark.parametrize("line, expected", [
    ("train: {epochs: 1:30}", "train.epochs must be an int >= 1, got '1:30'"),  # 1.1: 90
    ("train: {epochs: 0b100}", "train.epochs must be an int >= 1, got '0b100'"),  # 1.1: 4
    ("train: {compile: yes}", "train.compile must be true or false, got 'yes'"),
    # Strings are truthy: 'no' and 'off' turned Nesterov momentum and warm-up on.
    ("train: {nesterov: no}", "train.nesterov must be true or false, got 'no'"),
    ("train: {warmup: off}", "train.warmup must be true or false, got 'off'"),
    ("max_attempts: 1_000", "max_attempts: expected an int >= 1, got str '1_000'"),
    ("question: 2020-01-01", None),  # a string, not a date
])
def test_yaml_1_1_spellings_are_strings_and_then_a_type_error_naming_the_field(line, expected,
                                                                              tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(f"study: x\nspace: {{depth: [20]}}\n{line}\n")
    if expected is None:
        assert load_spec(path).question == "2020-01-01"
        return
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value), str(info.value)


def _alias_bomb(levels: int) -> str:
    lines = ["  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "study: bomb\nspace: {depth: [8]}\nmodel:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, expected", [
    (_alias_bomb(9), "expands to more than 100000 values"),  # 10**9 values, 600 bytes
    ("study: x\nspace: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
    ("study: x\nspace: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 64 levels"),
    ("study: x\nspace: &a [*a]\n", "holds itself through an alias"),
    ("study: [unclosed\n", "not valid YAML: while parsing a flow sequence"),
])
def test_hostile_yaml_is_one_line(text, expected, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert expected in message and len(message.splitlines()) == 1, message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml: cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(bad)


def test_spec_file_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"study": "mine", "model": {"depth": 20},
                                    "space": {"shortcut": ["A", "B"]},
                                    "train": {"epochs": 2}}))
    spec = load_spec(path)
    assert spec.source == str(path) and spec.train.epochs == 2
    assert [spec.arch(p).shortcut for p in spec.grid()] == ["A", "B"]


def test_yaml_numbers_in_exponent_form_and_duplicate_keys(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("study: x\nspace: {depth: [20]}\ntrain: {lr: 1e-3, weight_decay: 5e-4}\n")
    spec = load_spec(path)
    assert spec.train.lr == 0.001 and spec.train.weight_decay == 0.0005
    path.write_text("study: x\nspace: {depth: [20]}\nseeds: 2\nseeds: 3\n")
    with pytest.raises(SpecError, match=r"duplicate key 'seeds' \(first on line 3\)"):
        load_spec(path)
    # YAML's merge keys still work: keys written out override the merged ones.
    path.write_text("study: x\nspace: {<<: {depth: [8, 20], shortcut: [A]}, depth: [20]}\n")
    assert load_spec(path).space == {"depth": (20,), "shortcut": ("A",)}


def test_checking_a_spec_imports_neither_torch_nor_triton():
    """Descriptions (spec, architecture, recipe) are plain values: the model layer imports them,
    never the reverse, so validating a YAML spec is quick and needs no GPU stack."""
    import subprocess
    import sys

    code = ("import sys, resnet_ablate.spec, resnet_ablate.arch, resnet_ablate.recipe; "
            "from resnet_ablate.spec import load_spec; load_spec('studies/quickstart.yaml'); "
            "print(sorted(m for m in ('torch', 'triton', 'ray', 'optuna') if m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_public_names_still_load_from_the_package():
    import resnet_ablate

    assert resnet_ablate.resnet56().arch.depth == 56
    assert resnet_ablate.ResNetArch(depth=20).name == "resnet20-cifar-A"
    assert callable(resnet_ablate.fuse) and callable(resnet_ablate.profile)
    assert resnet_ablate.TrainRecipe().epochs == 164
    assert resnet_ablate.models.ResNet is resnet_ablate.ResNet  # submodules as attributes too
    import pickle

    import ray.cloudpickle

    # Ray ships closures over the package: it pickles by reference, as a module does.
    assert pickle.loads(ray.cloudpickle.dumps(resnet_ablate)) is resnet_ablate
    assert pickle.loads(ray.cloudpickle.dumps(lambda: resnet_ablate.resnet8()))().arch.depth == 8


@pytest.mark.parametrize("name", ["%2F..%2F..%2Fescaped_by_name", "a#b", "a?b", "..", ".hidden",
                                  "x" * 300, "résumé", "", "my study", "a..b"])
def test_study_names_outside_the_alphabet_are_refused_naming_the_value_and_the_alphabet(name):
    from resnet_ablate.storage import STUDY_NAME_ALPHABET

    message = _error({**MINIMAL, "study": name})
    assert f"studies/x.yaml: study: {repr(name)[:60]}" in message
    assert STUDY_NAME_ALPHABET in message


def test_a_study_named_by_a_bare_number_is_told_to_quote_it(tmp_path):
    """`study: 123` reads as a number in YAML: the alphabet allows the name, and the error now
    says how to write it."""
    (tmp_path / "n.yaml").write_text("study: 123\nspace: {depth: [8]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "n.yaml")
    assert str(info.value).endswith('n.yaml: study: expected a study name (str), got the number '
                                    '123: quote it (study: "123") to name a study so')
    assert parse_spec({**MINIMAL, "study": "123"}).study == "123"


@pytest.mark.parametrize("name", ["s", "quickstart", "cifar10_depth", "Run-2.v3", "x" * 100])
def test_ordinary_study_names_are_accepted(name):
    assert parse_spec({**MINIMAL, "study": name}).study == name


def test_a_spec_built_in_python_checks_its_name_too():
    import dataclasses

    with pytest.raises(SpecError, match=r"study: '\.\./x' is not a usable name"):
        dataclasses.replace(parse_spec(MINIMAL), study="../x")


@pytest.mark.parametrize("space,expected", [
    ({"depth": [8, 8]}, "studies/x.yaml: space.depth: 8 is listed twice; list each level once"),
    ({"depth": [8, 20, 8.0]}, "space.depth: 8.0 is listed twice (the same level as 8)"),
    ({"shortcut": ["A", "a"]}, "space.shortcut: 'a' is listed twice (the same level as 'A')"),
    ({"shortcut": ["none", "B", "None"]}, "space.shortcut: 'None' is listed twice"),
    ({"stages": [[1, 2, 3], [2, 2, 2], [1, 2, 3]]}, "space.stages: (1, 2, 3) is listed twice"),
    ({"depth": [8], "fused": [True, False, True]}, "space.fused: True is listed twice"),
])
def test_a_level_listed_twice_is_refused_naming_the_field_and_the_level(space, expected):
    message = _error({**MINIMAL, "space": space})
    assert expected in message
    assert "trains the same configuration twice" in message


@pytest.mark.parametrize("space,model,levels", [
    # null is the family's default: shortcut A on CIFAR, B on ImageNet
    ({"depth": [8, 20], "shortcut": [None, "A"]}, {}, "space.shortcut: None and 'A'"),
    ({"shortcut": ["B", None]}, {"family": "imagenet", "depth": 18},
     "space.shortcut: 'B' and None"),
    # ResNet-20's defaults spelled out, and basic blocks' downsampling (one place only)
    ({"depth": [20], "stages": [None, [3, 3, 3]]}, {}, "space.stages: None and (3, 3, 3)"),
    ({"depth": [8], "downsampling": ["v1", "v1.5"]}, {}, "space.downsampling: 'v1' and 'v1.5'"),
])
def test_two_levels_that_build_the_same_networks_are_refused(space, model, levels):
    message = _error({**MINIMAL, "model": model, "space": space})
    assert f"{levels} build the same networks whatever the other factors" in message, message
    assert "each configuration would train twice under two names" in message


def test_a_crossed_design_whose_factor_is_inert_at_some_levels_is_kept():
    # Downsampling moves a bottleneck's stride and does nothing to a basic block: two of the four
    # points are one network, but the levels differ at the other, and the design is factorial.
    spec = parse_spec({**MINIMAL, "model": {"stages": [1, 1, 1]},
                       "space": {"block": ["basic", "bottleneck"],
                                 "downsampling": ["v1", "v1.5"]}})
    assert len(list(spec.grid())) == 4
    spec = parse_spec({**MINIMAL, "space": {"depth": [11], "block": ["bottleneck"],
                                            "downsampling": ["v1", "v1.5"]}})
    assert len(list(spec.grid())) == 2


def test_distinct_levels_that_only_look_alike_are_kept():
    spec = parse_spec({**MINIMAL, "space": {"shortcut": ["A", "B", "C", "none"],
                                            "stages": [[1, 2, 3], [3, 2, 1]]}})
    assert spec.space["shortcut"] == ("A", "B", "C", "none")
    assert len(list(spec.grid())) == 8
    # true and 1 are different values (and 1 is no value of fused): the architecture says so
    message = _error({**MINIMAL, "space": {"depth": [8], "fused": [True, 1]}})
    assert "ResNetArch.fused=1 is not valid" in message


def test_resources_built_in_python_are_held_to_the_parsers_bounds():
    from resnet_ablate.spec import Resources

    with pytest.raises(ValueError, match=r"resources.cpus: must be > 0 \(CPUs per trial\), got -1"):
        Resources(cpus=-1)
    assert "resources.cpus: must be > 0 (CPUs per trial), got 0" in \
        _error({**MINIMAL, "resources": {"cpus": 0}})
    assert "resources.gpus: must be >= 0 (GPUs per trial), got -1" in \
        _error({**MINIMAL, "resources": {"gpus": -1}})
    assert "resources.workers: must be >= 1 (trials at once), got 0" in \
        _error({**MINIMAL, "resources": {"workers": 0}})


SECTIONS = {"dataset": "DatasetSpec", "budget": "Budget", "resources": "Resources"}


@pytest.mark.parametrize("section,field", [
    (section, f.name) for section, cls in SECTIONS.items()
    for f in dataclasses.fields(getattr(spec_package, cls))])
def test_every_field_of_a_section_is_checked_against_its_type(section, field):
    # No field of these sections is a list: a list is the wrong type for each one.
    named = {"name": "digits"} if section == "dataset" else {}  # a data set's name is required
    message = _error({**MINIMAL, section: {**named, field: [1]}})
    assert message.startswith(f"studies/x.yaml: {section}.{field}: expected ")
    assert message.endswith("got list [1]")


@pytest.mark.parametrize("hint,accepted", [
    (float, (int, float)),  # YAML's 1 is a float field's 1.0
    (int, (int,)),
    (int | None, (int,)),
    (str | None, (str,)),
    (bool, (bool,)),
    (Mapping[str, Any] | None, (Mapping,)),
])
def test_a_field_type_says_which_yaml_values_it_takes(hint, accepted):
    assert accepted_types(hint) == accepted


def test_a_field_type_without_a_yaml_check_is_an_error_not_a_pass():
    with pytest.raises(TypeError, match="no YAML check"):
        accepted_types(list[int])


@pytest.mark.parametrize("raw,expected", [
    ({"resources": {"cpus": None}},
     "resources.cpus: expected a number > 0 and at most 1024 (CPUs per trial), got NoneType None"),
    ({"dataset": {"name": "digits", "validation": None}},
     "dataset.validation: expected bool, got NoneType None"),
    ({"resources": {"workers": 2.0}},
     "resources.workers: expected an int from 1 to 1024 (trials at once), got float 2.0"),
    ({"budget": {"trials": True}},
     "budget.trials: expected an int from 1 to 10000, or null for no limit, got True"),
])
def test_null_and_near_miss_values_are_refused_where_the_field_does_not_take_them(raw, expected):
    assert expected in _error({**MINIMAL, **raw})


def test_null_is_the_default_where_the_field_takes_none():
    spec = parse_spec({**MINIMAL, "budget": {"trials": None, "minutes": None},
                       "resources": {"replicas": None}})
    assert spec.budget == Budget() and spec.resources.replicas is None


@pytest.mark.parametrize("fields,expected", [
    ({"name": "nope"}, "dataset.name: 'nope' is not a dataset; valid: digits, cifar10"),
    ({"name": "cifar10"}, "dataset.root: cifar10 needs the folder that holds (or will hold) "
                          "cifar-10-python.tar.gz"),
    ({"name": "digits", "image_size": 64}, "dataset.image_size: applies to imagefolder and "
                                           "webdataset only, not to digits"),
    ({"name": "imagefolder", "root": "x", "loader_workers": -1},
     "dataset.loader_workers: must be >= 0, got -1"),
    ({"name": "digits", "validation": None}, "dataset.validation: expected bool, got NoneType"),
])
def test_a_data_set_description_built_in_python_is_held_to_the_parsers_checks(fields, expected):
    from resnet_ablate.spec import DatasetSpec

    with pytest.raises(SpecError) as info:
        DatasetSpec(**fields)
    assert str(info.value).startswith(expected)
    # The parser gives the same refusal, naming the file.
    assert _error({**MINIMAL, "dataset": fields}).startswith(f"studies/x.yaml: {expected}")


def test_a_valid_data_set_description_built_in_python_loads_as_written():
    from resnet_ablate.spec import DatasetSpec

    described = DatasetSpec(name="cifar10", root="data", validation=True)
    assert described == parse_spec({**MINIMAL, "dataset": {"name": "cifar10", "root": "data",
                                                           "validation": True}}).dataset
    assert described.load_kwargs()["root"] == "data"


@pytest.mark.parametrize("section,fields,expected", [
    ("Budget", {"trials": -1}, "budget.trials: must be > 0 (or null for no limit), got -1"),
    ("Budget", {"minutes": 0}, "budget.minutes: must be > 0"),
    ("Budget", {"trials": 10**6}, "budget.trials: at most 10000, got 1000000"),
    ("Resources", {"gpus": 2, "replicas": 2}, "resources.replicas: counts CPU replicas"),
    ("Resources", {"gpus": 1.5}, "resources.gpus: above 1 must be a whole number, got 1.5"),
    ("Resources", {"nodes": 0}, "resources.nodes: must be an int >= 1, got 0"),
    ("Resources", {"workers": "2"}, "resources.workers: expected an int from 1 to 1024 (trials at once), got str '2'"),
])
def test_budget_and_resources_built_in_python_are_held_to_the_parsers_checks(section, fields,
                                                                               expected):
    with pytest.raises(SpecError) as info:
        getattr(spec_package, section)(**fields)
    assert str(info.value).startswith(expected)
    assert _error({**MINIMAL, section.lower(): fields}).startswith(f"studies/x.yaml: {expected}")

"""The architecture description's name: results, plots and comparisons group trials by it, so it
is unique to the network a description builds, and the paper's standard names never change."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest

from resnet_ablate.arch import ArchError, ResNetArch

# Every field varied, over values that make standard, custom and contradictory descriptions.
SIZES = [{"depth": d} for d in (8, 14, 18, 20, 26, 29, 50)] + [
    {"stages": s} for s in ((1, 2, 3), (2, 2, 2), (3, 3, 3), (3, 3, 3, 3), (2, 2, 2, 2),
                            (3, 4, 6, 3), (2, 5, 6, 3), (1, 1))]
FIELDS = {
    "family": ["cifar", "imagenet"],
    "size": SIZES,
    "block": [None, "basic", "bottleneck"],
    "shortcut": [None, "A", "C", "none"],
    "widths": [None, (32, 64, 128), (16, 32, 64, 128), (64, 128, 256), (16, 32)],
    "base_width": [64, 128],
    "downsampling": ["v1", "v1.5"],
    "fused": [True, False],
}


def _descriptions() -> list[ResNetArch]:
    built = []
    for values in itertools.product(*FIELDS.values()):
        fields = dict(zip(FIELDS, values))
        fields.update(fields.pop("size"))
        try:
            built.append(ResNetArch(**fields))
        except ArchError:
            pass  # not a network: nothing to name
    return built


def test_names_are_unique_exactly_when_the_descriptions_differ():
    descriptions = _descriptions()
    by_name: dict[str, set[ResNetArch]] = defaultdict(set)
    for arch in descriptions:
        by_name[arch.name].add(arch)
    shared = {name: archs for name, archs in by_name.items() if len(archs) > 1}
    assert not shared, f"{len(shared)} names shared by different networks, e.g. " \
                       f"{next(iter(shared.items())) if shared else ''}"
    assert len(by_name) == len(set(descriptions)) > 1000  # the grid reached many networks


def test_custom_cifar_stages_are_named_apart_from_the_depths_equal_stages():
    assert ResNetArch(depth=14).name == "resnet14-cifar-A"
    assert ResNetArch(stages=(1, 2, 3)).name == "resnet14-cifar-stages1.2.3-A"
    # Four stages of three blocks and three of four are both 26 layers deep.
    assert ResNetArch(depth=26).name == "resnet26-cifar-A"
    assert ResNetArch(stages=(3, 3, 3, 3)).name == "resnet26-cifar-stages3.3.3.3-A"


@pytest.mark.parametrize("fields", [{"depth": 20}, {"stages": (3, 3, 3)},
                                    {"stages": [3, 3, 3], "widths": [16, 32, 64], "shortcut": "a"}])
def test_spellings_of_one_network_share_its_name(fields):
    assert ResNetArch(**fields).name == "resnet20-cifar-A"


@pytest.mark.parametrize("fields,name", [
    ({"depth": 20}, "resnet20-cifar-A"),
    ({"depth": 56}, "resnet56-cifar-A"),
    ({"depth": 110, "shortcut": "none"}, "plain110-cifar"),
    ({"depth": 56, "shortcut": "B"}, "resnet56-cifar-B"),
    ({"depth": 20, "widths": (32, 64, 128)}, "resnet20-cifar-A-w32.64.128"),
    ({"depth": 29, "block": "bottleneck", "shortcut": "B"}, "resnet29-cifar-bottleneck-B-v1"),
    ({"depth": 56, "block": "bottleneck", "shortcut": "B", "base_width": 32},
     "resnet56-cifar-bottleneck-B-bw32-v1"),
    ({"family": "imagenet", "depth": 18}, "resnet18-imagenet-B"),
    ({"family": "imagenet", "depth": 34, "shortcut": "none"}, "plain34-imagenet"),
    ({"family": "imagenet", "depth": 50}, "resnet50-imagenet-B-v1"),
    ({"family": "imagenet", "depth": 50, "downsampling": "v1.5", "base_width": 128},
     "resnet50-imagenet-B-bw128-v1.5"),
    ({"family": "imagenet", "stages": (2, 2, 2, 2), "block": "bottleneck", "fused": False},
     "resnet26-imagenet-bottleneck-stages2.2.2.2-B-v1-unfused"),
])
def test_standard_names_are_unchanged(fields, name):
    assert ResNetArch(**fields).name == name


def test_a_base_width_that_leaves_a_stage_no_inner_channel_is_refused_where_the_least_builds():
    """The description passed, the spec check with it, and the model raised in the driver
    (bottleneck width 16 x 1 // 64 = 0), leaving a trial running."""
    from resnet_ablate.models import build

    with pytest.raises(ArchError, match=r"base_width=3 leaves the stage of 16 filters no inner "
                                        r"channel \(16 x 3 // 64 = 0\): base_width >= 4"):
        ResNetArch(family="cifar", block="bottleneck", depth=11, base_width=3)
    least = build(ResNetArch(family="cifar", block="bottleneck", depth=11, base_width=4))
    assert least.layer1[0].conv1.out_channels == 1

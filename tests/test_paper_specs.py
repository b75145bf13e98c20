"""The shipped specs ask the paper's Tables 2, 3 (ImageNet) and 6 (CIFAR-10) as it measured them:
every row's architecture, with seeds and the paper's protocol; the architectures' parameter
counts checked against the published figures and against counts made by hand."""

from pathlib import Path

import pytest

from resnet_ablate.models import build
from resnet_ablate.profile import count_parameters
from resnet_ablate.spec import load_spec

STUDIES = Path(__file__).resolve().parent.parent / "studies"
# torchvision's resnet18 / resnet34 (option B, the stride on the 3x3: the same count as v1).
RESNET18_B, RESNET34_B = 11_689_512, 21_797_672
WIDTHS, STAGES_34 = (64, 128, 256, 512), (3, 4, 6, 3)


def _params(spec) -> dict[str, int]:
    return {spec.arch(point).name: count_parameters(build(spec.arch(point), num_classes=1000))
            for point in spec.grid()}


def _projection(c_in: int, c_out: int) -> int:
    return c_in * c_out + 2 * c_out  # a 1x1 convolution without bias, and its BatchNorm


# Option B's projections where the width doubles; option C's on every other block too.
DOUBLING = sum(_projection(a, b) for a, b in zip(WIDTHS, WIDTHS[1:]))
IDENTITY_34 = sum((blocks - (i > 0)) * _projection(w, w)
                  for i, (w, blocks) in enumerate(zip(WIDTHS, STAGES_34)))


def _paper_protocol(spec) -> None:
    assert spec.seeds == (0, 1, 2)
    assert "ten_crop" in spec.train.test_views, "Tables 2 and 3 report 10-crop testing"
    assert (spec.train.lighting, spec.train.mean, spec.train.schedule) == (0.1, "pixel", "plateau")
    assert (spec.train.batch_size, spec.train.lr, spec.train.weight_decay) == (256, 0.1, 1e-4)


def test_table_3_resnet_34_with_shortcut_options_a_b_c():
    spec = load_spec(STUDIES / "imagenet_shortcuts.yaml")
    _paper_protocol(spec)
    assert _params(spec) == {"resnet34-imagenet-A": RESNET34_B - DOUBLING,
                             "resnet34-imagenet-B": RESNET34_B,
                             "resnet34-imagenet-C": RESNET34_B + IDENTITY_34}


def test_table_3_deep_rows_have_the_published_parameter_counts():
    spec = load_spec(STUDIES / "imagenet_deep.yaml")
    _paper_protocol(spec)
    params = _params(spec)
    assert [spec.arch(p).depth for p in spec.grid()] == [50, 101, 152]
    assert [round(n / 1e6, 1) for n in params.values()] == [25.6, 44.5, 60.2]


def test_table_2_plain_and_residual_18_and_34():
    spec = load_spec(STUDIES / "imagenet_plain_vs_residual.yaml")
    _paper_protocol(spec)
    # Option A adds no parameter: a residual net counts as its plain twin.
    assert _params(spec) == {"plain18-imagenet": RESNET18_B - DOUBLING,
                             "resnet18-imagenet-A": RESNET18_B - DOUBLING,
                             "plain34-imagenet": RESNET34_B - DOUBLING,
                             "resnet34-imagenet-A": RESNET34_B - DOUBLING}


@pytest.mark.parametrize("name", ["imagenet_shortcuts", "imagenet_deep",
                                  "imagenet_plain_vs_residual"])
def test_the_paper_specs_train_at_the_papers_crop(name):
    spec = load_spec(STUDIES / f"{name}.yaml")
    assert (spec.dataset.name, spec.dataset.image_size, spec.dataset.augmentation) == (
        "imagefolder", 224, "scale")
    assert all(spec.arch(p).downsampling == "v1" for p in spec.grid())


def test_table_6_cifar10_depths_with_the_papers_recipe():
    """Sec. 4.2: 6n+2 layers, option A, SGD (momentum 0.9, weight decay 1e-4, batch 128) from lr
    0.1, divided by 10 at 32k and 48k iterations and ended at 64k (164 epochs of 50k images),
    the per-pixel mean subtracted, augmentation on (padding and crop, flip); ResNet-110 warmed up
    at lr 0.01 until the training error is below 80%. Table 6's parameter counts."""
    spec = load_spec(STUDIES / "cifar10_depth.yaml")
    assert spec.dataset.name == "cifar10" and spec.seeds == (0, 1, 2, 3, 4)
    assert not spec.dataset.validation  # all 50k training images, as the table's runs
    archs = [spec.arch(point) for point in spec.grid()]
    assert [a.depth for a in archs] == [20, 32, 44, 56, 110]
    assert {a.shortcut for a in archs} == {"A"}
    params = [count_parameters(build(a, num_classes=10)) / 1e6 for a in archs]
    assert [round(p, 2) for p in params[:4]] == [0.27, 0.46, 0.66, 0.85]
    assert round(params[4], 1) == 1.7
    recipe = spec.train
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.momentum, recipe.nesterov,
            recipe.weight_decay, recipe.gamma, recipe.schedule) == (164, 128, 0.1, 0.9, False,
                                                                    1e-4, 0.1, "step")
    assert (recipe.mean, recipe.augment) == ("pixel", True)
    # The iterations at which the schedule's learning rate falls, and the last
    steps_per_epoch = -(-50_000 // 128)  # the last, short batch kept
    rates = [recipe.lr_at(epoch) for epoch in range(1, recipe.epochs + 1)]
    falls = [epoch * steps_per_epoch for epoch, (a, b) in enumerate(zip(rates, rates[1:]), 1)
             if b < a]
    assert [round(step, -3) for step in falls] == [32_000, 48_000]
    assert rates[0] == 0.1 and rates[-1] == pytest.approx(0.001)
    assert round(recipe.epochs * steps_per_epoch, -3) == 64_000
    warmed = [a.depth for a in archs if spec.recipe_for(a).warmup]
    assert warmed == [110]
    assert (spec.recipe_for(archs[-1]).warmup_lr, spec.recipe_for(archs[-1]).warmup_until_error) \
        == (0.01, 0.8)

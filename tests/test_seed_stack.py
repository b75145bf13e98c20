"""Seeds stacked into one model (resnet_ablate/seed_stack.py), against the same seeds' models
run one by one: outputs, BatchNorm statistics, gradients and an SGD step, in float64 (the fused
layers' Triton kernels, under the interpreter, in float32)."""

import copy
import dataclasses
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_ablate import resnet8, resnet50
from resnet_ablate.kernels import use_backend
from resnet_ablate.models import cifar_resnet
from resnet_ablate.seed_stack import seed_state_dict, stack_models

SEEDS = 3


def _models(seeds=SEEDS, dtype=torch.float64, **options):
    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        models.append(resnet8(num_classes=5, **options).to(dtype))
    return models


def _batches(seeds=SEEDS, n=6, size=8, dtype=torch.float64):
    generator = torch.Generator().manual_seed(99)
    images = [torch.randn(n, 3, size, size, dtype=dtype, generator=generator)
              for _ in range(seeds)]
    labels = torch.randint(0, 5, (n, seeds), generator=generator)
    return images, labels


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("fused, backend", [(True, "torch"), (False, "torch"), (True, "triton")],
                         ids=["fused", "plain", "fused-triton"])
def test_stacked_seeds_train_as_each_seed_alone(shortcut, fused, backend):
    """One training step of the stacked model (its summed loss: K times cross_entropy over the
    (N, classes, K) logits) against each seed's own step: logits, running statistics, weights
    after SGD with momentum and weight decay, each seed's state_dict."""
    # float64 agrees to rounding; the kernels' float32 reductions split K*C channels otherwise
    dtype, tolerance = ((torch.float64, dict(rtol=1e-9, atol=1e-12)) if backend == "torch" else
                        (torch.float32, dict(rtol=2e-4, atol=2e-5)))
    models = _models(shortcut=shortcut, fused=fused, dtype=dtype)
    stacked = stack_models(models)
    images, labels = _batches(dtype=dtype)
    settings = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    with use_backend(backend):
        logits = stacked(torch.cat(images, dim=1))
        assert logits.shape == (6, 5, SEEDS)
        loss = F.cross_entropy(logits, labels) * SEEDS
        optimizer = torch.optim.SGD(stacked.parameters(), **settings)
        loss.backward()
        optimizer.step()
        for seed, model in enumerate(models):
            alone = model(images[seed])
            torch.testing.assert_close(logits[..., seed], alone, **tolerance)
            F.cross_entropy(alone, labels[:, seed]).backward()
            torch.optim.SGD(model.parameters(), **settings).step()
    for seed, model in enumerate(models):
        own = seed_state_dict(stacked, seed)
        expected = model.state_dict()
        assert own.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(own[key], value, **tolerance, msg=key)
        reloaded = copy.deepcopy(model)
        reloaded.load_state_dict(own)  # loads into the architecture it came from


def test_stacked_eval_uses_each_seeds_running_statistics():
    models = _models()
    for seed, model in enumerate(models):  # running statistics that differ per seed
        model.bn1.running_mean.fill_(0.1 * seed)
        model.bn1.running_var.fill_(1.0 + seed)
    stacked = stack_models(models).eval()
    images, _ = _batches()
    with torch.no_grad():
        logits = stacked(torch.cat(images, dim=1))
        for seed, model in enumerate(models):
            torch.testing.assert_close(logits[..., seed], model.eval()(images[seed]))


def test_a_bottleneck_net_with_grouped_convolutions_stacks_too():
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(cifar_resnet(11, block="bottleneck", num_classes=4).double())
    for model in models:  # a grouped convolution inside: its groups stay each seed's own
        model.layer1[0].conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=True).double()
    stacked = stack_models(models)
    images, _ = _batches(seeds=2)
    logits = stacked(torch.cat(images, dim=1))
    for seed, model in enumerate(models):
        torch.testing.assert_close(logits[..., seed], model(images[seed]))


def test_what_stacking_would_get_wrong_is_refused_by_name():
    with pytest.raises(ValueError, match="model 1 differs from model 0 in fc"):
        stack_models([resnet8(), resnet8(num_classes=3)])
    strided = _models(seeds=2)
    strided[1].conv1.stride = (2, 2)  # a setting the stacked model could hold only once
    with pytest.raises(ValueError, match="model 1 differs from model 0 in conv1"):
        stack_models(strided)
    frozen = _models(seeds=2)
    frozen[1].conv1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="differs from model 0 in conv1"):
        stack_models(frozen)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4, affine=False))  # mixes channels
    with pytest.raises(ValueError, match="cannot stack 1, a GroupNorm"):
        stack_models([odd, copy.deepcopy(odd)])

    class Standardised(nn.Conv2d):  # a forward of its own, which a plain Conv2d would drop
        def forward(self, x):
            return super().forward(x) * 2

    own_forward = nn.Sequential(Standardised(3, 4, 3))
    with pytest.raises(ValueError, match="cannot stack 0, a Standardised"):
        stack_models([own_forward, copy.deepcopy(own_forward)])
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared parameter: 0.weight is also 1.weight"):
        stack_models([tied, copy.deepcopy(tied)])
    with pytest.raises(TypeError, match="a list of models"):
        stack_models(nn.Sequential(resnet8(), resnet8()))
    with pytest.raises(ValueError, match="at least one model"):
        stack_models([])
    stacked = stack_models(_models(seeds=2))
    for bad in (2, -1, True):
        with pytest.raises(ValueError, match=r"seed must be an int in 0..1"):
            seed_state_dict(stacked, bad)
    with pytest.raises(ValueError, match="not a model made by stack_models"):
        seed_state_dict(resnet8(), 0)


def test_a_seeds_state_is_its_own_copy_with_every_key_the_model_saves():
    """seed_state_dict copies (saved alone; writing to it leaves the stacked model as it is),
    with the keys a model adds besides its tensors: a v1 ResNet-50's downsampling marker, which
    a state without it would load with a warning to rebuild as v1.5."""
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(resnet50(widths=(8, 8, 8, 8), num_classes=3).double())
    stacked = stack_models(models)
    own = seed_state_dict(stacked, 1)
    assert own.keys() == models[1].state_dict().keys()
    fresh = resnet50(widths=(8, 8, 8, 8), num_classes=3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DownsamplingWarning
        fresh.load_state_dict(own, strict=True)
    x = torch.randn(2, 6, 32, 32, dtype=torch.float64)
    stacked.eval(), fresh.eval()
    torch.testing.assert_close(stacked(x)[..., 1], fresh(x[:, 3:]))
    before = stacked.conv1.weight.detach().clone()
    own["conv1.weight"].zero_()
    assert torch.equal(stacked.conv1.weight, before) and not own["conv1.weight"].requires_grad
    assert own["conv1.weight"].untyped_storage().nbytes() == own["conv1.weight"].nbytes


def test_a_head_of_two_linear_layers_stacks():
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
             for _ in range(3)]
    stacked = stack_models(heads)
    x = [torch.randn(4, 3, 2, 2, dtype=torch.float64) for _ in range(3)]
    out = stacked(torch.cat(x, dim=1))
    for seed, head in enumerate(heads):
        torch.testing.assert_close(out[..., seed], head(x[seed]))


def _project_steps_agree(device: str, cuda_graphs: bool, steps: int, tolerance: dict,
                         rates: list[float] | None = None) -> None:
    """The project's training step (train/step.py) on the stacked model, given each seed's labels
    (N, K), against its step on each model alone: float32, channels_last, SGD with momentum and
    weight decay; with `cuda_graphs`, the stacked step captured and replayed. With `rates`, a
    rate per seed (SeedSGD), set before the last two steps (after the capture, on CUDA)."""
    from resnet_ablate.execution import Execution
    from resnet_ablate.recipe import TrainRecipe
    from resnet_ablate.replicas import Replicas
    from resnet_ablate.train.step import Step

    models = [m.to(device, memory_format=torch.channels_last)
              for m in _models(dtype=torch.float32)]
    stacked = stack_models(models)
    images, labels = _batches(dtype=torch.float32)
    images = [x.to(device).contiguous(memory_format=torch.channels_last) for x in images]
    labels = labels.to(device)
    recipe = TrainRecipe(batch_size=6, lr=0.1, momentum=0.9, weight_decay=1e-4)
    eager = Execution(device, "fp32", "channels_last", compile=False, cuda_graphs=False)
    step = Step(stacked, recipe, dataclasses.replace(eager, cuda_graphs=cuda_graphs), Replicas(),
                seeds=SEEDS, rate_per_seed=rates is not None)
    alone = [Step(m, recipe, eager, Replicas()) for m in models]
    stacked_input = torch.cat(images, dim=1).contiguous(memory_format=torch.channels_last)
    for index in range(steps):
        if rates is not None and index == steps - 2:
            step.set_lr(rates)
            for own, rate in zip(alone, rates):
                own.set_lr(rate)
        step.start_epoch()
        step(stacked_input, labels, 1.0)
        for seed, own in enumerate(alone):
            own.start_epoch()
            own(images[seed], labels[:, seed], 1.0)
    assert (step.graphed is not None) == cuda_graphs
    for seed, model in enumerate(models):
        own = seed_state_dict(stacked, seed)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(own[key], value, **tolerance, msg=key)
    # The step's running sums, one per seed: each seed's loss and wrong answers, as alone.
    torch.testing.assert_close(step.loss_sum, torch.stack([s.loss_sum for s in alone]),
                               **tolerance)
    assert step.wrong.tolist() == [s.wrong.item() for s in alone]


@pytest.mark.parametrize("rates", [None, [0.1, 0.01, 0.05]], ids=["one-rate", "rate-per-seed"])
def test_the_project_step_trains_stacked_seeds_as_each_alone(rates):
    _project_steps_agree("cpu", cuda_graphs=False, steps=4, tolerance=dict(rtol=1e-4, atol=1e-5),
                         rates=rates)


@pytest.fixture
def ieee_float32_convolutions(monkeypatch):
    """cuDNN's float32 convolutions in float32: by default it may run them on TF32 tensor cores
    (10-bit mantissas), where a stacked model and its seeds' own models, a last bit apart after
    a step (other kernels, other sums), drift apart by TF32's rounding within a few steps (an
    audit's CPU model of TF32: 12-110x these tests' tolerances after six)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.gpu
def test_stacked_seeds_train_as_each_seed_alone_on_cuda_from_a_cuda_graph(
        ieee_float32_convolutions):
    """On a GPU, as a trial runs them: fused kernels, grouped convolutions by cuDNN, and the
    step captured in a CUDA graph and replayed (GRAPH_WARMUP_STEPS eager steps, the capture,
    replays), against each seed's own eager steps; cuDNN's algorithms and the kernels' splits
    differ with the width, hence float32's tolerance compounded over the steps."""
    from resnet_ablate.train.step import GRAPH_WARMUP_STEPS

    _project_steps_agree("cuda", cuda_graphs=True, steps=GRAPH_WARMUP_STEPS + 3,
                         tolerance=dict(rtol=2e-3, atol=2e-4))


@pytest.mark.gpu
def test_stacked_seeds_at_rates_of_their_own_replay_the_rates_set_after_the_capture(
        ieee_float32_convolutions):
    """SeedSGD in a captured step: the rates set after the capture (as warm-up's end sets them)
    are the ones the replays step with, each seed's as its own step at its rate."""
    from resnet_ablate.train.step import GRAPH_WARMUP_STEPS

    _project_steps_agree("cuda", cuda_graphs=True, steps=GRAPH_WARMUP_STEPS + 3,
                         tolerance=dict(rtol=2e-3, atol=2e-4), rates=[0.1, 0.01, 0.05])


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format],
                         ids=["channels_last", "nchw"])
def test_the_stacked_option_a_shortcut_pads_each_seed_and_keeps_the_layout(layout):
    """Each seed's channels subsampled and padded as ZeroPadShortcut pads one seed's, in the
    layout it came in (the fused residual add would otherwise copy them to match)."""
    from resnet_ablate.blocks import ZeroPadShortcut
    from resnet_ablate.seed_stack import SeedZeroPadShortcut

    alone = ZeroPadShortcut(16, 32, stride=2)
    inputs = [torch.randn(2, 16, 8, 8).contiguous(memory_format=layout) for _ in range(3)]
    out = SeedZeroPadShortcut(alone, 3)(torch.cat(inputs, dim=1).contiguous(memory_format=layout))
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, torch.cat([alone(x) for x in inputs], dim=1), rtol=0, atol=0)


def test_a_diverged_seed_keeps_its_nan_to_itself():
    """A seed whose weights went NaN: the others' logits, gradients and running statistics are
    still each model's own (grouped convolutions and per-channel BatchNorm never mix them)."""
    models = _models()
    with torch.no_grad():
        models[1].conv1.weight.fill_(float("nan"))
    stacked = stack_models(models)
    images, labels = _batches()
    logits = stacked(torch.cat(images, dim=1))
    (SEEDS * F.cross_entropy(logits, labels)).backward()
    assert logits[..., 1].isnan().all()
    for seed in (0, 2):
        alone = models[seed](images[seed])
        F.cross_entropy(alone, labels[:, seed]).backward()
        torch.testing.assert_close(logits[..., seed], alone)
        grads = seed_state_dict_of_grads(stacked, seed)
        for name, parameter in models[seed].named_parameters():
            torch.testing.assert_close(grads[name], parameter.grad, msg=name)


def seed_state_dict_of_grads(stacked, seed):
    """Seed `seed`'s slice of each stacked parameter's gradient, by the parameter's name."""
    from resnet_ablate.seed_stack import SeedLinear

    grads = {}
    for prefix, module in stacked.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            grad = parameter.grad
            own = grad[seed] if isinstance(module, SeedLinear) else grad.chunk(SEEDS)[seed]
            grads[f"{prefix}.{name}" if prefix else name] = own
    return grads


# How far a seed's first-epoch mean training loss on digits (23 SGD steps of a ResNet-8) may move
# between a stacked and an alone run: float32 rounding (grouped convolutions sum in another
# order), amplified by the steps, measured at 2.5e-4 with one thread and 0.6e-4 with two; the same
# initial weights with another data order move it by 0.9-5%. The test pins one thread, the case
# that rounds furthest apart.
FIRST_EPOCH_ROUNDING = 2e-3


def _digits_recipe(**changes):
    from resnet_ablate.recipe import TrainRecipe

    return TrainRecipe(**{"epochs": 2, "batch_size": 64, "lr": 0.05, **changes})


def test_train_seeds_gives_each_seed_what_train_gives_it():
    """train_seeds (3 seeds of a fused ResNet-8 on digits) against train() of each seed alone:
    the same initial weights, data order, schedule and evaluation, so the same first epoch up to
    rounding (FIRST_EPOCH_ROUNDING; another data order moves it by percents), and later epochs
    within the drift training amplifies such rounding into (about 1% of the loss by the third
    epoch here)."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("digits")
    recipe = _digits_recipe()

    def model():
        return resnet8(in_channels=1, num_classes=10)

    stacked = train_seeds(model, data, recipe, seeds=[0, 1, 2], threads=1)
    for seed, result in zip([0, 1, 2], stacked):
        alone = train(model, data, recipe, seed=seed, threads=1)
        assert result.ok and result.seed == seed and result.epochs_completed == recipe.epochs
        assert result.execution.stacked_seeds == 3
        assert result.test_images == alone.test_images
        first, then = result.history[0], alone.history[0]
        assert first.train_loss == pytest.approx(then.train_loss, rel=FIRST_EPOCH_ROUNDING)
        assert first.train_error == pytest.approx(then.train_error, abs=1.5 / 1437)  # 1 image
        for mine, theirs in zip(result.history, alone.history):
            assert mine.lr == theirs.lr
            assert mine.train_loss == pytest.approx(theirs.train_loss, rel=3e-2)
            assert mine.test_error == pytest.approx(theirs.test_error, abs=3 / alone.test_images)


def test_train_seeds_refuses_what_its_seeds_cannot_share():
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("digits")
    with pytest.raises(TypeError, match="a model factory"):
        train_seeds(resnet8(), data, _digits_recipe(), seeds=[0, 1])
    with pytest.raises(ValueError, match="distinct ints"):
        train_seeds(resnet8, data, _digits_recipe(), seeds=[1, 1])
    with pytest.raises(TypeError, match="a list of ints"):
        train_seeds(resnet8, data, _digits_recipe(), seeds=3)
    with pytest.raises(ValueError, match="neither compile nor fp16"):
        train_seeds(resnet8, data, _digits_recipe(precision="fp16"), seeds=[0, 1])
    with pytest.raises(TypeError, match="returned NoneType"):
        train_seeds(lambda: None, data, _digits_recipe(), seeds=[0, 1])


def _nan_for_seed_1():
    """ResNet-8 for digits; built under seed 1 (the factory runs under each seed), with a NaN
    weight, so that seed diverges in its first steps."""
    net = resnet8(in_channels=1, num_classes=10)
    if torch.initial_seed() == 1:
        with torch.no_grad():
            net.conv1.weight[0, 0, 0, 0] = float("nan")
    return net


def test_train_seeds_records_a_diverged_seed_and_trains_the_others_on():
    """Seed 1's model is built with a NaN weight (the factory runs under each seed): it is
    recorded as diverged, while seeds 0 and 2 complete as they would alone."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("digits")
    recipe = _digits_recipe(epochs=1)
    results = train_seeds(_nan_for_seed_1, data, recipe, seeds=[0, 1, 2], threads=1)
    assert [r.status for r in results] == ["completed", "diverged", "completed"]
    assert "loss" in results[1].reason and results[1].epochs_completed == 0
    # No epoch completed: no test record, as train() gives none.
    assert (results[1].test_images, results[1].test_wrong, results[1].test_outcomes) == (
        None, None, None)
    for seed in (0, 2):
        alone = train(_nan_for_seed_1, data, recipe, seed=seed, threads=1)
        assert results[seed].history[0].train_loss == pytest.approx(
            alone.history[0].train_loss, rel=FIRST_EPOCH_ROUNDING)


def test_on_end_tells_a_seeds_end_as_it_happens_so_a_later_error_loses_nothing():
    """Seed 1 (a NaN weight) diverges in the first epoch; on_end hands its diverged result over
    then, before an error raised at the end of that epoch (by on_epoch) ends the run; without
    the error every seed's result is handed over once, the one train_seeds returns."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train.seeds import train_seeds

    def fail(index, record):
        raise RuntimeError("the store went away")

    data, recipe = load_dataset("digits"), _digits_recipe(epochs=2)
    ended = {}
    with pytest.raises(RuntimeError, match="store went away"):
        train_seeds(_nan_for_seed_1, data, recipe, seeds=[0, 1], on_epoch=fail,
                    on_end=ended.__setitem__)
    assert list(ended) == [1] and ended[1].status == "diverged"
    assert ended[1].epochs_completed == 0 and "loss" in ended[1].reason
    handed = []
    results = train_seeds(_nan_for_seed_1, data, recipe, seeds=[0, 1],
                          on_end=lambda index, result: handed.append((index, result)))
    assert [index for index, _ in handed] == [1, 0]
    assert dict(handed) == dict(enumerate(results))


def test_a_seed_that_diverges_later_keeps_its_last_epochs_test_record():
    """At lr 20 seeds diverge in their second or third epoch; in float64 (stacked and alone agree
    to rounding until then) each seed's status, epochs and final test record (wrong answers and
    per-image outcomes) are those train() gives it alone: a diverged seed's record is its last
    completed epoch's, not the diverging epoch's scores."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("digits")
    data = dataclasses.replace(data, train_x=data.train_x.double(), test_x=data.test_x.double())
    recipe = _digits_recipe(epochs=3, lr=20.0, augment=False, precision="fp32",
                            memory_format="nchw")

    def model():
        return resnet8(in_channels=1, num_classes=10, fused=False).double()

    seeds = [1, 2, 5]
    results = train_seeds(model, data, recipe, seeds=seeds, threads=1)
    assert any(r.status == "diverged" and r.epochs_completed > 0 for r in results)
    for seed, result in zip(seeds, results):
        alone = train(model, data, recipe, seed=seed, threads=1)
        assert (result.status, result.epochs_completed) == (alone.status, alone.epochs_completed)
        assert (result.test_images, result.test_wrong, result.test_outcomes) == (
            alone.test_images, alone.test_wrong, alone.test_outcomes)


def test_a_seed_its_caller_stops_ends_there_while_the_others_train_on():
    """on_epoch returning True stops that seed after the epoch (status "stopped", its record
    that epoch's), as a pruner stops a trial; the others train on as alone; when every seed is
    stopped the run ends."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("digits")
    recipe = _digits_recipe(epochs=3)

    def model():
        return resnet8(in_channels=1, num_classes=10)

    began = time.perf_counter()
    results = train_seeds(model, data, recipe, seeds=[0, 1], threads=1,
                          on_epoch=lambda index, record: index == 1 and record.epoch == 1)
    elapsed = time.perf_counter() - began
    assert [(r.status, r.epochs_completed) for r in results] == [("completed", 3), ("stopped", 1)]
    # Each seed's wall_seconds is its share of the stacked run's time (half of it while both
    # run): the seeds' times add up to the run's, not to twice it.
    stacked_epochs = sum(record.seconds for record in results[0].history)
    assert stacked_epochs <= sum(r.wall_seconds for r in results) <= elapsed
    assert results[0].wall_seconds < stacked_epochs  # shared its first epoch
    # Training alone, the stacked run's, the same for every seed of an epoch
    assert all(0 < r.train_seconds < r.seconds for r in results[0].history)
    assert results[1].history[0].train_seconds == results[0].history[0].train_seconds
    assert results[1].wall_seconds <= results[1].history[0].seconds
    assert results[1].wall_seconds >= results[1].history[0].seconds / 2
    assert results[1].reason == "stopped after epoch 1"
    assert results[1].test_wrong == round(results[1].history[0].test_error * results[1].test_images)
    alone = train(model, data, recipe, seed=0, threads=1)
    assert results[0].history[0].train_loss == pytest.approx(alone.history[0].train_loss,
                                                             rel=FIRST_EPOCH_ROUNDING)
    epochs_run = []
    stopped = train_seeds(model, data, recipe, seeds=[0, 1],
                          on_epoch=lambda index, record: epochs_run.append(record.epoch) or True)
    assert [r.status for r in stopped] == ["stopped", "stopped"] and epochs_run == [1, 1]


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_seed_sgd_steps_each_seed_as_sgd_steps_it_alone_at_its_own_rate(nesterov):
    """SeedSGD on 3 stacked seeds against torch.optim.SGD on each seed's model at that seed's
    rate, in float64: two steps at one rate, then each seed at its own (set between steps, as
    warm-up's end sets them) for two more; and a SeedSGD loaded from the first's state_dict
    steps as the first does."""
    from resnet_ablate.train.seed_sgd import SeedSGD

    models = _models()
    stacked = stack_models(models)
    settings = dict(momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    optimizer = SeedSGD(stacked.parameters(), seeds=SEEDS, lr=0.1, **settings)
    alone = [torch.optim.SGD(m.parameters(), lr=0.1, **settings) for m in models]
    rates = [0.1, 0.01, 0.05]
    for step in range(4):
        if step == 2:
            optimizer.set_lrs(rates)
            for own, rate in zip(alone, rates):
                own.param_groups[0]["lr"] = rate
        images, labels = _batches()
        optimizer.zero_grad()
        (SEEDS * F.cross_entropy(stacked(torch.cat(images, dim=1)), labels)).backward()
        optimizer.step()
        for seed, (model, own) in enumerate(zip(models, alone)):
            own.zero_grad()
            F.cross_entropy(model(images[seed]), labels[:, seed]).backward()
            own.step()
    for seed, model in enumerate(models):
        mine = seed_state_dict(stacked, seed)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(mine[key], value, rtol=1e-9, atol=1e-12, msg=key)
    assert optimizer.lrs == rates
    copy_of_stacked = copy.deepcopy(stacked)
    loaded = SeedSGD(copy_of_stacked.parameters(), seeds=SEEDS, lr=0.5, **settings)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as saved and read back
    for model, opt in ((stacked, optimizer), (copy_of_stacked, loaded)):
        images, labels = _batches()
        opt.zero_grad()
        (SEEDS * F.cross_entropy(model(torch.cat(images, dim=1)), labels)).backward()
        opt.step()
    for a, b in zip(stacked.parameters(), copy_of_stacked.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seed_sgd_refuses_parameters_without_a_block_per_seed():
    from resnet_ablate.train.seed_sgd import SeedSGD

    with pytest.raises(ValueError, match="3 seeds' blocks"):
        SeedSGD([nn.Parameter(torch.zeros(4, 2))], seeds=3, lr=0.1)
    with pytest.raises(ValueError, match="one rate per seed"):
        SeedSGD([nn.Parameter(torch.zeros(6))], seeds=3, lr=0.1).set_lrs([0.1, 0.2])
    for bad in (dict(lr=-1.0), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0),
                dict(lr=float("nan"))):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            SeedSGD([nn.Parameter(torch.zeros(6))], seeds=3, **bad)
    with pytest.raises(ValueError, match="finite rates >= 0"):
        SeedSGD([nn.Parameter(torch.zeros(6))], seeds=3, lr=0.1).set_lrs([0.1, -0.1, 0.1])


def test_train_seeds_ends_each_seeds_warm_up_on_its_own_error():
    """The paper's warm-up (a low rate until the training error of the last 10 batches falls
    below a threshold) ends for each seed at the step it ends alone, which differs between
    seeds; each seed's epochs then match its run alone, within the drift that training
    amplifies rounding into (as test_train_seeds_gives_each_seed_what_train_gives_it allows)."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("digits")
    recipe = _digits_recipe(warmup=True, warmup_lr=0.01, warmup_until_error=0.6)

    def model():
        return resnet8(in_channels=1, num_classes=10)

    results = train_seeds(model, data, recipe, seeds=[0, 1, 2])
    steps = [r.warmup_steps for r in results]
    assert len(set(steps)) > 1  # the seeds' warm-ups end apart
    for seed, result in zip([0, 1, 2], results):
        alone = train(model, data, recipe, seed=seed)
        assert result.warmup_steps == alone.warmup_steps
        assert [h.lr for h in result.history] == [h.lr for h in alone.history]
        assert result.history[0].train_loss == pytest.approx(alone.history[0].train_loss,
                                                             rel=1e-3)
        for mine, theirs in zip(result.history, alone.history):
            assert mine.train_loss == pytest.approx(theirs.train_loss, rel=3e-2)


def test_train_seeds_decays_each_seeds_plateau_on_its_own_loss():
    """The plateau schedule on each seed's own training loss: seed 1 is built unable to learn
    (its stem's weights zero, so every ReLU after it stays shut and its loss stays at the
    class prior's), and its rate decays after two flat epochs, where the seeds that learn keep
    theirs; each as it would alone."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    def model():
        net = resnet8(in_channels=1, num_classes=10)
        if torch.initial_seed() == 1:
            with torch.no_grad():
                net.conv1.weight.zero_()
        return net

    data = load_dataset("digits")
    recipe = _digits_recipe(epochs=4, schedule="plateau", plateau_patience=1)
    results = train_seeds(model, data, recipe, seeds=[0, 1, 2])
    assert [h.lr for h in results[1].history] == pytest.approx([0.05, 0.05, 0.05, 0.005])
    for seed, result in zip([0, 1, 2], results):
        alone = train(model, data, recipe, seed=seed)
        assert result.status == alone.status
        assert [h.lr for h in result.history] == [h.lr for h in alone.history]
        if seed != 1:
            assert all(h.lr == 0.05 for h in result.history)


@pytest.mark.gpu
def test_train_seeds_on_cuda_replays_the_stacked_step_and_matches_each_seed_alone(
        ieee_float32_convolutions):
    """On a GPU with the trial's defaults (channels_last, fused kernels, CUDA graphs; fp32 so
    that the comparison is to rounding): each seed's first epoch as train() gives it."""
    from resnet_ablate.data import SyntheticSpec, load_dataset
    from resnet_ablate.train import train
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("synthetic", synthetic=SyntheticSpec(train_size=640, test_size=256))
    recipe = _digits_recipe(epochs=1, precision="fp32")

    def model():  # (the synthetic images' one channel: resnet8 takes three unless told)
        return resnet8(num_classes=data.num_classes, in_channels=data.in_channels)

    results = train_seeds(model, data, recipe, seeds=[0, 1, 2], device="cuda")
    assert all(r.ok and r.execution.cuda_graphs for r in results)
    for seed, result in zip([0, 1, 2], results):
        alone = train(model, data, recipe, seed=seed, device="cuda")
        assert result.history[0].train_loss == pytest.approx(alone.history[0].train_loss,
                                                             rel=1e-3)
        # Scored in one pass of the stacked model (evaluate_stacked), as its own evaluation.
        assert result.history[0].test_error == pytest.approx(alone.history[0].test_error,
                                                             abs=3 / alone.test_images)


def test_stacked_evaluation_scores_each_seed_as_its_own_evaluation():
    """One pass of the stacked model over the test set (evaluate_stacked) against each seed's
    own Evaluation of its own model, in float64 after a few steps of training (so that the
    seeds' running statistics differ): the same loss, wrong answers and per-image record."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.data.feed import Placement, feed_for
    from resnet_ablate.execution import Execution
    from resnet_ablate.replicas import Replicas
    from resnet_ablate.train.evaluate import Evaluation, evaluate_stacked

    data = load_dataset("digits")
    models = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        models.append(resnet8(in_channels=1, num_classes=10).double())
    stacked = stack_models(models)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # train mode: each seed's running statistics move its own way
        stacked(torch.randn(16, SEEDS, 8, 8, dtype=torch.float64, generator=generator))
    for seed, model in enumerate(models):
        model.load_state_dict(seed_state_dict(stacked, seed))
    execution = Execution("cpu", "fp32", "nchw", compile=False, cuda_graphs=False)

    def evaluation(seed):
        feed = feed_for(data, Placement(torch.device("cpu"), lambda x: x.double(), seed, False))
        return Evaluation(feed, 200, execution, Replicas(), "test")

    evaluations = [evaluation(seed) for seed in range(SEEDS)]
    scores = evaluate_stacked(stacked, evaluations)
    for seed, model in enumerate(models):
        own = evaluation(seed)
        loss, error, top5 = own(model)
        assert scores[seed][0] == pytest.approx(loss, rel=1e-6)  # logits scored in float32
        assert scores[seed][1:] == (error, top5)
        assert evaluations[seed].test_record == own.test_record
    assert len({record[1] for record in scores}) > 1  # the seeds' errors differ


def test_the_seeds_feeds_share_one_copy_of_the_data_set():
    """train_seeds places the data once (placed_once): each seed's feed, which would otherwise
    copy it into the run's memory format, finds its tensors there and holds the same storage."""
    from resnet_ablate.data import SyntheticSpec, load_dataset
    from resnet_ablate.data.feed import Placement, feed_for
    from resnet_ablate.execution import Execution
    from resnet_ablate.train.seeds import placed_once

    data = load_dataset("synthetic", synthetic=SyntheticSpec(channels=3, train_size=64,
                                                             test_size=32))
    execution = Execution("cpu", "fp32", "channels_last", compile=False, cuda_graphs=False)
    device = torch.device("cpu")

    def feeds(bundle):
        return [feed_for(bundle, Placement(device, execution.images, seed, True))
                for seed in range(3)]

    apart = feeds(data)  # NCHW RGB images: each feed's channels_last copy is its own
    assert len({f.train_x.data_ptr() for f in apart}) == 3
    shared = feeds(placed_once(data, device, execution.images))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert len({getattr(f, name).data_ptr() for f in shared}) == 1, name
    torch.testing.assert_close(shared[0].train_x, apart[0].train_x, rtol=0, atol=0)
    # With the per-pixel mean subtracted (mean: pixel): once, for all seeds, as each seed's
    # feed alone subtracts it.
    centred = placed_once(data, device, execution.images, pixel_mean=True)
    feeds_centred = [feed_for(centred, Placement(device, execution.images, seed, True,
                                                 pixel_mean=True)) for seed in range(3)]
    assert len({f.train_x.data_ptr() for f in feeds_centred}) == 1
    alone = feed_for(data, Placement(device, execution.images, 0, True, pixel_mean=True))
    torch.testing.assert_close(feeds_centred[0].train_x, alone.train_x, rtol=0, atol=0)
    torch.testing.assert_close(feeds_centred[0].test_x, alone.test_x, rtol=0, atol=0)
    assert alone.train_x.mean(dim=0).abs().max() < 1e-5


class _ChannelRoll(nn.Module):
    """A net whose container forward rolls its channels (a torch.cat of two slices): alone it is
    an ordinary model; stacked, it would hand one seed's channel to the next."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = torch.cat([x[:, 1:], x[:, :1]], dim=1)
        return self.fc(self.flat(self.pool(x)))


def test_an_example_batch_catches_a_forward_that_mixes_the_seeds():
    """stack_models cannot see a container's forward code: given an example batch it checks the
    stacked model on it against each seed's (in eval mode, every module's mode put back), which
    passes for the toolkit's nets (a NaN seed included) and refuses a net whose forward rolls
    its channels; train_seeds checks every run so, before training."""
    from resnet_ablate.data import load_dataset
    from resnet_ablate.train.seeds import train_seeds

    example = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    models = _models()
    with torch.no_grad():
        models[1].conv1.weight[0, 0, 0, 0] = float("nan")
    stacked = stack_models(models, example=example)
    assert stacked.training and all(m.training for m in models)
    torch.manual_seed(0)
    rolled = [_ChannelRoll() for _ in range(SEEDS)]
    stack_models(rolled)  # unseen without an example
    with pytest.raises(ValueError, match="mixes the seeds' channels"):
        stack_models(rolled, example=torch.randn(4, 1, 8, 8))
    assert all(m.training for m in rolled)
    with pytest.raises(ValueError, match="mixes the seeds' channels"):
        train_seeds(_ChannelRoll, load_dataset("digits"), _digits_recipe(), seeds=[0, 1])

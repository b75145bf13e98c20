"""Training: learning, the paper's schedule and warm-up, reproducibility, divergence, threads."""

import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from resnet_ablate.data import Augmentation, DataBundle, SyntheticSpec, load_dataset
from resnet_ablate.execution import resolve_execution
from resnet_ablate.models import build as build_model
from resnet_ablate.record import EpochRecord, ExecutionRecord
from resnet_ablate.train import WARMUP_WINDOW, TrainRecipe, train


def tiny_cnn(in_channels: int = 1, num_classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def synthetic() -> DataBundle:
    return load_dataset("synthetic", synthetic=SyntheticSpec(train_size=256, test_size=128))


def quick(**changes) -> TrainRecipe:
    return TrainRecipe(**{"epochs": 4, "batch_size": 32, **changes})


def curves(result):
    """Everything in the history except wall-clock seconds."""
    return [dataclasses.replace(record, seconds=0.0, train_seconds=0.0)
            for record in result.history]


# ---------------------------------------------------------------------------------------------
# Learning


def test_learns_synthetic_data_far_above_chance():
    result = train(tiny_cnn, synthetic(), quick(), seed=0, threads=1)
    assert result.status == "completed" and result.ok and result.reason is None
    assert result.epochs_completed == 4 and len(result.history) == 4
    assert result.final_test_accuracy > 0.8  # chance is 0.25
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.final_test_accuracy == 1 - result.history[-1].test_error
    assert result.best_test_accuracy == 1 - min(r.test_error for r in result.history)
    assert result.final_train_accuracy == 1 - result.history[-1].train_error
    assert result.images_per_second > 0 and result.wall_seconds > 0
    assert result.eval_split == "test"


def test_each_epoch_records_its_training_time_apart_from_its_evaluation():
    """An epoch's train_seconds is its training alone: within its seconds (which add the
    evaluation), and summed over the epochs, what the run's images/s is taken over."""
    result = train(tiny_cnn, synthetic(), quick(epochs=3), seed=0, threads=1)
    for record in result.history:
        assert 0 < record.train_seconds < record.seconds
    images = 3 * 256  # three epochs of the 256 training images
    assert sum(r.train_seconds for r in result.history) == pytest.approx(
        images / result.images_per_second, rel=1e-9)


def test_learns_real_digits():
    digits = load_dataset("digits")
    recipe = quick(epochs=3, batch_size=64)
    result = train(lambda: tiny_cnn(1, 10), digits, recipe, seed=0, threads=1)
    assert result.final_test_accuracy > 0.7  # chance is 0.1


def test_test_error_and_loss_are_the_final_models_on_the_whole_evaluation_set():
    data = synthetic()
    models = []

    def build():
        models.append(tiny_cnn())
        return models[-1]

    # An evaluation batch that does not divide the 128 test images: 50 + 50 + 28.
    result = train(build, data, quick(epochs=2, eval_batch_size=50), seed=0, threads=1)
    model = models[0].eval()
    with torch.no_grad():
        logits = model(data.test_x)
    record = result.history[-1]
    assert record.test_error == (logits.argmax(1) != data.test_y).sum().item() / 128
    assert record.test_loss == pytest.approx(
        torch.nn.functional.cross_entropy(logits, data.test_y).item(), rel=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Schedule and warm-up


@pytest.mark.parametrize(
    "epochs, expected",
    [
        (4, [0.1, 0.1, 0.01, 0.001]),
        (8, [0.1] * 4 + [0.01] * 2 + [0.001] * 2),
        # 75% of 10 epochs is 7.5: the decay starts with the first epoch after it, the ninth.
        (10, [0.1] * 5 + [0.01] * 3 + [0.001] * 2),
    ],
)
def test_learning_rate_steps_down_tenfold_at_half_and_three_quarters(epochs, expected):
    result = train(tiny_cnn, synthetic(), quick(epochs=epochs, batch_size=128), seed=0, threads=1)
    assert [r.lr for r in result.history] == pytest.approx(expected, rel=1e-12)


def test_default_schedule_is_the_papers_32k_and_48k_of_64k_iterations():
    recipe = TrainRecipe()
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.momentum, recipe.weight_decay) == (
        164, 128, 0.1, 0.9, 1e-4,
    )  # fmt: skip
    assert recipe.lr_at(82) == pytest.approx(0.1)
    assert recipe.lr_at(83) == pytest.approx(0.01)
    assert recipe.lr_at(123) == pytest.approx(0.01)
    assert recipe.lr_at(124) == pytest.approx(0.001)
    with pytest.raises(ValueError, match=r"epoch must be in \[1, 164\]"):
        recipe.lr_at(165)


def test_warmup_holds_the_warmup_lr_until_it_ends():
    data = synthetic()  # 256 images, batch 32: 8 steps an epoch
    never = train(tiny_cnn, data, quick(warmup=True, warmup_until_error=0.0), seed=0, threads=1)
    assert [r.lr for r in never.history] == pytest.approx([0.01, 0.01, 0.01, 0.001])
    assert never.warmup_steps == 32
    three_steps = quick(warmup=True, warmup_until_error=None, warmup_max_steps=3)
    capped = train(tiny_cnn, data, three_steps, seed=0, threads=1)
    assert capped.warmup_steps == 3
    assert [r.lr for r in capped.history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    # The paper's rule: back to 0.1 once the recent training error is below 80%, which this
    # learnable data reaches within the run but not before a full window of batches.
    paper = train(tiny_cnn, data, quick(warmup=True), seed=0, threads=1)
    assert WARMUP_WINDOW <= paper.warmup_steps < 32
    assert paper.history[-1].lr == pytest.approx(0.001)


def test_no_warmup_steps_without_warmup():
    assert train(tiny_cnn, synthetic(), quick(epochs=1), seed=0, threads=1).warmup_steps == 0


# ---------------------------------------------------------------------------------------------
# Reproducibility


def test_same_seed_gives_bitwise_equal_runs_and_weights():
    data = synthetic()
    models = []

    def build():
        models.append(tiny_cnn())
        return models[-1]

    first = train(build, data, quick(epochs=3), seed=7, threads=1)
    second = train(build, data, quick(epochs=3), seed=7, threads=1)
    assert curves(first) == curves(second)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    other = train(build, data, quick(epochs=3), seed=8, threads=1)
    assert curves(other) != curves(first)


def test_augmented_runs_are_reproducible_and_differ_from_unaugmented():
    base = synthetic()
    augmented = dataclasses.replace(base, augmentation=Augmentation(pad=1, flip=True))
    first = train(tiny_cnn, augmented, quick(epochs=2), seed=0, threads=1)
    second = train(tiny_cnn, augmented, quick(epochs=2), seed=0, threads=1)
    plain = train(tiny_cnn, augmented, quick(epochs=2, augment=False), seed=0, threads=1)
    assert curves(first) == curves(second)
    assert curves(plain) != curves(first)
    # augment=False is exactly training on the data without augmentation.
    assert curves(plain) == curves(train(tiny_cnn, base, quick(epochs=2), seed=0, threads=1))


def test_global_rng_state_is_left_as_it_was():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(tiny_cnn, synthetic(), quick(epochs=1), seed=0, threads=1)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# Divergence


def test_divergence_returns_a_failed_result_instead_of_raising():
    seen = []
    result = train(tiny_cnn, synthetic(), quick(lr=1e6), seed=0, threads=1, on_epoch=seen.append)
    assert result.status == "diverged" and not result.ok
    assert re.fullmatch(
        r"non-finite training loss at epoch 1, seen at step \d+ \(read every 25 steps\)",
        result.reason,
    )
    assert result.epochs_completed == 0 and result.history == () and seen == []
    assert result.final_test_accuracy is None and result.best_test_accuracy is None
    json.dumps(result.to_dict())


def test_a_finite_blow_up_is_divergence_too_and_healthy_runs_are_not():
    """A loss of 1e16 is finite but no result: staying far above the loss of guessing, it is
    diverged. A bad start that recovers (huge initial weights, two classes) is not."""
    def linear(classes=4, scale=1.0):
        def build():
            model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
            with torch.no_grad():
                model[1].weight.mul_(scale)
            return model
        return build

    blown = train(linear(), synthetic(), quick(lr=1e6, divergence_check_every=2), seed=0, threads=1)
    assert blown.status == "diverged"
    assert re.match(r"training loss [\d.e+]+, over 1000x the 1\.39 of guessing at two reads in a "
                    r"row, at epoch 1, seen at step \d+ \(read every 2 steps\)", blown.reason)
    healthy = train(linear(), synthetic(), quick(lr=0.1), seed=0, threads=1)
    assert healthy.ok and healthy.history[0].train_loss < 1.39
    two_classes = load_dataset("synthetic", synthetic=SyntheticSpec(num_classes=2, train_size=256))
    for every in (1, 25):
        bad_start = train(linear(2, scale=150.0), two_classes, quick(divergence_check_every=every),
                          seed=0, threads=1)
        assert bad_start.ok, bad_start.reason


def test_a_blow_up_that_settles_at_the_loss_of_guessing_is_diverged_with_its_losses():
    """lr 30 on digits: the loss jumps far above ln 10, then falls back to about guessing with 90%
    test error. No read is 1000x guessing twice, but the run never learned: diverged, not a
    result. At lr 3 it learns: completed."""
    digits = load_dataset("digits")
    recipe = quick(epochs=3, batch_size=64)
    blown = train(lambda: tiny_cnn(1, 10), digits, dataclasses.replace(recipe, lr=30.0), seed=0,
                  threads=1)
    assert blown.status == "diverged" and not blown.ok
    assert re.fullmatch(r"training loss rose to [\d.e+]+ at epoch \d, over 5x the 2\.3 of "
                        r"guessing, and ended at [\d.]+ \(training error [\d.]+\) at epoch 3, "
                        r"not below 0\.95x guessing: it never learned", blown.reason), blown.reason
    assert blown.epochs_completed == 3  # its curves are kept for a look
    learning = train(lambda: tiny_cnn(1, 10), digits, dataclasses.replace(recipe, lr=3.0), seed=0,
                     threads=1)
    assert learning.ok, learning.reason


def test_divergence_is_read_every_n_steps_and_at_the_end_of_the_epoch():
    data = synthetic()  # 8 steps an epoch
    seen_at = []
    for every in (1, 3, 100):
        result = train(tiny_cnn, data, quick(lr=1e6, divergence_check_every=every), seed=0, threads=1)
        assert result.status == "diverged"
        seen_at.append(int(re.search(r"seen at step (\d+)", result.reason).group(1)))
    first, by_three, at_end = seen_at
    assert first < 8  # this lr blows up within the epoch
    # Read every third step, the blow-up is seen at a read at most two reads after it happens.
    assert by_three % 3 == 0 and first <= by_three <= first + 2 * 3
    assert at_end == 8  # never read inside the epoch: read at its end


def test_steps_never_wait_for_the_host(monkeypatch):
    """Host reads (`Tensor.item`) per epoch do not grow with the number of steps."""
    reads = []
    real_item = torch.Tensor.item

    def counting_item(self):
        reads.append(1)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    counts = []
    for train_size in (128, 512):  # 4 and 16 steps an epoch
        data = load_dataset("synthetic", synthetic=SyntheticSpec(train_size=train_size, test_size=64))
        reads.clear()
        train(tiny_cnn, data, quick(epochs=2), seed=0, threads=1)
        counts.append(len(reads))
    assert counts[0] == counts[1] <= 2 * 6


# ---------------------------------------------------------------------------------------------
# Execution: precision, memory format, compilation


def test_cpu_defaults_are_fp32_channels_last_and_are_recorded():
    result = train(tiny_cnn, synthetic(), quick(epochs=1), seed=0, threads=1)
    assert result.execution == ExecutionRecord("cpu", "fp32", "channels_last", compile=False,
                                               cuda_graphs=False, decode="none", stacked_seeds=1)
    assert result.compile_seconds == 0.0
    json.dumps(result.to_dict())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_as_well_as_fp32(precision):
    data = synthetic()
    full = train(tiny_cnn, data, quick(), seed=0, threads=1)
    low = train(tiny_cnn, data, quick(precision=precision), seed=0, threads=1)
    assert low.ok and low.execution.precision == precision
    assert low.final_test_accuracy > 0.8
    assert abs(low.history[0].train_loss - full.history[0].train_loss) < 0.05
    assert low.history[-1].train_loss < low.history[0].train_loss


def test_channels_last_trains_the_same_network():
    data = synthetic()
    nchw = train(tiny_cnn, data, quick(memory_format="nchw"), seed=0, threads=1)
    cl = train(tiny_cnn, data, quick(), seed=0, threads=1)
    assert cl.execution.memory_format == "channels_last"
    for a, b in zip(nchw.history, cl.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-4)


def test_a_net_striding_a_1x1_conv_from_few_channels_trains_in_nchw_on_a_cpu():
    """PyTorch's CPU backward of a strided 1x1 conv in channels_last from fewer than 8 input
    channels corrupts the heap (tests/test_imagefolder.py's replica test, whose net strides its
    projection from 4 channels, crashed 4 runs in 5). Such a net trains in NCHW on a CPU, says so
    and records it, and gives what a run asked for NCHW gives; 8 channels keep channels_last, and
    so do stacked seeds, whose grouped convolutions PyTorch computes right."""
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.train.seeds import train_seeds

    data = load_dataset("synthetic", synthetic=SyntheticSpec(channels=3, image_size=16,
                                                             train_size=128, test_size=64))

    def net(width: int):
        arch = ResNetArch(family="imagenet", widths=(width, 8, 8, 8), stages=(1, 1, 1, 1),
                          block="basic", shortcut="B")
        return lambda: build_model(arch, num_classes=4, in_channels=3)

    lines: list[str] = []
    narrow = train(net(4), data, quick(epochs=2), seed=0, threads=1, log=lines.append)
    assert narrow.ok and narrow.execution.memory_format == "nchw"
    assert lines[0] == ("memory format nchw, not channels_last: layer2.0.downsample.0 strides a "
                        "1x1 convolution from 4 channels, whose channels_last backward "
                        "PyTorch's CPU kernels get wrong")
    asked = train(net(4), data, quick(epochs=2, memory_format="nchw"), seed=0, threads=1)
    assert curves(narrow) == curves(asked)
    wide = train(net(8), data, quick(epochs=1), seed=0, threads=1)
    assert wide.execution.memory_format == "channels_last"
    alone, = train_seeds(net(4), data, quick(epochs=1), seeds=[0], threads=1)
    assert alone.execution.memory_format == "nchw"
    stacked = train_seeds(net(4), data, quick(epochs=1), seeds=[0, 1], threads=1)
    assert all(r.ok and r.execution.memory_format == "channels_last" for r in stacked)


def test_compiled_runs_train_the_same_and_record_compile_time_apart():
    data = synthetic()  # 256 images in batches of 48: 5 full batches and one of 16
    recipe = quick(epochs=2, batch_size=48, eval_batch_size=100)
    eager = train(tiny_cnn, data, recipe, seed=0, threads=1)
    compiled = train(tiny_cnn, data, dataclasses.replace(recipe, compile=True), seed=0, threads=1,
                     compile_backend="aot_eager")
    assert compiled.execution.compile is True and compiled.compile_seconds > 0
    for a, b in zip(eager.history, compiled.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.test_error == pytest.approx(b.test_error, abs=1 / 128)


def test_every_compiled_trial_of_a_process_is_compiled():
    """Workers run trial after trial: the recompile limit must not send later ones to eager."""
    from torch._dynamo.utils import counters

    data = synthetic()
    recipe = quick(epochs=1, batch_size=48, eval_batch_size=100, compile=True)  # 4 shapes a trial
    for width in (8, 12, 16):  # 12 graphs in all: past the limit of 8 without a reset

        def build(width=width):
            return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))

        before = counters["stats"]["unique_graphs"]
        result = train(build, data, recipe, seed=0, threads=1, compile_backend="aot_eager")
        assert result.ok, result.reason
        assert counters["stats"]["unique_graphs"] - before >= 4  # train, remainder, 2 eval sizes


def test_cuda_only_choices_are_refused_on_a_cpu_with_the_reason():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, and this run is on cpu"):
        train(tiny_cnn, synthetic(), quick(cuda_graphs=True), seed=0, threads=1)


def test_cuda_graphs_auto_is_on_exactly_where_a_graph_can_capture_the_step(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    recipe = TrainRecipe()
    assert recipe.cuda_graphs == "auto"
    assert resolve_execution(recipe, "cuda").cuda_graphs is True
    # Each condition alone turns it off: streamed data, replicas, fp16's scaler, compile, a CPU.
    assert resolve_execution(recipe, "cuda", in_memory=False).cuda_graphs is False
    assert resolve_execution(recipe, "cuda", processes=2).cuda_graphs is False
    assert resolve_execution(quick(precision="fp16"), "cuda").cuda_graphs is False
    assert resolve_execution(quick(compile=True), "cuda").cuda_graphs is False
    assert resolve_execution(recipe, "cpu").cuda_graphs is False
    # A CPU trial under the default trains (no graphs) and records what ran.
    result = train(tiny_cnn, synthetic(), quick(), seed=0, threads=1)
    assert result.ok and result.execution.cuda_graphs is False
    for wrong in ("always", 1, None):
        with pytest.raises(ValueError, match="TrainRecipe.cuda_graphs must be auto, true or false"):
            TrainRecipe(cuda_graphs=wrong)


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """cuDNN's deterministic algorithms only (train() turns its autotuning on, which may pick
    ones that sum with atomics): two runs of the same steps then differ only where they run
    other kernels, not by the order of a sum, which bf16 would carry into every later step."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_graph_steps_train_like_eager_steps(precision, deterministic_cudnn):
    data = load_dataset("synthetic", synthetic=SyntheticSpec(train_size=300, test_size=128))
    recipe = quick(precision=precision, batch_size=32)  # 9 full batches and one of 12
    eager = train(tiny_cnn, data, dataclasses.replace(recipe, cuda_graphs=False), seed=0,
                  device="cuda")
    graphed = train(tiny_cnn, data, recipe, seed=0, device="cuda")  # cuda_graphs: auto
    assert not eager.execution.cuda_graphs
    assert graphed.execution.cuda_graphs and graphed.execution.memory_format == "channels_last"
    for a, b in zip(eager.history, graphed.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=2e-2)
    assert graphed.final_test_accuracy > 0.8


@pytest.mark.gpu
def test_cuda_defaults_are_bf16_channels_last():
    result = train(tiny_cnn, synthetic(), quick(epochs=1), seed=0, device="cuda")
    has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert result.execution.precision == ("bf16" if has_bf16 else "fp32")
    assert result.execution.memory_format == "channels_last"


# ---------------------------------------------------------------------------------------------
# Callbacks and threads


def test_on_epoch_sees_every_record_in_order_and_log_gets_lines():
    seen: list[EpochRecord] = []
    lines: list[str] = []
    result = train(
        tiny_cnn, synthetic(), quick(epochs=3), seed=0, threads=1,
        on_epoch=seen.append, log=lines.append,
    )
    assert seen == list(result.history)
    assert [r.epoch for r in seen] == [1, 2, 3]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3 lr 0.1 ")


class Stop(Exception):
    pass


def test_threads_are_set_for_the_run_and_restored_even_when_the_callback_raises():
    before = torch.get_num_threads()
    wanted = before + 1
    inside = []

    def note(record):
        inside.append(torch.get_num_threads())

    train(tiny_cnn, synthetic(), quick(epochs=1), seed=0, threads=wanted, on_epoch=note)
    assert inside == [wanted]
    assert torch.get_num_threads() == before

    def prune(record):
        raise Stop(f"pruned at {record.epoch}")

    with pytest.raises(Stop, match="pruned at 1"):
        train(tiny_cnn, synthetic(), quick(epochs=3), seed=0, threads=wanted, on_epoch=prune)
    assert torch.get_num_threads() == before


def test_bad_threads_and_seed_are_rejected():
    with pytest.raises(ValueError, match="threads must be None or an int >= 1, got 0"):
        train(tiny_cnn, synthetic(), quick(), seed=0, threads=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        train(tiny_cnn, synthetic(), quick(), seed="0")


# ---------------------------------------------------------------------------------------------
# Recipe


def test_recipe_from_dict_rejects_unknown_keys_listing_the_valid_ones():
    with pytest.raises(ValueError) as error:
        TrainRecipe.from_dict({"epochs": 3, "learning_rate": 0.1}, where="studies/x.yaml: train")
    message = str(error.value)
    assert "studies/x.yaml: train" in message and "'learning_rate'" in message
    assert "valid keys: epochs, batch_size, lr, momentum" in message and message.endswith(", preset")


def test_the_imagenet_preset_is_the_papers_section_3_4_recipe_with_overrides():
    recipe = TrainRecipe.from_dict({"preset": "imagenet", "epochs": 120})
    assert (recipe.batch_size, recipe.lr, recipe.momentum, recipe.weight_decay) == (256, 0.1, 0.9, 1e-4)
    # Divided by 10 at a third and two thirds of training: epochs 40 and 80 of 120.
    assert [recipe.lr_at(e) for e in (40, 41, 80, 81)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    assert TrainRecipe.from_dict({"preset": "cifar"}) == TrainRecipe()
    with pytest.raises(ValueError, match="preset 'resnet' is not a recipe; valid: cifar, imagenet"):
        TrainRecipe.from_dict({"preset": "resnet"})


def test_recipe_from_dict_round_trips_and_takes_lists():
    recipe = TrainRecipe.from_dict({"epochs": 10, "milestones": [0.3, 0.6], "warmup": True})
    assert recipe.milestones == (0.3, 0.6)
    assert TrainRecipe.from_dict(recipe.to_dict()) == recipe
    json.dumps(recipe.to_dict())


@pytest.mark.parametrize(
    "values, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -0.1}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"milestones": [0.75, 0.5]}, "milestones"),
        ({"milestones": [1.5]}, "milestones"),
        ({"warmup": True, "warmup_until_error": None}, "warmup_until_error"),
        ({"batch_size": 12.5}, "batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"memory_format": "nhwc"}, "memory_format"),
        ({"compile": "yes"}, "compile"),
        ({"divergence_check_every": 0}, "divergence_check_every"),
    ],
)
def test_recipe_rejects_bad_values_naming_the_field(values, field):
    with pytest.raises(ValueError, match=rf"^recipe\.{field} must be"):
        TrainRecipe.from_dict(values)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fused_resnet_steps_replayed_from_cuda_graphs_train_like_eager_ones(
        compile, deterministic_cudnn):
    """The fused op (Triton kernels, in-place running statistics) inside a captured step."""
    from resnet_ablate.arch import ResNetArch

    data = load_dataset("synthetic", synthetic=SyntheticSpec(
        num_classes=10, channels=3, image_size=8, train_size=300, test_size=100))
    arch = ResNetArch(family="cifar", depth=8, shortcut="A", fused=True)

    def build():
        return build_model(arch, num_classes=10, in_channels=3)

    recipe = quick(batch_size=32, compile=compile, cuda_graphs=False)
    eager = train(build, data, recipe, seed=0, device="cuda")
    graphed = train(build, data, dataclasses.replace(recipe, cuda_graphs=True), seed=0,
                    device="cuda")
    assert graphed.ok and graphed.execution.cuda_graphs
    for a, b in zip(eager.history, graphed.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=3e-2)
        assert a.test_loss == pytest.approx(b.test_loss, rel=5e-2)


@pytest.mark.parametrize("lr", [0.05, 1e-7], ids=["learning", "stalled"])
def test_the_plateau_schedule_decays_as_pytorchs_reduce_lr_on_plateau_would(lr):
    """The recorded lr of each epoch against PyTorch's own ReduceLROnPlateau fed the same
    training losses: a run that learns keeps its rate longer than one whose loss stalls."""
    recipe = TrainRecipe(epochs=9, batch_size=64, lr=lr, schedule="plateau", plateau_patience=1,
                         plateau_threshold=0.05, gamma=0.5, augment=False)
    data = load_dataset("synthetic", synthetic=SyntheticSpec(train_size=128, test_size=64))
    result = train(lambda: tiny_cnn(in_channels=data.in_channels, num_classes=data.num_classes),
                   data, recipe, seed=0)
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=1, threshold=0.05, threshold_mode="rel")
    expected = []
    for record in result.history:
        expected.append(optimizer.param_groups[0]["lr"])
        reference.step(record.train_loss)
    assert [r.lr for r in result.history] == pytest.approx(expected, rel=1e-12)
    if lr == 1e-7:
        assert expected[-1] < lr, "a stalled loss decays the rate"
    with pytest.raises(ValueError, match="lr_at follows the step schedule"):
        recipe.lr_at(1)


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("changes", [{}, {"warmup": True, "warmup_max_steps": 12},
                                     {"schedule": "plateau", "plateau_patience": 1, "plateau_threshold": 0.9}],
                         ids=["step", "warm-up", "plateau"])
def test_a_run_resumed_from_a_checkpoint_is_the_run_never_interrupted(changes):
    import io

    recipe = quick(epochs=4, milestones=(0.75,), **changes)
    states = []

    def keep(state):  # saved as a checkpoint is, so that later epochs cannot touch it
        buffer = io.BytesIO()
        torch.save(state, buffer)
        states.append(buffer.getvalue())

    whole = train(tiny_cnn, synthetic(), recipe, seed=5, threads=1, on_checkpoint=keep)
    assert len(states) == 4
    # The lr changes after the checkpoint (and warm-up is under way at it), so that the
    # schedule's state is put to the test.
    assert len({r.lr for r in whole.history[1:]}) == 2
    state = torch.load(io.BytesIO(states[0]), weights_only=False)  # after epoch 1
    resumed = train(tiny_cnn, synthetic(), recipe, seed=5, threads=1, resume=state)
    # The same epochs, to the last bit on a CPU: weights, optimizer, data order, augmentation
    # draws, the schedule's and the warm-up's state all came back.
    assert curves(resumed) == curves(whole)
    assert resumed.warmup_steps == whole.warmup_steps
    assert resumed.images_per_second > 0 and resumed.epochs_completed == 4


def test_a_resumed_runs_wall_time_counts_the_redone_epoch_and_the_restart():
    import io
    import time

    class Interrupted(Exception):
        pass

    recipe = quick(epochs=3)
    states, ends = [], []

    def keep(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        states.append(buffer.getvalue())

    def interrupt_in_epoch_2(record):
        ends.append(time.perf_counter())
        if record.epoch == 2:  # epoch 2 done but not checkpointed: it is trained again
            raise Interrupted

    before = time.perf_counter()
    with pytest.raises(Interrupted):
        train(tiny_cnn, synthetic(), recipe, seed=5, threads=1, on_epoch=interrupt_in_epoch_2,
              on_checkpoint=keep)
    time.sleep(0.5)  # the restart: a new process, or Ray Train's new worker group
    state = torch.load(io.BytesIO(states[0]), weights_only=True)  # after epoch 1
    resumed = train(tiny_cnn, synthetic(), recipe, seed=5, threads=1, resume=state,
                    on_epoch=lambda record: ends.append(time.perf_counter()))
    after = time.perf_counter()
    # The run began before its first epoch ended and ended after its last one did: its wall
    # time holds epoch 1, the lost epoch 2, the restart, and epochs 2 and 3 trained again.
    slack = 0.01  # the Unix clock the run counts across processes by, against this one
    assert ends[-1] - ends[0] - slack <= resumed.wall_seconds <= after - before + slack
    assert [r.epoch for r in resumed.history] == [1, 2, 3]


def _train_resnet8_on_cuda(replicas, recipe):
    from resnet_ablate.arch import ResNetArch

    return train(lambda: build_model(ResNetArch(family="cifar", depth=8), num_classes=4,
                                     in_channels=1), synthetic(), recipe, seed=0, device="cuda",
                 replicas=replicas).history


@pytest.mark.gpu
def test_replicas_on_a_gpu_train_like_one_process():
    # Two replicas on the one GPU a check machine has, joined by gloo: the data-parallel loop's
    # device paths (bf16 autocast, channels_last, the fused kernels under DDP) on CUDA.
    from helpers import run_replicas

    recipe = quick(epochs=2)
    single = _train_resnet8_on_cuda(None, recipe)
    first, second = run_replicas(_train_resnet8_on_cuda, 2, recipe)
    assert [r.train_loss for r in first] == [r.train_loss for r in second]
    assert first[0].train_loss == pytest.approx(single[0].train_loss, rel=0.1)
    assert first[-1].test_error < 0.5  # chance is 0.75

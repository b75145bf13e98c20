"""Seeds stacked into one model (resnet_ablate/seed_stack.py), against the same seeds' models
run one by one: outputs, BatchNorm statistics, gradients and an SGD step, in float64 (the fused
layers' Triton kernels, under the interpreter, in float32)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_ablate import resnet8
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


def test_models_of_different_architectures_or_unknown_layers_are_refused():
    with pytest.raises(ValueError, match="model 1 differs from model 0"):
        stack_models([resnet8(), resnet8(num_classes=3)])
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]))
    with pytest.raises(ValueError, match="cannot stack a LayerNorm"):
        stack_models([odd, copy.deepcopy(odd)])
    stacked = stack_models(_models(seeds=2))
    with pytest.raises(ValueError, match=r"seed must be in 0..1"):
        seed_state_dict(stacked, 2)
    with pytest.raises(ValueError, match="not a model made by stack_models"):
        seed_state_dict(resnet8(), 0)



def _project_steps_agree(device: str, cuda_graphs: bool, steps: int, tolerance: dict) -> None:
    """The project's training step (train/step.py) on the stacked model, given each seed's labels
    (N, K), against its step on each model alone: float32, channels_last, SGD with momentum and
    weight decay; with `cuda_graphs`, the stacked step captured and replayed."""
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
    step = Step(stacked, recipe, dataclasses.replace(eager, cuda_graphs=cuda_graphs), Replicas())
    alone = [Step(m, recipe, eager, Replicas()) for m in models]
    stacked_input = torch.cat(images, dim=1).contiguous(memory_format=torch.channels_last)
    for _ in range(steps):
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
    # The step's running sums: every seed's loss (summed over seeds) and every wrong answer.
    torch.testing.assert_close(step.loss_sum, sum(s.loss_sum for s in alone), **tolerance)
    assert step.wrong.item() == sum(s.wrong.item() for s in alone)


def test_the_project_step_trains_stacked_seeds_as_each_alone():
    _project_steps_agree("cpu", cuda_graphs=False, steps=3, tolerance=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.gpu
def test_stacked_seeds_train_as_each_seed_alone_on_cuda_from_a_cuda_graph():
    """On a GPU, as a trial runs them: fused kernels, grouped convolutions by cuDNN, and the
    step captured in a CUDA graph and replayed (GRAPH_WARMUP_STEPS eager steps, the capture,
    replays), against each seed's own eager steps; cuDNN's algorithms and the kernels' splits
    differ with the width, hence float32's tolerance compounded over the steps."""
    from resnet_ablate.train.step import GRAPH_WARMUP_STEPS

    _project_steps_agree("cuda", cuda_graphs=True, steps=GRAPH_WARMUP_STEPS + 3,
                         tolerance=dict(rtol=2e-3, atol=2e-4))

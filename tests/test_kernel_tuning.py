"""Autotuning of the elementwise passes' warps (kernels/_triton_tuning.py): the tuner keeps the
candidate its timer finds fastest, only elementwise passes are tuned, each once, and results are
those of the untuned kernels, against F.batch_norm + add + relu, and a candidate the device
cannot run is skipped. On a CPU the real kernels run through Triton's interpreter and a stand-in
timer decides; on CUDA the tuner's own timer does. That later launches use the chosen binary is
checked through the stand-in launcher (test_kernels.py, launch_through_stand_in.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_ablate.kernels import _triton_plans, _triton_tuning, fused_batch_norm, use_backend

from helpers import fresh_kernel_plans

SHAPES = [(2, 8, 4, 4), (2, 6, 7, 7)]  # row tiles, and NCHW 7x7 rows: the span kernels


def _layer(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, residual, grad = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    weight = (torch.rand(shape[1], generator=g) + 0.5).to(device)
    bias = torch.randn(shape[1], generator=g).to(device)
    return x, residual, weight, bias, grad


def _fused_step(x, residual, weight, bias, grad):
    """Output and the gradients of x, residual, weight and bias of one training step."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    with use_backend("triton"):
        out = fused_batch_norm(leaves[0], None, None, leaves[2], leaves[3], True,
                               residual=leaves[1])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def _reference_step(x, residual, weight, bias, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    out = F.relu(F.batch_norm(leaves[0], None, None, leaves[2], leaves[3], True) + leaves[1])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def _fresh_plans(monkeypatch):
    """Plans (and so templates) of this test's own, dropped afterwards."""
    fresh_kernel_plans(monkeypatch)


def _templates():
    """Every template of the plans made so far, by pass."""
    found = {}
    for plan in _triton_plans._FORWARD_PLANS.values():
        found.setdefault("statistics", []).append(plan.statistics)
        found.setdefault("normalize", []).append(plan.normalize)
    for plan in _triton_plans._BACKWARD_PLANS.values():
        found.setdefault("reduce", []).append(plan.reduce)
        found.setdefault("elementwise", []).append(plan.elementwise)
    return found


@pytest.mark.parametrize("shape", SHAPES)
def test_tuner_keeps_the_fastest_and_each_template_is_tuned_once(shape, monkeypatch):
    """A stand-in timer that makes 8 warps fastest: both elementwise passes end on 8 warps after
    one timing of each candidate, the reductions keep their warps, and a second step tunes
    nothing; outputs and gradients match F.batch_norm + add + relu and the untuned kernels'."""
    layer = _layer(shape, "cpu")
    _fresh_plans(monkeypatch)
    untuned = _fused_step(*layer)
    untuned_templates = _templates()
    reduction_warps = {name: [t.num_warps for t in untuned_templates[name]]
                       for name in ("statistics", "reduce")}

    _fresh_plans(monkeypatch)
    timed = []
    stand_in_ms = {2: 3.0, 4: 2.0, 8: 1.0, 16: 1.5}

    def timer(run):
        run()  # the candidate launches, as under the real timer
        warps = current[0].num_warps
        timed.append(warps)
        return stand_in_ms[warps]

    current = [None]
    real_tune = _triton_tuning.tune

    def tune(template, tensors, scalars, _timer):
        current[0] = template
        return real_tune(template, tensors, scalars, timer)

    monkeypatch.setattr(_triton_tuning, "ENABLED", True)
    monkeypatch.setattr(_triton_tuning, "_can_time", lambda x: True)
    monkeypatch.setattr(_triton_tuning, "tune", tune)
    tuned = _fused_step(*layer)
    templates = _templates()
    assert [t.num_warps for t in templates["normalize"] + templates["elementwise"]] == [8, 8]
    assert all(t.tuned for t in templates["normalize"] + templates["elementwise"])
    own = [t.num_warps for t in untuned_templates["normalize"] + untuned_templates["elementwise"]]
    expected = sorted(w for warps in own for w in {*_triton_tuning.WARPS, warps})
    assert sorted(timed) == expected  # each candidate of each pass, its own warps among them
    for name, warps in reduction_warps.items():
        assert [t.num_warps for t in templates[name]] == warps
        assert not any(t.tunable or t.tuned for t in templates[name])

    timed.clear()
    again = _fused_step(*layer)
    assert timed == []
    reference = _reference_step(*layer)
    for got, untuned_value, tuned_again, expected in zip(tuned, untuned, again, reference):
        torch.testing.assert_close(got, untuned_value, rtol=0, atol=0)
        torch.testing.assert_close(tuned_again, untuned_value, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_a_candidate_the_device_cannot_run_is_skipped(monkeypatch):
    """As Triton's own autotuner skips a configuration that fails (OutOfResources, a failed
    compile): 16 warps fail here, and the fastest of the others is kept, once."""
    from triton.runtime.errors import OutOfResources

    from resnet_ablate.kernels._triton_launch import LaunchTemplate

    _fresh_plans(monkeypatch)
    real_call = LaunchTemplate.__call__
    failed = []

    def call(template, stream, tensors, *scalars):
        if template.num_warps == 16:
            failed.append(template.kernel)
            raise OutOfResources(16 * 32 * 2048, 65536, "threads")
        return real_call(template, stream, tensors, *scalars)

    def timer(run):
        run()
        return 1.0  # all equal: the first of equals, the fewest warps, is kept

    monkeypatch.setattr(LaunchTemplate, "__call__", call)
    monkeypatch.setattr(_triton_tuning, "ENABLED", True)
    monkeypatch.setattr(_triton_tuning, "_can_time", lambda x: True)
    monkeypatch.setattr(_triton_tuning, "cuda_milliseconds", timer)
    layer = _layer(SHAPES[0], "cpu")
    tuned = _fused_step(*layer)
    templates = _templates()
    assert len(failed) == 2  # one candidate of each pass
    assert [t.num_warps for t in templates["normalize"] + templates["elementwise"]] == [2, 2]
    assert all(t.tuned for t in templates["normalize"] + templates["elementwise"])
    for got, expected in zip(tuned, _reference_step(*layer)):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_nothing_is_tuned_off_a_gpu_or_by_default(monkeypatch):
    """On by RESNET_ABLATE_AUTOTUNE=1 only; and on CPU tensors (the interpreter), where no CUDA
    event can time a launch, it launches as untuned."""
    assert _triton_tuning.ENABLED is False  # the test environment does not set it
    _fresh_plans(monkeypatch)
    monkeypatch.setattr(_triton_tuning, "ENABLED", True)
    _fused_step(*_layer(SHAPES[0], "cpu"))
    templates = _templates()
    assert not any(t.tuned for kind in templates.values() for t in kind)
    assert [t.tunable for t in templates["normalize"] + templates["elementwise"]] == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 256, 14, 14), (64, 512, 7, 7)])
def test_tuned_on_cuda_keeps_the_bits(shape, monkeypatch):
    """On a GPU, timed by CUDA events: the tuned kernels give the untuned kernels' bits."""
    layer = [t.to(torch.bfloat16) if t.dim() == 4 else t
             for t in _layer(shape, "cuda")]
    layer[0] = layer[0].to(memory_format=torch.channels_last)
    _fresh_plans(monkeypatch)
    untuned = _fused_step(*layer)
    _fresh_plans(monkeypatch)
    monkeypatch.setattr(_triton_tuning, "ENABLED", True)
    tuned = _fused_step(*layer)
    templates = _templates()
    assert all(t.tuned and t.num_warps in _triton_tuning.WARPS
               for t in templates["normalize"] + templates["elementwise"])
    for got, expected in zip(tuned, untuned):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

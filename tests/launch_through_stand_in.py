"""What a fused layer's launches hand Triton's launcher, through Triton's own launch path for an
H100 with the driver stood in for (benchmarks/triton_stand_in.py); run as a script, in a process
without TRITON_INTERPRET, by tests/test_kernels.py, which checks the JSON it prints.

Each scenario runs one training layer's forward + backward (4 launches) and reports, per launch,
whether Triton's JITFunction.run made it and what it passed: the grid, stream, binary, metadata
and every argument (a tensor as its dtype, shape, strides and whether it is one of the caller's
tensors, by address; anything else as its value).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import triton_stand_in  # noqa: E402


def _describe(arg, callers: dict[int, str]):
    if isinstance(arg, torch.Tensor):
        return [str(arg.dtype), list(arg.shape), list(arg.stride()), callers.get(arg.data_ptr())]
    return repr(arg)


def _layer(x, residual, weight, bias, running, grad):
    from resnet_ablate.kernels import fused_batch_norm

    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    out = fused_batch_norm(x, *running, weight, bias, True, 0.1, 1e-5, residual=residual)
    torch.autograd.grad(out, leaves, grad)


def main() -> None:
    from triton import knobs

    stand_in = triton_stand_in.install()
    from resnet_ablate.kernels import _triton_launch, set_backend

    set_backend("triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g).bfloat16().contiguous(
        memory_format=torch.channels_last).requires_grad_()
    residual = torch.randn(x.shape, generator=g).bfloat16().contiguous(
        memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    running, grad = (torch.zeros(16), torch.ones(16)), torch.randn(x.shape, generator=g).bfloat16()
    # x one element into a larger buffer: not 16-byte aligned
    misaligned = torch.randn(x.numel() + 1, generator=g).bfloat16()[1:].view(2, 8, 8, 16)
    misaligned = misaligned.permute(0, 3, 1, 2).requires_grad_()

    def launches_of(*inputs) -> list[dict]:
        stand_in.launches = []
        _layer(*inputs)
        named = {t.data_ptr(): name for name, t in zip(
            ("x", "residual", "weight", "bias", "running_mean", "running_var", "grad"),
            (*inputs[:4], *inputs[4], inputs[5])) if t is not None}
        return [{"jit": launch.through_jit, "grid": launch.grid, "stream": launch.stream,
                 "function": launch.function, "metadata": repr(launch.packed_metadata),
                 "args": [_describe(a, named) for a in launch.args]}
                for launch in stand_in.launches]

    inputs = (x, residual, weight, bias, running, grad)
    report = {"first": launches_of(*inputs), "again": launches_of(*inputs)}
    _triton_launch.DIRECT_LAUNCHES = False
    report["jit_only"] = launches_of(*inputs)
    _triton_launch.DIRECT_LAUNCHES = True
    # Only the residual misaligned, then only x: one eager signature ("not all aligned"), but
    # x's alignment decides the backward's binary.
    misaligned_residual = torch.randn(x.numel() + 1, generator=g).bfloat16()[1:].view(
        2, 8, 8, 16).permute(0, 3, 1, 2).requires_grad_()
    for _ in range(2):
        report["residual_misaligned"] = launches_of(x, misaligned_residual, weight, bias,
                                                    running, grad)
    report["misaligned_first"] = launches_of(misaligned, residual, weight, bias, running, grad)
    report["misaligned_again"] = launches_of(misaligned, residual, weight, bias, running, grad)
    # Parameters and running statistics in the input's dtype (F.batch_norm takes one dtype for
    # all of them): another binary.
    bf16_weight, bf16_bias = (t.detach().bfloat16().requires_grad_() for t in (weight, bias))
    bf16_running = tuple(t.bfloat16() for t in running)
    bf16 = (x, residual, bf16_weight, bf16_bias, bf16_running, grad)
    report["weight_dtype_first"] = launches_of(*bf16)
    report["weight_dtype_again"] = launches_of(*bf16)
    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    report["hooked"] = launches_of(*inputs)
    knobs.runtime.launch_enter_hook.remove(hooked.append)
    report["hook_calls"] = len(hooked)
    report["after_hook"] = launches_of(*inputs)
    from resnet_ablate.kernels import _triton_rows

    pre_run = _triton_rows._forward_kernel.pre_run_hooks
    pre_run.append(lambda *args, **kwargs: None)
    report["pre_run_hooked"] = launches_of(*inputs)  # the normalize launch (second) has one
    pre_run.clear()
    # Autotuning (kernels/_triton_tuning.py), a stand-in timer making 8 warps the fastest: the
    # step that tunes, the next (its tuned templates' first launch), and one after that.
    from resnet_ablate.kernels import _triton_tuning

    real_tune = _triton_tuning.tune

    def tune(template, tensors, scalars, timer):
        def stand_in_timer(run):
            run()
            return {8: 1.0}.get(template.num_warps, 2.0)

        return real_tune(template, tensors, scalars, stand_in_timer)

    _triton_tuning.ENABLED, _triton_tuning.tune = True, tune
    _triton_tuning._can_time = lambda x: True
    report["tuned_steps"] = [launches_of(*inputs) for _ in range(3)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()

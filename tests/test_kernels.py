"""The fused BatchNorm + add + ReLU against PyTorch's own F.batch_norm + add + relu.

Each case runs on every backend: the real Triton kernels (through Triton's interpreter on a CPU
machine, or compiled on CUDA), the custom op's PyTorch path, and "auto" (on a CPU in eager mode,
ATen's ops called inline without the custom op; on CUDA, the Triton kernels). The reference is computed in float32 (float64 for float64)
from the same inputs, so low-precision cases measure the kernels' single final rounding.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resnet_ablate.kernels import FusedBatchNorm2d, _torch_impl, fused_batch_norm, use_backend
from resnet_ablate.kernels._triton_finalize import _last_to_finish

from helpers import fresh_kernel_plans

BACKENDS = ["triton", "torch", "auto"]
OP_BACKENDS = ["triton", "torch"]  # the custom op's two implementations
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {  # (atol, rtol) for outputs and gradients of O(1) magnitude
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
    torch.float64: (1e-10, 1e-10),
}
# Awkward shapes: C not a power of two, odd H*W, N=1, 1x1 and 7x7 maps, and sizes that no tile
# divides (several row splits and column blocks per launch). NCHW maps with unaligned rows take
# the span kernels, with channel blocks that divide C (3x8x7x7) and that do not.
SHAPES = [(2, 3, 7, 7), (1, 6, 5, 3), (4, 7, 1, 1), (5, 3, 17, 19), (3, 70, 5, 7), (3, 8, 7, 7)]


def _inputs(shape, dtype, channels_last, seed=0, device="cpu"):
    """Drawn on `device`: a 51M-element case drawn on a CPU and copied over took seconds."""
    g = torch.Generator(device).manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, generator=g, device=device) * 2 + 0.5
    residual = torch.randn(shape, generator=g, device=device)
    weight = torch.rand(channels, generator=g, device=device) + 0.5
    bias = torch.randn(channels, generator=g, device=device)
    running_mean = torch.randn(channels, generator=g, device=device)
    running_var = torch.rand(channels, generator=g, device=device) + 0.5
    grad = torch.randn(shape, generator=g, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x, residual, grad = (t.to(dtype).to(memory_format=memory_format) for t in (x, residual, grad))
    return x, residual, weight, bias, running_mean, running_var, grad


def _reference(x, residual, weight, bias, running_mean, running_var, grad, training, relu,
               momentum=0.1, relu_mask=None):
    """F.batch_norm + add + relu in float32 (float64 stays float64); returns output and gradients.
    A `relu_mask` (bool) replaces the ReLU by multiplying with it (see `_kink_mask`)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(acc).requires_grad_() if t is not None else None
              for t in (x, residual, weight, bias)]
    xr, rr, wr, br = leaves
    out = F.batch_norm(xr, running_mean, running_var, wr, br, training, momentum, 1e-5)
    if rr is not None:
        out = out + rr
    if relu_mask is not None:
        out = out * relu_mask
    elif relu:
        out = F.relu(out)
    out.backward(grad.to(acc))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _fused(backend, x, residual, weight, bias, running_mean, running_var, grad, training, relu,
           momentum=0.1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, residual, weight, bias)]
    xf, rf, wf, bf = leaves
    with use_backend(backend):
        out = fused_batch_norm(xf, running_mean, running_var, wf, bf, training, momentum, 1e-5,
                               residual=rf, relu=relu)
        out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _kink_mask(pre_activation, fused_out, dtype):
    """Where the ReLU lets the gradient through: the reference's choice, except within the output
    tolerance of the kink, where the fused op's own choice stands. There both are right to within
    rounding (an fp32 pre-activation of -1e-7 one way and +1e-7 the other), and a large map has a
    few such elements (1 of 51M in a 64x256x56x56 case): the reference must then take the fused
    op's branch, or the per-channel sums of weight and bias gradients differ by a whole term."""
    atol, _ = TOLERANCES[dtype]
    near_kink = pre_activation.abs() <= atol
    return torch.where(near_kink, fused_out > 0, pre_activation > 0)


def _assert_matches(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item())  # gradients can be larger than O(1)
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _layout(t):
    """Strides of the dims that have more than one element (the others never move a pointer)."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]


def _check_case(backend, shape, dtype, channels_last, training, relu=True, with_residual=True,
                affine=True):
    x, residual, weight, bias, rm, rv, grad = _inputs(shape, dtype, channels_last)
    if not with_residual:
        residual = None
    if not affine:
        weight = bias = None
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, grads = _fused(backend, x, residual, weight, bias, rm, rv, grad, training, relu)
    ref_out, ref_grads = _reference(x, residual, weight, bias, rm_ref, rv_ref, grad, training, relu)

    assert out.dtype == x.dtype
    assert _layout(out) == _layout(x), "output keeps the input's memory format"
    _assert_matches(out, ref_out, dtype, "output")
    for name, g, ref_g in zip(("input", "residual", "weight", "bias"), grads, ref_grads):
        if ref_g is None:
            assert g is None
            continue
        assert g.dtype == ref_g.dtype or g.dtype == dtype
        _assert_matches(g, ref_g, dtype, f"grad of {name}")
    # Running statistics are fp32 in both; they see the same low-precision input.
    torch.testing.assert_close(rm, rm_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv, rv_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_add_relu_matches_pytorch(backend, shape, dtype, channels_last, training):
    if backend == "auto" and dtype != torch.float32 and not torch.cuda.is_available():
        _check_inline_is_the_unfused_arithmetic(shape, dtype, channels_last, training)
    else:
        _check_case(backend, shape, dtype, channels_last, training)


def _check_inline_is_the_unfused_arithmetic(shape, dtype, channels_last, training):
    """In fp16/bf16 the inline path rounds where the unfused module rounds (after the BN, after the
    add), not once like the kernels: its reference is that module's arithmetic, bit for bit."""
    x, residual, weight, bias, rm, rv, grad = _inputs(shape, dtype, channels_last)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, grads = _fused("auto", x, residual, weight, bias, rm, rv, grad, training, True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    xr, rr, wr, br = leaves
    expected = F.relu(F.batch_norm(xr, rm_ref, rv_ref, wr, br, training, 0.1, 1e-5) + rr)
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.equal(rv, rv_ref)
    for g, leaf in zip(grads, leaves):
        assert torch.equal(g, leaf.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "relu,with_residual,affine",
    [(True, False, True), (False, True, True), (False, False, True), (True, True, False)],
    ids=["bn_relu", "bn_add", "plain_bn", "no_affine"],
)
def test_variants_match_pytorch(backend, training, relu, with_residual, affine):
    for channels_last in (False, True):
        _check_case(backend, (3, 6, 5, 7), torch.float32, channels_last, training,
                    relu=relu, with_residual=with_residual, affine=affine)


def test_one_signature_with_its_flags_changed_call_after_call_matches_pytorch():
    """Launch plans are cached per signature and flags: the same shape and layout with training,
    ReLU, residual and affine parameters changed from one call to the next (every combination,
    in turn, in one process) matches PyTorch on every call."""
    for channels_last in (False, True):
        for training, relu, with_residual, affine in itertools.product((True, False), repeat=4):
            _check_case("triton", (3, 6, 5, 7), torch.float32, channels_last, training,
                        relu=relu, with_residual=with_residual, affine=affine)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [2, 3, 5])
def test_other_ranks_that_batch_norm_accepts(backend, dims):
    shape = {2: (9, 5), 3: (4, 5, 11), 5: (2, 5, 3, 4, 3)}[dims]
    for training in (True, False):
        _check_case(backend, shape, torch.float32, False, training)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arbitrary_strides_are_handled(backend):
    """Transposed spatial dims, a channel slice and a broadcast gradient: never silently wrong."""
    g = torch.Generator().manual_seed(3)
    transposed = torch.randn(3, 4, 6, 5, generator=g).transpose(2, 3)
    sliced = torch.randn(3, 8, 5, 6, generator=g)[:, ::2]
    residual = torch.randn(3, 4, 5, 6, generator=g).to(memory_format=torch.channels_last)
    for x in (transposed, sliced):
        grad = torch.randn(x.shape, generator=g)
        for grad_variant in (grad, grad[:1].expand_as(grad)):
            out, grads = _fused(backend, x, residual, None, None, None, None, grad_variant, True, True)
            ref_out, ref_grads = _reference(x, residual, None, None, None, None, grad_variant, True, True)
            _assert_matches(out, ref_out, torch.float32, "output")
            _assert_matches(grads[0], ref_grads[0], torch.float32, "grad of input")
            _assert_matches(grads[1], ref_grads[1], torch.float32, "grad of residual")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sliced_and_expanded_per_channel_tensors_are_read_and_updated_as_indexed(backend,
                                                                                   training):
    """Weight and bias interleaved in one buffer (stride 2), running statistics likewise, and an
    expanded weight: F.batch_norm reads channel c where the tensor indexes it, and updates the
    running statistics' own elements. (The Triton kernels read `pointer + c`: such tensors were
    read, and written, as if dense.) In both layouts: ATen's CPU backward, which the PyTorch
    backend and "auto" on a CPU call, misreads a strided weight beside a channels_last input and
    gradient (the input's gradient 3.5 off), so the reference takes dense copies."""
    for layout in (torch.contiguous_format, torch.channels_last):
        _check_strided_per_channel_tensors(backend, training, layout)


def _check_strided_per_channel_tensors(backend, training, layout):
    g = torch.Generator().manual_seed(11)
    x, residual, grad = (torch.randn(3, 5, 4, 3, generator=g).contiguous(memory_format=layout)
                         for _ in range(3))
    parameters = torch.randn(5, 2, generator=g) + 1.0
    buffers = torch.stack((torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5), 1)
    for weight, bias in ((parameters[:, 0], parameters[:, 1]),
                         (torch.tensor([1.5]).expand(5), torch.tensor([0.25]).expand(5))):
        held = buffers.clone()  # running mean and variance as columns: two stride-2 vectors
        dense_mean, dense_var = held[:, 0].clone(), held[:, 1].clone()
        ref_out, ref_grads = _reference(x, residual, weight.contiguous(), bias.contiguous(),
                                        dense_mean, dense_var, grad, training, True)
        out, grads = _fused(backend, x, residual, weight, bias, held[:, 0], held[:, 1], grad,
                            training, True)
        _assert_matches(out, ref_out, torch.float32, "output")
        for name, got, expected in zip(("input", "residual", "weight", "bias"), grads, ref_grads):
            _assert_matches(got, expected, torch.float32, f"grad of {name}")
        torch.testing.assert_close(held, torch.stack((dense_mean, dense_var), 1))


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_the_running_stats_op_updates_strided_statistics_element_by_element(backend):
    """The traced and compiled path's update, on running statistics that are columns of one
    buffer: each column's own elements change, as an in-place update of them would."""
    g = torch.Generator().manual_seed(12)
    held = torch.randn(4, 3, generator=g)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g)
    expected = held.clone()
    expected[:, 0] = 0.9 * held[:, 0] + 0.1 * mean
    expected[:, 2] = 0.9 * held[:, 2] + 0.1 * var * 1.25
    with use_backend(backend):
        torch.ops.resnet_ablate.update_running_stats_(held[:, 0], held[:, 2],
                                                       torch.cat((mean, var)), 0.1, 5)
    torch.testing.assert_close(held, expected)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_running_statistics_are_blended_wide_and_rounded_once(backend, dtype):
    """A module in half precision keeps 16-bit running statistics, blended from float32 batch
    statistics. The PyTorch path blended them in their own dtype: a batch variance above
    float16's largest value made the running variance inf where nn.BatchNorm2d keeps it finite,
    and a third of the elements were rounded twice (an audit). Against ATen's formula by hand
    (momentum * batch + (1 - momentum) * running in float32, rounded once): exact but for
    float32's own rounding at a tie (within one unit of the last place)."""
    g = torch.Generator().manual_seed(13)
    running = torch.stack((torch.randn(256, generator=g) * 3,
                           torch.rand(256, generator=g) * 3 + 0.5)).to(dtype)
    mean, var = torch.randn(256, generator=g) * 3, torch.rand(256, generator=g) * 4 + 0.1
    var[0] = 8e4  # unbiased 1e5: beyond float16's 65504; blended, 1e4 fits
    expected = (0.1 * torch.stack((mean, var * 1.25)) + 0.9 * running.float()).to(dtype)
    with use_backend(backend):
        torch.ops.resnet_ablate.update_running_stats_(running[0], running[1],
                                                       torch.cat((mean, var)), 0.1, 5)
    assert torch.isfinite(running).all()
    torch.testing.assert_close(running.float(), expected.float(), rtol=torch.finfo(dtype).eps,
                               atol=0)
    # (Triton's interpreter stores float32 as bfloat16 by truncating, a GPU to nearest: there,
    # within one unit only.)
    if not (backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available()):
        assert (running == expected).float().mean() >= 0.98


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("relu", [False, True])
def test_a_channels_last_input_of_width_one_with_a_plain_gradient(backend, relu):
    """Strides (28, 1, 4, 1) and an NCHW gradient: ATen's CPU backward misreads a gradient in
    another layout than its input (it gave input gradients off by more than their size), so the
    reference takes a contiguous copy of the input. ("auto" on a CPU is F.batch_norm itself,
    exactly what the unfused module computes, this misreading included.)"""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 4, 1, generator=g).permute(0, 2, 1, 3)
    grad = torch.randn(x.shape, generator=g)
    out, grads = _fused(backend, x, None, None, None, None, None, grad, True, relu)
    ref_out, ref_grads = _reference(x.contiguous(), None, None, None, None, None, grad, True, relu)
    _assert_matches(out, ref_out, torch.float32, "output")
    _assert_matches(grads[0], ref_grads[0], torch.float32, "grad of input")


def test_large_mean_does_not_cancel():
    """Welford/Chan merging keeps the variance accurate when |mean| >> std (sum-of-squares fails)."""
    x = (torch.randn(4, 3, 33, 31, generator=torch.Generator().manual_seed(1)) + 1000.0)
    rm, rv = torch.zeros(3), torch.ones(3)
    with use_backend("triton"):
        fused_batch_norm(x, rm, rv, training=True, momentum=1.0, relu=False)
    torch.testing.assert_close(rv, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3, atol=0)
    torch.testing.assert_close(rm, x.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


NEAR_THE_FLOAT_RANGE = {
    "constant": (3e38,) * 4,
    "one sign": (3.3e38, 3.2e38, 3.1e38, 3.0e38),
    # Offsets beyond the float range: the PyTorch path sums in float64. A Triton program's
    # float32 offsets from its shift would overflow where its own values took both signs (see
    # _triton_tiles' statistics); here each of the interpreter's 4 programs holds one sample,
    # and the merge of their summaries keeps the mean (its sums scaled by 2^-100 where the plain
    # ones overflow: before it did, one against three merged to a mean of -inf).
    "both signs": (3e38, -3e38, 3e38, -3e38),
    "one against three": (-3e38, 3e38, 3e38, 3e38),
}


@pytest.mark.parametrize("backend,case", [(backend, case) for case in NEAR_THE_FLOAT_RANGE
                                          for backend in ("torch", "triton")])
def test_values_near_the_float_range_give_finite_means(backend, case):
    """Where the sum of a channel's values overflows float32 but its mean does not, the mean is
    the float64 one (as ATen's CPU kernel, which sums in double), not inf or NaN; the variance
    is float64's, rounded (inf where it exceeds the range), and the output, where the deviations
    from the mean are floats themselves, is exact: 0."""
    x = torch.tensor(NEAR_THE_FLOAT_RANGE[case]).view(4, 1, 1, 1).repeat(1, 3, 5, 7)
    rm, rv = torch.zeros(3), torch.ones(3)
    with use_backend(backend):
        out = fused_batch_norm(x, rm, rv, training=True, momentum=1.0, relu=False)
    exact = x.double()
    scale = 3e38 * 1e-6  # float32's rounding at the data's magnitude
    torch.testing.assert_close(rm.double(), exact.mean(dim=(0, 2, 3)), rtol=0, atol=scale)
    torch.testing.assert_close(rv, exact.var(dim=(0, 2, 3)).float(), rtol=1e-5, atol=0)
    if (exact - exact.mean()).abs().max() <= torch.finfo(torch.float32).max:
        assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("magnitude", [1e-36, 1e-37, 1e-40], ids=["1e-36", "1e-37", "subnormal"])
def test_tiny_values_keep_their_means_to_float_rounding(backend, magnitude):
    """Near the bottom of the float range nothing underflows on the way to the mean: within a
    few float32 ulps of float64's (for subnormals, two steps of 1.4e-45), as ATen."""
    x = torch.full((16, 2, 8, 8), magnitude)
    x[0, :, 0, 0] = 0.0
    x[:, 1] *= 1 + torch.rand(16, 8, 8, generator=torch.Generator().manual_seed(0))
    rm, rv = torch.zeros(2), torch.ones(2)
    with use_backend(backend):
        fused_batch_norm(x, rm, rv, training=True, momentum=1.0, relu=False)
    exact = x.double().mean(dim=(0, 2, 3))
    step = 2 * 1.4e-45 if magnitude < 1.2e-38 else 4 * torch.finfo(torch.float32).eps * magnitude
    torch.testing.assert_close(rm.double(), exact, rtol=0, atol=step)


@pytest.mark.parametrize("values", ["normal", "near the float range"])
def test_reductions_merge_more_slots_than_they_take_at_once(monkeypatch, values):
    """On a GPU a reduction leaves a slot per program (132 or more on an H100) and its last
    program merges them BLOCK_S at a time; the interpreter runs 4 programs, fewer than one block.
    Here 12 programs and 2 slots a block: the merges' loops over slot blocks, forward (its
    overflow fallback too) and backward, against float64."""
    from resnet_ablate.kernels import _triton_geometry, _triton_plans

    monkeypatch.setattr(_triton_geometry, "INTERPRETER_PROGRAMS", 12)
    monkeypatch.setattr(_triton_geometry, "FINALIZE_VALUES", 16)  # 8 channels: 2 slots a block
    fresh_kernel_plans(monkeypatch)
    g = torch.Generator().manual_seed(3)
    if values == "normal":
        x = torch.randn(48, 8, 4, 4, generator=g) * 3 + 2
    else:  # the count-weighted sums overflow float32; the means do not
        x = torch.tensor([3.3e38, 3.2e38, 3.1e38, 3.0e38]).repeat(12).view(48, 1, 1, 1)
        x = x * (1 - 0.01 * torch.rand(48, 8, 4, 4, generator=g))
    grad = torch.randn(x.shape, generator=g)
    x.requires_grad_()
    rm, rv = torch.zeros(8), torch.ones(8)
    with use_backend("triton"):
        out = fused_batch_norm(x, rm, rv, training=True, momentum=1.0, relu=False)
        grad_x, = torch.autograd.grad(out, x, grad)
    plans = list(_triton_plans._FORWARD_PLANS.values())
    assert plans and all(p.statistics.grid == (1, 12) for p in plans), "12 slots to merge"
    exact = x.detach().double()
    if values == "normal":
        reference = exact.clone().requires_grad_()
        expected = F.batch_norm(reference, None, None, training=True)
        expected_grad, = torch.autograd.grad(expected, reference, grad.double())
        torch.testing.assert_close(rm.double(), exact.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv.double(), exact.var(dim=(0, 2, 3)), rtol=1e-5, atol=0)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_x.double(), expected_grad, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(rm.double(), exact.mean(dim=(0, 2, 3)), rtol=0, atol=3e38 * 1e-6)
        # (the variance exceeds the float range: inf, as float64's rounded)
        torch.testing.assert_close(rv, exact.var(dim=(0, 2, 3)).float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "NCHW"])
def test_a_small_layers_statistics_pass_runs_programs_of_two_steps_to_one_merge_block(
        monkeypatch, layout):
    """At one wave of 132 programs (an H200's 132 SMs), ResNet-56's 1-4 MB layers in bf16 would
    give each statistics program a tile or two and its merge 2-8 blocks of slots a pass (25 us
    for 8x8 on an H200, most of it the merge). Planned as a training step plans them: each program
    reads SMALL_LAYER_STEPS steps or the merge takes its slots in one block, every tile read
    once; ResNet-50's large layers and every backward reduce keep one wave."""
    from resnet_ablate.kernels._triton_geometry import SMALL_LAYER_STEPS
    from resnet_ablate.kernels._triton_plans import backward_plan, forward_plan

    fresh_kernel_plans(monkeypatch)
    wave = 132

    def one_wave(*args) -> int:
        return wave

    for dims, small in [((128, 16, 32, 32), True), ((128, 32, 16, 16), True),
                        ((128, 64, 8, 8), True), ((64, 64, 112, 112), False),
                        ((64, 256, 56, 56), False)]:
        x = torch.empty(dims, dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        weight = torch.ones(dims[1])
        forward = forward_plan(x, weight, weight, None, None, None, 1e-5, True, True, None,
                               one_wave)
        geometry, statistics = forward.geometry, forward.statistics
        shape = geometry.span or geometry.tiling
        items = shape.samples if geometry.span else shape.tiles
        steps = statistics.constexprs["TILES_PER_STEP"]
        block_s, (col_blocks, splits) = statistics.constexprs["BLOCK_S"], statistics.grid
        where = f"{dims} {layout}: {geometry.per_split} tiles x {splits} programs"
        assert splits == geometry.splits and col_blocks == shape.col_blocks
        assert (splits - 1) * geometry.per_split < items <= splits * geometry.per_split, where
        one_wave_splits = triton.cdiv(items, triton.cdiv(items, min(items, wave // col_blocks)))
        least = SMALL_LAYER_STEPS * steps
        assert min(one_wave_splits, block_s) <= splits <= one_wave_splits, where
        assert splits <= max(block_s, triton.cdiv(items, least)), where
        if small and layout == "channels_last":  # 1-4 tiles a program at one wave
            assert splits < one_wave_splits and geometry.per_split >= least, where
        if not small:
            assert splits == one_wave_splits, where
        relu_mask = x.new_empty(x.numel() // 8, dtype=torch.uint8)
        backward = backward_plan(x, x, relu_mask, weight, torch.empty(0), True, False, one_wave)
        reduce_blocks, reduce_splits = backward.reduce.grid
        assert reduce_splits == triton.cdiv(
            items, triton.cdiv(items, min(items, wave // reduce_blocks))), f"{where}: backward"


def test_gradcheck_float64_pytorch_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    residual = torch.randn(3, 4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    rm = torch.randn(4, dtype=torch.float64, generator=g)
    rv = torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    with use_backend("torch"):
        for training, relu in [(True, True), (True, False), (False, True)]:
            assert torch.autograd.gradcheck(
                lambda *a: fused_batch_norm(a[0], rm.clone(), rv.clone(), a[2], a[3], training,
                                            residual=a[1], relu=relu),
                (x, residual, weight, bias),
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bits(backend):
    x, residual, weight, bias, _, _, grad = _inputs((6, 10, 13, 11), torch.float32, True, seed=7)
    runs = [_fused(backend, x, residual, weight, bias, None, None, grad, True, True) for _ in range(2)]
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_pytorch_refusals_are_kept():
    one_value = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused_batch_norm(one_value, None, None, training=True)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        fused_batch_norm(x, torch.zeros(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        fused_batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"residual must have the input's shape \[2, 3, 4, 4\]"):
        fused_batch_norm(x, None, None, training=True, residual=torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'; valid: auto, triton, torch"):
        with use_backend("cuda"):
            pass


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_every_backend_refuses_the_same_argument_types_and_shapes(backend):
    """One error on every backend, in F.batch_norm's words where it has them: a string for
    `training` (accepted as true before on the kernels' backends), a list for a tensor
    (AttributeError before), a (C, 1) weight (accepted by the CPU's inline path before, refused
    by the kernels' backends: code that ran on a CPU failed on a GPU)."""
    x, w, b = torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3)
    stats = torch.zeros(3), torch.ones(3)
    with use_backend(backend):
        fused_batch_norm(x, *stats, w, b, True)  # a signature's call kept: 1 must not find it
        for training, kind in (("yes", "str"), (1, "int")):
            with pytest.raises(TypeError, match=rf"argument 'training' \(position 6\) must be "
                                                rf"bool, not {kind}"):
                fused_batch_norm(x, *stats, w, b, training)
        with pytest.raises(TypeError, match=r"argument 'weight' \(position 4\) must be Tensor, "
                                            r"not list"):
            fused_batch_norm(x, *stats, [1.0] * 3, b, True)
        with pytest.raises(TypeError, match=r"argument 'residual' must be Tensor or None, not list"):
            fused_batch_norm(x, *stats, w, b, True, residual=[1.0])
        # relu="no" applied the ReLU (a truthy string; an audit), on the function and the module
        for call in (lambda: fused_batch_norm(x, *stats, w, b, True, relu="no"),
                     lambda: FusedBatchNorm2d(3)(x, relu="no"),
                     lambda: FusedBatchNorm2d(3, relu="no")):
            with pytest.raises(TypeError, match=r"argument 'relu' must be bool, not str"):
                call()
        with pytest.raises(RuntimeError, match=r"weight should be 1-D, with 3 elements, not of "
                                               r"shape \(3, 1\)"):
            fused_batch_norm(x, *stats, w.view(-1, 1), b, False)
    with pytest.raises(TypeError, match="'training' .* must be bool, not str"):
        F.batch_norm(x, *stats, w, b, "yes")  # the words are PyTorch's


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_loads_batchnorm2d_state_and_matches_it(backend, momentum):
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    fused = FusedBatchNorm2d(6, momentum=momentum, relu=False)
    fused.load_state_dict(reference.state_dict(), strict=True)
    assert fused.state_dict().keys() == reference.state_dict().keys()

    with use_backend(backend):
        for step in range(3):
            x = torch.randn(4, 6, 5, 5) * (step + 1)
            torch.testing.assert_close(fused(x), reference(x), atol=2e-5, rtol=2e-5)
        for name, buffer in reference.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[name], buffer, atol=1e-5, rtol=1e-5)
        fused.eval(), reference.eval()
        x = torch.randn(4, 6, 5, 5)
        residual = torch.randn_like(x)
        fused.relu = True
        torch.testing.assert_close(fused(x, residual), F.relu(reference(x) + residual),
                                   atol=2e-5, rtol=2e-5)


def test_module_without_running_stats_uses_batch_statistics_in_eval():
    reference = torch.nn.BatchNorm2d(5, track_running_stats=False).eval()
    fused = FusedBatchNorm2d(5, track_running_stats=False, relu=False).eval()
    x = torch.randn(3, 5, 4, 4) + 3
    torch.testing.assert_close(fused(x), reference(x), atol=2e-5, rtol=2e-5)


def test_auto_runs_atens_ops_inline_in_eager_on_cpu_exactly_as_the_unfused_module(monkeypatch):
    """Where the custom op buys nothing, "auto" skips it: the unfused module's bits, native autograd."""
    import resnet_ablate.kernels.batch_norm as bn_module

    def no_custom_op(*args, **kwargs):
        raise AssertionError("the custom op ran in eager mode on a CPU")

    monkeypatch.setattr(bn_module, "batch_norm_act", no_custom_op)
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(6)
    fused = FusedBatchNorm2d(6)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    residual = torch.randn(4, 6, 5, 5, requires_grad=True)
    x_ref, residual_ref = (t.detach().clone().requires_grad_() for t in (x, residual))
    with use_backend("auto"):
        out = fused(x, residual)
    expected = reference(x_ref)
    expected += residual_ref
    expected = torch.relu(expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(out, expected)
    for a, b in ((x, x_ref), (residual, residual_ref)):
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(fused.weight.grad, reference.weight.grad)
    assert torch.equal(fused.running_var, reference.running_var)


def test_traced_models_keep_the_custom_op_so_fvcore_counts_it():
    class WithResidual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = FusedBatchNorm2d(3)

        def forward(self, x):
            return self.bn(x, x)

    x = torch.randn(2, 3, 4, 4)
    with use_backend("auto"):
        graph = torch.jit.trace(WithResidual().eval(), (x,)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "resnet_ablate::batch_norm_act" in kinds and "aten::batch_norm" not in kinds


class _Epilogue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = FusedBatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x), residual=x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_runs_through_the_op(backend):
    torch.manual_seed(0)
    eager = _Epilogue()
    compiled_module = _Epilogue()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(2, 4, 5, 5)
    with use_backend(backend):
        out_eager, out_compiled = eager(x), compiled(x)
        out_eager.sum().backward()
        out_compiled.sum().backward()
    torch.testing.assert_close(out_compiled, out_eager)
    torch.testing.assert_close(compiled_module.conv.weight.grad, eager.conv.weight.grad)
    torch.testing.assert_close(compiled_module.bn.running_var, eager.bn.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_with_dynamic_shapes_once_for_every_batch_size(backend):
    """Under torch.compile with dynamic shapes, a training layer compiles once whatever the
    batch size, as nn.BatchNorm2d + add + ReLU does (the running variance's count / (count - 1)
    was a guard on each batch size's value: a graph per size, then the recompile limit), and its
    running statistics follow nn.BatchNorm2d's at every size."""
    from torch._dynamo.testing import CompileCounter

    fused, reference = FusedBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r: fused(x, r), backend=counter, dynamic=True,
                             fullgraph=True)
    with use_backend(backend):
        for batch in range(2, 7):
            x, r = torch.randn(batch, 3, 4, 4), torch.randn(batch, 3, 4, 4)
            torch.testing.assert_close(compiled(x, r), torch.relu(reference(x) + r))
    torch.testing.assert_close(fused.running_var, reference.running_var)
    torch.testing.assert_close(fused.running_mean, reference.running_mean)
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(64, 256, 56, 56), (32, 2048, 7, 7), (7, 37, 13, 11)], ids=str)
def test_compiled_kernels_on_cuda(shape, dtype, channels_last):
    x, residual, weight, bias, rm, rv, grad = _inputs(shape, dtype, channels_last, device="cuda")
    for training in (True, False):
        rm_ref, rv_ref = rm.clone(), rv.clone()
        out, grads = _fused("triton", x, residual, weight, bias, rm, rv, grad, training, True)
        pre_activation, _ = _reference(x, residual, weight, bias, rm_ref.clone(), rv_ref.clone(),
                                       grad, training, relu=False)
        ref_out, ref_grads = _reference(x, residual, weight, bias, rm_ref, rv_ref, grad, training,
                                        True, relu_mask=_kink_mask(pre_activation, out, dtype))
        _assert_matches(out, ref_out, dtype, "output")
        for g, ref_g in zip(grads, ref_grads):
            _assert_matches(g, ref_g, dtype, "gradient")
        torch.testing.assert_close(rm, rm_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rv, rv_ref, atol=1e-4, rtol=1e-4)


def _cuda_training_layer():
    """A ResNet-50 stage-2 training layer on CUDA: a function of no arguments that returns its
    output and the gradients of its input, weight and bias."""
    x, residual, weight, bias, _, _, grad = (
        t.cuda() for t in _inputs((64, 256, 28, 28), torch.bfloat16, True))
    leaves = [t.requires_grad_() for t in (x, weight, bias)]

    def layer():
        out = fused_batch_norm(x, None, None, weight, bias, True, residual=residual)
        # Detached: an output that kept its autograd graph would keep the leaves' AccumulateGrad
        # nodes, and the stream each was made on, alive into the next call; torch 2.11's engine
        # then joins that stream to the caller's, which a CUDA graph capture cannot (it failed
        # on the H200: "operation would make the legacy stream depend on a capturing stream").
        return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    return layer


def _assert_same_bits(runs, expected):
    """Every run's output and gradients equal `expected`'s bit for bit."""
    for got in runs:
        for value, reference in zip(got, expected):
            assert torch.equal(value, reference)


@pytest.mark.gpu
def test_one_layer_on_two_streams_at_once_gives_one_streams_bits():
    """A reduction's last program per channel block merges the slots, found by a counter that is
    one stream's (kernels/_triton_finalize.py): the same layer run on two streams at once, again
    and again, gives the bits it gives on one stream every time (with a shared counter, a merge
    would read another launch's slots or none)."""
    layer = _cuda_training_layer()
    with use_backend("triton"):
        expected = layer()
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        results = []
        for _ in range(20):
            for stream in streams:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    results.append(layer())
        torch.cuda.synchronize()
    _assert_same_bits(results, expected)


@pytest.mark.gpu
def test_two_captured_graphs_of_one_layer_replay_in_any_order_as_it_runs():
    """Every capture shares one stream, so a captured reduction takes counters of its own,
    zeroed in its graph (reduction_counters in kernels/_triton_finalize.py): the second of two
    graphs of the same layer, replayed first, gives the bits the layer gives uncaptured."""
    layer = _cuda_training_layer()
    with use_backend("triton"):
        expected = layer()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture asks
            layer()
        torch.cuda.current_stream().wait_stream(side)
        graphs, outputs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()], []
        for graph in graphs:
            with torch.cuda.graph(graph):
                outputs.append(layer())
        graphs[1].replay()
        graphs[0].replay()
        torch.cuda.synchronize()
    _assert_same_bits(outputs, expected)


@pytest.mark.gpu
def test_inductor_compile_on_cuda():
    model = _Epilogue().cuda().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 4, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled(x).float().sum().backward()
    assert model.conv.weight.grad is not None


# SASS instructions per element in a kernel's main loop (whole body where it has none) that keep it
# at the byte model: ~20 per bf16 value it moves per element (kernels/_triton_rows.py). The
# statistics passes, which move one value, sum around a per-lane shift with no division and reach
# 7-12.3: they are held to that.
INSTRUCTIONS_PER_VALUE_MOVED = 20
# Bytes a reduction's programs on one SM load per iteration of their main loops, at least: what
# an H100's or H200's memory needs in flight to stream (bandwidth x latency over its SMs, ~4 TB/s
# x ~0.8 us / 132: ~25 KB). The statistics pass at 8 KB read at 30% of a copy's bandwidth on an
# H200, where the backward reduce at 36 KB reached 75%.
LOOP_LOAD_BYTES_PER_SM = 24 * 1024
STATISTICS_PASS_BUDGET = {"_batch_stats_kernel": 13, "_span_batch_stats_kernel": 13}
ACTIVATION_KERNELS = {
    "_batch_stats_kernel", "_span_batch_stats_kernel", "_forward_kernel",
    "_span_forward_kernel", "_backward_reduce_kernel", "_span_backward_reduce_kernel",
    "_backward_elementwise_kernel", "_span_backward_elementwise_kernel",
}


def test_resnet_launches_compile_for_hopper_with_16_byte_accesses_no_spills_one_wave(tmp_path):
    """The compiled path, checked without a GPU: every launch of a ResNet-50 and a ResNet-56
    training step, and of 5 ResNet-56 seeds stacked into one model (each epilogue, with a residual and BN + ReLU without, NCHW and channels_last,
    bf16; the statistics pass with the running-stat update, as eager mode launches it, and
    without, as compiled code does) compiles for sm_90 with its real launch configuration; every
    activation load and store is a 16-byte vector, the ReLU travels as the packed mask (a byte
    per 8 values), nothing spills to local memory, every reduction grid fits in one wave at the
    occupancy its binary allows, its programs on an SM load enough bytes per iteration of their
    main loop to keep the memory streaming, its merge's loops hold no barrier, and each kernel
    stays within its instruction budget."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_kernels_for_hopper.py")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "HOPPER_REPORTS_FOLDER": str(tmp_path)}  # each binary's report, made once for all
    shards = max(1, min(4, os.cpu_count() or 1))  # compilation is most of the time: spread it
    running = [subprocess.Popen([sys.executable, str(script), str(shard), str(shards)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for shard in range(shards)]
    launches = []
    for process in running:
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        launches += [json.loads(line) for line in stdout.splitlines()]
    # 24 epilogues (5 seeds of ResNet-56 stacked among them) x 2 layouts x (2 forward + 2
    # backward launches + the statistics pass without the running-stat update, which compiled
    # code launches)
    assert len(launches) == 24 * 2 * 5
    without_update = [l for l in launches if l["step"] == "forward without update"]
    assert len(without_update) == 24 * 2
    assert {l["kernel"] for l in without_update} == {"_batch_stats_kernel",
                                                     "_span_batch_stats_kernel"}
    assert {l["shape"] for l in launches} >= {"resnet50 64x112x112", "resnet56 16x32x32",
                                              "resnet50 2048x7x7 +residual",
                                              "5 stacked resnet56 80x32x32 +residual"}
    for launch in launches:
        where = f"{launch['kernel']} at {launch['shape']} {launch['layout']}"
        assert launch["local"] == 0 and launch["stack"] == 0, f"{where} spills: {launch}"
        for tensor, widths in launch["activation_bytes"].items():
            assert widths == [16], f"{where}: {tensor} moves in {widths}-byte accesses"
        # The packed ReLU mask, a byte per 8 values, on every launch that meets the ReLU: written
        # by the forward, read by the backward in place of the output.
        if launch["kernel"].endswith(("forward_kernel", "reduce_kernel")) or (
                "elementwise" in launch["kernel"] and "+residual" not in launch["shape"]):
            mask_pointer = "relu_mask_ptr" if "forward" in launch["kernel"] else "out_ptr"
            assert launch["mask_bytes"] == {mask_pointer: [1]}, f"{where}: {launch['mask_bytes']}"
            assert launch["mask_packing"] != 0, f"{where} reads its mask a byte per value"
        if "reduce" in launch["kernel"] or "stats" in launch["kernel"]:
            assert launch["waves"] <= 1.0, f"{where} runs {launch['waves']:.2f} waves"
            assert launch["sass"]["looped"], f"{where}: no main loop found in its SASS"
            in_flight = launch["sass"]["loop_load_bytes_per_sm"]
            assert in_flight >= LOOP_LOAD_BYTES_PER_SM, f"{where}: {in_flight} bytes a step an SM"
            # The merge's loops over blocks of slots only load and add; its block reductions
            # come after them, once (merge_loop_barriers says what a barrier there cost).
            assert launch["merge_loop_barriers"] == 0, f"{where}: barriers in its merge's loops"
        if launch["sass"] is not None:
            per_element = launch["sass"]["per_element"]
            values_moved = len(launch["activation_bytes"])  # each tensor once per element
            budget = STATISTICS_PASS_BUDGET.get(launch["kernel"],
                                               INSTRUCTIONS_PER_VALUE_MOVED * values_moved)
            assert per_element <= budget, f"{where}: {per_element:.1f} instructions per element"
    activation_kernels = {l["kernel"] for l in launches if l["activation_bytes"]}
    assert activation_kernels == ACTIVATION_KERNELS


# ---------------------------------------------------------------------------------------------
# PyTorch's semantics at the edges: non-finite values, empty batches, refusals, dtypes, layouts



def _bn_add_relu(x, residual, weight, bias, rm, rv, training, backend=None):
    """Output and the gradients of x, residual, weight, bias, through the op or (backend None)
    through PyTorch's own modules in float32 with `out += residual` and ReLU."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    xl, rl, wl, bl = leaves
    if backend is None:
        out = F.batch_norm(xl, rm, rv, wl, bl, training, 0.1, 1e-5)
        out = F.relu(out + rl)
    else:
        with use_backend(backend):
            out = fused_batch_norm(xl, rm, rv, wl, bl, training, 0.1, 1e-5, residual=rl)
    out.sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("where", ["residual", "input"])
def test_nan_propagates_through_output_gradients_and_running_stats(backend, where):
    x, residual, weight, bias, rm, rv, _ = _inputs((3, 4, 5, 5), torch.float32, False)
    (residual if where == "residual" else x)[1, 2, 3, 4] = float("nan")
    stats, ref_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    out, grads = _bn_add_relu(x, residual, weight, bias, *stats, True, backend)
    ref_out, ref_grads = _bn_add_relu(x, residual, weight, bias, *ref_stats, True)
    assert out.isnan().any()  # the NaN is not cut by the ReLU
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5, equal_nan=True)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, equal_nan=True)
    for got, expected in zip(stats, ref_stats):
        torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_an_inf_input_gives_an_inf_running_mean_and_nan_variance_as_pytorch(backend):
    x, _, _, _, rm, rv, _ = _inputs((3, 4, 5, 5), torch.float32, True)
    x[2, 1, 0, 3] = float("inf")
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with use_backend(backend):
        out = fused_batch_norm(x, rm, rv, training=True, relu=False)
    F.batch_norm(x, rm_ref, rv_ref, training=True)
    assert rm[1] == float("inf") and rv[1].isnan() and out[:, 1].isnan().all()
    torch.testing.assert_close(rm, rm_ref, equal_nan=True)
    torch.testing.assert_close(rv, rv_ref, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_empty_batch_behaves_as_pytorch(backend, training):
    x, residual, weight, bias, rm, rv, _ = _inputs((0, 4, 3, 3), torch.float32, False)
    rm_before, rv_before = rm.clone(), rv.clone()
    out, grads = _bn_add_relu(x, residual, weight, bias, rm, rv, training, backend)
    ref_out, ref_grads = _bn_add_relu(x, residual, weight, bias, rm.clone(), rv.clone(), training)
    assert out.shape == (0, 4, 3, 3)
    for got, expected in zip(grads, ref_grads):
        assert got.shape == expected.shape and torch.equal(got, expected)
    assert torch.equal(grads[2], torch.zeros(4))  # the parameters saw no data
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)


@pytest.mark.parametrize("triton_version, numpy_version, fails", [
    ("3.6.0", "2.5.2", True), ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.5.2", False), ("3.9.0", "2.4.6", False), ("3.6.0+git1a2b", "2.4.0rc1", True)])
def test_the_interpreter_warning_names_triton_36_with_numpy_24_on(triton_version, numpy_version,
                                                                  fails):
    """The pairs seen here: Triton 3.6's interpreter failed 141 kernel tests with numpy 2.5.2 and
    none with 2.3.5; 3.9's passes with 2.4.6 (3.7's source squeezes the array it converts)."""
    from resnet_ablate.kernels.backends import interpreter_fails_with_numpy

    assert interpreter_fails_with_numpy(triton_version, numpy_version) is fails


def _outcome(call):
    """What a call gives: its output, or the type and words of what it raised."""
    try:
        return call()
    except (ValueError, RuntimeError) as error:
        return type(error), str(error)


def test_eps_is_refused_in_pytorchs_words():
    """As this PyTorch's F.batch_norm: from 2.12 on, eps=0 is refused in training only (in its
    words for each mode); before, eps <= 0 in every mode."""
    x = torch.randn(2, 3, 4, 4)
    stats = {"train": (None, None, None, None, True), "eval": (torch.zeros(3), torch.ones(3))}
    for backend in BACKENDS:
        for mode, eps in (("train", 0.0), ("eval", -1.0), ("eval", 0.0)):
            expected = _outcome(lambda: F.batch_norm(x, *stats[mode], eps=eps))
            with use_backend(backend):
                got = _outcome(lambda: fused_batch_norm(x, *stats[mode], eps=eps, relu=False))
            if isinstance(expected, tuple):
                assert got == expected, (backend, mode, eps)
            else:
                assert isinstance(got, torch.Tensor), (backend, mode, eps, got)
    assert _outcome(lambda: F.batch_norm(x, None, None, training=True, eps=0.0))[1] in (
        "batch_norm eps must be positive during training, but got 0.0",  # PyTorch 2.12 on
        "batch_norm eps must be positive, but got 0.0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_of_another_dtype_is_added_as_out_plus_equals_residual(backend):
    x, residual, weight, bias, rm, rv, _ = _inputs((3, 4, 5, 5), torch.bfloat16, False)
    residual = residual.float()  # e.g. an fp32 shortcut into a bf16 block
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual)]
    with use_backend(backend):
        out = fused_batch_norm(leaves[0], None, None, weight, bias, True, residual=leaves[1])
    out.float().sum().backward()
    expected = F.relu(F.batch_norm(x.float(), None, None, weight, bias, True) + residual)
    assert out.dtype == torch.bfloat16 and leaves[1].grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, atol=6e-2, rtol=3e-2)
    torch.testing.assert_close(leaves[1].grad, (expected > 0).float())
    with pytest.raises(TypeError, match="residual must be a floating-point tensor, got torch.int64"):
        with use_backend(backend):
            fused_batch_norm(x, None, None, training=True, residual=torch.ones(3, 4, 5, 5).long())


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_a_constant_channel_normalizes_to_exactly_its_bias(backend):
    x, residual, weight, bias, _, _, _ = _inputs((4, 3, 7, 9), torch.float32, False)
    x[:, 1] = 0.1  # 252 copies of 0.1: their float32 sum is not 252 * 0.1
    with use_backend(backend):
        out = fused_batch_norm(x, None, None, weight, bias, True, residual=residual, relu=False)
    # x - mean is exactly 0, so 1 / sqrt(eps) has nothing to amplify.
    torch.testing.assert_close(out[:, 1], residual[:, 1] + bias[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backends_agree_when_the_mean_dwarfs_the_deviation(dtype):
    g = torch.Generator().manual_seed(5)
    x = (300 + torch.randn(4, 3, 6, 6, generator=g)).to(dtype)
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    expected = F.batch_norm(x.double(), None, None, weight.double(), bias.double(), True)
    atol, rtol = TOLERANCES[dtype]
    for backend in OP_BACKENDS:
        with use_backend(backend):
            out = fused_batch_norm(x, None, None, weight, bias, True, relu=False)
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_huge_means_keep_a_finite_accurate_variance(backend):
    g = torch.Generator().manual_seed(2)
    x = 1e20 + 1e17 * torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    rm, rv = torch.zeros(2), torch.ones(2)
    with use_backend(backend):
        fused_batch_norm(x.float(), rm, rv, training=True, momentum=1.0, relu=False)
    torch.testing.assert_close(rm.double(), x.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), x.var(dim=(0, 2, 3)), rtol=1e-3, atol=0)


def _layouts():
    g = torch.Generator().manual_seed(4)
    return {
        "contiguous": torch.randn(2, 3, 4, 5, generator=g),
        "channels_last": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "transposed": torch.randn(2, 3, 5, 4, generator=g).transpose(2, 3),
        "sliced": torch.randn(2, 6, 4, 5, generator=g)[:, ::2],
    }


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_passes_for_every_layout(backend, layout, training):
    x = _layouts()[layout]
    weight = torch.rand(3) + 0.5
    bias = torch.randn(3)
    residual = torch.randn(x.shape)
    running = (None, None) if training else (torch.randn(3), torch.rand(3) + 0.5)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
            residual.requires_grad_(), *running, 1e-5, True, True)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.resnet_ablate.batch_norm_act.default, args)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_compile_fullgraph_on_layouts_that_need_copies(backend, layout):
    module = FusedBatchNorm2d(3)
    x = _layouts()[layout]
    with use_backend(backend):
        expected = module(x, residual=x)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x, residual=x)
    torch.testing.assert_close(compiled, expected)
    assert compiled.stride() == expected.stride()


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_eval_then_train_forward_then_backward_as_nn_batchnorm2d(backend):
    """A later training forward updates the running statistics in place: the earlier eval
    forward's backward still works, and uses the statistics it normalized with."""
    torch.manual_seed(0)
    module = FusedBatchNorm2d(3, relu=False)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with use_backend(backend):
        module.eval()
        evaluated = module(x)
        alone = torch.autograd.grad((evaluated * evaluated).sum(), x, retain_graph=True)[0]
        module.train()
        trained = module(x)
        ((evaluated * evaluated).sum() + trained.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # The training part's gradient of a plain sum is ~0 (the batch mean absorbs it).
    torch.testing.assert_close(x.grad, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_running_stats_update_is_one_op_that_passes_opcheck(backend):
    g = torch.Generator().manual_seed(6)
    running_mean, running_var = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g)
    expected_mean = 0.9 * running_mean + 0.1 * mean
    expected_var = 0.9 * running_var + 0.1 * var * 1.25
    with use_backend(backend):
        stats = torch.cat((mean, var))  # the means, then the variances, as the forward op's
        # 5 values per channel: the variance times 5 / 4
        torch.ops.resnet_ablate.update_running_stats_(running_mean, running_var, stats, 0.1, 5)
        torch.testing.assert_close(running_mean, expected_mean)
        torch.testing.assert_close(running_var, expected_var)
        torch.library.opcheck(torch.ops.resnet_ablate.update_running_stats_.default,
                              (running_mean, running_var, stats, 0.1, 5))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_an_outlier_first_value_does_not_spoil_the_variance(backend, channels_last):
    """Statistics merge Welford summaries, so no value's offset cancels digits away (summing
    around one value would lose them when that value is far from the rest)."""
    g = torch.Generator().manual_seed(8)
    x = (0.01 * torch.randn(16, 2, 12, 12, generator=g, dtype=torch.float64))
    x[0, :, 0, 0] = 10.0  # the first value of each channel, a thousand spreads away
    x32 = x.float().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    rm, rv = torch.zeros(2), torch.ones(2)
    with use_backend(backend):
        fused_batch_norm(x32, rm, rv, training=True, momentum=1.0, relu=False)
    exact = x32.double()
    torch.testing.assert_close(rv.double(), exact.var(dim=(0, 2, 3)), rtol=1e-5, atol=0)
    # float32 rounding of values as large as 10: about 1e-6 absolute
    torch.testing.assert_close(rm.double(), exact.mean(dim=(0, 2, 3)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# More of nn.BatchNorm2d's semantics: bias=False, eps=0, half-given running statistics,
# momentum=None, broadcast residuals, double backward, and PyTorch's own module test inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_weight_without_bias_as_nn_batchnorm2d(backend):
    torch.manual_seed(0)
    try:
        reference = torch.nn.BatchNorm2d(4, bias=False)
    except TypeError:  # PyTorch before 2.12 has no bias flag: the same module, its bias dropped
        reference = torch.nn.BatchNorm2d(4)
        reference.bias = None
    fused = FusedBatchNorm2d(4, bias=False, relu=False)
    fused.reset_parameters()  # on every PyTorch, with no bias to reset
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    fused.load_state_dict(reference.state_dict(), strict=True)
    assert fused.bias is None and fused.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 4, 5, 5)
    with use_backend(backend):
        for mode in ("train", "eval"):
            getattr(fused, mode)(), getattr(reference, mode)()
            inputs = [x.clone().requires_grad_() for _ in range(2)]
            outs = [fused(inputs[0]), reference(inputs[1])]
            torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
            for out in outs:
                out.square().sum().backward()
            torch.testing.assert_close(inputs[0].grad, inputs[1].grad, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(fused.weight.grad, reference.weight.grad, atol=1e-4,
                                       rtol=1e-4)
    torch.testing.assert_close(fused.running_var, reference.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 7, 7)], ids=["rows", "spans"])
def test_eval_with_zero_eps_and_zero_variance_gives_what_pytorch_gives(backend, shape):
    """1 / sqrt(0 + 0) is inf: ATen's eval output is x * inf + (bias - mean * inf), NaN where
    the terms cancel or x is 0 and inf elsewhere, not (x - mean) * inf."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    x[0, :, 0, 0] = 0.0
    running_mean, running_var = torch.tensor([0.0, 1.0, -0.5]), torch.tensor([0.0, 0.0, 1.0])
    for weight, bias in ((torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.5, 0.0, 1.0])),
                         (None, None)):
        expected = _outcome(lambda: F.batch_norm(x, running_mean, running_var, weight, bias,
                                                 False, 0.1, 0.0))
        with use_backend(backend):
            out = _outcome(lambda: fused_batch_norm(x, running_mean, running_var, weight, bias,
                                                    False, 0.1, 0.0, relu=False))
        if isinstance(expected, tuple):  # PyTorch before 2.12 refuses eps=0 in eval too
            assert out == expected
            continue
        assert expected[:, 0].isnan().all() and expected[:, 1].isinf().any()
        torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("given", ["mean", "var"])
def test_one_running_statistic_without_the_other_is_refused_as_pytorch(backend, training, given):
    """In training F.batch_norm wants both or neither; in eval it names the missing one."""
    x = torch.randn(2, 3, 4, 4)
    stats = (torch.zeros(3), None) if given == "mean" else (None, torch.ones(3))
    with pytest.raises((ValueError, RuntimeError)) as expected:
        F.batch_norm(x, *stats, training=training)
    with use_backend(backend), pytest.raises((ValueError, RuntimeError)) as refused:
        fused_batch_norm(x, *stats, training=training)
    assert type(refused.value) is type(expected.value)
    assert str(refused.value) == str(expected.value)
    if training:
        assert "must either both be None or neither be None" in str(refused.value)
    else:
        missing = "running_var" if given == "mean" else "running_mean"
        assert str(refused.value) == f"{missing} must be defined in evaluation mode"


def _refusal(call) -> tuple[type, str]:
    with pytest.raises(Exception) as raised:
        call()
    return type(raised.value), str(raised.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_pytorch_refuses_at_the_edges_is_refused_in_its_words(backend):
    """A float8 input, one value per channel with no channels, per-channel tensors on another
    device, running statistics that require grad while grad mode is on: each refused with
    F.batch_norm's error (type and message), the last before a running statistic is updated; the
    same running statistics under no_grad are taken, as F.batch_norm takes them."""
    x = torch.randn(2, 3, 4, 5)
    cases = {
        "float8": lambda f: f(x.to(torch.float8_e4m3fn), None, None, None, None, True),
        "no channels, one value": lambda f: f(torch.randn(1, 0, 1, 1), None, None, None, None,
                                               True),
        "a weight on meta": lambda f: f(x, None, None, torch.ones(3, device="meta"), None, True),
        "running statistics on meta": lambda f: f(x, torch.zeros(3, device="meta"),
                                                  torch.ones(3, device="meta"), None, None, False),
    }
    for training in (True, False):
        for grad in ("running_mean", "running_var"):
            def call(f, training=training, grad=grad):
                running = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
                running[grad].requires_grad_()
                return f(x, running["running_mean"], running["running_var"], None, None,
                         training)
            cases[f"{grad} requiring grad, training={training}"] = call
    for name, case in cases.items():
        expected = _refusal(lambda: case(F.batch_norm))
        with use_backend(backend):
            assert _refusal(lambda: case(fused_batch_norm)) == expected, name
    running_mean, running_var = torch.zeros(3, requires_grad=True), torch.ones(3)
    with use_backend(backend), pytest.raises(RuntimeError, match="not differentiable"):
        fused_batch_norm(x, running_mean, running_var, training=True)
    assert torch.equal(running_mean.detach(), torch.zeros(3)), "refused before any update"
    with torch.no_grad(), use_backend(backend):
        out = fused_batch_norm(x, running_mean, running_var, training=True, relu=False)
    reference_mean = torch.zeros(3)
    reference = F.batch_norm(x, reference_mean, torch.ones(3), training=True)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(running_mean.detach(), reference_mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_and_parameters_of_other_dtypes_are_refused_before_any_work(backend):
    """An integer input is refused in F.batch_norm's words (it came back truncated to ints);
    parameters and running statistics of another dtype than the input's (or float32 beside a
    16-bit input) are refused before a running statistic is touched, as F.batch_norm refuses
    them, where they were read as another type or left half-updated."""
    with pytest.raises(NotImplementedError) as expected:
        F.batch_norm(torch.arange(48).view(2, 3, 2, 4), None, None, training=True)
    with use_backend(backend), pytest.raises(NotImplementedError) as refused:
        fused_batch_norm(torch.arange(48).view(2, 3, 2, 4), None, None, training=True)
    assert str(refused.value) == str(expected.value) == '"batch_norm" not implemented for \'Long\''
    x = torch.randn(2, 3, 4, 4)
    for name, bad in (("weight", torch.ones(3, dtype=torch.float64)),
                      ("bias", torch.zeros(3, dtype=torch.int64)),
                      ("running_var", torch.ones(3, dtype=torch.int64))):
        running_mean, running_var = torch.zeros(3), torch.ones(3)
        arguments = {"weight": None, "bias": None, "running_var": running_var, name: bad}
        with pytest.raises(RuntimeError):  # F.batch_norm refuses it too, in its own words
            F.batch_norm(x, running_mean.clone(), arguments["running_var"].clone(),
                         arguments["weight"], arguments["bias"], training=True)
        # (auto on a CPU is F.batch_norm itself, in its words)
        words = "" if backend == "auto" else rf"mixed dtype: {name} is "
        with use_backend(backend), pytest.raises(RuntimeError, match=words):
            fused_batch_norm(x, running_mean, arguments["running_var"], arguments["weight"],
                             arguments["bias"], training=True)
        assert torch.equal(running_mean, torch.zeros(3)), "nothing was updated"
    # Each of a dtype the input takes, but not one dtype for all: F.batch_norm refuses them too.
    for dtype, params, stats in ((torch.bfloat16, torch.float32, torch.bfloat16),
                                 (torch.float16, torch.float16, torch.float32)):
        low = x.to(dtype)
        weight, bias = torch.ones(3, dtype=params), torch.zeros(3, dtype=params)
        running_mean, running_var = torch.zeros(3, dtype=stats), torch.ones(3, dtype=stats)
        with pytest.raises(RuntimeError):
            F.batch_norm(low, running_mean.clone(), running_var.clone(), weight, bias, True)
        words = "" if backend == "auto" else (
            rf"mixed dtype: weight is {params} and running_mean {stats}; the parameters and "
            rf"running statistics take one dtype")
        with use_backend(backend), pytest.raises(RuntimeError, match=words):
            fused_batch_norm(low, running_mean, running_var, weight, bias, training=True)
        assert torch.equal(running_mean, torch.zeros(3, dtype=stats)), "nothing was updated"
    # A 16-bit input takes float32 parameters, as in mixed precision.
    half = x.to(torch.bfloat16)
    with use_backend(backend):
        out = fused_batch_norm(half, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3),
                               training=True, relu=False)
    assert out.dtype == torch.bfloat16


def test_the_module_takes_nn_batchnorm2ds_arguments_in_its_order():
    """Positional device and dtype mean what they mean to nn.BatchNorm2d (relu is keyword-only:
    in device's place, a None turned the ReLU off)."""
    args = (4, 1e-3, 0.2, True, True, "cpu", torch.float64)
    fused, reference = FusedBatchNorm2d(*args), torch.nn.BatchNorm2d(*args)
    assert fused.relu is True and fused.weight.dtype == reference.weight.dtype == torch.float64
    assert (fused.eps, fused.momentum) == (reference.eps, reference.momentum)
    with pytest.raises(TypeError):
        FusedBatchNorm2d(4, 1e-5, 0.1, True, True, False)  # relu passed where device goes


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_without_channels_gives_an_empty_output_as_pytorch(backend):
    x = torch.randn(2, 0, 3, 3)
    with use_backend(backend):
        out = fused_batch_norm(x, torch.zeros(0), torch.ones(0), training=True, relu=False)
    assert out.shape == F.batch_norm(x, torch.zeros(0), torch.ones(0), training=True).shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_momentum_none_is_refused_before_any_work(backend):
    """F.batch_norm refuses momentum=None (only the module means a cumulative average by it)."""
    x = torch.randn(2, 3, 4, 4)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="momentum"):
        F.batch_norm(x, running_mean, running_var, training=True, momentum=None)
    with use_backend(backend), pytest.raises(TypeError, match="momentum") as refused:
        fused_batch_norm(x, running_mean, running_var, None, None, True, None)
    if backend != "auto":  # (auto on a CPU is F.batch_norm itself, in its words)
        assert "cumulative moving average pass 1 / (number of batches seen)" in str(refused.value)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["float64", "float32", "int", "tensor"])
def test_a_momentum_of_another_real_type_is_taken_as_f_batch_norm_takes_it(backend, kind):
    """A float subclass (numpy's float64, as a schedule computed in numpy gives), numpy's
    float32, an int, a one-value tensor: F.batch_norm takes each as its value (the last three
    were refused)."""
    import numpy

    momentum = {"float64": numpy.float64(0.25), "float32": numpy.float32(0.25), "int": 1,
                "tensor": torch.tensor(0.25)}[kind]
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    expected = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, *expected, training=True, momentum=momentum)
    running = torch.zeros(3), torch.ones(3)
    with use_backend(backend):
        fused_batch_norm(x, *running, None, None, True, momentum, relu=False)
    for got, want in zip(running, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_eval_under_no_grad_copies_no_running_statistics(backend, monkeypatch):
    """The eval backward reads a copy of the running statistics; where no backward can follow
    (no_grad, though the parameters require gradients) none is made."""
    module = FusedBatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    copies = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: (copies.append(1), real_cat(*a, **k))[1])
    with use_backend(backend):
        with torch.no_grad():
            module(x)
        assert copies == []
        module(x.requires_grad_()).sum().backward()
    assert copies and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_shape", [(1, 4, 1, 1), (4, 1, 1), (1, 4, 5, 6), (3, 1, 5, 1)],
                         ids=str)
def test_a_broadcastable_residual_is_added_as_out_plus_equals_residual(backend, residual_shape):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 4, 5, 6, generator=g)
    residual = torch.randn(residual_shape, generator=g)
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    grad = torch.randn(3, 4, 5, 6, generator=g)
    results = []
    for which in ("fused", "reference"):
        xl, rl = x.clone().requires_grad_(), residual.clone().requires_grad_()
        if which == "fused":
            with use_backend(backend):
                out = fused_batch_norm(xl, None, None, weight, bias, True, residual=rl)
        else:
            out = F.batch_norm(xl, None, None, weight, bias, True)
            out += rl
            out = F.relu(out)
        out.backward(grad)
        results.append((out, xl.grad, rl.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert results[0][2].shape == residual_shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_that_does_not_broadcast_to_the_input_is_refused(backend):
    x = torch.randn(3, 4, 5, 6)
    with use_backend(backend), pytest.raises(ValueError, match=r"or broadcast to it .*\[2, 3, 4, 5, 6\]"):
        fused_batch_norm(x, None, None, training=True, residual=torch.randn(2, 3, 4, 5, 6))


def _double_backward_inputs(dtype):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 3, 2, dtype=dtype, generator=g).requires_grad_()
    residual = torch.randn(3, 4, 3, 2, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.rand(4, dtype=dtype, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=dtype, generator=g).requires_grad_()
    stats = torch.randn(4, dtype=dtype, generator=g), torch.rand(4, dtype=dtype, generator=g) + 0.5
    return (x, residual, weight, bias), stats


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_float64_pytorch_path(training):
    inputs, (rm, rv) = _double_backward_inputs(torch.float64)
    with use_backend("torch"):
        assert torch.autograd.gradgradcheck(
            lambda x, r, w, b: fused_batch_norm(x, rm.clone(), rv.clone(), w, b, training,
                                                residual=r),
            inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_match_nn_batchnorm2d(backend, training):
    """d/d(x, residual, weight, bias) of |grad|^2 through the op equals the same through
    F.batch_norm + add + relu: the gradient is itself differentiable, as nn.BatchNorm2d's is, and
    connected to residual and bias (derivative 0 through the ReLU's decisions), so that
    autograd.grad over every operand works as it does on the unfused layers. On the Triton kernels
    (which refuse float64, computing in float32) this stands in for gradgradcheck."""
    inputs, (rm, rv) = _double_backward_inputs(torch.float32)
    v = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(12))
    second = []
    for which in ("fused", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        x, r, w, b = leaves
        if which == "fused":
            with use_backend(backend):
                out = fused_batch_norm(x, rm.clone(), rv.clone(), w, b, training, residual=r)
        else:
            out = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training) + r)
        grads = torch.autograd.grad(out, leaves, v, create_graph=True)
        norm = sum((grad * grad).sum() for grad in grads)
        second.append(torch.autograd.grad(norm, leaves))
    for got, expected in zip(*second):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_gradient_differentiated_again_is_connected_as_nn_batchnorm2ds_is(backend, training):
    """With or without affine parameters, ReLU and residual, the first gradients taken with
    create_graph=True can be differentiated again with respect to every operand, giving what
    F.batch_norm (+ add + relu) gives, None counted as zeros: an input gradient that does not
    depend on the input (eval without a ReLU) is still connected to it, as nn.BatchNorm2d's is."""
    (x0, r0, w0, b0), (rm, rv) = _double_backward_inputs(torch.float32)
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13))
    for affine, relu, with_residual in itertools.product((True, False), repeat=3):
        second = []
        for which in ("fused", "reference"):
            x = x0.detach().clone().requires_grad_()
            w, b = (w0.detach().clone().requires_grad_(), b0.detach().clone().requires_grad_()) \
                if affine else (None, None)
            r = r0.detach().clone().requires_grad_() if with_residual else None
            if which == "fused":
                with use_backend(backend):
                    out = fused_batch_norm(x, rm.clone(), rv.clone(), w, b, training,
                                           residual=r, relu=relu)
            else:
                out = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
                out = out if r is None else out + r
                out = F.relu(out) if relu else out
            leaves = [t for t in (x, w, b, r) if t is not None]
            grads = torch.autograd.grad(out, leaves, v, create_graph=True)
            assert grads[0].requires_grad, f"{which}: {affine=} {relu=} {with_residual=}: " \
                "the input's gradient cannot be differentiated again"
            norm = sum((grad * grad).sum() for grad in grads if grad.requires_grad)
            taken = torch.autograd.grad(norm, leaves, allow_unused=True)
            second.append([torch.zeros_like(leaf) if grad is None else grad
                           for leaf, grad in zip(leaves, taken)])
        for got, expected in zip(*second):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{affine=} {relu=} {with_residual=}: {m}")


_MODULE_INPUTS = '''
import sys, types, unittest
import torch
try:
    import expecttest  # noqa: F401
except ImportError:  # common_utils takes only its TestCase base class, unused by these inputs
    sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase)
from torch.testing._internal.common_modules import module_db

info = next(i for i in module_db if i.module_cls is torch.nn.BatchNorm2d)
cases = [dict(training=training, desc=case.desc, args=case.constructor_input.args,
              kwargs=case.constructor_input.kwargs, forward_kwargs=case.forward_input.kwargs,
              inputs=[t.detach() for t in case.forward_input.args])
         for training in (True, False)
         for case in info.module_inputs_func(info, device="cpu", dtype=torch.float32,
                                             requires_grad=False, training=training)]
torch.save(cases, sys.argv[1])
'''


@pytest.fixture(scope="module")
def batchnorm2d_module_inputs(tmp_path_factory):
    """nn.BatchNorm2d's own module test inputs (torch.testing._internal.common_modules), read in
    a subprocess: importing PyTorch's test harness freezes torch.backends flags process-wide."""
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("module-db") / "batchnorm2d.pt"
    done = subprocess.run([sys.executable, "-c", _MODULE_INPUTS, str(path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pytorchs_own_batchnorm2d_module_inputs(backend, batchnorm2d_module_inputs):
    assert len(batchnorm2d_module_inputs) >= 12  # training and eval
    if "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters:  # PyTorch 2.12 on
        assert any(case["kwargs"].get("bias") is False for case in batchnorm2d_module_inputs)
    for case in batchnorm2d_module_inputs:
        torch.manual_seed(0)
        reference = torch.nn.BatchNorm2d(*case["args"], **case["kwargs"])
        fused = FusedBatchNorm2d(*case["args"], relu=False, **case["kwargs"])
        fused.load_state_dict(reference.state_dict())
        fused.train(case["training"]), reference.train(case["training"])
        results = []
        for module in (fused, reference):
            inputs = [t.clone().requires_grad_() for t in case["inputs"]]
            with use_backend(backend):
                for _ in range(2):  # twice: momentum=None averages over the batches seen
                    out = module(*inputs, **case["forward_kwargs"])
                out.square().sum().backward()
            results.append([out, *(t.grad for t in inputs),
                            *(p.grad for p in module.parameters()),
                            *module.state_dict().values()])
        assert len(results[0]) == len(results[1])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, equal_nan=True,
                                       msg=lambda m: f"{case['desc'] or 'default'}: {m}")


# ---------------------------------------------------------------------------------------------
# The eager path (no custom-op dispatch, the running-stat update in the statistics launch) against
# the custom op that tracing and compilation see


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_eager_path_gives_the_custom_ops_bits(backend, channels_last):
    x, residual, weight, bias, rm, rv, grad = _inputs((3, 5, 7, 6), torch.float32, channels_last)
    results = []
    for path in ("eager", "op"):
        running = rm.clone(), rv.clone()
        leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
        xl, rl, wl, bl = leaves
        with use_backend(backend):
            if path == "eager":
                out = fused_batch_norm(xl, *running, wl, bl, True, 0.1, 1e-5, residual=rl)
            else:
                out, stats, _ = torch.ops.resnet_ablate.batch_norm_act(
                    xl, wl, bl, rl, None, None, 1e-5, True, True)
                torch.ops.resnet_ablate.update_running_stats_(*running, stats, 0.1,
                                                              x.numel() // x.shape[1])
            out.backward(grad)
        results.append([out, *running, *(leaf.grad for leaf in leaves)])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


# The packed ReLU mask: the Triton forward writes the ReLU's decisions one bit per element and
# the backward reads them in place of the output (kernels/_triton_tiles.py). Each way a forward
# packs it, and a backward whose tiles differ from the forward's (it reads each element's byte).
PACKED_MASK_CASES = {  # name: (shape, x channels_last, grad_out channels_last)
    "along positions (NCHW rows)": ((2, 3, 8, 8), False, False),
    "along channels (channels_last)": ((2, 16, 3, 5), True, True),
    "along spans (7x7)": ((2, 8, 7, 7), False, False),
    "along spans, a partial channel block": ((2, 24, 7, 7), False, False),
    "read per element (span forward, row backward)": ((2, 8, 7, 7), False, True),
}


@pytest.mark.parametrize("case", PACKED_MASK_CASES)
def test_the_packed_relu_mask_gives_pytorchs_gradients(case):
    shape, channels_last, grad_channels_last = PACKED_MASK_CASES[case]
    x, residual, weight, bias, _, _, grad = _inputs(shape, torch.float32, channels_last)
    residual[1, 2, 1, 3] = float("nan")  # a NaN output lets its gradient through
    grad = grad.contiguous(memory_format=torch.channels_last if grad_channels_last
                           else torch.contiguous_format)
    results = {}
    for pack in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
        with use_backend("triton"):
            out, _, mask = torch.ops.resnet_ablate.batch_norm_act(
                leaves[0], leaves[2], leaves[3], leaves[1], None, None, 1e-5, True, pack)
            out.backward(grad)
        results[pack] = out.detach(), mask, [leaf.grad for leaf in leaves]
    (out, mask, grads), (_, no_mask, unpacked_grads) = results[True], results[False]
    assert mask.dtype == torch.uint8 and mask.numel() == x.numel() // 8 and no_mask.numel() == 0
    passes = ~(out <= 0)
    assert torch.equal(_torch_impl.unpack_relu_mask(mask, x), passes)
    assert passes.any() and not passes.all() and out.isnan().any()
    # The bits decide exactly as the output did: the same gradients, to the bit.
    for got, expected in zip(grads, unpacked_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
    ref = F.relu(F.batch_norm(ref_leaves[0], None, None, ref_leaves[2], ref_leaves[3], True)
                 + ref_leaves[1])
    ref.backward(grad)
    for got, leaf in zip(grads, ref_leaves):
        torch.testing.assert_close(got, leaf.grad, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_no_mask_is_written_where_no_gradient_will_be_taken(monkeypatch):
    """Inference (no grad, or nothing requiring it) writes the output only."""
    from resnet_ablate.kernels import _triton_launch, _triton_tiles

    packings = []
    real_call = _triton_launch.LaunchTemplate.__call__
    monkeypatch.setattr(_triton_launch.LaunchTemplate, "__call__",
                        lambda launch, *args: (packings.append(launch.constexprs.get("MASK_PACKING")),
                                               real_call(launch, *args)))
    x, residual, weight, bias, rm, rv, _ = _inputs((2, 16, 4, 4), torch.float32, True)
    with use_backend("triton"):
        fused_batch_norm(x, rm, rv, weight, bias, True, residual=residual)
        with torch.no_grad():
            fused_batch_norm(x.requires_grad_(), rm, rv, weight, bias, True, residual=residual)
        fused_batch_norm(x, rm, rv, weight, bias, True, residual=residual)
    # A training forward's second launch normalizes, and writes the mask or not.
    assert packings[1::2] == [_triton_tiles.MASK_NONE] * 2 + [_triton_tiles.MASK_ALONG_CHANNELS]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced",
                                    "odd channels", "14x14 bf16", "14x14 fp32"])
def test_the_fake_kernel_sizes_the_mask_as_the_kernels_write_it(layout):
    """What torch.compile plans for (the fake kernel) is what the kernels return: a packed mask
    where the forward's tiles own whole bytes of it, none elsewhere."""
    from resnet_ablate.kernels import _triton_impl

    g = torch.Generator().manual_seed(3)
    x = {"contiguous": torch.randn(2, 8, 4, 8, generator=g),
         "channels_last": torch.randn(2, 16, 3, 3, generator=g).contiguous(
             memory_format=torch.channels_last),
         "transposed": torch.randn(2, 8, 8, 4, generator=g).transpose(2, 3),
         "sliced": torch.randn(2, 16, 8, 8, generator=g)[:, ::2],
         "odd channels": torch.randn(2, 12, 3, 3, generator=g).contiguous(
             memory_format=torch.channels_last),
         # ResNet-50's stage 3 in NCHW: bf16 rows (392 bytes) take span tiles, which own whole
         # bytes of the mask; fp32 rows (784 bytes) take row tiles of 196, which do not.
         "14x14 bf16": torch.randn(2, 8, 14, 14, generator=g).bfloat16(),
         "14x14 fp32": torch.randn(2, 8, 14, 14, generator=g)}[layout]
    residual = torch.randn(x.shape, generator=g).to(x.dtype)
    with use_backend("triton"):
        mask = torch.ops.resnet_ablate.batch_norm_act(x, None, None, residual, None, None, 1e-5,
                                                      True, True)[2]
    assert mask.numel() == _triton_impl.relu_mask_bytes(x, residual)
    assert (mask.numel() > 0) == (layout in ("contiguous", "channels_last", "14x14 bf16"))


def test_template_launches_hand_tritons_launcher_what_tritons_own_launch_path_hands_it():
    """Launches that skip JITFunction.run (kernels/_triton_launch.py) pass the launcher exactly
    what JITFunction.run passes (grid, stream, binary, metadata, every argument), seen through
    Triton's real launch path for an H100 with the driver stood in for; they take that path after
    a template's first launch only, and never where a tensor is not 16-byte aligned, a launch
    hook is installed or the kernel has a pre-run hook; another weight dtype gets a binary of its
    own first."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("launch_through_stand_in.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)

    def through_jit(name):
        return [launch["jit"] for launch in report[name]]

    def passed(name):
        return [{k: v for k, v in launch.items() if k != "jit"} for launch in report[name]]

    assert through_jit("first") == [True] * 4 and through_jit("jit_only") == [True] * 4
    assert through_jit("again") == [False] * 4
    assert passed("again") == passed("jit_only") == passed("first")
    # The caller's own tensors are among what they pass, where Triton's path passes them.
    assert {arg[3] for launch in report["again"] for arg in launch["args"]
            if isinstance(arg, list)} >= {"x", "residual", "weight", "bias", "grad"}
    # A misaligned residual: the forward's binaries are not the aligned ones, the backward's
    # (which reads x, not the residual) may be. Then x misaligned, after it, in the same eager
    # signature ("not all aligned"): never the aligned binaries.
    assert through_jit("residual_misaligned") == [True, True, False, False]
    assert through_jit("misaligned_first") == through_jit("misaligned_again") == [True] * 4
    assert through_jit("weight_dtype_first") == [True] * 4
    assert through_jit("weight_dtype_again") == [False] * 4
    assert "torch.bfloat16" in {arg[0] for launch in report["weight_dtype_again"]
                                for arg in launch["args"] if isinstance(arg, list) and arg[3] == "weight"}
    assert through_jit("hooked") == [True] * 4 and report["hook_calls"] == 4
    assert through_jit("after_hook") == [False] * 4
    assert through_jit("pre_run_hooked") == [False, True, False, False]
    # Autotuning: after the step that tunes, the tuned passes (normalize, second, and the
    # backward's elementwise, fourth) launch with the chosen 8 warps (the binaries' packed
    # metadata leads with num_warps), directly once their new binary is in place, not with the
    # last candidate timed; the reductions keep theirs.
    untuned = [launch["metadata"] for launch in report["again"]]
    tuning, after, later = report["tuned_steps"]
    assert [launch["jit"] for launch in after] == [True] * 4  # launch_stream: a template reset
    assert [launch["jit"] for launch in later] == [False] * 4
    for step in (after, later):
        metadata = [launch["metadata"] for launch in step]
        assert metadata[1].startswith("(8,") and metadata[3].startswith("(8,")
        assert (metadata[0], metadata[2]) == (untuned[0], untuned[2])


@triton.jit
def _count_merges(counters_ptr, merges_ptr):
    """Counts, per channel block, the programs that _last_to_finish elects to merge."""
    if _last_to_finish(counters_ptr):
        tl.atomic_add(merges_ptr + tl.program_id(0), 1)


def test_exactly_one_program_per_channel_block_merges_and_the_counter_resets():
    """_last_to_finish (kernels/_triton_finalize.py) elects one program per channel block each
    launch, the last of its splits to finish, and leaves the block's counter at zero for the
    next launch: two launches of 3 blocks x 5 splits merge twice per block."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counters = torch.zeros(3, dtype=torch.int32, device=device)
    merges = torch.zeros(3, dtype=torch.int32, device=device)
    for _ in range(2):
        _count_merges[(3, 5)](counters, merges)
    assert merges.tolist() == [2, 2, 2]
    assert counters.tolist() == [0, 0, 0]


def test_a_training_layer_launches_two_kernels_forward_and_two_backward(monkeypatch):
    """Statistics (its last programs merge the slots and update the running statistics) and
    normalize; reduce (its last programs sum the slots into the parameters' gradients) and
    elementwise: no merge and no running-stat update has a launch of its own on the eager path,
    and every channel block's counter is back at zero after each reduction, ready for the next."""
    from resnet_ablate.kernels import _triton_launch, _triton_plans

    launched = []
    real_call = _triton_launch.LaunchTemplate.__call__
    monkeypatch.setattr(_triton_launch.LaunchTemplate, "__call__",
                        lambda launch, *args: (launched.append(launch.kernel.fn.__name__),
                                               real_call(launch, *args)))
    # 70 channels: two channel blocks of row tiles, each merged by its own last program
    x, residual, weight, bias, rm, rv, grad = _inputs((3, 70, 8, 8), torch.float32, False)
    for leaf in (x, weight, bias):
        leaf.requires_grad_()
    rm_before, rv_before = rm.clone(), rv.clone()
    with use_backend("triton"):
        out = fused_batch_norm(x, rm, rv, weight, bias, True, residual=residual)
        forward = list(launched)
        out.backward(grad)
    assert forward == ["_batch_stats_kernel", "_forward_kernel"]
    assert launched[2:] == ["_backward_reduce_kernel", "_backward_elementwise_kernel"]
    torch.testing.assert_close(rm, 0.9 * rm_before + 0.1 * x.detach().mean((0, 2, 3)))
    torch.testing.assert_close(rv, 0.9 * rv_before + 0.1 * x.detach().var((0, 2, 3)))
    ref_x, ref_w, ref_b = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    F.relu(F.batch_norm(ref_x, None, None, ref_w, ref_b, True) + residual).backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias.grad, ref_b.grad, atol=1e-4, rtol=1e-4)
    counters = [c for plans in (_triton_plans._FORWARD_PLANS, _triton_plans._BACKWARD_PLANS)
                for plan in plans.values() for c in plan.counters.values()]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)
    assert any(c.numel() == 2 for c in counters)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("backend", BACKENDS)
def test_under_vmap_the_layer_matches_pytorchs_under_vmap(backend):
    """Under a functorch transform a call leaves the eager path (whose C++ apply would skip
    functorch's own checks and trip an internal assert): vmap over an eval forward gives what
    F.batch_norm + add + ReLU give under vmap."""
    g = torch.Generator().manual_seed(5)
    x, residual = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    running_mean, running_var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5

    def fused(xi, ri):
        return fused_batch_norm(xi, running_mean, running_var, weight, bias, False, residual=ri)

    def unfused(xi, ri):
        return F.relu(F.batch_norm(xi, running_mean, running_var, weight, bias, False) + ri)

    with use_backend(backend):
        out = torch.func.vmap(fused)(x, residual)
        # An input shared by every batch beside batched residuals (added out of place).
        shared = torch.func.vmap(fused, in_dims=(None, 0))(x[0], residual)
    torch.testing.assert_close(out, torch.func.vmap(unfused)(x, residual))
    torch.testing.assert_close(shared, torch.func.vmap(unfused, in_dims=(None, 0))(x[0], residual))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_grad_and_jacrev_give_pytorchs_derivatives(backend, training):
    """torch.func.grad and jacrev through the layer, with respect to input, weight and residual,
    give F.batch_norm + add + ReLU's. (The custom op's registered autograd has no functorch
    support in PyTorch: every backend failed there, "auto" on CUDA included.)"""
    g = torch.Generator().manual_seed(13)
    x, residual = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    running = (torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5)
    running = (None, None) if training else running

    def fused(xi, wi, ri):
        return fused_batch_norm(xi, *running, wi, bias, training, residual=ri).square().sum()

    def unfused(xi, wi, ri):
        return F.relu(F.batch_norm(xi, *running, wi, bias, training) + ri).square().sum()

    expected = torch.func.grad(unfused, argnums=(0, 1, 2))(x, weight, residual)
    with use_backend(backend):
        got = torch.func.grad(fused, argnums=(0, 1, 2))(x, weight, residual)
        jacobian = torch.func.jacrev(fused, argnums=1)(x, weight, residual)
    for name, actual, reference in zip(("input", "weight", "residual"), got, expected):
        _assert_matches(actual, reference, torch.float32, f"grad of {name}")
    _assert_matches(jacobian, expected[1], torch.float32, "jacrev of weight")

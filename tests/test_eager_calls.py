"""The eager path's per-signature calls (kernels/_eager.py): a signature's first call checks its
arguments and plans its launches, later calls of that signature skip both. So every call that
differs from a registered one in anything the checks or the plans read (a strided, misaligned,
resized or retyped tensor, a broadcast residual, eps, momentum, a missing tensor, another
gradient layout) must still get F.batch_norm's results or its error, and the registered
signature must keep its own afterwards. References: F.batch_norm + add + ReLU, with autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_ablate.kernels import FusedBatchNorm2d, _eager, fused_batch_norm, use_backend

from helpers import fresh_kernel_plans

SHAPE = (3, 6, 5, 7)


def _layer(seed: int, dtype=torch.float32, channels_last: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def activation() -> torch.Tensor:
        return (torch.randn(SHAPE, generator=g) * 2 + 0.5).to(dtype).to(
            memory_format=memory_format)

    channels = SHAPE[1]
    return dict(x=activation(), residual=activation(), grad=activation(),
                weight=torch.rand(channels, generator=g) + 0.5,
                bias=torch.randn(channels, generator=g),
                running_mean=torch.randn(channels, generator=g),
                running_var=torch.rand(channels, generator=g) + 0.5,
                training=True, momentum=0.1, eps=1e-5)


def _run(layer: dict, fused: bool) -> tuple[torch.Tensor, list, list]:
    """Output, gradients of (x, residual, weight, bias), and the running statistics after one
    forward + backward, on copies of the layer's tensors: the fused op's as given (strides and
    alignment kept), the reference's in float32 and dense (ATen's CPU backward misreads a
    strided weight beside a channels_last input: 3.5 off in the input's gradient)."""
    def leaf(name):
        t = layer[name]
        if t is None:
            return None
        t = _copy(t) if fused else t.detach().float().contiguous()
        return t.requires_grad_() if name in ("x", "residual", "weight", "bias") else t

    x, residual, weight, bias = (leaf(n) for n in ("x", "residual", "weight", "bias"))
    running = [leaf("running_mean"), leaf("running_var")]
    arguments = (layer["training"], layer["momentum"], layer["eps"])
    if fused:
        out = fused_batch_norm(x, *running, weight, bias, *arguments, residual=residual)
    else:
        out = F.batch_norm(x, *running, weight, bias, *arguments)
        out = F.relu(out if residual is None else out + residual)
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    gradients = iter(torch.autograd.grad(out, leaves, layer["grad"].to(out.dtype)))
    return (out.detach(), [None if t is None else next(gradients) for t in (x, residual, weight,
                                                                              bias)], running)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with t's strides and its address modulo 16 bytes (clone makes a strided vector
    dense, and a misaligned tensor aligned)."""
    offset = t.storage_offset()
    storage = torch.empty(offset + t.untyped_storage().nbytes() // t.element_size(),
                          dtype=t.dtype)
    return storage.as_strided(t.shape, t.stride(), offset).copy_(t.detach())


def _assert_as_pytorch(layer: dict) -> None:
    out, gradients, running = _run(layer, fused=True)
    ref_out, ref_gradients, ref_running = _run(layer, fused=False)
    tolerance = dict(atol=2e-5, rtol=2e-5) if layer["x"].dtype == torch.float32 \
        else dict(atol=6e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), ref_out, **tolerance)
    assert out.stride() == layer["x"].stride(), "the output keeps the input's layout"
    for name, got, expected in zip(("x", "residual", "weight", "bias"), gradients, ref_gradients):
        assert (got is None) == (expected is None), name
        if got is not None:
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(got.float(), expected.float(), atol=tolerance["atol"] * scale,
                                       rtol=tolerance["rtol"], msg=lambda m: f"grad of {name}: {m}")
    for got, expected in zip(running, ref_running):
        if got is not None:  # bfloat16 running statistics: rounded to 8 bits of mantissa
            close = 1e-5 if got.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.float(), expected, atol=close, rtol=close)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Each backend with calls of the test's own (none registered by other tests)."""
    fresh_kernel_plans(monkeypatch)
    with use_backend(request.param):
        yield request.param


def test_a_signatures_later_calls_skip_its_checks_and_match_pytorch(backend, monkeypatch):
    """The first call checks and registers; later calls with new values find it, check nothing
    (the fast path is taken) and still match PyTorch."""
    checked = []
    real_check = _eager.check_arguments
    monkeypatch.setattr(_eager, "check_arguments", lambda *a: checked.append(1) or real_check(*a))
    for seed in range(3):
        _assert_as_pytorch(_layer(seed))
    assert len(checked) == 1 and len(_eager._CALLS) == 1


def _strided(vector: torch.Tensor) -> torch.Tensor:
    """The same values, every other element of a buffer twice as long."""
    buffer = torch.zeros(2 * vector.numel(), dtype=vector.dtype)
    buffer[::2] = vector
    return buffer[::2]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values and strides, starting 4 bytes past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return storage.as_strided(t.shape, t.stride()).copy_(t)


VARIANTS = {
    "strided weight": lambda layer: dict(layer, weight=_strided(layer["weight"])),
    "strided running mean": lambda layer: dict(layer, running_mean=_strided(layer["running_mean"])),
    "misaligned input": lambda layer: dict(layer, x=_misaligned(layer["x"])),
    "misaligned running var": lambda layer: dict(layer,
                                                 running_var=_misaligned(layer["running_var"])),
    "nchw input": lambda layer: dict(layer, x=layer["x"].contiguous()),
    "broadcast residual": lambda layer: dict(layer, residual=layer["residual"][:1]),
    "eval": lambda layer: dict(layer, training=False),
    "no bias": lambda layer: dict(layer, bias=None),
    "no running statistics": lambda layer: dict(layer, running_mean=None, running_var=None),
    "momentum an int": lambda layer: dict(layer, momentum=1),
    "bfloat16 input": lambda layer: _layer(7, dtype=torch.bfloat16),
    "bfloat16 input and parameters": lambda layer: dict(
        _layer(7, dtype=torch.bfloat16),
        **{k: layer[k].bfloat16() for k in ("weight", "bias", "running_mean", "running_var")}),
}
REFUSED = {
    "a weight too long": (lambda layer: dict(layer, weight=torch.ones(7)),
                          RuntimeError, "weight should contain 6 elements not 7"),
    # Of the registered call's numel: its signature must still tell it from a 1-D weight.
    # (F.batch_norm takes such a weight in some modes and fails in others, an ATen message.)
    "a weight of shape (C, 1)": (lambda layer: dict(layer, weight=layer["weight"].view(-1, 1)),
                                 RuntimeError,
                                 r"weight should be 1-D, with 6 elements, not of shape \(6, 1\)"),
    "a float64 weight": (lambda layer: dict(layer, weight=layer["weight"].double()),
                         RuntimeError, "mixed dtype"),
    "eps 0 in training": (lambda layer: dict(layer, eps=0.0), ValueError,
                          "eps must be positive during training"),
    "momentum a bool": (lambda layer: dict(layer, momentum=True), TypeError,
                        "momentum must be a float"),
    "running_var alone missing": (lambda layer: dict(layer, running_var=None), ValueError,
                                  "must either both be None or neither"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_call_that_differs_in_one_respect_matches_pytorch_and_leaves_the_first_intact(
        backend, variant):
    base = _layer(0)
    _assert_as_pytorch(base)  # registered
    _assert_as_pytorch(VARIANTS[variant](_layer(1)))
    _assert_as_pytorch(_layer(2))


@pytest.mark.parametrize("refused", REFUSED)
def test_a_call_that_differs_in_a_refused_respect_is_refused_as_on_its_own(backend, refused):
    make, error, message = REFUSED[refused]
    _assert_as_pytorch(_layer(0))
    with pytest.raises(error, match=message):
        _run(make(_layer(1)), fused=True)
    _assert_as_pytorch(_layer(2))


def test_a_backward_with_another_gradient_layout_matches_pytorch(backend):
    """The backward keeps one plan for the gradient layout it last saw: a contiguous gradient
    of a channels_last output, and an expanded one, are planned anew and still right."""
    for grad in (None, "contiguous", "expanded", None):
        layer = _layer(3)
        if grad == "contiguous":
            layer["grad"] = layer["grad"].contiguous()
        elif grad == "expanded":
            layer["grad"] = layer["grad"][:1].expand(SHAPE)
        _assert_as_pytorch(layer)


def test_a_parameter_given_another_dtype_in_place_is_checked_again(backend):
    """`.data` assignment changes a tensor's dtype but not the object: the signature reads it."""
    bn = FusedBatchNorm2d(SHAPE[1])
    x = torch.randn(SHAPE)
    bn(x)
    bn.weight.data = bn.weight.data.double()
    with pytest.raises(RuntimeError, match="mixed dtype"):
        bn(x)
    bn.weight.data = bn.weight.data.float()
    reference = torch.nn.BatchNorm2d(SHAPE[1])
    reference.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), F.relu(reference(x)), atol=2e-5, rtol=2e-5)


def test_shapes_that_never_repeat_keep_a_bounded_number_of_signatures(backend, monkeypatch):
    """Evaluation on images of their own sizes (the paper's multi-scale testing) makes a new
    signature per size: the calls, plans and geometries kept stay within their limit (here 4),
    each call still matches PyTorch, and a signature made again after the caches emptied is right
    again."""
    from resnet_ablate.kernels import _triton_geometry, _triton_plans

    caches = (_eager._CALLS, _triton_plans._FORWARD_PLANS, _triton_plans._BACKWARD_PLANS,
              _triton_geometry._GEOMETRIES)
    for cache in caches:
        monkeypatch.setattr(cache, "limit", 4)
    reference = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
    bn = FusedBatchNorm2d(3).eval()
    bn.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(0)
    for width in (*range(2, 12), 2):
        x = torch.randn(1, 3, 4, width, generator=generator)
        torch.testing.assert_close(bn(x), F.relu(reference(x)), atol=2e-5, rtol=2e-5)
        assert all(len(cache) <= 4 for cache in caches)
    assert len(_eager._CALLS) >= 1
    for _ in range(2):  # a training signature, made anew and then found
        _assert_as_pytorch(_layer(4))
    assert all(len(cache) <= 4 for cache in caches)


def test_running_statistics_that_require_grad_are_refused_whatever_call_came_before(backend):
    """The key holds whether a running statistic requires grad, and a call whose does is checked
    every time (grad mode decides, which the key leaves out): refused after the same signature
    without it was kept, and after a no_grad call with it, as F.batch_norm refuses it."""
    layer = _layer(0)
    x, residual, weight, bias = (layer[name].detach().clone().requires_grad_()
                                 for name in ("x", "residual", "weight", "bias"))
    running_mean, running_var = layer["running_mean"].clone(), layer["running_var"].clone()
    fused_batch_norm(x, running_mean, running_var, weight, bias, True, residual=residual)  # kept
    running_mean.requires_grad_()  # the one difference from the kept call's signature
    with torch.no_grad():  # taken, as F.batch_norm takes it
        fused_batch_norm(x, running_mean, running_var, weight, bias, True, residual=residual)
    before = running_mean.detach().clone(), running_var.clone()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument "
                                               "'running_mean'"):
            fused_batch_norm(x, running_mean, running_var, weight, bias, True, residual=residual)
        assert torch.equal(running_mean.detach(), before[0]) and torch.equal(running_var,
                                                                             before[1])

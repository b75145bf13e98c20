"""Conversions to and from other libraries' modules: from_torchvision and unfuse, and what they are
for: torchvision weights in this package's models, and exports (torch.export artifacts, ONNX run by
ONNX Runtime) that need nothing of this package to load."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from reference_models import TVBasicBlock, TVBottleneck, TVResNet, randomize, small_tv_resnet
from resnet_ablate import ResNet, from_torchvision, fuse, resnet8, unfuse
from resnet_ablate.kernels import FusedBatchNorm2d


@pytest.mark.parametrize("block, layers, width, expected", [
    (TVBasicBlock, [2, 2, 2, 2], 64, "resnet18-imagenet"),
    (TVBottleneck, [3, 4, 6, 3], 64, "resnet50-imagenet"),
    (TVBottleneck, [1, 1, 1, 1], 128, "bottleneck"),
], ids=["resnet18", "resnet50", "wide"])
@pytest.mark.parametrize("fused", [True, False])
def test_from_torchvision_gives_the_same_network_with_torchvisions_downsampling(
        block, layers, width, expected, fused):
    torch.manual_seed(0)
    tv = randomize(TVResNet(block, layers, width_per_group=width)).eval()
    ours = from_torchvision(tv, fused=fused)
    assert isinstance(ours, ResNet) and expected in ours.arch.name and ours.arch.fused == fused
    assert ours.arch.downsampling == ("v1.5" if block is TVBottleneck else "v1")
    assert ours.arch.base_width == width and not ours.training
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), tv(x), atol=1e-4, rtol=1e-4)


def test_from_torchvision_refuses_what_is_not_a_torchvision_resnet():
    with pytest.raises(ValueError, match="does not have torchvision's ResNet layout"):
        from_torchvision(nn.Sequential(nn.Conv2d(3, 8, 3)))
    tv = small_tv_resnet(TVBottleneck)
    tv.layer2[0].conv2.stride, tv.layer2[0].conv1.stride = (1, 1), (2, 2)  # the paper's v1 instead
    with pytest.raises(ValueError, match="differs from TVResNet"):
        from_torchvision(tv)


def _fused_models():
    torch.manual_seed(0)
    ours = randomize(resnet8())
    theirs = fuse(small_tv_resnet(TVBottleneck))
    return {"ours": ours, "fused torchvision": theirs}


@pytest.mark.parametrize("name", ["ours", "fused torchvision"])
def test_unfuse_gives_plain_modules_with_the_same_tensors_and_outputs(name):
    model = _fused_models()[name].eval()
    reference = copy.deepcopy(model)
    weights = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert unfuse(model) is model
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == weights
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))
    model.train(), reference.train()
    model(x).sum().backward()
    reference(x).sum().backward()
    for (key, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5, msg=key)
    if isinstance(model, ResNet):
        assert not model.arch.fused
        fuse(model)  # and back
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


LOAD_WITHOUT_THE_TOOLKIT = r"""
import sys, torch
program = torch.export.load(sys.argv[1])
x, expected = torch.load(sys.argv[2])
torch.testing.assert_close(program.module()(x), expected)
assert not any(name.startswith("resnet_ablate") for name in sys.modules), "the toolkit was imported"
print("ok")
"""


def test_an_unfused_export_loads_where_the_toolkit_was_never_imported(tmp_path):
    model = unfuse(_fused_models()["ours"].eval())
    x = torch.randn(2, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save((x, model(x).detach()), tmp_path / "check.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_THE_TOOLKIT, str(tmp_path / "model.pt2"),
                           str(tmp_path / "check.pt")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo exporter", "TorchScript exporter"])
def test_an_unfused_model_exports_to_onnx_and_onnx_runtime_computes_the_same(dynamo, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = unfuse(_fused_models()["fused torchvision"].eval())
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=dynamo)
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo exporter", "TorchScript exporter"])
def test_a_fused_model_exports_to_onnx_as_it_stands_and_onnx_runtime_computes_the_same(dynamo,
                                                                                      tmp_path):
    onnx, onnxruntime = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _fused_models()["ours"].eval()
    assert any(isinstance(m, FusedBatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=dynamo)
    # ONNX's own operators only (the exporters may fold BN into the convs): no custom domain.
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-5, rtol=1e-5)
    # The model is still fused after the export: the exporters' tracing changed nothing.
    assert any(isinstance(m, FusedBatchNorm2d) for m in model.modules())


def test_from_torchvision_refuses_a_dilated_block_by_name():
    tv = small_tv_resnet(TVBottleneck, layers=(1, 1, 1, 2))
    tv.layer4[1].conv2.dilation, tv.layer4[1].conv2.padding = (2, 2), (2, 2)
    with pytest.raises(ValueError, match=r"layer4\.1\.conv2 has dilation \(2, 2\) \(a dilated net\).*"
                                         r"It converts torchvision's resnet18"):
        from_torchvision(tv)

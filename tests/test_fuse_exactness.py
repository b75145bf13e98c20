"""`fuse()` on what a traced forward cannot keep: `with` blocks, values read from the module,
assignments, random choices, hooks, dtype promotion under autocast, keyword calls, several
inputs; and lookalike blocks the block path must leave to the graph path. Each against a deep
copy of the model left unfused (outputs, gradients, behaviour), as the other fuse tests."""

import collections
import collections.abc
import copy
import logging
import random
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reference_models import assert_same_training_step
from resnet_ablate import FuseWarning, StaleForward, fuse, unfuse
from resnet_ablate.kernels import FusedBatchNorm2d

C = 4


def _fused(model, **options):
    """fuse() on `model` and on nothing else; the report, and the warnings' messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FuseWarning)
        _, report = fuse(model, return_report=True, **options)
    return report, [str(w.message) for w in caught if issubclass(w.category, FuseWarning)]


class FrozenStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, C, 3), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        with torch.no_grad():
            x = self.stem(x)
        return F.relu(self.bn(self.conv(x)))


class Float32Island(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            y = self.conv(x.float())
        return F.relu(self.bn(y))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.body, self.bn = nn.Sequential(nn.Conv2d(3, C, 3), nn.Conv2d(C, C, 1)), nn.BatchNorm2d(C)
        self.reentrant = reentrant

    def forward(self, x):
        return F.relu(self.bn(self._body(x)))

    def _body(self, x):  # a helper's checkpoint: the source check does not see it, tracing does
        return checkpoint(self.body, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("network, reason", [
    (FrozenStem, "runs code under `with torch.no_grad()`"),
    (Float32Island, "runs code under `with torch.autocast('cpu', enabled=False)`"),
    (lambda: Checkpointed(reentrant=False), "changes the autograd or autocast state"),
    (lambda: Checkpointed(reentrant=True), "changes the autograd or autocast state"),
], ids=["no_grad", "autocast-off", "checkpoint", "checkpoint-reentrant"])
def test_a_forward_that_sets_state_for_some_calls_is_not_rewritten(network, reason):
    """A traced forward drops `with` blocks: such a forward is refused, naming the BN and the
    block, and the model keeps computing as before (gradients, dtypes, recomputation)."""
    torch.manual_seed(0)
    model = network()
    reference = copy.deepcopy(model)
    report, messages = _fused(model)
    assert not report.sites and report.skipped[0].name == "bn"
    assert reason in report.skipped[0].reason and "bn" in messages[0]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x), reference(x)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    ours.float().sum().backward()
    theirs.float().sum().backward()
    for (name, mine), other in zip(model.named_parameters(), reference.parameters()):
        assert (mine.grad is None) == (other.grad is None), name


class _UntraceableChild(nn.Module):
    """A child whose forward a trace cannot keep, in one of four ways (`how`)."""

    def __init__(self, how: str):
        super().__init__()
        self.conv, self.bn, self.how = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), how
        self.seen: list[torch.Tensor] = []

    def body(self, x):
        return F.relu(self.bn(self.conv(x)))

    def forward(self, x):
        if self.how == "checkpoint":  # (in a helper's call: only tracing sees it)
            return checkpoint(self.body, x, use_reentrant=False)
        if self.how == "branch" and x.sum() > 0:
            return self.body(-x)
        if self.how == "random" and random.random() < 0.5:  # inline stochastic depth
            return x
        if self.how == "appends":  # (features kept for a loss: a list the module holds)
            self.seen.append(x.detach())
        return self.body(x)


class _ParentOfUntraceable(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.conv, self.bn, self.child = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), _UntraceableChild(how)

    def forward(self, x):
        return self.child(F.relu(self.bn(self.conv(x)))) + 1


@pytest.mark.parametrize("how, reason", [
    ("checkpoint", "changes the autograd or autocast state"),
    ("branch", "TraceError"),
    ("random", "draws random numbers"),
    ("appends", "changes seen, held by a module"),
])
def test_a_child_that_cannot_be_traced_is_called_as_it_is_and_its_callers_sites_fused(how, reason):
    """A child whose forward a trace cannot keep made its caller's trace fail: the caller's own
    BN + ReLU was left unfused, blamed on the caller's forward. Now the child is called as it is
    (searched on its own, its BN named with its own reason), and its caller's sites are fused;
    the model computes and trains as before."""
    torch.manual_seed(0)
    model = _ParentOfUntraceable(how)
    reference = copy.deepcopy(model)
    report, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert [s.batch_norm for s in report.sites] == ["bn"] and report.rewritten == ("",)
    assert [s.name for s in report.skipped] == ["child.bn"]
    assert "the forward of child (_UntraceableChild)" in report.skipped[0].reason
    assert reason in report.skipped[0].reason and "child.bn" in messages[0]
    assert len(model.child.seen) == 0  # (no proxy left by tracing, no probe batch's append)
    for _ in range(3):  # (a random child takes each path in some step)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        random.seed(1)
        ours = model(x)
        random.seed(1)
        theirs = reference(x)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        ours.square().sum().backward()
        theirs.square().sum().backward()
    for (name, mine), other in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, mine), other in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6, msg=name)
    assert len(model.child.seen) == len(reference.child.seen)


def test_fusing_again_names_a_site_left_below_a_rewritten_forward_and_strict_still_refuses():
    """fuse of a fused model passed over every module below a forward it had rewritten: the
    checkpointed child's BN, left by the first fuse, was no longer named, and strict=True passed
    on a model not fully fused (an audit). Each fuse names it, and strict refuses each time."""
    model = _ParentOfUntraceable("checkpoint")
    first, _ = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    again, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert [s.name for s in first.skipped] == [s.name for s in again.skipped] == ["child.bn"]
    assert again.skipped[0].reason == first.skipped[0].reason and "child.bn" in messages[0]
    assert again.sites == ()  # (the parent's, fused the first time, stays as it is)
    with pytest.raises(ValueError, match="child.bn: the forward of child"):
        fuse(model, strict=True)


class _LeavesItsSecondBatchNorm(nn.Module):
    """Its second BN cannot be fused (`how`: it has a hook, it is a subclass, its output is used
    twice), in its own forward, which is rewritten for the first."""

    class Subclass(nn.BatchNorm2d):
        pass

    def __init__(self, how: str):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.Conv2d(C, C, 1)
        self.bn2, self.how = self.Subclass(C) if how == "subclass" else nn.BatchNorm2d(C), how
        if how == "hook":
            self.bn2.register_forward_hook(lambda *_: None)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))
        return F.relu(y) + y if self.how == "used twice" else F.relu(y)


@pytest.mark.parametrize("how", ["hook", "subclass", "used twice"])
def test_fusing_again_names_a_batch_norm_left_in_a_rewritten_forward(how):
    """A later fuse calls a rewritten forward, never traces it: a BN the first fuse left there
    was named no more, and strict=True passed (an audit). The reason is kept with the forward,
    and named while the BN stays unfused, as the earlier fuse's (a hook may be gone since)."""
    model = _LeavesItsSecondBatchNorm(how)
    first, _ = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    again, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert [s.batch_norm for s in first.sites] == ["bn"] and first.rewritten == ("",)
    assert [s.name for s in first.skipped] == [s.name for s in again.skipped] == ["bn2"]
    assert again.skipped[0].reason == (
        f"left unfused by an earlier fuse ({first.skipped[0].reason}); if that has changed, "
        "unfuse(model), then fuse(model) decides anew")
    assert "bn2" in messages[0]
    assert _fused(model, example_input=torch.randn(2, 3, 8, 8))[0].skipped == again.skipped
    with pytest.raises(ValueError, match="bn2"):
        fuse(model, strict=True)
    unfuse(model)  # (what it kept goes with the rewrite)
    assert not any(k.startswith("_fused_forward") for k in vars(model))
    # Fused on its own first, then inside a model that calls it: named there too
    outer = nn.Sequential(_LeavesItsSecondBatchNorm(how), nn.Conv2d(C, 2, 1))
    _fused(outer[0], example_input=torch.randn(2, 3, 8, 8))
    inside, _ = _fused(outer, example_input=torch.randn(2, 3, 8, 8))
    assert [s.name for s in inside.skipped] == ["0.bn2"]


class _XceptionModule(nn.Module):
    """timm's XceptionModule as it starts with a ReLU: its sum goes on to the next module, whose
    stack's first layer is a ReLU, and, as the next one's shortcut, to another add."""

    def __init__(self, projects: bool):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)) if projects else None
        self.stack = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C),
                                   nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C))

    def forward(self, x):
        return self.stack(x) + (self.shortcut(x) if self.shortcut is not None else x)


def test_fusing_again_names_a_site_whose_relu_a_rewritten_forward_now_hides():
    """The first fuse leaves both BNs of a sum used twice (xception's), and rewrites the stacks'
    forwards. A second fuse calls the next stack rather than reading it, so no ReLU follows the
    sum any more: the shortcut's BN, below no rewritten forward, went unnamed (an audit: timm's
    xception41 named 14 BNs, then 11), and strict=True let it pass. Each is named again, with
    the first reason; unfuse forgets it, and fuse then decides anew."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(_XceptionModule(True), _XceptionModule(False)),
                          nn.Conv2d(C, 3, 1))
    x = torch.randn(2, C, 8, 8)
    first, _ = _fused(model, example_input=x)
    left = {"0.0.stack.5", "0.0.shortcut.1"}
    assert {s.name for s in first.skipped} == left and first.rewritten == ("0.0.stack", "0.1.stack")
    again, _ = _fused(model, example_input=x)
    assert {s.name: s.reason for s in again.skipped} == {
        s.name: f"left unfused by an earlier fuse ({s.reason}); if that has changed, "
                "unfuse(model), then fuse(model) decides anew" for s in first.skipped}
    with pytest.raises(ValueError, match=r"0\.0\.shortcut\.1"):
        fuse(model, strict=True, example_input=x)
    unfuse(model)
    assert all(not any(name.startswith("_fused") for name in vars(m)) for m in model.modules())
    assert _fused(model, example_input=x)[0].skipped == first.skipped


class _FeatureHooks:
    """timm's FeatureHooks as its features_only models call it: outputs kept by device, handed
    over and emptied by the forward."""

    def __init__(self):
        self.outputs = collections.defaultdict(collections.OrderedDict)

    def get_output(self, device):
        output = self.outputs[device]
        self.outputs[device] = collections.OrderedDict()
        return output


class _Holds(nn.Module):
    """A BN + ReLU whose forward also changes what the module holds (`how`)."""

    def __init__(self, how: str):
        super().__init__()
        self.conv, self.bn, self.how = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), how
        self.held = {"deque": collections.deque(), "OrderedDict": collections.OrderedDict(),
                     "list in a dict": {"feats": []}, "namespace": types.SimpleNamespace(n=0),
                     "tensor": torch.zeros(()), "a helper's dict": _FeatureHooks(),
                     "a helper's attribute": _FeatureHooks()}[how]

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if self.how == "deque":
            self.held.append(y.mean())
        elif self.how == "OrderedDict":
            self.held[len(self.held)] = y.mean()
        elif self.how == "list in a dict":
            self.held["feats"].append(y.mean())
        elif self.how == "namespace":
            self.held.last = y.mean()
        elif self.how == "a helper's dict":
            self.held.get_output(y.device)
        elif self.how == "a helper's attribute":
            self.held.last = y.mean()
        else:
            self.held.add_(1)
        return y


def _contents(held):
    if isinstance(held, torch.Tensor):
        return [held.item()]
    if isinstance(held, _FeatureHooks):
        return [[type(k).__name__ for k in held.outputs], _contents(vars(held))]
    items = vars(held).values() if isinstance(held, types.SimpleNamespace) else \
        held["feats"] if isinstance(held, dict) and "feats" in held else \
        held.values() if isinstance(held, dict) else held
    return [type(v).__name__ for v in items]


@pytest.mark.parametrize("how", ["deque", "OrderedDict", "list in a dict", "namespace", "tensor",
                                 "a helper's dict", "a helper's attribute"])
def test_a_forward_changing_what_its_module_holds_is_not_rewritten_and_fuse_leaves_it_so(how):
    """Only a list, dict or set held as an attribute was watched: a forward appending to a deque,
    an OrderedDict, a list in a dict or a namespace, or counting in a tensor, was rewritten,
    proxies were left in the user's container (the counter bumped by the trace), and the fused
    model appended nothing (an audit); so was one calling a helper object of its own that
    changes its dict (timm's feature hooks: a proxy key left, which broke deep copies) or sets
    an attribute on it. Such a forward is refused, naming what it changes, and fuse (its trace
    and its probe batch) leaves what the module holds as it found it."""
    model = _Holds(how)
    reference = copy.deepcopy(model)
    report, _ = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert report.sites == () and "held by a module" in report.skipped[0].reason
    if how.startswith("a helper"):
        changed = "held.outputs" if how.endswith("dict") else "held"  # (given an attribute)
        assert f"changes {changed}, held by a module" in report.skipped[0].reason
    assert _contents(model.held) == _contents(reference.held)
    copy.deepcopy(model)  # (no proxy left to refuse it)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))
    assert _contents(model.held) == _contents(reference.held)


class _RefusesClear(list):
    def clear(self):
        raise RuntimeError("clear refused")


class _LogsSets(dict):
    def __setitem__(self, key, value):
        self.log.append(key)
        super().__setitem__(key, value)


class _LogsEachBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        self.log = logging.getLogger("tests.fuse.a-model-that-logs")

    def forward(self, x):
        self.log.debug("a batch of %d", x.shape[0])
        return F.relu(self.bn(self.conv(x)))


def test_a_forward_that_logs_through_a_logger_it_holds_is_fused():
    """Helper objects a module holds are watched (above); a logger is not: `debug` fills its
    level cache, and watching it refused every forward that logs, for nothing the model
    computes."""
    model = _LogsEachBatch()
    report, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert [s.batch_norm for s in report.sites] == ["bn"] and messages == []


class _HoldsUnusualThings(nn.Module):
    """Holds an inference-mode tensor (no version counter), a list whose clear() refuses and a
    dict that logs each item set, and appends to the list in its forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        with torch.inference_mode():
            self.table = torch.ones(C)
        self.seen, self.settings = _RefusesClear(), _LogsSets(a=1)
        self.settings.log = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return F.relu(self.bn(self.conv(x))) * self.table.view(1, -1, 1, 1).clone()


def test_what_a_module_holds_is_watched_without_its_own_methods_and_without_version_counters():
    """Watching what a module holds read an inference tensor's version counter (the probe then
    failed, naming the model's forward), gave a list back through a clear() that raised (a proxy
    left in it), and copied a dict through its __setitem__ (an audit). The forward that appends
    is refused, the list is given back, and nothing of the dict's is called."""
    model = _HoldsUnusualThings()
    report, _ = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert report.sites == () and "changes seen, held by a module" in report.skipped[0].reason
    assert list(model.seen) == [] and model.settings.log == []


class _Log(collections.abc.MutableSequence):
    """A sequence of the user's with no builtin type beneath: nothing but its own methods gives
    its items back, and its clear() refuses."""

    def __init__(self):
        self.items = []

    def __getitem__(self, i):
        return self.items[i]

    def __setitem__(self, i, value):
        self.items[i] = value

    def __delitem__(self, i):
        raise RuntimeError("the log only grows")

    def __len__(self):
        return len(self.items)

    def insert(self, i, value):
        self.items.insert(i, value)


class _Logged(nn.Module):
    def __init__(self):
        super().__init__()
        self.log = _Log()
        self.register_forward_hook(lambda module, args, output: None)  # (a call, not traced)

    def forward(self, x):
        self.log.append(x.shape[0])
        return x


class _Logs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), _Logged()

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def test_a_container_that_refuses_its_items_back_after_a_check_is_named_in_a_warning():
    """fuse traces a forward and runs checks on real tensors, giving back what they appended;
    where a container refused (its own methods only, and they raise), the trace of the hooked
    module on its own (searched for BatchNorms below it) left a proxy in it, and the checks their
    items, both in silence. The site still fuses, and warnings name the container and what it
    keeps."""
    model = _Logs()
    reference = copy.deepcopy(model)
    report, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert [s.batch_norm for s in report.sites] == ["bn"]
    kept = list(model.head.log)  # (a proxy's == would be traced: read by type)
    assert [type(i).__name__ for i in kept if isinstance(i, torch.fx.Proxy)] == ["_AugmentingProxy"]
    assert [i for i in kept if not isinstance(i, torch.fx.Proxy)] == [2, 2]
    traced = [m for m in messages if "tracing proxy" in m]
    assert len(traced) == 1 and "_Logged" in traced[0] and "log (RuntimeError" in traced[0]
    checked = [m for m in messages if "a check of fuse" in m]
    assert checked and all("head.log" in m for m in checked), messages
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))


class _AuxiliaryHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.Linear(C, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class _TrainsAnAuxiliaryHead(nn.Module):
    """GoogLeNet's shape: a head called in training mode only, its loss added to the main one."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)
        self.aux, self.fc = _AuxiliaryHead(), nn.Linear(C, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        out = self.fc(y.mean((2, 3)))
        return out + 0.3 * self.aux(y) if self.training else out


def test_a_head_called_in_training_mode_only_is_probed_on_a_copy_in_that_mode():
    """The eval-mode probe never reaches it ("the probe input never reached it", an audit of
    GoogLeNet): it is probed on a copy in training mode, checked on what it receives there in
    eval mode, and fused; the model's state and the caller's random stream are as they were."""
    torch.manual_seed(0)
    model = _TrainsAnAuxiliaryHead()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    stream = torch.get_rng_state()
    report, messages = _fused(model, example_input=x)
    assert torch.equal(torch.get_rng_state(), stream) and messages == []
    assert sorted(s.batch_norm for s in report.sites) == ["aux.bn", "bn"]
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert_same_training_step(reference, model, x)


class _ReturnsAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_forward_hook(lambda module, args, output: None)  # (a call, not traced)

    def forward(self, x):
        return [x, 2 * x]


class _TakesTheFirst(nn.Module):
    """timm's FeatureListNet over SelecSLS: `x[0] if isinstance(x, (tuple, list)) else x`."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.stage = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), _ReturnsAList()

    def forward(self, x):
        y = self.stage(F.relu(self.bn(self.conv(x))))
        return y[0] if isinstance(y, (tuple, list)) else y


def test_a_trace_that_takes_another_branch_and_returns_more_is_refused():
    """The traced value is a Proxy, so the isinstance test took the other branch and the rewrite
    returned the whole list where the model returns its first tensor: the check compared the
    tensors the model returns with as many of the rewrite's, found them alike, and the fused
    model returned a list (found while checking an audit's case, SelecSLS's features, whose
    reason spoke of other shapes only). It is refused, saying what made the trace differ."""
    model = _TakesTheFirst()
    reference = copy.deepcopy(model)
    report, _ = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert report.sites == () and [s.name for s in report.skipped] == ["bn"]
    assert "returns another structure than the model's call" in report.skipped[0].reason
    assert "isinstance(x, tuple) on a traced value" in report.skipped[0].reason
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))


class _DropoutHead(nn.Module):
    """timm's head with drop_rate > 0: the forward branches on self.training (F.dropout's flag,
    and a scale in training only), around a stem BN + ReLU and a block's BN + add + ReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)
        self.inner = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C))
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.relu(self.inner(y) + y)
        if self.training:
            y = y * 0.5
        return self.fc(F.dropout(y.mean((2, 3)), p=0.5, training=self.training))


def test_a_forward_that_branches_on_self_training_is_rewritten_for_each_mode(monkeypatch):
    """A forward tracing to other graphs in training and eval mode (timm's ResNet-50 with
    drop_rate=0.2, GhostNet's head) was refused, leaving its stem's BN + ReLU unfused. Each mode
    gets its own rewrite, both checked on the probe call (training mode on copies, dropout's
    masks alike); training steps and eval match the unfused model, with an inlined submodule
    frozen too."""
    torch.manual_seed(0)
    model = _DropoutHead()
    reference = copy.deepcopy(model)
    report, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert messages == [] and report.rewritten == ("",)
    assert [(s.batch_norm, s.pattern) for s in report.sites] == [("bn", "BN->ReLU"),
                                                                  ("inner.1", "BN->add->ReLU")]
    own_forward_calls = []
    own_forward = _DropoutHead.forward
    monkeypatch.setattr(_DropoutHead, "forward",
                        lambda self, x: own_forward_calls.append(self) or own_forward(self, x))
    for modes in ("train", "eval", "inner frozen"):
        for net in (model, reference):
            net.train(modes != "eval")
            net.inner.train(modes == "train")
        x = torch.randn(4, 3, 8, 8, requires_grad=True)
        outputs = []
        for net in (model, reference):
            torch.manual_seed(1)  # (the same dropout masks)
            out = net(x)
            out.square().sum().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5, msg=modes)
        # the fused model ran its rewritten forward (the inner Sequential's mode, which the
        # forward does not read, frozen or not)
        assert own_forward_calls.count(model) == 0, modes
    for (name, mine), other in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, mine), other in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6, msg=name)


class _TestsItsBatchNormsMode(nn.Module):
    """Branches on a called BatchNorm's mode (is it frozen?), not its own."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return y * 0.5 if self.bn.training else y


def test_a_forward_testing_a_called_modules_mode_runs_its_own_forward_where_the_modes_differ():
    """Each mode's rewrite was picked by the owner's mode alone: with its BN frozen while it
    trained, the fused model took the training branch the original did not (1.28 off: an
    audit). The modes the forward read are each checked; where they differ from the owner's,
    its own forward runs."""
    torch.manual_seed(0)
    model = _TestsItsBatchNormsMode()
    reference = copy.deepcopy(model)
    report, _ = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert [s.batch_norm for s in report.sites] == ["bn"]
    x = torch.randn(2, 3, 8, 8)
    for owner, bn in ((True, False), (False, True), (True, True), (False, False)):
        for net in (model, reference):
            net.train(owner)
            net.bn.train(bn)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), msg=f"{owner}, {bn}")


def test_a_forward_branching_on_self_training_that_cannot_be_copied_is_left_saying_why():
    """Its training mode's rewrite is checked on copies: a model that cannot be copied (a lock)
    is left unfused there, named, not failed."""
    import threading

    model = _DropoutHead()
    model.lock = threading.Lock()
    report, messages = _fused(model, example_input=torch.randn(2, 3, 8, 8))
    assert report.sites == () and [s.name for s in report.skipped] == ["bn", "inner.1"]
    assert all("checked on a copy, which failed (TypeError" in s.reason for s in report.skipped)
    assert type(model.bn) is nn.BatchNorm2d and type(model) is _DropoutHead


class Scaled(nn.Module):
    """Reads a plain value (`scale`) and a flag from itself: a traced forward bakes both in."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.scale, self.features = nn.Conv2d(C, C, 3), nn.BatchNorm2d(C), 1.0, False

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)) + x[:, :, 1:-1, 1:-1] * self.scale)
        return (out, x) if self.features else out


def test_values_a_rewritten_forward_baked_in_are_guarded():
    """Fused as it was; once a value it read changes, a call raises naming it (and what to do)
    rather than compute with the old one."""
    torch.manual_seed(0)
    model = Scaled()
    reference = copy.deepcopy(model)
    report, _ = _fused(model, example_input=torch.randn(2, C, 8, 8))
    assert [s.batch_norm for s in report.sites] == ["bn"]
    x = torch.randn(2, C, 8, 8)
    assert torch.equal(model.eval()(x), reference.eval()(x))
    model.scale = 0.5
    with pytest.raises(StaleForward, match=r"Scaled.scale is 0.5, but .* when it was 1.0 .*unfuse"):
        model(x)
    model.scale, model.features = 1.0, True
    with pytest.raises(StaleForward, match="features is True"):
        model(x)


class ReadsElsewhere(nn.Module):
    """Reads its scale through code that is not its forward's own source (`how`): a helper
    method, a base class's forward, a dict, a namespace, a child's attribute, a class attribute.
    Tracing bakes each in all the same."""

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 1.0

    class_scale = 1.0

    def __init__(self, how: str):
        super().__init__()
        self.conv, self.bn, self.how = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), how
        self.scale, self.config = 1.0, {"scale": 1.0}
        self.namespace, self.holder = types.SimpleNamespace(scale=1.0), self.Holder()

    def scaled(self, x):
        return x * self.scale

    def forward(self, x):
        shortcut = {"helper": self.scaled, "dict": lambda x: x * self.config["scale"],
                    "namespace": lambda x: x * self.namespace.scale,
                    "child": lambda x: x * self.holder.scale,
                    "class": lambda x: x * self.class_scale}[self.how](x)
        return F.relu(self.bn(self.conv(x)) + shortcut)

    def change(self) -> None:
        {"helper": lambda: setattr(self, "scale", 0.5),
         "dict": lambda: self.config.update(scale=0.5),
         "namespace": lambda: setattr(self.namespace, "scale", 0.5),
         "child": lambda: setattr(self.holder, "scale", 0.5),
         "class": lambda: setattr(self, "class_scale", 0.5)}[self.how]()


class ThroughBase(ReadsElsewhere):
    def forward(self, x):
        return super().forward(x)


@pytest.mark.parametrize("how", ["helper", "dict", "namespace", "child", "class", "base"])
def test_values_read_outside_the_forwards_own_source_are_guarded_too(how):
    """Each was baked in unguarded: changed, the fused model computed with the old value."""
    torch.manual_seed(0)
    model = ThroughBase("helper") if how == "base" else ReadsElsewhere(how)
    reference = copy.deepcopy(model)
    report, _ = _fused(model, example_input=torch.randn(2, C, 8, 8))
    assert [s.batch_norm for s in report.sites] == ["bn"]
    x = torch.randn(2, C, 8, 8)
    assert torch.equal(model.eval()(x), reference.eval()(x))
    model.change()
    with pytest.raises(StaleForward, match=r"(scale|config|namespace)\b.* is .*0\.5.*, but .* when "
                                           r"it was .*1\.0"):
        model(x)


def test_values_the_forward_never_read_change_freely():
    """A value no traced code read (a training loop's note on the model), and a BatchNorm's own
    settings (its forward runs as it is, reading them then), are not guarded."""
    torch.manual_seed(0)
    model = ReadsElsewhere("dict")
    reference = copy.deepcopy(model)
    _fused(model, example_input=torch.randn(2, C, 8, 8))
    for network in (model, reference):
        network.epoch, network.scale, network.namespace.scale = 3, 0.5, 0.5
        network.bn.eps = 1e-3
    x = torch.randn(2, C, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


class Settings:
    """A user's settings object: a device and a callback beside the value the forward reads."""

    def __init__(self):
        self.scale, self.device, self.callback = 1.0, torch.device("cpu"), print


class Masked(nn.Module):
    """Reads a tensor attribute (torch.fx reads it live), a settings object and a dict holding a
    NaN."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.mask, self.settings = torch.ones(1, C, 1, 1), Settings()
        self.extra = {"unset": float("nan"), "shift": 0.0}

    def forward(self, x):
        shift = x * self.mask * self.settings.scale + self.extra["shift"]
        return F.relu(self.bn(self.conv(x)) + shift)


def test_guards_follow_copies_live_tensors_and_objects_fields():
    """A deep copy (an EMA model) runs; a tensor attribute replaced is read as it is now, as
    the unfused forward reads it; a settings object's field is compared though another field
    has no snapshot, and named where it changed (an audit saw the object's repr twice, the same,
    and no field); a NaN setting equals itself."""
    torch.manual_seed(0)
    model = Masked()
    reference = copy.deepcopy(model)
    _fused(model, example_input=torch.randn(2, C, 8, 8))
    x = torch.randn(2, C, 8, 8)
    copied = copy.deepcopy(model)
    assert torch.equal(copied.eval()(x), reference.eval()(x))
    for network in (model, reference):
        network.mask = torch.full((1, C, 1, 1), 2.0)
        network.extra["unset"] = float("nan")
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    model.settings.scale = 0.5
    # (the object is the one baked in, its repr the same: the field that changed is named)
    with pytest.raises(StaleForward, match=r"settings is <.*Settings object .*> \(its scale "
                                           r"changed\), but .* when it was"):
        model(x)


class Remembers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C)

    def forward(self, x):
        self.last_input = x
        return F.relu(self.bn(self.conv(x)))


def test_a_forward_that_assigns_to_its_module_is_not_rewritten_nor_traced():
    model = Remembers()
    report, _ = _fused(model)
    assert not report.sites and "sets self.last_input" in report.skipped[0].reason
    assert not hasattr(model, "last_input")  # never run on a tracer's proxy
    x = torch.randn(2, 3, 8, 8)
    model(x)
    assert model.last_input is x


class TorchvisionParts(nn.Module):
    """A block with exactly torchvision's BasicBlock parts (its forward is the subclass's)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.relu = nn.ReLU()


# A draw in Python from each generator a forward may use: torch's, numpy's global one (a NAS
# supernet's path choice), Python's `random`.
DRAWS = {"torch": lambda: float(torch.rand(())), "numpy": lambda: np.random.rand(),
         "random": lambda: random.random()}


def _dropped_or_block(block, x, draw):
    if block.training and draw() < 0.5:
        return x
    return block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + x)


class InlineStochasticDepth(TorchvisionParts):
    """torchvision's block part names, and a random choice made in Python (not a tensor op)."""

    def forward(self, x):
        return _dropped_or_block(self, x, DRAWS["torch"])


class NumpyStochasticDepth(TorchvisionParts):
    def forward(self, x):
        return _dropped_or_block(self, x, DRAWS["numpy"])


class RandomStochasticDepth(TorchvisionParts):
    def forward(self, x):
        return _dropped_or_block(self, x, DRAWS["random"])


STOCHASTIC_DEPTH = {"torch": InlineStochasticDepth, "numpy": NumpyStochasticDepth,
                    "random": RandomStochasticDepth}


@pytest.mark.parametrize("draw", list(DRAWS))
def test_a_block_with_a_random_choice_is_neither_converted_nor_rewritten(draw):
    """The block path checks training mode and sees the draw; the graph path sees the tracer
    draw: each says so, and the block drops its branch as often as before. numpy's draws went
    unseen: the rewritten forward took the branch traced every time. The caller's own streams
    are as fusing found them."""
    model = nn.Sequential(nn.Conv2d(3, C, 3), STOCHASTIC_DEPTH[draw]())
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    reference = copy.deepcopy(model)
    report, _ = _fused(model)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    assert not report.sites and not report.fused
    reasons = {s.name: s.reason for s in report.skipped}
    assert "draws random numbers in training mode" in reasons["1"]
    assert "draws random numbers while it is traced" in reasons["1.bn1"]

    def drops(block):
        torch.manual_seed(3), np.random.seed(3), random.seed(3)
        return sum(torch.equal(block(x), x) for x in torch.randn(20, 2, C, 6, 6))

    assert drops(model[1]) == drops(reference[1]) > 0


# Generators a module may hold as its own (a supernet's path sampler): numpy's new and legacy,
# Python's, torch's.
HELD_GENERATORS = {"numpy Generator": lambda: np.random.default_rng(5),
                   "numpy RandomState": lambda: np.random.RandomState(5),
                   "random.Random": lambda: random.Random(5),
                   "torch.Generator": lambda: torch.Generator().manual_seed(5)}


class HeldGeneratorStochasticDepth(TorchvisionParts):
    def __init__(self, generator):
        super().__init__()
        self.rng = generator

    def forward(self, x):
        if isinstance(self.rng, torch.Generator):
            return _dropped_or_block(self, x, lambda: float(torch.rand((), generator=self.rng)))
        return _dropped_or_block(self, x, self.rng.random if hasattr(self.rng, "random")
                                 else self.rng.rand)


def _generator_state(generator):
    if isinstance(generator, torch.Generator):
        return generator.get_state().tolist()
    if isinstance(generator, np.random.Generator):
        return repr(generator.bit_generator.state)
    if isinstance(generator, np.random.RandomState):
        return repr(generator.get_state(legacy=False))
    return generator.getstate()


@pytest.mark.parametrize("held", list(HELD_GENERATORS))
def test_a_block_drawing_from_a_generator_it_holds_is_neither_converted_nor_rewritten(held):
    """A generator the module holds (`self.rng = np.random.default_rng()`) went unseen by the
    graph path: the draw made while tracing was baked in, the other path never taken, and fusing
    moved the module's own stream. It is seen now, and left as fusing found it."""
    model = nn.Sequential(nn.Conv2d(3, C, 3),
                          HeldGeneratorStochasticDepth(HELD_GENERATORS[held]()))
    before = _generator_state(model[1].rng)
    reference = copy.deepcopy(model)
    report, _ = _fused(model)
    assert _generator_state(model[1].rng) == before
    assert not report.sites and not report.fused
    reasons = {s.name: s.reason for s in report.skipped}
    assert "it holds rng beside its parts" in reasons["1"]  # the block path reads no further
    assert "draws random numbers while it is traced" in reasons["1.bn1"]

    def drops(block):
        block.rng = HELD_GENERATORS[held]()
        return sum(torch.equal(block(x), x) for x in torch.randn(20, 2, C, 6, 6))

    assert drops(model[1]) == drops(reference[1]) > 0


class LooksLikeABlockWithAGain(TorchvisionParts):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out * self.gain + x)


class ShortcutBlock(nn.Module):
    """The common CIFAR block: a `shortcut` child, which torchvision's and timm's blocks lack."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def test_lookalike_blocks_keep_their_own_parts_and_class():
    """A block with a parameter of its own is not converted (its gain kept); a block with other
    children is no library's block: the graph path fuses it as it is, with no warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), LooksLikeABlockWithAGain())
    reference = copy.deepcopy(model)
    report, _ = _fused(model)
    assert not report.fused and "parameters or buffers of its own (gain)" in report.skipped[0].reason
    assert model.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        model[1].gain.fill_(0.25), reference[1].gain.fill_(0.25)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), reference.eval()(x))

    model = nn.Sequential(nn.Conv2d(3, C, 3), ShortcutBlock())
    report, messages = _fused(model, strict=True)
    assert not messages and isinstance(model[1], ShortcutBlock)
    assert [(s.batch_norm, s.pattern) for s in report.sites] == [
        ("1.bn1", "BN->ReLU"), ("1.bn2", "BN->add->ReLU")]


def test_hooks_are_kept_where_a_rewrite_would_skip_them():
    """A ReLU with a hook is not fused away (named); a module with a forward hook is called,
    not inlined, and its own forward fused, the hook seeing tensors; a BN with a backward or
    state_dict hook keeps it (not fused, named)."""
    calls = []
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU())
    model[2].register_forward_hook(lambda *_: calls.append("relu"))
    report, _ = _fused(model)
    assert not report.sites and "its ReLU (2) has hooks" in report.skipped[0].reason
    model(torch.randn(2, 3, 8, 8))
    assert calls == ["relu"]

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU())
            self.head = nn.Conv2d(C, 2, 1)

        def forward(self, x):
            return self.head(self.features(x))

    model, seen = Outer(), []
    model.features.register_forward_hook(lambda _, __, out: seen.append(type(out)))
    report, _ = _fused(model)
    assert [s.batch_norm for s in report.sites] == ["features.1"]
    assert set(seen) <= {torch.Tensor}  # tracing never called it with its proxies
    seen.clear()
    model(torch.randn(2, 3, 8, 8))
    assert seen == [torch.Tensor]

    for register in (lambda bn: bn.register_full_backward_hook(lambda *_: None),
                     lambda bn: bn.register_state_dict_post_hook(lambda *_: None)):
        model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU())
        register(model[1])
        report, _ = _fused(model)
        assert not report.sites and "it has hooks" in report.skipped[0].reason
        assert type(model[1]) is nn.BatchNorm2d


class AddsAWiderShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


def test_an_add_that_promotes_under_autocast_keeps_the_unfused_dtype_and_values():
    """Under bf16 autocast the conv gives bf16, the shortcut stays float32, and `+` promotes to
    float32: the fused model returns what the unfused one does, gradients included."""
    torch.manual_seed(0)
    model = AddsAWiderShortcut()
    reference = copy.deepcopy(model)
    report, _ = _fused(model)
    assert [s.pattern for s in report.sites] == ["BN->add->ReLU"]
    x = torch.randn(2, C, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x), reference(x)
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(out.sum(), x)[0] for out in (ours, theirs)))
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)


class AddsInPlace(nn.Module):
    """`out += x` keeps `out`'s dtype (bf16 under autocast beside an fp32 input), and `kept`,
    another name of the same tensor, sees the change."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), \
            nn.Conv2d(C, C, 1)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        out = F.relu(out)
        scaled = self.other(out)
        kept = scaled
        scaled *= 2.0
        return out + kept


class AddsIntoAConvolution(nn.Module):
    """The BN output added into another tensor in place (as timm's `x += shortcut` after its
    drop_path): the sum keeps that tensor's dtype, bf16 under autocast, where the BN of the
    float32 input gives float32."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        out = self.conv(x)
        out += self.bn(x)
        return F.relu(out)


@pytest.mark.parametrize("network", [AddsInPlace, AddsIntoAConvolution])
def test_augmented_assignments_stay_in_place_as_python_runs_them(network):
    """torch.fx records `out += x` as `out + x` (its proxy has no `__iadd__`): the rewritten
    forward returned float32 where the model returns bf16 under autocast, and a name kept before
    `scaled *= 2` missed the change. Both as the unfused model, in training and eval, whichever
    operand the BN output is."""
    torch.manual_seed(0)
    model = network()
    reference = copy.deepcopy(model)
    report, messages = _fused(model)
    assert [s.pattern for s in report.sites] == ["BN->add->ReLU"] and not messages
    x = torch.randn(2, C, 6, 6)
    for training in (True, False):
        model.train(training), reference.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = model(x), reference(x)
        assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)
        assert torch.equal(model(x), reference(x))  # and without autocast
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)


class CallsByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.Conv2d(3, C, 3)

    def forward(self, x, y):
        x = x.mul_(1.0)  # changes its input in place: the probe keeps the input as it came
        return F.relu(self.bn(input=self.conv(x)) + self.other(y))


def test_keyword_calls_in_place_inputs_and_several_inputs_fuse():
    torch.manual_seed(0)
    model = CallsByKeyword()
    reference = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    report, messages = _fused(model, example_input=(x.clone(), y))
    assert [s.pattern for s in report.sites] == ["BN->add->ReLU"] and not messages
    assert isinstance(model.bn, FusedBatchNorm2d)
    assert torch.equal(model.eval()(x.clone(), y), reference.eval()(x.clone(), y))


class CannotBeTracedInADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleDict({"conv": nn.Conv2d(3, C, 3), "bn": nn.BatchNorm2d(C)})

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return F.relu(self.parts["bn"](self.parts["conv"](x)))


def test_an_untraceable_forward_names_each_batch_norm_it_calls():
    report, messages = _fused(CannotBeTracedInADict())
    assert [s.name for s in report.skipped] == ["parts.bn"]
    assert "the forward of <model> (CannotBeTracedInADict) that calls it cannot be traced" in \
        report.skipped[0].reason and "ModuleDict" not in messages[0]

"""Finding BatchNorm2d -> [add] -> ReLU in a traced forward (torch.fx), wherever the modules sit.

A site is a call of an `nn.BatchNorm2d` module whose output feeds only a ReLU (module, function
or method), or only an addition whose sum feeds only a ReLU; then one `FusedBatchNorm2d` call
(`bn(x)` or `bn(x, residual)`, ReLU on) computes what the three did. Anything that would make the
rewrite inexact is a refusal with the reason: a BatchNorm subclass or one with hooks (the fused
op reproduces `nn.BatchNorm2d` only), a BatchNorm called twice, an output also used elsewhere.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks import BasicBlock, Bottleneck, calls_hooks, has_hooks
from ..kernels import FusedBatchNorm2d
from ..models import ResNet
from .arguments import Fixed, as_declared, concrete_args
from .forward_facts import (KEPT_MODULES, Untraceable, autograd_state, check_forward,
                            may_apply_relu, random_draws, random_streams_kept)
from .held_state import HeldState
from .norm_act import activates_first, acts_as_batch_norm
from .reads import Baked, baked, baked_values, recorded_reads
from .records import FuseWarning, Pattern

# Traced as single calls, never into: the fused BN (its forward is the op itself) and this
# package's blocks and models, which the module-level path fuses.
_OPAQUE = (FusedBatchNorm2d, BasicBlock, Bottleneck, ResNet)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


# Augmented assignments, which torch.fx records as the out-of-place operator (Proxy has no
# `__iadd__`, so Python falls back to `__add__`): `out += identity` would become `out + identity`,
# which promotes a bf16 `out` beside an fp32 identity under autocast and leaves other names of
# `out` unchanged. The tracer's proxies record them as themselves (SiteTracer.proxy).
_AUGMENTED = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift")


class _AugmentingProxy(fx.Proxy):
    """A proxy whose `a += b` (and the other augmented assignments) is recorded as
    `operator.iadd(a, b)`, in place as Python runs it."""


for _name in _AUGMENTED:
    def _augmented(self, other, target=getattr(operator, f"i{_name}")):
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    setattr(_AugmentingProxy, f"__i{_name}__", _augmented)
del _name, _augmented


_RANDOM_DRAWS = ("its forward draws random numbers while it is traced (a random choice in "
                 "Python, as inline stochastic depth makes), which a traced forward would bake in")


def _changes(held: str) -> str:
    return (f"its forward changes {held}, held by a module, while it is traced "
            "(`self.feats.append(x)`), which a traced forward would not do again")


class SiteTracer(fx.Tracer):
    """torch.fx's tracer, with this package's modules opaque; given `through`, every submodule
    not named in it is opaque too (called, not inlined), so that a rewritten forward inlines
    no more of its submodules than its sites need. A module with hooks is never traced into
    (tracing would call its hooks with proxies, and an inlined call would skip them), nor one
    named in `opaque` (its forward failed to trace): each stays a call, and `searched_alone`
    names it so that its own forward can be searched. Each forward traced into is checked
    (forward_facts.py): what it cannot keep raises Untraceable, the plain values it reads are
    `guards`; `failed_inside` names the innermost submodule traced into where tracing failed.
    Every BatchNorm is a call, never traced into (a subclass's forward would run its running-stat
    update on the real buffers while traced), and buffers a forward reads are proxies
    (`self.steps.add_(1)` is recorded, not run on the buffer while tracing)."""

    proxy_buffer_attributes = True

    def __init__(self, through: Collection[str] | None = None,
                 opaque: Collection[str] = ()) -> None:
        super().__init__()
        self.through = through
        self.opaque = opaque
        self.searched_alone: list[str] = []
        self.failed_inside: str | None = None
        self.modes_read: set[str] = set()  # the modules whose `training` the forward read
        self.unrecorded: set[str] = set()
        self.guards: list[tuple[str, str, Baked]] = []
        self.state: tuple[object, ...] = ()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_OPAQUE, _BatchNorm, torch.jit.ScriptModule)):  # compiled: a call
            return True
        if hasattr(m, KEPT_MODULES):  # its forward rewritten by an earlier fuse: a call
            return True
        if module_qualified_name in self.opaque:
            return True
        if self.through is not None and module_qualified_name:
            return module_qualified_name not in self.through
        return super().is_leaf_module(m, module_qualified_name) or calls_hooks(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugmentingProxy(node, self)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            if (isinstance(m, torch.jit.ScriptModule) or path in self.opaque
                    or hasattr(m, KEPT_MODULES)  # (rewritten before: what it left is named)
                    or calls_hooks(m) and not super().is_leaf_module(m, path)) \
                    and path not in self.searched_alone:
                self.searched_alone.append(path)  # (a TorchScript module: its BNs named)
            return super().call_module(m, forward, args, kwargs)
        try:
            self.guards.extend((path, a, g) for a, v in check_forward(m).items()
                               if (g := baked(v)) is not None)
            draws, held = random_draws(m), HeldState.of(m)
            result = super().call_module(m, forward, args, kwargs)
            if random_draws(m) != draws:
                raise Untraceable(_RANDOM_DRAWS)
            changed = held.changed()
            if changed:  # (the trace's own gives every one back)
                raise Untraceable(_changes(f"{path}.{changed[0]}"))
            return result
        except Exception:
            self.failed_inside = self.failed_inside or path  # (the innermost sets it first)
            raise

    def create_node(self, *args, **kwargs):
        if autograd_state() != self.state:
            raise Untraceable("its forward changes the autograd or autocast state for some of its "
                              "calls (a `with` block: no_grad, autocast or activation "
                              "checkpointing), which a traced forward drops")
        return super().create_node(*args, **kwargs)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.guards = [("", a, g) for a, v in check_forward(root).items()
                       if (g := baked(v)) is not None]
        self.state = autograd_state()
        versions = _versions(root)
        held = HeldState.of(root)
        # The caller's random streams stay its own.
        with torch.random.fork_rng(devices=[]), random_streams_kept(root):
            draws = random_draws(root)
            with recorded_reads(root) as reads:
                try:
                    graph = super().trace(root, concrete_args)
                finally:
                    held_changed = held.changed()
                    kept = held.restore()  # (tracing put proxies in them)
            if kept:  # (said here too: a module with no BatchNorm below reports no refusal)
                warnings.warn(f"fuse traced the forward of {type(root).__name__}, and could not "
                              f"give {kept[0]} its items back: it holds a tracing proxy, which "
                              "the model's next forward may trip on; take it out", FuseWarning,
                              stacklevel=2)
                raise Untraceable(f"{_changes(held_changed[0])}, and fuse could not give "
                                  f"{kept[0]} its items back: check it for proxies")
            if held_changed:
                raise Untraceable(_changes(held_changed[0]))
            self.guards += baked_values(root, reads)
            # Whose mode the graph took, and whose reads are not known (a TorchScript module)
            self.modes_read = {path for path, names in reads.items() if "training" in names}
            self.unrecorded = {path for path, _ in root.named_modules() if path not in reads}
            if random_draws(root) != draws:
                raise Untraceable(_RANDOM_DRAWS)
        changed = [name for name, version in _versions(root).items() if version != versions[name]]
        if changed:
            raise Untraceable(f"its forward changed {changed[0]} in place while it was traced, "
                              "which a traced forward would not do again")
        return graph


def _versions(module: nn.Module) -> dict[str, int]:
    """Each parameter's and buffer's version counter, which every in-place change moves."""
    return {name: t._version for name, t in (*module.named_parameters(),
                                             *module.named_buffers())}


def trace(module: nn.Module, through: Collection[str] | None = None) -> fx.Graph:
    """The graph of `module`'s forward, without calls of plain `nn.Identity` modules (timm keeps
    unused parts, drop_block or aa, as Identity between a BN and its ReLU); raises whatever
    tracing raises where it cannot, Untraceable where a traced forward would not be exact."""
    return traced(module, through)[0]


def traced(module: nn.Module, through: Collection[str] | None = None,
           fixed: Sequence[Fixed] = ()) -> tuple[fx.Graph, SiteTracer]:
    """`trace`, with the tracer: the submodules it called to be searched alone and the values
    the forward baked in; `fixed`: arguments traced as constants (arguments.py)."""
    opaque: set[str] = set()
    while True:
        tracer = SiteTracer(through, opaque)
        try:
            with warnings.catch_warnings():
                # fx cannot check an object it fixes (an Enum member) and says so: `guarded` does.
                warnings.filterwarnings("ignore", "Was not able to add assertion")
                graph = tracer.trace(module, concrete_args(fixed))
            break
        except Exception:
            # A submodule whose forward cannot be traced (activation checkpointing in a child's
            # forward, a branch on a tensor) is called as it is, and searched on its own, so
            # that the sites of the forward calling it are still found: it blamed that forward,
            # and left them unfused. Each try makes one more submodule a call.
            if tracer.failed_inside is None or tracer.failed_inside in opaque:
                raise
            opaque.add(tracer.failed_inside)
    as_declared(graph, fixed)
    for node in list(graph.nodes):
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            identity = module.get_submodule(str(node.target))
            if type(identity) is nn.Identity and not calls_hooks(identity):
                node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
                graph.erase_node(node)
    return graph, tracer


@dataclass
class Site:
    bn: fx.Node
    relu: fx.Node
    add: fx.Node | None = None

    @property
    def pattern(self) -> Pattern:
        return "BN->ReLU" if self.add is None else "BN->add->ReLU"

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return (self.bn, self.relu) if self.add is None else (self.bn, self.add, self.relu)


def _is_relu(node: fx.Node, of: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not node.args or node.args[0] is not of or len(node.args) > 1 + (node.op == "call_function"):
        return False
    if node.op == "call_module":
        return type(modules[str(node.target)]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _added_to(node: fx.Node, of: fx.Node) -> fx.Node | None:
    """The other operand where `node` adds a tensor to `of` (no alpha), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in ("add", "add_")))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    first, second = node.args
    other = second if first is of else first if second is of else None
    if not isinstance(other, fx.Node) or other is of:
        return None
    if node.target in (operator.iadd, "add_") and first is not of and _read_elsewhere(first):
        return None  # adds into the shortcut's tensor in place, which later readers may see
    return other


def residual_batch_norm(site: Site, modules: dict[str, nn.Module]) -> str | None:
    """The name of the BatchNorm whose output a BN -> add -> ReLU site adds, where it is one."""
    other = _added_to(site.add, site.bn) if site.add is not None else None
    if other is not None and other.op == "call_module" and \
            isinstance(modules.get(str(other.target)), _BatchNorm):
        return str(other.target)
    return None


def _read_elsewhere(into: fx.Node) -> bool:
    """Whether a tensor added into in place is read by more than that add, or is an input of
    the forward (which its caller may read afterwards) or the module's own (a buffer): those
    readers would see the change."""
    return into.op in ("placeholder", "get_attr") or len(into.users) > 1


def _adds_into_the_residual(node: fx.Node, of: fx.Node) -> bool:
    """Whether `node` adds `of` in place into a tensor that something else reads too (`x += of`
    where `x` is an input or used again)."""
    if not (node.target in (operator.iadd, "add_") and node.op in ("call_function", "call_method")
            and len(node.args) == 2 and node.args[1] is of and node.args[0] is not of):
        return False
    return isinstance(node.args[0], fx.Node) and _read_elsewhere(node.args[0])


def _match(bn: fx.Node, modules: dict[str, nn.Module]) -> tuple[Site | None, str | None]:
    """The site `bn` starts, or None with the reason where it nearly is one (else None, None)."""
    users = list(bn.users)
    if len(users) == 1 and _is_relu(users[0], bn, modules):
        return Site(bn, users[0]), None
    if len(users) == 1 and _added_to(users[0], bn) is not None:
        add = users[0]
        after = list(add.users)
        if len(after) == 1 and _is_relu(after[0], add, modules):
            return Site(bn, after[0], add), None
        if any(_is_relu(u, add, modules) for u in after):
            return None, f"the sum of its residual add is used {len(after)} times, not only by the ReLU"
        return None, None
    if len(users) == 1 and _adds_into_the_residual(users[0], bn) and any(
            _is_relu(u, users[0], modules) for u in users[0].users):
        return None, ("it is added into its residual's tensor in place (`x += bn(...)`), "
                      "which every other reader of that tensor sees: a fused add would leave it "
                      "as it was")
    if len(users) > 1 and any(_leads_to_relu(u, bn, modules) for u in users):
        return None, f"its output is used {len(users)} times, not only by a ReLU or an add"
    return None, None


def _leads_to_relu(user: fx.Node, bn: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `user` of a BN's output is a ReLU of it, or an add whose sum a ReLU takes: what
    would make a site but for the BN's other users. (An add with no ReLU after it, as in an
    inverted residual block, makes none.)"""
    if _is_relu(user, bn, modules):
        return True
    return _added_to(user, bn) is not None and any(_is_relu(u, user, modules) for u in user.users)


def _subclass_reason(bn: nn.Module) -> str:
    if type(bn).forward is nn.BatchNorm2d.forward:  # a subclass for its initialisation, say
        return (f"it is {type(bn).__name__}, a subclass of nn.BatchNorm2d, which its fused twin "
                "would not be (code that looks for its class would miss it)")
    return (f"it is {type(bn).__name__}, not nn.BatchNorm2d (the fused op reproduces "
            "nn.BatchNorm2d's forward only)")


def _unfusable(bn: nn.Module, calls: int, site: Site, modules: dict[str, nn.Module]
               ) -> str | None:
    if type(bn) is not nn.BatchNorm2d and not acts_as_batch_norm(bn):
        return _subclass_reason(bn)
    if has_hooks(bn):
        return "it has hooks, which its fused twin would not have"
    if calls > 1:
        return f"the forward calls it {calls} times"
    if bn_input(site.bn) is None:
        return "it is called with arguments other than its input"
    relu = modules.get(str(site.relu.target)) if site.relu.op == "call_module" else None
    if relu is not None and calls_hooks(relu):
        return f"its ReLU ({site.relu.target}) has hooks, which the fused call would skip"
    if any(p.is_meta for p in bn.parameters()):
        return "its parameters are on the meta device, so the rewrite cannot be checked"
    return None


def bn_input(bn: fx.Node) -> fx.Node | None:
    """The input of a BatchNorm call, positional or by keyword, where that is all it is given."""
    if len(bn.args) == 1 and not bn.kwargs:
        return bn.args[0]  # type: ignore[return-value]
    if not bn.args and set(bn.kwargs) == {"input"}:
        return bn.kwargs["input"]  # type: ignore[return-value]
    return None


def find_sites(graph: fx.Graph, root: nn.Module) -> tuple[list[Site], list[tuple[str, str]]]:
    """The sites in `graph` (traced from `root`), and (BN module name, reason) for each BatchNorm
    followed by a ReLU that cannot be fused exactly."""
    modules = dict(root.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    sites: list[Site] = []
    refused: list[tuple[str, str]] = []
    claimed: set[fx.Node] = set()  # an add of two BN outputs is fused with one of them
    for node in graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, _BatchNorm) or isinstance(module, FusedBatchNorm2d) \
                or hasattr(module, "unfused_class") or activates_first(module):
            continue  # any other BatchNorm is looked at, so that one it cannot fuse is named
        site, reason = _match(node, modules)
        if site is not None and site.relu in claimed:
            continue
        if site is not None:
            reason = _unfusable(module, calls[str(node.target)], site, modules)
        elif reason is None and type(module) is not nn.BatchNorm2d and isinstance(
                module, nn.BatchNorm2d) and may_apply_relu(module):
            reason = _subclass_reason(module)  # timm's BatchNormAct2d: a ReLU may be inside
        if reason is not None:
            refused.append((str(node.target), reason))
        elif site is not None:
            claimed.add(site.relu)
            sites.append(site)
    return sites, refused


def caller_of(node: fx.Node) -> tuple[str, ...]:
    """The module path (outermost first) of the forward that makes this call."""
    stack = tuple(node.meta.get("nn_module_stack", {}))
    return stack[:-1] if node.op == "call_module" else stack


def owner_of(site: Site) -> str:
    """The innermost module whose forward makes every call of the site: its forward is the one
    to rewrite."""
    callers = [caller_of(node) for node in site.nodes]
    common: list[str] = []
    for names in zip(*callers):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return common[-1] if common else ""

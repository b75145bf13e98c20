"""The graph-level path of `fuse`: BatchNorm2d -> [add] -> ReLU wherever a traced forward has it
(VGG's and RegNet's conv-BN-ReLU stacks, DenseNet's BN-ReLU-conv layers, a residual add of any
block, a user's own network).

Each site belongs to the innermost module whose forward makes all its calls (its "owner"). That
module's forward is traced again with only the submodules the sites need inlined, the site's calls
become one call of the BatchNorm's fused twin (same tensors), and the module gets the rewritten
forward: its class becomes a subclass made for it (`Fused<Name>`), so the object, its submodules,
state_dict keys and any optimizer stay as they were, and `unfuse` sets the class back. A forward
that traces to other graphs in training and eval mode (it branches on `self.training`) gets one
rewrite per mode where both hold the same sites (`forward_facts.by_mode`). Checked on the inputs
the owner receives when the whole model runs a probe batch (and in training mode, where it has a
rewrite of its own, on copies), the rewritten forward returns what the original does. The
search for the sites and their owners is search.py's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ..blocks import fused_in_place, unfused_in_place
from ..kernels import FusedBatchNorm2d
from .arguments import Fixed, fixed_on_probe
from .forward_facts import KEPT_MODULES, Guards, KeptModules, by_mode, guarded, kept_module
from .fused_class import FusedForward
from .norm_act import acts_as_batch_norm, give_fused_class, take_fused_class
from .patterns import Site, find_sites, residual_batch_norm, traced
from .probe import changed_inputs, cloned, evaluating, inputs_on_probe, mismatch
from .records import FusedSite, SkippedBlock, qualified
from .rewrite import added_into_then_relu, added_then_relu, rewrite
from .search import (Found, GraphResult, in_mode, inside, merged_owners, name_left_again, relative,
                     remember_left, scan)

def _forward_of(graph: fx.Graph) -> Callable[..., Any]:
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<forward rewritten by resnet_ablate.fuse>", "exec"), namespace)  # noqa: S102
    # torch.fx tracing a fused model (a user's tracer, with the fused BN a leaf) records
    # `added_then_relu` (and `added_into_then_relu`) as one call: its dtype test cannot be
    # traced. torch.fx.wrap registers a name of the namespace it is called at the top of, which
    # this exec is.
    for name in [n for n, value in namespace.items()
                 if value is added_then_relu or value is added_into_then_relu]:
        exec(compile(f"torch.fx.wrap({name!r})", "<resnet_ablate.fuse>", "exec"), namespace)  # noqa: S102
    return namespace["forward"]


def _plain_slices(self: Any, index: Any) -> Any:
    """A rewritten Sequential's `__getitem__`: a slice is a new Sequential of the original class
    (its forward calls its parts, whose fused BatchNorms apply no ReLU unless asked to)."""
    item = self.unfused_class.__getitem__(self, index)
    if type(item) is type(self) and item is not self:
        item.__class__ = self.unfused_class
    return item


def _give_forward(module: nn.Module, forward: Callable[..., Any], batch_norms: tuple[str, ...],
                  joined: tuple[str, ...], kept: KeptModules) -> None:
    """`module` with its class made for `forward`, which calls the fused `batch_norms` and adds
    the output of the `joined` ones (their names from the module: `fuse` reads them again)."""
    base = type(module)
    original = getattr(base, "unfused_class", base)
    namespace = {"forward": forward, "unfused_class": original, "__module__": __name__,
                 "fused_batch_norms": (*getattr(module, "fused_batch_norms", ()), *batch_norms),
                 "joined_batch_norms": (*getattr(module, "joined_batch_norms", ()), *joined)}
    if issubclass(original, nn.Sequential):  # else a slice would be a copy of this class
        namespace["__getitem__"] = _plain_slices
    module.__class__ = type(f"Fused{original.__name__}", (FusedForward, original), namespace)
    setattr(module, KEPT_MODULES, (*getattr(module, KEPT_MODULES, ()), *kept))


def _kept_modules(module: nn.Module, through: set[str], calls: list[tuple[fx.Node, ...]]
                  ) -> KeptModules:
    """The submodules a rewritten forward depends on being unchanged: those it inlined (and the
    owner itself), each with its submodules' names; of the sites' calls (`calls`), the fused
    BatchNorms it calls with the ReLU on and the ReLU modules it absorbed."""
    absorbed = {str(node.target) for site in calls for node in site if node.op == "call_module"}
    return tuple(kept_module(module.get_submodule(path), path, path in absorbed)
                 for path in sorted({"", *through, *absorbed}))


def _traced_in_both_modes(module: nn.Module, through: set[str], fixed: tuple[Fixed, ...]
                          ) -> tuple[tuple[fx.Graph, ...], Guards, tuple[str, ...]] | str:
    """The owner's forward traced (with `through` inlined and `fixed` as constants), the values
    it baked in, and the modules whose mode it read: one graph where both modes trace to it, else
    the training and the eval mode's (a forward that branches on self.training: timm's head
    dropout, `drop_rate`), where every module's reads were watched."""
    try:
        graphs, guards, modes_read, unrecorded = [], {}, set(), set()
        for training in (True, False):
            with in_mode(module, training):
                graph, tracer = traced(module, through, fixed)
            graphs.append(graph)
            guards.update(((path, attr), value) for path, attr, value in tracer.guards)
            modes_read |= tracer.modes_read
            unrecorded |= tracer.unrecorded
    except Exception as error:  # noqa: BLE001 - traced once already; a failure here refuses
        return f"its forward cannot be traced on its own ({type(error).__name__}: {error})"
    same = graphs[0].python_code("self").src == graphs[1].python_code("self").src
    if not same and unrecorded:
        return ("its forward traces to different graphs in training and eval mode (it branches "
                f"on self.training), and whether it reads the mode of {sorted(unrecorded)[0]} "
                "cannot be watched (a TorchScript module)")
    return (tuple(graphs[:1] if same else graphs),
            tuple((path, attr, value) for (path, attr), value in guards.items()),
            tuple(sorted(modes_read)))


def _sites_of(graphs: tuple[fx.Graph, ...], module: nn.Module, owner: str,
              expected_bns: set[str]) -> list[list[Site]] | str:
    """Each graph's sites among `expected_bns`; why not where the two modes' graphs hold
    different ones (a BN followed by its ReLU in one mode only: no rewrite is exact in both)."""
    sites = [[s for s in find_sites(graph, module)[0] if qualified(owner, str(s.bn.target))
              in expected_bns] for graph in graphs]
    keys = [sorted((str(s.bn.target), s.pattern) for s in found) for found in sites]
    if keys[0] != keys[-1]:
        return ("its forward traces to different graphs in training and eval mode (it branches "
                "on self.training), and they fuse different sites")
    return sites


def _checked(module: nn.Module, forwards: list[Callable[..., Any]], inputs: Any,
             unfused: nn.Module | None) -> str | None:
    """Why the rewritten forward is not the module's own on the probe call, if it is not: in eval
    mode against what the model's call returned; where it has a training mode's forward too, in
    training mode on copies, against `unfused` (a copy taken before its BNs were fused), both
    from the probe call's random streams (a dropout's masks alike)."""
    args, kwargs, streams, expected, left = inputs
    try:
        with evaluating(module), streams.replayed():  # (the draws the probe's call made)
            given = cloned((args, kwargs))
            actual = forwards[-1](module, *args, **kwargs)
        reason = mismatch(expected, actual) or changed_inputs(given, left, (args, kwargs))
        if reason is None and unfused is not None:
            fused = copy.deepcopy(module).train()  # (as `unfused` was copied, it copies)
            with torch.no_grad(), streams.replayed():
                expected = unfused.train().forward(*cloned(args), **cloned(kwargs))
            with torch.no_grad(), streams.replayed():
                actual = forwards[0](fused, *cloned(args), **cloned(kwargs))
            reason = mismatch(expected, actual)
            return None if reason is None else f"in training mode, {reason}"
        return reason
    except Exception as error:  # noqa: BLE001 - e.g. a residual that broadcasts
        return f"the rewritten forward failed on the probe input ({type(error).__name__}: {error})"


def _rewrite_owner(model: nn.Module, owner: str, through: set[str], expected_bns: set[str],
                   inputs: Any) -> tuple[list[FusedSite], list[SkippedBlock], str | None]:
    """Rewrite one owner's forward, proved on its probe inputs: the sites fused and those its
    own trace does not show, or why none was. Arguments the probe's call passed as anything but
    a tensor or a container are traced as that value (arguments.py)."""
    module = model.get_submodule(owner)
    fixed = fixed_on_probe(module, *inputs[:2]) if inputs is not None else ()
    traced_forward = _traced_in_both_modes(module, through, fixed)
    if isinstance(traced_forward, str):
        return [], [], traced_forward
    if inputs is None:
        return [], [], ("the probe input never reached it (in eval mode, nor in training mode on "
                        "a copy), so a rewrite could not be checked")
    graphs, baked, modes_read = traced_forward
    each = _sites_of(graphs, module, owner, expected_bns)
    if isinstance(each, str):
        return [], [], each
    sites = each[0]
    unseen = expected_bns - {qualified(owner, str(s.bn.target)) for s in sites}
    missed = [SkippedBlock(bn, f"in the forward of {owner or '<model>'} it is not followed by a ReLU "
                           "once the submodules between them are called rather than inlined (one "
                           "may branch on self.training, as DropPath does)") for bn in sorted(unseen)]
    if not sites:
        return [], missed, None
    originals = {str(s.bn.target): module.get_submodule(str(s.bn.target)) for s in sites}
    modules = dict(module.named_modules())
    found = [FusedSite(qualified(owner, str(s.bn.target)), s.pattern,
                       qualified(owner, residual) if (residual := residual_batch_norm(s, modules))
                       else None) for s in sites]
    absorbed = [(site.bn, site.relu) for site in sites]  # before the rewrite erases them
    try:
        unfused = copy.deepcopy(module) if len(graphs) > 1 else None  # (training mode's check)
    except Exception as error:  # noqa: BLE001 - a lock, a client: whatever cannot be copied
        return [], [], ("it branches on self.training, and its training mode's rewrite is checked "
                        f"on a copy, which failed ({type(error).__name__}: {error})")
    for graph, graph_sites in zip(graphs, each):
        rewrite(graph, graph_sites, module)
    forwards = [_forward_of(graph) for graph in graphs]
    for target, bn in originals.items():  # ReLU off: the rewritten forward asks for it
        if acts_as_batch_norm(bn):  # a norm-activation without one: fused in place
            give_fused_class(bn)
        else:
            module.set_submodule(target, fused_in_place(bn, relu=False))
    reason = _checked(module, forwards, inputs, unfused)
    if reason is not None:
        for target, bn in originals.items():
            take_fused_class(bn)
            # (fused in place, `bn` itself goes back; a twin's original was left as it was)
            module.set_submodule(target, unfused_in_place(bn) if type(bn) is FusedBatchNorm2d
                                 else bn)
        return [], [], reason
    forward = forwards[0] if len(forwards) == 1 else by_mode(*forwards, modes_read)
    joined = tuple(relative(f.residual_batch_norm, owner) for f in found if f.residual_batch_norm)
    _give_forward(module, guarded(forward, baked, fixed), tuple(originals), joined,
                  _kept_modules(module, through, absorbed))
    return found, missed, None


def fuse_graphs(model: nn.Module, example_input: Any = None) -> GraphResult:
    """Fuse every site the traced forwards of `model` hold, in place; what was done and left."""
    result = GraphResult()
    found: dict[str, list[Found]] = {}
    scan(model, "", found, result)
    if not hasattr(model, KEPT_MODULES):  # (a rewritten model's own are named by its scan)
        name_left_again(model, "", result)
    owners = merged_owners(found)
    inputs, failure = inputs_on_probe(model, list(owners), example_input) if owners else ({}, None)
    for owner, through in owners.items():
        expected = {f.batch_norm for o, fs in found.items() if o == owner or (
            inside(o, owner) and relative(o, owner) in through) for f in fs}
        sites, missed, reason = _rewrite_owner(model, owner, through, expected, inputs.get(owner)) \
            if failure is None else ([], [], failure)
        if reason is not None:
            result.skipped.extend(SkippedBlock(bn, f"{owner or '<model>'}: {reason}") for bn in sorted(expected))
            continue
        result.skipped.extend(missed)
        if sites:
            result.sites.extend(sites)
            result.rewritten.append(owner)
    remember_left(model, result.skipped)
    return result

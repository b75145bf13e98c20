"""The search of `fuse`'s graph-level path: each forward traced (or, where it cannot be, each
child searched on its own) to find its BatchNorm2d -> [add] -> ReLU sites, each under its owner
(the innermost module whose forward makes all its calls), and owners merged where one's sites
reach into another's; below a forward an earlier fuse rewrote, what it calls as it is searched
and what it left named again (graph.py rewrites the owners)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..kernels import FusedBatchNorm2d
from .arguments import plain_defaults
from .forward_facts import KEPT_MODULES, LEFT_BELOW
from .fused_class import FusedForward
from .patterns import _OPAQUE, find_sites, owner_of, traced
from .records import FusedSite, SkippedBlock, qualified

_TORCH_LAYERS = fx.Tracer()  # its is_leaf_module: torch.nn's own layers, which hold no sites


def _prefixes(path: str) -> set[str]:
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def relative(path: str, owner: str) -> str:
    return path[len(owner) + 1:] if owner else path


@dataclass
class GraphResult:
    sites: list[FusedSite] = field(default_factory=list)
    skipped: list[SkippedBlock] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@dataclass(frozen=True)
class Found:
    batch_norm: str  # absolute module names
    called: tuple[str, ...]


def scan(module: nn.Module, name: str, found: dict[str, list[Found]], result: GraphResult,
         untraced: str | None = None) -> None:
    """Trace `module` (or, where its forward cannot be traced, each child on its own) and record
    each site under its owner (absolute names throughout). `untraced`: why the forward calling
    this module's children could not be traced, where this module has no forward of its own
    (a ModuleList or ModuleDict, whose children that forward called)."""
    if isinstance(module, _OPAQUE):  # this package's fused modules
        return
    if hasattr(module, KEPT_MODULES):  # its forward rewritten by an earlier fuse: a call
        _scan_called_as_they_are(module, name, found, result)
        return
    if isinstance(module, torch.jit.ScriptModule):
        result.skipped.extend(_scripted_batch_norms(module, name))
        return
    if type(module).forward is nn.Module.forward:  # a container: its caller called its children
        for child_name, child in module.named_children():
            _untraced_child(child, qualified(name, child_name), untraced, found, result)
        return
    try:
        graph, tracer = _traced_to_search(module)
    except Exception as error:  # noqa: BLE001 - any tracing failure: look one level down
        why = (f"the forward of {name or '<model>'} ({type(module).__name__}) that calls it "
               f"cannot be traced exactly ({type(error).__name__}: {error})")
        for child_name, child in module.named_children():
            _untraced_child(child, qualified(name, child_name), why, found, result)
        return
    sites, refused = find_sites(graph, module)
    result.skipped.extend(SkippedBlock(qualified(name, bn), why) for bn, why in refused)
    for site in sites:
        called = tuple(qualified(name, str(n.target)) for n in site.nodes if n.op == "call_module")
        owner = qualified(name, owner_of(site))
        found.setdefault(owner, []).append(Found(qualified(name, str(site.bn.target)), called))
    for path in tracer.searched_alone:  # called, not traced into: its own forward is searched
        scan(module.get_submodule(path), qualified(name, path), found, result)


def _scan_called_as_they_are(module: nn.Module, name: str, found: dict[str, list[Found]],
                             result: GraphResult) -> None:
    """Below a forward an earlier fuse rewrote: the submodules it calls as they are (neither
    inlined nor absorbed, nor torch's own layers) searched as that fuse searched them, so that
    a site it left there (a checkpointed child's) is named again, not passed over in silence."""
    inlined = {".".join(parts) for parts, *_ in getattr(module, KEPT_MODULES)}

    def below(parent: nn.Module, path: str) -> None:
        for child_name, child in parent.named_children():
            child_path = qualified(path, child_name)
            if child_path in inlined:
                below(child, child_path)
            elif not (_TORCH_LAYERS.is_leaf_module(child, child_path)
                      or isinstance(child, _BatchNorm)):  # (a norm-activation: called, fused)
                scan(child, qualified(name, child_path), found, result)

    below(module, "")
    name_left_again(module, name, result)  # (its own trace's refusals)


def name_left_again(module: nn.Module, name: str, result: GraphResult) -> None:
    """The sites an earlier fuse left and remembered on `module` (`remember_left`), named again
    where each is still an unfused BatchNorm that this fuse has not named."""
    named = {s.name for s in result.skipped}
    for path, why in getattr(module, LEFT_BELOW, {}).items():
        bn = _submodule_or_none(module, path)
        if isinstance(bn, _BatchNorm) and not isinstance(bn, (FusedBatchNorm2d, FusedForward)) \
                and qualified(name, path) not in named:
            # (what made it so may have changed since: a hook removed)
            result.skipped.append(SkippedBlock(qualified(name, path), (
                f"left unfused by an earlier fuse ({why}); if that has changed, unfuse(model), "
                "then fuse(model) decides anew")))


def _submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:  # (gone since)
        return None


def remember_left(model: nn.Module, skipped: list[SkippedBlock]) -> None:
    """Each site left unfused, kept for a later fuse to name again (`LEFT_BELOW`): below a
    rewritten forward (rewritten now or before), on the innermost such forward's module, which a
    later fuse calls rather than traces; elsewhere, where some forward was rewritten, on the
    model, since a later trace calls that forward and may no longer see what made the site (an
    audit: xception's sum, used twice and then by a ReLU that begins a rewritten forward)."""
    owners = sorted((n for n, m in model.named_modules() if hasattr(m, KEPT_MODULES)),
                    key=lambda n: -len(n))
    for site in skipped:
        owner = next((o for o in owners if inside(site.name, o)), None)
        if owner is None and not owners:
            continue  # (nothing rewritten: a later trace reads the same forwards)
        holder, path = (model, site.name) if owner is None else \
            (model.get_submodule(owner), relative(site.name, owner))
        vars(holder).setdefault(LEFT_BELOW, {}).setdefault(path, site.reason)  # (the first why)


def _traced_to_search(module: nn.Module) -> tuple[fx.Graph, Any]:
    """`module`'s forward traced in training mode (where stochastic parts, DropPath, show their
    work) to find its sites: its arguments as given (proxies), or where that fails (a branch on
    a flag), those with plain defaults fixed at them; raises the first failure."""
    with in_mode(module, True):
        try:
            return traced(module)
        except Exception as first:
            defaults = plain_defaults(module)
            if defaults:
                with contextlib.suppress(Exception):  # the first failure is the one to name
                    return traced(module, fixed=defaults)
            raise first


def _scripted_batch_norms(module: torch.jit.ScriptModule, name: str) -> list[SkippedBlock]:
    """The BatchNorms inside a TorchScript module (scripted or traced), named: its forward is
    compiled, not Python that a rewrite could replace."""
    why = (f"inside {name or '<model>'}, a TorchScript module (torch.jit.script or trace), whose "
           "compiled forward fuse cannot rewrite; fuse the module before scripting it")
    return [SkippedBlock(qualified(name, path), why) for path, m in module.named_modules()
            if getattr(m, "original_name", None) == "BatchNorm2d"]


def _untraced_child(child: nn.Module, name: str, why: str | None,
                    found: dict[str, list[Found]], result: GraphResult) -> None:
    """A child of a module whose forward could not be traced: a BatchNorm it called is named
    with the reason; any other child is searched on its own."""
    if type(child) is nn.BatchNorm2d:
        if why is not None:
            result.skipped.append(SkippedBlock(name, why))
        return
    scan(child, name, found, result, why)


def inside(name: str, owner: str) -> bool:
    return name != owner and (not owner or name.startswith(owner + "."))


def merged_owners(found: dict[str, list[Found]]) -> dict[str, set[str]]:
    """Owner -> the submodules (relative names) its rewritten forward must inline. An owner whose
    sites reach into another owner takes that one's sites over: one forward rewritten, not two."""
    def needs(owner: str, of: str) -> set[str]:
        return set().union(*(_prefixes(relative(c, owner)) for f in found[of] for c in f.called))

    merged: dict[str, set[str]] = {}
    absorbed: set[str] = set()
    for owner in sorted(found, key=lambda o: (o.count(".") if o else -1, o)):
        if owner in absorbed:
            continue
        through = needs(owner, owner)
        grew = True
        while grew:
            grew = False
            for other in found:
                if other not in absorbed and inside(other, owner) and relative(other, owner) in through:
                    absorbed.add(other)
                    through |= needs(owner, other)
                    grew = True
        merged[owner] = through
    return merged

"""The rewrite of a traced forward's sites (patterns.py finds them): each site's calls become one
call of its BatchNorm's fused twin, through the helpers here where an add's dtype or a user's
torch.fx trace asks for the unfused ops."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from ..kernels import FusedBatchNorm2d
from .norm_act import acts_as_batch_norm
from .patterns import Site, bn_input


def rewrite(graph: fx.Graph, sites: list[Site], root: nn.Module) -> None:
    """Each site's calls replaced by one call of its BatchNorm module with the residual and
    `relu=True` (the module itself is swapped for its fused twin by the caller, whose own flag
    stays off: another caller of the module gets a BatchNorm, as before); a residual added out of place
    goes through `added_then_relu`, which keeps the dtype that `+` promotes to, and a BN output
    added into its residual in place through `added_into_then_relu`, the residual's dtype; for
    a norm-activation (norm_act.py), through their twins that a user's torch.fx trace traces
    into, as it traces into the module unfused (its mode then baked in, as there)."""
    for site in sites:
        x = bn_input(site.bn)
        norm_act = acts_as_batch_norm(root.get_submodule(str(site.bn.target)))
        with graph.inserting_before(site.relu):
            if site.add is None:
                fused = graph.call_module(str(site.bn.target), (x,), {"relu": True})
            else:  # read now: an earlier site's ReLU it added is replaced by then
                first, second = site.add.args
                residual = second if first is site.bn else first
                if site.add.target in (operator.iadd, "add_") and first is site.bn:
                    # in place into the BN output: its dtype stays
                    fused = graph.call_module(str(site.bn.target), (x, residual), {"relu": True})
                elif site.add.target in (operator.iadd, "add_"):  # into the residual's tensor
                    fused = graph.call_function(
                        norm_act_added_into_then_relu if norm_act else added_into_then_relu,
                        (graph.get_attr(str(site.bn.target)), x, residual))
                else:
                    fused = graph.call_function(
                        norm_act_added_then_relu if norm_act else added_then_relu,
                        (graph.get_attr(str(site.bn.target)), x, residual))
        site.relu.replace_all_uses_with(fused)
        for node in reversed(site.nodes):
            graph.erase_node(node)
    graph.lint()


def added_then_relu(bn: FusedBatchNorm2d, x: torch.Tensor, residual: torch.Tensor
                    ) -> torch.Tensor:
    """`relu(bn(x) + residual)` as the unfused ops compute it: the fused op writes the BN
    output's dtype (as `out += residual` does), where `+` promotes to a wider residual's, which
    a probe in float32 does not show but autocast does (bf16 convolutions, a float32 shortcut):
    there the unfused arithmetic runs."""
    if residual.dtype is x.dtype or torch.result_type(x, residual) == x.dtype:
        return bn(x, residual, relu=True)
    return torch.relu(bn(x, relu=False) + residual)


def added_into_then_relu(bn: FusedBatchNorm2d, x: torch.Tensor, residual: torch.Tensor
                         ) -> torch.Tensor:
    """`residual += bn(x)` then `relu(residual)` (a residual that nothing else reads, as timm's
    `x += shortcut` after drop_path) as the unfused ops compute it: in the residual's dtype,
    where it is not the BN output's (which the fused op writes), by the unfused ops in place."""
    if residual.dtype is x.dtype:
        return bn(x, residual, relu=True)
    return torch.relu(residual.add_(bn(x, relu=False)))


def norm_act_added_then_relu(bn: nn.Module, x: Any, residual: Any) -> Any:
    """`added_then_relu` for a norm-activation, and under a user's torch.fx trace its module
    called and the add and ReLU recorded, as the unfused forward is traced (not wrapped, unlike
    `added_then_relu`, so that the tracer reaches it)."""
    if isinstance(x, fx.Proxy):
        return torch.relu(bn(x) + residual)
    return added_then_relu(bn, x, residual)


def norm_act_added_into_then_relu(bn: nn.Module, x: Any, residual: Any) -> Any:
    """`added_into_then_relu` for a norm-activation, traced as `norm_act_added_then_relu` is."""
    if isinstance(x, fx.Proxy):
        return torch.relu(operator.iadd(residual, bn(x)))
    return added_into_then_relu(bn, x, residual)

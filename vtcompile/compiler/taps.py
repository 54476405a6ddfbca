"""Taps: read intermediate values of a Program while it runs, without changing its graph.

Offline work (calibration statistics, multi-cut oracle checks) reads the values a graph already
computes - the post-RoPE q/k a layer feeds to SDPA, the positions kept at a cut - through an FX Interpreter.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph import sdpa_node


@torch.no_grad()
def run_with_taps(gm: fx.GraphModule, args, names: set[str]) -> tuple[object, dict[str, object]]:
    """Run `gm` on `args`; return (outputs, {node name: value}) for the named nodes."""
    seen: dict[str, object] = {}

    class Tapping(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                seen[n.name] = out
            return out

    return Tapping(gm).run(*args), seen


def sdpa_inputs(gm: fx.GraphModule, layers) -> dict[int, tuple[str, str, str | None, float | None]]:
    """Names of the (query, key, mask) nodes each layer feeds to SDPA, and the scale it uses."""
    out = {}
    for layer in layers:
        node = sdpa_node(gm, layer)
        args = list(node.args) + [None] * 8
        mask = node.kwargs.get("attn_mask", args[3])
        out[layer] = (args[0].name, args[1].name, mask.name if isinstance(mask, fx.Node) else None,
                      node.kwargs.get("scale"))
    return out

"""Cuts: where in the decoder a token selection sits.

A cut is before a decoder layer (that layer's attention and MLP, and every later layer, see only the kept
tokens) or after a layer's attention (the removed tokens were still keys in that layer's attention, so they stay
in its KV cache; its MLP and the later layers see only the kept tokens: the removal point of layer-wise budgeted pruning).

The graph annotation (compiler/graph.py) places every node at a position: l for the attention half of layer l,
l + 0.5 for its MLP half, -1 before the decoder and L after it. All arithmetic between cuts and positions lives
here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Cut:
    layer: int
    after_attention: bool = False

    @classmethod
    def at(cls, value: "Cut | int") -> "Cut":
        """A Cut, or a layer number meaning the cut before that layer."""
        if isinstance(value, Cut):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"a cut is a Cut or a layer number, found {value!r}")
        return cls(value)

    @property
    def position(self) -> float:
        """The annotation position of the first node after the cut."""
        return self.layer + 0.5 if self.after_attention else float(self.layer)

    @property
    def emit_position(self) -> float:
        """Where the nodes of the selection itself are annotated: after everything before the cut, before the
        first node after it (and so in the per-layer stage of `layer`: see stage_layer)."""
        return self.position - 0.25

    def removes_from_attention(self, layer: int) -> bool:
        """Whether tokens removed at this cut are missing from `layer`'s attention (and its KV cache)."""
        return layer > self.layer or (layer == self.layer and not self.after_attention)

    def removes_from_mlp(self, layer: int) -> bool:
        return layer >= self.layer

    def to_dict(self) -> dict:
        return {"layer": self.layer, "after_attention": self.after_attention}

    def __str__(self) -> str:
        return f"after layer {self.layer}'s attention" if self.after_attention else f"before layer {self.layer}"


def stage_layer(position: float, num_layers: int) -> int:
    """The per-layer stage a node at `position` runs in: its layer, a selection's nodes with the layer they cut
    (emit_position), the preamble with layer 0 and the postamble with the last layer."""
    return max(0, min(num_layers - 1, math.floor(position + 0.25)))

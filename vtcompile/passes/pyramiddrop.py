"""PyramidDrop: progressive visual-token dropping by stage (Xing et al., 2024; Cooperx521/PyramidDrop).

Algorithm: the decoder is cut into stages; after layers 8/16/24 (of 32) the image tokens are reduced to
0.5/0.25/0.125 of the original count. At each cut, tokens are ranked by the attention of the last instruction
token's query over all keys, where query and keys are projected with the NEXT layer's q/k on its normed input
states (softmax over all keys, mean over heads); the top-k are kept in original order. Here the next layer's
norm + q/k + RoPE are copied in front of the cut (compiler.scorers.last_query_attention(clone=True)) and the
cut itself is compiler.rewrite.select_tokens, so attention stays SDPA and batches work.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.rewrite import select_tokens
from ..compiler.scorers import last_query_attention
from ..errors import PassConfigError
from .base import PassConfig, PassDef, param, register

_PAPER_LAYERS, _PAPER_DEPTH = (8, 16, 24), 32


@dataclass(frozen=True)
class PyramidDropConfig(PassConfig):
    name = "pyramiddrop"
    layers: tuple[int, ...] = param((), "cut layers, tokens dropped before each (empty: 8/16/24 of 32, scaled "
                                        "to the model depth)")
    ratios: tuple[float, ...] = param((0.5, 0.25, 0.125), "fraction of the image tokens kept after each cut")

    def __post_init__(self):
        super().__post_init__()
        if not self.ratios:
            raise PassConfigError("pyramiddrop: ratios must name at least one stage, e.g. ratios=0.5/0.25/0.125")
        if any(not 0.0 < r <= 1.0 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
            raise PassConfigError(f"pyramiddrop: ratios={list(self.ratios)} must lie in (0, 1] and not increase "
                                  "from one stage to the next")
        if self.layers and len(self.layers) != len(self.ratios):
            raise PassConfigError(f"pyramiddrop: {len(self.layers)} layers but {len(self.ratios)} ratios; give one "
                                  "ratio per cut layer")
        if self.layers and list(self.layers) != sorted(set(self.layers)):
            raise PassConfigError(f"pyramiddrop: layers={list(self.layers)} must be strictly increasing")

    def cut_layers(self, geometry: Geometry) -> tuple[int, ...]:
        if self.layers:
            return self.layers
        if len(self.ratios) != len(_PAPER_LAYERS):
            raise PassConfigError(f"pyramiddrop: {len(self.ratios)} ratios need explicit layers= (the default "
                                  f"cuts are {'/'.join(map(str, _PAPER_LAYERS))} of {_PAPER_DEPTH})")
        return tuple(int(geometry.num_layers * x / _PAPER_DEPTH + 0.5) for x in _PAPER_LAYERS)

    def check_model(self, geometry: Geometry) -> None:
        cuts = self.cut_layers(geometry)
        if cuts[0] < 1 or cuts[-1] > geometry.num_layers - 1 or len(set(cuts)) != len(cuts):
            raise PassConfigError(
                f"pyramiddrop: cut layers {list(cuts)} do not fit a {geometry.num_layers}-layer decoder; they must "
                f"be distinct and in [1, {geometry.num_layers - 1}]")


def plan(config: PyramidDropConfig, geometry: Geometry, n_visual: int, recipe=None) -> list[tuple[int, int]]:
    return [(b, int(round(r * n_visual))) for b, r in zip(config.cut_layers(geometry), config.ratios)]


def apply(program: Program, config: PyramidDropConfig, recipe=None) -> Program:
    config.check_model(program.geometry)
    with program.series_of_rewrites():
        for layer, keep in plan(config, program.geometry, program.n_visual):
            scorer = last_query_attention(program, layer, clone=True)
            select_tokens(program, layer, scorer, min(keep, program.visual_at(layer)), by="pyramiddrop")
    return program


PASS = register(PassDef(
    name="pyramiddrop",
    summary="keep 0.5/0.25/0.125 of the image tokens after layers 8/16/24, ranked by the last instruction "
            "token's attention with the next layer's q/k (PyramidDrop)",
    needs=("attention_taps",), config=PyramidDropConfig, plan=plan, apply=apply, min_layers=4))

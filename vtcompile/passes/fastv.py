"""FastV: drop visual tokens by the last token's attention (Chen et al., 2024; pkunlp-icler/FastV).

Algorithm: at layer K, take the attention of layer K-1, row of the LAST input token, mean over heads,
restricted to the visual columns; keep the top (1-R) x N visual tokens in their original order with their
original position ids; layers >= K see only those. The published code needs eager attention with
output_attentions and batch 1; here the one needed query row is recomputed from the q/k that layer K-1
feeds to SDPA (compiler.scorers.last_query_attention), so SDPA stays and batches work.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.rewrite import select_tokens
from ..compiler.scorers import last_query_attention
from ..errors import PassConfigError
from .base import PassConfig, PassDef, param, register


@dataclass(frozen=True)
class FastVConfig(PassConfig):
    name = "fastv"
    k: int = param(2, "layer before which tokens are dropped (scores from layer k-1)", low=1)
    r: float = param(0.5, "fraction of the visual tokens dropped", low=0.0, high=1.0, high_open=True)

    def check_model(self, geometry: Geometry) -> None:
        if self.k > geometry.num_layers - 1:
            raise PassConfigError(
                f"fastv: k={self.k} is beyond the last layer; the model has {geometry.num_layers} decoder layers, "
                f"so k must be in [1, {geometry.num_layers - 1}]")


def kept_visual(n_visual: int, r: float) -> int:
    return n_visual - int(round(r * n_visual))


def plan(config: FastVConfig, geometry: Geometry, n_visual: int, recipe=None) -> list[tuple[int, int]]:
    return [(config.k, kept_visual(n_visual, config.r))]


def apply(program: Program, config: FastVConfig, recipe=None) -> Program:
    config.check_model(program.geometry)
    for layer, keep in plan(config, program.geometry, program.visual_at(config.k)):
        select_tokens(program, layer, last_query_attention(program, layer - 1), keep, by="fastv")
    return program


PASS = register(PassDef(
    name="fastv",
    summary="drop visual tokens at layer k by the last token's attention in layer k-1 (FastV)",
    needs=("attention_taps",), config=FastVConfig, plan=plan, apply=apply, min_layers=2))

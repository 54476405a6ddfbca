"""Random visual-token selection: the baseline every scoring method must beat.

Keeps a uniformly random (1 - r) x N of the visual tokens from layer k on (k = 0: before the decoder, like
pre-LLM selection), in original order with original position ids. Draws come from torch's global generator
(seed it with torch.manual_seed for reproducible runs). Each target draws in its own way (Inductor's generated
kernels use their own random stream): one seed gives the same tokens on one target, other tokens on another.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.rewrite import Emitter, select_tokens
from ..errors import PassConfigError
from .base import PassConfig, PassDef, param, register


@dataclass(frozen=True)
class RandomDropConfig(PassConfig):
    name = "randomdrop"
    k: int = param(0, "layer before which tokens are dropped (0: before the decoder)", low=0)
    r: float = param(0.5, "fraction of the visual tokens dropped", low=0.0, high=1.0, high_open=True)

    def check_model(self, geometry: Geometry) -> None:
        if self.k > geometry.num_layers - 1:
            raise PassConfigError(f"randomdrop: k={self.k} is beyond the last layer; k must be in "
                                  f"[0, {geometry.num_layers - 1}]")


def plan(config: RandomDropConfig, geometry: Geometry, n_visual: int, recipe=None):
    return [(config.k, n_visual - int(round(config.r * n_visual)))]


def apply(program: Program, config: RandomDropConfig, recipe=None) -> Program:
    config.check_model(program.geometry)

    def uniform(e: Emitter):
        return e(torch.ops.aten.rand_like.default, program.positions_node, dtype=torch.float32)

    for layer, keep in plan(config, program.geometry, program.visual_at(config.k)):
        select_tokens(program, layer, uniform, keep, by="randomdrop")
    return program


PASS = register(PassDef(
    name="randomdrop",
    summary="baseline: keep a uniformly random (1-r) of the visual tokens from layer k on (k=0: before the LLM)",
    config=RandomDropConfig, plan=plan, apply=apply))

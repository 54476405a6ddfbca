"""G-Prune: visual tokens chosen before the LLM by information propagation on a similarity graph (2501.02268).

Algorithm (per image, on the projected visual tokens X [P, D]): cosine-similarity graph, entries below 0.5
zeroed, divided by the temperature 0.03, row softmax -> A; each token's L2 norm is its initial information
s = ||X||, propagated 5 steps s <- s A (each token passes its information to its neighbours in proportion to
their similarity); score = s / degree (the number of tokens at similarity >= 0.5, itself included), so a
token that many similar tokens point to but that has few neighbours of its own - a distinctive token - ranks
high; keep the top `keep` of the image's tokens. Our reading of the method summary in ../shared/METHODS.md (the
propagation direction and the degree are not spelled out there); the graph (before the LLM) is the same either
way. The selection is compiler.scorers.visual_selection at the cut before layer 0 (compiler.rewrite.
select_tokens), so it composes with the in-decoder passes and lowers to every target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.scorers import before_llm_plan, select_before_llm
from .base import PassConfig, PassDef, param, register


@dataclass(frozen=True)
class GPruneConfig(PassConfig):
    name = "gprune"
    keep: float = param(0.5, "fraction of each image's visual tokens kept", low=0.0, high=1.0, low_open=True)
    threshold: float = param(0.5, "similarity below which graph edges are dropped", low=-1.0, high=1.0)
    temperature: float = param(0.03, "softmax temperature of the graph's edge weights", low=0.0, low_open=True)
    steps: int = param(5, "propagation steps", low=1)


def gprune_scores(feats: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03, steps: int = 5):
    """[R, P, D] projected visual tokens (one image a row) -> [R, P] G-Prune scores."""
    x = feats.float()
    norms = x.norm(dim=-1)
    unit = x / norms.clamp_min(1e-6).unsqueeze(-1)
    sim = torch.matmul(unit, unit.transpose(-1, -2))
    sim = torch.where(sim < threshold, torch.zeros_like(sim), sim)
    adj = torch.softmax(sim / temperature, dim=-1)
    degree = (sim > 0).float().sum(-1)
    info = norms
    for _ in range(steps):
        info = torch.matmul(info.unsqueeze(1), adj).squeeze(1)
    return info / degree.clamp_min(1.0)


def gprune_keep(feats: torch.Tensor, keep: int, threshold: float = 0.5, temperature: float = 0.03,
                steps: int = 5) -> torch.Tensor:
    """The indices of the `keep` highest-scoring tokens of each row."""
    return torch.topk(gprune_scores(feats, threshold, temperature, steps), keep, dim=-1)[1]


def plan(config: GPruneConfig, geometry: Geometry, n_visual: int, recipe=None):
    return before_llm_plan(config.keep, geometry, n_visual)


def apply(program: Program, config: GPruneConfig, recipe=None) -> Program:
    return select_before_llm(program, "gprune", config.keep, gprune_keep, threshold=config.threshold,
                             temperature=config.temperature, steps=config.steps)


PASS = register(PassDef(
    name="gprune",
    summary="before the LLM, keep each image's tokens that score highest by information propagation on their "
            "similarity graph (G-Prune)",
    needs=("image_groups",), config=GPruneConfig, plan=plan, apply=apply))

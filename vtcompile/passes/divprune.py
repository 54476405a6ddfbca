"""DivPrune: a maximally diverse subset of the visual tokens, chosen before the LLM (Alvar et al., 2025).

Algorithm (per image, on the projected visual tokens): cosine distance between tokens; the first token is the
one whose nearest neighbour is farthest; then, `keep` - 1 times, add the token whose minimum distance to the
tokens chosen so far is largest (greedy max-min diversity). The loop has a static trip count (the kept count),
so it traces into the graph, compiles and exports. DivPrune produces indices, not scores: it is a selector
(compiler.scorers.visual_selection) at the cut before layer 0, so each image keeps its own share.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.scorers import before_llm_plan, select_before_llm
from .base import PassConfig, PassDef, param, register


@dataclass(frozen=True)
class DivPruneConfig(PassConfig):
    name = "divprune"
    keep: float = param(0.098, "fraction of each image's visual tokens kept (0.098: 56 of 576, the paper's)",
                        low=0.0, high=1.0, low_open=True)


def divprune_keep(feats: torch.Tensor, keep: int, tokens: int) -> torch.Tensor:
    """[R, P, D] (P = tokens) -> [R, keep] indices of a greedy max-min diverse subset of each row's tokens."""
    x = feats.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    dist = 1.0 - torch.matmul(unit, unit.transpose(-1, -2))
    eye = torch.eye(tokens, dtype=dist.dtype, device=dist.device)
    nearest = (dist + 4.0 * eye).amin(dim=-1)  # distance to the nearest other token (cosine distance <= 2)
    pick = nearest.argmax(dim=-1, keepdim=True)
    chosen = [pick]
    to_set = torch.gather(dist, 1, pick.unsqueeze(-1).expand(-1, 1, tokens)).squeeze(1)
    to_set = to_set.scatter(1, pick, -1.0)  # chosen tokens are never picked again
    for _ in range(keep - 1):
        pick = to_set.argmax(dim=-1, keepdim=True)
        chosen.append(pick)
        row = torch.gather(dist, 1, pick.unsqueeze(-1).expand(-1, 1, tokens)).squeeze(1)
        to_set = torch.minimum(to_set, row).scatter(1, pick, -1.0)
    return torch.cat(chosen, dim=1)


def plan(config: DivPruneConfig, geometry: Geometry, n_visual: int, recipe=None):
    return before_llm_plan(config.keep, geometry, n_visual)


def apply(program: Program, config: DivPruneConfig, recipe=None) -> Program:
    return select_before_llm(program, "divprune", config.keep, divprune_keep)


PASS = register(PassDef(
    name="divprune",
    summary="before the LLM, keep a maximally diverse subset of each image's tokens (greedy max-min cosine "
            "distance; DivPrune)",
    needs=("image_groups",), config=DivPruneConfig, plan=plan, apply=apply))

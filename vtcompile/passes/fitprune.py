"""FitPrune: a pruning recipe fitted to a FLOPs budget from attention statistics (Ye et al., 2024;
ywh187/FitPrune).

Calibration: one forward per sample; per layer the head-wise MAX attention map gives, for every visual
token j, its "cross" mass (from the text rows after the image, averaged over them) and its "self" mass
(from the visual rows, averaged over them). fit(alpha), layer by layer and per sample: sort each mass
ascending, take the largest prefix whose removal keeps >= (1 - alpha) of the mass, remove the INTERSECTION
of the cross and self prefixes, carry the removal to the next layer; the recipe is the mean count removed at
each layer. A binary search on alpha finds the least aggressive recipe whose paper-convention FLOPs meet
`budget` x baseline.
Inference: at each recipe layer l, score visual tokens by cross x self from layer l's attention and remove
the lowest after that layer's attention (they were still keys in layer l): select_tokens at cut
Cut(l, after_attention=True). Statistics are read through the compiler's taps on the q/k each layer feeds to SDPA.
"""
from __future__ import annotations

import math
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from ..compiler.flops import report_from_plan
from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.cut import Cut
from ..compiler.rewrite import select_tokens
from ..compiler.graph import sdpa_node
from ..compiler.rewrite import Emitter, Scorer
from ..compiler.scorers import inline, sdpa_arguments, text_after_images
from ..compiler.taps import run_with_taps, sdpa_inputs
from ..errors import PassConfigError
from .base import PassConfig, PassDef, Recipe, param, register


@dataclass(frozen=True)
class FitPruneConfig(PassConfig):
    name = "fitprune"
    budget: float = param(0.5, "target paper-convention FLOPs as a fraction of the unpruned model's",
                          low=0.0, high=1.0, low_open=True)
    samples: int = param(64, "calibration samples used to fit the recipe", low=1)
    tolerance: float = param(0.01, "binary-search resolution on alpha (tolerated attention-mass loss; at most 64 "
                                   "halvings)",
                             low=0.0, high=0.5, low_open=True)
    recipe: str = param("", "a recipe JSON file to use instead of calibrating ({layer: tokens removed})")

    def check_model(self, geometry: Geometry) -> None:
        if self.recipe:
            load_recipe(self.recipe, geometry)

    def needs_calibration(self) -> bool:
        return not self.recipe


# -- the statistic and the score ----------------------------------------------------------------------
def head_max_attention(q, k, mask, scale: float, groups: int, bool_mask: bool):
    """Attention probabilities [B, S, S], the max over heads (the paper's statistic), computed explicitly.

    Fully masked rows (padding) get a finite uniform row instead of NaN.
    """
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        if bool_mask:
            logits = torch.where(mask, logits, torch.finfo(torch.float32).min)
        else:
            logits = logits + mask.float()
    return torch.softmax(logits, dim=-1).amax(dim=1)


def cross_self_mass(attn, visual):
    """Per key j: attention mass from the text rows after the image (cross) and from the visual rows
    (self), each averaged over its rows. attn [B, S, S] head-max, visual [B, S] bool -> ([B, S], [B, S])."""
    vis = visual.float()
    after = text_after_images(visual).float()
    cross = (after.unsqueeze(-1) * attn).sum(dim=1) / after.sum(dim=1, keepdim=True).clamp(min=1.0)
    self_mass = (vis.unsqueeze(-1) * attn).sum(dim=1) / vis.sum(dim=1, keepdim=True).clamp(min=1.0)
    return cross, self_mass


def _cross_times_self(q, k, mask, visual, scale: float, groups: int, bool_mask: bool):
    cross, self_mass = cross_self_mass(head_max_attention(q, k, mask, scale, groups, bool_mask), visual)
    return cross * self_mass


def attention_mass(program: Program, layer: int) -> Scorer:
    """The inference score from `layer`'s attention: cross mass x self mass per token."""

    def emit(e: Emitter) -> fx.Node:
        q, k, mask, scale = sdpa_arguments(sdpa_node(program.gm, layer))
        scale = scale if scale is not None else 1.0 / math.sqrt(q.meta["val"].shape[-1])
        groups = q.meta["val"].shape[1] // k.meta["val"].shape[1]
        bool_mask = mask is not None and mask.meta["val"].dtype == torch.bool
        if mask is None:
            return inline(e, _cross_times_self, [q, k, program.visual_mask_node], mask=None, scale=scale,
                          groups=groups, bool_mask=False)
        return inline(e, _cross_times_self, [q, k, mask, program.visual_mask_node], scale=scale, groups=groups,
                      bool_mask=bool_mask)

    return emit



# -- recipes ----------------------------------------------------------------------------------------
@dataclass
class FitPruneRecipe(Recipe):
    """{layer: visual tokens removed after its attention}, fitted for `n_visual` visual tokens per prompt (other
    counts scale it), and how the budget search went."""

    name = "fitprune"
    removed: dict = field(default_factory=dict)
    n_visual: int = 0
    budget: float | None = None
    alpha: float | None = None
    paper_ratio: float | None = None
    iterations: int | None = None
    budget_met: bool | None = None
    samples: int | None = None
    calibration_seconds: float | None = None
    config_hash: str | None = None

    def __post_init__(self):
        self.removed = {int(k): int(v) for k, v in self.removed.items()}

    def describe(self) -> str:
        removed = " ".join(f"L{k}:-{v}" for k, v in self.removed.items()) or "removes nothing"
        if self.paper_ratio is None:
            return removed
        met = "met" if self.budget_met else "NOT met"
        return (f"{removed}  (budget {self.budget:.2f}: {self.paper_ratio:.1%} of paper FLOPs, {met}; "
                f"alpha {self.alpha:.3f})")

    def reuse(self, files: list[Path]) -> str:
        return f"--pass fitprune:recipe={files[0]}"

    @classmethod
    def load(cls, path) -> "FitPruneRecipe":
        """A recipe file (vtcompile calibrate), or a bare {layer: count} mapping in JSON."""
        import json

        p = Path(path)
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise PassConfigError(f"fitprune: recipe file {path} is not valid JSON ({exc})") from None
            if isinstance(data, dict) and "removed" not in data:
                return cls(removed=data)
        return super().load(path)

    def validated(self, geometry: Geometry, where: str) -> "FitPruneRecipe":
        n_visual = self.n_visual or geometry.visual_tokens_per_image
        removed = _validate_removed(self.removed, geometry, n_visual, where)
        return dataclasses.replace(self, removed=removed, n_visual=n_visual)


def _validate_removed(removed: dict, geometry: Geometry, n_visual: int | None, where: str) -> dict[int, int]:
    out = {}
    for key, count in removed.items():
        try:
            layer, count = int(key), int(count)
        except (TypeError, ValueError):
            raise PassConfigError(f"fitprune: {where}: entry {key!r}: {count!r} is not 'layer: count'") from None
        if not 0 <= layer <= geometry.num_layers - 2:
            raise PassConfigError(f"fitprune: {where} names layer {layer}; tokens can be removed after the attention "
                                  f"of layers 0..{geometry.num_layers - 2} of this {geometry.num_layers}-layer model")
        if count < 0:
            raise PassConfigError(f"fitprune: {where} removes {count} tokens at layer {layer}; counts must be >= 0")
        out[layer] = count
    total = sum(out.values())
    if n_visual is not None and total > n_visual:
        raise PassConfigError(f"fitprune: {where} removes {total} visual tokens in all, but only {n_visual} exist")
    return dict(sorted(out.items()))


def load_recipe(path: str, geometry: Geometry) -> FitPruneRecipe:
    return FitPruneRecipe.load(path).validated(geometry, f"recipe {path}")


def _scaled(recipe: FitPruneRecipe, n_visual: int) -> dict[int, int]:
    """A recipe fitted for N visual tokens, applied to n (several images per prompt): counts scale by n/N."""
    base = recipe.n_visual or n_visual
    if base == n_visual:
        return dict(recipe.removed)
    return {k: int(round(v * n_visual / base)) for k, v in recipe.removed.items()}


def plan(config: FitPruneConfig, geometry: Geometry, n_visual: int, recipe: FitPruneRecipe | None = None):
    if recipe is None and config.recipe:
        recipe = load_recipe(config.recipe, geometry)
    if recipe is None:
        raise PassConfigError("fitprune needs a recipe: calibrate it (vtcompile optimize/calibrate with "
                              "--calibration DATA) or give one with fitprune:recipe=FILE.json")
    steps, left = [], n_visual
    for layer, count in _scaled(recipe, n_visual).items():
        if count:
            left = max(0, left - count)
            steps.append((Cut(layer, after_attention=True), left))
    return steps


def apply(program: Program, config: FitPruneConfig, recipe: FitPruneRecipe | None = None) -> Program:
    with program.series_of_rewrites():
        for cut, keep in plan(config, program.geometry, program.n_visual, recipe):
            select_tokens(program, cut, attention_mass(program, cut.layer), keep, by="fitprune")
    return program


# -- calibration ------------------------------------------------------------------------------------
@dataclass
class _SampleStats:
    cross: list[torch.Tensor]  # per layer [n_text_after, N]: head-max attention, text rows -> visual keys
    self_: list[torch.Tensor]  # per layer [N, N]: visual rows -> visual keys


def collect_stats(program: Program, batches, progress: bool = True) -> list[_SampleStats]:
    """Per-sample attention statistics of every prunable layer, read through SDPA taps."""
    from tqdm import tqdm

    layers = range(program.geometry.num_layers - 1)
    taps = sdpa_inputs(program.gm, layers)
    names = {n for q, k, m, _ in taps.values() for n in (q, k, m) if n}
    stats = []
    for args in tqdm(batches, desc="fitprune: calibration", unit="batch", disable=not progress):
        _, seen = run_with_taps(program.gm, args, names)
        visual = args[3]
        text_after = text_after_images(visual)
        per_row = [_SampleStats([], []) for _ in range(visual.shape[0])]
        for layer in layers:
            q, k, m, scale = taps[layer]
            q, k = seen[q], seen[k]
            mask = seen[m] if m else None
            attn = head_max_attention(q, k, mask, scale or q.shape[-1] ** -0.5, q.shape[1] // k.shape[1],
                                      mask is not None and mask.dtype == torch.bool)
            for b, row in enumerate(per_row):
                vis = visual[b].nonzero().squeeze(1)
                after = text_after[b].nonzero().squeeze(1)
                row.cross.append(attn[b][after][:, vis].float().cpu())
                row.self_.append(attn[b][vis][:, vis].float().cpu())
        stats += per_row
    if not stats:
        raise PassConfigError("fitprune: the calibration set is empty; give at least one sample")
    return stats


def _removable(mass: torch.Tensor, alpha: float) -> torch.Tensor:
    """The largest low-mass prefix whose removal keeps >= (1 - alpha) of the total mass."""
    order = torch.argsort(mass, stable=True)
    allowed = torch.cumsum(mass[order], 0) <= alpha * mass.sum() + 1e-12
    out = torch.zeros_like(mass, dtype=torch.bool)
    out[order[allowed]] = True
    return out


def fit(stats: list[_SampleStats], alpha: float, num_layers: int) -> dict[int, int]:
    """Mean visual tokens removed at each layer for tolerated mass loss alpha."""
    totals = [0.0] * (num_layers - 1)
    for s in stats:
        remaining = torch.ones(s.self_[0].shape[0], dtype=torch.bool)
        for layer in range(num_layers - 1):
            idx = remaining.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            cross = s.cross[layer][:, idx].sum(0) / max(1, s.cross[layer].shape[0])
            self_mass = s.self_[layer][idx][:, idx].sum(0) / len(idx)
            removed = _removable(cross, alpha) & _removable(self_mass, alpha)
            totals[layer] += float(removed.sum())
            remaining[idx[removed]] = False
    return {layer: int(round(t / len(stats))) for layer, t in enumerate(totals)}


def search(stats, geometry: Geometry, n_visual: int, budget: float, tolerance: float) -> dict:
    """Binary search on alpha for the least aggressive recipe meeting the FLOPs budget."""

    def ratio(removed: dict[int, int]) -> float:
        steps = plan(FitPruneConfig(), geometry, n_visual, FitPruneRecipe(removed=removed, n_visual=n_visual))
        rep = report_from_plan(geometry, n_visual, 0, steps)
        return rep.paper / rep.baseline_paper

    lo, hi, iterations = 0.0, 1.0, 0
    best = fit(stats, hi, geometry.num_layers)
    if ratio(best) <= budget:
        while hi - lo > tolerance and iterations < 64:  # 64 halvings: alpha to 5e-20, past any useful tolerance
            mid = (lo + hi) / 2
            if not lo < mid < hi:  # a tolerance below float resolution: the interval cannot shrink any more
                break
            removed = fit(stats, mid, geometry.num_layers)
            if ratio(removed) <= budget:
                hi, best = mid, removed
            else:
                lo = mid
            iterations += 1
    achieved = ratio(best)
    return {"alpha": hi, "removed": best, "paper_ratio": achieved, "iterations": iterations,
            "budget_met": achieved <= budget + 0.02}


def calibrate(program: Program, config: FitPruneConfig, batches, progress: bool = True) -> FitPruneRecipe:
    """Fit a recipe for `program` (the program of the passes before it) on calibration batches."""
    if program.rewrites:  # the statistics follow one visual token set through every layer, as the prompt holds it
        earlier = program.rewrites[0]
        raise PassConfigError(f"fitprune calibrates on every visual token of every layer, but pass {earlier.by!r} "
                              f"already removed tokens {earlier.cut}; fitprune does not compose with an earlier "
                              "token-removing pass: use one of them")
    t0 = time.perf_counter()
    stats = collect_stats(program, batches, progress)
    found = search(stats, program.geometry, program.n_visual, config.budget, config.tolerance)
    removed = {k: v for k, v in found.pop("removed").items() if v}
    return FitPruneRecipe(removed=removed, n_visual=program.n_visual, budget=config.budget, **found,
                          samples=len(stats), calibration_seconds=time.perf_counter() - t0,
                          config_hash=program.geometry.config_hash())


PASS = register(PassDef(
    name="fitprune",
    summary="remove visual tokens after each layer's attention by a recipe fitted to a FLOPs budget from "
            "calibration attention statistics (FitPrune)",
    needs=("attention_taps",), config=FitPruneConfig, plan=plan, apply=apply, min_layers=2, calibrate=calibrate,
    recipe=FitPruneRecipe))

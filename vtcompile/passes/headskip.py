"""headskip: attention heads sliced out of the decoder's weights (the head pruning of YOPO, 2410.06169, done as a
graph rewrite instead of YOPO's masks).

Algorithm: remove a set of query heads per layer - given explicitly (`headskip:heads=1.0/2.4`, "layer.head"), or
for a budget (`headskip:budget=0.25`): that fraction of the query heads of layers >= first_layer (default 2: layers
0-1 keep every head, as YOPO's masks do), the least important ones by calibration, every layer keeping >= 1 head.
All heads cost the same (same tokens, same head_dim), so the fraction of heads removed is the fraction of the q/o
projection and attention FLOPs removed in those layers; on GQA a k/v head (and its share of the KV cache) goes
only when all of its query heads go.
Importance (criterion='ablation', the default): each head of layers >= first_layer is sliced out alone and scored
by the KL divergence of the next-token distribution at the calibration prompts' last token from the program's own
(compiler.heads.last_token_kl, mean over the prompts); the heads whose removal moves it least go. It costs one
calibration run per head: seconds on the testbed, (layers - first_layer) x heads runs (960 on llava-1.5-7b) on a 7B
model. criterion='output' is a one-run proxy: a head's mean share of the residual stream it writes to,
||o_proj(head h's attention output)|| / ||residual stream entering the layer||, over the real tokens of the
calibration prompts; criterion='visual' is YOPO's idea of "inactive visual heads" (the mean attention mass a head's
text query rows put on the visual tokens); criterion='random' (seeded, no calibration) is the baseline.
Measured on the testbed (bench/heads.py, results/heads.md; 300 test questions, unpruned 96.0%): at budget 0.25
ablation 95.0%, random 93.0-94.3% (three seeds), output 86.3%, visual 83.0%; at 0.5 ablation 88.7%, random
82.0-85.0%, output 84.7%, visual 81.3%. The one-run criteria lose to random heads there, hence the default.
Rewrite: compiler.heads.slice_heads - smaller q/k/v/o weights (new tensors), head counts rewritten, uneven GQA
groups expanded per remaining query head; the layer's KV cache has the kept k/v heads only.
Not done: YOPO's "pruned heads skipped for the visual query rows only" variant. A head that still runs for the
text rows needs its k/v projections on every token (the text rows read the visual keys/values), so only its q
rows, attention rows and o_proj input of the visual queries could go. In one SDPA that is a ragged per-head shape;
it would take a second SDPA (the pruned heads over the text query rows gathered out, static count S - n_visual)
beside the kept heads' SDPA over all rows. That saves less than slicing the head (k/v stay) and is not
implemented; the mask form of the public YOPO code saves nothing, so it is not offered either.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..compiler.geometry import Geometry
from ..compiler.heads import attention_nodes, last_token_kl, last_token_logprobs, slice_heads, tensor_of
from ..compiler.program import Program
from ..compiler.taps import run_with_taps
from ..errors import PassConfigError
from .base import PassConfig, PassDef, Recipe, param, register

CRITERIA = ("output", "visual", "ablation", "random")


@dataclass(frozen=True)
class HeadSkipConfig(PassConfig):
    name = "headskip"
    heads: tuple[str, ...] = param((), "query heads removed, as layer.head (headskip:heads=1.0/2.4); "
                                       "empty: chosen for the budget")
    budget: float = param(0.25, "fraction of the query heads (attention-head FLOPs) of layers >= first_layer "
                                "removed, chosen on calibration data (not used when heads are given)",
                          low=0.0, high=1.0, high_open=True)
    first_layer: int = param(2, "the budget form keeps every head of the layers before this one", low=0)
    criterion: str = param("ablation", "head importance for the budget form: 'ablation' (how far removing the "
                                       "head alone moves the next-token distribution: one calibration run per "
                                       "head), 'output' (share of the residual stream the head writes, one run), "
                                       "'visual' (attention mass of the text rows on the visual tokens, YOPO-like) "
                                       "or 'random' (seeded, no calibration)")
    samples: int = param(16, "calibration samples used to score the heads", low=1)
    seed: int = param(0, "seed of criterion=random", low=0)

    def __post_init__(self):
        super().__post_init__()
        parsed = explicit_heads(self)
        seen = set()
        for h in parsed:
            if h in seen:
                raise PassConfigError(f"headskip: head {h[0]}.{h[1]} is given twice in heads={'/'.join(self.heads)}")
            seen.add(h)
        if self.criterion not in CRITERIA:
            raise PassConfigError(f"headskip: criterion={self.criterion!r} is not known; expected one of "
                                  f"{', '.join(CRITERIA)}")
        if self.heads and self.budget != 0.25:
            raise PassConfigError("headskip: give heads=LAYER.HEAD/... or budget=FRACTION, not both")

    def check_model(self, geometry: Geometry) -> None:
        layers, heads = geometry.num_layers, geometry.num_heads
        per_layer: dict[int, int] = {}
        for layer, head in explicit_heads(self):
            if not 0 <= layer < layers:
                raise PassConfigError(f"headskip: head {layer}.{head} names layer {layer}; the model has decoder "
                                      f"layers 0..{layers - 1}")
            if not 0 <= head < heads:
                raise PassConfigError(f"headskip: head {layer}.{head} does not exist; layers have query heads "
                                      f"0..{heads - 1}")
            per_layer[layer] = per_layer.get(layer, 0) + 1
        for layer, n in per_layer.items():
            if n == heads:
                raise PassConfigError(f"headskip: heads= removes every head of layer {layer}, which removes its "
                                      f"attention: use attnskip:layers={layer} for that")
        if not self.heads and self.budget > 0:
            if self.first_layer >= layers:
                raise PassConfigError(f"headskip: first_layer={self.first_layer} leaves no layer to prune; the model "
                                      f"has {layers} decoder layers")
            removed_count(self, geometry)

    def needs_calibration(self) -> bool:
        return not self.heads and self.budget > 0 and self.criterion != "random"


def explicit_heads(config: HeadSkipConfig) -> list[tuple[int, int]]:
    out = []
    for item in config.heads:
        layer, dot, head = item.strip().partition(".")
        try:
            if not dot:
                raise ValueError
            out.append((int(layer), int(head)))
        except ValueError:
            raise PassConfigError(f"headskip: head {item!r} is not LAYER.HEAD (e.g. heads=1.0/2.4)") from None
    return out


def removed_count(config: HeadSkipConfig, geometry: Geometry) -> int:
    """Query heads the budget removes over layers >= first_layer (each layer keeps at least one)."""
    layers = geometry.num_layers - config.first_layer
    count = int(round(config.budget * geometry.num_heads * layers))
    if count > (geometry.num_heads - 1) * layers:
        raise PassConfigError(f"headskip: budget={config.budget} removes {count} of {geometry.num_heads * layers} "
                              f"heads, but every layer keeps at least one (at most {geometry.num_heads - 1} of "
                              f"{geometry.num_heads} per layer); remove whole attention blocks with attnskip")
    return count


def choose(scores: dict[tuple[int, int], float], count: int, heads_per_layer: int) -> list[tuple[int, int]]:
    """The `count` lowest-scoring heads, at most heads_per_layer - 1 of any layer."""
    chosen, per_layer = [], {}
    for (layer, head), _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0])):
        if len(chosen) == count:
            break
        if per_layer.get(layer, 0) < heads_per_layer - 1:
            chosen.append((layer, head))
            per_layer[layer] = per_layer.get(layer, 0) + 1
    return sorted(chosen)


def random_scores(config: HeadSkipConfig, geometry: Geometry) -> dict[tuple[int, int], float]:
    gen = torch.Generator().manual_seed(config.seed)
    keys = [(l, h) for l in range(config.first_layer, geometry.num_layers) for h in range(geometry.num_heads)]
    return dict(zip(keys, torch.rand(len(keys), generator=gen).tolist()))


@dataclass
class HeadSkipRecipe(Recipe):
    """The heads chosen on calibration data ("layer.head") and every candidate's score."""

    name = "headskip"
    heads: list = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    criterion: str | None = None
    budget: float | None = None
    first_layer: int | None = None
    samples: int | None = None
    calibration_seconds: float | None = None
    config_hash: str | None = None

    def describe(self) -> str:
        return (f"heads removed {' '.join(self.heads) or 'none'} (criterion {self.criterion}, budget {self.budget}, "
                f"{self.samples} prompts)")

    def reuse(self, files) -> str:
        return f"--pass headskip:heads={'/'.join(self.heads)}" if self.heads else ""


def removed_heads(config: HeadSkipConfig, geometry: Geometry, recipe: HeadSkipRecipe | None) -> list[tuple[int, int]]:
    if config.heads:
        return sorted(explicit_heads(config))
    if config.budget == 0:
        return []
    if config.criterion == "random":
        return choose(random_scores(config, geometry), removed_count(config, geometry), geometry.num_heads)
    if recipe is None:
        raise PassConfigError("headskip with a budget chooses heads on calibration data: give --calibration DATA "
                              "(calibration= in Python), criterion=random, or the heads with heads=LAYER.HEAD/...")
    return sorted(tuple(int(x) for x in h.split(".")) for h in recipe.heads)


def plan(config: HeadSkipConfig, geometry: Geometry, n_visual: int, recipe=None):
    return []  # no token is removed; the head counts reach the FLOPs report through the Program (or head_counts)


def head_counts(config: HeadSkipConfig, geometry: Geometry, recipe: HeadSkipRecipe | None = None) -> tuple[list[int], list[int]]:
    """Per layer the query and k/v heads this config leaves, without weights (FLOPs/KV tables of a geometry:
    compiler.flops.FlopsReport(..., q_heads=, kv_heads=))."""
    config.check_model(geometry)
    removed = set(removed_heads(config, geometry, recipe))
    group = geometry.num_heads // geometry.num_kv_heads
    q, kv = [], []
    for layer in range(geometry.num_layers):
        keep = [h for h in range(geometry.num_heads) if (layer, h) not in removed]
        q.append(len(keep))
        kv.append(len({h // group for h in keep}))
    return q, kv


def apply(program: Program, config: HeadSkipConfig, recipe: HeadSkipRecipe | None = None) -> Program:
    g = program.geometry
    by_layer: dict[int, set[int]] = {}
    for layer, head in removed_heads(config, g, recipe):
        by_layer.setdefault(layer, set()).add(head)
    keep = {layer: [h for h in program.kept_heads.get(layer, range(g.num_heads)) if h not in gone]
            for layer, gone in by_layer.items()}
    return slice_heads(program, keep, by="headskip")


# -- calibration ------------------------------------------------------------------------------------
@torch.no_grad()
def output_scores(program: Program, batches, first_layer: int, progress: bool = True) -> dict[tuple[int, int], float]:
    """criterion='output': per (layer, original head) the mean over real tokens of ||o_proj restricted to the head,
    applied to its attention output|| / ||residual stream entering the layer||."""
    from tqdm import tqdm

    gm, g = program.gm, program.geometry
    layers = [l for l in range(first_layer, g.num_layers) if program.q_heads[l] > 0]
    taps = {}
    for layer in layers:
        nodes = attention_nodes(gm, layer)
        residual = next(a for a in nodes.residual_add.args if a is not nodes.o)
        taps[layer] = (nodes.o.args[0].name, residual.name, tensor_of(gm, nodes.o.args[1]))
    names = {n for x, r, _ in taps.values() for n in (x, r)}
    sums = {layer: torch.zeros(program.q_heads[layer], dtype=torch.float64) for layer in layers}
    count = {layer: 0 for layer in layers}
    hd = g.head_dim
    for args in tqdm(batches, desc="headskip: calibration", unit="batch", disable=not progress):
        _, seen = run_with_taps(gm, args, names)
        for layer, (x_name, r_name, w_o) in taps.items():
            x, res = seen[x_name].float(), seen[r_name].float()
            real = args[1].bool()
            if real.shape[1] != x.shape[1]:  # tokens removed by an earlier pass: score every position
                real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            stream = res.norm(dim=-1).clamp_min(1e-6)[real]
            for i in range(program.q_heads[layer]):
                part = x[..., i * hd:(i + 1) * hd] @ w_o[:, i * hd:(i + 1) * hd].float().T
                sums[layer][i] += (part.norm(dim=-1)[real] / stream).sum().double().cpu()
            count[layer] += int(real.sum())
    out = {}
    for layer in layers:
        kept = program.kept_heads.get(layer, tuple(range(g.num_heads)))
        for i, head in enumerate(kept):
            out[(layer, head)] = float(sums[layer][i] / max(1, count[layer]))
    return out


@torch.no_grad()
def visual_scores(program: Program, batches, first_layer: int, progress: bool = True) -> dict[tuple[int, int], float]:
    """criterion='visual': per (layer, original head) the mean over the real text query rows of the attention mass on
    the visual keys, from the q/k/mask each layer feeds to SDPA (probabilities computed explicitly here)."""
    from tqdm import tqdm

    from ..compiler.taps import sdpa_inputs

    g = program.geometry
    layers = [l for l in range(first_layer, g.num_layers) if program.q_heads[l] > 0]
    taps = sdpa_inputs(program.gm, layers)
    names = {n for q, k, m, _ in taps.values() for n in (q, k, m) if n}
    sums = {layer: torch.zeros(program.q_heads[layer], dtype=torch.float64) for layer in layers}
    count = dict.fromkeys(layers, 0)
    for args in tqdm(batches, desc="headskip: calibration", unit="batch", disable=not progress):
        _, seen = run_with_taps(program.gm, args, names)
        for layer, (qn, kn, mn, scale) in taps.items():
            q, k = seen[qn].float(), seen[kn].float()
            if q.shape[2] != args[3].shape[1]:
                raise PassConfigError("headskip: criterion=visual needs every token in the scored layers; list it "
                                      "before the token-removing passes")
            logits = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
            mask = seen[mn] if mn else None
            if mask is not None:
                logits = (torch.where(mask, logits, torch.finfo(torch.float32).min) if mask.dtype == torch.bool
                          else logits + mask.float())
            mass = (torch.softmax(logits, -1) * args[3][:, None, None, :].float()).sum(-1)  # [B, H, S]
            rows = args[1].bool() & ~args[3]  # real text query rows
            sums[layer] += mass.permute(0, 2, 1)[rows].sum(0).double().cpu()
            count[layer] += int(rows.sum())
    out = {}
    for layer in layers:
        for i, head in enumerate(program.kept_heads.get(layer, tuple(range(g.num_heads)))):
            out[(layer, head)] = float(sums[layer][i] / max(1, count[layer]))
    return out


def ablation_scores(program: Program, batches, first_layer: int, progress: bool = True) -> dict[tuple[int, int], float]:
    """criterion='ablation': per (layer, original head) the KL divergence of the last token's next-token
    distribution when that head alone is sliced out, from the program's own, mean over the calibration prompts."""
    from tqdm import tqdm

    g = program.geometry
    reference = last_token_logprobs(program, batches)
    heads = [(l, h) for l in range(first_layer, g.num_layers) if program.q_heads[l] > 1
             for h in program.kept_heads.get(l, range(g.num_heads))]
    scores = {}
    for layer, head in tqdm(heads, desc="headskip: ablation", unit="head", disable=not progress):
        kept = [h for h in program.kept_heads.get(layer, range(g.num_heads)) if h != head]
        scores[(layer, head)] = last_token_kl(reference, slice_heads(program.clone(), {layer: kept}, by="headskip"),
                                              batches)
    return scores


def calibrate(program: Program, config: HeadSkipConfig, batches, progress: bool = True) -> HeadSkipRecipe:
    """Score every head of layers >= first_layer on calibration batches and choose the budget's heads."""
    config.check_model(program.geometry)
    t0 = time.perf_counter()
    if not batches:
        raise PassConfigError("headskip: the calibration set is empty; give at least one sample")
    score = {"visual": visual_scores, "output": output_scores}.get(config.criterion, ablation_scores)
    scores = score(program, batches, config.first_layer, progress)
    chosen = choose(scores, removed_count(config, program.geometry), program.geometry.num_heads)
    return HeadSkipRecipe(heads=[f"{l}.{h}" for l, h in chosen],
                          scores={f"{l}.{h}": s for (l, h), s in sorted(scores.items())}, criterion=config.criterion,
                          budget=config.budget, first_layer=config.first_layer, samples=len(batches),
                          calibration_seconds=time.perf_counter() - t0, config_hash=program.geometry.config_hash())


PASS = register(PassDef(
    name="headskip",
    summary="slice attention heads out of the q/k/v/o weights: given heads, or a budget of the least important "
            "heads of layers >= first_layer by how far removing each alone moves the next-token prediction "
            "(YOPO-style head pruning)",
    needs=("attention_taps",),
    config=HeadSkipConfig, plan=plan, apply=apply, calibrate=calibrate, recipe=HeadSkipRecipe, heads=head_counts,
    rewrites_layers=True))

"""attnskip: whole attention sub-blocks removed from chosen decoder layers (EAS, 2403.15226, training-free).

Algorithm: the attention sub-block of each chosen layer is deleted from the graph - no q/k/v/o projections, no
SDPA, no KV cache for that layer (its cache outputs leave the prefill signature, so generation has no cache
there); the layer's MLP still runs on the residual stream. Layers are given (`attnskip:layers=3/5`) or chosen on
calibration data (`attnskip:count=N`) among layers >= first_layer by a cheap proxy: how much each attention block
changes the residual stream, mean over real tokens of ||attention output|| / ||residual stream entering the
layer||; the N smallest go.
Optional `adapter=true`: a linear map (weight and bias) from the layer's normed input (what its attention read) to
its attention output, fitted in closed form by ridge least squares on calibration activations, stands in for each
removed attention - a training-free analogue of EAS's fine-tuned propagation-of-information adapter; it costs one
d x d matmul per token (counted in the FLOPs report).
`criterion=search`: EAS's skip-set search instead of the proxy. Skip sets of `count` layers (every set when there
are at most `trials` of them, else `trials` sets drawn with `seed`) are each removed from a copy of the program and
scored on the calibration prompts by a loss; the set of highest reward exp(-loss) (lowest loss) goes. Training-free,
the loss is the unpruned model's own next-token distribution at each prompt's last token against the skipped
model's (KL divergence, mean over prompts), not EAS's task loss on labelled answers; and the sets are drawn
uniformly, not re-weighted by their rewards as the search proceeds. bench/heads.py measures the proxy against it.
The adapter is not folded into the MLP weights (EAS's re-parameterisation): it stays one extra linear.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field

import torch

from ..compiler.geometry import Geometry
from ..compiler.heads import attention_nodes, last_token_kl, last_token_logprobs, remove_attention
from ..compiler.program import Program
from ..compiler.taps import run_with_taps
from ..errors import PassConfigError
from .base import PassConfig, PassDef, Recipe, param, register, tensors_field


CRITERIA = ("proxy", "search")


@dataclass(frozen=True)
class AttnSkipConfig(PassConfig):
    name = "attnskip"
    layers: tuple[int, ...] = param((), "layers whose attention is removed (attnskip:layers=3/5); empty: count")
    count: int = param(0, "number of layers chosen on calibration data by the residual-change proxy", low=0)
    first_layer: int = param(2, "count=N chooses among layers >= first_layer", low=0)
    criterion: str = param("proxy", "how count=N chooses: 'proxy' (the attention blocks that change the residual "
                                    "stream least) or 'search' (EAS: skip sets scored by the KL divergence of the "
                                    "last token's distribution from the unpruned model's, the lowest chosen)")
    trials: int = param(64, "criterion=search: skip sets scored (every set when there are at most this many)",
                        low=1)
    seed: int = param(0, "criterion=search: seed of the sets drawn when there are more than trials", low=0)
    adapter: bool = param(False, "fit a linear map (least squares on calibration activations) that stands in for "
                                 "each removed attention")
    samples: int = param(16, "calibration samples (proxy and adapter)", low=1)
    ridge: float = param(1e-3, "adapter ridge, relative to the mean diagonal of X^T X", low=0.0)

    def __post_init__(self):
        super().__post_init__()
        if len(set(self.layers)) != len(self.layers):
            raise PassConfigError(f"attnskip: a layer is given twice in layers={'/'.join(map(str, self.layers))}")
        if self.layers and self.count:
            raise PassConfigError("attnskip: give layers=L1/L2/... or count=N, not both")
        if self.criterion not in CRITERIA:
            raise PassConfigError(f"attnskip: criterion={self.criterion!r} is not known; expected one of "
                                  f"{', '.join(CRITERIA)}")

    def check_model(self, geometry: Geometry) -> None:
        n = geometry.num_layers
        for layer in self.layers:
            if not 0 <= layer < n:
                raise PassConfigError(f"attnskip: layer {layer} does not exist; the model has decoder layers "
                                      f"0..{n - 1}")
        if not self.layers and self.count > n - self.first_layer:
            raise PassConfigError(f"attnskip: count={self.count} but only {max(0, n - self.first_layer)} layers "
                                  f"(>= first_layer={self.first_layer} of {n}) can be chosen")

    def needs_calibration(self) -> bool:
        return self.adapter or (not self.layers and self.count > 0)


@dataclass
class AttnSkipRecipe(Recipe):
    """The layers whose attention is removed, what chose them (the proxy's residual change per layer, or the
    search's loss per skip-set) and the fitted linear stand-ins ({layer}.weight / {layer}.bias)."""

    name = "attnskip"
    layers: list = field(default_factory=list)
    proxy: dict | None = None
    search: dict | None = None
    adapters: dict = tensors_field("per removed layer: the linear stand-in's weight and bias")
    samples: int | None = None
    calibration_seconds: float | None = None
    config_hash: str | None = None

    def __post_init__(self):
        self.layers = [int(x) for x in self.layers]

    def describe(self) -> str:
        return (f"attention removed in layers {self.layers}" + (" (+ linear adapters)" if self.adapters else "")
                + f"; {self.samples} prompts")

    def reuse(self, files) -> str:
        return "" if self.adapters else f"--pass attnskip:layers={'/'.join(map(str, self.layers))}"


def plan(config: AttnSkipConfig, geometry: Geometry, n_visual: int, recipe=None):
    return []  # no token is removed; the removed attentions reach the FLOPs report through the Program (or head_counts)


def head_counts(config: AttnSkipConfig, geometry: Geometry, recipe: AttnSkipRecipe | None = None) -> tuple[list[int], list[int]]:
    """Per layer the query and k/v heads left (0 where the attention is removed), without weights (FLOPs/KV tables
    of a geometry: compiler.flops.FlopsReport(..., q_heads=, kv_heads=, adapted=))."""
    config.check_model(geometry)
    gone = set(skipped_layers(config, recipe))
    q = [0 if layer in gone else geometry.num_heads for layer in range(geometry.num_layers)]
    kv = [0 if layer in gone else geometry.num_kv_heads for layer in range(geometry.num_layers)]
    return q, kv


def skipped_layers(config: AttnSkipConfig, recipe: AttnSkipRecipe | None) -> list[int]:
    if config.layers:
        return sorted(config.layers)
    if config.count == 0:
        raise PassConfigError("attnskip: give the layers (attnskip:layers=3/5) or how many to choose on calibration "
                              "data (attnskip:count=N)")
    if recipe is None:
        raise PassConfigError("attnskip:count=N chooses layers on calibration data: give --calibration DATA "
                              "(calibration= in Python) or the layers with layers=L1/L2")
    return sorted(recipe.layers)


def apply(program: Program, config: AttnSkipConfig, recipe: AttnSkipRecipe | None = None) -> Program:
    chosen = skipped_layers(config, recipe)  # first: a config that names no layer says so (not "give calibration")
    if config.adapter and (recipe is None or not recipe.adapters):
        raise PassConfigError("attnskip:adapter=true fits its adapters on calibration data: give --calibration DATA "
                              "(calibration= in Python)")
    t = recipe.adapters if config.adapter else None
    layers = {layer: (t[f"{layer}.weight"], t[f"{layer}.bias"]) if t else None for layer in chosen}
    return remove_attention(program, layers, by="attnskip")


# -- calibration ------------------------------------------------------------------------------------
def _real(args, x: torch.Tensor) -> torch.Tensor:
    real = args[1].bool()
    if real.shape[1] != x.shape[1]:  # tokens removed by an earlier pass: every position counts
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return real


@torch.no_grad()
def residual_change(program: Program, batches, layers: list[int], progress: bool = True) -> dict[int, float]:
    """The proxy: per layer, mean over real tokens of ||attention output|| / ||residual stream entering it||."""
    from tqdm import tqdm

    taps = {}
    for layer in layers:
        nodes = attention_nodes(program.gm, layer)
        taps[layer] = (nodes.o.name, next(a for a in nodes.residual_add.args if a is not nodes.o).name)
    names = {n for pair in taps.values() for n in pair}
    sums, counts = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0)
    for args in tqdm(batches, desc="attnskip: proxy", unit="batch", disable=not progress):
        _, seen = run_with_taps(program.gm, args, names)
        for layer, (o, r) in taps.items():
            out, res = seen[o].float(), seen[r].float()
            real = _real(args, out)
            sums[layer] += float((out.norm(dim=-1) / res.norm(dim=-1).clamp_min(1e-6))[real].sum())
            counts[layer] += int(real.sum())
    return {layer: sums[layer] / max(1, counts[layer]) for layer in layers}


@torch.no_grad()
def fit_adapters(program: Program, batches, layers: list[int], ridge: float,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer: W, b minimising sum ||[x, 1] [W^T; b] - attn_out||^2 + ridge' ||W||^2 over real tokens, x the normed
    layer input, in closed form (normal equations in float64)."""
    from tqdm import tqdm

    taps = {}
    for layer in layers:
        nodes = attention_nodes(program.gm, layer)
        taps[layer] = (nodes.q.args[0].name, nodes.o.name)
    names = {n for pair in taps.values() for n in pair}
    d = program.geometry.hidden_size
    xtx = {layer: torch.zeros(d + 1, d + 1, dtype=torch.float64) for layer in layers}
    xty = {layer: torch.zeros(d + 1, d, dtype=torch.float64) for layer in layers}
    for args in tqdm(batches, desc="attnskip: adapters", unit="batch", disable=not progress):
        _, seen = run_with_taps(program.gm, args, names)
        for layer, (xn, yn) in taps.items():
            x, y = seen[xn], seen[yn]
            real = _real(args, x)
            x = x[real].double().cpu()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            xtx[layer] += x.T @ x
            xty[layer] += x.T @ y[real].double().cpu()
    out = {}
    for layer in layers:
        a = xtx[layer]
        reg = torch.eye(d + 1, dtype=a.dtype) * ridge * float(a.diagonal()[:d].mean())
        reg[d, d] = 0.0  # the bias is not shrunk
        sol = torch.linalg.solve(a + reg, xty[layer])  # [d + 1, d]
        out[f"{layer}.weight"] = sol[:d].T.float().contiguous()
        out[f"{layer}.bias"] = sol[d].float().contiguous()
    return out


def skip_sets(candidates: list[int], count: int, trials: int, seed: int) -> list[tuple[int, ...]]:
    """Every skip set of `count` candidates when there are at most `trials`, else `trials` distinct sets drawn
    uniformly with `seed`."""
    total = math.comb(len(candidates), count)
    if total <= trials:
        return list(itertools.combinations(sorted(candidates), count))
    rng, sets = random.Random(seed), set()
    while len(sets) < trials:
        sets.add(tuple(sorted(rng.sample(candidates, count))))
    return sorted(sets)


@torch.no_grad()
def search_losses(program: Program, batches, candidates: list[int], config: AttnSkipConfig,
                  progress: bool = True) -> dict[tuple[int, ...], float]:
    """Per skip set: mean over the calibration prompts of KL(unpruned || skipped) of the next-token distribution at
    the prompt's last token (the position every row's prompt ends at, with left padding), the program before the
    skip as the reference."""
    from tqdm import tqdm

    reference = last_token_logprobs(program, batches)
    losses = {}
    for s in tqdm(skip_sets(candidates, config.count, config.trials, config.seed), desc="attnskip: search",
                  unit="set", disable=not progress):
        losses[s] = last_token_kl(reference, remove_attention(program.clone(), dict.fromkeys(s), by="attnskip"),
                                  batches)
    return losses


def calibrate(program: Program, config: AttnSkipConfig, batches, progress: bool = True) -> AttnSkipRecipe:
    """Choose the layers by the proxy (count form) and fit the adapters (adapter=true)."""
    config.check_model(program.geometry)
    t0 = time.perf_counter()
    if not batches:
        raise PassConfigError("attnskip: the calibration set is empty; give at least one sample")
    recipe = AttnSkipRecipe(samples=len(batches), config_hash=program.geometry.config_hash())
    if config.layers:
        layers = sorted(config.layers)
    else:
        candidates = [l for l in range(config.first_layer, program.geometry.num_layers) if program.q_heads[l] > 0]
        if config.criterion == "search":
            losses = search_losses(program, batches, candidates, config, progress)
            layers = list(min(losses, key=lambda s: (losses[s], s)))
            recipe.search = {"/".join(map(str, s)): v for s, v in sorted(losses.items())}
        else:
            proxy = residual_change(program, batches, candidates, progress)
            layers = sorted(sorted(candidates, key=lambda l: (proxy[l], l))[:config.count])
            recipe.proxy = {str(l): v for l, v in proxy.items()}
    recipe.layers = layers
    if config.adapter:
        recipe.adapters = fit_adapters(program, batches, layers, config.ridge, progress)
    recipe.calibration_seconds = time.perf_counter() - t0
    return recipe


PASS = register(PassDef(
    name="attnskip",
    summary="remove the attention sub-block of chosen layers (given, or the ones that change the residual stream "
            "least on calibration data), optionally with a least-squares linear stand-in (EAS, training-free)",
    needs=("attention_taps",),
    config=AttnSkipConfig, plan=plan, apply=apply, calibrate=calibrate, recipe=AttnSkipRecipe, heads=head_counts,
    rewrites_layers=True))

"""DART: keep the visual tokens least duplicated with a few pivot tokens (Wen et al., EMNLP 2025, 2502.11494;
ZichenWen1/DART).

Algorithm (before layer K, default 2): pivots are the `pivots` visual tokens and the `pivots` text tokens after
the image whose keys in layer K-1 have the largest L1 norm. For each pivot in turn, the candidates (visual
tokens, image pivots and tokens already taken excluded) with the lowest cosine similarity to the pivot are
taken, a fixed number per pivot, each pivot from what the previous ones left. Similarities are computed on the
hidden states entering layer K passed through the decoder's final norm. Kept: the image pivots and the taken
tokens (text pivots are text and stay anyway), in original order with original position ids; layers >= K see
only those. The selection needs no attention map, so attention stays SDPA.

What the authors' LLaVA-1.5 code does (read through the fork xqy1111111/DART, which carries the authors'
files; the upstream repository's code files are not in our index):
- llava/model/language_model/modeling_llama_self.py: each decoder layer also returns its normed input, query,
  key and value (q, k after RoPE; k, v repeated to the query heads); the model's forward, at the layer whose
  index is K and only in prefill (seq_length > 1, batch 1), takes the PREVIOUS layer's output: its hidden state
  through the model's final norm (`self.norm`) and its key states (`layer_outputs[-2]`, named `any_states`: the
  other returned states are the alternatives, kept here as `criterion`). get_retained_image_token: L1 norm of
  the keys over all heads ([S, heads x head_dim]); top pivot_image_token among the image span, top
  pivot_text_token among every token after the image; TOKEN_TOPK = max_num_trunction (or 576 x (1 -
  reduction_ratio) when that is None) // (pivot_image_token + pivot_text_token); for each pivot, the TOKEN_TOPK
  candidates with the largest negative cosine similarity (torch.nn.functional.cosine_similarity) are added to the
  kept set and removed from the candidates; text pivots are dropped from the set at the end (text is kept
  whole). The kept indices are sorted and become the position ids (original positions).
- llava/eval/model_vqa_loader.py and scripts/v1_5/eval/*.sh: K (pruned_layer) 2, pivot_image_token 4,
  pivot_text_token 4, reduction_ratio 0.778, max_num_trunction 128 (128 of 576 visual tokens: the paper's
  default LLaVA-1.5 budget, keep = 0.222 here), image_token_start_index 35 and length 576 hard-coded.

Deviations, and why:
- Budget: keep is the ratio of the prompt's visual tokens kept, pivots included, so the count is exactly
  round(keep x N) (128 of 576 at the default). The authors keep pivot_image_token + 8 x (128 // 8) = 132 (the
  image pivots come on top of max_num_trunction). Per-pivot quotas are (kept - image pivots) // (2 x pivots),
  the first pivots taking one more each until the count is met.
- Pivot order: the authors walk a Python set of pivot positions (order by hash slot); here image pivots first,
  then text pivots, each by descending norm. The order decides which pivot takes a token both would take.
- Spans from the visual mask, not hard-coded: any image position, left padding, batches (every row its own
  pivots and picks), several images (their tokens are pooled as one image span; text pivots come from the text
  after the last image). A row with fewer than `pivots` text tokens after its images uses its first image
  pivot in place of each missing text pivot (the authors' code would fail there).
- Cosine similarity in float32 on unit vectors (the authors' code in the model's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.cut import Cut
from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.rewrite import Emitter, Scorer, select_tokens
from ..compiler.scorers import attention_states, final_norm, inline, text_after_images
from ..errors import PassConfigError
from .base import PassConfig, PassDef, param, register

aten = torch.ops.aten

# The states of layer K-1 whose L1 norm ranks the pivots: what the authors' decoder layer returns
# (normed input, query, key, value); their forward reads the keys.
CRITERIA = ("key", "query", "value", "input")


@dataclass(frozen=True)
class DARTConfig(PassConfig):
    name = "dart"
    k: int = param(2, "layer before which tokens are dropped (pivots from layer k-1's states)", low=1)
    keep: float = param(0.222, "fraction of each prompt's visual tokens kept, pivots included (0.222: 128 of 576, "
                               "the authors' LLaVA-1.5 default)", low=0.0, high=1.0, low_open=True)
    pivots: int = param(4, "pivot tokens taken from the visual tokens, and as many from the text after the image "
                           "(4 + 4: the authors' scripts)", low=1)
    criterion: str = param("key", "states of layer k-1 whose L1 norm picks the pivots: 'key' (the authors'), "
                                  "'query', 'value' or 'input' (the layer's normed input)")

    def __post_init__(self):
        super().__post_init__()
        if self.criterion not in CRITERIA:
            raise PassConfigError(f"dart: criterion={self.criterion!r} is not known; expected one of "
                                  f"{', '.join(CRITERIA)}")

    def check_model(self, geometry: Geometry) -> None:
        if self.k > geometry.num_layers - 1:
            raise PassConfigError(
                f"dart: k={self.k} is beyond the last layer; the model has {geometry.num_layers} decoder layers, "
                f"so k must be in [1, {geometry.num_layers - 1}]")


def kept_visual(n_visual: int, keep: float) -> int:
    return min(n_visual, max(1, int(round(keep * n_visual)))) if n_visual else 0


def quotas(kept: int, pivots: int) -> tuple[int, tuple[int, ...]]:
    """(image pivots, tokens each pivot takes: image pivots first, then text pivots) for `kept` visual tokens."""
    image = min(pivots, kept)
    base, extra = divmod(kept - image, image + pivots)
    return image, tuple(base + (j < extra) for j in range(image + pivots))


def dart_select(states: torch.Tensor, norms: torch.Tensor, visual: torch.Tensor, image_pivots: int,
                text_pivots: int, takes: tuple[int, ...], width: int) -> torch.Tensor:
    """DART's choice, batched. states [B, S, D] (hidden states through the final norm), norms [B, S] (the pivot
    criterion), visual [B, S] bool -> [B, S]: 1 at the kept visual tokens, 0 elsewhere. Plain torch with static
    counts: inlined into the graph (compiler.scorers.inline) and callable offline."""
    none = float("-inf")
    image_pivot = torch.topk(torch.where(visual, norms, none), image_pivots, dim=1)[1]  # [B, Pi]
    text = torch.topk(torch.where(text_after_images(visual), norms, none), text_pivots, dim=1)
    text_pivot = torch.where(text[0] > none, text[1], image_pivot[:, :1])  # missing text: the first image pivot
    pivot = torch.cat([image_pivot, text_pivot], 1)  # [B, P]
    x = states.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    at_pivot = torch.gather(unit, 1, pivot.unsqueeze(-1).expand(-1, -1, width))  # [B, P, D]
    sim = torch.matmul(at_pivot, unit.transpose(1, 2))  # [B, P, S] cosine similarity
    kept = torch.zeros_like(norms, dtype=torch.float32).scatter(1, image_pivot, 1.0)
    free = torch.where(visual, 1.0 - kept, 0.0)  # candidates: visual tokens not taken
    for j, take in enumerate(takes):
        if take == 0:
            continue
        score = torch.where(free > 0.0, -sim[:, j], none)
        picked = torch.topk(score, take, dim=1)[1]
        kept = kept.scatter(1, picked, 1.0)
        free = free.scatter(1, picked, 0.0)
    return kept


def dart_scorer(program: Program, config: DARTConfig, kept: int) -> Scorer:
    """Scores for select_tokens before layer k: 1 on the tokens DART keeps (exactly `kept` visual tokens), 0 on
    the other visual tokens."""
    image_pivots, takes = quotas(kept, config.pivots)

    def emit(e: Emitter):
        layer = config.k - 1
        source = attention_states(program, layer)[config.criterion]
        magnitude = e(aten.abs.default, e(aten._to_copy.default, source, dtype=torch.float32))
        norms = e(aten.sum.dim_IntList, magnitude, [-1] if config.criterion == "input" else [1, 3])  # [B, S]
        residual = next(n for n in program.gm.graph.nodes if n.name == program.residual_name(layer))
        states = final_norm(e, program, residual)
        return inline(e, dart_select, [states, norms, program.visual_mask_node], image_pivots=image_pivots,
                      text_pivots=config.pivots, takes=takes, width=program.geometry.hidden_size)

    return emit


def plan(config: DARTConfig, geometry: Geometry, n_visual: int, recipe=None) -> list[tuple[int, int]]:
    return [(config.k, kept_visual(n_visual, config.keep))]


def apply(program: Program, config: DARTConfig, recipe=None) -> Program:
    config.check_model(program.geometry)
    if Cut(config.k - 1, after_attention=True) in [r.cut for r in program.rewrites]:
        # layer k-1's keys would cover tokens its residual output no longer has
        raise PassConfigError(f"dart: pivots come from layer {config.k - 1}'s keys, but an earlier pass removed "
                              f"tokens after that layer's attention; use a later k")
    for layer, keep in plan(config, program.geometry, program.visual_at(config.k)):
        if keep:
            select_tokens(program, layer, dart_scorer(program, config, keep), keep, by="dart")
    return program


PASS = register(PassDef(
    name="dart",
    summary="at layer k keep the visual tokens least duplicated (cosine) with a few pivot tokens picked by the "
            "L1 norm of layer k-1's keys (DART)",
    needs=("attention_taps",), config=DARTConfig, plan=plan, apply=apply, min_layers=2))

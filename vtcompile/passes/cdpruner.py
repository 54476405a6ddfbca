"""CDPruner: the visual tokens of maximal conditional diversity, chosen before the LLM (Zhang et al., NeurIPS 2025,
2506.10967; Theia-4869/CDPruner).

Algorithm (per image, on its projected visual tokens X [P, D], given the prompt's instruction):
1. similarity S = cosine similarity of the visual tokens [P, P];
2. relevance r_i of each visual token to the instruction, min-max normalised over the image's tokens;
3. the conditional kernel L = diag(r) S diag(r) (relevance as each token's quality, similarity as diversity);
4. greedy MAP inference of the DPP with kernel L: `keep` times, add the token that most increases
   log det(L[chosen]) (Chen et al.'s fast greedy form: one new Cholesky row per pick, O(i P) at step i).
The loop has a static trip count (the kept count), so it traces into the graph, compiles and exports. Like DivPrune
it is a selector (compiler.scorers.visual_selection, text=True: the prompt's text embeddings and text mask reach it
inside the graph) at the cut before layer 0; each image keeps its own share, every image of a prompt is conditioned
on the same instruction.

What the authors' code does (Theia-4869/CDPruner, LLaVA-1.5 with its CLIP ViT-L/336 tower: llava_arch.py
encode_images, clip_encoder.py, llava/eval/model_vqa_loader.py): S on the projected image features (the mm_projector
output, float32); r from CLIP's text tower: the question (without the answer-format suffix) embedded by
CLIPTextModelWithProjection in 77-token segments, the image tokens through the tower's post-layernorm and visual
projection, r = mean over segments of the NEGATED cosine similarity, then (r - min + 1e-6) / (max - min); kernel
r_i S_ij r_j with a θ re-weighting left commented out ("theta = 0.5; alpha = theta / (2 (1 - theta)); relevance =
exp(alpha relevance)"); the fast greedy MAP loop (after Fast-MAP-DPP: cis, di2s, argmax, di2s[j] = -inf); the visual
token number is each eval script's argument (the README's examples: 128 and 64 of 576).

What is followed here, for models without a CLIP text tower (every LLaVA this package loads keeps no text tower;
the issue asks for the LLM-embedding form): OpenVINO GenAI's port (src/cpp/src/visual_language/cdpruner and the
Qwen2-VL inputs embedder: extract_instruction_tokens / extract_text_features_for_pruning, relevance_calculator,
kernel_builder). The instruction is every text token of the prompt outside the image spans (template included),
embedded by the LLM's own token embeddings and averaged into one vector; r_i = -cos(x_i, that mean), negated as
the authors' code negates CLIP's cosine (the port offers the same, `use_negative_relevance`: "needed for CLIP-based
models (like LLaVA)", off by default; `negative=false` gives the plain cosine), min-max normalised per image; S on the same
projected visual tokens. Here the text tokens are the row's non-image, non-padding positions of the decoder's input
embeddings (left padding excluded). The trade-off field `theta` follows the authors' commented line and OpenVINO's
Python port (openvino_contrib genai_opt/visual_token_pruning.py, whose default is 0.5): θ < 1 replaces r with
exp(θ / (2(1-θ)) r) (θ = 0: relevance ignored, a plain DPP over similarity); θ = 1, the default, is the kernel of
the authors' released code, diag(r) S diag(r) (the paper's own text was not at hand here: only its abstract; the
defaults follow the released code).

Deviations, and why:
- The default budget: keep = 0.111 (64 of 576, the budget issue 38 names; the authors' scripts take the count as
  an argument); the kept count is round(keep x P) per image, at least 1.
- Numerical guards (the kernel has rank <= min(P, D)): the residual gains are clamped at 0 and the pivot's gain at
  1e-12 before the square root (the authors' code divides by sqrt of whatever remains and can produce NaN once the
  kernel is exhausted); a row with no text token (only images) has r = 1 everywhere: a plain DPP over similarity.
  After exhaustion ties go to the lowest index (argmax's first maximum).
- Relevance normalisation: (r - min + 1e-6) / (max - min + 1e-6), the authors' numerator with a guarded
  denominator (all-equal r gives r = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.geometry import Geometry
from ..compiler.program import Program
from ..compiler.scorers import before_llm_plan, select_before_llm
from .base import PassConfig, PassDef, param, register


@dataclass(frozen=True)
class CDPrunerConfig(PassConfig):
    name = "cdpruner"
    keep: float = param(0.111, "fraction of each image's visual tokens kept (0.111: 64 of 576 on LLaVA-1.5, the "
                               "budget methods are compared at)", low=0.0, high=1.0, low_open=True)
    theta: float = param(1.0, "relevance/diversity trade-off: 1 = the kernel diag(r) S diag(r) of the authors' "
                              "code; below 1, r -> exp(theta / (2 (1 - theta)) r) (OpenVINO's Python port: 0.5); "
                              "0 = diversity only", low=0.0, high=1.0)
    negative: bool = param(True, "negate the relevance before normalising it, as the authors' code does (CLIP's "
                                 "features) and OpenVINO GenAI's port offers for CLIP-based models such as LLaVA "
                                 "(use_negative_relevance); false: the port's default, plain cosine")


def relevance(feats: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, negative: bool = True) -> torch.Tensor:
    """[R, P, D] visual tokens, [R, S, D] input embeddings, [R, S] text mask -> [R, P] relevance in (0, 1]: cosine
    similarity of each visual token to the mean text-token embedding (negated: `negative`), min-max normalised over
    the row's tokens."""
    weight = text_mask.float().unsqueeze(-1)
    mean = (text.float() * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # [R, D]
    query = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    x = feats.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    rel = torch.matmul(unit, query.unsqueeze(-1)).squeeze(-1)  # [R, P]
    if negative:
        rel = -rel
    low, high = rel.amin(-1, keepdim=True), rel.amax(-1, keepdim=True)
    return (rel - low + 1e-6) / (high - low + 1e-6)


def conditional_kernel(feats: torch.Tensor, rel: torch.Tensor, theta: float) -> torch.Tensor:
    """[R, P, D], [R, P] -> [R, P, P]: q_i cos(x_i, x_j) q_j, q = r (theta = 1) or exp(theta r / (2 (1 - theta)))."""
    x = feats.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = torch.matmul(unit, unit.transpose(-1, -2))
    quality = rel if theta >= 1.0 else torch.exp(theta / (2.0 * (1.0 - theta)) * rel)
    return quality.unsqueeze(-1) * sim * quality.unsqueeze(-2)


def greedy_map(kernel: torch.Tensor, keep: int, tokens: int) -> torch.Tensor:
    """[R, P, P] PSD kernel -> [R, keep] indices in pick order: each step adds the token with the largest gain
    det(L[S + j]) / det(L[S]) (fast greedy MAP: gains are the diagonal of the Schur complement, updated with one
    new Cholesky row per pick)."""
    gain = torch.diagonal(kernel, dim1=-2, dim2=-1)  # [R, P]
    rows = None  # [R, i, P]: the Cholesky rows of the tokens picked so far
    chosen = []
    for i in range(keep):
        pick = gain.argmax(dim=-1, keepdim=True)  # [R, 1]
        chosen.append(pick)
        at = pick.unsqueeze(-1).expand(-1, 1, tokens)
        row = torch.gather(kernel, 1, at).squeeze(1)  # L[j, :]
        if rows is not None:
            row = row - (rows * torch.gather(rows, 2, pick.unsqueeze(-1).expand(-1, i, 1))).sum(1)
        row = row / torch.gather(gain, 1, pick).clamp_min(1e-12).sqrt()
        rows = row.unsqueeze(1) if rows is None else torch.cat([rows, row.unsqueeze(1)], 1)
        left = (gain - row * row).clamp_min(0.0)  # rounding can take an exhausted gain below 0
        gain = torch.where(gain == float("-inf"), gain, left).scatter(1, pick, float("-inf"))  # picked: never again
    return torch.cat(chosen, dim=1)


def cdpruner_keep(feats: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, keep: int, tokens: int,
                  theta: float = 1.0, negative: bool = True) -> torch.Tensor:
    """One image a row: [R, P, D] projected visual tokens, [R, S, D] the prompt's input embeddings, [R, S] its text
    mask -> [R, keep] indices CDPruner keeps. Plain torch with a static trip count: inlined into the graph by
    visual_selection and callable offline."""
    return greedy_map(conditional_kernel(feats, relevance(feats, text, text_mask, negative), theta), keep, tokens)


def plan(config: CDPrunerConfig, geometry: Geometry, n_visual: int, recipe=None):
    return before_llm_plan(config.keep, geometry, n_visual)


def apply(program: Program, config: CDPrunerConfig, recipe=None) -> Program:
    return select_before_llm(program, "cdpruner", config.keep, cdpruner_keep, text=True, theta=config.theta,
                             negative=config.negative)


PASS = register(PassDef(
    name="cdpruner",
    summary="before the LLM, keep each image's tokens of maximal conditional diversity: a DPP over their cosine "
            "similarity weighted by relevance to the prompt's text, greedy MAP (CDPruner)",
    needs=("image_groups",), config=CDPrunerConfig, plan=plan, apply=apply))

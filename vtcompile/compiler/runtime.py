"""Staged execution: vision stage -> merge -> decoder Program lowered to a target.

Programs are specialised to the number of visual tokens per row (so every rewrite has static counts given
the sequence length) and built on first use for each count: one image per prompt is built up front, two
images per prompt on the first such call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError, TargetUnavailableError
from .pipeline import build_program
from .staged import exit_program
from .program import Captured, Program
from .reference import position_ids_from_mask


@dataclass
class PrunedOutput:
    """Logits of the kept positions, in original order, and which positions those are."""

    logits: torch.Tensor  # [B, S_kept, V]
    kept_positions: torch.Tensor  # [B, S_kept], original indices
    kept_visual: torch.Tensor  # [B, S_kept], True where the kept position is an image token
    # Dynamic exits: per row, the layer after which its visual tokens exited (-1: none). Rows that exit at
    # different layers keep different numbers of positions; shorter rows are left-padded with position -1.
    exit_layers: list[int] | None = None


@dataclass
class PreparedInputs:
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    visual_mask: torch.Tensor

    @property
    def n_visual(self) -> int:
        return int(self.visual_mask[0].sum()) if self.visual_mask.numel() else 0

    def as_args(self):
        return (self.inputs_embeds, self.attention_mask, self.position_ids, self.visual_mask)


class StagedRuntime:
    def __init__(self, adapter, captured: Captured, passes: list, lower: Callable[[Program], Callable],
                 recipes: dict | None = None, target: str = "eager",
                 lower_exits: Callable[[Program], Callable] | None = None):
        self.adapter = adapter
        self.captured = captured
        self.passes = passes
        self.lower = lower
        self.recipes = recipes or {}
        self.programs: dict[int, Program] = {}
        self._lowered: dict[int, Callable] = {}
        self.target = target  # the name of the target `lower` belongs to
        # Programs with dynamic exits run staged (control flow between per-layer stages), each stage lowered
        # by the target (targets/staged.py); without `lower_exits` only the eager stages can run.
        self.lower_exits = lower_exits if lower_exits is not None else (exit_program if target == "eager" else None)

    def program(self, n_visual: int) -> Program:
        if n_visual not in self.programs:
            program = build_program(self.captured, n_visual, self.passes, self.recipes)
            if program.exits and self.lower_exits is None:
                raise TargetUnavailableError(
                    f"{', '.join(program.applied)} makes dynamic exits (one graph per layer, control flow between "
                    f"them), and this runtime was given no way to lower them for target {self.target!r}")
            self.programs[n_visual] = program
            self._lowered[n_visual] = self.lower_exits(program) if program.exits else self.lower(program)
        return self.programs[n_visual]

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> PreparedInputs:
        device = self.adapter.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device).long()
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}; they must match")
        if not bool((attention_mask[:, -1] == 1).all()):
            raise InputError("prompts must be left-padded (the last position of every row is a real token); "
                             "set tokenizer.padding_side = 'left'")
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        embeds, visual = self.adapter.merge(input_ids, pixel_values)
        if bool((visual & (attention_mask == 0)).any()):
            raise InputError("image tokens fall on padding positions (attention_mask 0); fix the attention mask")
        return PreparedInputs(embeds, attention_mask, position_ids_from_mask(attention_mask), visual)

    @torch.no_grad()
    def run(self, prepared: PreparedInputs) -> PrunedOutput:
        self.program(prepared.n_visual)
        lowered = self._lowered[prepared.n_visual]
        logits, positions, visual = lowered(*prepared.as_args())
        exits = getattr(lowered, "last_exit", None)
        return PrunedOutput(logits=logits, kept_positions=positions, kept_visual=visual, exit_layers=exits)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None) -> PrunedOutput:
        return self.run(self.prepare(input_ids, pixel_values, attention_mask))

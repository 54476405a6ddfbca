"""Prompt batches as the decoder stage takes them: checked, merged with the image features, positioned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError


def _same(position: torch.Tensor) -> torch.Tensor:
    return position


@dataclass
class PreparedInputs:
    input_ids: torch.Tensor  # [B, S]
    inputs_embeds: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, S] long, 0 on left padding
    position_ids: torch.Tensor  # [B, S] (the family's numbering)
    visual_mask: torch.Tensor  # [B, S] bool
    next_position: torch.Tensor | None = None  # [B, 1]: position of each row's first new token
    step_positions: Callable[[torch.Tensor], torch.Tensor] = _same  # new tokens' positions -> decode position_ids

    @property
    def n_visual(self) -> int:
        return int(self.visual_mask[0].sum()) if self.visual_mask.numel() else 0

    def select(self, rows: torch.Tensor) -> "PreparedInputs":
        """The prompts of some batch rows (rows: indices)."""
        rows = rows.to(self.input_ids.device)
        return PreparedInputs(self.input_ids[rows], self.inputs_embeds[rows], self.attention_mask[rows],
                              self.position_ids[rows], self.visual_mask[rows],
                              None if self.next_position is None else self.next_position[rows], self.step_positions)

    def as_args(self) -> tuple[torch.Tensor, ...]:
        """The prefill signature's inputs, in order."""
        return (self.inputs_embeds, self.attention_mask, self.position_ids, self.visual_mask)


@dataclass(frozen=True)
class AnswerSteps:
    """What lets a calibrating pass have the frozen model answer its calibration prompts, from the prefill program
    alone (greedy, the prompt and the tokens so far re-run each step, no cache): a prompt's decoder inputs extended
    by tokens, as a prompt holding them would be (their embeddings, attention, the family's next positions, not
    visual), and the tokens that end an answer."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # [B, T] token ids -> [B, T, D]
    step_positions: Callable[[torch.Tensor], torch.Tensor]  # [B, T] positions -> the family's position_ids
    eos: tuple[int, ...]

    @classmethod
    def of(cls, frontend) -> "AnswerSteps":
        eos = frontend.generation.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return cls(frontend.embed_tokens, frontend.step_positions, eos)

    def extend(self, args: tuple, tokens: torch.Tensor) -> tuple:
        """The prefill inputs (inputs_embeds, attention_mask, position_ids, visual_mask) of prompts followed by
        `tokens` [B, T]: each row's new positions continue from its largest position + 1 (1-D RoPE and M-RoPE)."""
        embeds, mask, pos, vis = args
        if tokens.shape[1] == 0:
            return args
        batch, n = tokens.shape
        first = pos.reshape(batch, -1).amax(1, keepdim=True) + 1  # [B, 1]
        new = self.step_positions(first + torch.arange(n, device=pos.device)[None])
        return (torch.cat([embeds, self.embed(tokens).to(embeds.dtype)], 1),
                torch.cat([mask, torch.ones(batch, n, dtype=mask.dtype, device=mask.device)], 1),
                torch.cat([pos, new.to(pos.dtype)], 1),
                torch.cat([vis, torch.zeros(batch, n, dtype=vis.dtype, device=vis.device)], 1))

    def ended(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T] bool: True where the token ends its answer (an eos id)."""
        return torch.isin(tokens, torch.tensor(self.eos, dtype=tokens.dtype, device=tokens.device))


def prepare(frontend, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
            attention_mask: torch.Tensor | None, image_features: torch.Tensor | None = None,
            **images) -> PreparedInputs:
    """Check a left-padded prompt batch and merge its images into the token embeddings (or the images' features,
    when the vision stage ran beforehand: frontend.image_features). ``images``: the processor outputs of the
    family's image_inputs (Qwen2-VL: image_grid_thw, mm_token_type_ids), as the processor returns them."""
    check_image_inputs(frontend, images)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise InputError(f"input_ids must be an integer tensor [batch, seq], found {type(input_ids).__name__}"
                         + (f" of {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, seq] with at least one row and one token, found shape "
                         f"{tuple(input_ids.shape)}")
    check_token_ids(input_ids, frontend.embed.weight.shape[0])
    device = frontend.device
    input_ids = input_ids.to(device).long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a tensor [batch, seq] of 0/1, found {type(attention_mask).__name__}")
    attention_mask = attention_mask.to(device).long()
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}; they must match")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token); found other values")
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"attention_mask row(s) {empty} are all zeros: those prompts have no token at all. Every "
                         "row needs at least one real token; drop the empty prompts from the batch")
    if not bool((attention_mask[:, -1] == 1).all()):
        raise InputError("prompts must be left-padded (the last position of every row is a real token); "
                         "set tokenizer.padding_side = 'left'")
    frontend.check_pixels(pixel_values, **images)
    embeds, visual = frontend.merge(input_ids, pixel_values, image_features, **images)
    if bool((visual & (attention_mask == 0)).any()):
        raise InputError("image tokens fall on padding positions (attention_mask 0); fix the attention mask")
    position_ids, next_position = frontend.positions(attention_mask, input_ids, **images)
    return PreparedInputs(input_ids, embeds, attention_mask, position_ids, visual, next_position,
                          frontend.step_positions)


def check_image_inputs(frontend, images: dict) -> None:
    """Only the processor outputs this family takes (a misspelt or foreign keyword is not silently dropped)."""
    unknown = sorted(set(images) - set(frontend.image_inputs))
    if unknown:
        takes = ", ".join(frontend.image_inputs) or "none besides input_ids, pixel_values and attention_mask"
        raise InputError(f"unexpected input(s) {', '.join(unknown)} for this model family; it takes: {takes}")


def check_token_ids(input_ids: torch.Tensor, vocab: int) -> None:
    """Every id indexes the embedding table (an id outside it is an IndexError deep inside torch.embedding)."""
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bool(bad.any()):
        found = sorted(set(input_ids[bad].tolist()))
        shown = ", ".join(map(str, found[:8])) + (" ..." if len(found) > 8 else "")
        raise InputError(f"token id(s) {shown} are outside the model's vocabulary of {vocab} ids (0..{vocab - 1}); "
                         "encode prompts with the model's own tokenizer")

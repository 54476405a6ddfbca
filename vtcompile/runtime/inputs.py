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

    def as_args(self) -> tuple[torch.Tensor, ...]:
        """The prefill signature's inputs, in order."""
        return (self.inputs_embeds, self.attention_mask, self.position_ids, self.visual_mask)


def prepare(frontend, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
            attention_mask: torch.Tensor | None) -> PreparedInputs:
    """Check a left-padded prompt batch and merge its images into the token embeddings."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise InputError(f"input_ids must be an integer tensor [batch, seq], found {type(input_ids).__name__}"
                         + (f" of {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    device = frontend.device
    input_ids = input_ids.to(device).long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device).long()
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}; they must match")
    if input_ids.dim() == 2 and input_ids.shape[1] and not bool((attention_mask[:, -1] == 1).all()):
        raise InputError("prompts must be left-padded (the last position of every row is a real token); "
                         "set tokenizer.padding_side = 'left'")
    embeds, visual = frontend.merge(input_ids, pixel_values)
    if bool((visual & (attention_mask == 0)).any()):
        raise InputError("image tokens fall on padding positions (attention_mask 0); fix the attention mask")
    position_ids, next_position = frontend.positions(attention_mask)
    return PreparedInputs(input_ids, embeds, attention_mask, position_ids, visual, next_position,
                          frontend.step_positions)

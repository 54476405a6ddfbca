"""The correctness oracle: the unmodified model with per-layer key masks.

Removing token t before layer l is exactly equivalent to masking t as a key in every layer >= l (its own
later states never reach a kept token). This runs transformers' own decoder layers one by one with such
masks, so every pruned program has an independent reference for its kept positions.
"""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded prompts: 0.. over real tokens, 1 at padding (as transformers' generate)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def masked_key_logits(adapter, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, key_keep: list[torch.Tensor | None],
                      layer_inputs: dict | None = None) -> torch.Tensor:
    """Logits [B,S,V] of the original decoder where layer l only attends to keys with key_keep[l] True.

    key_keep[l] is a [B,S] bool tensor or None (all keys). A token always attends to itself so that rows
    of removed tokens stay finite; they are never compared. If `layer_inputs` is a dict, the hidden
    states entering each layer are stored in it (for checking scorers against an independent computation).
    """
    lm = adapter.model.model.language_model
    head = adapter.model.lm_head
    batch, seq = attention_mask.shape
    device = inputs_embeds.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    base = causal[None, None] & attention_mask.bool()[:, None, None, :]
    eye = torch.eye(seq, dtype=torch.bool, device=device)[None, None]
    hidden = inputs_embeds
    cos_sin = lm.rotary_emb(hidden, position_ids=position_ids)
    for layer, block in enumerate(lm.layers):
        mask = base if key_keep[layer] is None else base & key_keep[layer][:, None, None, :]
        mask = mask | eye
        if layer_inputs is not None:
            layer_inputs[layer] = hidden
        hidden = block(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=position_ids)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return head(lm.norm(hidden))


def key_masks_from_rewrites(kept_by_cut: dict, num_layers: int, seq: int) -> list[torch.Tensor | None]:
    """Per-layer key masks from the positions kept at each cut (compiler.cut.Cut -> [B, k] original indices).

    A token removed at a cut is masked as a key in every layer whose attention the cut removes it from: a layer
    cut after its attention still sees the token as a key.
    """
    masks: list[torch.Tensor | None] = []
    for layer in range(num_layers):
        current = None
        for cut, kept in kept_by_cut.items():
            if cut.removes_from_attention(layer):
                m = torch.zeros(kept.shape[0], seq, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
                current = m if current is None else current & m
        masks.append(current)
    return masks


def kept_at_boundaries(program, *args) -> dict[float, torch.Tensor]:
    """Run a Program and return, per rewrite cut, the original positions kept from there on.

    Reads the graph's own position bookkeeping through taps (no graph change), so multi-cut programs can
    be checked against :func:`masked_key_logits` cut by cut.
    """
    from .taps import run_with_taps

    _, seen = run_with_taps(program.gm, args, {r.positions for r in program.rewrites})
    return {r.cut: seen[r.positions] for r in program.rewrites}


@torch.no_grad()
def masked_key_generate(adapter, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                        key_keep: list[torch.Tensor | None], tokens: torch.Tensor) -> torch.Tensor:
    """The generation oracle: logits [B, n, V] of the unmodified model that decodes the given new `tokens` [B, n]
    (teacher-forced) with per-layer key masks over the PROMPT and every new token unmasked, at the original
    positions. Step i's row is the distribution of new token i (step 0: after the prompt). Recomputes the whole
    sequence at every step: slow, independent of any cache."""
    batch, seq = attention_mask.shape
    embed = adapter.model.get_input_embeddings()
    steps = tokens.shape[1]
    out = []
    for i in range(steps):
        new = embed(tokens[:, :i].to(inputs_embeds.device)).to(inputs_embeds.dtype)
        embeds = torch.cat([inputs_embeds, new], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, i)], dim=1)
        keys = [None if k is None else torch.cat([k, k.new_ones(batch, i)], dim=1) for k in key_keep]
        logits = masked_key_logits(adapter, embeds, mask, position_ids_from_mask(mask), keys)
        out.append(logits[:, -1])
    return torch.stack(out, dim=1)

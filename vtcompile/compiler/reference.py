"""The correctness oracle: the unmodified model with per-layer key masks.

Removing token t before layer l is exactly equivalent to masking t as a key in every layer >= l (its own
later states never reach a kept token). This runs transformers' own decoder LM (its embedding scaling, rotary
tables, layers and final norm) with such masks - each layer gets its own mask through a hook on the layer's
call - so every pruned program has an independent reference for its kept positions. Every layer's mask applies
that layer's attention rule (compiler.attention: causal, and its sliding window in original sequence indices),
the rule the decode step applies too; a test checks the reference with no key masked against transformers itself,
so it cannot be blind to a window.

`adapter` is a model family's live adapter (models.family.Family): language_model, lm_head, geometry, frontend.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .attention import key_visible


def head_plan(program) -> dict:
    """What a program's head rewrites (compiler.heads) did, as masked_key_logits keywords: the query heads kept in
    each sliced layer and the removed attentions (with the linear adapter standing in for one, if any)."""
    return {"head_keep": {l: h for l, h in program.kept_heads.items() if h},
            "attention_removed": {l: program.adapted.get(l) for l, h in enumerate(program.q_heads) if h == 0}}


@contextmanager
def _heads_zeroed(layers, head_keep: dict | None, attention_removed: dict | None, head_dim: int):
    """Temporary hooks on the unmodified decoder layers: the o_proj input columns of the heads not in head_keep[l]
    are zeroed (exactly what slicing them out computes), and a removed attention outputs zeros (or its adapter
    applied to the normed layer input). The hooks are gone on exit."""
    handles = []

    def zero_columns(keep):
        def hook(module, args):
            x = args[0]
            mask = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
            for h in keep:
                mask[h * head_dim:(h + 1) * head_dim] = 1
            return (x * mask,) + tuple(args[1:])
        return hook

    def replace_output(adapter):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            if adapter is None:
                new = torch.zeros_like(out)
            else:
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                new = torch.nn.functional.linear(x, adapter[0].to(x), adapter[1].to(x))
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    try:
        for layer, keep in (head_keep or {}).items():
            handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(zero_columns(keep)))
        for layer, adapter in (attention_removed or {}).items():
            handles.append(layers[layer].self_attn.register_forward_hook(replace_output(adapter), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def masked_key_logits(adapter, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, key_keep: list[torch.Tensor | None],
                      layer_inputs: dict | None = None, head_keep: dict | None = None,
                      attention_removed: dict | None = None) -> torch.Tensor:
    """Logits [B,S,V] of the original decoder where layer l only attends to keys with key_keep[l] True.

    key_keep[l] is a [B,S] bool tensor or None (all keys). A token always attends to itself so that rows
    of removed tokens stay finite; they are never compared. If `layer_inputs` is a dict, the hidden
    states entering each layer are stored in it (for checking scorers against an independent computation).
    head_keep {layer: query heads} / attention_removed {layer: None or (adapter weight, bias)} give the reference of
    a head-sliced program (head_plan): removed heads' o_proj input columns zeroed, removed attentions output zero.
    """
    lm = adapter.language_model
    with _heads_zeroed(lm.layers, head_keep, attention_removed, lm.layers[0].self_attn.head_dim):
        return _masked_key_logits(adapter, inputs_embeds, attention_mask, position_ids, key_keep, layer_inputs)


def layer_masks(geometry, attention_mask: torch.Tensor, key_keep: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per layer, the [B, 1, S, S] bool mask of the masked-key reference: the layer's attention rule over sequence
    indices, padding keys masked, key_keep[l] applied, and every token attending to itself (so the rows of removed
    tokens stay finite; they are never compared)."""
    seq = attention_mask.shape[1]
    index = torch.arange(seq, device=attention_mask.device)
    eye = torch.eye(seq, dtype=torch.bool, device=attention_mask.device)[None, None]
    real = attention_mask.bool()[:, None, None, :]
    masks = []
    for layer, keep in enumerate(key_keep):
        mask = key_visible(index[:, None], index[None, :], geometry.window(layer))[None, None] & real
        if keep is not None:
            mask = mask & keep[:, None, None, :]
        masks.append(mask | eye)
    return masks


def _masked_key_logits(adapter, inputs_embeds, attention_mask, position_ids, key_keep, layer_inputs):
    lm = adapter.language_model
    masks = layer_masks(adapter.geometry, attention_mask, key_keep)
    handles = []

    def own_mask(layer: int):
        def hook(module, args, kwargs):
            if layer_inputs is not None:
                layer_inputs[layer] = args[0] if args else kwargs["hidden_states"]
            return args, {**kwargs, "attention_mask": masks[layer]}
        return hook

    try:
        for layer, block in enumerate(lm.layers):
            handles.append(block.register_forward_pre_hook(own_mask(layer), with_kwargs=True))
        # A 4-D mask is taken as prepared by transformers' mask functions; every layer's hook replaces it anyway.
        hidden = lm(inputs_embeds=inputs_embeds, attention_mask=masks[0],
                    position_ids=adapter.lm_position_ids(position_ids), use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return adapter.lm_head(hidden)


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
                        key_keep: list[torch.Tensor | None], tokens: torch.Tensor, head_keep: dict | None = None,
                        attention_removed: dict | None = None, position_ids: torch.Tensor | None = None,
                        next_position: torch.Tensor | None = None) -> torch.Tensor:
    """The generation oracle: logits [B, n, V] of the unmodified model that decodes the given new `tokens` [B, n]
    (teacher-forced) with per-layer key masks over the PROMPT and every new token unmasked, at the original
    positions. Step i's row is the distribution of new token i (step 0: after the prompt). Recomputes the whole
    sequence at every step: slow, independent of any cache. head_keep / attention_removed: as masked_key_logits.
    position_ids / next_position: the prompt's positions and each row's first new position as the frontend made
    them (PreparedInputs; needed for M-RoPE, whose numbering the attention mask alone does not give); new token
    i sits at next_position + i."""
    batch, seq = attention_mask.shape
    frontend = adapter.frontend
    if position_ids is None:
        position_ids, next_position = frontend.positions(attention_mask)
    steps = tokens.shape[1]
    out = []
    for i in range(steps):
        new = frontend.embed_tokens(tokens[:, :i]).to(inputs_embeds.dtype)
        embeds = torch.cat([inputs_embeds, new], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, i)], dim=1)
        keys = [None if k is None else torch.cat([k, k.new_ones(batch, i)], dim=1) for k in key_keep]
        later = frontend.step_positions(next_position + torch.arange(i, device=next_position.device))
        logits = masked_key_logits(adapter, embeds, mask, torch.cat([position_ids, later], dim=1), keys,
                                   head_keep=head_keep, attention_removed=attention_removed)
        out.append(logits[:, -1])
    return torch.stack(out, dim=1)

"""The training forward pass: the model's own image path, then the decoder on the merged sequence with the
training-only changes (background tokens removed by the curriculum, visual-token exit as key masks), and the
contexts every phase runs in (attention implementation, compiled layers, autocast)."""

from __future__ import annotations

import contextlib
from typing import NamedTuple


class ForwardOutput(NamedTuple):
    logits: "torch.Tensor"  # [T, V] at the token positions (default: the answer positions)
    vision: "torch.Tensor"  # [B, N, Dv] the selected vision features (what the projector reads; the probes' input)
    attentions: "tuple | None"  # per decoder layer [B, H, S, S] (eager attention), or None
    ids: "torch.Tensor"  # [B, S'] after the curriculum's removals (-1: padding it added)
    positions: "torch.Tensor"  # [Q, 2] answer positions in that sequence
    evidence: "torch.Tensor"  # [Q, 4, S'] grounding targets in that sequence
    mid: "torch.Tensor"  # [Q, D] the answer positions' hidden states after half the decoder layers


def image_features(model, pixel_values):
    """(projected image features [B, N, D], the vision features the projector read [B, N, Dv]) through the
    model's own ``get_image_features`` (its feature layer and select strategy); the second is taken from the
    projector's input, for the patch probes."""
    import torch

    seen = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        out = model.model.get_image_features(pixel_values, return_dict=True)
    finally:
        hook.remove()
    return torch.stack(list(out.pooler_output)), seen[0]


def forward(model, ids, pv, positions, evidence, object_mask, bg_frac: float = 1.0, rng=None, row_exit=None,
            attentions: bool = True, exit_exempt=None, token_positions=None) -> ForwardOutput:
    """Logits at ``token_positions`` ([T, 2] (row, position); default: ``positions``) of the causal LM on
    right-padded ids, and what the auxiliary losses read at the answer positions ``positions`` ([Q, 2]).

    ``bg_frac`` < 1 (curriculum): each row keeps only that fraction (random, from ``rng``) of its background
    visual tokens (tokens of no object); the removed tokens leave the sequence, the others keep their position ids.
    ``row_exit`` ([B] long, visual-exit training): in each row no token attends to a visual token in the layers
    after that row's entry (>= the number of layers: none), except from the query tokens in ``exit_exempt``
    ([B, S] bool, optional). ``attentions=False`` returns no attention weights (None).
    """
    import torch

    m = model.model
    feats, sel = image_features(model, pv)
    emb = m.get_input_embeddings()(ids)
    image_mask = ids == model.config.image_token_id
    emb = emb.masked_scatter(image_mask.unsqueeze(-1), feats.to(emb.dtype))
    position_ids = attention_mask = None
    if token_positions is None:
        token_positions = positions
    if bg_frac < 1.0:
        B, n = ids.shape
        q_row = positions[:, 0]
        keeps = []
        for b in range(B):
            bg = (image_mask[b] & ~object_mask[b]).nonzero().squeeze(1)
            drop = bg[torch.from_numpy(rng.permutation(len(bg))[int(round(bg_frac * len(bg))):]).long()]
            keep = torch.ones(n, dtype=torch.bool)
            keep[drop] = False
            keeps.append(keep.nonzero().squeeze(1))
        L = max(len(k) for k in keeps)
        index = torch.stack([torch.cat([k, k.new_full((L - len(k),), n - 1)]) for k in keeps])  # [B, L]
        valid = torch.arange(L)[None] < torch.tensor([len(k) for k in keeps])[:, None]
        emb = emb.gather(1, index[..., None].expand(-1, -1, emb.shape[-1]))
        ids = torch.where(valid, ids.gather(1, index), ids.new_full((), -1))
        position_ids = torch.where(valid, index, 0)
        attention_mask = valid.long()
        evidence = evidence.gather(2, index[q_row][:, None].expand(-1, evidence.shape[1], -1))

        def moved(pos):  # positions in the shortened rows
            return torch.tensor([(b, int(torch.searchsorted(keeps[b], p))) for b, p in pos.tolist()])
        positions, token_positions = moved(positions), moved(token_positions)
    # Right padding + causal attention: real tokens never see the padding, so no mask is needed - except
    # with gapped position ids: without an explicit attention_mask transformers reads every gap as the start
    # of a new packed sequence and makes the attention block-diagonal.
    hooks = []
    n_layers = len(m.language_model.layers)
    if row_exit is not None and bool((row_exit < n_layers - 1).any()):
        if attention_mask is None:  # an explicit mask makes transformers build the per-row 4-d mask the hooks edit
            attention_mask = torch.ones_like(ids)
            position_ids = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        hooks = visual_exit_hooks(m.language_model.layers, row_exit, ids == model.config.image_token_id, exit_exempt)
    # use_cache=False: with the KV cache transformers makes by default, each compiled layer specialised on its
    # layer index, and a full run hit Dynamo's recompile limit (8) in phase 2 and fell back to eager there
    try:
        out = m.language_model(inputs_embeds=emb, position_ids=position_ids, attention_mask=attention_mask,
                               output_attentions=attentions, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    h = out.last_hidden_state[token_positions[:, 0], token_positions[:, 1]]
    mid = out.hidden_states[len(out.hidden_states) // 2][positions[:, 0], positions[:, 1]]
    return ForwardOutput(model.lm_head(h), sel, out.attentions if attentions else None, ids, positions, evidence,
                         mid)


def visual_exit_hooks(layers, row_exit, visual, exempt=None) -> list:
    """Forward pre-hooks that mask, in every decoder layer ``i``, the visual keys (``visual`` [B, S] bool) of the
    rows whose exit layer (``row_exit`` [B] long; >= the number of layers: no exit) is below ``i`` - a visual-token
    exit, by the masked-key equivalence of DESIGN.md. Query tokens in ``exempt`` ([B, S] bool, optional) keep
    seeing them, and then so do the visual tokens themselves, so an exempt token reads the visual states of a run
    without an exit. Every token still sees BOS, so no attention row is empty. Returns the hook handles."""
    import torch

    def make(i):
        drop = (visual & (row_exit < i)[:, None])[:, None, None, :]  # [B, 1, 1, S_k]
        if exempt is not None:  # the visual tokens keep their states too: exempt tokens read them as with no exit
            drop = drop & ~(exempt | visual)[:, None, :, None]  # [B, 1, S_q, S_k]

        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None or mask.dtype == torch.bool:
                raise RuntimeError("visual-exit training needs the eager attention's additive float mask")
            mask = mask.expand(drop.shape[0], -1, -1, -1)
            kwargs["attention_mask"] = mask.masked_fill(drop, torch.finfo(mask.dtype).min)
            return args, kwargs
        return hook

    return [layer.register_forward_pre_hook(make(i), with_kwargs=True)
            for i, layer in enumerate(layers) if bool((row_exit < i).any())]


def autocast(precision: str):
    """bf16 autocast of the training forward (``precision`` 'bf16'), or nothing ('fp32')."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def attention(model, impls: tuple[str, str]):
    """Inside the block the decoder and the vision tower use the attention implementations ``impls`` (text,
    vision); the block gets the ones they had, which are restored after it."""
    cfgs = (model.config.text_config, model.config.vision_config)
    before = tuple(c._attn_implementation for c in cfgs)
    for c, impl in zip(cfgs, impls):
        c._attn_implementation = impl
    try:
        yield before
    finally:
        for c, impl in zip(cfgs, before):
            c._attn_implementation = impl


@contextlib.contextmanager
def compiled_layers(model, enabled: bool):
    """Inside the block every decoder and vision-tower layer runs torch.compile'd (when ``enabled``; Inductor,
    dynamic shapes). A short run covering every phase recompiled 15 times in all."""
    layers = [*model.model.language_model.layers, *model.model.vision_tower.encoder.layers] if enabled else []
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None

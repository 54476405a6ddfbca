"""The training phases, each a ``Phase`` for the one loop: what a step reads and which loss it minimises. The
first paragraph of each builder's docstring is what recipe.json says the phase does."""

from __future__ import annotations

import inspect

import numpy as np

from .. import build, scenes
from .config import TrainConfig
from .data import answer_loss, dialogue_batch, dialogues, turn_mask
from .forward import autocast, forward, image_features
from .loop import Phase, adamw
from .losses import PatchHeads, attention_loss

VISION_FIRST_INDEX = 10_000_000  # phase 1 reads single images from here on: never a dialogue's image


def vision_phase(model, heads: PatchHeads, ip, cfg: TrainConfig) -> Phase:
    """Vision tower + linear patch probes only: per-patch colour and shape class of the object under the patch
    (0 = background), first patch of an object, row and column (grid classes and numbers, object patches
    weighted 4x). AdamW(betas=(0.9, 0.98)), linear warmup, cosine to 0.1 x lr.

    Why: a from-scratch ViT behind an answer-only loss sits on the text-prior plateau for thousands of steps."""
    import torch

    opt = torch.optim.AdamW(list(model.model.vision_tower.parameters()) + [p for _, p in heads.named_parameters()],
                            lr=cfg.vision_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    n = cfg.vision_batch_size

    def loss(step: int):
        batch = [scenes.make_sample("train", cfg.seed, VISION_FIRST_INDEX + step * n + j) for j in range(n)]
        pv = build.pixel_values([s.image for s in batch], ip)
        with autocast(cfg.precision):
            feats = image_features(model, pv)[1]
        value = heads.loss(feats.float(), [PatchHeads.targets(s.objects) for s in batch])
        return value, {"patch": value.item()}

    return Phase("vision", cfg.vision_steps, opt, cfg.vision_lr, min(cfg.warmup, cfg.vision_steps // 5), 0.1, loss,
                 first_index=VISION_FIRST_INDEX, per_step=n, validate=False,
                 record={"what": what(vision_phase), "batch_size": n, "lr": cfg.vision_lr})


def end_to_end_phase(model, heads: PatchHeads, enc: build.PromptEncoder, ip, cfg: TrainConfig) -> Phase:
    """Everything end to end on multi-turn dialogues: the cross-entropy of every answer token and the eos that ends
    it (full vocabulary; summed per answer, averaged over the answers: data.answer_loss), the patch probes (kept on
    so the evidence stays local to its patches), a readout probe (the answer position's state after half the
    decoder layers -> the centre offset of the two objects of a relative-position question) and a grounding loss
    whose weight decays linearly to 0 over attn_until of the steps (the answer position's attention should land on the words and the visual tokens of
    the objects the question is about; see losses.attention_loss). Curriculum: a random part of the background
    visual tokens leaves the decoder input (object tokens always kept, original position ids); the kept fraction
    grows linearly from bg_start to 1 between bg_from and bg_until of the steps. With exit_after, visual-exit
    training in exit_frac of the dialogues. AdamW(betas=(0.9, 0.98)), grad clip 1, linear warmup, cosine to
    final_lr_frac x lr.

    Why: the grounding loss only gets the decoder past its needle-in-a-haystack plateau; the final model is
    trained by the answer loss alone for the last (1 - attn_until) of the steps."""
    import torch

    params, opt = adamw(list(model.named_parameters()) + list(heads.named_parameters()), cfg.lr, cfg.weight_decay)
    n, steps = cfg.batch_size, cfg.steps
    n_layers = model.config.text_config.num_hidden_layers
    image_id = model.config.image_token_id
    exiting = cfg.exit_after is not None and cfg.exit_frac > 0
    layers = cfg.grounding_layers
    bg_rng = np.random.default_rng([cfg.seed, 12345])
    exit_rng = np.random.default_rng([cfg.seed, 23456])

    def loss(step: int):
        dias = dialogues(cfg.seed, step * n, n, cfg.turns, cfg.turn_weights)
        batch = dialogue_batch(enc, dias, cfg.count_sink)
        pv = build.pixel_values([d[0].image for d in dias], ip)
        labels = [PatchHeads.targets(d[0].objects) for d in dias]
        ramp = (step - cfg.bg_from * steps) / max(1.0, (cfg.bg_until - cfg.bg_from) * steps)
        bg_frac = cfg.bg_start + (1.0 - cfg.bg_start) * min(1.0, max(0.0, ramp))
        row_exit = (torch.where(torch.from_numpy(exit_rng.random(n) < cfg.exit_frac), cfg.exit_after, n_layers)
                    if exiting else None)
        w_attn = cfg.attn_weight * max(0.0, 1.0 - step / max(1.0, cfg.attn_until * steps))
        with autocast(cfg.precision):
            out = forward(model, batch.ids, pv, batch.positions, batch.evidence, batch.objects, bg_frac, bg_rng,
                          row_exit, attentions=w_attn > 0, token_positions=batch.token_positions)
        logits, feats, mid = out.logits.float(), out.vision.float(), out.mid.float()
        answer = answer_loss(logits, batch)
        aux = heads.loss(feats, labels) + heads.readout_loss(mid, batch.readout)
        if w_attn > 0:
            a_loss = attention_loss([a.float() for a in out.attentions], layers, out.ids, image_id, out.positions,
                                    out.evidence, batch.sink)
        else:
            a_loss = torch.zeros(())
        total = answer + cfg.aux_weight * aux + (w_attn * a_loss if w_attn > 0 else 0.0)
        acc = (logits.argmax(-1) == batch.targets).float().mean().item()
        return total, {"loss": answer.item(), "acc": acc, "patch": aux.item(), "attn": a_loss.item(), "bg": bg_frac}

    return Phase("end to end", steps, opt, cfg.lr, cfg.warmup, cfg.final_lr_frac, loss, clip=params,
                 first_index=0, per_step=n,
                 record={"what": what(end_to_end_phase), "batch_size": n, "lr": cfg.lr,
                         "turn_kind_weights": _weights(cfg.turn_weights),
                         "grounding_layers": layers, "grounding_zero_from_step": int(cfg.attn_until * steps),
                         "curriculum_ramp": [int(cfg.bg_from * steps), int(cfg.bg_until * steps)]})


def polish_phase(model, enc: build.PromptEncoder, ip, cfg: TrainConfig, *, name: str, steps: int, lr: float,
                 first_index: int, exit_layers: tuple[int, ...], exit_frac: float,
                 exit_keep: tuple[str, ...]) -> Phase:
    """The answer loss alone (every answer token and its eos) on count-heavy dialogues (polish_turn_weights), a
    fresh AdamW (betas=(0.9, 0.98)), grad clip 1, warmup over a twentieth of the steps then cosine to 0. With exit
    layers, visual-exit training: in a random exit_frac of the dialogues no token attends to a visual token in the
    layers after one exit layer drawn uniformly from the list (a visual-token exit, as key masks), except the tokens of the
    exit_keep kinds' turns; the model learns to gather what it needs from the image early, which the visual-token-exit
    literature reports LLaVA-1.5 does on its own (METHODS.md).

    It depends on nothing of the run before it but the model's weights, so it gives the same result on a
    checkpoint loaded from disk as at the end of a full run. Phase 4 (finish) is the same phase without exits."""
    import torch

    params, opt = adamw(list(model.named_parameters()), lr, cfg.weight_decay)
    n = cfg.batch_size
    n_layers = model.config.text_config.num_hidden_layers
    exiting = bool(exit_layers) and exit_frac > 0
    choices = torch.tensor(list(exit_layers) or [n_layers])
    exit_rng = np.random.default_rng([cfg.seed, 34567])

    def loss(step: int):
        dias = dialogues(cfg.seed, first_index + step * n, n, cfg.turns, cfg.polish_turn_weights)
        batch = dialogue_batch(enc, dias)
        pv = build.pixel_values([d[0].image for d in dias], ip)
        row_exit = exempt = None
        if exiting:
            rows = torch.from_numpy(exit_rng.random(n) < exit_frac)
            layer = (choices[torch.from_numpy(exit_rng.integers(len(choices), size=n))]
                     if len(choices) > 1 else choices[0])
            row_exit = torch.where(rows, layer, n_layers)
            if exit_keep:
                exempt = turn_mask(batch, [k in exit_keep for k in batch.kinds], model.config.image_token_id)
        with autocast(cfg.precision):
            logits = forward(model, batch.ids, pv, batch.positions, batch.evidence, batch.objects, 1.0, None,
                             row_exit, attentions=False, exit_exempt=exempt,
                             token_positions=batch.token_positions).logits
        value = answer_loss(logits, batch)
        acc = (logits.argmax(-1) == batch.targets).float().mean().item()
        return value, {"loss": value.item(), "acc": acc}

    exits = {"after_layers": list(exit_layers), "rows": exit_frac,
             "turns_that_keep_the_visual_tokens": list(exit_keep)} if exiting else None
    return Phase(name, steps, opt, lr, max(1, steps // 20), 0.0, loss, clip=params, first_index=first_index,
                 per_step=n, record={"what": what(polish_phase), "lr": lr,
                                     "turn_kind_weights": _weights(cfg.polish_turn_weights), "visual_exit": exits})


def phases(model, heads: PatchHeads, enc: build.PromptEncoder, ip, cfg: TrainConfig) -> list[Phase]:
    """Every phase of ``cfg`` in order (phase 3 and 4 only with steps)."""
    out = [vision_phase(model, heads, ip, cfg), end_to_end_phase(model, heads, enc, ip, cfg)]
    first = cfg.steps * cfg.batch_size
    if cfg.polish_steps:
        out.append(polish_phase(model, enc, ip, cfg, name="polish", steps=cfg.polish_steps, lr=cfg.polish_lr,
                                first_index=first, exit_layers=cfg.polish_exit_layers,
                                exit_frac=cfg.polish_exit_frac, exit_keep=cfg.polish_exit_keep))
        first += cfg.polish_steps * cfg.batch_size
    if cfg.finish_steps:
        out.append(polish_phase(model, enc, ip, cfg, name="finish", steps=cfg.finish_steps, lr=cfg.finish_lr,
                                first_index=first, exit_layers=(), exit_frac=0.0, exit_keep=()))
    return out


def what(builder) -> str:
    """The first paragraph of a phase builder's docstring, on one line: recipe.json's description of the phase."""
    return " ".join(inspect.getdoc(builder).split("\n\n")[0].split())


def _weights(w: dict[str, int]) -> dict[str, int]:
    return {k: int(w.get(k, 1)) for k in scenes.KINDS}

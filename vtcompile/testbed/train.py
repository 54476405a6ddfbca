"""Train the testbed LLaVA from scratch on synthetic scenes (CPU, minutes).

    python -m vtcompile.testbed.train --out DIR [--seed S] [--steps N] [--batch-size B] [--lr LR]

Everything is trained (vision tower, projector, decoder); the loss is the cross-entropy of the answer token
(the next token after "ASSISTANT:") over the full vocabulary. Data are generated in memory from the train
split; a sample is a pure function of (split, seed, index), so a run is deterministic for a seed (on the
same torch build and thread count). The checkpoint is written to a temporary directory next to ``--out``
and moved into place at the end, with ``recipe.json`` describing the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from . import build, scenes


def evaluate(model, tokenizer, samples, batch_size: int = 64, image_processor=None) -> dict:
    """Exact match of the greedy next token vs the answer; returns {"overall": acc, "per_kind": {...}, "n": n}."""
    import torch

    enc = build.PromptEncoder(tokenizer)
    right = defaultdict(int)
    total = defaultdict(int)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            ids, mask = enc.batch([s.question for s in chunk])
            pv = build.pixel_values([s.image for s in chunk], image_processor)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pv, logits_to_keep=1).logits[:, -1]
            pred = logits.argmax(-1).tolist()
            for s, p in zip(chunk, pred):
                total[s.kind] += 1
                right[s.kind] += int(p == enc.answer_id(s.answer))
    model.train(was_training)
    n = sum(total.values())
    return {
        "overall": sum(right.values()) / max(n, 1),
        "per_kind": {k: right[k] / total[k] for k in sorted(total)},
        "n": n,
    }


def _dialogue_batch(enc, dialogues):
    """Right-padded multi-turn sequences and the positions whose next token is an answer.

    Turn 1 is exactly the evaluation prompt ``USER: <image>\n{q} ASSISTANT:``; later turns follow the
    LLaVA-1.5 conversation format ``... ASSISTANT: {a}</s>USER: {q} ASSISTANT:``.
    """
    import torch

    tok = enc.tok
    seqs, positions, targets = [], [], []
    for b, (sample, qas) in enumerate(dialogues):
        ids: list[int] = []
        for j, (q, a, _kind) in enumerate(qas):
            if j == 0:
                ids = list(enc.ids(q))
            else:
                ids += [enc.answer_id(qas[j - 1][1]), tok.eos_token_id]
                ids += tok(f"USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"]
            positions.append((b, len(ids) - 1))
            targets.append(enc.answer_id(a))
        seqs.append(ids)
    n = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), n), enc.pad_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, : len(x)] = torch.tensor(x)
    pos = torch.tensor(positions)
    return input_ids, pos, torch.tensor(targets)


def _forward(model, ids, pv, positions, vis_keep=None):
    """Answer logits at ``positions`` (causal LM on right-padded ids) and the selected vision features.

    ``vis_keep`` (training curriculum only): per row, the indices of the visual tokens to feed the decoder;
    the others are removed from the sequence (kept tokens keep their original position ids).
    """
    import torch

    m = model.model
    vis = m.vision_tower(pv, output_hidden_states=True)
    sel = vis.hidden_states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        sel = sel[:, 1:]
    feats = m.multi_modal_projector(sel)
    emb = m.get_input_embeddings()(ids)
    image_mask = ids == model.config.image_token_id
    emb = emb.masked_scatter(image_mask.unsqueeze(-1), feats.to(emb.dtype))
    position_ids = attention_mask = None
    if vis_keep is not None:
        B, n = ids.shape
        rows, keeps = [], []
        for b in range(B):
            vis_pos = image_mask[b].nonzero().squeeze(1)
            drop = torch.ones(n, dtype=torch.bool)
            drop[vis_pos] = False
            keep_vis = torch.zeros(n, dtype=torch.bool)
            keep_vis[vis_pos[vis_keep[b]]] = True
            keeps.append((drop | keep_vis).nonzero().squeeze(1))
        L = max(len(k) for k in keeps)
        new = emb.new_zeros(B, L, emb.shape[-1])
        position_ids = torch.zeros(B, L, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        for b, k in enumerate(keeps):
            new[b, : len(k)] = emb[b, k]
            position_ids[b, : len(k)] = k
            attention_mask[b, : len(k)] = 1
        emb = new
        remapped = [int(torch.searchsorted(keeps[b], p)) for b, p in positions.tolist()]
        positions = torch.stack([positions[:, 0], torch.tensor(remapped)], 1)
    # Right padding + causal attention: real tokens never see the padding, so no mask is needed - except
    # with gapped position ids: without an explicit attention_mask transformers reads every gap as the start
    # of a new packed sequence and makes the attention block-diagonal.
    h = m.language_model(inputs_embeds=emb, position_ids=position_ids,
                         attention_mask=attention_mask).last_hidden_state
    h = h[positions[:, 0], positions[:, 1]]
    return model.lm_head(h), sel


def _lr_at(step: int, steps: int, lr: float, warmup: int, final_frac: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(
    out_dir: str | os.PathLike,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    final_lr_frac: float = 0.05,
    val_size: int = 1000,
    test_size: int = 0,
    eval_every: int = 500,
    turns: int = 6,
    bg_keep: float = 0.15,
    curriculum_until: float = 0.4,
    aux_weight: float = 1.0,
    aux_until: float = 0.5,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train a testbed model and save it (weights, config, processor files, recipe.json) to ``out_dir``."""
    import numpy as np
    import torch
    import transformers
    from tqdm import tqdm

    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    if threads is not None:
        torch.set_num_threads(int(threads))

    model, processor = build.build_model(seed)
    model.train()
    tok = processor.tokenizer
    enc = build.PromptEncoder(tok)
    ip = processor.image_processor

    # Auxiliary per-patch heads (colour / shape of the object under each patch) on the selected vision
    # features: they ground the from-scratch vision tower early (the answer loss alone sits on the
    # text-prior plateau for thousands of steps) and keep object evidence local to its patches. Their
    # weight decays to 0 over the first ``aux_until`` of training; the heads are not saved.
    vh = model.config.vision_config.hidden_size
    aux_color = torch.nn.Linear(vh, len(scenes.COLOR_NAMES) + 1)
    aux_shape = torch.nn.Linear(vh, len(scenes.SHAPES) + 1)
    decay, no_decay = [], []
    named = list(model.named_parameters()) + [(f"aux_color.{n}", p) for n, p in aux_color.named_parameters()] \
        + [(f"aux_shape.{n}", p) for n, p in aux_shape.named_parameters()]
    params = [p for _, p in named]
    for name, p in named:
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )
    val = list(scenes.iter_samples("val", seed, val_size))
    history = []
    bg_rng = np.random.default_rng([seed, 12345])
    t0 = time.time()
    bar = tqdm(range(steps), desc="testbed train", disable=not progress, dynamic_ncols=True)
    ema_loss = None
    ema_acc = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup, final_lr_frac)
        dialogues = [scenes.make_dialogue("train", seed, step * batch_size + j, turns) for j in range(batch_size)]
        batch = [d[0] for d in dialogues]
        ids, positions, target = _dialogue_batch(enc, dialogues)
        pv = build.pixel_values([s.image for s in batch], ip)
        labels = [scenes.patch_labels(s.objects, build.PATCH_SIZE) for s in batch]
        bg_frac = bg_keep + (1.0 - bg_keep) * min(1.0, step / max(1.0, curriculum_until * steps))
        vis_keep = None
        if bg_frac < 1.0:
            vis_keep = []
            for c, _ in labels:
                obj = np.flatnonzero(c > 0)
                bg = np.flatnonzero(c == 0)
                nb = int(round(bg_frac * len(bg)))
                vis_keep.append(torch.from_numpy(np.sort(np.concatenate([obj, bg_rng.permutation(bg)[:nb]]))))
        logits, vis_feats = _forward(model, ids, pv, positions, vis_keep)
        loss = torch.nn.functional.cross_entropy(logits, target)
        w_aux = aux_weight * max(0.0, 1.0 - step / max(1.0, aux_until * steps)) if aux_weight else 0.0
        if w_aux > 0:
            col = torch.from_numpy(np.stack([c for c, _ in labels]))
            shp = torch.from_numpy(np.stack([h for _, h in labels]))
            ce = torch.nn.functional.cross_entropy
            aux = ce(aux_color(vis_feats).flatten(0, 1), col.flatten()) \
                + ce(aux_shape(vis_feats).flatten(0, 1), shp.flatten())
            loss_total = loss + w_aux * aux
        else:
            aux = torch.zeros(())
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc = (logits.argmax(-1) == target).float().mean().item()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}", aux=f"{aux.item():.3f}", bg=f"{bg_frac:.2f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            r = evaluate(model, tok, val[:250], image_processor=ip)
            history.append({"step": step + 1, "val250": r["overall"], "per_kind": r["per_kind"],
                            "time_s": round(time.time() - t0, 1)})
            tqdm.write(f"step {step + 1}: val(250) {r['overall']:.3f} "
                       + " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items()))
    train_time = time.time() - t0
    model.eval()
    val_res = evaluate(model, tok, val, image_processor=ip)
    tqdm.write(f"final val ({val_res['n']}): {val_res['overall']:.4f} " +
               " ".join(f"{k}={v:.3f}" for k, v in val_res["per_kind"].items()))
    recipe = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_schedule": f"linear warmup {warmup} steps, cosine to {final_lr_frac} x lr",
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-8), grad clip 1.0",
        "weight_decay": weight_decay,
        "aux_patch_loss": {"weight": aux_weight, "decays_to_zero_at_step": int(aux_until * steps),
                           "targets": "per-patch colour and shape class (0 = background) of the selected "
                                      "vision features, linear heads, not saved"},
        "loss": "cross-entropy of the answer tokens (next token after each 'ASSISTANT:'), full vocabulary",
        "turns": turns,
        "curriculum": {"background_visual_tokens_kept_at_step_0": bg_keep,
                       "all_visual_tokens_from_step": int(curriculum_until * steps),
                       "what": "early steps drop a random part of the pure-background visual tokens from the "
                               "decoder input (object tokens always kept, original position ids); the "
                               "fraction grows linearly to 1"},
        "data": {
            "generator": "vtcompile.testbed.scenes",
            "train_images_seen": steps * batch_size,
            "train_dialogue": f"{turns} questions per image: the sample's own question, then up to "
                              f"{turns - 1} more about the same scene (LLaVA-1.5 multi-turn format)",
            "train_split": f"train, seed {seed}, indices 0..{steps * batch_size - 1}",
            "val_size": val_size,
            "kinds": list(scenes.KINDS),
        },
        "train_time_s": round(train_time, 1),
        "threads": torch.get_num_threads(),
        "val_accuracy": {"overall": val_res["overall"], **val_res["per_kind"]},
        "history": history,
        "geometry": {
            "image_size": build.IMAGE_SIZE,
            "patch_size": build.PATCH_SIZE,
            "visual_tokens": build.NUM_VISUAL_TOKENS,
            "vision": build.VISION,
            "text": build.TEXT,
            "vision_feature_layer": model.config.vision_feature_layer,
            "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    if test_size:
        test_res = evaluate(model, tok, list(scenes.iter_samples("test", seed, test_size)), image_processor=ip)
        recipe["data"]["test_size"] = test_size
        recipe["test_accuracy"] = {"overall": test_res["overall"], **test_res["per_kind"]}
        tqdm.write(f"test ({test_res['n']}): {test_res['overall']:.4f} " +
                   " ".join(f"{k}={v:.3f}" for k, v in test_res["per_kind"].items()))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build.save_checkpoint(model, processor, tmp, recipe)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vtcompile.testbed.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--turns", type=int, default=6, help="questions per training image (multi-turn dialogue)")
    ap.add_argument("--bg-keep", type=float, default=0.15,
                    help="curriculum: fraction of background visual tokens fed to the decoder at step 0")
    ap.add_argument("--curriculum-until", type=float, default=0.4,
                    help="fraction of steps after which all visual tokens are fed")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary per-patch loss")
    ap.add_argument("--aux-until", type=float, default=0.5, help="fraction of steps over which it decays to 0")
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--test-size", type=int, default=0, help="also evaluate this many test questions")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    recipe = train(
        a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
        warmup=a.warmup, turns=a.turns, bg_keep=a.bg_keep, curriculum_until=a.curriculum_until, aux_weight=a.aux_weight, aux_until=a.aux_until, val_size=a.val_size, test_size=a.test_size, eval_every=a.eval_every,
        threads=a.threads, overwrite=a.overwrite, progress=not a.no_progress,
    )
    print(json.dumps({"out": str(Path(a.out).resolve()), "val_accuracy": recipe["val_accuracy"],
                      "train_time_s": recipe["train_time_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

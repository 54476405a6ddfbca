"""Shared fixtures: tiny random models (MHA and GQA) and their prompts, built once per session."""
from __future__ import annotations

import functools

import torch

from vtcompile.models.family import rope_positions
from vtcompile.models import load_model
from vtcompile.models.llava import example_inputs

GEOMETRIES = ["tiny", "tiny-gqa"]

# name -> (batch, n_images, text_before, pad): image mid-prompt with left padding, two images, image first
PROMPTS = {
    "mid_pad_b2": dict(batch=2, n_images=1, text_before=5, pad=3),
    "two_images": dict(batch=2, n_images=2, text_before=4, pad=2),
    "image_first": dict(batch=1, n_images=1, text_before=0, pad=0),
}


@functools.lru_cache(maxsize=None)
def adapter(name: str):
    return load_model(name)


@functools.lru_cache(maxsize=None)
def compiled(name: str, passes: str | None):
    from vtcompile import compile_pruned

    return compile_pruned(adapter(name), passes)


def prompt(name: str, kind: str, seed: int = 0):
    return example_inputs(adapter(name), seed=seed, **PROMPTS[kind])


def hf_logits(name: str, ids, pixels, mask):
    with torch.no_grad():
        return adapter(name).model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                   position_ids=rope_positions(mask)).logits


def masked_key_check(cm, geometry: str, kind: str, seed: int = 0) -> dict:
    """Run a compiled model's program once (tapping the positions kept at every cut) and compare its
    kept-position logits with the masked-key reference (DESIGN.md). Also checks that the program's per-layer cache
    outputs hold exactly the keys that reference lets each layer see. Returns the max diff and what was seen."""
    from vtcompile.compiler.reference import key_masks_from_rewrites, masked_key_logits
    from vtcompile.compiler.taps import run_with_taps

    ids, pixels, mask = prompt(geometry, kind, seed)
    prep = cm.prepare(ids, pixels, mask)
    program = cm.program_for(prep.n_visual)
    outputs, seen = run_with_taps(program.gm, prep.as_args(), {r.positions for r in program.rewrites})
    out = program.signature.unpack(outputs)
    logits, positions, visual = out["logits"], out["positions"], out["visual"]
    kept = {r.cut: seen[r.positions] for r in program.rewrites}
    keys = key_masks_from_rewrites(kept, program.geometry.num_layers, ids.shape[1])
    for layer in program.signature.cache_layers():  # the cache of layer l: the keys its attention saw
        expect = torch.ones_like(mask, dtype=torch.bool) if keys[layer] is None else keys[layer]
        got = torch.zeros_like(expect).scatter_(1, out[f"key_positions_{layer}"], True)
        assert torch.equal(got, expect), layer
        assert out[f"k_{layer}"].shape[2] == out[f"key_positions_{layer}"].shape[1] == out[f"v_{layer}"].shape[2]
    ref = masked_key_logits(cm.adapter, prep.inputs_embeds, prep.attention_mask, prep.position_ids, keys)
    ref = torch.gather(ref, 1, positions[..., None].expand(-1, -1, ref.shape[-1]))
    real = torch.gather(mask, 1, positions).bool()  # padding rows are undefined in both
    return {"diff": (ref - logits).abs().amax(-1)[real].max().item(), "kept": kept, "program": program,
            "positions": positions, "visual": visual, "ids": ids, "mask": mask, "prep": prep}


def prefill_oracle_diff(cm, ids, pixels, mask) -> float:
    """Largest |logit diff| at real kept positions between the compiled prefill and the masked-key reference whose
    per-layer key masks are the keys that layer's attention saw (its key_positions output; -1 pads rows that kept
    fewer, after a DyVTE exit)."""
    from vtcompile.compiler.reference import masked_key_logits

    out = cm(ids, pixels, mask)
    prep = cm.prepare(ids, pixels, mask)
    keys = []
    for layer in range(cm.frontend.geometry.num_layers):
        pos = out.outputs[f"key_positions_{layer}"]
        keys.append(torch.zeros_like(mask, dtype=torch.bool).scatter_(1, pos.clamp(min=0), pos >= 0))
    ref = masked_key_logits(cm.adapter, prep.inputs_embeds, prep.attention_mask, prep.position_ids, keys)
    positions = out.kept_positions
    ref = torch.gather(ref, 1, positions.clamp(min=0)[..., None].expand(-1, -1, ref.shape[-1]))
    real = (positions >= 0) & torch.gather(mask, 1, positions.clamp(min=0)).bool()
    return (ref - out.logits).abs().amax(-1)[real].max().item()

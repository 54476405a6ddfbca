"""Shared fixtures: tiny random models (MHA and GQA) and their prompts, built once per session."""
from __future__ import annotations

import functools

import torch

from vtcompile.compiler.reference import position_ids_from_mask
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
                                   position_ids=position_ids_from_mask(mask)).logits

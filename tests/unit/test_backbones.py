"""Decoder backbones inside the LLaVA family (models/backbone.py): Mistral with a sliding window in every layer,
Qwen2 with full and windowed layers mixed, Gemma (scaled embeddings, head_dim != hidden/heads); Gemma2 refused.

The window is shorter than the prompt plus the new tokens, so keys leave it in prefill and at decode steps, in
batches with left padding. Checked: the masked-key reference with nothing masked equals transformers (so it cannot
be blind to a window), no-pass generate equals transformers' generate (tokens and every step's logits), and FastV
and FitPrune equal the window-aware reference in prefill and at every decode step.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.compiler.reference import masked_key_logits
from vtcompile.errors import UnsupportedModelError
from vtcompile.models import adapt, load_model
from vtcompile.models.llava import ModelSpec

from .common import adapter, compiled, hf_logits, masked_key_check, prompt
from .test_generate import assert_matches_oracle, generate_with_logits

BACKBONES = ["tiny-mistral", "tiny-qwen2", "tiny-gemma"]
TOL = 1e-4
NEW = 16


@pytest.fixture(params=BACKBONES)
def backbone(request):
    return request.param


def test_windows_read_from_the_config():
    assert adapter("tiny-mistral").geometry.windows == (24,) * 4
    assert adapter("tiny-qwen2").geometry.windows == (None, None, 20, 20)  # max_window_layers=2
    assert adapter("tiny-gemma").geometry.windows == (None,) * 4
    assert adapter("tiny").geometry.windows == (None,) * 4


def test_reference_without_masks_equals_transformers(backbone):
    a = adapter(backbone)
    ids, pixels, mask = prompt(backbone, "mid_pad_b2", seed=3)
    assert ids.shape[1] > 24  # longer than the windows: keys leave them inside the prompt
    prep = compile_pruned(a).prepare(ids, pixels, mask)
    ref = masked_key_logits(a, prep.inputs_embeds, prep.attention_mask, prep.position_ids, [None] * 4)
    want = hf_logits(backbone, ids, pixels, mask)
    real = mask.bool()
    assert (ref - want).abs().amax(-1)[real].max().item() <= TOL
    if a.geometry.windows[-1] is not None:  # the window matters here: a causal-only reference would differ
        from vtcompile.compiler import reference

        causal = reference.layer_masks(a.geometry, mask, [None] * 4)
        assert not torch.equal(causal[-1], reference.layer_masks(
            type(a.geometry)(**{**a.geometry.to_dict(), "windows": []}), mask, [None] * 4)[-1])


def _hf_generate(name, ids, pixels, mask, n):
    with torch.no_grad():
        out = adapter(name).model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n,
                                           min_new_tokens=n, do_sample=False, eos_token_id=None,
                                           output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("kind", ["mid_pad_b2", "two_images"])
def test_no_pass_generate_equals_transformers(backbone, kind):
    ids, pixels, mask = prompt(backbone, kind, seed=5)
    assert ids.shape[1] + NEW > 24
    want_tokens, want_logits = _hf_generate(backbone, ids, pixels, mask, NEW)
    tokens, logits, _, _ = generate_with_logits(compiled(backbone, None), ids, pixels, mask, NEW)
    assert torch.equal(tokens, want_tokens)
    assert (logits - want_logits).abs().max().item() <= TOL


@pytest.mark.parametrize("passes", ["fastv", "fitprune"])
def test_pruned_prefill_and_generation_equal_the_window_aware_reference(backbone, passes):
    if passes == "fastv":
        cm = compiled(backbone, "fastv:k=2,r=0.5")
    else:
        cm = _fitted(backbone)
    seen = masked_key_check(cm, backbone, "mid_pad_b2")
    assert seen["program"].rewrites and seen["diff"] <= TOL
    ids, pixels, mask = prompt(backbone, "mid_pad_b2", seed=2)
    assert_matches_oracle(cm, ids, pixels, mask)


@functools.lru_cache(maxsize=None)
def _fitted(name):
    return compile_pruned(adapter(name), "fitprune:budget=0.5,samples=6", calibration="synthetic", progress=False)


def test_decode_step_applies_the_window_of_each_layer():
    """The decode graph compares key indices with the window of its own layer: Qwen2's full layers have no window
    term, its windowed layers do."""
    cm = compiled("tiny-qwen2", None)
    step = cm.executable(16).step_stage().stage.module
    subs = {layer: [n for n in step.graph.nodes if n.meta.get("vt_layer") == layer
                    and n.target is torch.ops.aten.sub.Tensor and n.args[1] == 20] for layer in range(4)}
    assert [bool(subs[layer]) for layer in range(4)] == [False, False, True, True]


def _llava_with(text_config):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from vtcompile.models.presets import _TINY_LLAVA, _TINY_VISION

    config = LlavaConfig(vision_config=CLIPVisionConfig(**_TINY_VISION), text_config=text_config, **_TINY_LLAVA)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_gemma2_is_refused_with_the_field_named():
    from transformers import Gemma2Config

    model = _llava_with(Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128))
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping"):
        compile_pruned(model)
    no_softcap = _llava_with(Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                          attn_logit_softcapping=None, final_logit_softcapping=None))
    with pytest.raises(UnsupportedModelError, match="pre_feedforward_layernorm"):  # its sandwich norms
        adapt(no_softcap, ModelSpec(name="gemma2", source="in-memory"))


def test_unexpressible_layer_types_are_refused():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = _llava_with(config)
    model.config.text_config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match=r"layer_types\[1\]"):
        adapt(model, ModelSpec(name="x", source="in-memory"))


def test_a_model_no_family_wraps_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(Exception, match="LlavaForConditionalGeneration"):
        compile_pruned(model)


def test_backbone_presets_load_and_name_their_backbone():
    for name, lm in (("tiny-mistral", "MistralModel"), ("tiny-qwen2", "Qwen2Model"), ("tiny-gemma", "GemmaModel")):
        assert type(load_model(name).language_model).__name__ == lm

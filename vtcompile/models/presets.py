"""Named model presets: real LLaVA-1.5 and Qwen2-VL / Qwen2.5-VL geometries, and tiny random ones for tests."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hf_repo: str | None  # where a local checkpoint of this preset is looked for (HF cache layout)
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # the decoder LM's config; model_type picks its class (default llama)
    llava: dict = field(default_factory=dict)  # the multimodal config's own fields (LlavaConfig, Qwen2VLConfig)
    family: str = "llava"  # "llava", "qwen2-vl" or "qwen2.5-vl": which transformers classes build it
    random_only: bool = False  # tiny presets exist only with random weights
    shipped: bool = False  # the checkpoint ships inside the package (the testbed)
    default_dtype: str = "float32"


_CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
_LLAVA15 = dict(
    image_token_id=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
    vision_feature_select_strategy="default", image_seq_length=576, pad_token_id=32001,
)

_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8, projection_dim=32)
_TINY_LLAVA = dict(image_token_id=127, projector_hidden_act="gelu", vision_feature_layer=-2,
                   vision_feature_select_strategy="default", image_seq_length=16, pad_token_id=0)


# Qwen2-VL / Qwen2.5-VL: the token ids of the published checkpoints; the tiny presets renumber them into their vocab.
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)
_TINY_QWEN_IDS = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
_QWEN_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)
_QWEN25_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
_TINY_QWEN_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=160, max_position_embeddings=512, bos_token_id=154,
                       eos_token_id=155,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def _llama(d: int, m: int, layers: int, heads: int, kv_heads: int, vocab: int, max_pos: int) -> dict:
    return dict(hidden_size=d, intermediate_size=m, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=max_pos)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="llava-1.5-7b",
            description="LLaVA-1.5 7B (CLIP ViT-L/336 + Vicuna-7B), 576 visual tokens, 32 layers",
            hf_repo="llava-hf/llava-1.5-7b-hf",
            vision=_CLIP_L_336,
            text=dict(_llama(4096, 11008, 32, 32, 32, 32064, 4096), rms_norm_eps=1e-5),
            llava=_LLAVA15,
            default_dtype="bfloat16",
        ),
        Preset(
            name="llava-1.5-13b",
            description="LLaVA-1.5 13B (CLIP ViT-L/336 + Vicuna-13B), 576 visual tokens, 40 layers",
            hf_repo="llava-hf/llava-1.5-13b-hf",
            vision=_CLIP_L_336,
            text=dict(_llama(5120, 13824, 40, 40, 40, 32064, 4096), rms_norm_eps=1e-5),
            llava=_LLAVA15,
            default_dtype="bfloat16",
        ),
        Preset(
            name="testbed",
            description="the shipped testbed: a small LLaVA trained on synthetic scenes (real weights, processor)",
            hf_repo=None,
            shipped=True,
        ),
        Preset(
            name="tiny",
            description="tiny random LLaVA for tests: 16 visual tokens, 4 layers, MHA (random weights only)",
            hf_repo=None,
            vision=_TINY_VISION,
            text=_llama(64, 128, 4, 4, 4, 128, 512),
            llava=_TINY_LLAVA,
            random_only=True,
        ),
        Preset(
            name="tiny-gqa",
            description="tiny random LLaVA for tests: 16 visual tokens, 4 layers, GQA 4q/2kv (random weights only)",
            hf_repo=None,
            vision=_TINY_VISION,
            text=_llama(64, 128, 4, 4, 2, 128, 512),
            llava=_TINY_LLAVA,
            random_only=True,
        ),
        # Backbones other than Llama, each with what makes it differ (tests/unit/test_backbones.py)
        Preset(
            name="tiny-mistral",
            description="tiny random LLaVA, Mistral backbone with a sliding window of 24 keys in every layer, GQA "
                        "(random weights only)",
            hf_repo=None,
            vision=_TINY_VISION,
            text=dict(_llama(64, 128, 4, 4, 2, 128, 512), model_type="mistral", sliding_window=24),
            llava=_TINY_LLAVA,
            random_only=True,
        ),
        Preset(
            name="tiny-qwen2",
            description="tiny random LLaVA, Qwen2 backbone (q/k/v biases), layers 0-1 full attention and 2-3 a "
                        "sliding window of 20 keys, GQA (random weights only)",
            hf_repo=None,
            vision=_TINY_VISION,
            text=dict(_llama(64, 128, 4, 4, 2, 128, 512), model_type="qwen2", use_sliding_window=True,
                      sliding_window=20, max_window_layers=2),
            llava=_TINY_LLAVA,
            random_only=True,
        ),
        Preset(
            name="tiny-gemma",
            description="tiny random LLaVA, Gemma backbone (scaled embeddings, GeGLU, head_dim 32 != hidden/heads), "
                        "GQA (random weights only)",
            hf_repo=None,
            vision=_TINY_VISION,
            text=dict(_llama(64, 128, 4, 4, 2, 128, 512), model_type="gemma", head_dim=32),
            llava=_TINY_LLAVA,
            random_only=True,
        ),
        Preset(
            name="qwen2-vl-2b",
            description="Qwen2-VL 2B (ViT-675M with 2x2 merger + Qwen2-1.5B), dynamic resolution: 256 visual tokens "
                        "at 448x448, 28 layers, GQA 12q/2kv",
            hf_repo="Qwen/Qwen2-VL-2B-Instruct",
            vision=dict(_QWEN_VISION, hidden_size=1536),
            text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                       "mrope_section": [16, 24, 24]}),
            llava=dict(_QWEN_IDS, tie_word_embeddings=True),
            family="qwen2-vl",
            default_dtype="bfloat16",
        ),
        Preset(
            name="qwen2.5-vl-7b",
            description="Qwen2.5-VL 7B (ViT with window attention and 2x2 merger + Qwen2.5-7B), dynamic resolution: "
                        "256 visual tokens at 448x448, 28 layers, GQA 28q/4kv",
            hf_repo="Qwen/Qwen2.5-VL-7B-Instruct",
            vision=_QWEN25_VISION_7B,
            text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                       "mrope_section": [16, 24, 24]}),
            llava=_QWEN_IDS,
            family="qwen2.5-vl",
            default_dtype="bfloat16",
        ),
        Preset(
            name="tiny-qwen2-vl",
            description="tiny random Qwen2-VL for tests: M-RoPE, dynamic resolution (4 visual tokens per 56x56), "
                        "4 layers, GQA 4q/2kv (random weights only)",
            hf_repo=None,
            vision=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, reference_image_size=[56, 56]),
            text=_TINY_QWEN_TEXT,
            llava=_TINY_QWEN_IDS,
            family="qwen2-vl",
            random_only=True,
        ),
        Preset(
            name="tiny-qwen2.5-vl",
            description="tiny random Qwen2.5-VL for tests: M-RoPE, dynamic resolution, a vision tower with window "
                        "attention, 4 layers, GQA 4q/2kv (random weights only)",
            hf_repo=None,
            vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                        fullatt_block_indexes=[1], reference_image_size=[56, 56]),
            text=_TINY_QWEN_TEXT,
            llava=_TINY_QWEN_IDS,
            family="qwen2.5-vl",
            random_only=True,
        ),
    ]
}

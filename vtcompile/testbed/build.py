"""Geometry, tokenizer, processor and (de)serialisation of the testbed LLaVA.

The testbed is a real ``LlavaForConditionalGeneration``: a ``CLIPVisionModel`` tower, the LLaVA two-layer
GELU projector and a Llama decoder (GQA, RoPE, SwiGLU, SDPA attention), with real processor files
(``CLIPImageProcessor`` + a ``tokenizers`` WordLevel tokenizer wrapped in ``PreTrainedTokenizerFast`` +
``LlavaProcessor``), so that everything loads with ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` offline, exactly like an llava-hf checkpoint.

Geometry: 96x96 images, 8x8 patches -> 12x12 = 144 visual tokens (the CLS token is dropped by
``vision_feature_select_strategy="default"``). ``vision_feature_layer=-1``: LLaVA-1.5 takes the
penultimate CLIP layer because CLIP's last layer is specialised for its contrastive objective; this tower
is trained from scratch end to end, so its last layer is what the projector is trained on, and -2 would
only ship an untrained, unused layer that every forward computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import scenes

IMAGE_SIZE = scenes.IMAGE_SIZE
PATCH_SIZE = 8
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = SPECIAL_TOKENS

# The chat template of llava-hf/llava-1.5-7b-hf: "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Vision tower (CLIPVisionConfig) and decoder (LlamaConfig) sizes.
VISION = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    num_channels=3,
    projection_dim=128,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    # 0.02 (Llama's default, tuned for d=4096) starts this d=128 decoder with near-uniform attention and a
    # long plateau; ~1/sqrt(d) does not
    initializer_range=0.06,
)


def build_tokenizer():
    """WordLevel tokenizer over the testbed vocabulary; ``<s>`` prepended, lower-cased, punctuation split."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in scenes.vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=512,
    )
    return fast


def build_image_processor():
    from transformers import CLIPImageProcessor

    # Images are generated at IMAGE_SIZE, so resize/crop are identities for testbed images; they make any
    # other image usable. mean/std are the OpenAI CLIP values like LLaVA-1.5.
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def build_processor():
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of the CLIP tower
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size = len(tokenizer)
    vocab_size = (vocab_size + 7) // 8 * 8
    text = LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TEXT,
    )
    vision = CLIPVisionConfig(**VISION)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_VISUAL_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.dtype = "float32"
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(seed: int = 0):
    """A freshly initialised testbed model (random weights) and its processor."""
    import torch
    from transformers import LlavaForConditionalGeneration

    processor = build_processor()
    cfg = build_config(processor.tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def save_checkpoint(model, processor, out_dir: str | os.PathLike, recipe: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if recipe is not None:
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return out


def load(path: str | os.PathLike | None = None, attn_implementation: str = "sdpa"):
    """Load (model, processor) from a testbed checkpoint dir (default: the shipped one), fp32, eval mode."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import checkpoint_dir

    path = Path(path) if path is not None else checkpoint_dir()
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


# ----------------------------------------------------------------------------------------------------
# fast batching (identical to the processor's output; used by training and evaluation)


def pixel_values(images, image_processor=None):
    """Normalise testbed images exactly like ``CLIPImageProcessor`` (no resize needed at IMAGE_SIZE)."""
    import numpy as np
    import torch

    ip = image_processor if image_processor is not None else build_image_processor()
    mean = np.asarray(ip.image_mean, dtype=np.float32)
    std = np.asarray(ip.image_std, dtype=np.float32)
    arrs = []
    for im in images:
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            arrs.append(ip(im, return_tensors="np")["pixel_values"][0])
            continue
        a = np.asarray(im.convert("RGB"), dtype=np.float32) * np.float32(ip.rescale_factor)
        arrs.append(((a - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrs).astype(np.float32))


class PromptEncoder:
    """Token ids of ``format_prompt(question)`` with ``<image>`` expanded, left-padded batches."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.pad_id = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}
        self._answer_cache: dict[str, list[int]] = {}

    def ids(self, question: str) -> list[int]:
        ids = self._cache.get(question)
        if ids is None:
            prompt = scenes.format_prompt(question, IMAGE * NUM_VISUAL_TOKENS)
            ids = self.tok(prompt)["input_ids"]
            self._cache[question] = ids
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens (no special tokens; the eos that ends it is the caller's); refuses unknown words."""
        ids = self._answer_cache.get(answer)
        if ids is None:
            ids = self.tok(answer, add_special_tokens=False)["input_ids"]
            if not ids or self.tok.unk_token_id in ids:
                raise ValueError(f"answer {answer!r} tokenizes to {self.tok.convert_ids_to_tokens(ids)}: empty or "
                                 "with unknown words (scenes.vocabulary() builds the tokenizer's vocabulary)")
            self._answer_cache[answer] = ids
        return ids

    def answer_id(self, answer: str) -> int:
        """The answer's single token (next-token scoring); refuses longer answers."""
        ids = self.answer_ids(answer)
        if len(ids) != 1:
            raise ValueError(f"answer {answer!r} is not a single token: {ids}")
        return ids[0]

    def batch(self, questions):
        import torch

        seqs = [self.ids(q) for q in questions]
        n = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        return input_ids, mask

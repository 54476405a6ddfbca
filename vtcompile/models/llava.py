"""The LLaVA family (models.family): transformers' LlavaForConditionalGeneration.

With models/backbone.py, the only place that knows transformers' LLaVA module layout. It splits the MLLM at its
natural seams for the compiler: the vision stage (tower + projector; the same module live and exported into an
artifact), the merge (image features placed at the image-token positions, data-dependent, kept out of the
exported graph) and the decoder stage (an ``nn.Module`` over ``inputs_embeds`` that torch.export captures).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..compiler.geometry import Geometry
from ..errors import InputError, UnsupportedModelError
from .backbone import attention_windows
from .family import Family, Frontend

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (LLaVA-1.5's processor uses it)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_IMAGES = 64  # the image count an artifact's exported vision stage takes at most


@dataclass(frozen=True)
class ModelSpec:
    """How a model was obtained: enough to rebuild it and to label every report honestly."""

    name: str  # preset name, or the checkpoint directory
    source: str  # "random" | "checkpoint"
    path: str | None = None  # checkpoint directory when source == "checkpoint"
    seed: int = 0  # random-weight seed
    layers: int | None = None  # --layers override (decoder depth)
    dtype: str = "float32"

    @property
    def random_weights(self) -> bool:
        return self.source == "random"

    @property
    def label(self) -> str:
        parts = [self.name]
        if self.layers is not None:
            parts.append(f"{self.layers} layers")
        if self.random_weights:
            parts.append("random weights")
        return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**d)


class DecoderStage(nn.Module):
    """The decoder LM as the compiler captures it.

    Inputs: inputs_embeds [B,S,D], attention_mask [B,S] (1 = token, 0 = padding), position_ids [B,S],
    visual_mask [B,S] (True at image-token positions; used by scorers that passes add).
    Outputs: logits [B,S,V], positions [B,S] (original index of each row) and visual_mask [B,S].
    Token-removing rewrites gather the last two like every other token-axis value, so they report which
    positions were kept and which of those are visual.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.lm = language_model
        self.head = lm_head

    def forward(self, inputs_embeds, attention_mask, position_ids, visual_mask):
        # Bookkeeping values are made first so that they are preamble live-ins of every layer.
        batch, seq = inputs_embeds.shape[0], inputs_embeds.shape[1]
        positions = torch.arange(seq, device=inputs_embeds.device).unsqueeze(0).expand(batch, seq)
        visual = visual_mask.clone()
        hidden = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=self.lm_position_ids(position_ids), use_cache=False).last_hidden_state
        logits = self.head(hidden)
        return logits, positions, visual

    @staticmethod
    def lm_position_ids(position_ids):
        """The seam's position_ids as the language model takes them (1-D RoPE: the same; Qwen2-VL permutes)."""
        return position_ids


class LlavaFrontend(Frontend):
    """LLaVA's front end (models.family.Frontend): a fixed number of visual tokens per image, placed at the image
    tokens of the prompt; 1-D RoPE positions. Built from a live model (LlavaFamily.frontend) or from an
    artifact's stored embeddings and exported vision stage (LlavaFamily.frontend_from_parts)."""

    @property
    def geometry(self) -> Geometry:
        return geometry_from_config(self.config)

    @torch.no_grad()
    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        return dict(zip(("input_ids", "pixel_values", "attention_mask"), example_inputs(self, batch=batch, seed=seed)))

    def check_pixels(self, pixel_values, **images) -> None:
        """pixel_values is [n_images, 3, H, W] at the vision tower's resolution (a raw conv error otherwise)."""
        if pixel_values is None:
            return
        vc = self.config.vision_config
        channels, size = getattr(vc, "num_channels", 3), vc.image_size
        want = f"[n_images, {channels}, {size}, {size}]"
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            found = type(pixel_values).__name__ + (f" of {pixel_values.dtype}" if isinstance(pixel_values, torch.Tensor)
                                                   else "")
            raise InputError(f"pixel_values must be a floating-point tensor {want}, found {found}; the model's "
                             "processor makes them from images")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}, the vision tower takes {want} "
                             f"({channels} channels at {size}x{size}); make them with the model's processor, which "
                             "converts (RGB) and resizes images")

    def plain_image_inputs(self, images: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Each image resized to the tower's square input and CLIP-normalised; a fixed count per image."""
        import numpy as np

        size = self.config.vision_config.image_size
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        pixels = [(torch.from_numpy(np.asarray(im.resize((size, size)), dtype=np.float32) / 255.0).permute(2, 0, 1)
                   - mean) / std for im in images]
        return {"pixel_values": torch.stack(pixels)}, [self.geometry.visual_tokens_per_image] * len(images)

    def merge(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_features: torch.Tensor | None = None, **images):
        """Token embeddings with image features written at the image-token positions.

        Returns (inputs_embeds [B,S,D], visual_mask [B,S] bool). Checks, before any work, that the
        image tokens in input_ids match the images given.
        """
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], found shape {tuple(input_ids.shape)}")
        visual_mask = input_ids == self.image_token_id
        n_tokens = int(visual_mask.sum())
        per_image = self.geometry.visual_tokens_per_image
        images = image_features if image_features is not None else pixel_values
        n_images = 0 if images is None else int(images.shape[0])
        if n_tokens != n_images * per_image:
            raise InputError(
                f"the prompt holds {n_tokens} image tokens (id {self.image_token_id}) but {n_images} image(s) "
                f"were given, which need {n_images * per_image} ({per_image} per image). Expand each <image> "
                f"placeholder into {per_image} image tokens (the model's processor does this) and pass one "
                "pixel_values entry per <image>."
            )
        counts = visual_mask.sum(dim=1)
        if n_tokens and not bool((counts == counts[0]).all()):
            raise InputError(
                f"every batch row must hold the same number of image tokens; found {counts.tolist()}. "
                "Batch prompts with the same number of images together."
            )
        embeds = self.embed_tokens(input_ids)
        if n_tokens:
            feats = image_features if image_features is not None else self.image_features(pixel_values)
            feats = feats.to(embeds.device).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(visual_mask.to(embeds.device).unsqueeze(-1), feats)
        return embeds, visual_mask.to(embeds.device)


class VisionStage(nn.Module):
    """pixel_values [n_images, 3, H, W] -> image features [n_images, N_visual, D] (tower + projector).

    Mirrors LlavaModel.get_image_features (feature layer(s), CLS crop, projector) without its final split
    into a per-image list, which would fix the image count in an export. Only the tower and projector are
    registered, so an export holds their weights and not the decoder's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        self.dtype = model.get_input_embeddings().weight.dtype

    def forward(self, pixel_values):
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.projector(feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1))


def generation_defaults(model: nn.Module) -> dict:
    """eos/pad/bos token ids of a model: its generation_config, else its config."""
    gc = getattr(model, "generation_config", None)
    out = {}
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(gc, key, None) if gc is not None else None
        if value is None:
            value = getattr(model.config, key, None) or getattr(model.config.text_config, key, None)
        out[key] = value
    return out


class LlavaFamily(Family):
    """transformers' LlavaForConditionalGeneration (LLaVA-1.5 and checkpoints with its structure), with any decoder
    LM the backbone protocol accepts (models/backbone.py: Llama, Mistral, Qwen2, Gemma, windowed or not)."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    config_classes = ("LlavaConfig",)

    def __init__(self, model: nn.Module, spec: ModelSpec, processor=None):
        cls = type(model).__name__
        if cls not in self.model_classes:
            raise UnsupportedModelError(
                f"expected a transformers LlavaForConditionalGeneration, found {cls}; vtcompile supports model "
                "family 'llava' (LLaVA-1.5 and checkpoints with its structure)")
        if model.config.text_config._attn_implementation not in (None, "sdpa"):
            # The compiler keeps SDPA; eager attention would materialise the attention maps.
            model.config.text_config._attn_implementation = "sdpa"
        super().__init__(model, spec, processor)
        self._vision = VisionStage(model)
        self._frontend = LlavaFrontend(model.config, model.get_input_embeddings(), self._vision, processor,
                                       generation_defaults(model))

    @property
    def frontend(self) -> LlavaFrontend:
        return self._frontend

    def decoder_stage(self) -> DecoderStage:
        return DecoderStage(self.language_model, self.lm_head)

    def vision_stage(self) -> VisionStage:
        return self._vision

    @classmethod
    def geometry_of(cls, config) -> Geometry:
        return geometry_from_config(config)

    def save_vision(self, directory) -> dict:
        """vision.pt2: the tower + projector torch.export'ed with a dynamic image count."""
        vc = self.config.vision_config
        example = torch.zeros(2, 3, vc.image_size, vc.image_size, dtype=self.dtype, device=self.device)
        images = torch.export.Dim("images", min=1, max=MAX_IMAGES)
        with torch.no_grad():
            exported = torch.export.export(self.vision_stage(), (example,), dynamic_shapes=({0: images},))
        torch.export.save(exported, str(Path(directory) / "vision.pt2"))
        return {"file": "vision.pt2", "inputs": ["pixel_values [n_images,3,H,W]"],
                "outputs": ["image_features [n_images,N_visual,D]"], "dynamic": {"images": [1, MAX_IMAGES]}}

    @classmethod
    def load_vision(cls, config, directory, entry: dict, device: str = "cpu") -> nn.Module:
        return torch.export.load(str(Path(directory) / entry["file"])).module()

    @classmethod
    def frontend_from_parts(cls, config, embed, vision, processor=None, generation=None) -> LlavaFrontend:
        return LlavaFrontend(config, embed, vision, processor, generation)


def example_inputs(adapter: "LlavaFamily | LlavaFrontend", batch: int = 2, n_images: int = 1, text_before: int = 5,
                   text_after: int = 12, pad: int = 3, seed: int = 0):
    """A synthetic prompt batch: random text ids around the image tokens, row b>0 left-padded by `pad`.

    Returns (input_ids, pixel_values, attention_mask). Used by self-checks and tests where no processor or
    data set is at hand; real prompts go through the model's processor.
    """
    g = adapter.geometry
    cfg = adapter.config
    gen = torch.Generator().manual_seed(seed)
    special = {g.image_token_id, getattr(cfg, "pad_token_id", None) or 0}
    vocab = torch.tensor([t for t in range(1, min(g.vocab_size, 32000)) if t not in special])
    rows, masks = [], []
    seq = text_before + n_images * g.visual_tokens_per_image + text_after + pad
    for b in range(batch):
        n_pad = pad if b % 2 else 0
        body = []
        text = vocab[torch.randint(len(vocab), (seq,), generator=gen)].tolist()
        body += text[:text_before]
        for i in range(n_images):
            body += [g.image_token_id] * g.visual_tokens_per_image
            if i < n_images - 1:
                body += text[text_before + i: text_before + i + 2]
        body += text[-(seq - n_pad - len(body)):] if seq - n_pad - len(body) > 0 else []
        body = body[: seq - n_pad]
        rows.append([0] * n_pad + body)
        masks.append([0] * n_pad + [1] * len(body))
    vc = cfg.vision_config
    pixels = torch.randn(batch * n_images, 3, vc.image_size, vc.image_size, generator=gen)
    return torch.tensor(rows), pixels.to(adapter.dtype), torch.tensor(masks)


def geometry_from_config(config) -> Geometry:
    tc = config.text_config
    heads = tc.num_attention_heads
    vc = config.vision_config
    n_patches = (vc.image_size // vc.patch_size) ** 2
    per_image = n_patches if config.vision_feature_select_strategy == "default" else n_patches + 1
    return Geometry(
        family="llava",
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_layers=tc.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        vocab_size=tc.vocab_size,
        visual_tokens_per_image=per_image,
        image_token_id=int(config.image_token_id),
        windows=attention_windows(tc),
        features=("attention_taps", "fixed_image_tokens"),
    )

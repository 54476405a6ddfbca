"""The model-family protocol: everything the compiler and the runtime need to know about a family of MLLMs.

A family (models/llava.py; Qwen2-VL next) is two objects:

- a ``Frontend``: everything of the MLLM but its decoder, the same live and in an artifact - token embeddings,
  the vision stage (ONE module: the one exported into artifacts is the one a live model runs), the merge of
  image features into the prompt, how many visual tokens each image yields, the positions of the prompt and of
  every decode step, the processor (chat format, tokenizer) and the generation defaults;
- a ``Family`` over a live transformers model: its front end, the decoder seam the compiler captures (an
  ``nn.Module`` over inputs_embeds, attention_mask, position_ids, visual_mask), the vision stage to export, the
  modules the masked-key reference runs (language_model, lm_head), and what the family cannot do (refused at
  construction with the config field named).

The attention rule of every layer (causal, sliding window) is read from the config by the backbone
(models/backbone.py) into ``Geometry.windows``; the captured graph, the decode step and the masked-key reference
all take it from there (compiler/attention.py). Passes and compiler/ never name a family: a family lists the
``features`` it provides (Geometry.features), a pass the ones it needs (PassDef.needs).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..compiler.geometry import Geometry
from ..errors import InputError, UnsupportedModelError
from .backbone import check_backbone

# What a family may provide to passes (Geometry.features, PassDef.needs).
FEATURES = {
    "attention_taps": "every decoder layer's attention is one SDPA call whose post-RoPE q/k a scorer can read",
    "fixed_image_tokens": "every image yields the same number of visual tokens, in one contiguous run",
    "image_groups": "the program knows each image's visual tokens in a row: equal counts per image "
                    "(fixed_image_tokens), or - dynamic resolution - rows of one image (a row with several images is "
                    "refused by the passes that need this)",
}


def rope_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D RoPE positions of left-padded prompts: 0.. over real tokens, 1 at padding (as transformers' generate)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class Frontend(ABC):
    """Everything of an MLLM but its decoder (see the module docstring). Built from a live model by its Family,
    or from an artifact's stored parts by ``Family.frontend_from_parts``; the runtime uses both the same way.

    ``image_inputs``: the processor outputs besides input_ids, pixel_values and attention_mask that this family's
    prompts carry (Qwen2-VL: image_grid_thw, mm_token_type_ids); cm(...) and cm.generate(...) take them as keyword
    arguments, exactly as the processor returns them, and hand them to merge, positions and image_features."""

    image_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, embed: nn.Module, vision, processor=None, generation: dict | None = None):
        self.config = config
        self.embed = embed
        self.vision = vision  # the vision stage: pixel_values [n, 3, H, W] -> image features [n, N_visual, D]
        self.processor = processor
        self.generation = dict(generation or {})  # eos_token_id, pad_token_id, bos_token_id

    @property
    @abstractmethod
    def geometry(self) -> Geometry:
        """The decoder's static facts (sizes, attention windows, features)."""

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", None)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence (prompt + new tokens) the decoder's positions cover, if the config says."""
        return getattr(self.config.text_config, "max_position_embeddings", None)

    @torch.no_grad()
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids.to(self.device))

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, **images) -> torch.Tensor:
        """The vision stage on a prompt batch's images (``images``: the family's image_inputs)."""
        return self.vision(pixel_values.to(device=self.device, dtype=self.dtype))

    @abstractmethod
    def check_pixels(self, pixel_values, **images) -> None:
        """Refuse (InputError, saying what is expected) pixel_values the vision stage cannot take."""

    @abstractmethod
    def plain_image_inputs(self, images: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Without a processor (tiny random models, `--input-ids`): the image inputs of RGB PIL images, named as the
        processor names them (pixel_values and the family's image_inputs), and each image's visual-token count."""

    @abstractmethod
    def merge(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_features: torch.Tensor | None = None, **images) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [B,S,D], visual_mask [B,S] bool): the prompt's token embeddings with the image features
        written at the image-token positions; checks the image tokens against the images given. image_features:
        `self.image_features(pixel_values)` computed beforehand (a server does it where the request arrives), used
        instead of pixel_values."""

    def positions(self, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                  **images) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids of the prompt, [B, 1] position of each row's first new token). 1-D RoPE here; a family
        with another numbering (M-RoPE) overrides this and ``step_positions``."""
        return rope_positions(attention_mask), attention_mask.long().sum(1, keepdim=True)

    def step_positions(self, position: torch.Tensor) -> torch.Tensor:
        """The decode step's position_ids from each new token's position [B, T] (1-D RoPE: the same)."""
        return position

    @abstractmethod
    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """A synthetic prompt batch in this family's layout (random text around each image's tokens, odd rows
        left-padded), named as the processor names them (input_ids, pixel_values, attention_mask and the family's
        image_inputs), for self-checks and smoke calibration where no processor or data set is at hand."""


class Family(ABC):
    """A live transformers MLLM of one family (see the module docstring)."""

    name: ClassVar[str] = "?"
    model_classes: ClassVar[tuple[str, ...]] = ()  # the transformers classes this family wraps
    config_classes: ClassVar[tuple[str, ...]] = ()  # their config classes (artifacts are matched by config)

    def __init__(self, model: nn.Module, spec, processor=None):
        cls = type(model).__name__
        if cls not in self.model_classes:
            raise UnsupportedModelError(f"family {self.name!r} wraps {', '.join(self.model_classes)}, found {cls}")
        self.model = model.eval()
        self.spec = spec
        self.processor = processor
        self.check()

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    @classmethod
    def model_class_name(cls, config) -> str:
        """The transformers class that builds a model of this config (model_classes pairs with config_classes)."""
        return cls.model_classes[cls.config_classes.index(type(config).__name__)]

    def check(self) -> None:
        """Refuse, naming the config field, what this family cannot compile (raises UnsupportedModelError); by
        default what the backbone protocol cannot express (models/backbone.py)."""
        check_backbone(self.language_model, self.config.text_config)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def geometry(self) -> Geometry:
        return self.frontend.geometry

    @property
    def image_token_id(self) -> int:
        return self.frontend.image_token_id

    @property
    @abstractmethod
    def frontend(self) -> Frontend:
        """The live front end (its vision stage is ``vision_stage()``, the module artifacts export)."""

    @property
    def language_model(self) -> nn.Module:
        """The decoder LM (embeddings scaling, layers under ``.layers``, final norm): what the reference runs
        (transformers' MLLM layout, ``model.model.language_model``; a family laid out otherwise overrides it)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        """hidden states -> logits."""
        return self.model.lm_head

    def lm_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The frontend's position_ids ([B, S], or [B, S, 3] for M-RoPE) as ``language_model`` takes them (what the
        decoder seam does inside the captured graph; the masked-key reference calls the LM directly)."""
        return position_ids

    @abstractmethod
    def decoder_stage(self) -> nn.Module:
        """The seam the compiler captures: forward(inputs_embeds, attention_mask, position_ids, visual_mask) ->
        (logits, positions, visual_mask) (compiler.signature)."""

    @abstractmethod
    def vision_stage(self) -> nn.Module:
        """pixel_values [n_images, 3, H, W] -> image features [n_images, N_visual, D], exportable."""

    @classmethod
    @abstractmethod
    def geometry_of(cls, config) -> Geometry:
        """The Geometry of a config of this family, without weights (FLOPs of published geometries)."""

    @abstractmethod
    def save_vision(self, directory) -> dict:
        """Write the vision stage into an artifact directory; returns its manifest entry ("file" and what loading
        needs), read back by ``load_vision``."""

    @classmethod
    @abstractmethod
    def load_vision(cls, config, directory, entry: dict, device: str = "cpu") -> nn.Module:
        """The vision stage ``save_vision`` wrote (the same computation as the live one)."""

    @classmethod
    def visual_tokens_for_size(cls, config, height: int, width: int) -> int:
        """Visual tokens of one image of height x width pixels (dynamic-resolution families); a family whose
        processor resizes every image to one size refuses (its count is fixed: Geometry.visual_tokens_per_image)."""
        raise InputError(f"model family {cls.name!r} resizes every image to one size, so the image size does not "
                         "change its visual-token count; leave out the image size (the count is "
                         f"{cls.geometry_of(config).visual_tokens_per_image} per image)")

    @classmethod
    @abstractmethod
    def frontend_from_parts(cls, config, embed: nn.Module, vision, processor=None,
                            generation: dict | None = None) -> Frontend:
        """The front end of an artifact: its stored config, embeddings and exported vision stage."""

    def merge(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_features=None, **images):
        return self.frontend.merge(input_ids, pixel_values, image_features, **images)

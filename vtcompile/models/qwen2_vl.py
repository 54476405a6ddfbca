"""The Qwen2-VL family (models.family): transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration.

What differs from LLaVA, and where it lives:
- dynamic resolution: an image of H x W pixels is (H/p)(W/p) patches of p x p, merged 2 x 2 by the vision stage, so
  it yields (H/p)(W/p)/4 visual tokens - images of different sizes give different counts, in one batch too. The
  processor flattens the patches of every image into pixel_values [n_patches, 3 * t * p * p] and says each image's
  grid in image_grid_thw [n_images, 3]; both go to the vision stage (the same module live and in an artifact);
- M-RoPE: every token has a (temporal, height, width) position. Text tokens count on from the previous token on all
  three axes; an image's tokens take (s, s + row, s + column) with s the position after the text before it, and
  the text after the image continues from the image's largest position + 1 - so a row's positions end below its
  length (its rope delta), and each new token continues the row's own numbering. ``positions`` computes them
  here from input_ids and image_grid_thw (transformers' get_rope_index computes the same; it stays outside the
  captured graph like the merge), as position_ids [B, S, 3]: token axis 1 like every other decoder input, so a
  token selection gathers them with the rest and a kept visual token keeps its ORIGINAL 3-D position. The decoder
  seam turns them into the [3, B, S] the language model takes;
- no CLS token; Qwen2.5-VL's vision tower has window attention (inside the vision stage: nothing to the compiler).
Video inputs (temporal patches > 1) are not taken: a prompt with video tokens is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..compiler.geometry import Geometry
from ..errors import InputError
from .backbone import attention_windows
from .family import Family, Frontend
from .llava import DecoderStage as LlavaDecoderStage
from .llava import ModelSpec, generation_defaults

REFERENCE_IMAGE = (448, 448)  # the image size FLOPs tables and the program built at compile time assume


def reference_image(config) -> tuple[int, int]:
    """The reference image size: 448 x 448, or vtcompile's own vision_config field reference_image_size (the tiny
    test presets set a small one, so that compiling does not build a program for 256 tokens they never use)."""
    size = getattr(config.vision_config, "reference_image_size", None)
    return tuple(size) if size else REFERENCE_IMAGE


class DecoderStage(LlavaDecoderStage):
    """The decoder LM as the compiler captures it (models.llava.DecoderStage's contract), with position_ids [B, S, 3]
    turned into the [3, B, S] M-RoPE positions the language model takes."""

    @staticmethod
    def lm_position_ids(position_ids):
        return position_ids.permute(2, 0, 1)


class VisionStage(nn.Module):
    """(pixel_values [n_patches, 3 * t * p * p], image_grid_thw [n_images, 3]) -> image features [n_tokens, D]: the
    vision tower with its 2 x 2 patch merger, every image's tokens one after the other."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, image_grid_thw):
        return self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output


def tokens_per_image(image_grid_thw: torch.Tensor, merge: int) -> list[int]:
    """Visual tokens of each image: t * h * w patches over the merger's merge x merge groups."""
    return (image_grid_thw.prod(-1) // (merge * merge)).tolist()


def tokens_for_size(config, height: int, width: int) -> int:
    """Visual tokens of an H x W image (sides in pixels, multiples of patch * merge as the processor resizes)."""
    vc = config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise InputError(f"an image of {height}x{width} pixels: this model takes sides that are positive multiples "
                         f"of {unit} (patch {vc.patch_size} x merge {vc.spatial_merge_size}); the processor "
                         "resizes images so")
    return (height // unit) * (width // unit)


class Qwen2VLFrontend(Frontend):
    """Qwen2-VL's front end (see the module docstring); built from a live model or from an artifact's parts."""

    image_inputs = ("image_grid_thw", "mm_token_type_ids")

    @property
    def geometry(self) -> Geometry:
        return geometry_from_config(self.config)

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       **images) -> torch.Tensor:
        if image_grid_thw is None:
            raise InputError("pixel_values of this model need image_grid_thw (each image's patch grid); pass the "
                             "processor's image_grid_thw with them")
        return self.vision(pixel_values.to(device=self.device, dtype=self.dtype), image_grid_thw.to(self.device))

    def check_pixels(self, pixel_values, image_grid_thw=None, **images) -> None:
        if pixel_values is None:
            return
        vc = self.config.vision_config
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        want = (f"[n_patches, {width}] (each image's {vc.patch_size}x{vc.patch_size} patches, flattened by the "
                "processor)")
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise InputError(f"pixel_values must be a floating-point tensor {want}, found "
                             f"{type(pixel_values).__name__}")
        if pixel_values.dim() != 2 or pixel_values.shape[1] != width:
            raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}; this model's vision tower takes "
                             f"{want}. Make them with the model's processor")
        grid = _check_grid(image_grid_thw)
        patches = int(grid.prod(-1).sum())
        if patches != pixel_values.shape[0]:
            raise InputError(f"image_grid_thw {grid.tolist()} describes {patches} patches, pixel_values holds "
                             f"{pixel_values.shape[0]}; pass the processor's outputs together")

    def plain_image_inputs(self, images: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """transformers' PIL image processor of this family (no torchvision needed) with the tower's patch, temporal
        patch and merge sizes: each image resized to multiples of patch x merge pixels within its default pixel
        range, so the count follows the image's size."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        v = self.config.vision_config
        processor = Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                             merge_size=self.merge_size)
        enc = processor(images=list(images), return_tensors="pt")
        grid = enc["image_grid_thw"]
        return {"pixel_values": enc["pixel_values"], "image_grid_thw": grid}, tokens_per_image(grid, self.merge_size)

    def merge(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_features: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
              mm_token_type_ids: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], found shape {tuple(input_ids.shape)}")
        video = getattr(self.config, "video_token_id", None)
        if video is not None and bool((input_ids == video).any()):
            raise InputError("the prompt holds video tokens; vtcompile takes images only for this family (video "
                             "inputs are a known limit)")
        visual_mask = input_ids == self.image_token_id
        runs = self.image_runs(input_ids, image_grid_thw)  # checks the tokens against the grids
        if mm_token_type_ids is not None:
            given = torch.as_tensor(mm_token_type_ids).to(input_ids.device)
            if given.shape != input_ids.shape or not torch.equal(given == 1, visual_mask):
                raise InputError("mm_token_type_ids does not mark the image tokens of input_ids as images (1); pass "
                                 "the processor's outputs together, unchanged")
        embeds = self.embed_tokens(input_ids)
        if runs:
            if image_features is None:
                if pixel_values is None:
                    raise InputError(f"the prompt holds {len(runs)} image(s) but no pixel_values were given")
                image_features = self.image_features(pixel_values, image_grid_thw)
            feats = image_features.to(embeds.device).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            if feats.shape[0] != int(visual_mask.sum()):
                raise InputError(f"{feats.shape[0]} image features for {int(visual_mask.sum())} image tokens")
            embeds = embeds.masked_scatter(visual_mask.to(embeds.device).unsqueeze(-1), feats)
        return embeds, visual_mask.to(embeds.device)

    def image_runs(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> list[tuple]:
        """(row, start, grid (t, h, w) after the merger) of every image in the batch, rows in order and images in
        order within a row - the order the processor lists image_grid_thw in. Checks every run's length."""
        visual = (input_ids == self.image_token_id).cpu()
        n_tokens = int(visual.sum())
        if n_tokens == 0:
            if image_grid_thw is not None and len(image_grid_thw):
                raise InputError(f"{len(image_grid_thw)} image grid(s) were given but the prompt holds no image "
                                 f"tokens (id {self.image_token_id})")
            return []
        if image_grid_thw is None:
            raise InputError(f"the prompt holds {n_tokens} image tokens; give the processor's image_grid_thw (each "
                             "image's patch grid) with pixel_values")
        grid = _check_grid(image_grid_thw)
        counts = tokens_per_image(grid, self.merge_size)
        if sum(counts) != n_tokens:
            raise InputError(f"the prompt holds {n_tokens} image tokens (id {self.image_token_id}), the "
                             f"{len(counts)} image grid(s) {grid.tolist()} need {sum(counts)} ({counts} per image). "
                             "Expand each image placeholder with the model's processor")
        runs, image = [], 0
        for row in range(visual.shape[0]):
            index = visual[row].nonzero().flatten().tolist()
            i = 0
            while i < len(index):
                if image >= len(counts):
                    raise InputError("the prompt holds more image runs than image_grid_thw lists")
                n = counts[image]
                span = index[i:i + n]
                if len(span) < n or span[-1] - span[0] != n - 1:
                    raise InputError(f"image {image} needs {n} consecutive image tokens in row {row}; found a run "
                                     "that does not match. Expand each image placeholder with the model's processor")
                t, h, w = (int(x) for x in grid[image])
                runs.append((row, span[0], (t, h // self.merge_size, w // self.merge_size)))
                i += n
                image += 1
        return runs

    def positions(self, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                  image_grid_thw: torch.Tensor | None = None, **images) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions [B, S, 3] of left-padded prompts (see the module docstring; padding: 0) and each row's
        first new position [B, 1] (its largest position + 1)."""
        batch, seq = attention_mask.shape
        mask = attention_mask.bool().cpu()
        pos = torch.zeros(batch, seq, 3, dtype=torch.long)
        runs: dict[int, list] = {}
        if input_ids is not None:
            for row, start, grid in self.image_runs(input_ids, image_grid_thw):
                runs.setdefault(row, []).append((start, grid))
        for row in range(batch):
            at = int((~mask[row]).sum())  # first real token (left padding)
            current = 0
            for start, (t, h, w) in runs.get(row, []):
                text = start - at
                pos[row, at:start] = (torch.arange(text) + current)[:, None]
                current += text
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pos[row, start:start + t * h * w] = torch.stack([tt, hh, ww], -1).reshape(-1, 3) + current
                current += max(h, w)
                at = start + t * h * w
            pos[row, at:] = (torch.arange(seq - at) + current)[:, None]
        nxt = pos.amax(dim=(1, 2)).unsqueeze(1) + 1
        device = attention_mask.device
        return pos.to(device), nxt.to(device)

    def step_positions(self, position: torch.Tensor) -> torch.Tensor:
        """A new token's position is the same on all three axes."""
        return position.unsqueeze(-1).expand(*position.shape, 3).contiguous()  # compiled steps take dense inputs

    @torch.no_grad()
    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        ids, pixels, mask, grid = example_inputs(self, batch=batch, seed=seed)
        return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, image_grid_thw=grid)


def _check_grid(image_grid_thw) -> torch.Tensor:
    if not isinstance(image_grid_thw, torch.Tensor) or image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        found = tuple(image_grid_thw.shape) if isinstance(image_grid_thw, torch.Tensor) else type(image_grid_thw).__name__
        raise InputError(f"image_grid_thw must be an integer tensor [n_images, 3] (t, h, w patches), found {found}")
    grid = image_grid_thw.long().cpu()
    if bool((grid[:, 0] != 1).any()):
        raise InputError("image_grid_thw has a temporal size other than 1 (a video); this family takes images only")
    return grid


class Qwen2VLFamily(Family):
    """transformers' Qwen2-VL and Qwen2.5-VL (see the module docstring)."""

    name = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    config_classes = ("Qwen2VLConfig", "Qwen2_5_VLConfig")

    def __init__(self, model: nn.Module, spec: ModelSpec, processor=None):
        super().__init__(model, spec, processor)
        model.config.text_config._attn_implementation = "sdpa"  # the compiler keeps SDPA
        self._vision = VisionStage(model.model.visual)
        self._frontend = Qwen2VLFrontend(model.config, model.get_input_embeddings(), self._vision, processor,
                                         generation_defaults(model))

    @property
    def frontend(self) -> Qwen2VLFrontend:
        return self._frontend

    def lm_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return DecoderStage.lm_position_ids(position_ids)  # what the captured seam does

    def decoder_stage(self) -> DecoderStage:
        return DecoderStage(self.language_model, self.lm_head)

    def vision_stage(self) -> VisionStage:
        return self._vision

    @classmethod
    def geometry_of(cls, config) -> Geometry:
        return geometry_from_config(config)

    @classmethod
    def visual_tokens_for_size(cls, config, height: int, width: int) -> int:
        return tokens_for_size(config, height, width)

    def save_vision(self, directory) -> dict:
        """vision.safetensors: the vision tower's weights, rebuilt at load from the stored config by transformers'
        own class. Not an exported graph: the tower's attention spans and rotary positions are computed from the
        patch grids' VALUES (image_grid_thw, .tolist() inside transformers), which torch.export cannot keep symbolic;
        loading still compiles nothing."""
        from safetensors.torch import save_file

        weights = {k: v.detach().contiguous() for k, v in self.model.model.visual.state_dict().items()}
        save_file(weights, str(Path(directory) / "vision.safetensors"))
        return {"file": "vision.safetensors", "kind": "weights", "class": type(self.model.model.visual).__name__,
                "dtype": str(self.dtype).replace("torch.", ""),
                "inputs": ["pixel_values [n_patches, 3*t*p*p]", "image_grid_thw [n_images, 3]"],
                "outputs": ["image_features [n_visual_tokens, D]"]}

    @classmethod
    def load_vision(cls, config, directory, entry: dict, device: str = "cpu") -> nn.Module:
        import importlib

        from safetensors.torch import load_file

        module = "qwen2_5_vl" if type(config).__name__ == "Qwen2_5_VLConfig" else "qwen2_vl"
        tower_class = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), entry["class"])
        config.vision_config._attn_implementation = "sdpa"
        tower = tower_class._from_config(config.vision_config, dtype=getattr(torch, entry["dtype"]))
        tower.load_state_dict(load_file(str(Path(directory) / entry["file"]), device=str(device)))
        return VisionStage(tower.to(device).eval())

    @classmethod
    def frontend_from_parts(cls, config, embed, vision, processor=None, generation=None) -> Qwen2VLFrontend:
        return Qwen2VLFrontend(config, embed, vision, processor, generation)


def geometry_from_config(config, image_size: tuple[int, int] | None = None) -> Geometry:
    """The decoder's geometry; visual_tokens_per_image is that of an image of `image_size` (default: the reference
    image; counts vary with the size: the programs are built per count)."""
    tc = config.text_config
    heads = tc.num_attention_heads
    return Geometry(
        family="qwen2-vl",
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_layers=tc.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        vocab_size=tc.vocab_size,
        visual_tokens_per_image=tokens_for_size(config, *(image_size or reference_image(config))),
        image_token_id=int(config.image_token_id),
        windows=attention_windows(tc),
        features=("attention_taps", "image_groups"),
        position_axes=3,
    )


def example_inputs(adapter, batch: int = 2, sizes: list[tuple[int, int]] | None = None, text_before: int = 5,
                   text_after: int = 9, seed: int = 0):
    """A synthetic prompt batch: row b holds one image of sizes[b] (pixels; default: every row the reference size)
    between random text, rows left-padded to the longest. Returns (input_ids, pixel_values, attention_mask,
    image_grid_thw) - pixel_values flattened into patches as the processor makes them."""
    cfg = adapter.config
    vc = cfg.vision_config
    g = adapter.geometry
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or [reference_image(cfg)] * batch
    special = {g.image_token_id, getattr(cfg, "video_token_id", None), getattr(cfg, "vision_start_token_id", None),
               getattr(cfg, "vision_end_token_id", None)}
    vocab = torch.tensor([t for t in range(1, min(g.vocab_size, 32000)) if t not in special])
    bodies, grids = [], []
    for h, w in sizes[:batch]:
        n = tokens_for_size(cfg, h, w)
        text = vocab[torch.randint(len(vocab), (text_before + text_after,), generator=gen)].tolist()
        bodies.append(text[:text_before] + [g.image_token_id] * n + text[text_before:])
        grids.append([1, h // vc.patch_size, w // vc.patch_size])
    seq = max(len(b) for b in bodies) + (1 if batch > 1 else 0)  # odd rows padded at least by one
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, body in enumerate(bodies):
        body = body if b % 2 == 0 or len(body) < seq else body[1:]
        pad = seq - len(body)
        if b % 2 == 0 and pad:  # even rows fill the length with text at the front
            body = vocab[torch.randint(len(vocab), (pad,), generator=gen)].tolist() + body
            pad = 0
        ids[b, pad:] = torch.tensor(body)
        mask[b, pad:] = 1
    grid = torch.tensor(grids, dtype=torch.long)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=gen).to(adapter.dtype)
    return ids, pixels, mask, grid

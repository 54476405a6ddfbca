"""The static shape facts of a decoder that analyses and FLOPs need (no weights)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Geometry:
    """Decoder-LM geometry of an MLLM plus the visual-token facts of its image encoder."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    visual_tokens_per_image: int
    image_token_id: int
    # Per decoder layer: its sliding attention window (None: plain causal), as the family reads it from the config
    # (compiler.attention). Empty: every layer is causal.
    windows: tuple = ()
    # What the family provides that passes may need (PassDef.needs), e.g. "attention_taps", "fixed_image_tokens".
    features: tuple = ()
    # RoPE position axes per token: 1 (position_ids [B, S]) or 3 for M-RoPE (temporal, height, width: position_ids
    # [B, S, 3], token axis 1 like every other input; the family's decoder seam turns them into what its LM takes).
    position_axes: int = 1

    def __post_init__(self):
        object.__setattr__(self, "windows", tuple(self.windows))
        object.__setattr__(self, "features", tuple(self.features))
        if self.windows and len(self.windows) != self.num_layers:
            raise ValueError(f"{len(self.windows)} attention windows for {self.num_layers} layers")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: causal over every earlier key)."""
        return self.windows[layer] if self.windows else None

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"], d["features"] = list(self.windows), list(self.features)
        if self.position_axes == 1:  # 1-D RoPE: left out, so geometries (and config hashes) from before it match
            del d["position_axes"]
        return d

    def config_hash(self) -> str:
        """Stable hash used by manifests and recipes to refuse another model's artifacts."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

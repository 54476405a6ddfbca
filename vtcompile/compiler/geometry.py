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

    def to_dict(self) -> dict:
        return asdict(self)

    def config_hash(self) -> str:
        """Stable hash used by manifests and recipes to refuse another model's artifacts."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

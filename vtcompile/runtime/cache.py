"""Per-layer KV caches for decoding after a pruned prefill.

Each layer's cache holds exactly the keys its attention saw in prefill (compiler.signature: k_l, v_l,
key_positions_l), so layers have caches of different lengths (P_l) and, after head slicing, different head
counts: shapes come from the prefill outputs, never from a global constant. The cache is preallocated once per
generate call with room for the new tokens (P_l + max_new) and written in place by the decode step at slot
write_index[l]; key_valid marks the slots that hold real keys (padding rows and, after a DyVTE exit in some
rows, the slots other rows kept are invalid).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.signature import Signature


@dataclass
class KVCache:
    layers: list[int]
    keys: list[torch.Tensor]  # per layer [B, H_kv, P_l + new, hd]
    values: list[torch.Tensor]
    valid: list[torch.Tensor]  # per layer [B, P_l + new] bool (the new slots are valid; causality masks the future)
    write_index: torch.Tensor  # [L] long: the slot the next token is written to, per layer
    prompt_lengths: list[int]  # P_l

    @classmethod
    @torch.no_grad()
    def from_prefill(cls, values: dict, signature: Signature, attention_mask: torch.Tensor,
                     new_tokens: int) -> "KVCache":
        layers = signature.cache_layers()
        keys, vals, valid, lengths = [], [], [], []
        for layer in layers:
            k, v, pos = values[f"k_{layer}"], values[f"v_{layer}"], values[f"key_positions_{layer}"]
            batch, heads, length, dim = k.shape
            kc = k.new_zeros(batch, heads, length + new_tokens, dim)  # zeros: unwritten slots meet 0 weights
            vc = v.new_zeros(batch, v.shape[1], length + new_tokens, v.shape[3])
            kc[:, :, :length] = k
            vc[:, :, :length] = v
            ok = torch.ones(batch, length + new_tokens, dtype=torch.bool, device=k.device)
            real = torch.gather(attention_mask.to(pos.device), 1, pos.clamp(min=0)).bool() & (pos >= 0)
            ok[:, :length] = real
            keys.append(kc), vals.append(vc), valid.append(ok), lengths.append(length)
        device = keys[0].device if keys else attention_mask.device
        return cls(layers, keys, vals, valid, torch.tensor(lengths, dtype=torch.long, device=device), lengths)

    def inputs(self) -> list[torch.Tensor]:
        """The caches in decode-signature order: k_cache_l, v_cache_l, key_valid_l per layer."""
        return [t for k, v, m in zip(self.keys, self.values, self.valid) for t in (k, v, m)]

    def advance(self, n: int = 1) -> None:
        self.write_index += n

    def replace(self, written: list[torch.Tensor]) -> None:
        """Keep the caches a functional decode step returned (k_cache_l, v_cache_l per layer, in order)."""
        self.keys, self.values = list(written[0::2]), list(written[1::2])

    def prompt_bytes(self) -> dict[int, int]:
        """Per layer: bytes of the K and V the prompt left in the cache (all rows, padding slots included)."""
        return {layer: (k[:, :, :p].nelement() + v[:, :, :p].nelement()) * k.element_size()
                for layer, k, v, p in zip(self.layers, self.keys, self.values, self.prompt_lengths)}

    def allocated_bytes(self) -> int:
        return sum((k.nelement() + v.nelement()) * k.element_size() for k, v in zip(self.keys, self.values))

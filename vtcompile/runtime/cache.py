"""Per-layer KV caches for decoding after a pruned prefill.

Each layer's cache holds exactly the keys its attention saw in prefill (compiler.signature: k_l, v_l,
key_positions_l), so layers have caches of different lengths (P_l) and, after head slicing, different head
counts: shapes come from the prefill outputs, never from a global constant. The cache is preallocated once per
generate call with room for the new tokens (P_l + max_new) and written in place by the decode step at slot
write_index[l]. key_index holds, per slot, the ORIGINAL sequence index of the key there (-1: padding, a slot
another row's branch kept, or a slot not written yet); the decode step compares it with the new token's index
under the layer's attention rule (compiler.attention), so windows count original positions whatever was pruned.
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
    index: list[torch.Tensor]  # per layer [B, P_l + new] long: the sequence index of each slot's key (-1: none)
    write_index: torch.Tensor  # [L] long: the slot the next token is written to, per layer
    prompt_lengths: list[int]  # P_l

    @classmethod
    @torch.no_grad()
    def from_prefill(cls, values: dict, signature: Signature, attention_mask: torch.Tensor,
                     new_tokens: int) -> "KVCache":
        layers = signature.cache_layers()
        keys, vals, index, lengths = [], [], [], []
        for layer in layers:
            k, v, pos = values[f"k_{layer}"], values[f"v_{layer}"], values[f"key_positions_{layer}"]
            batch, heads, length, dim = k.shape
            kc = k.new_zeros(batch, heads, length + new_tokens, dim)  # zeros: unwritten slots meet 0 weights
            vc = v.new_zeros(batch, v.shape[1], length + new_tokens, v.shape[3])
            kc[:, :, :length] = k
            vc[:, :, :length] = v
            idx = torch.full((batch, length + new_tokens), -1, dtype=torch.long, device=k.device)
            real = torch.gather(attention_mask.to(pos.device), 1, pos.clamp(min=0)).bool() & (pos >= 0)
            idx[:, :length] = torch.where(real, pos, -1)
            keys.append(kc), vals.append(vc), index.append(idx), lengths.append(length)
        device = keys[0].device if keys else attention_mask.device
        return cls(layers, keys, vals, index, torch.tensor(lengths, dtype=torch.long, device=device), lengths)

    def inputs(self) -> list[torch.Tensor]:
        """The caches in decode-signature order: k_cache_l, v_cache_l, key_index_l per layer."""
        return [t for k, v, i in zip(self.keys, self.values, self.index) for t in (k, v, i)]

    def advance(self, n: int = 1) -> None:
        self.write_index += n

    def replace(self, written: list[torch.Tensor]) -> None:
        """Keep the caches a functional decode step returned (k_cache_l, v_cache_l, key_index_l per layer)."""
        self.keys, self.values, self.index = list(written[0::3]), list(written[1::3]), list(written[2::3])

    def prompt_bytes(self) -> dict[int, int]:
        """Per layer: bytes of the K and V the prompt left in the cache (all rows, padding slots included)."""
        return {layer: (k[:, :, :p].nelement() + v[:, :, :p].nelement()) * k.element_size()
                for layer, k, v, p in zip(self.layers, self.keys, self.values, self.prompt_lengths)}

    def allocated_bytes(self) -> int:
        return sum((k.nelement() + v.nelement()) * k.element_size() for k, v in zip(self.keys, self.values))

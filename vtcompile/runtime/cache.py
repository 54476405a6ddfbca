"""Per-layer KV caches for decoding after a pruned prefill.

Each layer's cache holds exactly the keys its attention saw in prefill (compiler.signature: k_l, v_l,
key_positions_l), so layers have caches of different lengths (P_l) and, after head slicing, different head
counts: shapes come from the prefill outputs, never from a global constant. The cache is preallocated once per
generate call with room for the new tokens (P_l + max_new) - or taken from a CachePool that kept the buffers of an
earlier call of the same shapes (gpt-fast's static cache: no allocation per call) - and written in place by the
decode step at slot
write_index[l]. key_index holds, per slot, the ORIGINAL sequence index of the key there (-1: padding, a slot
another row's branch kept, or a slot not written yet); the decode step compares it with the new token's index
under the layer's attention rule (compiler.attention), so windows count original positions whatever was pruned.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
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
    pool_key: tuple = ()  # the shapes this cache's buffers go back to a CachePool under

    @classmethod
    @torch.no_grad()
    def from_prefill(cls, values: dict, signature: Signature, attention_mask: torch.Tensor,
                     new_tokens: int, pool: "CachePool | None" = None) -> "KVCache":
        """The caches of a prefill's outputs with room for `new_tokens`; the buffers come from `pool` when it kept
        some of these shapes (slots past the prompt then hold an earlier call's keys and values: key_index -1 masks
        them, as it masks the zeros of a new buffer)."""
        layers = signature.cache_layers()
        ks = [values[f"k_{layer}"] for layer in layers]
        vs = [values[f"v_{layer}"] for layer in layers]
        key = (new_tokens, *((tuple(k.shape), tuple(v.shape), k.dtype, k.device) for k, v in zip(ks, vs)))
        buffers = pool.take(key) if pool is not None else None
        keys, vals, index, lengths = [], [], [], []
        for i, layer in enumerate(layers):
            k, v, pos = ks[i], vs[i], values[f"key_positions_{layer}"]
            batch, heads, length, dim = k.shape
            if buffers is None:
                kc = k.new_zeros(batch, heads, length + new_tokens, dim)  # zeros: unwritten slots meet 0 weights
                vc = v.new_zeros(batch, v.shape[1], length + new_tokens, v.shape[3])
                idx = torch.full((batch, length + new_tokens), -1, dtype=torch.long, device=k.device)
            else:
                kc, vc, idx = buffers[0][i], buffers[1][i], buffers[2][i]
                idx.fill_(-1)  # the earlier call's new-token indices (later than any query here, but not ours)
            kc[:, :, :length] = k
            vc[:, :, :length] = v
            real = torch.gather(attention_mask.to(pos.device), 1, pos.clamp(min=0)).bool() & (pos >= 0)
            idx[:, :length] = torch.where(real, pos, -1)
            keys.append(kc), vals.append(vc), index.append(idx), lengths.append(length)
        device = keys[0].device if keys else attention_mask.device
        return cls(layers, keys, vals, index, torch.tensor(lengths, dtype=torch.long, device=device), key)

    def release(self, pool: "CachePool | None") -> None:
        """Hand the buffers back to `pool` for the next call of the same shapes (the cache is not used after)."""
        if pool is not None and self.keys:
            pool.give(self.pool_key, (self.keys, self.values, self.index))

    def inputs(self) -> list[torch.Tensor]:
        """The caches in decode-signature order: k_cache_l, v_cache_l, key_index_l per layer."""
        return [t for k, v, i in zip(self.keys, self.values, self.index) for t in (k, v, i)]

    def advance(self, n: int = 1) -> None:
        self.write_index += n

    def replace(self, written: list[torch.Tensor]) -> None:
        """Keep the caches a functional decode step returned (k_cache_l, v_cache_l, key_index_l per layer)."""
        self.keys, self.values, self.index = list(written[0::3]), list(written[1::3]), list(written[2::3])

    def allocated_bytes(self) -> int:
        return sum((k.nelement() + v.nelement()) * k.element_size() for k, v in zip(self.keys, self.values))


def prefill_bytes(values: dict, signature: Signature) -> dict[int, int]:
    """Per layer: bytes of the K and V a prefill left for the cache (all rows, padding slots included), without
    building the cache."""
    return {layer: (values[f"k_{layer}"].nelement() + values[f"v_{layer}"].nelement())
            * values[f"k_{layer}"].element_size() for layer in signature.cache_layers()}


class CachePool:
    """Cache buffers kept between generate calls, by shape (gpt-fast allocates its cache once; here the shapes follow
    each call's batch, pruned prompt lengths and max_new_tokens, so the last `keep` shapes are kept). A call takes
    its buffers out and gives them back when it ends, so two calls running at once never share one."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key):
        with self._lock:
            return self._free.pop(key, None)

    def give(self, key, buffers) -> None:
        with self._lock:
            self._free[key] = buffers
            self._free.move_to_end(key)
            while len(self._free) > self.keep:
                self._free.popitem(last=False)

    def __len__(self) -> int:
        return len(self._free)

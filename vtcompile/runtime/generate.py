"""generate: pruned prefill, then one compiled decode step per new token over per-layer KV caches.

Semantics (DESIGN.md, Generation): new tokens are never pruned; they attend to each layer's own cache (the tokens
that layer's attention saw in prefill, then the new tokens) and continue the ORIGINAL position numbering per row
(a row of n real prompt tokens puts its first new token at position n, whatever was pruned), so every step equals
the unmodified model with the same per-layer key masks over the prompt. Greedy by default; sampling with
temperature / top-k / top-p from a torch.Generator. Rows that produced eos are padded with pad_token_id; the call
stops early when every row has ended.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError
from .cache import CachePool, KVCache, prefill_bytes
from .executor import PrefillResult
from .inputs import PreparedInputs


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, found {self.max_new_tokens!r}")
        if self.do_sample:
            if not self.temperature > 0:
                raise InputError(f"temperature must be > 0 when sampling, found {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise InputError(f"top_p must be in (0, 1], found {self.top_p}")
            if self.top_k < 0:
                raise InputError(f"top_k must be >= 0 (0: off), found {self.top_k}")


@dataclass
class GenerationStats:
    """Timing and memory of the last generate call. The timings never include compilation: a first call that
    compiles (or loads) stages gives those seconds apart, and CompiledModel.generate takes them out of the timings."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0  # steps taken (the longest row)
    ttft_seconds: float = 0.0  # vision + merge + prefill + first token
    decode_seconds: float = 0.0  # every decode step after the first token
    compile_seconds: float = 0.0  # compiling stages during the call (not in the timings above)
    load_seconds: float = 0.0  # loading stored stages at their first use (not in the timings above)
    kv_prompt_bytes: dict[int, int] = field(default_factory=dict)  # per layer, after prefill
    kv_allocated_bytes: int = 0
    exit_layers: list[int] | None = None

    @property
    def decode_ms_per_token(self) -> float:
        steps = max(0, self.new_tokens - 1)
        return 1e3 * self.decode_seconds / steps if steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over the batch (tokens after the first, all rows)."""
        steps = max(0, self.new_tokens - 1)
        return steps * self.batch / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"batch": self.batch, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "ttft_seconds": self.ttft_seconds, "decode_seconds": self.decode_seconds,
                "decode_ms_per_token": self.decode_ms_per_token, "tokens_per_second": self.tokens_per_second,
                "kv_prompt_bytes": sum(self.kv_prompt_bytes.values()), "kv_allocated_bytes": self.kv_allocated_bytes,
                "exit_layers": self.exit_layers, "compile_seconds": self.compile_seconds,
                "load_seconds": self.load_seconds}


def next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (greedy, or sampled with temperature / top-k / top-p). Sampling draws on the
    logits' device when the generator lives there (no copy to the host); a generator of another device (a CPU
    generator for a CUDA model) draws on its own device, the result going back to the logits' device."""
    if not config.do_sample:
        return logits.argmax(-1)
    scores = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass of the tokens before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= config.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _end_test(eos_token_id, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """token [B] -> [B] bool, whether it ends its row: one comparison per step for the usual single eos id."""
    ids = list(eos_token_id)
    if len(ids) == 1:
        return lambda token: token == ids[0]
    eos = torch.tensor(ids, dtype=torch.long, device=device)
    return lambda token: torch.isin(token, eos)


def _check_every(device: torch.device, streamer) -> int:
    """Decode steps between two looks at whether every row has ended. Reading the flag on the host waits for the
    device; on the CPU that costs nothing (and each extra step does), on an accelerator it stalls the queue of
    kernels, so the loop looks every 8 steps and drops the steps after the end. A streamer reads every token on
    the host anyway."""
    return 1 if device.type == "cpu" or streamer is not None else 8


@torch.no_grad()
def generate(prefill: Callable[[PreparedInputs], PrefillResult], step: Callable, embed: Callable,
             prepared: PreparedInputs, config: GenerationConfig, streamer=None,
             generator: torch.Generator | None = None, stats: GenerationStats | None = None,
             signature=None, on_prefill: Callable[[PrefillResult], None] | None = None,
             pool: CachePool | None = None) -> torch.Tensor:
    """Tokens [B, S + n]: the prompt, then n <= max_new_tokens new tokens per row.

    prefill(prepared) runs the pruned program; step(*decode inputs) is the decode step (compiler.signature);
    embed(ids) gives token embeddings. `stats` (optional) receives timings and cache sizes; `pool` (optional) keeps
    the cache buffers for the next call of the same shapes. The loop follows gpt-fast: no host synchronisation per
    step where a device tensor will do (tokens, ended rows and positions stay on the device; see _check_every)."""
    t0 = time.perf_counter()
    result = prefill(prepared)
    if on_prefill is not None:
        on_prefill(result)
    batch = prepared.input_ids.shape[0]
    device = prepared.input_ids.device
    ends = _end_test(config.eos_token_id, device)
    token = next_tokens(result.values["logits"][:, -1], config, generator)
    if streamer is not None:
        streamer.put(prepared.input_ids.cpu())
        streamer.put(token.cpu())
    out = [token]
    done = ends(token)
    ended = [done.all()]  # per step, on the device: had every row ended
    t1 = time.perf_counter()
    cache, allocated = None, 0
    every = _check_every(device, streamer)
    if config.max_new_tokens > 1 and not bool(ended[0]):
        cache = KVCache.from_prefill(result.values, signature, prepared.attention_mask, config.max_new_tokens - 1,
                                     pool)
        position = prepared.next_position.clone()  # RoPE position of the first new token, per row (the family's)
        # its sequence index: right after the padded prompt in every row (what the attention rule compares)
        query = torch.full_like(position, prepared.input_ids.shape[1])
        for n in range(1, config.max_new_tokens):
            returned = step(embed(token[:, None]), prepared.step_positions(position), query, cache.write_index,
                            *cache.inputs())
            logits = returned[0] if isinstance(returned, (tuple, list)) else returned
            if isinstance(returned, (tuple, list)) and len(returned) > 1:  # a functional step returns the caches
                cache.replace(list(returned[1:]))
            cache.advance()
            position += 1  # tensors of this call's own: the step has read them
            query += 1
            token = next_tokens(logits[:, -1], config, generator).masked_fill_(done, config.pad_token_id)
            out.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            done = done | ends(token)
            ended.append(done.all())
            if n % every == 0 and bool(ended[-1]):
                break
        allocated = cache.allocated_bytes()
        cache.release(pool)
    # steps after the one where every row had ended (a loop that looks every few steps ran them): dropped
    steps = int(torch.stack(ended).long().argmax()) + 1 if bool(ended[-1]) else len(out)
    out = out[:steps]
    t2 = time.perf_counter()
    if streamer is not None:
        streamer.end()
    if stats is not None:
        stats.batch, stats.prompt_tokens, stats.new_tokens = batch, int(prepared.input_ids.shape[1]), len(out)
        stats.ttft_seconds, stats.decode_seconds = t1 - t0, t2 - t1
        stats.exit_layers = result.exit_layers
        stats.kv_prompt_bytes = prefill_bytes(result.values, signature)
        stats.kv_allocated_bytes = allocated or sum(stats.kv_prompt_bytes.values())
    return torch.cat([prepared.input_ids, torch.stack(out, 1)], dim=1)

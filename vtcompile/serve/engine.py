"""The serving engine: one scheduler loop owns a CompiledModel's programs and batches requests continuously.

Loop (one iteration = `Engine.step()`): free the rows of requests that ended or were cancelled; admit waiting requests
(first come, first served) while a row is free and their KV bytes fit the budget; prefill the admitted ones together
(left-padded, one call of the pruned program) and give each its first token; then one decode step for every running
row. So new requests join the running batch between steps and finished ones leave at once.

Slot cache (why joins and leaves never recompile). The decode step (compiler/decode.py) takes per layer a cache
[B, H_kv, C_l, hd] and key_index [B, C_l] (the ORIGINAL sequence index of each slot's key, -1 = empty) and ONE write
slot per layer shared by all rows; its attention mask comes only from key_index against each row's query index, so
the physical order of a row's slots does not matter. The engine keeps one such cache per layer for up to `max_batch`
rows (allocated in powers of two as requests need them, so the slot cache follows the rows in use):
  - a joining row's prompt K/V (exactly what each layer's attention kept in its prefill, so layers differ in length)
    is copied into free slots of its row below the shared write slot (the write slot moves forward when the prompt
    is longer; the other rows just get empty slots there), with key_index set;
  - a row that leaves gets key_index -1 everywhere: its slots are empty for the next request;
  - when the shared write slot reaches a layer's capacity, the layer is compacted (every row's valid slots moved to
    the front, the write slot set to the longest row); only if that leaves no room does its capacity grow, by a
    multiple of `capacity_step` slots.
  - each step runs rows [0, hi) where hi is the number of rows in use rounded up to a power of two (requests take the
    lowest free row), so batch shapes come from a handful of buckets.
The targets take batch and cache lengths as symbolic dims: eager runs any shape; inductor is ONE AOTInductor compile
for every batch and cache length (dynamic dims of the decode step); onnx exports them as dynamic axes. None
recompiles for a join, a leave, a compaction or a growth; the buckets keep the shapes few for a backend that would
specialise on them (CUDA graphs). A functional step (onnx) returns the written caches, which are copied back.

Admission by KV bytes: a request holds, in each layer l with a cache, (its prompt length - visual tokens + the visual
tokens layer l's attention keeps (the program's schedule) + max_tokens) slots of 2 x H_kv,l x hd x dtype bytes. That
is known before prefill, so a pruned program admits more requests under one `kv_budget_bytes` (about 1 / its KV
ratio). A program with branches decided at run time is counted at its no-exit schedule (an upper bound). The budget
counts what requests reserve; the slot cache's allocation (rows x capacity, `allocated_bytes`) is reported beside it.

Answers do not depend on what runs beside a request: each row's keys carry its own sequence indices (shifted to its
unpadded prompt, as when it runs alone), its own positions and its own sampler, and masked slots add nothing to its
attention; greedy tokens equal `cm.generate` on the request alone (tests/unit/test_serve.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError, UnsupportedModelError, VtcompileError
from ..runtime.cache import KVCache
from ..runtime.generate import GenerationConfig, next_tokens
from .errors import EngineStoppedError, QueueFullError

log = logging.getLogger(__name__)


def check_servable(frontend) -> None:
    """The engine serves one program, of one visual-token count per image: refuse, before anything starts, a family
    whose count follows each image's size (dynamic resolution)."""
    if "fixed_image_tokens" not in frontend.geometry.features:
        raise UnsupportedModelError(
            "vtcompile serve takes models with a fixed number of visual tokens per image (the LLaVA family); this "
            "model's count follows each image's size (dynamic resolution, as in Qwen2-VL), and the serving engine "
            "runs one program of one count. Use the Python API (compile_pruned or load_compiled, then cm.generate) "
            "for it.")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """One request: its prompt (one row, no padding), what it asked for and what happened to it."""

    id: int
    input_ids: torch.Tensor  # [1, S]
    pixel_values: torch.Tensor | None  # or, when the vision stage ran where the request arrived, image_features
    params: SamplingParams
    kv_bytes: int  # reserved from admission to the end
    sink: Callable[[str, object], None]  # sink("token", id) / sink("done", reason)
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    row: int = -1
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    visual_kept: list[int] = field(default_factory=list)  # per cache layer: visual tokens its cache holds
    generator: torch.Generator | None = None
    image_features: torch.Tensor | None = None  # [n_images, N_visual, D]: frontend.image_features(pixel_values)


class NullMetrics:
    """What the engine reports (metrics.py implements it with Prometheus)."""

    def finished(self, reason: str) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...
    def ttft(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class KVPlan:
    """What admission needs to know of a program (plain data: a process without the engine computes with it too):
    its visual tokens per request, the layers with a cache, each one's slot size in bytes and the visual tokens its
    attention keeps (the schedule, no exit taken)."""

    n_visual: int
    visual_tokens_per_image: int
    layers: tuple[int, ...]
    slot_bytes: tuple[int, ...]
    kept: tuple[int, ...]

    @property
    def images_per_request(self) -> int:
        return self.n_visual // self.visual_tokens_per_image if self.visual_tokens_per_image else 0

    def request_kv_bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes a request holds: per cache layer its text tokens, the visual tokens that layer keeps and
        max_tokens new tokens, in that layer's slot size (heads x head dim x dtype)."""
        text = prompt_tokens - self.n_visual
        return sum((text + kept + max_tokens) * size for kept, size in zip(self.kept, self.slot_bytes))

    def max_concurrent(self, prompt_tokens: int, max_tokens: int, budget: int | None, max_batch: int) -> int:
        """How many such requests a budget (None: none) and max_batch rows admit at once."""
        if budget is None:
            return max_batch
        return min(max_batch, budget // self.request_kv_bytes(prompt_tokens, max_tokens))


def _bucket(n: int, limit: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, limit)


class SlotCache:
    """Per layer [rows, H_kv, C_l, hd] keys and values, [rows, C_l] key indices, one shared write slot per layer."""

    def __init__(self, layers: list[int], shapes: dict[int, tuple[int, int]], max_rows: int, dtype, device,
                 capacity_step: int = 64):
        self.layers, self.max_rows, self.step_size = list(layers), max_rows, capacity_step
        self.rows = 1  # rows are allocated as requests need them (powers of two up to max_rows)
        self.keys = [torch.zeros(1, shapes[layer][0], capacity_step, shapes[layer][1], dtype=dtype, device=device)
                     for layer in layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.index = [torch.full((1, capacity_step), -1, dtype=torch.long, device=device) for _ in layers]
        self.write = [0] * len(layers)
        self.live: set[int] = set()  # rows holding a request
        self.compactions = 0
        self.growths = 0

    def capacity(self, i: int) -> int:
        return self.keys[i].shape[2]

    def allocated_bytes(self) -> int:
        return sum((k.nelement() + v.nelement()) * k.element_size() for k, v in zip(self.keys, self.values))

    def clear(self, row: int) -> None:
        if row < self.rows:
            for idx in self.index:
                idx[row] = -1

    def insert(self, row: int, per_layer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Put a prompt's valid K [H, n, hd], V and key indices [n] of each layer into free slots of `row`."""
        if row >= self.rows:
            self.add_rows(_bucket(row + 1, self.max_rows))
        self.clear(row)
        self.live.add(row)
        for i, (k, v, idx) in enumerate(per_layer):
            n = idx.shape[0]
            self.room(i, n)
            self.write[i] = max(self.write[i], n)  # the others' next writes move forward, leaving them empty slots
            self.keys[i][row, :, :n] = k
            self.values[i][row, :, :n] = v
            self.index[i][row, :n] = idx

    def release(self, row: int) -> None:
        self.live.discard(row)
        self.clear(row)

    def room(self, i: int, n: int = 0) -> None:
        """Room at layer i for a row of n slots and one more write: compact the layer, grow it only if that is not
        enough (or leaves it more than 3/4 full, which would compact again at once)."""
        if max(self.write[i], n) + 1 <= self.capacity(i):
            return
        self.compact(i)
        need = max(self.write[i], n) + 1
        if need > self.capacity(i) or self.write[i] > self.capacity(i) * 3 // 4:
            self.grow(i, -(-need // self.step_size) * self.step_size + self.step_size)

    def compact(self, i: int) -> None:
        idx = self.index[i]
        idle = [r for r in range(self.rows) if r not in self.live]
        if idle:  # rows without a request hold only what the step wrote for them: nothing to keep
            idx[idle] = -1
        order = torch.sort((idx < 0).to(torch.int8), dim=1, stable=True).indices  # valid slots first
        self.index[i] = idx.gather(1, order)
        gather = order[:, None, :, None].expand_as(self.keys[i])
        self.keys[i] = self.keys[i].gather(2, gather)
        self.values[i] = self.values[i].gather(2, gather)
        self.write[i] = int((self.index[i] >= 0).sum(1).max())
        self.compactions += 1

    def add_rows(self, rows: int) -> None:
        """More rows (new ones empty): the allocation follows the rows in use, not max_batch."""
        extra = rows - self.rows
        for i in range(len(self.layers)):
            k, v, idx = self.keys[i], self.values[i], self.index[i]
            self.keys[i] = torch.cat([k, k.new_zeros(extra, *k.shape[1:])])
            self.values[i] = torch.cat([v, v.new_zeros(extra, *v.shape[1:])])
            self.index[i] = torch.cat([idx, idx.new_full((extra, idx.shape[1]), -1)])
        self.rows = rows

    def grow(self, i: int, size: int) -> None:
        k, v, idx = self.keys[i], self.values[i], self.index[i]
        old = k.shape[2]
        self.keys[i] = torch.cat([k, k.new_zeros(*k.shape[:2], size - old, k.shape[3])], 2)
        self.values[i] = torch.cat([v, v.new_zeros(*v.shape[:2], size - old, v.shape[3])], 2)
        self.index[i] = torch.cat([idx, idx.new_full((idx.shape[0], size - old), -1)], 1)
        self.growths += 1

    def inputs(self, hi: int) -> list[torch.Tensor]:
        """The caches of rows [0, hi) in decode-signature order (views: an in-place step writes the cache itself)."""
        return [t[:hi] for k, v, x in zip(self.keys, self.values, self.index) for t in (k, v, x)]

    def write_back(self, hi: int, written: list[torch.Tensor]) -> None:
        for i in range(len(self.layers)):
            self.keys[i][:hi] = written[3 * i]
            self.values[i][:hi] = written[3 * i + 1]
            self.index[i][:hi] = written[3 * i + 2]


def check_request(plan: KVPlan, input_ids: torch.Tensor, params: SamplingParams, budget: int | None) -> int:
    """A request's KV bytes; InputError when it is not one prompt row or would need more than the whole budget."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"a request is one prompt row [1, S], found shape {tuple(input_ids.shape)}")
    kv = plan.request_kv_bytes(input_ids.shape[1], params.max_tokens)
    if budget is not None and kv > budget:
        raise InputError(f"this request needs {kv} bytes of KV cache (prompt of {input_ids.shape[1]} tokens and "
                         f"max_tokens={params.max_tokens}), more than the whole budget of {budget} bytes; ask for "
                         "fewer max_tokens or start the server with a larger --kv-budget-mb")
    return kv


class Admission:
    """What the HTTP layer asks an engine about admission, from its KVPlan (`plan`), `kv_budget_bytes` and
    `max_batch` (Engine and engine_process.EngineProcess)."""

    plan: KVPlan
    kv_budget_bytes: int | None
    max_batch: int

    @property
    def images_per_request(self) -> int:
        return self.plan.images_per_request

    def visual_kept(self) -> list[int]:
        """Per layer with a cache: visual tokens its attention keeps (the program's schedule, no exit taken)."""
        return list(self.plan.kept)

    def request_kv_bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        return self.plan.request_kv_bytes(prompt_tokens, max_tokens)

    def max_concurrent(self, prompt_tokens: int, max_tokens: int) -> int:
        """How many such requests the budget and the rows admit at once."""
        return self.plan.max_concurrent(prompt_tokens, max_tokens, self.kv_budget_bytes, self.max_batch)


class Engine(Admission):
    """Continuous batching over one CompiledModel (see the module docstring).

    `submit()` is thread-safe; `start()` runs the scheduler loop in a thread of its own (or call `step()`)."""

    encodes_images = False  # requests bring pixel_values; the vision stage runs in the batched prefill

    def __init__(self, cm, max_batch: int = 8, kv_budget_bytes: int | None = None, max_queue: int = 64,
                 max_prefill_batch: int = 8, metrics=None, capacity_step: int = 64,
                 after_step: Callable[[], None] | None = None):
        if max_batch < 1:
            raise InputError(f"max_batch must be >= 1, found {max_batch}")
        if max_queue < 1:
            raise InputError(f"max_queue must be >= 1, found {max_queue}")
        check_servable(cm.frontend)
        self.cm = cm
        self.frontend = cm.frontend
        self.n_visual = self._visual_tokens(cm)
        self.exe = cm.executable(self.n_visual)
        self.step_fn = self.exe.step_stage()
        self.step_fn.lower()  # compiled (or loaded) before the first request
        self.max_batch, self.max_queue, self.max_prefill_batch = max_batch, max_queue, max(1, max_prefill_batch)
        self.kv_budget_bytes = kv_budget_bytes
        self.metrics = metrics or NullMetrics()
        info = self.exe.decode_info
        self.layers = [int(x) for x in info["layers"]]
        shapes = {int(k): tuple(v) for k, v in info["cache_shapes"].items()}
        dtype = getattr(torch, info["dtype"])
        self.slot_bytes = {layer: 2 * shapes[layer][0] * shapes[layer][1] * torch.finfo(dtype).bits // 8
                           for layer in self.layers}
        self.plan = KVPlan(self.n_visual, self.frontend.geometry.visual_tokens_per_image, tuple(self.layers),
                           tuple(self.slot_bytes[layer] for layer in self.layers),
                           tuple(int(self.exe.schedule[layer]) for layer in self.layers))
        self.after_step = after_step  # called by the loop after each step (engine_process.py ships its events)
        self.cache = SlotCache(self.layers, shapes, max_batch, dtype, self.frontend.device, capacity_step)
        self.generation = cm.generation_config(max_new_tokens=1)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> request
        self.reserved_bytes = 0
        self.peak_running = 0
        self._next_id = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        device = self.frontend.device
        self._token = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._position = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self._query = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.steps = 0

    @staticmethod
    def _visual_tokens(cm) -> int:
        """The engine serves the programs of one image count: the model's one image per prompt, or the count an
        artifact holds."""
        per_image = cm.frontend.geometry.visual_tokens_per_image
        if cm.captured is None and per_image not in cm.executables and cm.executables:
            return min(cm.executables)
        return per_image

    def submit(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, params: SamplingParams,
               sink: Callable[[str, object], None], image_features: torch.Tensor | None = None,
               submitted: float | None = None) -> Request:
        """Queue a request (one prompt row; its images as pixel_values, or as image_features computed beforehand);
        raises QueueFullError when `max_queue` wait already. submitted: when it arrived (time.perf_counter(), the
        clock every process of this machine shares), for its time to first token."""
        kv = check_request(self.plan, input_ids, params, self.kv_budget_bytes)
        with self._lock:
            if self._stop:
                raise EngineStoppedError("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue}); "
                                     "retry later")
            req = Request(self._next_id, input_ids, pixel_values, params, kv, sink, image_features=image_features)
            if submitted is not None:
                req.submitted = submitted
            self._next_id += 1
            if not params.greedy:
                seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
                req.generator = torch.Generator().manual_seed(seed)
            self.waiting.append(req)
            self._lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """End a request now (client gone, a stop string met): its row is freed before the next step."""
        with self._lock:
            req.cancelled = True
            self._lock.notify()

    # -- the loop ----------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="vtcompile-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with finish_reason 'abort'."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for req in list(self.waiting) + list(self.running.values()):
            self._finish(req, "abort")
        self.waiting.clear()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting and not self.running:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a failing step must not leave clients waiting forever
                log.exception("engine step failed; ending the running requests")
                for req in list(self.running.values()) + list(self.waiting):
                    self._finish(req, "error")
                self.waiting.clear()
            if self.after_step is not None:
                self.after_step()

    @property
    def active(self) -> int:
        return len(self.running)

    def step(self) -> None:
        """One scheduler iteration: leave, admit + prefill, one decode step."""
        self._reap()
        joined = self._admit()
        if joined:
            self._prefill(joined)
            self._reap()
        if self.running:
            self._decode()
            self._reap()

    def _finish(self, req: Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        self.metrics.finished(reason)
        self.metrics.tokens(int(req.input_ids.shape[1]), len(req.tokens))
        try:
            req.sink("done", reason)
        except Exception:
            log.exception("request %d: its sink failed", req.id)

    def _reap(self) -> None:
        with self._lock:
            for row, req in list(self.running.items()):
                if req.cancelled and req.finish_reason is None:
                    self._finish(req, "cancelled")
                if req.finish_reason is not None:
                    del self.running[row]
                    self.cache.release(row)
                    self.reserved_bytes -= req.kv_bytes
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")

    def _admit(self) -> list[Request]:
        out = []
        with self._lock:
            while self.waiting and len(out) < self.max_prefill_batch and len(self.running) + len(out) < self.max_batch:
                req = self.waiting[0]
                if self.kv_budget_bytes is not None and self.reserved_bytes + req.kv_bytes > self.kv_budget_bytes:
                    break  # first come, first served: a large request is not overtaken
                self.waiting.popleft()
                self.reserved_bytes += req.kv_bytes
                out.append(req)
        return out

    def _emit(self, req: Request, token: int) -> None:
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.ttft(now - req.submitted)
        else:
            self.metrics.inter_token(now - req.last_token_at)
        req.last_token_at = now
        req.tokens.append(token)
        try:
            req.sink("token", token)
        except Exception:
            log.exception("request %d: its sink failed", req.id)
        if token in self.generation.eos_token_id:
            self._finish(req, "stop")
        elif len(req.tokens) >= req.params.max_tokens:
            self._finish(req, "length")

    def _choose(self, req: Request, logits: torch.Tensor) -> int:
        config = GenerationConfig(max_new_tokens=1, do_sample=not req.params.greedy,
                                  temperature=req.params.temperature if not req.params.greedy else 1.0,
                                  top_p=req.params.top_p, eos_token_id=self.generation.eos_token_id,
                                  pad_token_id=self.generation.pad_token_id)
        return int(next_tokens(logits[None], config, req.generator)[0])

    @torch.no_grad()
    def _prefill(self, reqs: list[Request]) -> None:
        length = max(r.input_ids.shape[1] for r in reqs)
        pad = self.generation.pad_token_id
        ids = torch.full((len(reqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), length), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = r.input_ids.shape[1]
            ids[i, length - n:], mask[i, length - n:] = r.input_ids[0], 1
        pixels = features = None
        if any(r.image_features is not None for r in reqs):  # the vision stage ran where they arrived
            features = torch.cat([r.image_features if r.image_features is not None else
                                  self.frontend.image_features(r.pixel_values) for r in reqs])
        elif any(r.pixel_values is not None for r in reqs):
            pixels = torch.cat([r.pixel_values for r in reqs if r.pixel_values is not None])
        try:
            prepared = self.cm.prepare(ids, pixels, mask, image_features=features)
            if prepared.n_visual != self.n_visual:
                raise InputError(f"the engine serves prompts with {self.n_visual} visual tokens; found "
                                 f"{prepared.n_visual}")
            result = self.exe.prefill(prepared)
        except VtcompileError as exc:
            log.warning("prefill refused: %s", exc)
            with self._lock:
                for r in reqs:
                    self.reserved_bytes -= r.kv_bytes
            for r in reqs:
                self._finish(r, "error")
            return
        logits = result.values["logits"][:, -1]
        prompt = KVCache.from_prefill(result.values, self.exe.signature, prepared.attention_mask, 0)
        free = [row for row in range(self.max_batch) if row not in self.running]
        for i, r in enumerate(reqs):
            self._emit(r, self._choose(r, logits[i]))
            if r.finish_reason is not None or r.cancelled:
                if r.finish_reason is None:
                    self._finish(r, "cancelled")
                with self._lock:
                    self.reserved_bytes -= r.kv_bytes
                continue
            row = free.pop(0)
            shift = length - r.input_ids.shape[1]  # the row's own sequence indices, as if it ran alone
            per_layer, kept = [], []
            for li in range(len(self.layers)):
                valid = prompt.index[li][i] >= 0
                idx = prompt.index[li][i][valid] - shift
                per_layer.append((prompt.keys[li][i][:, valid], prompt.values[li][i][:, valid], idx))
                kept.append(int(prepared.visual_mask[i][(prompt.index[li][i][valid])].sum()))
            r.visual_kept = kept
            self.cache.insert(row, per_layer)
            self._token[row] = r.tokens[-1]
            self._position[row] = prepared.next_position[i]
            self._query[row] = r.input_ids.shape[1]
            r.row = row
            with self._lock:
                self.running[row] = r
        self.peak_running = max(self.peak_running, len(self.running))

    @torch.no_grad()
    def _decode(self) -> None:
        hi = _bucket(max(self.running) + 1, self.max_batch)
        for i in range(len(self.layers)):
            self.cache.room(i)
        write_index = torch.tensor(self.cache.write, dtype=torch.long, device=self._token.device)
        returned = self.step_fn(self.frontend.embed_tokens(self._token[:hi, None]),
                                self.frontend.step_positions(self._position[:hi].clone()),
                                self._query[:hi].clone(), write_index, *self.cache.inputs(hi))
        logits = returned[0] if isinstance(returned, (tuple, list)) else returned
        if isinstance(returned, (tuple, list)) and len(returned) > 1:
            self.cache.write_back(hi, list(returned[1:]))
        self.cache.write = [w + 1 for w in self.cache.write]
        self._position += 1
        self._query += 1
        self.steps += 1
        last = logits[:, -1]
        greedy = last.argmax(-1).tolist()
        for row, req in list(self.running.items()):
            if req.finish_reason is not None or req.cancelled:
                continue
            token = greedy[row] if req.params.greedy else self._choose(req, last[row])
            self._token[row] = token
            self._emit(req, token)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_reserved_bytes": self.reserved_bytes,
                "kv_budget_bytes": self.kv_budget_bytes, "kv_allocated_bytes": self.cache.allocated_bytes(),
                "peak_running": self.peak_running, "steps": self.steps, "compactions": self.cache.compactions,
                "growths": self.cache.growths, "max_batch": self.max_batch}

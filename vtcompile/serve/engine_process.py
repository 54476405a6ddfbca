"""The engine in a process of its own (`vtcompile serve`'s default): the server process parses requests, runs the
vision stage on their images and streams the answers; the engine process only steps the programs.

Why: in one process the engine loop and the HTTP layer take turns on one interpreter lock. The decode step is
mostly Python between small kernels, so each token the server streams delays the next step, and a 2-core machine
ran the HTTP layer and the engine on about one core (bench/serve.py). Split, each has a core, and the images are
encoded where they arrive, beside the engine's steps (vLLM's v1 engine splits its API server and engine core the
same way; what crosses is a request's token ids and image features, then a few tokens per step).

The engine process is forked from the server once the model is compiled or loaded (it inherits the CompiledModel:
nothing is compiled or loaded twice) and before the server starts. One duplex pipe, pickled messages, tensors as
numpy arrays:
  server -> engine: ("start",), ("submit", id, input_ids, image_features, params, submitted), ("cancel", id),
                    ("reset_peak",), ("stop",)
  engine -> server: ("ready", KVPlan) or ("failed", message) once, then after every engine step
                    ("step", events, stats): events are (id, "token", token id), (id, "done", (reason, visual kept))
                    and ("metric", name, args) for the server's Prometheus metrics.
The engine process ignores SIGINT and SIGTERM (the server stops it after its own shutdown, with "stop") and exits
when the pipe closes, so it never outlives a server that was killed. A request's time to first token counts from
its arrival at the server (time.perf_counter is one clock for every process of the machine)."""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import VtcompileError
from .engine import Admission, Engine, KVPlan, NullMetrics, SamplingParams, check_request
from .errors import EngineStoppedError, QueueFullError

log = logging.getLogger(__name__)


@dataclass
class RemoteRequest:
    """The server's side of a request the engine process runs (what the HTTP layer reads of Engine's Request)."""

    id: int
    prompt_tokens: int
    kv_bytes: int
    sink: Callable[[str, object], None]
    tokens: list[int] = field(default_factory=list)
    visual_kept: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class EngineProcess(Admission):
    """Engine's interface (submit, cancel, start, stop, stats, admission) over an engine in a forked process."""

    def __init__(self, cm, max_batch: int = 8, kv_budget_bytes: int | None = None, max_queue: int = 64,
                 metrics=None, threads: int | None = None, start_seconds: float = 600.0):
        """threads: the engine process's torch threads (default: this process's, less one left to the server)."""
        if max_queue < 1:
            raise VtcompileError(f"max_queue must be >= 1, found {max_queue}")
        if cm.frontend.device.type != "cpu":
            raise VtcompileError(f"the engine process is forked from the server, and a forked process cannot use "
                                 f"{cm.frontend.device.type.upper()}; run the engine in a thread (--engine thread)")
        self.frontend = cm.frontend
        self.max_batch, self.max_queue, self.kv_budget_bytes = max_batch, max_queue, kv_budget_bytes
        self.metrics = metrics or NullMetrics()
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.threads = threads or max(1, torch.get_num_threads() - 1)
        options = {"max_batch": max_batch, "kv_budget_bytes": kv_budget_bytes, "max_queue": 1 << 30}
        self.process = ctx.Process(target=_engine_main, args=(child, self._conn, cm, options, self.threads),
                                   name="vtcompile-engine", daemon=False)
        self.process.start()
        child.close()
        atexit.register(self._close)  # an exit without stop(): the engine sees the pipe close and ends
        if not self._conn.poll(start_seconds):
            self._close()
            raise VtcompileError(f"the engine process did not start within {start_seconds:.0f} s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._close()
            raise VtcompileError(f"the engine process exited at start (code {self.process.exitcode}); see the "
                                 "log above") from None
        if kind == "failed":
            self._close()
            raise VtcompileError(f"the engine process could not start: {value}")
        self.plan: KVPlan = value
        self.n_visual = self.plan.n_visual
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[int, RemoteRequest] = {}
        self._queued: set[int] = set()  # submitted, no token yet: the engine's queue as seen from here
        self._next_id = 0
        self._stopping = False
        self._dead: str | None = None
        self._stats = {"running": 0, "waiting": 0, "kv_reserved_bytes": 0, "kv_budget_bytes": kv_budget_bytes,
                       "kv_allocated_bytes": 0, "peak_running": 0, "steps": 0, "compactions": 0, "growths": 0,
                       "max_batch": max_batch}
        self._receiver = threading.Thread(target=self._receive, name="vtcompile-engine-events", daemon=True)
        self._receiver.start()

    # -- what the HTTP layer uses of Engine besides Admission ---------------------------------------------------
    encodes_images = True  # the server runs the vision stage (encode_images) and submits image features

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision stage on a request's images, here in the server process (check_pixels first, as prepare)."""
        self.frontend.check_pixels(pixel_values)
        return self.frontend.image_features(pixel_values)

    def submit(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, params: SamplingParams,
               sink: Callable[[str, object], None], image_features: torch.Tensor | None = None) -> RemoteRequest:
        """Queue a request (see Engine.submit); images as image_features (encode_images), or pixel_values, which
        are encoded here."""
        submitted = time.perf_counter()
        kv = check_request(self.plan, input_ids, params, self.kv_budget_bytes)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        with self._lock:
            if self._dead is not None:
                raise EngineStoppedError(self._dead)
            if self._stopping:
                raise EngineStoppedError("the engine is shutting down")
            if len(self._queued) >= self.max_queue:
                raise QueueFullError(f"{len(self._queued)} requests are waiting (--max-queue {self.max_queue}); "
                                     "retry later")
            req = RemoteRequest(self._next_id, int(input_ids.shape[1]), kv, sink)
            self._next_id += 1
            self._requests[req.id] = req
            self._queued.add(req.id)
        feats = None if image_features is None else image_features.detach().cpu().contiguous().numpy()
        self._send(("submit", req.id, input_ids.detach().cpu().numpy(), feats, params, submitted))
        return req

    def cancel(self, req: RemoteRequest) -> None:
        self._send(("cancel", req.id))

    def start(self) -> "EngineProcess":
        self._send(("start",))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine process; requests still waiting or running end with finish_reason 'abort'."""
        with self._lock:
            self._stopping = True
        self._send(("stop",))
        self._receiver.join(timeout)
        self._close(timeout)

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    @property
    def peak_running(self) -> int:
        return self.stats()["peak_running"]

    @peak_running.setter
    def peak_running(self, value: int) -> None:  # bench/serve.py resets it between levels
        if value != 0:
            raise ValueError("the peak can only be reset (to 0)")
        with self._lock:
            self._stats["peak_running"] = 0
        self._send(("reset_peak",))

    # -- the pipe ------------------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the engine process is gone: the receiver ends its requests
            pass

    def _close(self, timeout: float = 5.0) -> None:
        try:
            self._conn.close()
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join()

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stopped":
                break
            _, events, stats = message
            for event in events:
                self._deliver(event)
            with self._lock:
                self._stats.update(stats)
        code = self.process.exitcode
        with self._lock:
            if not self._stopping:
                self._dead = "the engine process exited" + (f" (code {code})" if code is not None else "") + \
                    "; see the server log"
                log.error("%s", self._dead)
            left = list(self._requests.values())
            self._requests.clear()
            self._queued.clear()
        for req in left:  # nothing more will come for them
            self._done(req, ("abort" if self._stopping else "error", []))

    def _deliver(self, event) -> None:
        if event[0] == "metric":
            getattr(self.metrics, event[1])(*event[2])
            return
        rid, kind, value = event
        with self._lock:
            req = self._requests.get(rid)
            self._queued.discard(rid)
            if kind == "done":
                self._requests.pop(rid, None)
        if req is None:
            return
        if kind == "token":
            req.tokens.append(value)
            _call(req, "token", value)
        else:
            self._done(req, value)

    @staticmethod
    def _done(req: RemoteRequest, value) -> None:
        reason, kept = value
        req.finish_reason, req.visual_kept = reason, list(kept)
        _call(req, "done", reason)


def _call(req: RemoteRequest, kind: str, value) -> None:
    try:
        req.sink(kind, value)
    except Exception:
        log.exception("request %d: its sink failed", req.id)


class _MetricEvents:
    """The engine's metrics interface (engine.NullMetrics) as events for the server's metrics."""

    def __init__(self, post: Callable[[tuple], None]):
        self.post = post

    def __getattr__(self, name: str):
        if name not in ("finished", "tokens", "ttft", "inter_token"):
            raise AttributeError(name)
        return lambda *args: self.post(("metric", name, args))


def _engine_main(conn, server_end, cm, options: dict, threads: int) -> None:
    """The engine process: an Engine whose events go to the server after every step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server_end.close()  # the server's end, inherited: the pipe must close when the server's does
    torch.set_num_threads(threads)
    outbox: list[tuple] = []
    lock = threading.Lock()

    def post(event: tuple) -> None:
        with lock:
            outbox.append(event)

    requests: dict[int, object] = {}

    def flush() -> None:
        with lock:
            events = outbox[:]
            outbox.clear()
        shipped = []
        for event in events:
            if event[1] == "done":  # the request's kept visual tokens travel with its end
                req = requests.pop(event[0], None)
                event = (event[0], "done", (event[2], list(getattr(req, "visual_kept", []))))
            shipped.append(event)
        try:
            conn.send(("step", shipped, engine.stats()))
        except (OSError, ValueError):
            pass

    try:
        engine = Engine(cm, metrics=_MetricEvents(post), after_step=flush, **options)
    except Exception as exc:  # the server reports it and exits non-zero
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.plan))
    started = False
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        kind = message[0]
        if kind == "submit":
            _, rid, ids, feats, params, submitted = message

            def sink(event: str, value, rid=rid) -> None:
                post((rid, event, value))
            # under the engine's lock (re-entrant): the loop cannot take the request before it is known here
            with engine._lock:
                try:
                    requests[rid] = engine.submit(torch.from_numpy(ids), None, params, sink,
                                                  image_features=None if feats is None else torch.from_numpy(feats),
                                                  submitted=submitted)
                except VtcompileError as exc:
                    log.warning("request refused by the engine: %s", exc)
                    post((rid, "done", "error"))
            if not started:
                flush()  # the loop is not running yet: nothing else would ship it
        elif kind == "cancel":
            req = requests.get(message[1])
            if req is not None:
                engine.cancel(req)
        elif kind == "start" and not started:
            engine.start()
            started = True
        elif kind == "reset_peak":
            engine.peak_running = 0
        elif kind == "stop":
            break
    engine.stop()
    flush()
    try:
        conn.send(("stopped",))
    except (OSError, ValueError):
        pass
    conn.close()

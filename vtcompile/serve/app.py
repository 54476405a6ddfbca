"""The HTTP layer (FastAPI + uvicorn; the `serve` extra): OpenAI's routes over one Engine.

FastAPI because its ASGI stack (Starlette) streams server-sent events from an async generator and notices a client
that went away, and because vLLM's OpenAI server uses the same stack (its clients' expectations hold); the routes
parse the raw body themselves (protocol.py), so error bodies are OpenAI's and never FastAPI's validation format.

Routes: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health, GET /metrics.
Engine: in a process of its own (engine_process.py, `vtcompile serve`'s default; the images are encoded here, in a
worker thread, and sent as features) or in a thread of this process (Engine; tests, Ray replicas). Either hands
tokens to the request's asyncio queue with call_soon_threadsafe, so no request holds a worker thread while it
waits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

# this module is the web layer: importing it needs the serve extra (command.py checks it is installed first)
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import VtcompileError
from .engine import SamplingParams
from .errors import EngineStoppedError, QueueFullError, ServeError
from .metrics import ServeMetrics
from .protocol import ChatProtocol, StopChecker

log = logging.getLogger(__name__)


@dataclass
class Service:
    """One served model: the engine, its chat protocol, metrics and what /v1/models says about it."""

    engine: object  # Engine, or EngineProcess (the same interface)
    protocol: ChatProtocol
    metrics: ServeMetrics
    name: str
    info: dict = field(default_factory=dict)
    replica: str = "0"
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, cm, name: str | None = None, max_batch: int = 8, kv_budget_bytes: int | None = None,
              max_queue: int = 64, allow_local_files=None, max_tokens_limit: int = 256, replica: str = "0",
              max_image_bytes: int | None = None, engine: str = "thread") -> "Service":
        """engine: "thread" (the loop in a thread of this process) or "process" (a forked engine process: call
        this before starting any server thread)."""
        from .images import DEFAULT_MAX_IMAGE_BYTES, ImagePolicy

        metrics = ServeMetrics(replica)
        if engine not in ("thread", "process"):
            raise VtcompileError(f"engine must be 'thread' or 'process', found {engine!r}")
        if engine == "process":
            from .engine_process import EngineProcess

            engine = EngineProcess(cm, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes, max_queue=max_queue,
                                   metrics=metrics)
        else:
            from .engine import Engine

            engine = Engine(cm, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes, max_queue=max_queue,
                            metrics=metrics)
        metrics.bind(engine)
        policy = ImagePolicy.make(allow_local_files, max_image_bytes or DEFAULT_MAX_IMAGE_BYTES)
        name = name or cm.spec.label
        protocol = ChatProtocol(name, cm.frontend, engine.images_per_request, policy, max_tokens_limit)
        info = {"passes": [p.name for p, _ in cm.passes], "target": cm.target.name,
                "source": str(cm.source) if cm.source is not None else None,
                "visual_tokens_per_request": engine.n_visual, "visual_tokens_kept": engine.visual_kept(),
                "kv_budget_bytes": kv_budget_bytes, "max_batch": max_batch}
        return cls(engine, protocol, metrics, name, info, replica)

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "vtcompile",
                "vtcompile": self.info}


def _error(exc: ServeError, metrics: ServeMetrics):
    metrics.request(exc.status)
    return JSONResponse(exc.body(), status_code=exc.status)


class _ClientGone(Exception):
    """The client closed its connection."""


_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def create_app(service: Service, manage_engine: bool = True):
    """The FastAPI app of a Service; with manage_engine the app starts the engine loop and stops it at shutdown."""
    engine, protocol, metrics = service.engine, service.protocol, service.metrics

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="vtcompile", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # never a traceback to the client; the log has it
        log.exception("unexpected error on %s", request.url.path)
        metrics.request(500)
        return JSONResponse(ServeError("internal error; see the server log", status=500).body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "replica": service.replica, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.text()
        return Response(body, media_type=content_type)

    def extra(handle) -> dict:
        return {"visual_tokens": engine.n_visual, "visual_tokens_kept": handle.visual_kept,
                "kv_bytes": handle.kv_bytes, "replica": service.replica}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await request.body()
        try:
            creq = await asyncio.get_running_loop().run_in_executor(None, protocol.parse, raw)
        except ServeError as exc:
            return _error(exc, metrics)
        except VtcompileError as exc:
            return _error(ServeError(str(exc)), metrics)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(kind, value):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        params = SamplingParams(creq.max_tokens, creq.temperature, creq.top_p, creq.seed)
        features = None
        if engine.encodes_images and creq.pixel_values is not None:  # the vision stage here, beside the engine
            try:
                features = await loop.run_in_executor(None, engine.encode_images, creq.pixel_values)
            except VtcompileError as exc:
                return _error(ServeError(str(exc)), metrics)
        try:
            handle = engine.submit(creq.input_ids, creq.pixel_values, params, sink, image_features=features)
        except QueueFullError as exc:
            return _error(ServeError(str(exc), status=429, code="queue_full", type="rate_limit_error"), metrics)
        except EngineStoppedError as exc:
            return _error(ServeError(str(exc), status=503, code="shutting_down"), metrics)
        except VtcompileError as exc:
            return _error(ServeError(str(exc), param="max_tokens", code="kv_budget_exceeded"), metrics)
        checker = StopChecker(protocol, creq.stop)

        async def next_event():
            kind, value = await queue.get()
            if kind == "token":
                piece = checker.feed(handle.tokens)
                if checker.stopped:
                    engine.cancel(handle)
                    return "done", "stop", piece
                return "token", None, piece
            return "done", value, checker.feed(handle.tokens, final=True)

        async def wait_event():
            """The next event; raises _ClientGone when the client disconnected meanwhile (checked twice a second,
            so a request still queued or between tokens is let go at once)."""
            while True:
                try:
                    return await asyncio.wait_for(next_event(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise _ClientGone from None

        def usage() -> dict:
            n = int(creq.input_ids.shape[1])
            return {"prompt_tokens": n, "completion_tokens": len(handle.tokens),
                    "total_tokens": n + len(handle.tokens)}

        if creq.stream:
            async def events():
                finished = False
                try:
                    yield protocol.chunk(creq, {"role": "assistant", "content": ""})
                    while True:
                        kind, reason, piece = await wait_event()
                        if piece:
                            yield protocol.chunk(creq, {"content": piece})
                        if kind == "done":
                            break
                    finished = True
                    if reason in _FINISH:
                        metrics.request(200)
                        yield protocol.chunk(creq, {}, _FINISH[reason], extra=extra(handle))
                        if creq.include_usage:
                            yield protocol.usage_chunk(creq, usage())
                    else:
                        metrics.request(500)
                        yield f"data: {json.dumps(ServeError(f'the request ended: {reason}', status=500).body())}\n\n"
                    yield "data: [DONE]\n\n"
                except _ClientGone:
                    return
                finally:
                    if not finished:  # the client went away: free the slot now
                        engine.cancel(handle)
                        metrics.request(499)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text = []
        try:
            while True:
                kind, reason, piece = await wait_event()
                text.append(piece)
                if kind == "done":
                    break
        except (_ClientGone, asyncio.CancelledError) as exc:
            engine.cancel(handle)
            metrics.request(499)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Response(status_code=499)  # nobody reads it: the connection is gone
        if reason not in _FINISH:
            return _error(ServeError(f"the request ended: {reason}", status=503 if reason == "abort" else 500),
                          metrics)
        metrics.request(200)
        return JSONResponse(protocol.response(creq, "".join(text), _FINISH[reason], len(handle.tokens),
                                              extra(handle)))

    return app


class ThreadServer:
    """A Service's app under uvicorn in a thread of this process, on a free 127.0.0.1 port (`url`): for tests and
    benchmarks. `with ThreadServer(service) as srv:` returns once /health answers and stops the server at the end."""

    def __init__(self, service: Service, manage_engine: bool = True, start_seconds: float = 20.0):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_seconds = start_seconds
        self.server = uvicorn.Server(uvicorn.Config(create_app(service, manage_engine), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        import urllib.error
        import urllib.request

        self.thread.start()
        deadline = time.monotonic() + self.start_seconds
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the server did not answer {self.url}/health within {self.start_seconds:.0f} s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

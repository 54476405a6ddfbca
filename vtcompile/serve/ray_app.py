"""Scale-out on Ray Serve (the `ray` extra): N replicas of the same Service behind Ray's HTTP proxy.

Each replica loads the artifact (or compiles the model) once, runs its own engine loop and serves the same OpenAI
routes (app.py's FastAPI app, built on the replica through Ray's deferred ingress); Ray's proxy spreads the requests
over the replicas, and every answer names the replica that gave it (`vtcompile.replica`, also a label of every
metric). Used by `vtcompile serve ... --ray --replicas N`, or from Python:

    from ray import serve
    from vtcompile.serve.ray_app import deployment, start_ray
    start_ray(num_cpus=2)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment({"dir": "art/"}, {"max_batch": 8}, replicas=2), name="vtcompile", route_prefix="/")

Ray is started as a local instance on the loopback address (no dashboard, no usage statistics, a session directory
of its own that is removed at the end). Each replica asks for half a CPU and runs torch on one thread, so two
replicas fit a 2-core machine beside Ray's own processes.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading

log = logging.getLogger("vtcompile.serve")
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def start_ray(num_cpus: int | None = None, object_store_mb: int = 100) -> str:
    """A local Ray instance on 127.0.0.1; returns its session directory (remove it with stop_ray)."""
    os.environ.update(RAY_ENV)
    import ray

    temp_dir = tempfile.mkdtemp(prefix="vtray-", dir="/tmp")  # short: Ray's unix sockets live under it
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=object_store_mb * 1024 ** 2, _temp_dir=temp_dir,
             logging_level=logging.WARNING, log_to_driver=False)
    return temp_dir


def stop_ray(temp_dir: str | None) -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _load(source: dict, compile_model):
    from ..api import compile_pruned, load_compiled
    from ..models import DEFAULT_MODEL

    if source.get("dir"):
        return load_compiled(source["dir"])
    if compile_model is not None:
        return compile_model(source["args"], source["args"].target)
    return compile_pruned(source.get("model") or DEFAULT_MODEL, source.get("passes") or None,
                          target=source.get("target") or "eager", calibration=source.get("calibration"))


def deployment(source: dict, options: dict, replicas: int = 1, compile_model=None, cpus_per_replica: float = 0.5):
    """A bound Ray Serve application of `replicas` replicas. source: {"dir": ARTIFACT} or {"model", "passes",
    "target", "calibration"} (or {"args": Namespace} with compile_model, the command line's); options: Service.build's
    keyword arguments."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=max(8, 2 * options.get("max_queue", 64)))
    @serve.ingress()
    class VtcompileReplica:
        def __init__(self, source: dict, options: dict, compile_model=None):
            import torch

            from .app import Service

            torch.set_num_threads(1)
            logging.getLogger("vtcompile").setLevel(logging.INFO)
            replica = serve.get_replica_context().replica_id.unique_id
            cm = _load(source, compile_model)
            self.service = Service.build(cm, replica=replica, **options)
            self.service.engine.start()

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.service, manage_engine=False)

        def __del__(self):
            service = getattr(self, "service", None)
            if service is not None:
                service.engine.stop(timeout=5)

    return VtcompileReplica.bind(source, options, compile_model)


def run_ray(args, options: dict, compile_model=None) -> int:
    """`vtcompile serve --ray`: start Ray locally, run the deployment, block until SIGINT/SIGTERM, clean up."""
    import argparse
    import socket

    from ray import serve

    # the command's flags travel to the replicas (its `func`, a closure of the parser, stays here)
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    source = {"dir": str(args.dir)} if args.dir is not None else {"args": plain}
    replicas = args.replicas or 1
    port = args.port
    if port == 0:  # Ray's proxy takes a fixed port: pick a free one
        with socket.socket() as s:
            s.bind((args.host, 0))
            port = s.getsockname()[1]
    temp_dir = start_ray()
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": port})
        serve.run(deployment(source, options, replicas, compile_model if args.dir is None else None),
                  name="vtcompile", route_prefix="/")
        log.info("serving on Ray Serve with %d replica(s)", replicas)
        log.info("listening on http://%s:%d", args.host, port)
        stopping.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_ray(temp_dir)
        log.info("stopped")
    return 0

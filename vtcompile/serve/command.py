"""`vtcompile serve`: the command line of the server.

`vtcompile serve (DIR | --model M --pass P ... [--target T]) [--host 127.0.0.1] [--port 8000] [--max-batch N]
[--kv-budget-mb X] [--max-queue Q] [--allow-local-files DIR] [--ray --replicas N]`

The model flags (--model, --pass, --target, ...) are the ones every vtcompile command takes (cli.py adds them and
hands over its compile function); this module adds the server's own. The socket is bound before the server starts,
so `--port 0` works: the chosen port is logged ("listening on http://HOST:PORT") once the socket listens.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import socket
from pathlib import Path

from ..errors import InputError

log = logging.getLogger("vtcompile.serve")
HELP = "serve a compiled model over OpenAI's chat completions API (continuous batching, KV-byte admission)"
DESCRIPTION = ("Start an OpenAI-compatible HTTP server (POST /v1/chat/completions with image parts, streaming; "
               "GET /v1/models, /health, /metrics) over an artifact directory or a model compiled here with --pass. "
               "Requests are batched continuously and admitted while the KV bytes they reserve fit --kv-budget-mb. "
               "Needs the serve extra: pip install -e '.[serve]' (and '.[ray]' for --ray).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's own flags (the model flags come from cli.py)."""
    p.add_argument("dir", type=Path, nargs="?", help="artifact directory (vtcompile optimize ... --out DIR); omit to "
                                                     "compile --model with --pass here")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, logged)")
    g.add_argument("--name", help="the model name clients send (default: the model's label, e.g. testbed)")
    g.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    g.add_argument("--kv-budget-mb", type=float, default=None,
                   help="KV-cache budget in MB (1e6 bytes): a request is admitted while the bytes it reserves "
                        "(its pruned prompt cache + max_tokens, per layer) fit (default: no budget)")
    g.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get HTTP 429 (default 64)")
    g.add_argument("--max-tokens-limit", type=int, default=256,
                   help="largest max_tokens a request may ask for (default 256)")
    g.add_argument("--allow-local-files", type=Path, metavar="DIR",
                   help="let image_url name local files, only inside DIR (default: data: URLs only)")
    g.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="where the engine loop runs: 'process' (default on the CPU), a process of its own beside the "
                        "HTTP server, which parses requests and encodes their images; 'thread' (default on a GPU: "
                        "CUDA cannot be used in a forked process), a thread of the server process (they then share "
                        "one interpreter lock). Ray replicas run it in a thread")
    g.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment on a local Ray instance")
    g.add_argument("--replicas", type=int, default=None, help="with --ray: number of replicas (default 1)")


def check_arguments(args) -> None:
    """Flags that would be ignored or cannot work are errors (before any model is loaded)."""
    if args.dir is not None and (args.passes or args.model is not None or args.target is not None):
        raise InputError("give an artifact directory or --model/--pass/--target, not both: an artifact runs the passes "
                         "and target it was compiled with")
    if args.replicas is not None and not args.ray:
        raise InputError("--replicas applies to --ray; add --ray or drop --replicas")
    if args.ray and args.engine == "process":
        raise InputError("--engine process does not apply to --ray: each Ray replica is a process of its own and "
                         "runs its engine in a thread; drop --engine")
    for name in ("max_batch", "max_queue", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.replicas is not None and args.replicas < 1:
        raise InputError(f"--replicas must be >= 1, found {args.replicas}")
    if args.kv_budget_mb is not None and not args.kv_budget_mb > 0:
        raise InputError(f"--kv-budget-mb must be > 0, found {args.kv_budget_mb}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, found {args.port}")
    if args.allow_local_files is not None and not args.allow_local_files.is_dir():
        raise InputError(f"--allow-local-files {args.allow_local_files} is not a directory")
    if args.dir is not None and not args.dir.is_dir():
        raise InputError(f"artifact directory {args.dir} does not exist")


def _require(extra: str, modules: tuple[str, ...]) -> None:
    """A clear error naming the extra to install when one of its packages is missing."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise InputError(f"vtcompile serve needs the '{extra}' extra ({name} is not installed): "
                             f"pip install -e '.[{extra}]'")


def service_options(args) -> dict:
    return dict(name=args.name, max_batch=args.max_batch,
                kv_budget_bytes=int(args.kv_budget_mb * 1e6) if args.kv_budget_mb is not None else None,
                max_queue=args.max_queue, allow_local_files=args.allow_local_files,
                max_tokens_limit=args.max_tokens_limit)


def main(args, compile_model=None) -> int:
    """Run the server until it is stopped (Ctrl-C, SIGTERM). compile_model(args, target) compiles --model/--pass
    (cli.py's); without it the API's compile_pruned is used."""
    check_arguments(args)
    _require("serve", ("fastapi", "uvicorn", "prometheus_client"))
    if args.ray:
        _require("ray", ("ray", "ray.serve"))
        from .ray_app import run_ray

        return run_ray(args, service_options(args), compile_model)
    import uvicorn

    from .app import Service, create_app

    cm = load_model(args, compile_model)
    engine = args.engine or ("process" if cm.frontend.device.type == "cpu" else "thread")  # CUDA does not fork
    service = Service.build(cm, engine=engine, **service_options(args))  # forks the engine process, if any
    if engine == "process":
        import torch

        torch.set_num_threads(1)  # this process's torch work (the vision stage) on one core, the engine's on another
    app = create_app(service)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port} ({exc.strerror})") from None
    # listening before the line below is logged: a client that reads the port from the log and connects at once
    # waits in the backlog until uvicorn accepts, instead of being refused while uvicorn still starts (a bound socket
    # that does not listen yet refuses connections: the README's serve block failed so in CI)
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    log.info("serving %s (%s, passes: %s) with max batch %d, KV budget %s, the engine in a %s", service.name,
             cm.target.name, ", ".join(service.info["passes"]) or "none", args.max_batch,
             f"{args.kv_budget_mb} MB" if args.kv_budget_mb else "none", engine)
    log.info("listening on http://%s:%d", host, port)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGINT/SIGTERM stop the server gracefully (the engine lets its requests go) and the command exits 0;
            # uvicorn would raise the signal again after shutting down
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    log.info("stopped")
    return 0


def load_model(args, compile_model=None):
    """The CompiledModel the flags name: an artifact, or --model/--pass compiled here."""
    from ..api import compile_pruned, load_compiled

    from .engine import check_servable

    if args.dir is not None:
        cm = load_compiled(args.dir)
    elif compile_model is not None:
        cm = compile_model(args, args.target)
    else:
        from ..models import DEFAULT_MODEL

        cm = compile_pruned(args.model or DEFAULT_MODEL, args.passes or None, target=args.target or "eager",
                            calibration=getattr(args, "calibration", None))
    check_servable(cm.frontend)  # before an engine process or a socket starts
    return cm

"""Serving benchmark: continuous batching and KV-byte admission of `vtcompile serve`, pruned vs unpruned.

For each program (unpruned, fastv, fitprune:budget=0.5 by default), under ONE KV budget (--budget-requests unpruned
requests' worth, or --kv-budget-mb) and the same --max-batch: closed-loop clients (1, 4, 16, 64 by default) each send
a bounded number of requests one after the other; every request is answered and every answer is checked against
`cm.generate` on that request alone (greedy). Reported per program and client count: p50/p99 time to first token,
p50/p99 inter-token latency, requests/s, generated tokens/s, and the most requests that ran at once; per program the
number of requests the budget admits at once (from the program's schedule, before any prefill).

Two modes. http (models with a processor, the testbed): the server runs in this process (uvicorn on 127.0.0.1, a free
port) with its engine in a forked process of its own, as `vtcompile serve` runs it (`--engine thread`: the engine loop
in a thread of the server process), and the clients in a child process (this file with --client: asyncio + httpx,
streaming chat completions with the scene as a data: URL); TTFT is measured at the client from sending the request
to the first content chunk, inter-token latency between content chunks. engine (models
without a processor: random-weight presets such as the 7B geometry): clients are threads submitting token ids to the
engine; the same clocks at the engine's token callbacks. Traffic stays on 127.0.0.1; everything stops by itself.

--check: at 16 clients throughput (requests/s) >= 4x that at 1 client, for every program; every pruned program admits
>= 1.3x as many concurrent requests as the unpruned one under the budget; every answer equals the reference.

    python bench/serve.py --check                                    # testbed, http, writes serve-testbed.md
    python bench/serve.py --model llava-1.5-7b --random-weights --layers 4 --clients 1,2 --requests 2 \\
        --max-tokens 8 --out bench/results/serve-7b-geometry
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, calibrates, load_bench_model, machine, model_flags, write_results  # noqa: E402

LIST_QUESTION = "what objects are there from left to right?"
CPU_PARTS = ("client", "server", "engine")  # http mode: the processes whose CPU seconds a level reports
DEFAULT_VARIANTS = ["unpruned", "fastv", "fitprune:budget=0.5"]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# -- the client process (http mode) ------------------------------------------------------------------------------
async def _client_main(url: str, clients: int, per_client: int, data: list[dict], max_tokens: int) -> dict:
    import httpx

    results = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def one(i: int) -> None:
            item = data[i % len(data)]
            body = {"model": item["model"], "messages": item["messages"], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            stamps, text, usage, status = [], [], None, None
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for c in obj.get("choices", []):
                        piece = c["delta"].get("content")
                        if piece or c.get("finish_reason"):
                            stamps.append(time.perf_counter())
                        if piece:
                            text.append(piece)
            results.append({"index": i % len(data), "status": status, "text": "".join(text),
                            "ttft": stamps[0] - t0 if stamps else None,
                            "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                            "tokens": usage["completion_tokens"] if usage else 0})

        async def worker(w: int) -> None:
            for k in range(per_client):
                await one(w * per_client + k)

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall": wall, "results": results, "cpu": {"client": cpu}}


def client_process(args) -> int:
    spec = json.loads(Path(args.client_spec).read_text())
    out = asyncio.run(_client_main(spec["url"], spec["clients"], spec["per_client"], spec["data"],
                                   spec["max_tokens"]))
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# -- the server side ---------------------------------------------------------------------------------------------


def _process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, every thread) a process has used so far; this process when pid is None."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _http_level(service, data: list[dict], clients: int, per_client: int, max_tokens: int, srv) -> dict:
    """One level through HTTP; with the CPU seconds each process used during it (the server's and the engine
    process's over the whole level, client start included; the client's over its requests only)."""
    process = getattr(service.engine, "process", None)
    engine_pid = process.pid if process is not None and Path(f"/proc/{process.pid}/stat").exists() else None
    server0 = _process_cpu(None)
    engine0 = _process_cpu(engine_pid) if engine_pid else None
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "out.json"
        spec.write_text(json.dumps({"url": srv.url, "clients": clients, "per_client": per_client, "data": data,
                                    "max_tokens": max_tokens, "out": str(out)}))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, __file__, "--client-spec", str(spec)], check=True, env=env, timeout=1200)
        level = json.loads(out.read_text())
    level["cpu"]["server"] = _process_cpu(None) - server0
    if engine_pid:
        level["cpu"]["engine"] = _process_cpu(engine_pid) - engine0
    return level


def _engine_level(engine, prompts: list[tuple], clients: int, per_client: int, max_tokens: int) -> dict:
    from vtcompile.serve.engine import SamplingParams

    results, lock = [], threading.Lock()

    def worker(w: int) -> None:
        for k in range(per_client):
            i = (w * per_client + k) % len(prompts)
            done, stamps, tokens = threading.Event(), [], []
            t0 = time.perf_counter()

            def sink(kind, value):
                if kind == "token":
                    stamps.append(time.perf_counter())
                    tokens.append(value)
                else:
                    done.set()
            engine.submit(prompts[i][0], prompts[i][1], SamplingParams(max_tokens=max_tokens), sink)
            done.wait()
            with lock:
                results.append({"index": i, "status": 200, "tokens_ids": tokens, "tokens": len(tokens),
                                "ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])]})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - t0, "results": results}


def _summary(levels: list[dict], expected: list, key: str) -> dict:
    """One client count over its rounds: latencies pooled, throughput the median round's (and every round's)."""
    res = [r for level in levels for r in level["results"]]
    ok = sum(r["status"] == 200 and r[key] == expected[r["index"]] for r in res)
    ttft = [r["ttft"] for r in res if r["ttft"] is not None]
    gaps = [g for r in res for g in r["gaps"]]
    rates = [len(level["results"]) / level["wall"] for level in levels]
    walls = sorted(levels, key=lambda level: len(level["results"]) / level["wall"])
    median = walls[len(walls) // 2]
    tokens = sum(r["tokens"] for r in median["results"])
    return {"requests": len(res), "correct": ok, "ttft_p50_ms": 1e3 * _pct(ttft, 0.5),
            "ttft_p99_ms": 1e3 * _pct(ttft, 0.99), "itl_p50_ms": 1e3 * _pct(gaps, 0.5),
            "itl_p99_ms": 1e3 * _pct(gaps, 0.99), "req_per_s": len(median["results"]) / median["wall"],
            "rounds_req_per_s": rates,
            "tok_per_s": tokens / median["wall"], "wall_s": sum(level["wall"] for level in levels),
            "cpu_ms_per_request": {k: 1e3 * sum(level["cpu"][k] for level in levels) / max(1, len(res))
                                   for k in levels[0].get("cpu", {}) if all(k in level["cpu"] for level in levels)}}


def _levels(run, clients: list[int], rounds: int, per_client) -> dict:
    """run(c, per) for every client count, the counts interleaved round after round, so that a slow spell of the
    machine touches every count alike (the ratios between counts are what --check reads)."""
    out = {c: [] for c in clients}
    for _ in range(rounds):
        for c in clients:
            out[c].append(run(c, per_client(c)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags(p, "testbed")
    p.add_argument("--variant", action="append", default=[], help="pruned program (passes joined by '+'); repeat "
                   f"(default: {', '.join(DEFAULT_VARIANTS)}; 'unpruned' is always first)")
    p.add_argument("--calibration", help="calibration data (default: testbed on the testbed, synthetic elsewhere)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="samples for calibrating passes (default: the pass's own)")
    p.add_argument("--clients", default="1,4,16,64", help="comma list of concurrent clients (default 1,4,16,64)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per client in each round (default: 64 requests per level, at least 2 per client)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over the client counts, interleaved (default 3); throughput is the median round's, "
                        "latency percentiles pool every round")
    p.add_argument("--questions", type=int, default=16, help="distinct test scenes cycled (default 16)")
    p.add_argument("--ask", choices=["list", "own"], default="list",
                   help="http mode: ask every scene 'what objects are there from left to right?' (list: the testbed's "
                        "longest answers, 10-25 tokens) or its own test question (own: mostly one-word answers, so "
                        "a request is mostly prefill) (default list)")
    p.add_argument("--max-tokens", type=int, default=24, help="max_tokens of every request (default 24)")
    p.add_argument("--max-batch", type=int, default=64, help="engine rows (default 64)")
    p.add_argument("--budget-requests", type=float, default=16,
                   help="KV budget as this many unpruned requests of the longest prompt (default 16)")
    p.add_argument("--kv-budget-mb", type=float, help="KV budget in MB (overrides --budget-requests)")
    p.add_argument("--mode", choices=["auto", "http", "engine"], default="auto")
    p.add_argument("--engine", choices=["process", "thread"], default="process",
                   help="http mode: the engine in a process of its own (vtcompile serve's default) or in a thread of "
                        "the server process")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads of the server (default 1: on a machine shared with other work, two "
                        "OpenMP threads wait on a descheduled one and a prefill took 0.9 s instead of 16 ms)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed (see the docstring)")
    p.add_argument("--out", type=Path, help="results file without suffix (default bench/results/serve-<model>)")
    p.add_argument("--client-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client_spec:
        return client_process(args)

    import logging

    import torch

    from vtcompile import compile_pruned
    from vtcompile.passes import resolve_passes
    from vtcompile.serve.engine import Engine

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    t_start = time.perf_counter()
    adapter = load_bench_model(args)
    mode = args.mode if args.mode != "auto" else ("http" if adapter.frontend.processor is not None else "engine")
    calibration = args.calibration or ("testbed" if args.model == "testbed" else "synthetic")
    variants = ["unpruned"] + [v for v in (args.variant or DEFAULT_VARIANTS) if v != "unpruned"]

    # the prompts: testbed test questions with their scenes (http), or synthetic token-id prompts (engine)
    if mode == "http":
        from vtcompile.data import PromptEncoder
        from vtcompile.testbed.scenes import iter_samples

        import base64
        import io

        scenes = list(iter_samples("test", n=args.questions))
        questions = [LIST_QUESTION if args.ask == "list" else s.question for s in scenes]
        enc = PromptEncoder(adapter.frontend.processor)
        prompts = [enc.batch([q], [s.image])[:2] for q, s in zip(questions, scenes)]
        data = []
        for q, s in zip(questions, scenes):
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            data.append({"model": adapter.spec.label, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]}]})
    else:
        from vtcompile.models.llava import example_inputs

        prompts = [example_inputs(adapter, batch=1, seed=i, pad=0)[:2] for i in range(args.questions)]
    prompt_len = max(int(ids.shape[1]) for ids, _ in prompts)

    rows, admits, failures = [], {}, []

    def per_client(c: int) -> int:
        return args.requests or max(2, -(-64 // c))
    service_threads = args.threads
    budget = None
    for variant in variants:
        spec = [] if variant == "unpruned" else variant.split("+")
        if args.calibration_samples:
            spec = [s + (("," if ":" in s else ":") + f"samples={args.calibration_samples}"
                         if any(pp.calibrate is not None for pp, _ in resolve_passes([s])) else "") for s in spec]
        t0 = time.perf_counter()
        cm = compile_pruned(adapter, spec or None, calibration=calibration if calibrates(spec) else None,
                            progress=False)
        compile_s = time.perf_counter() - t0
        tok = cm.frontend.tokenizer
        # the reference: each prompt alone through cm.generate (greedy), cut after eos
        eos = cm.generation_config().eos_token_id
        expected = []
        for ids, px in prompts:
            out = cm.generate(ids, px, max_new_tokens=args.max_tokens)[0, ids.shape[1]:].tolist()
            cut = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
            expected.append(out[:cut])
        probe = Engine(cm, max_batch=args.max_batch)
        if budget is None:  # the unpruned program sets the one budget every program runs under
            budget = int(args.kv_budget_mb * 1e6) if args.kv_budget_mb else \
                int(args.budget_requests * probe.request_kv_bytes(prompt_len, args.max_tokens))
        probe.kv_budget_bytes = budget
        admits[variant] = {"admits": probe.max_concurrent(prompt_len, args.max_tokens),
                           "request_kv_bytes": probe.request_kv_bytes(prompt_len, args.max_tokens),
                           "compile_s": compile_s}
        del probe
        if mode == "http":
            from vtcompile.serve.app import Service

            service = Service.build(cm, max_batch=args.max_batch, kv_budget_bytes=budget, max_queue=512,
                                    max_tokens_limit=max(args.max_tokens, 1), engine=args.engine)
            texts = [tok.decode(e, skip_special_tokens=True).lstrip() for e in expected]
            from vtcompile.serve.app import ThreadServer

            service_threads = getattr(service.engine, "threads", args.threads)
            with ThreadServer(service) as srv:
                def run(c, per):
                    service.engine.peak_running = 0
                    level = _http_level(service, data, c, per, args.max_tokens, srv)
                    level["peak_running"] = service.engine.peak_running
                    return level
                for c, levels in _levels(run, clients, args.rounds, per_client).items():
                    rows.append({"program": variant, "clients": c, **_summary(levels, texts, "text"),
                                 "peak_running": max(level["peak_running"] for level in levels)})
                    print(json.dumps(rows[-1]), flush=True)
        else:
            engine = Engine(cm, max_batch=args.max_batch, kv_budget_bytes=budget, max_queue=512).start()
            try:
                def run(c, per):
                    engine.peak_running = 0
                    level = _engine_level(engine, prompts, c, per, args.max_tokens)
                    level["peak_running"] = engine.peak_running
                    return level
                for c, levels in _levels(run, clients, args.rounds, per_client).items():
                    rows.append({"program": variant, "clients": c, **_summary(levels, expected, "tokens_ids"),
                                 "peak_running": max(level["peak_running"] for level in levels)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                engine.stop()
        for r in rows:
            if r["program"] == variant and r["correct"] != r["requests"]:
                failures.append(f"{variant} at {r['clients']} clients: {r['correct']}/{r['requests']} answers equal "
                                "the reference")
        del cm

    # targets
    for variant in variants:
        by = {r["clients"]: r for r in rows if r["program"] == variant}
        if 1 in by and 16 in by and by[16]["req_per_s"] < 4 * by[1]["req_per_s"]:
            failures.append(f"{variant}: {by[16]['req_per_s']:.1f} req/s at 16 clients < 4x {by[1]['req_per_s']:.1f} "
                            "at 1 client")
        if variant != "unpruned" and admits[variant]["admits"] < 1.3 * admits["unpruned"]["admits"]:
            failures.append(f"{variant} admits {admits[variant]['admits']} < 1.3x unpruned "
                            f"{admits['unpruned']['admits']}")
    total = time.perf_counter() - t_start

    from tabulate import tabulate

    table = [[r["program"], r["clients"], f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}", f"{r['itl_p50_ms']:.1f}",
              f"{r['itl_p99_ms']:.1f}", f"{r['req_per_s']:.2f}",
              "/".join(f"{x:.1f}" for x in r["rounds_req_per_s"]), f"{r['tok_per_s']:.1f}", r["peak_running"],
              "/".join(f"{r['cpu_ms_per_request'][k]:.1f}" for k in CPU_PARTS if k in r["cpu_ms_per_request"]) or "-",
              f"{r['correct']}/{r['requests']}"] for r in rows]
    headers = ["program", "clients", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "req/s",
               "req/s by round", "tok/s",
               "most running", "CPU ms / request (" + "/".join(CPU_PARTS) + ")", "answers = reference"]
    adm = [[v, admits[v]["request_kv_bytes"], admits[v]["admits"],
            f"{admits[v]['admits'] / max(1, admits['unpruned']['admits']):.2f}x", f"{admits[v]['compile_s']:.1f}"]
           for v in variants]
    label = adapter.spec.label + (" (random weights)" if adapter.spec.random_weights and "random" not in
                                  adapter.spec.label else "")
    out = args.out or RESULTS / f"serve-{args.model}"
    command = "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# Serving: {label}, {mode} mode", "", f"Command: `{command.strip()}`", "",
          f"- date: {time.strftime('%Y-%m-%d')}; machine: {machine()} (shared with other work; numbers move with its "
          "load); CPU only, eager target",
          f"- server: torch.set_num_threads({args.threads}); " + (
              (f"the engine in a process of its own ({service_threads} torch thread(s)); " if args.engine == "process"
               else "the engine loop in a thread of the server; ") + "the clients in a process of their own"
              if mode == "http" else "the clients are threads of the same process"),
          *([f"- questions: {'every scene asked ' + repr(LIST_QUESTION) if args.ask == 'list' else 'each scene its own test question'}"] if mode == "http" else []),
          f"- {len(prompts)} distinct prompts ({prompt_len} tokens at most), max_tokens {args.max_tokens}, greedy; "
          f"closed-loop clients, each sending its requests one after the other; --max-batch {args.max_batch}; "
          f"{args.rounds} round(s) over the client counts, interleaved: req/s and tok/s are the median round's, the "
          "latency percentiles pool every round",
          f"- one KV budget for every program: {budget / 1e6:.3f} MB (= {args.budget_requests:g} unpruned requests of "
          f"the longest prompt + max_tokens)" if not args.kv_budget_mb else
          f"- one KV budget for every program: {budget / 1e6:.3f} MB",
          "- TTFT: request sent -> first content (http: at the client, through HTTP and SSE; engine: submit -> first "
          "token callback); ITL: between content chunks (http) or tokens (engine); req/s and tok/s over the wall "
          "time of the level; 'most running': the most requests in the decode batch at once during the level",
          *(["- CPU ms / request: CPU seconds (user + system) each process used during the level over its requests: "
             "the client process (while sending), the server process (HTTP, chat template, image decoding and the "
             "vision stage) and the engine process (prefill and decode); all of them share the machine's cores"]
            if mode == "http" else []),
          "- every answer is compared with cm.generate on the request alone (greedy, cut after eos)",
          f"- whole run {total:.0f} s (compiles, calibration and references included)", "",
          tabulate(table, headers, tablefmt="github"), "",
          "Admission under the budget (from each program's schedule, before any prefill; longest prompt):", "",
          tabulate(adm, ["program", "KV bytes / request", "admitted at once", "vs unpruned", "compile s"],
                   tablefmt="github"), ""]
    if args.check:
        md += ["--check: " + ("all targets met" if not failures else "MISSED: " + "; ".join(failures)), ""]
    write_results(out, "\n".join(md), {"rows": rows, "admission": admits, "budget_bytes": budget})
    print("\n".join(md))
    if args.check and failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

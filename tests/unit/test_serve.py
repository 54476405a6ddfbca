"""vtcompile serve: the engine (continuous batching == each request alone), the OpenAI routes through the real `openai`
client, every bad request as an OpenAI-style 4xx, a full queue (429), a client that goes away, and the command's
clean start and stop. All traffic goes to 127.0.0.1."""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")


# -- helpers ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cm():
    from vtcompile import compile_pruned

    return compile_pruned("testbed", "fastv")


@functools.lru_cache(maxsize=None)
def _samples(n: int = 6):
    from vtcompile.testbed.scenes import iter_samples

    out = []
    for i, s in enumerate(iter_samples("test", n=n)):
        # list questions answer with many tokens, the others with one word: rows of different lengths
        q = "what objects are there from left to right?" if i % 3 == 0 else s.question
        out.append((q, s.image))
    return out


def _data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(question: str, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                         {"type": "text", "text": question}]}]


def _alone(question: str, image, max_tokens: int) -> list[int]:
    """The tokens cm.generate gives the request on its own (eos included, nothing after it)."""
    from vtcompile.data import PromptEncoder

    cm = _cm()
    ids, pixels, mask = PromptEncoder(cm.frontend.processor).batch([question], [image])
    out = cm.generate(ids, pixels, mask, max_new_tokens=max_tokens)[0, ids.shape[1]:].tolist()
    eos = cm.generation_config().eos_token_id
    for i, t in enumerate(out):
        if t in eos:
            return out[:i + 1]
    return out


class ThreadServer:
    """The app in a thread on a free loopback port (vtcompile.serve.app.ThreadServer); its thread has ended after."""

    def __init__(self, service, manage_engine: bool = True):
        from vtcompile.serve.app import ThreadServer as Server

        self.inner = Server(service, manage_engine, start_seconds=10)

    def __enter__(self):
        self.inner.__enter__()
        self.url = self.inner.url
        return self

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)
        assert not self.inner.thread.is_alive()


def _metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- images (no model) -----------------------------------------------------------------------------------------------
def test_image_parts_policy(tmp_path):
    from PIL import Image

    from vtcompile.serve.errors import ServeError
    from vtcompile.serve.images import ImagePolicy, load_image

    img = Image.new("RGB", (8, 6), (255, 0, 0))
    none = ImagePolicy.make()
    assert load_image(_data_url(img), none).size == (8, 6)
    (tmp_path / "ok").mkdir()
    img.save(tmp_path / "ok" / "a.png")
    img.save(tmp_path / "secret.png")
    (tmp_path / "ok" / "link.png").symlink_to(tmp_path / "secret.png")
    local = ImagePolicy.make(tmp_path / "ok")
    assert load_image(str(tmp_path / "ok" / "a.png"), local).size == (8, 6)
    assert load_image("file://" + str(tmp_path / "ok" / "a.png"), local).size == (8, 6)
    cases = [("data:image/png;base64,@@@", none, "invalid_image"),
             ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), none, "invalid_image"),
             ("", none, "missing_image"), ("https://example.com/a.png", none, "unsupported_image_url"),
             (str(tmp_path / "ok" / "a.png"), none, "local_files_not_allowed"),
             (str(tmp_path / "secret.png"), local, "local_file_outside_allowed_dir"),
             ("../secret.png", local, "local_file_outside_allowed_dir"),
             (str(tmp_path / "ok" / "link.png"), local, "local_file_outside_allowed_dir"),
             (str(tmp_path / "ok" / "nothing.png"), local, "missing_image"),
             (_data_url(img), ImagePolicy.make(max_bytes=16), "image_too_large"),
             (_data_url(img), ImagePolicy.make(max_pixels=10), "image_too_large")]
    for url, policy, code in cases:
        with pytest.raises(ServeError) as e:
            load_image(url, policy)
        assert e.value.code == code and e.value.status == 400, (url[:40], e.value.code, str(e.value))


# -- the engine ------------------------------------------------------------------------------------------------------
def test_engine_concurrent_requests_equal_each_alone():
    """Requests of different lengths join at different steps (and wait for KV budget), the slot cache compacts and
    grows; every greedy answer equals cm.generate on the request alone. Cancelling a running request frees its row
    and its KV bytes."""
    from vtcompile.data import PromptEncoder
    from vtcompile.serve.engine import Engine, SamplingParams

    cm = _cm()
    enc = PromptEncoder(cm.frontend.processor)
    max_tokens = 24
    prompts = [enc.batch([q], [im])[:2] for q, im in _samples()]
    engine = Engine(cm, max_batch=4, max_prefill_batch=2, capacity_step=16)
    one = engine.request_kv_bytes(prompts[0][0].shape[1], max_tokens)
    engine.kv_budget_bytes = int(3.5 * one)  # at most 3 of these at once: the 4th row waits for budget
    # pruning: fastv's per-layer caches are shorter than the unpruned cache of the same prompt
    unpruned = sum((prompts[0][0].shape[1] + max_tokens) * b for b in engine.slot_bytes.values())
    assert one < 0.8 * unpruned
    got = {}

    def sink_for(i):
        got[i] = []
        return lambda kind, value: got[i].append((kind, value))

    pending, reqs, step = list(range(len(prompts))), {}, 0
    while pending or engine.running or engine.waiting:
        # four at once (prefilled two by two, the fourth waits for budget), then one at steps 3 and 5
        for _ in range({0: 4, 3: 1, 5: 1}.get(step, 0)):
            i = pending.pop(0)
            reqs[i] = engine.submit(*prompts[i], SamplingParams(max_tokens=max_tokens), sink_for(i))
        engine.step()
        step += 1
        assert engine.reserved_bytes <= engine.kv_budget_bytes
        assert len(engine.running) <= 3
    stats = engine.stats()
    assert stats["peak_running"] == 3 and stats["kv_reserved_bytes"] == 0 and stats["compactions"] > 0
    for i, (q, im) in enumerate(_samples()):
        tokens = [v for k, v in got[i] if k == "token"]
        assert tokens == _alone(q, im, max_tokens), (i, q)
        assert got[i][-1] == ("done", "stop")
    # a running request cancelled mid-answer leaves at the next step, its row and bytes freed
    done = []
    req = engine.submit(*prompts[0], SamplingParams(max_tokens=max_tokens), lambda k, v: done.append((k, v)))
    engine.step()
    assert req.row >= 0 and engine.reserved_bytes == req.kv_bytes
    engine.cancel(req)
    engine.step()
    assert done[-1] == ("done", "cancelled") and not engine.running and engine.reserved_bytes == 0


# -- the HTTP server -------------------------------------------------------------------------------------------------
def test_server_openai_client_concurrent_equals_alone_and_bad_requests():
    """The engine in a process of its own (vtcompile serve's default): tokens, metrics and cancels cross its pipe."""
    import httpx
    import openai
    from PIL import Image

    from vtcompile.serve.app import Service

    cm = _cm()
    service = Service.build(cm, max_batch=4, max_tokens_limit=64, max_image_bytes=64 * 1024, engine="process")
    tok = cm.frontend.tokenizer
    with ThreadServer(service) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["testbed"]

        def ask(i):
            q, im = _samples()[i]
            if i % 2:
                stream = client.chat.completions.create(model="testbed", messages=_messages(q, im), max_tokens=24,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
                chunks = list(stream)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                return text, finish, chunks[-1].usage.completion_tokens, chunks[-2].model_extra["vtcompile"]
            r = client.chat.completions.create(model="testbed", messages=_messages(q, im), max_tokens=24,
                                               temperature=0)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens, \
                r.model_extra["vtcompile"]

        with ThreadPoolExecutor(6) as pool:  # all at once: they share decode steps
            answers = list(pool.map(ask, range(len(_samples()))))
        for i, (q, im) in enumerate(_samples()):
            ref = _alone(q, im, 24)
            text, finish, n, extra = answers[i]
            assert text == tok.decode(ref, skip_special_tokens=True).lstrip() and finish == "stop" and n == len(ref)
            assert extra["visual_tokens"] == 144 and extra["visual_tokens_kept"] == [144, 144, 72, 72, 72, 72]
            assert extra["kv_bytes"] > 0
        # a stop string cuts the answer (and ends the request)
        q, im = _samples()[0]
        full = answers[0][0]
        r = client.chat.completions.create(model="testbed", messages=_messages(q, im), max_tokens=24, temperature=0,
                                           stop=[","])
        assert r.choices[0].message.content == full.split(",")[0] and r.choices[0].finish_reason == "stop"

        # bad requests: OpenAI-style JSON errors with 4xx, never a traceback
        good = {"model": "testbed", "messages": _messages(q, im), "max_tokens": 4}
        noise = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))
        bad = [
            (b"{not json", 400, "invalid_json"),
            ({**good, "model": "gpt-4o"}, 404, "model_not_found"),
            ({**good, "messages": [{"role": "user", "content": q}]}, 400, "missing_image"),
            ({**good, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": q}]}]}, 400, "invalid_image"),
            ({**good, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(noise)}}, {"type": "text", "text": q}]}]},
             400, "image_too_large"),
            ({**good, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(im)}},
                {"type": "image_url", "image_url": {"url": _data_url(im)}}, {"type": "text", "text": q}]}]},
             400, "too_many_images"),
            ({**good, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(im)}},
                {"type": "text", "text": "what color is the circle? " * 80}]}]}, 400, "context_length_exceeded"),
            ({**good, "max_tokens": 0}, 400, "invalid_value"),
            ({**good, "max_tokens": 65}, 400, "invalid_value"),
            ({**good, "max_completion_tokens": "many"}, 400, "invalid_value"),
            ({**good, "temperature": -1}, 400, "invalid_value"),
            ({**good, "messages": "hello"}, 400, "invalid_value"),
            ({**good, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}]}]}, 400,
             "unsupported_image_url"),
        ]
        for body, status, code in bad:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = httpx.post(srv.url + "/v1/chat/completions", content=raw,
                           headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == status, (code, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["code"] == code and err["message"] and "Traceback" not in r.text, (code, err)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=_messages(q, im))
        metrics = httpx.get(srv.url + "/metrics").text
        assert _metric(metrics, "vtcompile_requests_total", status="200") == len(_samples()) + 1
        assert _metric(metrics, "vtcompile_requests_total", status="400") == len(bad) - 1
        assert _metric(metrics, "vtcompile_requests_total", status="404") == 2
        assert _metric(metrics, "vtcompile_time_to_first_token_seconds_count") == len(_samples()) + 1
        assert _metric(metrics, "vtcompile_running") == 0 and _metric(metrics, "vtcompile_kv_reserved_bytes") == 0
        # the stop string's request was cancelled, or had reached eos in the engine before the cancel arrived
        assert sum(_metric(metrics, "vtcompile_request_finish_total", reason=r) for r in ("stop", "cancelled")) == \
            len(_samples()) + 1
    assert service.engine.process.exitcode == 0  # the server's shutdown stopped the engine process


def test_a_dead_engine_process_ends_its_requests_and_refuses_new_ones():
    """The engine process killed while a request waits in it: the stream ends with an error instead of hanging, the
    next request gets 503, and nothing is left running."""
    import signal

    import httpx

    from vtcompile.serve.app import Service

    q, im = _samples()[1]
    body = {"model": "testbed", "messages": _messages(q, im), "max_tokens": 8, "stream": True}
    service = Service.build(_cm(), max_batch=2, engine="process")
    with ThreadServer(service, manage_engine=False) as srv:  # the engine loop is not started: the request waits
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", srv.url + "/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
                os.kill(service.engine.process.pid, signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and "the request ended: error" in rest[-2], rest
            r = client.post(srv.url + "/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"], r.text
        service.engine.stop()
    assert service.engine.process.exitcode == -signal.SIGKILL


def _until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_full_queue_gets_429_and_a_client_that_leaves_frees_its_place(engine):
    """The engine loop is held back, so requests stay queued: one waits (max_queue 1), the next gets 429; the waiting
    client disconnects mid-stream and its request is dropped (metrics: cancelled, nothing waiting or running)."""
    import httpx

    from vtcompile.serve.app import Service

    q, im = _samples()[1]
    body = {"model": "testbed", "messages": _messages(q, im), "max_tokens": 8, "stream": True}
    service = Service.build(_cm(), max_batch=1, max_queue=1, engine=engine)
    with ThreadServer(service, manage_engine=False) as srv:
        with httpx.Client(timeout=30) as first:
            with first.stream("POST", srv.url + "/v1/chat/completions", json=body) as stream:
                line = next(stream.iter_lines())
                assert line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"]["role"] == "assistant"
                assert _until(lambda: service.engine.stats()["waiting"] == 1)  # process: once its stats arrive
                r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        # the first client has gone; the loop starts and lets its request go without running it
        service.engine.start()
        try:
            for _ in range(100):
                m = httpx.get(srv.url + "/metrics").text
                if _metric(m, "vtcompile_request_finish_total", reason="cancelled") == 1:
                    break
                time.sleep(0.1)
            assert _metric(m, "vtcompile_request_finish_total", reason="cancelled") == 1
            assert _metric(m, "vtcompile_waiting") == 0 and _metric(m, "vtcompile_running") == 0
            assert _metric(m, "vtcompile_requests_total", status="429") == 1
            # and the place is free again: the next request is answered
            r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
        finally:
            service.engine.stop()


# -- the command -----------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_serve_command_answers_and_stops_cleanly(tmp_path):
    """`vtcompile serve --port 0` logs its port, answers the openai client, and on SIGTERM exits 0 with no process
    left behind; flags that cannot work are one-line errors."""
    import openai

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "vtcompile", "serve", "--replicas", "2"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--replicas applies to --ray" in r.stderr and "Traceback" not in r.stderr
    err = open(tmp_path / "err", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vtcompile", "serve", "--port", "0", "--max-batch", "2",
                             "--kv-budget-mb", "1"], stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path)
    try:
        port = None
        for _ in range(600):
            text = (tmp_path / "err").read_text()
            if "listening on http://127.0.0.1:" in text:
                port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
                break
            assert proc.poll() is None, text
            time.sleep(0.2)
        assert port, (tmp_path / "err").read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        q, im = _samples()[1]
        r = client.chat.completions.create(model="testbed", messages=_messages(q, im), max_tokens=8)
        assert r.choices[0].finish_reason == "stop" and r.model_extra["vtcompile"]["kv_bytes"] > 0
        kids = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert not [k for k in kids if Path(f"/proc/{k}").exists()]
        text = (tmp_path / "err").read_text()
        assert "Traceback" not in text and "stopped" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()

"""vtcompile serve --ray: two Ray Serve replicas on a local Ray instance answer like one process.

Ray runs inside a loopback-only network namespace (`unshare -n`, then `ip link set lo up`): otherwise it probes
cloud-metadata addresses and uses the external interface. The test re-runs this file as a child inside the namespace;
the child starts `vtcompile serve ART --ray --replicas 2` over an artifact of the testbed with FastV that the parent
saved (each replica loads it, as a deployment does, instead of compiling), sends requests with the openai client, stops
the server and reports what it saw as JSON; the parent compares the answers with cm.generate on each request alone."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000  # free: nothing else lives in the new network namespace
N_REQUESTS = 8


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2) for a loopback-only network namespace"
    if os.geteuid() != 0:
        return "needs root for `unshare -n` (a loopback-only network namespace for Ray)"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare -n is not permitted here ({r.stderr.strip()})"
    return None


def test_ray_replicas_share_requests_and_answer_as_one_process(tmp_path):
    pytest.importorskip("ray.serve")
    pytest.importorskip("openai")
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    from tests.unit.test_serve import _alone, _cm, _samples

    cm = _cm()
    samples = [_samples()[i % len(_samples())] for i in range(N_REQUESTS)]
    expected = [cm.frontend.tokenizer.decode(_alone(q, im, 16), skip_special_tokens=True).lstrip()
                for q, im in samples]
    before = set(glob.glob("/tmp/vtray-*")) | set(glob.glob("/tmp/ray/session_*"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    out = tmp_path / "result.json"
    art = cm.save(tmp_path / "art")
    cmd = f"ip link set lo up && exec {sys.executable} {Path(__file__)} --child {out} {art}"
    r = subprocess.run(["unshare", "-n", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=400,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    got = json.loads(out.read_text())
    assert got["returncode"] == 0, got["log"][-4000:]
    assert [a["text"] for a in got["answers"]] == expected
    replicas = {a["replica"] for a in got["answers"]}
    assert len(replicas) == 2, got["answers"]  # the proxy spread the requests over both replicas
    assert "Traceback" not in got["log"], got["log"][-4000:]
    after = set(glob.glob("/tmp/vtray-*")) | set(glob.glob("/tmp/ray/session_*"))
    assert not after - before, after - before  # Ray's session directory was removed


def _child(out: Path, art: Path) -> int:
    """Inside the namespace: serve on Ray, ask, stop; write what happened to `out`."""
    import base64
    import io

    import openai

    from vtcompile.testbed.scenes import iter_samples

    log = out.with_suffix(".log")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vtcompile", "serve", str(art), "--ray", "--replicas", "2",
                                 "--port", str(PORT), "--max-batch", "4"], stdout=err, stderr=subprocess.STDOUT)
    answers, rc = [], None
    try:
        deadline = time.time() + 300
        while "listening on" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                why = f"exited with {proc.returncode}" if proc.returncode is not None else "no answer in 300 s"
                raise RuntimeError(f"the server did not start ({why}); its log ends:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none", max_retries=3, timeout=120)
        scenes = list(iter_samples("test", n=6))

        def ask(i):
            s = scenes[i % len(scenes)]
            q = "what objects are there from left to right?" if (i % len(scenes)) % 3 == 0 else s.question
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": q}]}]
            r = client.chat.completions.create(model="testbed", messages=msgs, max_tokens=16, temperature=0)
            return {"text": r.choices[0].message.content, "replica": r.model_extra["vtcompile"]["replica"]}

        ask(0)  # both replicas are up once serve.run returned; one answer first warms the proxy
        with ThreadPoolExecutor(N_REQUESTS) as pool:
            answers = list(pool.map(ask, range(N_REQUESTS)))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.write_text(json.dumps({"answers": answers, "returncode": rc, "log": log.read_text()}))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.exit(_child(Path(sys.argv[2]), Path(sys.argv[3])))

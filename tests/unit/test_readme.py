"""Every code block of README.md runs as written: each fenced bash or python block is extracted and run in a fresh
directory of its own (so a block may use only what it makes itself), `vtcompile` and `python3` being this
checkout's. A block preceded by `<!-- readme-test: slow -->` runs in the slow tier (conftest.py: "readme-slow" in its
id); `<!-- readme-test: skip (REASON) -->` leaves it out and must say why (the set-up blocks install packages). A
fenced block of any other language, or a marker without a reason, fails the accounting test."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!-- readme-test: (slow|skip)(?: \((.+)\))? -->$")


def blocks(text: str) -> list[dict]:
    """Fenced blocks in order: language, code, first line number, and the marker on the line before (blank lines
    between them allowed)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = _MARK.match(lines[k].strip()) if k >= 0 else None
        out.append({"lang": m.group(1), "code": "\n".join(lines[i + 1:j]) + "\n", "line": i + 1,
                    "mark": mark.group(1) if mark else None, "reason": mark.group(2) if mark else None})
        i = j + 1
    return out


def _params():
    for b in blocks(README.read_text()):
        if b["mark"] == "skip" or b["lang"] not in ("bash", "python"):
            continue
        tier = "readme-slow" if b["mark"] == "slow" else "readme"
        yield pytest.param(b, id=f"{tier}-{b['lang']}-line{b['line']}")


def test_every_block_runs_or_says_why_not():
    found = blocks(README.read_text())
    assert len(found) >= 5
    for b in found:
        where = f"README.md line {b['line']}"
        if b["mark"] == "skip":
            assert b["reason"], f"{where}: a skipped block must say why: <!-- readme-test: skip (REASON) -->"
        else:
            assert b["lang"] in ("bash", "python"), f"{where}: ```{b['lang']}``` blocks cannot be run; use bash or " \
                                                    "python, or mark it <!-- readme-test: skip (REASON) -->"
    assert sum(b["mark"] != "skip" for b in found) >= 4


def _shims(bin_dir: Path) -> None:
    """`vtcompile` and `python3` of this checkout (the installed console script may belong to another one)."""
    for name, cmd in (("vtcompile", f'exec "{sys.executable}" -m vtcompile "$@"'),
                      ("python3", f'exec "{sys.executable}" "$@"')):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{cmd}\n")
        path.chmod(0o755)


def _run_block(cmd: list, work: Path, env: dict, timeout: float) -> tuple:
    """(exit code or "timed out after N s", stdout, stderr) of a block run in a session of its own. Whatever it
    left running in the background (a server a failed line never stopped) is killed at the end: it would otherwise
    outlive the test and, holding an inherited pipe, hide the block's exit until the timeout (CI waited 1500 s so
    on a block that had failed at once)."""
    import signal

    with open(work.parent / "stdout.txt", "w+") as out, open(work.parent / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = f"timed out after {timeout:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return returncode, out.read(), err.read()


@pytest.mark.parametrize("block", list(_params()))
def test_readme_block_runs(block, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shims(bin_dir)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
               # scalar C++ kernels compile in half the time (what test_targets.fast_inductor does in-process), in a
               # cache of this block's own: another process's vectorised kernels must not be reused here
               TORCHINDUCTOR_VEC_ISA_OK="0", TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(dir=tmp_path, prefix="ind-"))
    if block["lang"] == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", block["code"]]
    else:
        script = work / "block.py"
        script.write_text(block["code"])
        cmd = [sys.executable, str(script)]
    returncode, out, err = _run_block(cmd, work, env, timeout=900)
    logs = "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(work.glob("*.log")))
    assert returncode == 0, f"README.md line {block['line']} failed ({returncode}):\n{out[-2000:]}\n{err[-4000:]}{logs}"
    assert "Traceback" not in err, err[-4000:]

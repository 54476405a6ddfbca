"""Cold start of `vtcompile run ART/`: process start to first token, per artifact target (eager, inductor, onnx).

One artifact per target is written first (untimed: `vtcompile optimize --pass P --target T --out DIR --no-check`,
its compile time reported apart). Then each target's artifact answers one question in --runs fresh processes,
`vtcompile run ART --image IMG --prompt Q --max-new-tokens 1`, started one after another in turn (eager, inductor,
onnx, eager, ...). Each process gets a new, empty TORCHINDUCTOR_CACHE_DIR, so nothing compiled by an earlier process
can be reused: an inductor artifact that compiled anything at start would show it there (the bench counts the files
left in that directory; AOTInductor packages leave none) and in the run's own "compiled / loaded stages" line.
Measured from outside: seconds from starting the process to the first byte of the answer on its stdout (the
streamed answer of one new token is printed when that token is ready: time to first token, process start included)
and to its exit. Reported from inside (stderr/stdout of the run): the artifact's load time and the in-process time
to first token (vision, merge, prefill, first token; compilation and stage loading excluded). Medians over --runs,
and the first run apart (the one that reads the files from disk rather than the page cache, when they were not read
just before).

    python bench/cold_start.py                          # testbed, fastv, eager + inductor + onnx
    python bench/cold_start.py --targets eager --runs 2  # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what color is the circle?"


def vtcompile(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtcompile", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def build(target: str, passes: list[str], model: str, out: Path) -> float:
    """Write the artifact; returns the seconds `optimize` took (compile included)."""
    t0 = time.perf_counter()
    r = vtcompile("optimize", "--model", model, *[a for p in passes for a in ("--pass", p)], "--target", target,
                  "--out", out, "--no-check")
    if r.returncode != 0:
        raise SystemExit(f"optimize --target {target} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def cold_run(art: Path, image: Path, threads: int | None) -> dict:
    """One fresh process answering one question with one new token; timed from outside and read from its output."""
    cache = Path(tempfile.mkdtemp(prefix="vtcompile-cold-inductor-"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "vtcompile", "run", str(art), "--image", str(image), "--prompt", QUESTION,
           "--max-new-tokens", "1"]
    t0 = time.perf_counter()
    # unbuffered: communicate() reads the pipe itself, and a buffered read(1) would keep what it read ahead
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, bufsize=0)
    first = proc.stdout.read(1)  # the streamed answer: printed when the first token is ready
    t_first = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=600)
    t_exit = time.perf_counter() - t0
    out, err = (first + rest).decode(), err.decode()
    if proc.returncode != 0:
        raise SystemExit(f"run {art} failed ({proc.returncode}):\n{err[-3000:]}")
    left = sum(1 for p in cache.rglob("*") if p.is_file())
    shutil.rmtree(cache, ignore_errors=True)
    loaded = re.search(r"loaded \S+ \(\w+\) in ([\d.]+) s", err)
    ttft = re.search(r"time to first token s\s*│\s*([\d.]+)", out)
    setup = re.search(r"compiled / loaded stages s \(not in the times\)\s*│\s*([\d.]+) / ([\d.]+)", out)
    return {"first_token_s": t_first, "exit_s": t_exit, "load_s": float(loaded.group(1)) if loaded else None,
            "ttft_s": float(ttft.group(1)) if ttft else None,
            "compiled_s": float(setup.group(1)) if setup else 0.0, "stage_load_s": float(setup.group(2)) if setup
            else 0.0, "inductor_cache_files": left, "answer": out.splitlines()[0].strip() if out else ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed")
    p.add_argument("--pass", dest="passes", action="append", default=[], help="default: fastv")
    p.add_argument("--targets", default="eager,inductor,onnx", help="comma list (default eager,inductor,onnx)")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per target (default 5)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's)")
    p.add_argument("--keep", type=Path, help="write the artifacts here (and reuse them when present)")
    p.add_argument("--out", type=Path, help="markdown file (default bench/results/cold_start-<model>.md)")
    args = p.parse_args(argv)
    passes = args.passes or ["fastv"]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    work = Path(tempfile.mkdtemp(prefix="vtcompile-cold-"))
    root = args.keep or work
    try:
        r = vtcompile("testbed", "data", "--out", work / "data", "-n", "1", "--force")
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        image = work / "data" / "images" / "test" / "000000.png"
        arts, built = {}, {}
        for t in targets:
            arts[t] = root / f"art-{args.model}-{t}"
            built[t] = None if (arts[t] / "manifest.json").is_file() else build(t, passes, args.model, arts[t])
            print(f"{t}: artifact {arts[t]}" + (f" written in {built[t]:.1f} s" if built[t] else " reused"),
                  flush=True)
        runs = {t: [] for t in targets}
        for i in range(args.runs):
            for t in targets:  # interleaved: a slow spell of the machine hits every target alike
                runs[t].append(cold_run(arts[t], image, args.threads))
                print(f"run {i + 1} {t}: first token {runs[t][-1]['first_token_s']:.2f} s, exit "
                      f"{runs[t][-1]['exit_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(t, key):
        vals = [r[key] for r in runs[t] if r[key] is not None]
        return statistics.median(vals) if vals else float("nan")

    headers = ["target", "start -> first token s (median)", "first run", "start -> exit s", "artifact load s",
               "TTFT in process s", "compiled s at start", "inductor cache files left", "optimize s (untimed above)"]
    rows = [[t, f"{med(t, 'first_token_s'):.2f}", f"{runs[t][0]['first_token_s']:.2f}", f"{med(t, 'exit_s'):.2f}",
             f"{med(t, 'load_s'):.2f}", f"{med(t, 'ttft_s'):.3f}", f"{max(r['compiled_s'] for r in runs[t]):.1f}",
             max(r["inductor_cache_files"] for r in runs[t]), f"{built[t]:.0f}" if built[t] else "reused"]
            for t in targets]
    print(tabulate(rows, headers=headers, tablefmt="simple_outline"))
    out = args.out or RESULTS / f"cold_start-{args.model}.md"
    cmd = "python bench/cold_start.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join([
        f"# Cold start of `vtcompile run ART/`: {args.model}, {' + '.join(passes)}",
        "",
        f"`{cmd.strip()}` on {datetime.date.today()}, {machine()}.",
        f"{args.runs} fresh processes per target, interleaved, each with an empty TORCHINDUCTOR_CACHE_DIR; question "
        f"{QUESTION!r}, one new token (bench/cold_start.py says how each column is measured).",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        "Answers: " + ", ".join(f"{t}: {runs[t][0]['answer']!r}" for t in targets),
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation speed of pruned vs unpruned programs per target, with transformers' own generate as the anchor, in
one run (so every figure is a ratio).

For each target, batch size and program (unpruned and every --variant), `generate` runs greedy for exactly
--new-tokens tokens per row (no eos) on the same prompts; transformers' `generate` (SDPA attention, its default
dynamic cache) runs the unpruned model beside them. Calls are interleaved (A B C A B C ...) so background load
hits all alike; medians over --runs timed calls after --warmup calls (the first call of a compiled program
compiles; its time is reported apart as "first call s").
Reported per row: TTFT (vision + merge + prefill + first token), decode ms per token (the steps after the first
token), decode tokens/s over the batch, its ratio to transformers' tokens/s (the median over the rounds of the
ratio within each round, so a slow spell of the machine that spans a round hits both sides), the prompt's KV
cache after prefill (measured from the caches the runtime allocated, all rows) and its ratio to the unpruned
program's, the analytic KV ratio from the report, and peak memory above the level before the call (one more call,
untimed: common.peak_memory). Transformers' TTFT and per-token times come from the times its streamer receives tokens.

--check exits 1 when a floor is not met in this run: inductor decode tokens/s >= --floor x transformers' at
batch 1 for every program (the default floor is 2.0 on the testbed and 1.0 elsewhere), and the measured KV ratio
== the analytic one for every program without branches (exact; rows of a DyVTE batch keep different lengths).

    python bench/generate.py --model testbed
    python bench/generate.py --model llava-1.5-7b --random-weights --layers 4 --dtype bfloat16
    python bench/generate.py --model tiny --targets eager --runs 2 --check        # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PEAK_NOTE, RESULTS, calibrates, load_bench_model, machine, mb, model_flags,  # noqa: E402
                    peak_memory, sync)

HF = "transformers generate (sdpa, unpruned)"
# The DyVTE setting the DyVTE bench chose on the testbed's val questions (bench/README.md)
TESTBED_DYVTE = "dyvte:samples=2048,loss_slack=0.1,layers=1/2/3/4,threshold=0.99,label=token,max_loss=0"


def default_variants(model: str) -> list[str]:
    # random weights: the published rule on 32 synthetic prompts (routers that exit; risk control would hold them)
    dyvte = TESTBED_DYVTE if model == "testbed" else "dyvte:samples=32,label=token,max_loss=0"
    return ["fastv", "fitprune:budget=0.5", dyvte]


class StreamClock:
    """A streamer that only records when tokens arrive (transformers calls put() with the prompt first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(adapter, ids, pixels, mask, new: int):
    """transformers' own generate on the unpruned model: (ttft s, decode s) for `new` tokens per row."""
    clock = StreamClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        adapter.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, streamer=clock,
                               pad_token_id=adapter.frontend.generation.get("pad_token_id") or 0)
    end = time.perf_counter()
    first = clock.times[1] if len(clock.times) > 1 else end
    return first - t0, end - first


def prompts_for(cm, batch: int, text_tokens: int):
    """A batch of real testbed questions (with the processor), else synthetic prompts without padding."""
    if cm.frontend.processor is not None and cm.spec.name == "testbed":
        from vtcompile.data import PromptEncoder, load_data, sample_image

        data, _ = load_data("testbed", limit=batch, split="test")
        return PromptEncoder(cm.frontend.processor).batch([s.question for s in data], [sample_image(s) for s in data])
    from vtcompile.models.llava import example_inputs

    before = text_tokens // 4
    return example_inputs(cm.adapter, batch=batch, text_before=before, text_after=text_tokens - before, pad=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags(p, "testbed")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--variant", action="append", default=[],
                   help="a pruned program, passes joined by '+' (default: fastv, fitprune:budget=0.5 and dyvte; on the "
                        f"testbed dyvte is the DyVTE bench's chosen setting {TESTBED_DYVTE})")
    p.add_argument("--calibration", help="calibration data (default: testbed on the testbed, synthetic elsewhere)")
    p.add_argument("--targets", default="eager,inductor", help="comma list (default eager,inductor)")
    p.add_argument("--batch", type=int, action="append", help="prompts per call; repeat (default 1 and 8)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default 32)")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens of synthetic prompts (default 32)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--check", action="store_true", help="exit 1 when a floor is not met (see the docstring)")
    p.add_argument("--floor", type=float, help="inductor tokens/s over transformers' at batch 1 (default 2.0 on "
                                               "the testbed, 1.0 elsewhere)")
    p.add_argument("--out", type=Path, help="markdown file (default bench/results/generate-<model>-<dtype>.md)")
    args = p.parse_args(argv)
    batches = args.batch or [1, 8]
    if any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        p.error(f"--batch takes distinct positive sizes, got {batches}")
    if args.new_tokens < 2 or args.runs < 1 or args.warmup < 0:
        p.error("--new-tokens must be >= 2, --runs >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    floor = args.floor if args.floor is not None else (2.0 if args.model == "testbed" else 1.0)
    command = "python bench/generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()[0]

    from vtcompile import compile_pruned

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = load_bench_model(args, device)
    calibration = args.calibration or ("testbed" if args.model == "testbed" else "synthetic")
    variants = {"unpruned": None, **{v: v.split("+") for v in (args.variant or default_variants(args.model))}}
    eager = {}
    for name, spec in variants.items():
        t0 = time.perf_counter()
        eager[name] = compile_pruned(adapter, spec, calibration=calibration if calibrates(spec) else None,
                                     progress=False)
        print(f"[bench] compiled {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    prompts = {b: prompts_for(eager["unpruned"], b, args.text_tokens) for b in batches}
    new = args.new_tokens
    rows, checks, notes = [], [], []
    kv_base = {}
    for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
        try:
            cms = {n: (cm if target == "eager" else cm.with_target(target)) for n, cm in eager.items()}
        except Exception as exc:  # noqa: BLE001 - reported, the other targets still run
            notes.append(f"{target}: skipped ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        for b in batches:
            ids, pixels, mask = prompts[b]
            first_call = {}
            for name, cm in cms.items():  # the first call compiles the decode step (and lazy stages)
                t0 = time.perf_counter()
                cm.generate(ids, pixels, mask, max_new_tokens=new, eos_token_id=[])
                sync(device)
                first_call[name] = time.perf_counter() - t0
            stats = {n: [] for n in [*cms, HF]}

            def call(name, cms=cms):
                if name == HF:
                    return hf_generate(adapter, ids, pixels, mask, new)
                cms[name].generate(ids, pixels, mask, max_new_tokens=new, eos_token_id=[])
                s = cms[name].last_generation
                return s.ttft_seconds, s.decode_seconds

            print(f"[bench] {target}, batch {b}: {args.runs} runs of {new} tokens each, interleaved", file=sys.stderr,
                  flush=True)
            for run in range(args.warmup + args.runs):
                for name in stats:
                    ttft, decode = call(name)
                    sync(device)
                    if run >= args.warmup:
                        stats[name].append((ttft, decode, None if name == HF else cms[name].last_generation))
            peak = {name: peak_memory(lambda: call(name), device) for name in stats}
            med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for n, v in stats.items()}
            tps = {n: (new - 1) * b / d for n, (_, d) in med.items()}
            # vs transformers: the median over rounds of the ratio within a round (transformers' decode time / the
            # program's, same tokens and batch), so a slow spell of the machine that spans a round cancels out
            paired = {n: sorted(h[1] / x[1] for h, x in zip(stats[HF], v)) for n, v in stats.items()}
            for name in stats:
                ttft, decode = med[name]
                if name == HF:
                    rows.append([target, name, b, f"{ttft * 1e3:.1f}", f"{decode / (new - 1) * 1e3:.2f}",
                                 f"{tps[name]:.1f}", "1.00x", "", "", "", mb(peak[name]), ""])
                    continue
                last = stats[name][-1][2]
                kv = sum(last.kv_prompt_bytes.values())
                kv_base.setdefault((target, b), kv if name == "unpruned" else None)
                base = kv_base[(target, b)]
                f = cms[name].report.flops
                analytic = f.kv_bytes / f.baseline_kv_bytes
                measured = kv / base if base else float("nan")
                rows.append([target, name, b, f"{ttft * 1e3:.1f}", f"{decode / (new - 1) * 1e3:.2f}",
                             f"{tps[name]:.1f}", f"{statistics.median(paired[name]):.2f}x", f"{kv / 1e6:.3f}",
                             f"{measured:.3f}",
                             f"{analytic:.3f}" + (" (no exit)" if cms[name].report.exits else ""),
                             mb(peak[name]), f"{first_call[name]:.1f}"])
                if target == "inductor" and b == 1:
                    ratio = statistics.median(paired[name])
                    checks.append((ratio >= floor, f"inductor {name}, batch 1: decode {ratio:.2f}x transformers' "
                                                   f"tokens/s (floor {floor:.2f}x; rounds {paired[name][0]:.2f}-"
                                                   f"{paired[name][-1]:.2f}x)"))
                if not cms[name].report.exits and b == 1:
                    # batch 1 has no padding: the measured cache is exactly the analytic one
                    ok = abs(measured - _analytic_ratio(cms[name], ids, mask)) < 1e-12
                    checks.append((ok, f"{target} {name}: measured KV ratio {measured:.4f} == analytic "
                                       f"{_analytic_ratio(cms[name], ids, mask):.4f}"))
        del cms
    headers = ["target", "program", "batch", "TTFT ms", "decode ms/token", "decode tokens/s", "vs transformers",
               "KV MB (batch)", "KV ratio", "KV ratio (analytic)", "peak mem MB", "first call s"]
    print(tabulate(rows, headers=headers, tablefmt="simple_outline"))
    for ok, text in checks:
        print(f"check: {'ok' if ok else 'FAILED'}: {text}")
    for n in notes:
        print(f"note: {n}")
    dtype = str(adapter.dtype).replace("torch.", "")
    suffix = f"{f'-{args.layers}l' if args.layers else ''}-{dtype}{'-cuda' if device.type == 'cuda' else ''}"
    out = args.out or RESULTS / f"generate-{args.model}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    n_prompt = prompts[batches[0]][0].shape[1]
    lines = [
        f"# Generation speed: {adapter.spec.label}, {dtype}",
        "",
        f"Command: `{command}`",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {machine()}",
        f"- prompts: {'testbed test questions' if args.model == 'testbed' else 'synthetic'}, {n_prompt} tokens in "
        f"the first batch's rows; {new} new tokens per row (greedy, no eos); batch {', '.join(map(str, batches))}",
        f"- {args.runs} timed runs after {args.warmup} warm-up, programs interleaved; medians. TTFT = vision + merge "
        "+ prefill + first token; decode = the steps after the first token; tokens/s over the batch; 'vs transformers' "
        "= the median over the rounds of transformers' decode time / the program's in the same round",
        "- KV MB: the prompt's cache after prefill, all rows (padding included); KV ratio: vs the unpruned program "
        "in the same run; analytic: the report's per-prompt ratio (64 text tokens; for DyVTE the no-exit case)",
        f"- peak mem: {PEAK_NOTE}",
        f"- machine load (1-min load average) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        *[f"- check: {'ok' if ok else 'FAILED'}: {text}" for ok, text in checks],
        *[f"- note: {n}" for n in notes],
    ]
    out.write_text("\n".join(lines) + "\n")
    print(f"written {out}")
    return 1 if args.check and not all(ok for ok, _ in checks) else 0


def _analytic_ratio(cm, ids, mask) -> float:
    """The report's KV ratio for this batch's real prompt lengths (rows summed)."""
    from vtcompile.compiler.flops import FlopsReport

    f = cm.report.flops
    pruned = base = 0
    for length in mask.sum(1).tolist():
        r = FlopsReport(f.geometry, f.n_visual, int(length) - f.n_visual, f.schedule, f.mlp_schedule, f.dtype_bytes)
        pruned, base = pruned + r.kv_bytes, base + r.baseline_kv_bytes
    return pruned / base


if __name__ == "__main__":
    sys.exit(main())

"""The token selectors' own cost next to what they save, in one run.

For each selector (gprune, divprune, cdpruner before the LLM and dart at its cut inside it, at their published
defaults, or --variant), on one prompt of the model: the selection alone (the pass's own function on the tensors the
graph hands it: an image's projected visual tokens, and for cdpruner the prompt's input embeddings and text mask;
for dart the prompt's states [1, S, D] and a per-token norm, its key norms and final norm left out), and the whole
prefill unpruned and pruned on the same target, interleaved; medians of --runs after --warmup. FLOPs: the
selection's (analytic: similarity matrix 2P^2 D, plus G-Prune's propagation 2P^2 per step, DivPrune's k P distance
updates, CDPruner's relevance 2(S + P) D and greedy DPP k^2 P, DART's 2 x pivots cosine rows 2 S D) against the true
FLOPs it saves (the report's). --check exits 1 when a selection costs more than 10% of the prefill time it saves, or
more than 1% of the FLOPs.

    python bench/selector_cost.py --model llava-1.5-7b --random-weights --layers 4 --dtype bfloat16
    python bench/selector_cost.py --model tiny --runs 3 --check        # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, model_flags, sync  # noqa: E402


def selector_flops(name: str, config, per_image: int, dim: int, seq: int) -> float:
    """True FLOPs (2 x MACs) of one image's selection (DART: the prompt's, `seq` tokens)."""
    from vtcompile.compiler.scorers import kept_per_image

    sim = 2.0 * per_image * per_image * dim
    if name == "gprune":
        return sim + config.steps * 2.0 * per_image * per_image
    if name == "dart":
        return 2.0 * 2 * config.pivots * seq * dim + 2.0 * seq * dim  # pivot rows of cosine similarity, unit vectors
    k = kept_per_image(config.keep, per_image)
    if name == "cdpruner":  # relevance (text mean, cosine), kernel, greedy MAP: step i updates i Cholesky rows of P
        return sim + 2.0 * (seq + per_image) * dim + 2.0 * per_image * per_image + 2.0 * k * k * per_image
    return sim + k * per_image


def selection_fn(name: str, config, per_image: int, n_visual: int):
    """The pass's own selection function as f(embeds [1, S, D], attention_mask [1, S], visual [1, S]) on one
    image (DART: on the prompt)."""
    from vtcompile.compiler.scorers import kept_per_image
    from vtcompile.passes.cdpruner import cdpruner_keep
    from vtcompile.passes.dart import dart_select, kept_visual, quotas
    from vtcompile.passes.divprune import divprune_keep
    from vtcompile.passes.gprune import gprune_keep

    def image(embeds, visual):
        return embeds[visual].reshape(-1, per_image, embeds.shape[-1])[:1].float()

    if name == "dart":
        pivots, takes = quotas(kept_visual(n_visual, config.keep), config.pivots)
        return lambda e, m, v: dart_select(e, e.float().abs().sum(-1), v, pivots, config.pivots, takes, e.shape[-1])
    k = kept_per_image(config.keep, per_image)
    if name == "cdpruner":
        return lambda e, m, v: cdpruner_keep(image(e, v), e, (m != 0) & ~v, k, per_image, config.theta,
                                              config.negative)
    if name == "gprune":
        return lambda e, m, v: gprune_keep(image(e, v), k, config.threshold, config.temperature, config.steps)
    return lambda e, m, v: divprune_keep(image(e, v), k, per_image)


def median_ms(fn, args, runs: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_flags(p, "llava-1.5-7b")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--variant", action="append", default=[],
                   help="selector pass specs (default gprune, divprune, cdpruner, dart)")
    p.add_argument("--target", default="eager")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--check", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    command = "python bench/selector_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)

    from vtcompile import compile_pruned
    from vtcompile.models import load_model
    from vtcompile.models.llava import example_inputs
    from vtcompile.passes import resolve_passes

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random = args.random_weights or args.model in ("tiny", "tiny-gqa")
    adapter = load_model(args.model, args.weights, random_weights=random and args.model not in ("tiny", "tiny-gqa"),
                         layers=args.layers, dtype=args.dtype, device=device)
    geom = adapter.geometry
    before = args.text_tokens // 4
    prompt = example_inputs(adapter, batch=1, text_before=before, text_after=args.text_tokens - before, pad=0)
    n_text = int((prompt[0] != adapter.image_token_id).sum())
    base = compile_pruned(adapter, None, target=args.target, text_tokens=n_text, progress=False)
    stage_args = base.prepare(*prompt).as_args()

    def prefill(cm):
        exe = cm.executable(geom.visual_tokens_per_image)
        return lambda *a: exe.executor(*a)

    selection_args = (stage_args[0], stage_args[1], stage_args[3].bool())  # embeds, attention mask, visual mask
    rows, checks = [], []
    base_fn = prefill(base)
    for spec in args.variant or ["gprune", "divprune", "cdpruner", "dart"]:
        (pdef, config), = resolve_passes(spec)
        cm = compile_pruned(adapter, spec, target=args.target, text_tokens=n_text, progress=False)
        fn = prefill(cm)
        t_base, t_pruned = [], []
        with torch.no_grad():
            for _ in range(args.warmup + args.runs):  # interleaved: background load hits both alike
                t_base.append(median_ms(base_fn, stage_args, 1, 0, device))
                t_pruned.append(median_ms(fn, stage_args, 1, 0, device))
            select = selection_fn(pdef.name, config, geom.visual_tokens_per_image, geom.visual_tokens_per_image)
            t_select = median_ms(select, selection_args, args.runs, args.warmup, device)
        t_base, t_pruned = statistics.median(t_base[args.warmup:]), statistics.median(t_pruned[args.warmup:])
        f = cm.report.flops
        sel_flops = selector_flops(pdef.name, config, geom.visual_tokens_per_image, geom.hidden_size,
                                   int(selection_args[0].shape[1]))
        saved_ms, saved_flops = t_base - t_pruned, f.baseline_true - f.true
        rows.append([spec, f"{t_select:.2f}", f"{t_base:.1f}", f"{t_pruned:.1f}", f"{saved_ms:.1f}",
                     f"{t_select / saved_ms:.1%}" if saved_ms > 0 else "n/a", f"{sel_flops / 1e9:.3f}",
                     f"{saved_flops / 1e9:.1f}", f"{sel_flops / saved_flops:.3%}"])
        checks.append((saved_ms > 0 and t_select <= 0.1 * saved_ms,
                       f"{spec}: selection {t_select:.2f} ms vs {saved_ms:.1f} ms of prefill saved (<= 10%)"))
        checks.append((sel_flops <= 0.01 * saved_flops,
                       f"{spec}: selection {sel_flops / 1e9:.3f} GFLOPs vs {saved_flops / 1e9:.1f} saved (<= 1%)"))
    headers = ["selector", "selection ms", "prefill unpruned ms", "prefill pruned ms", "saved ms",
               "selection / saved", "selection GFLOPs", "saved GFLOPs (true)", "selection / saved FLOPs"]
    print(tabulate(rows, headers=headers, tablefmt="simple_outline"))
    for ok, text in checks:
        print(f"check: {'ok' if ok else 'FAILED'}: {text}")
    dtype = str(adapter.dtype).replace("torch.", "")
    out = args.out or RESULTS / f"selector-cost-{args.model}{f'-{args.layers}l' if args.layers else ''}-{dtype}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        f"# Token selectors' own cost: {adapter.spec.label}, {dtype}", "", f"Command: `{command}`", "",
        f"- date: {datetime.date.today().isoformat()}; machine: {machine()}",
        f"- one prompt: {geom.visual_tokens_per_image} visual + {n_text} text tokens; target {args.target}; "
        f"medians of {args.runs} runs (prefills interleaved)", "",
        tabulate(rows, headers=headers, tablefmt="github"), "",
        *[f"- check: {'ok' if ok else 'FAILED'}: {text}" for ok, text in checks]]) + "\n")
    print(f"written {out}")
    return 1 if args.check and not all(ok for ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy vs paper-convention FLOPs on the testbed: fastv, dart, pyramiddrop, fitprune, the pre-LLM selectors
gprune, divprune and cdpruner, and random selection at the decoder's entry (the baseline the selectors must beat).

For each budget (fraction of the unpruned model's paper-convention FLOPs) every method is configured to
the largest kept-token count that meets it, evaluated on the same held-out questions, and reported as a
markdown table plus a PNG plot. A method that cannot reach a budget (FastV's floor is its first k layers)
is listed as such rather than silently moved.

    python bench/accuracy_flops.py --model testbed --limit 300 --out bench/results/accuracy_flops
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from vtcompile import compile_pruned, load_model
from vtcompile.compiler.flops import report_from_plan
from vtcompile.evaluate import Reference, evaluate
from vtcompile.passes import get_pass

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scoring  # noqa: E402


def paper_ratio(geom, n_visual, steps) -> float:
    rep = report_from_plan(geom, n_visual, 0, steps)
    return rep.paper / rep.baseline_paper


def largest_meeting(geom, n_visual, budget, steps_for):
    """The configuration with the most kept tokens whose paper FLOPs ratio is <= budget (None if none)."""
    best = None
    for keep in range(1, n_visual + 1):  # r < 1: at least one visual token stays
        steps = steps_for(keep)
        if steps is not None and paper_ratio(geom, n_visual, steps) <= budget + 1e-9:
            best = keep
    return best


def configs(geom, n, budget):
    """Pass spec per method for one budget (or a reason it cannot be met)."""
    out = {}
    # One cut before layer K (FastV's and DART's published K=2; K=1 where K=2 cannot reach the budget).
    at_k = next(((k, keep) for k in (2, 1)
                 if (keep := largest_meeting(geom, n, budget, lambda kv, k=k: [(k, kv)])) is not None), None)
    out["fastv"] = None if at_k is None else f"fastv:k={at_k[0]},r={(n - at_k[1]) / n:.6f}"
    out["dart"] = None if at_k is None else f"dart:k={at_k[0]},keep={at_k[1] / n:.6f}"
    # The published cuts (8/16/24 of 32, scaled); where they cannot reach the budget, the earliest three layers
    # (as FastV falls back to K=1), named in the spec.
    out["pyramiddrop"] = None
    for cuts, named in ((get_pass("pyramiddrop").config().cut_layers(geom), False), ((1, 2, 3), True)):
        best = None
        for i in range(1, 200):  # ratios lam, lam^2, lam^3 (the published 0.5/0.25/0.125 is lam = 0.5)
            lam = i / 200
            steps = [(c, int(round(lam ** (j + 1) * n))) for j, c in enumerate(cuts)]
            if paper_ratio(geom, n, steps) <= budget + 1e-9:
                best = lam
        if best:
            layers = f"layers={'/'.join(map(str, cuts))}," if named else ""
            out["pyramiddrop"] = f"pyramiddrop:{layers}ratios={best:.3f}/{best ** 2:.4f}/{best ** 3:.5f}"
            break
    out["fitprune"] = f"fitprune:budget={budget}"
    keep = largest_meeting(geom, n, budget, lambda kv: [(0, kv)])
    # Selectors before layer 0 keep `keep` tokens of the image (kept_per_image rounds keep * n back to it).
    for name in ("gprune", "divprune", "cdpruner"):
        out[name] = f"{name}:keep={keep / n:.6f}" if keep is not None else None
    out["random"] = f"randomdrop:k=0,r={(n - keep) / n:.6f}" if keep is not None else None
    return out


# Every registered pass at its published defaults (FitPrune's default budget is 0.5; randomdrop drops half the
# visual tokens before the decoder; headskip removes 25% of the heads of layers >= 2), CDPruner's relevance also
# un-negated (OpenVINO GenAI's default for its LLM-embedding form), attnskip with one layer chosen (it has no default
# count: EAS skips 12 of LLaVA's 32 layers, the testbed has 6) and DyVTE at its defaults (routers calibrated on 4096
# train prompts with whole-answer labels and per-layer thresholds for max_loss=0.005): the rows the per-pass accuracy
# floors (tests/unit/accuracy_floors.py) are taken from.
DEFAULT_ROWS = ("fastv", "dart", "pyramiddrop", "fitprune", "gprune", "divprune", "cdpruner", "cdpruner:negative=false",
                "randomdrop", "headskip", "attnskip:count=1", "dyvte")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--budgets", default="0.75,0.5,0.3,0.15")
    ap.add_argument("--limit", type=int, default=300, help="test questions per point")
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    ap.add_argument("--max-new-tokens", type=int, default=24,
                    help="answers are generated up to this many tokens and compared whole (1: next-token scoring)")
    ap.add_argument("--defaults", nargs="*", default=list(DEFAULT_ROWS), metavar="SPEC",
                    help="pass specs evaluated as given, after the budget rows (default: every token pass at its "
                         "published defaults and DyVTE's chosen setting; none: --defaults with no spec)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/accuracy_flops"))
    args = ap.parse_args(argv)
    adapter = load_model(args.model)
    geom, n = adapter.geometry, adapter.geometry.visual_tokens_per_image
    rows = []
    t0 = time.perf_counter()
    reference = Reference(compile_pruned(adapter))  # the unpruned answers, generated once for every row
    base = evaluate(reference.model, "testbed", limit=args.limit, progress=False,
                    max_new_tokens=args.max_new_tokens, reference=reference)
    rows.append({"method": "unpruned", "budget": 1.0, "spec": "-", "paper_ratio": 1.0,
                 "accuracy": base["accuracy"], "top1_agreement": 1.0,
                 "identical_answers": 1.0 if args.max_new_tokens > 1 else None})
    print(f"unpruned: {100 * base['accuracy']:.1f}%", file=sys.stderr)
    for budget in [float(b) for b in args.budgets.split(",")]:
        for method, spec in configs(geom, n, budget).items():
            if spec is None:
                rows.append({"method": method, "budget": budget, "spec": "cannot reach this budget",
                             "paper_ratio": None, "accuracy": None, "top1_agreement": None,
                             "identical_answers": None})
                continue
            if method == "fitprune":
                spec = f"{spec},samples={args.calibration_samples}"
            torch.manual_seed(args.seed)
            cm = compile_pruned(adapter, spec, calibration="testbed" if method == "fitprune" else None,
                                progress=False)
            torch.manual_seed(args.seed)
            res = evaluate(cm, "testbed", limit=args.limit, progress=False, max_new_tokens=args.max_new_tokens,
                           reference=reference)
            extra = ""
            if method == "fitprune":
                r = cm.recipes["fitprune"]
                extra = f" (calibration {r.calibration_seconds:.1f}s, {r.samples} samples)"
            rows.append({"method": method, "budget": budget, "spec": spec + extra,
                         "paper_ratio": res["paper_flops_ratio"], "accuracy": res["accuracy"],
                         "top1_agreement": res["fidelity"]["top1_agreement"],
                         "identical_answers": res["fidelity"].get("identical_answers")})
            print(f"{budget} {method}: {100 * res['accuracy']:.1f}% at {res['paper_flops_ratio']:.3f}", file=sys.stderr)
    for spec in args.defaults:
        torch.manual_seed(args.seed)
        calibrates = get_pass(spec.split(":")[0]).calibrate is not None
        cm = compile_pruned(adapter, spec, calibration="testbed" if calibrates else None, progress=False)
        torch.manual_seed(args.seed)
        res = evaluate(cm, "testbed", limit=args.limit, progress=False, max_new_tokens=args.max_new_tokens,
                       reference=reference)
        rows.append({"method": spec.split(":")[0], "budget": "default", "spec": spec,
                     "paper_ratio": res["paper_flops_ratio"], "accuracy": res["accuracy"],
                     "top1_agreement": res["fidelity"]["top1_agreement"],
                     "identical_answers": res["fidelity"].get("identical_answers")})
        print(f"default {spec}: {100 * res['accuracy']:.1f}% at {res['paper_flops_ratio']:.3f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    table = tabulate([[r["method"], r["budget"], "-" if r["paper_ratio"] is None else f"{r['paper_ratio']:.3f}",
                       "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}",
                       "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}",
                       "-" if r["identical_answers"] is None else f"{r['identical_answers']:.3f}", r["spec"]]
                      for r in rows],
                     headers=["method", "budget", "paper FLOPs ratio", "accuracy %", "top-1 agree",
                              "identical answers", "config"],
                     tablefmt="github")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/accuracy_flops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.with_suffix(".md").write_text(
        f"# Accuracy vs paper-convention FLOPs ({adapter.spec.label})\n\nCommand: `{cmd}`\n\n"
        f"{args.limit} held-out test questions per point, "
        f"{scoring(args.max_new_tokens)}"
        f" against the answer; top-1 agree: first answer token equal to the unpruned model's; identical answers: "
        f"the whole answer equal to the unpruned model's; {seconds:.0f} s in all on "
        f"{torch.get_num_threads()} CPU threads.\n\n{table}\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    _plot(rows, args.out.with_suffix(".png"), adapter.spec.label)
    return 0


def _plot(rows, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(r for r in rows if r["method"] == "unpruned")
    ax.axhline(100 * base["accuracy"], color="gray", linestyle="--", label="unpruned")
    for method in ("fastv", "dart", "pyramiddrop", "fitprune", "gprune", "divprune", "cdpruner", "random"):
        pts = sorted((r["paper_ratio"], 100 * r["accuracy"]) for r in rows
                     if r["method"] == method and r["budget"] != "default" and r["accuracy"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("paper-convention FLOPs (fraction of unpruned)")
    ax.set_ylabel("exact-match accuracy %")
    ax.set_title(f"accuracy vs FLOPs: {label}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

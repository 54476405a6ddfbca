"""DyVTE on the testbed: accuracy, FLOPs saved and exit layers, against the unpruned model, static exits at
every layer, FastV, and DyVTE combined with FastV.

Routers are trained on the testbed's train split (calibration) and evaluated on held-out test questions.

    python bench/dyvte.py --model testbed --limit 300 --out bench/results/dyvte
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
from vtcompile.evaluate import evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--limit", type=int, default=300, help="test questions per row")
    ap.add_argument("--samples", type=int, default=512, help="calibration prompts for router training")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--loss-ratios", default="1.03",
                    help="exit-label loss ratios to train routers with, one row each (1.03: the published rule; "
                         "fastv + dyvte uses the first)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/dyvte"))
    args = ap.parse_args(argv)
    adapter = load_model(args.model)
    layers = adapter.geometry.num_layers
    try:
        ratios = [float(x) for x in args.loss_ratios.split(",")]
    except ValueError:
        ap.error(f"--loss-ratios: expected numbers >= 1 like '1.03,1.5', got {args.loss_ratios!r}")
    dy = [f"dyvte:samples={args.samples},epochs={args.epochs},loss_ratio={r:g}" for r in ratios]
    setups = [("unpruned", None), ("fastv (k=2, r=0.5)", "fastv")]
    setups += [(f"static exit after layer {e}", f"dyvte:exit_layer={e}") for e in range(layers - 1)]
    setups += [(f"dyvte (routers, loss ratio {r:g})", spec) for r, spec in zip(ratios, dy)]
    setups += [(f"fastv + dyvte (loss ratio {ratios[0]:g})", ["fastv", dy[0]])]
    rows = []
    t0 = time.perf_counter()
    for label, spec in setups:
        needs = spec is not None and "samples=" in str(spec)
        cm = compile_pruned(adapter, spec, calibration="testbed" if needs else None, progress=False)
        res = evaluate(cm, "testbed", limit=args.limit, progress=False)
        recipe = cm.recipes.get("dyvte", {})
        rows.append({"setup": label, "accuracy": res["accuracy"], "paper_flops_ratio": res["paper_flops_ratio"],
                     "true_flops_ratio": res["true_flops_ratio"], "exit_layers": res["exit_layers"],
                     "top1_agreement": res["fidelity"]["top1_agreement"],
                     "router_training_s": recipe.get("calibration_seconds")})
        print(f"{label}: {100 * res['accuracy']:.1f}% paper {res['paper_flops_ratio']:.3f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    base = rows[0]["accuracy"]
    table = tabulate(
        [[r["setup"], f"{100 * r['accuracy']:.1f}", f"{100 * (r['accuracy'] - base):+.1f}",
          f"{100 * (1 - r['paper_flops_ratio']):.1f}", f"{100 * (1 - r['true_flops_ratio']):.1f}",
          " ".join(f"{k}:{v}" for k, v in (r["exit_layers"] or {}).items()) or "-",
          "-" if r["router_training_s"] is None else f"{r['router_training_s']:.1f}"] for r in rows],
        headers=["setup", "accuracy %", "vs unpruned", "paper FLOPs saved %", "true FLOPs saved %",
                 "exit layer: rows (-1 = none)", "router training s"], tablefmt="github")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/dyvte.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.with_suffix(".md").write_text(
        f"# DyVTE on {adapter.spec.label}\n\nCommand: `{cmd}`\n\n{args.limit} held-out test questions per row; "
        f"routers trained on {args.samples} train-split prompts; {seconds:.0f} s in all on "
        f"{torch.get_num_threads()} CPU threads.\n\n{table}\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Head and attention skipping on the testbed: accuracy against FLOPs for headskip's criteria and attnskip's layer
choices, at equal budgets, with the baselines they must beat.

- headskip at each --budgets value: criterion=output (each head's share of the residual stream), criterion=visual
  (YOPO's attention mass on visual tokens), criterion=ablation (each head removed alone, scored by the KL divergence
  of the next-token distribution) and criterion=random over --random-seeds.
- attnskip at each --counts value: the residual-change proxy (the default) against EAS's skip-set search
  (criterion=search), each without and with the least-squares adapter; the search's loss of every set is in
  the recipe, so the table also gives the loss of the set the proxy chose.
- compositions with token passes (--combos).

Every row is evaluated on the same held-out test questions (whole generated answers, greedy, until eos) and
calibrated on the testbed's train split (calibration prompts are never test questions).

    python bench/heads.py --model testbed --limit 300 --out bench/results/heads
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
from vtcompile.passes import get_pass

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scoring, write_results  # noqa: E402

# Analytic FLOPs/KV of a real geometry (no weights): budgets by criterion=random (the heads a calibrated criterion
# picks would differ, their count not), EAS's 12 of 32 layers (as the deepest
# 12; any 12 give the same count) and 6.
GEOMETRY_SPECS = ("headskip:budget=0.25,criterion=random", "headskip:budget=0.5,criterion=random",
                  "attnskip:layers=" + "/".join(map(str, range(20, 32))),
                  "attnskip:layers=" + "/".join(map(str, range(26, 32))),
                  "fastv+headskip:budget=0.25,criterion=random",
                  "fastv+attnskip:layers=" + "/".join(map(str, range(20, 32))))
COMBOS = ("fitprune:budget=0.5+headskip:budget=0.25", "fastv+headskip:budget=0.25",
          "dyvte:samples=2048,loss_slack=0.1,threshold=0.95,label=token,max_loss=0,layers=0/1/2/3/4+attnskip:count=1")


def rows_for(budgets, counts, seeds, combos):
    """(group, label, [pass specs]) for every row of the table, the unpruned model first."""
    out = [("unpruned", "-", [])]
    for b in budgets:
        for criterion in ("output", "visual", "ablation"):
            out.append(("headskip", f"budget {b}, {criterion}", [f"headskip:budget={b},criterion={criterion}"]))
        for s in seeds:
            out.append(("headskip", f"budget {b}, random seed {s}",
                        [f"headskip:budget={b},criterion=random,seed={s}"]))
    for c in counts:
        for criterion in ("proxy", "search"):
            for adapter in ("false", "true"):
                out.append(("attnskip", f"count {c}, {criterion}, adapter {adapter}",
                            [f"attnskip:count={c},criterion={criterion},adapter={adapter}"]))
    for combo in combos:
        out.append(("combination", combo, combo.split("+")))
    return out


def chosen(cm) -> str:
    """What the calibrated passes chose (heads, layers), and the search's loss of the chosen set."""
    parts = []
    for name, recipe in cm.recipes.items():
        if name == "headskip" and recipe.heads:
            parts.append(f"{len(recipe.heads)} heads: {' '.join(recipe.heads)}")
        elif name == "attnskip" and recipe.layers:
            key = "/".join(map(str, recipe.layers))
            loss = f" (KL {recipe.search[key]:.4f})" if recipe.search else ""
            parts.append(f"layers {key}{loss}")
    return "; ".join(parts) or "-"


def _proxy_losses(rows, plan) -> None:
    """The search scored every skip set of its count (or a sample): give the proxy's set its loss from there."""
    losses = {}
    for r in rows:
        losses.update({(r["count"], k): v for k, v in r.get("search", {}).items()})
    for r in rows:
        if r.get("layers") is not None and not r["search"]:
            loss = losses.get((r["count"], r["layers"]))
            r["chosen"] += f" (KL {loss:.4f})" if loss is not None else " (KL: set not scored by the search)"


def geometry_table(model: str, specs) -> str:
    """`vtcompile flops --json` for each spec (passes joined by '+'): paper/true FLOPs and the prompt's KV cache."""
    import contextlib
    import io

    from vtcompile.cli import main as cli

    rows = []
    for spec in specs:
        out = io.StringIO()
        argv = ["flops", "--model", model, "--json"] + [a for part in spec.split("+") for a in ("--pass", part)]
        with contextlib.redirect_stdout(out):
            if cli(argv) != 0:
                raise SystemExit(f"vtcompile {' '.join(argv)} failed")
        d = json.loads(out.getvalue())
        rows.append([spec, f"{d['paper_tflops']:.3f} / {d['baseline_paper_tflops']:.3f}", f"{d['paper_ratio']:.3f}",
                     f"{d['true_tflops']:.3f} / {d['baseline_true_tflops']:.3f}", f"{d['true_ratio']:.3f}",
                     f"{d['kv_cache_bytes'] / 2**20:.1f} / {d['baseline_kv_cache_bytes'] / 2**20:.1f}",
                     f"{d['kv_ratio']:.3f}"])
    return tabulate(rows, headers=["passes", "paper TFLOPs", "ratio", "true TFLOPs", "ratio", "KV MiB", "ratio"],
                    tablefmt="github")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--limit", type=int, default=300, help="test questions per row")
    ap.add_argument("--budgets", default="0.25,0.5", help="headskip budgets (fraction of attention-head FLOPs)")
    ap.add_argument("--counts", default="1,2", help="attnskip: layers removed")
    ap.add_argument("--random-seeds", default="0,1,2", help="seeds of headskip's criterion=random rows")
    ap.add_argument("--combos", nargs="*", default=list(COMBOS), metavar="SPEC+SPEC",
                    help="compositions with token passes, passes joined by '+' (none: --combos with no spec)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--geometry", default="llava-1.5-7b",
                    help="also tabulate analytic FLOPs and KV bytes of head passes on this geometry (none: skip)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/heads"))
    args = ap.parse_args(argv)
    adapter = load_model(args.model)
    plan = rows_for([float(b) for b in args.budgets.split(",")], [int(c) for c in args.counts.split(",")],
                    [int(s) for s in args.random_seeds.split(",")], args.combos)
    rows, t0 = [], time.perf_counter()
    for group, label, specs in plan:
        torch.manual_seed(0)
        calibrates = any(get_pass(s.split(":")[0]).calibrate for s in specs)
        t = time.perf_counter()
        cm = compile_pruned(adapter, specs or None, calibration="testbed" if calibrates else None, progress=False)
        build_s = time.perf_counter() - t
        res = evaluate(cm, "testbed", limit=args.limit, progress=False, max_new_tokens=args.max_new_tokens)
        fid = res["fidelity"]
        skip = cm.recipes.get("attnskip", {}) if group == "attnskip" else {}
        rows.append({"group": group, "row": label, "spec": "+".join(specs) or "-", "chosen": chosen(cm),
                     "count": len(skip.get("layers", [])), "search": skip.get("search", {}),
                     "layers": "/".join(map(str, skip["layers"])) if "layers" in skip else None,
                     "paper_ratio": res["paper_flops_ratio"], "true_ratio": res["true_flops_ratio"],
                     "accuracy": res["accuracy"], "top1_agreement": fid["top1_agreement"],
                     "identical_answers": fid.get("identical_answers"), "build_s": build_s})
        print(f"{label}: {100 * res['accuracy']:.1f}% at true FLOPs {res['true_flops_ratio']:.3f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    _proxy_losses(rows, plan)
    table = tabulate([[r["group"], r["row"], f"{r['true_ratio']:.3f}", f"{r['paper_ratio']:.3f}",
                       f"{100 * r['accuracy']:.1f}", f"{r['top1_agreement']:.3f}",
                       "-" if r["identical_answers"] is None else f"{r['identical_answers']:.3f}", r["chosen"],
                       f"{r['build_s']:.1f}"] for r in rows],
                     headers=["pass", "setting", "true FLOPs ratio", "paper FLOPs ratio", "accuracy %",
                              "top-1 agree", "identical answers", "chosen", "build+calibration s"],
                     tablefmt="github")
    print(table)
    geo = ""
    if args.geometry != "none":
        geo_table = geometry_table(args.geometry, GEOMETRY_SPECS)
        print(geo_table)
        geo = (f"\n## {args.geometry}: FLOPs and KV cache (analytic, no weights)\n\n`vtcompile flops --model "
               f"{args.geometry} --pass ... --json` for each row: 576 visual + 64 text tokens, bf16 cache; a "
               f"budget's heads drawn by criterion=random (a calibrated criterion picks other heads, as many).\n\n"
               f"{geo_table}\n")
    cmd = "python bench/heads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(args.out,
        f"# Head and attention skipping ({adapter.spec.label})\n\nCommand: `{cmd}`\n\n"
        f"{args.limit} held-out test questions per row, {scoring(args.max_new_tokens)} against the answer; calibration on the train "
        f"split; top-1 agree: first "
        f"answer token equal to the unpruned model's; identical answers: the whole answer equal to the unpruned "
        f"model's; FLOPs ratios of the prompt against the unpruned model (vtcompile.compiler.flops: true FLOPs "
        f"count every token and matmul, the paper convention the visual tokens' share); KL: the search's loss of "
        f"that skip set (KL divergence of the last prompt token's distribution from the unpruned model's, mean over "
        f"the calibration prompts), for a proxy row taken from the search row of the same count. "
        f"{seconds:.0f} s in all on {torch.get_num_threads()} CPU threads.\n\n{table}\n{geo}", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

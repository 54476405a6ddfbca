"""Where FitPrune's accuracy goes on the testbed at its default budget (0.5): per question kind, per layer of its
recipe, by calibration size and by the kinds of the calibration prompts, beside FastV and PyramidDrop at the same
paper-FLOPs budget (issue 25's FitPrune regression).

Every row is evaluated on the same held-out test questions; FitPrune calibrates on the testbed's train split
(never test questions), on every kind or on one kind only.

    python bench/fitprune_study.py --model testbed --limit 300 --max-new-tokens 1 --out bench/results/fitprune_study
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from vtcompile import compile_pruned, load_model
from vtcompile.data import PromptEncoder, load_data, sample_image
from vtcompile.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_flops import configs  # noqa: E402  (FastV / PyramidDrop at the same paper-FLOPs budget)
from common import scoring, write_results  # noqa: E402


def kind_prompts(adapter, kind: str, n: int) -> list[tuple]:
    """The first n train-split questions of one kind, as calibration prompts."""
    enc = PromptEncoder(adapter.processor)
    out = []
    for s in load_data("testbed", limit=40 * n, split="train")[0]:
        if s.kind == kind:
            out.append(enc.batch([s.question], [sample_image(s)]))
            if len(out) == n:
                return out
    raise SystemExit(f"fewer than {n} train questions of kind {kind!r} in the first {40 * n}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=300, help="test questions per row")
    ap.add_argument("--samples", default="16,64,256", help="calibration sizes (every kind)")
    ap.add_argument("--kind-samples", type=int, default=64, help="calibration size of the one-kind rows")
    ap.add_argument("--max-new-tokens", type=int, default=24,
                    help="answers generated up to this many tokens and compared whole (1: the next token)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fitprune_study"))
    args = ap.parse_args(argv)
    adapter = load_model(args.model)
    geom, n = adapter.geometry, adapter.geometry.visual_tokens_per_image
    test = load_data("testbed", limit=args.limit)[0]
    kinds = sorted({s.kind for s in test})
    same = configs(geom, n, args.budget)
    plan = [("unpruned", None, None), ("fastv", same["fastv"], None), ("pyramiddrop", same["pyramiddrop"], None)]
    plan += [(f"fitprune, {k} prompts (every kind)", f"fitprune:budget={args.budget},samples={k}", "testbed")
             for k in map(int, args.samples.split(","))]
    plan += [(f"fitprune, {args.kind_samples} {kind} prompts",
              f"fitprune:budget={args.budget},samples={args.kind_samples}", kind) for kind in kinds]
    rows, t0 = [], time.perf_counter()
    for label, spec, calibration in plan:
        if spec is None and label != "unpruned":
            print(f"{label}: cannot reach budget {args.budget}", file=sys.stderr)
            continue
        if calibration not in (None, "testbed"):
            calibration = kind_prompts(adapter, calibration, args.kind_samples)
        cm = compile_pruned(adapter, spec, calibration=calibration, progress=False)
        res = evaluate(cm, test, progress=False, max_new_tokens=args.max_new_tokens)
        f = cm.report.flops
        rows.append({"row": label, "spec": spec or "-", "paper_ratio": res["paper_flops_ratio"],
                     "accuracy": res["accuracy"], "by_kind": res["accuracy_by_kind"],
                     "top1_agreement": res["fidelity"]["top1_agreement"],
                     "attention_schedule": list(f.schedule), "mlp_schedule": list(f.mlp_schedule or f.schedule)})
        print(f"{label}: {100 * res['accuracy']:.1f}%", file=sys.stderr)
    seconds = time.perf_counter() - t0
    acc_table = tabulate([[r["row"], f"{r['paper_ratio']:.3f}", f"{100 * r['accuracy']:.1f}",
                           *[f"{100 * r['by_kind'].get(k, float('nan')):.1f}" for k in kinds],
                           f"{r['top1_agreement']:.3f}"] for r in rows],
                         headers=["row", "paper FLOPs ratio", "accuracy %", *kinds, "top-1 agree"],
                         tablefmt="github")
    layers = range(geom.num_layers)
    sched_table = tabulate([[r["row"], *[f"{a}/{m}" for a, m in zip(r["attention_schedule"], r["mlp_schedule"])]]
                            for r in rows],
                           headers=["row", *[f"layer {i}" for i in layers]], tablefmt="github")
    print(acc_table + "\n\n" + sched_table)
    cmd = "python bench/fitprune_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(args.out,
        f"# FitPrune at budget {args.budget}: per kind, per layer, calibration ({adapter.spec.label})\n\n"
        f"Command: `{cmd}`\n\n{len(test)} held-out test questions per row, {scoring(args.max_new_tokens)} against the answer; "
        f"{seconds:.0f} s in all on {torch.get_num_threads()} CPU threads.\n\n## Accuracy per question kind\n\n"
        f"{acc_table}\n\n## Visual tokens per layer (in its attention / in its MLP)\n\n{sched_table}\n", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

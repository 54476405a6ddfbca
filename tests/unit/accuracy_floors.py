"""Accuracy floors of the per-pass regression tests (test_accuracy_floors.py): the one table of them.

Source: the rows "default" of the committed bench table bench/results/accuracy_flops.json - every registered pass at
its defaults (the published ones; DyVTE's are the calibrated risk-controlled setting of issue 39), attnskip with
one layer chosen - measured on the first 300
test questions with the shipped testbed checkpoint (`python bench/accuracy_flops.py --model testbed --limit 300`:
whole generated answers, greedy until eos, at most 24 new tokens). test_floors_come_from_the_committed_bench checks
that BENCH below still equals that file.

The tests evaluate a fixed slice, the first SLICE of those questions, which costs a fraction of the bench. The
slice's accuracy differs from the bench's by sampling alone; the margin is the one-sided 99% binomial bound for the
slice size, Z * sqrt(p (1 - p) / SLICE) with the bench's p (at least one question), so a pass that keeps its
bench accuracy passes, and one that loses more than the margin fails. Fidelity (first-token top-1 agreement with
the unpruned model) gets a floor the same way.

Two rows load the recipe their calibration gave instead of calibrating again: DyVTE's routers (4096 prompts, 335 s
on 2 cores; stored as its recipe in ROUTERS (JSON, with the thresholds risk control chose) and the .safetensors
beside it) and headskip's heads (criterion=ablation: one calibration run per
head, 17 s; HEADSKIP_HEADS below). They gate the runtime with those routers and heads; the calibrations
themselves are tested in test_dyvte.py and test_headskip.py.

When the testbed checkpoint or a pass's defaults change, re-run the bench, commit its table, copy the new numbers
into BENCH (the test above names the rows that differ) and rewrite ROUTERS:
`python -c "from tests.unit.accuracy_floors import write_routers; write_routers()"`.
"""
from __future__ import annotations

import math
from pathlib import Path

ROUTERS = Path(__file__).resolve().parent / "data" / "dyvte-testbed-recipe.json"
# The heads headskip's default (budget 0.25, criterion=ablation, 16 train prompts) removes on the shipped testbed:
# the bench's row (bench/results/heads.md, "budget 0.25, ablation"; write_routers() prints them again).
HEADSKIP_HEADS = ["4.0", "5.1", "5.2", "5.3"]
DYVTE = "dyvte"  # its defaults: routers calibrated with risk control (max_loss=0.005) on 4096 testbed prompts

SLICE = 150  # the first SLICE test questions (seed 0) of the bench's 300
Z = 2.326  # one-sided 99%
MAX_NEW_TOKENS = 24  # the bench's scoring: whole generated answers (greedy, until eos)

# spec -> (accuracy, first-token top-1 agreement) of the bench's "default" rows (bench/results/accuracy_flops.json,
# 2026-12-03, the shipped checkpoint retrained for issue 24; unpruned: 0.987; dart and cdpruner rows: 2026-12-07, dyvte
# at its new defaults: 2026-12-08, the other rows unchanged by those runs)
BENCH: dict[str, tuple[float, float]] = {
    "fastv": (0.9833333333333333, 0.996666669845581),
    "dart": (0.9766666666666667, 0.9933333396911621),
    "pyramiddrop": (0.9033333333333333, 0.9933333396911621),
    "fitprune": (0.9366666666666666, 0.9866666793823242),
    "gprune": (0.95, 0.9666666388511658),
    "divprune": (0.9166666666666666, 0.9466666579246521),
    "cdpruner": (0.91, 0.9366666674613953),
    "cdpruner:negative=false": (0.32, 0.41333332657814026),
    "randomdrop": (0.4866666666666667, 0.5366666913032532),
    "headskip": (0.96, 0.9900000095367432),
    "attnskip:count=1": (0.9, 0.9300000071525574),
    "dyvte": (0.98, 0.9933333396911621),
}

# Registered passes without a bench row yet (no floor until bench/accuracy_flops.py has measured them and BENCH holds
# their row; then remove them here): pass -> why.
PENDING: dict[str, str] = {}


def margin(p: float, n: int = SLICE) -> float:
    return max(Z * math.sqrt(p * (1.0 - p) / n), 1.0 / n)


def floors(spec: str) -> tuple[float, float]:
    """(accuracy floor, top-1 agreement floor) of a bench row."""
    acc, top1 = BENCH[spec]
    return acc - margin(acc), top1 - margin(top1)


def write_routers(path: Path = ROUTERS) -> Path:
    """Calibrate DYVTE on the testbed as bench/accuracy_flops.py does (seed 0) and store its routers."""
    import torch

    from vtcompile import compile_pruned

    torch.manual_seed(0)
    heads = compile_pruned("testbed", "headskip", calibration="testbed", progress=False).recipes["headskip"].heads
    print(f"headskip's default removes {heads} (HEADSKIP_HEADS: {HEADSKIP_HEADS})")
    torch.manual_seed(0)
    recipe = compile_pruned("testbed", DYVTE, calibration="testbed", progress=False).recipes["dyvte"]
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe.save(path)
    return path


def recipes(spec: str) -> dict | None:
    """Stored recipes for a row (DyVTE's routers, headskip's heads), else None (the test calibrates as the bench
    did)."""
    from vtcompile.passes.dyvte import DyVTERecipe
    from vtcompile.passes.headskip import HeadSkipRecipe

    if spec == "headskip":
        return {"headskip": HeadSkipRecipe(heads=list(HEADSKIP_HEADS))}
    if spec != DYVTE:
        return None
    return {"dyvte": DyVTERecipe.load(ROUTERS)}

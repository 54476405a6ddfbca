"""Per-pass accuracy regression tests on the shipped testbed: each registered pass at its published defaults (and
DyVTE's chosen setting, attnskip with one layer) keeps its accuracy and its fidelity to the unpruned model on a
fixed slice of test questions above the floors of accuracy_floors.py (one table, derived from the committed bench
results). A change that loses accuracy beyond the slice's sampling margin fails here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import accuracy_floors as F

torch = pytest.importorskip("torch")
BENCH_JSON = Path(__file__).resolve().parents[2] / "bench" / "results" / "accuracy_flops.json"


def test_floors_come_from_the_committed_bench():
    """The floors table holds exactly the bench's "default" rows, with their numbers: a re-run bench that moved a
    number, or a new row, shows up here until the table is updated."""
    rows = {r["spec"]: (r["accuracy"], r["top1_agreement"]) for r in json.loads(BENCH_JSON.read_text())
            if r["budget"] == "default"}
    assert rows, f"{BENCH_JSON} has no rows at the passes' defaults (bench/accuracy_flops.py --defaults)"
    differ = {s: (F.BENCH.get(s), rows.get(s)) for s in set(rows) | set(F.BENCH)
              if F.BENCH.get(s) is None or rows.get(s) is None
              or any(abs(a - b) > 1e-9 for a, b in zip(F.BENCH[s], rows[s]))}
    assert not differ, f"accuracy_floors.BENCH differs from {BENCH_JSON.name} (table, bench): {differ}"
    from vtcompile.passes.base import REGISTRY

    gated = {s.split(":")[0] for s in F.BENCH}
    assert not gated & set(F.PENDING), f"passes with a floor still listed as pending: {gated & set(F.PENDING)}"
    assert gated | set(F.PENDING) == set(REGISTRY), \
        f"registered passes without a floor: {set(REGISTRY) - gated - set(F.PENDING)}"


def test_margin_is_the_binomial_bound():
    assert F.margin(0.9, 150) == pytest.approx(2.326 * (0.9 * 0.1 / 150) ** 0.5)
    assert F.margin(1.0, 150) == pytest.approx(1 / 150)  # at least one question


@pytest.fixture(scope="module")
def slice_and_reference():
    from vtcompile import compile_pruned
    from vtcompile.data import load_data
    from vtcompile.evaluate import Reference

    samples = load_data("testbed", limit=F.SLICE)[0]
    return samples, Reference(compile_pruned("testbed", progress=False))  # its answers generated once per worker


@pytest.mark.slow
@pytest.mark.parametrize("spec", sorted(F.BENCH))
def test_pass_keeps_its_accuracy(spec, slice_and_reference):
    from vtcompile import compile_pruned
    from vtcompile.evaluate import evaluate, result_table
    from vtcompile.passes import get_pass

    samples, reference = slice_and_reference
    torch.manual_seed(0)  # the bench's seed (randomdrop, headskip's criterion=random)
    stored = F.recipes(spec)
    calibrates = stored is None and get_pass(spec.split(":")[0]).calibrate is not None
    cm = compile_pruned("testbed", spec, calibration="testbed" if calibrates else None, recipes=stored,
                        progress=False)
    torch.manual_seed(0)
    res = evaluate(cm, samples, progress=False, max_new_tokens=F.MAX_NEW_TOKENS, reference=reference, per_sample=True)
    assert len(res["correct"]) == len(res["kinds"]) == len(samples)
    assert sum(res["correct"]) / len(samples) == pytest.approx(res["accuracy"])
    if res["exit_layers"]:  # routed: each question's exit, the histogram's source
        assert {str(e): res["exits"].count(e) for e in set(res["exits"])} == res["exit_layers"]
        # the per-kind exit table: each kind's own questions, and FLOPs whose mean over kinds is the overall one
        by_kind = res["exit_layers_by_kind"]
        for kind, row in by_kind.items():
            taken = [e for e, k in zip(res["exits"], res["kinds"]) if k == kind]
            assert row["exits"] == {str(e): taken.count(e) for e in set(taken)}
        assert sum(res["count_by_kind"][k] * r["paper_flops_ratio"] for k, r in by_kind.items()) / len(samples) == \
            pytest.approx(res["paper_flops_ratio"])
        table = result_table(res)
        assert ("no exit" in table) == ("-1" in res["exit_layers"])
        assert all(f"exit after {e}" in table for e in res["exit_layers"] if e != "-1")
    acc_floor, top1_floor = F.floors(spec)
    acc, top1 = res["accuracy"], res["fidelity"]["top1_agreement"]
    print(f"{spec}: accuracy {acc:.3f} (floor {acc_floor:.3f}), top-1 agreement {top1:.3f} (floor {top1_floor:.3f}) "
          f"on {len(samples)} test questions")
    assert acc >= acc_floor, f"{spec}: accuracy {acc:.3f} < floor {acc_floor:.3f} (accuracy_floors.py)"
    assert top1 >= top1_floor, f"{spec}: top-1 agreement {top1:.3f} < floor {top1_floor:.3f} (accuracy_floors.py)"

"""FitPrune: masked-key oracle at every cut, in-graph score == offline statistic, recipe round trip,
budget search (met, degenerate statistics, 7B geometry), bad input."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.compiler.cut import Cut
from vtcompile.compiler.flops import report_from_plan
from vtcompile.compiler.reference import kept_at_boundaries
from vtcompile.passes.fitprune import cross_self_mass, head_max_attention
from vtcompile.compiler.taps import run_with_taps, sdpa_inputs
from vtcompile.errors import PassConfigError, VtcompileError
from vtcompile.models import geometry_of, resolve_spec
from vtcompile.passes import parse_pass_spec
from vtcompile.passes.fitprune import FitPruneConfig, FitPruneRecipe, _SampleStats, plan, search

from .common import adapter, masked_key_check, prompt


@functools.lru_cache(maxsize=None)
def fitted(name: str, budget: float = 0.5):
    return compile_pruned(adapter(name), f"fitprune:budget={budget},samples=6", calibration="synthetic",
                          progress=False)


def _run(cm, kind):
    ids, pixels, mask = prompt(cm.adapter.spec.name, kind)
    prep = cm.prepare(ids, pixels, mask)
    program = cm.program_for(prep.n_visual)
    with torch.no_grad():
        out = program(*prep.as_args())
        logits, positions = out["logits"], out["positions"]
    return ids, mask, prep, program, logits, positions


def test_fitprune_matches_masked_key_reference(geometry, prompt_kind):
    seen = masked_key_check(fitted(geometry), geometry, prompt_kind)
    cuts = [r.cut for r in seen["program"].rewrites]
    assert cuts and all(c.after_attention for c in cuts)  # removal after a layer's attention
    assert seen["diff"] <= 1e-4


def test_fitprune_graph_score_equals_offline_statistic(geometry):
    """The kept set at each cut is the top cross x self of that layer's tapped attention."""
    cm = fitted(geometry)
    ids, mask, prep, program, logits, positions = _run(cm, "mid_pad_b2")
    taps = sdpa_inputs(program.gm, range(4))
    kept = kept_at_boundaries(program, *prep.as_args())
    names = {n for q, k, m, _ in taps.values() for n in (q, k, m) if n}
    names |= {r.positions for r in program.rewrites}
    _, seen = run_with_taps(program.gm, prep.as_args(), names)
    present = torch.arange(ids.shape[1]).expand_as(ids)
    for rw in program.rewrites:
        layer = rw.cut.layer
        q, k, m, scale = taps[layer]
        q, k, m = seen[q], seen[k], seen[m]
        visual = torch.gather(prep.visual_mask, 1, present)
        attn = head_max_attention(q, k, m, scale, q.shape[1] // k.shape[1], True)
        cross, self_mass = cross_self_mass(attn, visual)
        score = (cross * self_mass).masked_fill(~visual, float("inf"))
        top = score.topk(score.shape[1] - (rw.before - rw.after), dim=1).indices.sort(dim=1).values
        assert torch.equal(torch.gather(present, 1, top), kept[rw.cut])
        present = kept[rw.cut]


@pytest.mark.parametrize("budget", [0.75, 0.5, 0.3])
def test_budget_is_met(budget):
    cm = fitted("tiny", budget)
    recipe = cm.recipes["fitprune"]
    f = cm.report.flops
    assert recipe.budget_met and f.paper / f.baseline_paper <= budget + 0.02
    assert abs(recipe.paper_ratio - f.paper / f.baseline_paper) < 1e-9


def test_recipe_file_round_trip(tmp_path):
    cm = fitted("tiny-gqa")
    path = tmp_path / "recipe.json"
    cm.recipes["fitprune"].save(path)
    again = compile_pruned(adapter("tiny-gqa"), f"fitprune:recipe={path}")
    assert again.report.flops.schedule == cm.report.flops.schedule
    assert again.report.flops.mlp_schedule == cm.report.flops.mlp_schedule
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2")
    assert torch.equal(again(ids, pixels, mask).logits, cm(ids, pixels, mask).logits)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"0": 4, "2": 2}))
    _, cfg = parse_pass_spec(f"fitprune:recipe={bare}")
    geom = geometry_of(resolve_spec("tiny"))
    assert plan(cfg, geom, 16) == [(Cut(0, after_attention=True), 12), (Cut(2, after_attention=True), 10)]


def test_search_terminates_on_degenerate_statistics():
    geom = geometry_of(resolve_spec("tiny"))
    flat = [_SampleStats(cross=[torch.full((5, 16), 0.1)] * 4, self_=[torch.full((16, 16), 0.1)] * 4)] * 3
    found = search(flat, geom, 16, budget=0.5, tolerance=0.01)
    assert found["iterations"] <= 7 and found["budget_met"]
    zero = [_SampleStats(cross=[torch.zeros(5, 16)] * 4, self_=[torch.zeros(16, 16)] * 4)]
    assert search(zero, geom, 16, budget=0.3, tolerance=0.01)["budget_met"]
    # a tolerance below float resolution (the fuzzer drew 5e-324): the search still ends, after at most 64 halvings
    tiny = search(flat, geom, 16, budget=0.5, tolerance=5e-324)
    assert tiny["iterations"] <= 64 and tiny["removed"] == found["removed"]


def test_llava_7b_budget_half_is_about_1_9_tflops():
    """The search on the 7B geometry (32 layers, 576 tokens) with synthetic, peaked statistics: FLOPs only."""
    geom = geometry_of(resolve_spec("llava-1.5-7b", random_weights=True))
    gen = torch.Generator().manual_seed(0)
    stats = []
    for _ in range(4):
        cross = [torch.rand(8, 576, generator=gen) ** 8 for _ in range(32)]
        self_ = [torch.rand(576, 576, generator=gen) ** 8 for _ in range(32)]
        stats.append(_SampleStats(cross, self_))
    found = search(stats, geom, 576, budget=0.5, tolerance=0.01)
    steps = plan(FitPruneConfig(), geom, 576, FitPruneRecipe(removed=found["removed"], n_visual=576))
    rep = report_from_plan(geom, 576, 64, steps)
    assert round(rep.baseline_paper / 1e12, 2) == 3.82
    assert 1.85 <= rep.paper / 1e12 <= 1.91 and found["budget_met"]


@pytest.mark.parametrize("spec,needle", [
    ("fitprune:budget=0", "budget=0.0 is out of range"),
    ("fitprune:budget=1.5", "budget=1.5 is out of range"),
])
def test_bad_budget(spec, needle):
    with pytest.raises(PassConfigError, match=needle):
        parse_pass_spec(spec)


def test_bad_recipes(tmp_path):
    geom = geometry_of(resolve_spec("tiny"))
    cases = {"layer.json": ({"7": 2}, "names layer 7"), "many.json": ({"0": 10, "1": 10}, "removes 20 visual"),
             "neg.json": ({"0": -1}, "must be >= 0")}
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(PassConfigError, match=needle):
            FitPruneConfig(recipe=str(tmp_path / name)).check_model(geom)
    with pytest.raises(PassConfigError, match="does not exist"):
        FitPruneConfig(recipe=str(tmp_path / "nope.json")).check_model(geom)


def test_calibration_required_and_not_empty():
    with pytest.raises(VtcompileError, match="needs calibration data"):
        compile_pruned(adapter("tiny"), "fitprune")
    with pytest.raises(VtcompileError, match="calibration set is empty"):
        compile_pruned(adapter("tiny"), "fitprune", calibration=[])
    with pytest.raises(PassConfigError, match="needs a recipe"):
        plan(FitPruneConfig(), geometry_of(resolve_spec("tiny")), 16)

"""The compiler primitives on their own: drop_visual against the masked-key oracle, pass-manager errors."""
from __future__ import annotations

import pytest
import torch

from vtcompile.compiler.cut import Cut
from vtcompile.compiler.pipeline import build_program
from vtcompile.compiler.program import Program
from vtcompile.compiler.reference import masked_key_logits
from vtcompile.compiler.rewrite import drop_visual
from vtcompile.errors import PassFailedError
from vtcompile.passes import resolve_passes
from vtcompile.passes.base import PassDef
from vtcompile.passes.fastv import FastVConfig

from .common import adapter, compiled, masked_key_check, prompt


@pytest.mark.parametrize("boundary", [1, 3])
def test_drop_visual_matches_all_visual_keys_masked(geometry, boundary):
    cm = compiled(geometry, None)
    program = drop_visual(Program.from_captured(cm.captured, 16), boundary, by="test")
    assert program.schedule == [16] * boundary + [0] * (4 - boundary)
    ids, pixels, mask = prompt(geometry, "mid_pad_b2")
    prep = cm.prepare(ids, pixels, mask)
    with torch.no_grad():
        out = program(*prep.as_args())
        logits, positions, visual = out["logits"], out["positions"], out["visual"]
    assert not visual.any() and positions.shape[1] == ids.shape[1] - 16
    text = ~prep.visual_mask
    keys = [None] * boundary + [text] * (4 - boundary)
    ref = masked_key_logits(cm.adapter, prep.inputs_embeds, prep.attention_mask, prep.position_ids, keys)
    ref = torch.gather(ref, 1, positions[..., None].expand(-1, -1, ref.shape[-1]))
    real = torch.gather(mask, 1, positions).bool()
    assert (ref - logits).abs().amax(-1)[real].max().item() <= 1e-4


def test_pass_manager_names_failing_pass_and_predecessors():
    def broken_apply(program, config, recipe=None):
        raise RuntimeError("boom")

    broken = PassDef(name="broken", summary="", config=FastVConfig, plan=lambda *a: [], apply=broken_apply)
    cm = compiled("tiny", None)
    passes = resolve_passes(["fastv:k=1"]) + [(broken, FastVConfig())]
    with pytest.raises(PassFailedError, match=r"pass 'broken' failed \(applied before it: fastv\): RuntimeError: boom"):
        build_program(cm.captured, 16, passes)


def test_pass_manager_catches_a_pass_that_breaks_the_schedule():
    def lying_apply(program, config, recipe=None):
        program.schedule = [16, 16, 8, 8]  # claims a removal the graph does not do
        return program

    liar = PassDef(name="liar", summary="", config=FastVConfig, plan=lambda *a: [], apply=lying_apply)
    with pytest.raises(PassFailedError, match="layer 2 attends over"):
        build_program(compiled("tiny", None).captured, 16, [(liar, FastVConfig())])


@pytest.mark.parametrize("spec,cut", [("randomdrop", 0), ("randomdrop:k=2,r=0.75", 2)])
def test_randomdrop_matches_masked_key_reference(geometry, spec, cut):
    """Random selection (also before the decoder, cut 0) against the masked-key oracle."""
    cm = compiled(geometry, spec)
    torch.manual_seed(0)
    seen = masked_key_check(cm, geometry, "mid_pad_b2")
    assert [r.cut for r in seen["program"].rewrites] == [Cut(cut)]
    assert seen["visual"].sum(1).tolist() == [cm.program.visual_at(3)] * 2
    assert seen["diff"] <= 1e-4
    ids, pixels, mask = prompt(geometry, "mid_pad_b2")
    torch.manual_seed(1)
    assert not torch.equal(cm(ids, pixels, mask).kept_positions, seen["positions"])  # really random


def _graph_and_shapes(program):
    return [(n.name, str(n.target), str(getattr(n.meta.get("val"), "shape", n.meta.get("val"))))
            for n in program.gm.graph.nodes]


# One geometry per pass (MHA and GQA each once): the per-rewrite build this compares against is the slow path.
# FitPrune's cuts come from a recipe file (cuts after the attention of layers 0 and 2), not a calibration.
@pytest.mark.parametrize("geometry,spec", [("tiny", "pyramiddrop:layers=1/2/3,ratios=0.5/0.25/0.125"),
                                           ("tiny-gqa", "fitprune:recipe={}")])
def test_series_of_rewrites_builds_the_per_rewrite_graph(geometry, spec, monkeypatch, tmp_path):
    """Incremental metadata (one propagation per pass) gives the same graph, metadata and outputs as a
    full refresh after every cut."""
    import contextlib
    import json

    from vtcompile import compile_pruned

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"0": 4, "2": 2}))
    rt = compile_pruned(adapter(geometry), spec.format(recipe), progress=False)
    fast = build_program(rt.captured, 16, rt.passes, rt.recipes)
    assert len(fast.rewrites) >= 2  # a series, not a single cut
    monkeypatch.setattr(Program, "series_of_rewrites", lambda self: contextlib.nullcontext(self))
    slow = build_program(rt.captured, 16, rt.passes, rt.recipes)
    assert _graph_and_shapes(fast) == _graph_and_shapes(slow)
    assert "s" in str(fast.positions_node.meta["val"].shape[1])  # the kept count stays symbolic
    args = rt.prepare(*prompt(geometry, "mid_pad_b2")).as_args()
    with torch.no_grad():
        a, b = fast.gm(*args), slow.gm(*args)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])

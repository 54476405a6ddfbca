"""PyramidDrop: masked-key oracle at every cut, the ranking recomputed from transformers' own modules,
FLOPs against the paper's table, config validation."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from vtcompile.compiler.flops import FlopsReport, schedule_from_plan
from vtcompile.compiler.reference import key_masks_from_rewrites, kept_at_boundaries, masked_key_logits
from vtcompile.errors import PassConfigError
from vtcompile.models import geometry_of, resolve_spec
from vtcompile.passes import parse_pass_spec
from vtcompile.passes.pyramiddrop import PyramidDropConfig

from .common import compiled, masked_key_check, prompt

SPECS = ["pyramiddrop", "pyramiddrop:layers=1/3,ratios=0.75/0.25"]


def _run(geometry, spec, kind):
    cm = compiled(geometry, spec)
    ids, pixels, mask = prompt(geometry, kind)
    prep = cm.prepare(ids, pixels, mask)
    program = cm.program_for(prep.n_visual)
    with torch.no_grad():
        out = program(*prep.as_args())
        logits, positions, visual = out["logits"], out["positions"], out["visual"]
    kept = kept_at_boundaries(program, *prep.as_args())
    return cm, ids, mask, prep, program, logits, positions, kept


@pytest.mark.parametrize("spec", SPECS)
def test_pyramiddrop_matches_masked_key_reference(geometry, prompt_kind, spec):
    seen = masked_key_check(compiled(geometry, spec), geometry, prompt_kind)
    assert sorted(seen["kept"]) == [r.cut for r in seen["program"].rewrites]
    assert torch.equal(seen["kept"][max(seen["kept"])], seen["positions"])
    assert seen["diff"] <= 1e-4


def test_pyramiddrop_ranking_uses_next_layer_qk(geometry):
    """Recompute each cut's ranking with transformers' modules: layer b's norm, q/k proj, RoPE on the
    states entering layer b, last query row, softmax over present keys, head mean."""
    cm, ids, mask, prep, program, logits, positions, kept = _run(geometry, "pyramiddrop", "mid_pad_b2")
    keys = key_masks_from_rewrites(kept, 4, ids.shape[1])
    states = {}
    masked_key_logits(cm.adapter, prep.inputs_embeds, prep.attention_mask, prep.position_ids, keys, states)
    lm = cm.adapter.model.model.language_model
    present = torch.ones_like(prep.visual_mask)
    for rw in program.rewrites:
        b = rw.cut.layer
        block = lm.layers[b]
        h = block.input_layernorm(states[b])
        attn = block.self_attn
        hd = attn.head_dim
        q = attn.q_proj(h).view(*h.shape[:2], -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(*h.shape[:2], -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(h, position_ids=prep.position_ids))
        k = repeat_kv(k, attn.num_key_value_groups)
        row = (q[:, :, -1:] @ k.transpose(-1, -2)).squeeze(2) * attn.scaling
        allowed = present & prep.attention_mask.bool()
        score = torch.softmax(row.masked_fill(~allowed[:, None], float("-inf")), -1).mean(1)
        for r in range(ids.shape[0]):
            cand = (prep.visual_mask[r] & present[r]).nonzero().squeeze(1)
            top = cand[score[r, cand].detach().topk(rw.after).indices].sort().values
            got = kept[rw.cut][r][prep.visual_mask[r][kept[rw.cut][r]]]
            assert torch.equal(top, got), (b, r)
        present = torch.zeros_like(present).scatter_(1, kept[rw.cut], True)


def test_pyramiddrop_flops_llava_7b():
    geom = geometry_of(resolve_spec("llava-1.5-7b", random_weights=True))
    p, cfg = parse_pass_spec("pyramiddrop")
    sched = schedule_from_plan(32, 576, p.plan(cfg, geom, 576))
    assert sched == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert round(FlopsReport(geom, 576, 64, sched).paper / 1e12, 2) == 1.78


def test_pyramiddrop_default_cuts_scale_with_depth():
    g4 = geometry_of(resolve_spec("tiny"))
    assert PyramidDropConfig().cut_layers(g4) == (1, 2, 3)
    assert compiled("tiny", "pyramiddrop").report.flops.schedule == [16, 8, 4, 2]


@pytest.mark.parametrize("spec,needle", [
    ("pyramiddrop:ratios=0.25/0.5/0.125", "not increase"),
    ("pyramiddrop:ratios=0/0.5", "(0, 1]"),
    ("pyramiddrop:layers=1/2,ratios=0.5", "one ratio per cut"),
    ("pyramiddrop:layers=2/1,ratios=0.5/0.25", "strictly increasing"),
    ("pyramiddrop:layers=a/b", "separated by '/'"),
    ("pyramiddrop:ratios=0.5/0.25", "need explicit layers"),
])
def test_pyramiddrop_bad_config(spec, needle):
    with pytest.raises(PassConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        _, cfg = parse_pass_spec(spec)
        cfg.check_model(geometry_of(resolve_spec("tiny")))


def test_pyramiddrop_layer_beyond_model():
    _, cfg = parse_pass_spec("pyramiddrop:layers=2/4,ratios=0.5/0.25")
    with pytest.raises(PassConfigError, match="do not fit a 4-layer decoder"):
        cfg.check_model(geometry_of(resolve_spec("tiny")))

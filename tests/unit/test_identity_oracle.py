"""The two backbone checks (DESIGN.md): keep-all == transformers; pruned == masked-key reference."""
from __future__ import annotations

import copy

import pytest
import torch

from vtcompile.compiler.cut import Cut

from .common import adapter, compiled, hf_logits, masked_key_check, prompt

TOL = 1e-4


def test_no_passes_matches_transformers(geometry, prompt_kind):
    ids, pixels, mask = prompt(geometry, prompt_kind)
    out = compiled(geometry, None)(ids, pixels, mask)
    ref = hf_logits(geometry, ids, pixels, mask)
    assert out.logits.shape == ref.shape
    assert torch.equal(out.kept_positions, torch.arange(ids.shape[1]).expand_as(ids))
    diff = (out.logits - ref).abs().max().item()
    assert diff <= TOL, diff


def _gather_rows(x, idx):
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("spec,k", [("fastv", 2), ("fastv:k=1,r=0.75", 1), ("fastv:k=3,r=0.25", 3)])
def test_fastv_matches_masked_key_reference(geometry, prompt_kind, spec, k):
    cm = compiled(geometry, spec)
    seen = masked_key_check(cm, geometry, prompt_kind)
    assert [r.cut for r in seen["program"].rewrites] == [Cut(k)]
    assert seen["diff"] <= TOL, seen["diff"]
    # the pruning really happened: visual tokens kept per row match the schedule
    per_image = cm.adapter.geometry.visual_tokens_per_image
    images = int(seen["ids"].eq(cm.adapter.image_token_id).sum(1)[0]) // per_image
    expect = cm.program_for(images * per_image).visual_at(3)
    assert seen["visual"].sum(1).tolist() == [expect] * seen["ids"].shape[0]


def test_fastv_selection_matches_eager_attention(geometry, prompt_kind):
    """The kept set equals FastV computed the published way (eager attention, output_attentions)."""
    cm = compiled(geometry, "fastv")
    ids, pixels, mask = prompt(geometry, prompt_kind)
    out = cm(ids, pixels, mask)
    eager = copy.deepcopy(adapter(geometry).model)
    eager.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        attn = eager(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                     position_ids=cm.prepare(ids, pixels, mask).position_ids,
                     output_attentions=True).attentions[1]  # layer k-1 = 1
    score = attn[:, :, -1, :].mean(1)  # last query row, head mean
    visual = ids == cm.adapter.image_token_id
    n_keep = int(out.kept_visual[0].sum())
    for b in range(ids.shape[0]):
        vis_pos = visual[b].nonzero().squeeze(1)
        top = vis_pos[score[b, vis_pos].topk(n_keep).indices].sort().values
        got = out.kept_positions[b][out.kept_visual[b]]
        assert torch.equal(top, got), (b, top, got)


def test_batch_rows_equal_single_rows(geometry):
    cm = compiled(geometry, "fastv")
    ids, pixels, mask = prompt(geometry, "mid_pad_b2")
    out = cm(ids, pixels, mask)
    for b in range(2):
        real = mask[b].bool()
        single = cm(ids[b:b + 1, real], pixels[b:b + 1], mask[b:b + 1, real])
        got = out.logits[b][mask[b].bool()[out.kept_positions[b]]]
        assert (single.logits[0] - got).abs().max().item() <= TOL


@pytest.mark.parametrize("spec", ["fastv:r=0", "pyramiddrop:ratios=1/1/1", "randomdrop:r=0", "fitprune:recipe={empty}"])
def test_keep_all_configs_match_transformers(geometry, spec, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    from vtcompile import compile_pruned

    cm = compile_pruned(adapter(geometry), spec.format(empty=empty))
    assert not cm.program.rewrites and cm.report.flops.paper == cm.report.flops.baseline_paper
    ids, pixels, mask = prompt(geometry, "mid_pad_b2")
    assert (cm(ids, pixels, mask).logits - hf_logits(geometry, ids, pixels, mask)).abs().max().item() <= TOL

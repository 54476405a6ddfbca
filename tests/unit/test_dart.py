"""DART: its choice against a plain re-computation of the authors' rule, the masked-key oracle in prefill (batch 2
with left padding, two images, image first; GQA, and MHA with another pivot criterion), keep-all == the unpruned
model, kept counts per row == the schedule, bad configs. Generation against the masked-key oracle:
test_generate.PASSES["dart"]."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vtcompile import compile_pruned
from vtcompile.compiler.cut import Cut
from vtcompile.compiler.flops import schedule_from_plan
from vtcompile.compiler.graph import layer_nodes
from vtcompile.compiler.scorers import sdpa_arguments
from vtcompile.compiler.taps import run_with_taps
from vtcompile.errors import PassConfigError
from vtcompile.models import geometry_of, resolve_spec
from vtcompile.passes import get_pass
from vtcompile.passes.dart import DARTConfig, dart_select, quotas

from .common import adapter, compiled, hf_logits, masked_key_check, prompt

SPEC = "dart:keep=0.5,pivots=1"  # tiny has 16 visual tokens a image: 8 kept, 1 + 1 pivots taking 4 + 3


def _authors_rule(states, keys, visual, kept: int, pivots: int) -> set[int]:
    """get_retained_image_token of the authors' modeling_llama_self.py for one row, restated: L1 norm of the keys
    over all heads, top `pivots` of the image tokens and of the tokens after the image, then per pivot the
    least cosine-similar candidates (F.cosine_similarity) taken out of the pool in turn. Our counts (quotas) and
    pivot order (image pivots, then text pivots, each by descending norm) in place of the authors' fixed
    TOKEN_TOPK and set order."""
    l1 = keys.permute(1, 0, 2).reshape(keys.shape[1], -1).abs().sum(-1)
    image = visual.nonzero().squeeze(1).tolist()
    after = list(range(max(image) + 1, len(visual)))
    n_image, takes = quotas(kept, pivots)
    image_pivots = [image[i] for i in l1[image].topk(n_image).indices.tolist()]
    text_pivots = [after[i] for i in l1[after].topk(pivots).indices.tolist()]
    chosen, pool = set(image_pivots), [i for i in image if i not in image_pivots]
    for pivot, take in zip(image_pivots + text_pivots, takes):
        sim = -F.cosine_similarity(states[pivot], states[pool], dim=-1)
        picked = [pool[i] for i in sim.topk(take).indices.tolist()]
        chosen.update(picked)
        pool = [i for i in pool if i not in picked]
    return chosen


@pytest.mark.parametrize("kind", ["mid_pad_b2", "two_images"])
def test_choice_equals_the_authors_rule_recomputed(kind):
    """The kept visual tokens of every row == the rule recomputed in plain torch from the states the program
    saw: the residual entering layer 2 through the model's own final norm module, layer 1's keys (tapped)."""
    cm = compiled("tiny-gqa", SPEC)
    ids, pixels, mask = prompt("tiny-gqa", kind, seed=3)
    prep = cm.prepare(ids, pixels, mask)
    program = cm.program_for(prep.n_visual)
    key = sdpa_arguments(layer_nodes(program.gm, 1, "sdpa")[0])[1]
    residual = program.residual_name(1)
    rewrite = program.rewrites[0]
    _, seen = run_with_taps(program.gm, prep.as_args(), {key.name, residual, rewrite.positions})
    norm = adapter("tiny-gqa").model.model.language_model.norm
    with torch.no_grad():
        states = norm(seen[residual])
    for b in range(ids.shape[0]):
        visual = prep.visual_mask[b].bool()
        want = _authors_rule(states[b], seen[key.name][b], visual, rewrite.after, 1)
        got = {p for p in seen[rewrite.positions][b].tolist() if visual[p]}
        assert got == want, (b, sorted(got), sorted(want))
        assert len(got) == rewrite.after == 8 * (2 if kind == "two_images" else 1)


def test_dart_select_by_hand():
    """One row, 2-D states: tokens 1-6 visual, 7-8 text. Image pivot: token 3 (largest norm); text pivot: token 8.
    Keep 4: the image pivot, then 2 tokens least similar to it, then 1 least similar to the text pivot."""
    angle = torch.tensor([0.0, 0.0, 0.1, 0.0, 3.0, 1.6, 2.9, 0.2, 1.5])  # direction of each token's state
    states = torch.stack([angle.cos(), angle.sin()], -1)[None]  # [1, 9, 2]
    norms = torch.tensor([[9.0, 1, 1, 5, 1, 1, 1, 2, 3]])  # token 0 (text before the image) is no pivot
    visual = torch.tensor([[False, True, True, True, True, True, True, False, False]])
    n_image, takes = quotas(4, 1)
    assert (n_image, takes) == (1, (2, 1))
    kept = dart_select(states, norms, visual, image_pivots=n_image, text_pivots=1, takes=takes, width=2)
    # least similar to token 3 (angle 0): 4 (3.0), 6 (2.9); then to token 8 (1.5) among 1, 2, 5: 1 (0.0) vs 2 (0.1)
    # vs 5 (1.6): token 1
    assert kept[0].nonzero().squeeze(1).tolist() == [1, 3, 4, 6]
    # no text after the image: the first image pivot stands in for the text pivot
    kept = dart_select(states[:, :7], norms[:, :7], visual[:, :7], image_pivots=1, text_pivots=1, takes=(2, 1), width=2)
    assert kept[0].nonzero().squeeze(1).tolist() == [3, 4, 5, 6]


# GQA here (the programs test_choice_... compiled); MHA: test_graph_passes' defaults case (both prompt kinds) and the
# criterion case below. Generation: test_generate.PASSES["dart"].
@pytest.mark.parametrize("kind", ["mid_pad_b2", "two_images", "image_first"])
def test_prefill_matches_masked_key_reference(kind):
    seen = masked_key_check(compiled("tiny-gqa", SPEC), "tiny-gqa", kind)
    assert [r.cut for r in seen["program"].rewrites] == [Cut(2)]
    assert seen["diff"] <= 1e-4


def test_another_pivot_criterion_meets_the_reference():
    """criterion=input: pivots by the L1 norm of the layer's normed input [B, S, D] (key/query/value: the
    [B, heads, S, head_dim] tensors SDPA reads, summed alike)."""
    seen = masked_key_check(compiled("tiny", f"{SPEC},criterion=input,k=1"), "tiny", "mid_pad_b2")
    assert seen["diff"] <= 1e-4 and [r.cut for r in seen["program"].rewrites] == [Cut(1)]


def test_kept_counts_per_row_match_the_schedule():
    cm = compiled("tiny-gqa", SPEC)
    for kind, n_visual in (("mid_pad_b2", 16), ("two_images", 32)):
        ids, pixels, mask = prompt("tiny-gqa", kind, seed=5)
        out = cm(ids, pixels, mask)
        schedule = cm.program_for(n_visual).schedule
        assert schedule == [n_visual, n_visual] + [n_visual // 2] * 2
        assert out.kept_visual.sum(1).tolist() == [schedule[-1]] * ids.shape[0]
        for layer in range(4):  # each layer's cache: the text and the visual tokens its attention saw
            assert out.outputs[f"k_{layer}"].shape[2] == ids.shape[1] - n_visual + schedule[layer]
    geom = geometry_of(resolve_spec("llava-1.5-7b", random_weights=True))
    p = get_pass("dart")
    assert schedule_from_plan(32, 576, p.plan(p.config(), geom, 576)) == [576, 576] + [128] * 30


def test_keep_all_equals_the_unpruned_model():
    cm = compile_pruned(adapter("tiny-gqa"), "dart:keep=1.0", progress=False)
    assert not cm.program.rewrites
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2")
    diff = (cm(ids, pixels, mask).logits - hf_logits("tiny-gqa", ids, pixels, mask)).abs().amax(-1)
    assert diff[mask.bool()].max().item() <= 1e-4


def test_config_round_trip_and_bad_configs():
    cfg = DARTConfig(k=3, keep=0.3, pivots=2, criterion="value")
    assert DARTConfig.from_dict(json.loads(cfg.to_json())["config"]) == cfg
    assert (DARTConfig().k, DARTConfig().keep, DARTConfig().pivots, DARTConfig().criterion) == (2, 0.222, 4, "key")
    for spec, message in (("dart:keep=0", "keep=0.0 is out of range"), ("dart:keep=1.5", "keep=1.5 is out of range"),
                          ("dart:pivots=0", "pivots=0 is out of range"), ("dart:k=0", "k=0 is out of range"),
                          ("dart:criterion=attention", "criterion='attention' is not known; expected one of key")):
        with pytest.raises(PassConfigError, match=message):
            compile_pruned(adapter("tiny"), spec)
    with pytest.raises(PassConfigError, match=r"k=4 is beyond the last layer; .* k must be in \[1, 3\]"):
        compile_pruned(adapter("tiny"), "dart:k=4")

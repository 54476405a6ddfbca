"""Head passes (headskip, attnskip): nothing skipped == original; sliced heads == the reference with those heads'
o_proj input columns zeroed (MHA and GQA: heads inside one k/v group, whole groups, uneven groups); the sliced
graph runs smaller q/k/v/o matmuls; a removed attention leaves no SDPA/q/k/v/o in its layer and == the reference
with that attention's output zeroed; composition with token passes == the reference with heads zeroed AND keys
masked; generation == that reference; FLOPs/KV bookkeeping; the user's model untouched; config round trip; bad
input."""
from __future__ import annotations

import json

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.compiler.flops import FlopsReport, paper_layer
from vtcompile.compiler.graph import SDPA, count_ops, layer_nodes
from vtcompile.compiler.reference import head_plan, masked_key_generate, masked_key_logits
from vtcompile.errors import PassConfigError, VtcompileError
from vtcompile.models import geometry_of, resolve_spec
from vtcompile.passes import parse_pass_spec
from vtcompile.passes.attnskip import AttnSkipConfig
from vtcompile.passes.headskip import HeadSkipConfig

from .common import adapter, compiled, hf_logits, prompt

aten = torch.ops.aten
TOL = 1e-4


def head_oracle_diff(cm, ids, pixels, mask) -> float:
    """Largest |logit diff| at real kept positions between the compiled prefill and the reference: the unmodified
    model with the program's removed heads zeroed / removed attentions zeroed (head_plan) and per-layer key masks
    from the keys each layer's attention saw (its key_positions output; a layer without attention has none)."""
    out = cm(ids, pixels, mask)
    prep = cm.prepare(ids, pixels, mask)
    keys = []
    for layer in range(cm.frontend.geometry.num_layers):
        pos = out.outputs.get(f"key_positions_{layer}")
        keys.append(None if pos is None else
                    torch.zeros_like(mask, dtype=torch.bool).scatter_(1, pos.clamp(min=0), pos >= 0))
    ref = masked_key_logits(cm.adapter, prep.inputs_embeds, prep.attention_mask, prep.position_ids, keys,
                            **head_plan(cm.program_for(prep.n_visual)))
    positions = out.kept_positions
    ref = torch.gather(ref, 1, positions.clamp(min=0)[..., None].expand(-1, -1, ref.shape[-1]))
    real = (positions >= 0) & torch.gather(mask, 1, positions.clamp(min=0)).bool()
    diff = (ref - out.logits).abs().amax(-1)[real].max().item()
    print(f"oracle max |diff| {cm.report.passes}: {diff:.3g}")
    return diff


def linear_weight_shape(gm, layer: int, role: str) -> tuple:
    (lin,) = [n for n in layer_nodes(gm, layer, role) if n.target is aten.linear.default]
    return tuple(lin.args[1].meta["val"].shape)


# -- identity and slicing ------------------------------------------------------------------------------
def test_nothing_skipped_is_the_original(geometry):
    cm = compiled(geometry, "headskip:budget=0")
    base = compiled(geometry, None).program.gm
    assert not cm.program.kept_heads and cm.program.q_heads == [4] * 4
    assert [n.target for n in cm.program.gm.graph.nodes] == [n.target for n in base.graph.nodes]
    ids, pixels, mask = prompt(geometry, "mid_pad_b2")
    out = cm(ids, pixels, mask)
    diff = (out.logits - hf_logits(geometry, ids, pixels, mask)).abs().amax(-1)[mask.bool()].max().item()
    assert diff <= TOL


# heads removed: (MHA: two layers; GQA 4q/2kv: layer 1 loses one head of group 0 - uneven groups -, layer 2 two
# heads from different groups - one per k/v head -), a whole k/v group, one head of layer 0 left and a whole group
SLICES = ["1.0/2.1/2.3", "1.0/1.1", "0.1/0.2/0.3/3.0/3.3"]


@pytest.mark.parametrize("heads", SLICES)
def test_sliced_heads_equal_zeroed_o_proj_columns(geometry, heads):
    cm = compiled(geometry, f"headskip:heads={heads}")
    for kind in ("mid_pad_b2", "two_images"):
        assert head_oracle_diff(cm, *prompt(geometry, kind)) <= TOL
    removed = {}
    for item in heads.split("/"):
        layer, head = map(int, item.split("."))
        removed.setdefault(layer, set()).add(head)
    program = cm.program
    for layer in range(4):
        keep = [h for h in range(4) if h not in removed.get(layer, ())]
        assert program.q_heads[layer] == len(keep)
        group = 4 // cm.frontend.geometry.num_kv_heads
        assert program.kv_heads[layer] == len({h // group for h in keep})
        # the reference differs from the unsliced model: the test compares something
    ids, pixels, mask = prompt(geometry, "mid_pad_b2")
    assert (cm(ids, pixels, mask).logits - hf_logits(geometry, ids, pixels, mask)).abs().max() > 1e-2


def test_sliced_graph_runs_smaller_matmuls():
    gm = compiled("tiny-gqa", "headskip:heads=1.0/2.1/2.3/3.0/3.1").program.gm
    hd, d = 16, 64
    # layer 1: query heads 1,2,3 (k/v heads 0 and 1 both still needed: uneven groups 1 + 2)
    assert linear_weight_shape(gm, 1, "q_proj") == (3 * hd, d)
    assert linear_weight_shape(gm, 1, "o_proj") == (d, 3 * hd)
    assert linear_weight_shape(gm, 1, "k_proj") == linear_weight_shape(gm, 1, "v_proj") == (2 * hd, d)
    # layer 2: heads 0 and 2, one per k/v head; layer 3: heads 2, 3 - k/v head 0 goes with its whole group
    assert linear_weight_shape(gm, 2, "q_proj") == (2 * hd, d)
    assert linear_weight_shape(gm, 3, "k_proj") == linear_weight_shape(gm, 3, "v_proj") == (hd, d)
    assert linear_weight_shape(gm, 0, "q_proj") == (4 * hd, d)  # untouched layer
    heads = {layer: layer_nodes(gm, layer, "sdpa")[0].args[0].meta["val"].shape[1] for layer in range(4)}
    assert heads == {0: 4, 1: 3, 2: 2, 3: 2}
    repeats = {layer: sorted(str(n.target) for n in layer_nodes(gm, layer)
                             if n.target in (aten.index_select.default, aten.repeat_interleave.self_int))
               for layer in range(4)}
    assert repeats[1] == ["aten.index_select.default"] * 2  # uneven: expanded per remaining query head
    assert repeats[2] == [] and repeats[3] == ["aten.repeat_interleave.self_int"] * 2
    names = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "lm_layers_1_self_attn_q_proj_weight" not in names  # the sliced copy is read instead


def test_attnskip_removes_the_attention_block(geometry):
    cm = compiled(geometry, "attnskip:layers=1/3")
    gm, program = cm.program.gm, cm.program
    assert count_ops(gm, SDPA) == 2
    for layer in (1, 3):
        roles = {n.meta["vt_role"] for n in layer_nodes(gm, layer)}
        assert not roles & {"sdpa", "q_proj", "k_proj", "v_proj", "o_proj", "attn"}, roles
        assert "mlp" in roles
    assert program.signature.cache_layers() == [0, 2]
    assert program.q_heads == [4, 0, 4, 0]
    for kind in ("mid_pad_b2", "two_images"):
        assert head_oracle_diff(cm, *prompt(geometry, kind)) <= TOL


def test_users_model_is_bit_identical_after_compiling():
    model = adapter("tiny-gqa").model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cm = compile_pruned(adapter("tiny-gqa"), ["headskip:heads=1.0/2.1/3.2", "attnskip:layers=2"], progress=False)
    cm(*prompt("tiny-gqa", "mid_pad_b2"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2")  # another program of the same model is unchanged too
    plain = compiled("tiny-gqa", None)(ids, pixels, mask).logits
    assert (plain - hf_logits("tiny-gqa", ids, pixels, mask)).abs().amax(-1)[mask.bool()].max() <= TOL


# -- composition and generation -----------------------------------------------------------------------
def _fitprune_recipe(tmp_path) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"n_visual": 16, "removed": {"2": 6}}))
    return str(path)


COMPOSED = {"fastv+headskip": ["fastv", "headskip:heads=1.0/3.1/3.2"],  # slices the layer FastV scores with
            "headskip+fastv": ["headskip:heads=1.0/1.2", "fastv:k=2"],  # FastV scores with layer 1's kept heads
            # head passes first: fitprune then scores with the sliced heads of layer 2 (and re-propagating shapes
            # of a graph with gathers is what makes a rewrite after fitprune slow)
            "headskip+attnskip+fitprune": ["headskip:heads=1.1/2.0/2.2", "attnskip:layers=3",
                                           "fitprune:recipe={recipe}"],
            "dyvte+attnskip": ["dyvte:exit_layer=1", "attnskip:layers=2"]}
# every composition on GQA (uneven groups feeding a scorer), one on MHA too
CASES = [("tiny-gqa", n) for n in COMPOSED] + [("tiny", "fastv+headskip")]


@pytest.mark.parametrize("geometry,name", CASES)
def test_composition_equals_zeroed_heads_and_masked_keys(geometry, name, tmp_path):
    spec = [s.format(recipe=_fitprune_recipe(tmp_path)) for s in COMPOSED[name]]
    cm = compile_pruned(adapter(geometry), spec, progress=False)
    assert cm.program.rewrites and (cm.program.kept_heads or 0 in cm.program.q_heads)
    for kind in ("mid_pad_b2", "two_images"):
        assert head_oracle_diff(cm, *prompt(geometry, kind)) <= TOL


@pytest.mark.parametrize("spec", [["headskip:heads=1.0/2.1/2.3"], ["fastv:k=1", "headskip:heads=1.0/1.1/3.3",
                                                                     "attnskip:layers=2"]])
def test_generation_equals_the_reference(spec):
    from .test_generate import NEW, generate_with_logits

    cm = compile_pruned(adapter("tiny-gqa"), spec, progress=False)
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2", seed=2)
    tokens, logits, result, prepared = generate_with_logits(cm, ids, pixels, mask)
    keys = []
    for layer in range(4):
        pos = result.values.get(f"key_positions_{layer}")
        keys.append(None if pos is None else torch.zeros_like(prepared.attention_mask, dtype=torch.bool)
                    .scatter_(1, pos, True))
    ref = masked_key_generate(cm.adapter, prepared.inputs_embeds, prepared.attention_mask, keys, tokens,
                              **head_plan(cm.program))
    diff = (ref - logits).abs().max().item()
    print(f"generation oracle max |diff| {spec}: {diff:.3g}")
    assert diff <= TOL and torch.equal(ref.argmax(-1), tokens) and tokens.shape[1] == NEW
    step = cm.executable(16).decode_info["cache_shapes"]
    # per-layer cache shapes (k/v heads, head dim) come from the graph: layer 2 of the second has no cache
    assert step == ({"0": [2, 16], "1": [1, 16], "3": [2, 16]} if len(spec) > 1 else
                    {"0": [2, 16], "1": [2, 16], "2": [2, 16], "3": [2, 16]})


def test_kv_bytes_and_flops_follow_the_head_counts():
    cm = compiled("tiny-gqa", "headskip:heads=1.0/1.1/2.3")
    ids, pixels, mask = prompt("tiny-gqa", "image_first")
    cm.generate(ids, pixels, mask, max_new_tokens=3, eos_token_id=[])
    f = cm.report.flops
    assert f.q_heads == [4, 2, 3, 4] and f.kv_heads == [2, 1, 2, 2]
    analytic = FlopsReport(f.geometry, f.n_visual, ids.shape[1] - f.n_visual, f.schedule, f.mlp_schedule,
                           f.dtype_bytes, f.q_heads, f.kv_heads)
    assert [cm.last_generation.kv_prompt_bytes[r["layer"]] for r in analytic.rows()] == \
        [r["kv_bytes"] for r in analytic.rows()]
    g = f.geometry
    n, d, m = 16, g.hidden_size, g.intermediate_size
    layer1 = 2 * n * d * d * (2 / 4 + 1 / 2) + 2 * n * n * d * (2 / 4) + 3 * n * d * m
    assert paper_layer(16, g, q_heads=2, kv_heads=1) == layer1 == f.rows()[1]["paper_gflops"] * 1e9
    assert f.true < f.baseline_true and f.paper < f.baseline_paper
    assert f.to_dict()["q_heads_per_layer"] == [4, 2, 3, 4]


def test_llava_7b_flops_of_removed_attention_and_heads():
    geom = geometry_of(resolve_spec("llava-1.5-7b", random_weights=True))
    full = FlopsReport(geom, 576, 0, [576] * 32)
    skipped = FlopsReport(geom, 576, 0, [576] * 32, q_heads=[32] * 20 + [0] * 12, kv_heads=[32] * 20 + [0] * 12)
    n, d = 576, 4096
    assert full.paper - skipped.paper == pytest.approx(12 * (4 * n * d * d + 2 * n * n * d))
    assert skipped.kv_bytes == full.kv_bytes * 20 // 32
    heads = [32] * 2 + [16] * 30  # MHA (32/32): a k/v head goes with its one query head
    half = FlopsReport(geom, 576, 0, [576] * 32, q_heads=heads, kv_heads=heads)
    assert half.paper == pytest.approx(full.paper - 30 * (2 * n * d * d + n * n * d))
    assert half.kv_bytes == full.kv_bytes * 17 // 32
    # the same counts from the passes' configs, without weights (random budget form: no calibration needed)
    from vtcompile.passes.attnskip import head_counts as attn_counts
    from vtcompile.passes.headskip import head_counts

    assert attn_counts(AttnSkipConfig(layers=tuple(range(20, 32))), geom) == (skipped.q_heads, skipped.kv_heads)
    q, kv = head_counts(HeadSkipConfig(budget=0.25, criterion="random"), geom)
    assert q[:2] == [32, 32] and sum(q) == 32 * 32 - round(0.25 * 32 * 30) and kv == q
    budget = FlopsReport(geom, 576, 0, [576] * 32, q_heads=q, kv_heads=kv)
    print(f"llava-1.5-7b paper TFLOPs: full {full.paper / 1e12:.2f}, attnskip 12 layers {skipped.paper / 1e12:.2f}, "
          f"headskip budget 0.25 {budget.paper / 1e12:.2f}")


# -- calibrated forms ----------------------------------------------------------------------------------
def test_budget_form_removes_the_lowest_scoring_heads_after_first_layer():
    # the budget form's mechanics with the one-run criterion (the default, ablation, is tested below)
    cm = compile_pruned(adapter("tiny"), "headskip:budget=0.25,criterion=output,samples=3", calibration="synthetic",
                        progress=False)
    recipe = cm.recipes["headskip"]
    assert len(recipe.heads) == 2  # 0.25 of the 8 heads of layers 2-3
    scores = recipe.scores
    assert set(scores) == {f"{l}.{h}" for l in (2, 3) for h in range(4)}
    assert sorted(scores, key=scores.get)[:2] == sorted(recipe.heads, key=scores.get)
    assert cm.program.q_heads[:2] == [4, 4] and sum(cm.program.q_heads) == 14
    assert head_oracle_diff(cm, *prompt("tiny", "mid_pad_b2")) <= TOL
    rnd = compile_pruned(adapter("tiny"), "headskip:budget=0.5,criterion=random,first_layer=1", progress=False)
    assert sum(rnd.program.q_heads) == 16 - 6 and min(rnd.program.q_heads) >= 1
    vis = compile_pruned(adapter("tiny-gqa"), "headskip:budget=0.25,criterion=visual,samples=2",
                         calibration="synthetic", progress=False)
    scores = vis.recipes["headskip"].scores
    assert len(scores) == 8 and all(0 <= v <= 1 for v in scores.values())
    assert sorted(scores, key=scores.get)[:2] == sorted(vis.recipes["headskip"].heads, key=scores.get)
    assert head_oracle_diff(vis, *prompt("tiny-gqa", "two_images")) <= TOL


def test_output_criterion_equals_an_independent_computation():
    """The score of a head from hooks on the transformers model: ||o_proj(head's part)|| / ||layer input||."""
    from vtcompile.passes.headskip import output_scores

    cm = compiled("tiny", None)
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")
    prep = cm.prepare(ids, pixels, mask)
    scores = output_scores(cm.program, [prep.as_args()], first_layer=2, progress=False)
    seen = {}
    layer = cm.adapter.model.model.language_model.layers[3]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("h", kw.get("hidden_states", a[0] if a
                                                                                           else None)),
                                             with_kwargs=True)]
    try:
        hf_logits("tiny", ids, pixels, mask)
    finally:
        for h in hooks:
            h.remove()
    w, real = layer.self_attn.o_proj.weight, mask.bool()
    for head in range(4):
        part = seen["x"][..., head * 16:(head + 1) * 16] @ w[:, head * 16:(head + 1) * 16].T
        expect = (part.norm(dim=-1) / seen["h"].norm(dim=-1))[real].mean().item()
        assert scores[(3, head)] == pytest.approx(expect, rel=1e-4)


def test_attnskip_count_and_adapter():
    cm = compile_pruned(adapter("tiny"), "attnskip:count=1,samples=3", calibration="synthetic", progress=False)
    proxy = cm.recipes["attnskip"].proxy
    assert set(proxy) == {"2", "3"} and cm.recipes["attnskip"].layers == [int(min(proxy, key=proxy.get))]
    skipped = cm.recipes["attnskip"].layers[0]
    ad = compile_pruned(adapter("tiny"), f"attnskip:layers={skipped},adapter=true,samples=3",
                        calibration="synthetic", progress=False)
    lins = [n for n in layer_nodes(ad.program.gm, skipped) if n.target is aten.linear.default
            and n.meta["vt_role"] == "attn"]
    assert len(lins) == 1 and count_ops(ad.program.gm, SDPA) == 3  # the adapter, no attention
    for c in (cm, ad):
        assert head_oracle_diff(c, *prompt("tiny", "mid_pad_b2")) <= TOL
    g = ad.report.flops
    assert g.adapted == [skipped] and g.paper > cm.report.flops.paper  # the adapter's d x d matmul is counted
    ids, pixels, mask = prompt("tiny", "mid_pad_b2", seed=5)
    full = hf_logits("tiny", ids, pixels, mask)
    real = mask.bool()
    errs = [(c(ids, pixels, mask).logits - full).abs().amax(-1)[real].mean().item() for c in (cm, ad)]
    print(f"attnskip layer {skipped}: mean max|logit - unpruned| zeroed {errs[0]:.3g}, adapter {errs[1]:.3g}")


def _last_token_kl(cm, prompts) -> float:
    """KL(unpruned || cm) of the next-token distribution at each prompt's last position, mean over the rows,
    computed from the compiled models' logits (not through the library's calibration code)."""
    base, kl = compiled("tiny", None), []
    for ids, pixels, mask in prompts:
        ref = torch.log_softmax(base(ids, pixels, mask).logits[:, -1].float(), -1)
        got = torch.log_softmax(cm(ids, pixels, mask).logits[:, -1].float(), -1)
        kl.append((ref.exp() * (ref - got)).sum(-1))
    return torch.cat(kl).mean().item()


def test_attnskip_search_scores_every_set_by_its_loss():
    """criterion=search: each skip set's loss is the KL divergence of the last prompt token's distribution from the
    unpruned model's, mean over the calibration prompts (checked against compiled models with those layers given
    explicitly, run on the same prompts); the set of lowest loss is the one removed."""
    prompts = [prompt("tiny", kind, seed=seed) for kind, seed in (("mid_pad_b2", 3), ("image_first", 4))]
    cm = compile_pruned(adapter("tiny"), "attnskip:count=1,criterion=search", calibration=prompts, progress=False)
    recipe = cm.recipes["attnskip"]
    assert recipe.proxy is None and set(recipe.search) == {"2", "3"}
    for layers, loss in recipe.search.items():
        skip = compile_pruned(adapter("tiny"), f"attnskip:layers={layers}", progress=False)
        assert loss == pytest.approx(_last_token_kl(skip, prompts), rel=1e-4, abs=1e-7)
    assert recipe.layers == [int(min(recipe.search, key=recipe.search.get))]


def test_headskip_ablation_scores_each_head_by_its_loss():
    """criterion=ablation: each head's score is the KL divergence of the last token's distribution when that head
    alone is removed (checked against compiled models with the head given explicitly); the lowest go."""
    prompts = [prompt("tiny", kind, seed=seed) for kind, seed in (("mid_pad_b2", 3), ("image_first", 4))]
    cm = compile_pruned(adapter("tiny"), "headskip:budget=0.25,criterion=ablation,first_layer=2",
                        calibration=prompts, progress=False)
    recipe = cm.recipes["headskip"]
    assert set(recipe.scores) == {f"{l}.{h}" for l in (2, 3) for h in range(4)}
    for head in ("2.1", "3.2"):
        alone = compile_pruned(adapter("tiny"), f"headskip:heads={head}", progress=False)
        assert recipe.scores[head] == pytest.approx(_last_token_kl(alone, prompts), rel=1e-4, abs=1e-7)
    lowest = sorted(recipe.scores, key=lambda h: (recipe.scores[h], h))[:2]  # 25% of 8 heads
    assert sorted(recipe.heads) == sorted(lowest)


def test_head_passes_after_dyvte_routers_rewrite_every_exit_branch():
    """Head passes listed after DyVTE with routers rewrite the exit branches too: each row equals the static exit it
    took, composed with the same head passes (itself checked against the zeroed-heads reference), in prefill and in
    generation (a branch without the removed attention once returned its cache: the signature did not match)."""
    from .test_dyvte import trained

    heads = ["headskip:heads=1.0/2.3", "attnskip:layers=2"]
    cm = compile_pruned(adapter("tiny"), ["dyvte:max_loss=0", *heads], recipes={"dyvte": trained("tiny").recipes["dyvte"]},
                        progress=False)
    statics = {}

    def static(e):  # the static exit after layer e (-1: none) with the same head passes
        if e not in statics:
            statics[e] = compile_pruned(adapter("tiny"), ([f"dyvte:exit_layer={e}"] if e >= 0 else []) + heads,
                                        progress=False)
        return statics[e]

    for kind, seed in (("mid_pad_b2", 9),):  # the batch's rows exit at different layers
        ids, pixels, mask = prompt("tiny", kind, seed=seed)
        out = cm(ids, pixels, mask)
        for row, e in enumerate(out.exit_layers):
            if e not in statics:  # each static form checked against the reference once
                assert head_oracle_diff(static(e), ids, pixels, mask) <= TOL
            ref = static(e)(ids, pixels, mask)
            got_pos, ref_pos = out.kept_positions[row], ref.kept_positions[row]
            got, want = got_pos >= 0, ref_pos >= 0  # a row's kept positions, the rest padding
            assert torch.equal(got_pos[got], ref_pos[want])
            real = mask[row].bool()[got_pos[got]]
            diff = (out.logits[row][got] - ref.logits[row][want]).abs().amax(-1)[real].max().item()
            assert diff <= TOL, (kind, seed, row, e, diff)
        generated = cm.generate(ids, pixels, mask, max_new_tokens=4, eos_token_id=[])
        by_exit = {e: static(e).generate(ids, pixels, mask, max_new_tokens=4, eos_token_id=[])
                   for e in set(out.exit_layers)}
        assert torch.equal(generated, torch.stack([by_exit[e][row] for row, e in enumerate(out.exit_layers)]))
    assert len(statics) >= 2, sorted(statics)  # rows took different ways through the branches


def test_attnskip_search_sets():
    from vtcompile.passes.attnskip import skip_sets

    assert skip_sets([2, 3, 4, 5], 2, 64, 0) == [(2, 3), (2, 4), (2, 5), (3, 4), (3, 5), (4, 5)]
    drawn = skip_sets(list(range(2, 32)), 12, 64, seed=1)
    assert len(drawn) == len(set(drawn)) == 64 and all(len(s) == 12 and list(s) == sorted(s) for s in drawn)
    assert drawn == skip_sets(list(range(2, 32)), 12, 64, seed=1) != skip_sets(list(range(2, 32)), 12, 64, seed=2)
    with pytest.raises(PassConfigError, match="criterion='loss' is not known; expected one of proxy, search"):
        AttnSkipConfig(count=1, criterion="loss")


# -- configs and bad input -----------------------------------------------------------------------------
def test_config_round_trip():
    for cfg in (HeadSkipConfig(heads=("1.0", "2.4")), HeadSkipConfig(budget=0.5, first_layer=1, criterion="random"),
                AttnSkipConfig(layers=(3, 5), adapter=True), AttnSkipConfig(count=4)):
        blob = json.loads(cfg.to_json())
        assert type(cfg).from_dict(blob["config"]) == cfg
    assert parse_pass_spec("headskip:heads=1.0/2.4")[1] == HeadSkipConfig(heads=("1.0", "2.4"))
    assert parse_pass_spec("attnskip:layers=3/5,adapter=true")[1] == AttnSkipConfig(layers=(3, 5), adapter=True)
    assert parse_pass_spec("headskip:budget=0.25")[1] == HeadSkipConfig()


@pytest.mark.parametrize("spec,match", [
    ("headskip:heads=7.0", "names layer 7; the model has decoder layers 0..3"),
    ("headskip:heads=1.9", "head 1.9 does not exist; layers have query heads 0..3"),
    ("headskip:heads=1.0/1.1/1.2/1.3", "removes every head of layer 1.*use attnskip:layers=1"),
    ("headskip:heads=1.0/2.1/1.0", "head 1.0 is given twice"),
    ("headskip:heads=1x", "is not LAYER.HEAD"),
    ("headskip:budget=1", r"budget=1.0 is out of range; expected budget in \[0.0, 1.0\)"),
    ("headskip:budget=-0.1", "budget=-0.1 is out of range"),
    ("headskip:budget=0.9,criterion=random", "every layer keeps at least one"),
    ("headskip:heads=1.0,budget=0.5", "not both"),
    ("headskip:criterion=attention", "criterion='attention' is not known"),
    ("headskip:budget=0.25", "calibrates a recipe and needs calibration data"),
    ("attnskip:layers=4", "layer 4 does not exist"),
    ("attnskip:layers=1/1", "given twice"),
    ("attnskip", "give the layers"),
    (["attnskip:layers=2", "headskip:heads=2.1"], "layer 2's attention was removed"),
    (["attnskip:layers=1", "fastv:k=2"], "layer 1 has no attention: an earlier pass removed it"),
    (["fastv:k=2", "attnskip:layers=1"], "layer 1.s q/k projections also feed the token scores of a pass applied "
                                         "before it"),
])
def test_bad_input(spec, match):
    with pytest.raises(VtcompileError, match=match):
        compile_pruned(adapter("tiny"), spec, progress=False)


def test_bad_count_is_refused_before_calibrating():
    with pytest.raises(PassConfigError, match="count=3 but only 2 layers"):
        compile_pruned(adapter("tiny"), "attnskip:count=3,samples=1", calibration="synthetic", progress=False)


# Inductor and ONNX parity of the head passes: test_targets.py's fitprune+heads family.


def test_literal_head_counts_in_reshapes_are_rewritten():
    """transformers writes -1 for the head axis; a graph with literal head counts (q/k/v views [B, S, H, hd], the
    flattening reshape [B, S, H*hd]) gets them rewritten when heads are sliced."""
    from vtcompile.compiler.heads import slice_heads
    from vtcompile.compiler.pipeline import build_program

    cm = compiled("tiny-gqa", None)
    program = build_program(cm.captured, 16, [])
    literal = {"q_proj": 4, "k_proj": 2, "v_proj": 2}
    for n in layer_nodes(program.gm, 1):
        if n.target is aten.view.default and n.args[0].meta.get("vt_role") in literal:
            n.update_arg(1, [x if x != -1 else literal[n.args[0].meta["vt_role"]] for x in n.args[1]])
        if n.target is aten.reshape.default and n.users and next(iter(n.users)).meta["vt_role"] == "o_proj":
            n.update_arg(1, [x if x != -1 else 64 for x in n.args[1]])
    program.gm.recompile()
    slice_heads(program, {1: [1, 2, 3]}, by="test")  # uneven groups: k/v heads 0 and 1 both stay
    shapes = [list(n.args[1]) for n in layer_nodes(program.gm, 1)
              if n.target in (aten.view.default, aten.reshape.default)]
    assert any(s[2:] == [3, 16] for s in shapes) and any(s[-1] == 48 for s in shapes)
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2")
    prep = cm.prepare(ids, pixels, mask)
    logits = program(*prep.as_args())["logits"]
    ref = masked_key_logits(cm.adapter, prep.inputs_embeds, prep.attention_mask, prep.position_ids, [None] * 4,
                            head_keep={1: (1, 2, 3)})
    assert (logits - ref).abs().amax(-1)[mask.bool()].max().item() <= TOL

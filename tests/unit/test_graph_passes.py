"""Graph-level checks: op presence, token counts in the graph, FLOPs, pass configs and registry."""
from __future__ import annotations

import json

import pytest
import torch

from vtcompile.compiler.flops import FlopsReport, schedule_from_plan
from vtcompile.compiler.graph import SDPA, count_ops, layer_nodes, same_size
from vtcompile.errors import PassConfigError, UnsupportedModelError
from vtcompile.models import geometry_of, resolve_spec
from vtcompile.passes import REGISTRY, get_pass, parse_pass_spec, resolve_passes
from vtcompile.passes.fastv import FastVConfig

from .common import compiled

aten = torch.ops.aten


def _gathers(gm, layer):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.gather.default
            and n.meta["vt_layer"] == layer]


def test_no_passes_graph_has_no_gathers(geometry):
    gm = compiled(geometry, None).program.gm
    assert not [n for n in gm.graph.nodes if n.target is aten.gather.default]
    assert count_ops(gm, SDPA) == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fastv_gathers_token_axis_at_layer_k_and_keeps_sdpa(geometry, k):
    cm = compiled(geometry, f"fastv:k={k}")
    gm, program = cm.program.gm, cm.program
    gathers = _gathers(gm, k - 1)
    # residual stream, RoPE cos and sin, the 4-D mask on both token axes, positions, visual mask
    assert len(gathers) == 7
    assert not [n for n in gm.graph.nodes if n.target is aten.gather.default and n.meta["vt_layer"] != k - 1]
    assert count_ops(gm, SDPA) == 4  # attention stays SDPA in every layer
    assert count_ops(gm, aten.topk.default) == 1
    seq = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[1]
    dropped = 16 - program.visual_at(k)
    for layer in range(4):
        q_tokens = layer_nodes(gm, layer, "sdpa")[0].args[0].meta["val"].shape[2]
        assert same_size(q_tokens, seq if layer < k else seq - dropped), (layer, q_tokens)


def test_fastv_scorer_reads_layer_k_minus_1_qk():
    gm = compiled("tiny", "fastv").program.gm
    sdpa1 = layer_nodes(gm, 1, "sdpa")[0]
    q1, k1 = sdpa1.args[0], sdpa1.args[1]
    scorer_users = {u for u in list(q1.users) + list(k1.users) if u.meta["vt_role"] == "select"}
    assert scorer_users, "the FastV score must be computed from the q/k that layer 1 feeds to SDPA"


def test_llava_7b_flops_paper_convention_without_weights():
    geom = geometry_of(resolve_spec("llava-1.5-7b", random_weights=True))
    assert (geom.num_layers, geom.visual_tokens_per_image, geom.hidden_size) == (32, 576, 4096)
    p, cfg = parse_pass_spec("fastv")
    rep = FlopsReport(geom, 576, 64, schedule_from_plan(32, 576, p.plan(cfg, geom, 576)))
    assert round(rep.baseline_paper / 1e12, 2) == 3.82
    assert round(rep.paper / 1e12, 2) == 2.01
    assert rep.schedule == [576, 576] + [288] * 30
    assert rep.true < rep.baseline_true


def test_13b_baseline_paper_flops():
    geom = geometry_of(resolve_spec("llava-1.5-13b", random_weights=True))
    assert round(FlopsReport(geom, 576, 0, [576] * 40).baseline_paper / 1e12, 2) == 7.44


def test_true_flops_count_text_and_head():
    geom = geometry_of(resolve_spec("tiny"))
    a, b = FlopsReport(geom, 16, 10, [16] * 4), FlopsReport(geom, 16, 20, [16] * 4)
    assert b.true > a.true and a.paper == b.paper


def test_compiled_schedule_matches_plan(geometry):
    cm = compiled(geometry, "fastv:k=3,r=0.25")
    assert cm.report.flops.schedule == [16, 16, 16, 12]


def test_fastv_config_round_trip_and_ranges():
    cfg = FastVConfig(k=3, r=0.25)
    blob = json.loads(cfg.to_json())
    assert blob["pass"] == "fastv" and FastVConfig.from_dict(blob["config"]) == cfg
    assert FastVConfig.from_dict({"k": "4", "r": "0.5"}) == FastVConfig(k=4, r=0.5)
    with pytest.raises(PassConfigError, match="r=1.5 is out of range"):
        FastVConfig(r=1.5)
    with pytest.raises(PassConfigError, match="k=0 is out of range"):
        FastVConfig(k=0)
    with pytest.raises(PassConfigError, match="unknown field"):
        FastVConfig.from_dict({"depth": 2})
    with pytest.raises(PassConfigError, match="beyond the last layer"):
        FastVConfig(k=4).check_model(geometry_of(resolve_spec("tiny")))


# Every registered pass at its published defaults (calibrating passes on synthetic prompts), on tiny. A pass that
# is registered without a case here fails below: add it.
DEFAULTS = {"fastv": ("fastv", None), "pyramiddrop": ("pyramiddrop", None), "randomdrop": ("randomdrop", None),
            "fitprune": ("fitprune:samples=8", "synthetic"), "dyvte": ("dyvte:samples=8,epochs=20,label=token,max_loss=0", "synthetic"),
            "gprune": ("gprune", None), "divprune": ("divprune", None), "dart": ("dart", None),
            "cdpruner": ("cdpruner", None),
            "headskip": ("headskip:samples=4", "synthetic"), "attnskip": ("attnskip:count=1,samples=4", "synthetic")}
HEAD_PASSES = {"headskip", "attnskip"}  # their reference also zeroes the removed heads / attention (test_headskip)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_pass_at_its_defaults_meets_the_oracle(name):
    """Config JSON round trip, then the pruned prefill against the masked-key reference built from the keys each
    layer's attention saw (per row after a DyVTE exit)."""
    from vtcompile import compile_pruned

    from .common import adapter, prefill_oracle_diff, prompt

    assert name in DEFAULTS, f"pass {name!r} is registered but has no oracle case in DEFAULTS"
    p = get_pass(name)
    cfg = p.config()
    assert p.config.from_dict(json.loads(cfg.to_json())["config"]) == cfg
    spec, calibration = DEFAULTS[name]
    cm = compile_pruned(adapter("tiny"), spec, calibration=calibration, progress=False)
    assert cm.report.flops.paper < cm.report.flops.baseline_paper or cm.report.exits  # it prunes something
    from .test_headskip import head_oracle_diff

    oracle = head_oracle_diff if name in HEAD_PASSES else prefill_oracle_diff
    for kind in ("mid_pad_b2", "two_images"):
        assert oracle(cm, *prompt("tiny", kind)) <= 1e-4


def test_resolve_passes_forms():
    forms = ["fastv", "fastv:k=2,r=0.5", FastVConfig(), ("fastv", {"k": 2, "r": 0.5})]
    resolved = [resolve_passes(f)[0][1] for f in forms]
    assert all(r == FastVConfig() for r in resolved)
    assert len(resolve_passes(forms)) == 4
    with pytest.raises(PassConfigError, match="unknown pass 'nope'; registered passes: attnskip, cdpruner, dart, divprune"):
        resolve_passes("nope")


def test_pass_rejects_too_shallow_model():
    from vtcompile import compile_pruned
    from vtcompile.models import load_model

    with pytest.raises(UnsupportedModelError, match="at least 2 layers"):
        compile_pruned(load_model("tiny", layers=1), "fastv")


def test_tokens_removed_in_increasing_layer_order(geometry):
    from vtcompile.compiler.pipeline import build_program

    cm = compiled(geometry, None)
    with pytest.raises(PassConfigError, match="increasing layer order"):
        build_program(cm.captured, 16, resolve_passes(["fastv:k=3", "fastv:k=2"]))
    program = build_program(cm.captured, 16, resolve_passes(["fastv:k=1,r=0.5", "fastv:k=3,r=0.5"]))
    assert program.schedule == [16, 8, 8, 4]

"""CDPruner: greedy DPP MAP against exhaustive log-det maximisation, the in-graph choice against an offline
re-computation from the prompt's own embeddings (left padding, two images, image first), conditioning (only the
instruction changes -> the selection changes; padding never counts as instruction), the masked-key oracle in prefill
on GQA, FLOPs and KV bytes of the 7B geometry, configs. Elsewhere: MHA prefill oracle at the defaults
(test_graph_passes.DEFAULTS), generation oracle (test_generate.PASSES), Inductor and ONNX parity (test_targets), the
eager artifact round trip in a new process (test_artifacts' eager_art), fuzzed programs (test_fuzz)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.cli import main
from vtcompile.compiler.cut import Cut
from vtcompile.errors import PassConfigError
from vtcompile.passes.cdpruner import CDPrunerConfig, cdpruner_keep, conditional_kernel, greedy_map, relevance

from .common import adapter, compiled, masked_key_check, prompt

SPEC = "cdpruner:keep=0.25"  # tiny: 16 visual tokens an image, 4 kept


def _log_det(kernel: torch.Tensor, subset) -> float:
    return torch.linalg.slogdet(kernel[list(subset)][:, list(subset)].double())[1].item()


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_greedy_map_is_the_log_det_rule_and_finds_the_exhaustive_optimum_here(theta):
    """Each pick of the fast greedy form == the token maximising log det(L[chosen + j]) by brute force; on this case
    (7 tokens in 5 dims, keep 3: 35 subsets) the greedy set is also the exhaustive optimum (in general greedy MAP
    only approximates it)."""
    g = torch.Generator().manual_seed(1)
    feats, text = torch.randn(1, 7, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    kernel = conditional_kernel(feats, relevance(feats, text, torch.ones(1, 4, dtype=torch.bool)), theta)[0]
    picked = greedy_map(kernel[None], 3, 7)[0].tolist()
    chosen = []
    for _ in range(3):
        best = max((j for j in range(7) if j not in chosen), key=lambda j: _log_det(kernel, chosen + [j]))
        chosen.append(best)
    assert picked == chosen
    optimum = max(itertools.combinations(range(7), 3), key=lambda s: _log_det(kernel, s))
    assert set(picked) == set(optimum)


def test_relevance_and_kernel_by_hand():
    """2-D tokens at angles 0, 1, 2 rad; instruction = mean of two text tokens at angle 0 (a padding token at angle
    2 is masked out): r = min-max of cos(angle) with the authors' 1e-6 (of -cos(angle): negative, the default);
    theta 0 ignores r (kernel = similarity)."""
    angle = torch.tensor([0.0, 1.0, 2.0])
    feats = torch.stack([angle.cos(), angle.sin()], -1)[None]
    text = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-0.4, 0.9]]])
    rel = relevance(feats, text, torch.tensor([[True, True, False]]), negative=False)
    cos = angle.cos()
    want = (cos - cos.min() + 1e-6) / (cos.max() - cos.min() + 1e-6)
    assert torch.allclose(rel[0], want)
    sim = torch.cos(angle[:, None] - angle[None, :])
    assert torch.allclose(conditional_kernel(feats, rel, 1.0)[0], want[:, None] * sim * want[None, :], atol=1e-6)
    assert torch.allclose(conditional_kernel(feats, rel, 0.0)[0], sim, atol=1e-6)
    # negative (the default): the cosines negated before the same normalisation (the least similar token: r = 1)
    neg = (cos.max() - cos + 1e-6) / (cos.max() - cos.min() + 1e-6)
    assert torch.allclose(relevance(feats, text, torch.tensor([[True, True, False]]), negative=True)[0], neg)
    # no text token in the row: r = 1 everywhere, a plain DPP over similarity
    assert torch.allclose(relevance(feats, text, torch.zeros(1, 3, dtype=torch.bool)), torch.ones(1, 3))


def _offline(prep, b: int, per_image: int, keep: int, negative: bool) -> set[int]:
    """The kept positions of row b recomputed with the pass's own function from the decoder's inputs: each image's
    projected tokens, the row's text tokens = neither visual nor padding."""
    visual = prep.visual_mask[b].bool()
    text = (prep.attention_mask[b] != 0) & ~visual
    positions = visual.nonzero().squeeze(1)
    out = set()
    for start in range(0, len(positions), per_image):
        block = positions[start:start + per_image]
        picked = cdpruner_keep(prep.inputs_embeds[b, block][None], prep.inputs_embeds[b][None], text[None], keep=keep,
                               tokens=per_image, negative=negative)
        out |= set(block[picked[0]].tolist())
    return out


@pytest.mark.parametrize("kind,negative", [("mid_pad_b2", True), ("two_images", True), ("image_first", True),
                                           ("mid_pad_b2", False)])
def test_in_graph_choice_equals_offline_and_meets_the_masked_key_reference(kind, negative):
    spec = SPEC if negative else f"{SPEC},negative=false"
    seen = masked_key_check(compiled("tiny-gqa", spec), "tiny-gqa", kind, seed=2)
    assert [r.cut for r in seen["program"].rewrites] == [Cut(0)] and seen["diff"] <= 1e-4
    prep, positions, visual = seen["prep"], seen["positions"], seen["visual"]
    for b in range(positions.shape[0]):
        got = set(positions[b][visual[b]].tolist())
        assert got == _offline(prep, b, 16, 4, negative), b
        assert len(got) == 4 * (2 if kind == "two_images" else 1)
        if not negative:  # the field reaches the graph: the sign changes the choice here
            assert got != _offline(prep, b, 16, 4, True), b


def test_selection_follows_the_instruction_and_ignores_padding():
    """One image, two prompts that differ only in their text tokens: different kept tokens. The same prompt
    left-padded in a batch beside a longer one: the same kept tokens as alone."""
    cm = compiled("tiny-gqa", SPEC)
    ids, pixels, mask = prompt("tiny-gqa", "image_first", seed=4)
    text = ~(ids == adapter("tiny-gqa").image_token_id)

    def kept(i, p, m):
        out = cm(i, p, m)
        return [set(out.kept_positions[b][out.kept_visual[b]].tolist()) for b in range(i.shape[0])]

    base = kept(ids, pixels, mask)[0]
    other = ids.clone()
    other[text] = (ids[text] * 7 + 3) % 100 + 1  # other words, same image, same positions
    assert kept(other, pixels, mask)[0] != base
    longer = torch.cat([torch.full_like(ids[:, :1], 5), ids], 1)  # one more text token before the image
    batch = torch.cat([torch.cat([torch.zeros_like(ids[:, :1]), ids], 1), longer])
    padded = torch.cat([torch.cat([torch.zeros_like(mask[:, :1]), mask], 1), torch.ones_like(longer)])
    assert kept(batch, torch.cat([pixels, pixels]), padded)[0] == {p + 1 for p in base}


def test_flops_and_kv_bytes_of_the_7b_geometry(capsys):
    """64 of 576 visual tokens from layer 0 on: paper FLOPs 3.817 T -> 0.416 T, KV cache (bf16, 64 text tokens)
    335.54 MB -> 67.11 MB."""
    assert main(["flops", "--model", "llava-1.5-7b", "--pass", "cdpruner", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["visual_tokens_per_layer"] == [64] * 32
    assert round(d["baseline_paper_tflops"], 3) == 3.817 and round(d["paper_tflops"], 3) == 0.416
    assert (d["baseline_kv_cache_bytes"], d["kv_cache_bytes"]) == (335544320, 67108864)


def test_config_round_trip_and_bad_configs():
    cfg = CDPrunerConfig(keep=0.3, theta=0.5, negative=False)
    assert CDPrunerConfig.from_dict(json.loads(cfg.to_json())["config"]) == cfg
    assert (CDPrunerConfig().keep, CDPrunerConfig().theta, CDPrunerConfig().negative) == (0.111, 1.0, True)
    for spec, message in (("cdpruner:keep=0", "keep=0.0 is out of range"), ("cdpruner:theta=1.5",
                                                                             "theta=1.5 is out of range")):
        with pytest.raises(PassConfigError, match=message):
            compile_pruned(adapter("tiny"), spec)

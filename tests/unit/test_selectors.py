"""Pre-LLM selectors (G-Prune, DivPrune): the masked-key oracle from layer 0, keep-all == original, each image
its own share, the scores and the chosen set against plain NumPy implementations, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.compiler.cut import Cut
from vtcompile.errors import PassConfigError, PassFailedError
from vtcompile.passes.divprune import divprune_keep
from vtcompile.passes.gprune import gprune_scores

from .common import adapter, compiled, hf_logits, masked_key_check, prompt

SPECS = ["gprune", "divprune:keep=0.25"]


@pytest.mark.parametrize("spec", SPECS)
def test_selection_matches_masked_key_reference(geometry, prompt_kind, spec):
    seen = masked_key_check(compiled(geometry, spec), geometry, prompt_kind)
    assert [r.cut for r in seen["program"].rewrites] == [Cut(0)]
    assert seen["diff"] <= 1e-4


@pytest.mark.parametrize("spec", SPECS)
def test_each_image_keeps_its_share(spec):
    cm = compiled("tiny", spec)
    ids, pixels, mask = prompt("tiny", "two_images")
    out = cm(ids, pixels, mask)
    per_image = 16
    share = 8 if spec == "gprune" else 4
    for b in range(ids.shape[0]):
        visual = (ids[b] == 127).nonzero().squeeze(1)  # the two images' token positions, in order
        kept = set(out.kept_positions[b][out.kept_visual[b]].tolist())
        for image in range(2):
            block = set(visual[image * per_image:(image + 1) * per_image].tolist())
            assert len(kept & block) == share, (b, image)


@pytest.mark.parametrize("spec", ["gprune:keep=1", "divprune:keep=1"])
def test_keep_all_matches_transformers(spec):
    cm = compile_pruned(adapter("tiny"), spec, progress=False)
    assert not cm.program.rewrites
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")
    out = cm(ids, pixels, mask)
    ref = hf_logits("tiny", ids, pixels, mask)
    real = mask.bool()
    assert (out.logits - ref).abs().amax(-1)[real].max().item() <= 1e-4


def _gprune_numpy(x: np.ndarray, threshold=0.5, temperature=0.03, steps=5) -> np.ndarray:
    norms = np.sqrt((x * x).sum(-1))
    unit = x / norms[:, None]
    p = len(x)
    sim = np.array([[float(unit[i] @ unit[j]) for j in range(p)] for i in range(p)])
    sim[sim < threshold] = 0.0
    logits = sim / temperature
    adj = np.exp(logits - logits.max(1, keepdims=True))
    adj /= adj.sum(1, keepdims=True)
    degree = (sim > 0).sum(1)
    info = norms.copy()
    for _ in range(steps):
        info = np.array([sum(info[i] * adj[i, j] for i in range(p)) for j in range(p)])
    return info / degree


def _divprune_numpy(x: np.ndarray, keep: int) -> list[int]:
    unit = x / np.sqrt((x * x).sum(-1))[:, None]
    p = len(x)
    dist = 1.0 - unit @ unit.T
    nearest = [min(dist[i, j] for j in range(p) if j != i) for i in range(p)]
    chosen = [int(np.argmax(nearest))]
    while len(chosen) < keep:
        best, best_d = None, -1.0
        for i in range(p):
            if i in chosen:
                continue
            d = min(dist[i, j] for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_gprune_scores_equal_a_plain_implementation():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 32, generator=gen)  # clustered tokens: the similarity graph has edges above 0.5
    feats = (base[torch.randint(4, (3, 24), generator=gen)] + 0.4 * torch.randn(3, 24, 32, generator=gen)).double()
    got = gprune_scores(feats).numpy()
    for r in range(3):
        np.testing.assert_allclose(got[r], _gprune_numpy(feats[r].numpy()), rtol=1e-5)
    assert 1 < len(set(np.round(got[0], 6))) and (gprune_scores(feats) > 0).all()


def test_divprune_chooses_the_greedy_max_min_set():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 20, 16, generator=gen)
    got = divprune_keep(feats, 6, 20)
    for r in range(3):
        assert got[r].tolist() == _divprune_numpy(feats[r].double().numpy(), 6)
    assert len(set(got[0].tolist())) == 6


def test_bad_input():
    for spec in ("gprune:keep=0", "gprune:keep=1.5", "divprune:keep=-0.1"):
        with pytest.raises(PassConfigError, match="keep=.* is out of range"):
            compile_pruned(adapter("tiny"), spec)
    with pytest.raises((PassConfigError, PassFailedError), match="list divprune before the passes that remove tokens inside"):
        compile_pruned(adapter("tiny"), ["fastv", "divprune"])

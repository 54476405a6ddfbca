"""Generation: pruned prefill + compiled decode over per-layer KV caches.

No pass == transformers' own generate; every pass and composition == the masked-key generation oracle (the
unmodified model decoding with the same per-layer key masks over the prompt, new tokens unmasked, original
positions), tokens and the logits of every step; batches == rows alone; sampling, eos, KV bytes, bad input.
"""
from __future__ import annotations

import os

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.compiler.reference import head_plan, masked_key_generate
from vtcompile.errors import InputError, TargetUnavailableError
from vtcompile.runtime.generate import generate

from .common import adapter, compiled, prompt

TOL = 1e-4
NEW = 16


def generate_with_logits(cm, ids, pixels, mask, n: int = NEW, **images):
    """Greedy tokens [B, n] (no eos) and the logits that chose each [B, n, V], from the runtime itself (prefill: the
    program of each row's visual count, cm.prefill; images: the family's other processor outputs)."""
    prepared = cm.prepare(ids, pixels, mask, **images)
    exe = cm.row_groups(prepared)[0][1]  # its decode step serves every row group's caches
    step, logits, seen = exe.step_stage(), [], {}

    def prefill(p):
        seen["result"] = cm.prefill(p)
        logits.append(seen["result"].values["logits"][:, -1])
        return seen["result"]

    def recording_step(*args):
        out = step(*args)
        logits.append((out[0] if isinstance(out, (tuple, list)) else out)[:, -1])
        return out

    tokens = generate(prefill, recording_step, cm.frontend.embed_tokens, prepared,
                      cm.generation_config(max_new_tokens=n, eos_token_id=[]), signature=exe.signature)
    return tokens[:, ids.shape[1]:], torch.stack(logits, 1), seen["result"], prepared


def oracle_keys(cm, prepared, result) -> list:
    """Per-layer key masks over the prompt: the keys each layer's attention saw in this very prefill (its
    key_positions outputs; test_identity_oracle and friends check those against the program's own cuts, and
    randomdrop draws anew on every run). DyVTE rows that exited pad them with -1. A layer whose attention a pass
    removed (attnskip) has none: None."""
    masks = []
    for layer in range(cm.frontend.geometry.num_layers):
        pos = result.values.get(f"key_positions_{layer}")
        if pos is None:
            masks.append(None)
            continue
        keep = torch.zeros_like(prepared.attention_mask, dtype=torch.bool)
        keep.scatter_(1, pos.clamp(min=0), pos >= 0)
        masks.append(keep)
    if result.exit_layers is not None:  # independent of the outputs: a row that exited after e lost its images
        for layer, keep in enumerate(masks):
            for b, e in [] if keep is None else enumerate(result.exit_layers):
                if 0 <= e < layer:  # (a row that did not exit keeps what the program's cuts kept)
                    assert not bool((keep[b] & prepared.visual_mask[b]).any()), (layer, b, e)
    return masks


def assert_matches_oracle(cm, ids, pixels, mask, n: int = NEW):
    tokens, logits, result, prepared = generate_with_logits(cm, ids, pixels, mask, n)
    ref = masked_key_generate(cm.adapter, prepared.inputs_embeds, prepared.attention_mask,
                              oracle_keys(cm, prepared, result), tokens,
                              **head_plan(cm.program_for(prepared.n_visual)))  # heads/attentions a pass removed
    diff = (ref - logits).abs().max().item()
    assert diff <= TOL, diff
    assert torch.equal(ref.argmax(-1), tokens)  # the greedy choices are the oracle's
    return tokens, result


@pytest.mark.parametrize("kind", ["mid_pad_b2", "two_images"])
def test_no_pass_equals_transformers_generate(geometry, kind):
    ids, pixels, mask = prompt(geometry, kind, seed=4)
    cm = compiled(geometry, None)
    out = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    with torch.no_grad():
        ref = cm.adapter.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW,
                                        min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_testbed_greedy_equals_transformers_generate():
    from vtcompile.data import PromptEncoder, load_data, sample_image

    cm = compile_pruned("testbed", progress=False)
    data, _ = load_data("testbed", limit=8, split="test")
    ids, pixels, mask = PromptEncoder(cm.frontend.processor).batch([s.question for s in data],
                                                                  [sample_image(s) for s in data])
    out = cm.generate(ids, pixels, mask, max_new_tokens=NEW)
    with torch.no_grad():
        ref = cm.adapter.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW,
                                        do_sample=False)
    assert torch.equal(out, ref)


PASSES = {"fastv": "fastv", "pyramiddrop": "pyramiddrop", "randomdrop": "randomdrop:k=1,r=0.5",
          "dyvte static": "dyvte:exit_layer=1", "fastv+pyramiddrop": ["fastv:k=1", "pyramiddrop:layers=2/3,ratios=0.5/0.25"],
          "gprune": "gprune", "divprune+fastv": ["divprune:keep=0.5", "fastv"], "dart": "dart:keep=0.5,pivots=1",
          "cdpruner": "cdpruner:keep=0.25"}


# Each pass and composition generates on one geometry (MHA / GQA alternating); VTCOMPILE_FULL_MATRIX=1 runs
# each on both.
_GEOMETRY = {"fastv": ("tiny",), "pyramiddrop": ("tiny-gqa",), "randomdrop": ("tiny",),
             "dyvte static": ("tiny-gqa",), "fastv+pyramiddrop": ("tiny-gqa",), "gprune": ("tiny-gqa",),
             "divprune+fastv": ("tiny",), "dart": ("tiny-gqa",), "cdpruner": ("tiny-gqa",)}


def _generation_matrix():
    full = os.environ.get("VTCOMPILE_FULL_MATRIX") == "1"
    for name in PASSES:
        for geometry in (("tiny", "tiny-gqa") if full else _GEOMETRY[name]):
            yield pytest.param(geometry, name, id=f"{geometry}-{name}")


@pytest.mark.parametrize("geometry,name", list(_generation_matrix()))
def test_pass_generation_equals_masked_key_oracle(geometry, name):
    spec = PASSES[name]
    cm = compiled(geometry, spec) if isinstance(spec, str) else compile_pruned(adapter(geometry), spec, progress=False)
    for kind in ("mid_pad_b2", "two_images"):
        ids, pixels, mask = prompt(geometry, kind, seed=2)
        assert_matches_oracle(cm, ids, pixels, mask)


def test_fitprune_generation_equals_masked_key_oracle(geometry):
    from .test_fitprune import fitted

    cm = fitted(geometry)
    assert any(r.cut.after_attention for r in cm.program.rewrites)  # tokens removed after a layer's attention
    ids, pixels, mask = prompt(geometry, "mid_pad_b2", seed=2)
    assert_matches_oracle(cm, ids, pixels, mask)


def test_dyvte_rows_exiting_at_different_layers_equal_the_oracle():
    """Routers send the rows of one batch to different exits; their caches have different lengths after the
    exits, handled with per-row masks in one decode step."""
    from .test_dyvte import trained

    cm = trained("tiny")
    exits = set()
    for kind, seed in (("mid_pad_b2", 9), ("mid_pad_b2", 11)):
        ids, pixels, mask = prompt("tiny", kind, seed=seed)
        _, result = assert_matches_oracle(cm, ids, pixels, mask)
        assert len(set(result.exit_layers)) == 2  # rows of this batch exit at different layers
        exits.update(result.exit_layers)
    assert {-1, 0, 2} <= exits, exits


@pytest.mark.parametrize("spec", [None, "fastv", "dyvte:exit_layer=0"])
def test_batch_equals_each_row_alone(spec):
    cm = compiled("tiny-gqa", spec)
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2", seed=6)
    batch = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = cm.generate(ids[b:b + 1, real], pixels[b:b + 1], mask[b:b + 1, real], max_new_tokens=NEW,
                            eos_token_id=[])
        assert torch.equal(alone[0, -NEW:], batch[b, -NEW:])


def test_seeded_sampling_is_reproducible():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")

    def sample(seed, **kw):
        return cm.generate(ids, pixels, mask, max_new_tokens=NEW, do_sample=True, eos_token_id=[],
                           generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(0, temperature=1.5), sample(0, temperature=1.5), sample(1, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(sample(3, top_k=1), greedy)  # top-k 1 is greedy whatever the seed
    assert torch.equal(sample(4, top_p=1e-9), greedy)  # so is a nucleus of one token


def test_eos_ends_each_row_and_pads_it():
    cm = compiled("tiny", None)
    ids, pixels, mask = prompt("tiny", "mid_pad_b2", seed=4)
    free = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])[:, -NEW:]
    eos = int(free[0, 3])  # a token row 0 produces at step 3
    out = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    for b in range(2):
        row, ref = out[b].tolist(), free[b].tolist()
        stop = ref.index(eos) if eos in ref else None
        if stop is None:
            assert row == ref[:len(row)]
        else:
            assert row[:stop + 1] == ref[:stop + 1] and all(t == 0 for t in row[stop + 1:])
    assert out.shape[1] <= NEW


def test_eos_looked_at_every_few_steps_gives_the_same_tokens(monkeypatch):
    """On an accelerator the loop reads "every row ended" on the host only every 8 steps and drops the steps run
    after the end: the tokens and their number equal a loop that looks at every step."""
    import vtcompile.runtime.generate as gen

    cm = compiled("tiny", None)
    ids, pixels, mask = prompt("tiny", "mid_pad_b2", seed=4)
    free = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])[:, -NEW:]
    eos = [int(free[0, 2]), int(free[1, 5])]  # both rows end, row 1 by step 5 at the latest
    every_step = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert every_step.shape[1] - ids.shape[1] <= 6
    monkeypatch.setattr(gen, "_check_every", lambda device, streamer: 8)
    assert torch.equal(cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0),
                       every_step)


def test_cache_buffers_are_kept_for_the_next_call_of_the_same_shapes():
    """A call gives its cache buffers back to the model's pool; the next call of the same shapes writes into them
    (no allocation) and answers as a model with an empty pool does, though the slots held another prompt."""
    cm = compiled("tiny", "fastv").with_target("eager")
    ids, pixels, mask = prompt("tiny", "mid_pad_b2", seed=4)
    other = ids.clone()
    other[:, -3:] = (other[:, -3:] + 7) % 100 + 1  # another question over the same image, the same shapes
    cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    assert len(cm.cache_pool) == 1
    (buffers,) = cm.cache_pool._free.values()
    pointers = [t.data_ptr() for group in buffers for t in group]
    reused = cm.generate(other, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    (buffers,) = cm.cache_pool._free.values()
    assert [t.data_ptr() for group in buffers for t in group] == pointers
    fresh = cm.with_target("eager")
    assert torch.equal(reused, fresh.generate(other, pixels, mask, max_new_tokens=NEW, eos_token_id=[]))
    cm.generate(ids, pixels, mask, max_new_tokens=4, eos_token_id=[])  # other shapes: a second entry
    assert len(cm.cache_pool) == 2


def test_kv_cache_bytes_equal_the_analytic_report():
    """A prompt without padding: the cache each layer holds after prefill is the report's KV bytes for that
    prompt's text length (per layer), pruned and unpruned."""
    from vtcompile.compiler.flops import FlopsReport

    for spec in (None, "fastv", "pyramiddrop", "dyvte:exit_layer=1"):
        cm = compiled("tiny-gqa", spec)
        ids, pixels, mask = prompt("tiny-gqa", "image_first")
        cm.generate(ids, pixels, mask, max_new_tokens=4, eos_token_id=[])
        stats = cm.last_generation
        f = cm.report.flops
        text = ids.shape[1] - f.n_visual
        analytic = FlopsReport(f.geometry, f.n_visual, text, f.schedule, f.mlp_schedule, f.dtype_bytes)
        assert [stats.kv_prompt_bytes[r["layer"]] for r in analytic.rows()] == [r["kv_bytes"] for r in analytic.rows()]
        assert sum(stats.kv_prompt_bytes.values()) == analytic.kv_bytes


def test_streamer_gets_the_prompt_then_each_token():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "image_first")

    class Recorder:
        def __init__(self):
            self.seen, self.ended = [], False

        def put(self, value):
            self.seen.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = cm.generate(ids, pixels, mask, max_new_tokens=5, eos_token_id=[], streamer=rec)
    assert rec.seen[0] == ids.tolist() and rec.ended
    assert [s[0] for s in rec.seen[1:]] == out[0, ids.shape[1]:].tolist()


def test_decode_step_is_ready_before_the_first_token_is_streamed():
    """A first generate lowers (compiles, on a compiling target) the decode step before its clock starts and before
    anything is streamed, so no compile message lands inside a streamed answer and no compile inside its timings."""
    cm = compiled("tiny", "fastv").with_target("eager")  # the same programs, lowered afresh: no decode step yet
    assert cm.executable(16).decode is None
    ids, pixels, mask = prompt("tiny", "image_first")
    seen = []

    class Recorder:
        def put(self, value):
            exe = cm.executable(16)
            seen.append(exe.decode is not None and exe.decode.lowered is not None)

        def end(self):
            pass

    cm.generate(ids, pixels, mask, max_new_tokens=3, eos_token_id=[], streamer=Recorder())
    assert seen and all(seen), seen


# Inductor generation (one AOT-compiled decode step for every step, prompt length, batch size and max_new_tokens,
# compiled once): test_artifacts.py::test_target_artifact_round_trip, which shares its prefill and decode compiles.
# ONNX generation (the exported functional decode step, loaded from an artifact): test_artifacts.py::
# test_cli_optimize_onnx_then_run_with_input_ids.


def test_bad_input():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")
    for n in (0, -2):
        with pytest.raises(InputError, match="max_new_tokens must be an integer >= 1"):
            cm.generate(ids, pixels, mask, max_new_tokens=n)
    with pytest.raises(InputError, match="exceeds the model's context of 512 positions"):
        cm.generate(ids, pixels, mask, max_new_tokens=500)
    with pytest.raises(InputError, match="image tokens .* but 1 image"):
        cm.generate(ids, pixels[:1], mask)
    with pytest.raises(InputError, match="temperature must be > 0"):
        cm.generate(ids, pixels, mask, do_sample=True, temperature=0)


def test_target_without_a_decode_step_refuses_clearly():
    from vtcompile.runtime.executable import Executable
    from vtcompile.targets import TARGETS

    exe = compiled("tiny", "fastv").executable(16)
    trt = Executable(exe.n_visual, exe.schedule, exe.plan, TARGETS["tensorrt"])
    with pytest.raises(TargetUnavailableError, match="target 'tensorrt' runs prefill only"):
        trt.step_stage()

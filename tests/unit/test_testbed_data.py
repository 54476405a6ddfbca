"""Testbed: scene generator, JSONL splits, and the shipped checkpoint (loads, tokens, accuracy)."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from vtcompile.testbed import scenes

# ---------------------------------------------------------------------------------------------------
# generator


def test_same_seed_same_samples():
    a = [scenes.make_sample("test", 7, i) for i in range(10)]
    b = list(scenes.iter_samples("test", 7, 10))
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.question, x.answer, x.kind, x.objects) == (y.question, y.answer, y.kind, y.objects)


def test_other_seed_or_split_gives_other_samples():
    base = {scenes.image_digest(s.image) for s in scenes.iter_samples("train", 0, 40)}
    for split, seed in (("val", 0), ("test", 0), ("train", 1)):
        other = {scenes.image_digest(s.image) for s in scenes.iter_samples(split, seed, 40)}
        assert not base & other, (split, seed)


def test_splits_are_disjoint():
    digests = {split: {scenes.image_digest(s.image) for s in scenes.iter_samples(split, 0, 60)}
               for split in scenes.SPLITS}
    assert all(len(d) == 60 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_unknown_split_or_kind_is_an_error():
    with pytest.raises(ValueError, match="split"):
        scenes.make_sample("dev", 0, 0)
    with pytest.raises(ValueError, match="kind"):
        scenes.make_sample("train", 0, 0, kind="size")


def test_every_kind_present_and_answers_balanced():
    samples = list(scenes.iter_samples("val", 0, 400))
    by_kind = collections.Counter(s.kind for s in samples)
    assert set(by_kind) == set(scenes.KINDS)
    assert all(v == 400 // len(scenes.KINDS) for v in by_kind.values())
    expected = {
        "color": set(scenes.COLOR_NAMES),
        "shape": set(scenes.SHAPES),
        "count": set(scenes.NUMBER_WORDS[1:]),
        "exist": {"yes", "no"},
        "relpos": set(scenes.RELATIONS),
    }
    for kind, answers in expected.items():
        got = collections.Counter(s.answer for s in samples if s.kind == kind)
        assert set(got) == answers, kind
        # no answer dominates: the question text alone cannot be answered
        assert max(got.values()) / sum(got.values()) < 2.5 / len(answers), (kind, got)


def test_scenes_are_consistent_with_answers():
    for s in scenes.iter_samples("train", 3, 150):
        objs = s.objects
        assert 1 <= len(objs) <= scenes.MAX_OBJECTS
        assert s.image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) and s.image.mode == "RGB"
        for i, a in enumerate(objs):  # inside the image, non-overlapping
            assert 0 <= a.x and a.x + a.side <= scenes.IMAGE_SIZE
            assert 0 <= a.y and a.y + a.side <= scenes.IMAGE_SIZE
            for b in objs[i + 1:]:
                assert not scenes._overlaps((a.x, a.y, a.side), (b.x, b.y, b.side))
        words = s.question.rstrip("?").split()
        if s.kind == "color":
            assert [o.color for o in objs if o.shape == words[-1]] == [s.answer]
        elif s.kind == "shape":
            assert [o.shape for o in objs if o.color == words[-2]] == [s.answer]
        elif s.kind == "count":
            attr = words[2]
            n = sum(o.color == attr or scenes.SHAPE_PLURALS[o.shape] == attr for o in objs)
            assert scenes.NUMBER_WORDS[n] == s.answer
        elif s.kind == "exist":
            color, shape = words[-2], words[-1]
            assert any(o.color == color and o.shape == shape for o in objs) == (s.answer == "yes")
        elif s.kind == "relpos":
            (c1, s1), (c2, s2) = (words[3], words[4]), (words[-2], words[-1])
            a = [o for o in objs if (o.color, o.shape) == (c1, s1)]
            b = [o for o in objs if (o.color, o.shape) == (c2, s2)]
            assert len(a) == len(b) == 1
            assert scenes._relation(a[0], b[0]) == s.answer


def test_jsonl_round_trip(tmp_path):
    path = scenes.write_split(tmp_path, "val", 12, seed=5)
    assert path == tmp_path / "val.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 12
    raw = json.loads(lines[0])
    assert set(raw) == {"image", "question", "answer", "kind"} and not raw["image"].startswith("/")
    records = scenes.read_jsonl(path)
    for rec, s in zip(records, scenes.iter_samples("val", 5, 12)):
        assert (rec["question"], rec["answer"], rec["kind"]) == (s.question, s.answer, s.kind)
        with Image.open(rec["image"]) as im:
            assert im.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(s.image))


def test_evidence_and_anchors_match_the_answers():
    for i in range(150):
        s = scenes.make_sample("train", 3, i)
        groups = scenes.evidence(s.objects, s.question)
        owner = scenes.patch_objects(s.objects)
        anchors = scenes.patch_anchors(s.objects)
        assert (anchors >= 0).all() and len(set(anchors.tolist())) == len(s.objects)
        assert all(owner[a] == j for j, a in enumerate(anchors))
        objs = [[s.objects[j] for j in g] for g in groups]
        if s.kind == "relpos":
            assert [len(g) for g in objs] == [1, 1]
            assert scenes._relation(objs[0][0], objs[1][0]) == s.answer
        elif s.kind == "count":
            assert len(groups) == 1 and scenes.NUMBER_WORDS[len(objs[0])] == s.answer
        elif s.kind == "color":
            assert [o.color for o in objs[0]] == [s.answer]
        elif s.kind == "shape":
            assert [o.shape for o in objs[0]] == [s.answer]
        else:
            color, shape = s.question[len("is there a "):-1].split()
            assert any((o.color, o.shape) == (color, shape) for o in objs[0]) == (s.answer == "yes")
    with pytest.raises(ValueError, match="not a testbed question"):
        scenes.evidence((), "what is this?")


# ---------------------------------------------------------------------------------------------------
# shipped checkpoint

torch = pytest.importorskip("torch")


def _shipped() -> bool:
    from vtcompile.testbed import CheckpointMissingError, checkpoint_dir

    try:
        checkpoint_dir()
        return True
    except CheckpointMissingError:
        return False


# The checkpoint ships as package data; a source tree without it (e.g. while retraining) skips these.
pytestmark_checkpoint = pytest.mark.skipif(not _shipped(), reason="testbed checkpoint missing from vtcompile/testbed/checkpoint")


@pytest.fixture(scope="module")
def testbed():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtcompile.testbed import checkpoint_dir

    path = checkpoint_dir()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


@pytestmark_checkpoint
def test_checkpoint_is_small_and_complete():
    from vtcompile.testbed import checkpoint_dir

    path = checkpoint_dir()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    recipe = json.loads((path / "recipe.json").read_text())
    assert {"seed", "batch_size", "phase_1_vision", "phase_2_end_to_end", "train_time_s", "val_accuracy",
            "test_accuracy"} <= set(recipe)
    assert set(scenes.KINDS) <= set(recipe["val_accuracy"]) and set(scenes.KINDS) <= set(recipe["test_accuracy"])
    assert recipe["train_time_s"] <= 30 * 60 and recipe["threads"] <= 2


@pytestmark_checkpoint
def test_checkpoint_loads_with_expected_geometry(testbed):
    from vtcompile.testbed import build

    model, processor = testbed
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.dtype == torch.float32
    assert cfg.vision_config.model_type == "clip_vision_model" and cfg.text_config.model_type == "llama"
    assert cfg.text_config.num_hidden_layers >= 6
    assert cfg.vision_feature_select_strategy == "default"
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == build.NUM_VISUAL_TOKENS >= 144
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    for t in ("<pad>", "<s>", "</s>", "<unk>"):
        assert processor.tokenizer.convert_tokens_to_ids(t) != processor.tokenizer.unk_token_id or t == "<unk>"


@pytestmark_checkpoint
def test_processor_expands_image_token(testbed):
    from vtcompile.testbed import build

    model, processor = testbed
    s = scenes.make_sample("test", 0, 0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == scenes.format_prompt(s.question)
    enc = processor(images=s.image, text=prompt, return_tensors="pt")
    ids = enc["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == build.NUM_VISUAL_TOKENS
    assert processor.tokenizer.unk_token_id not in ids.tolist()
    assert enc["pixel_values"].shape == (1, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    # the fast path used by training/evaluation is the processor, bit for bit (ids) / to float eps (pixels)
    fast_ids, _ = build.PromptEncoder(processor.tokenizer).batch([s.question])
    assert torch.equal(fast_ids, enc["input_ids"])
    assert torch.allclose(build.pixel_values([s.image], processor.image_processor), enc["pixel_values"], atol=1e-5)
    for answer in scenes.answer_words():
        assert len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1


# Quality bar of the shipped model is >= 90% on the test split (see recipe.json / the train report); on this
# fixed 60-question slice we allow a 7-point margin for the small sample.
SLICE_BAR = 0.83


@pytestmark_checkpoint
def test_accuracy_on_fixed_test_slice(testbed):
    model, processor = testbed
    samples = list(scenes.iter_samples("test", 0, 60))
    prompts = [scenes.format_prompt(s.question) for s in samples]
    enc = processor(images=[s.image for s in samples], text=prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits[:, -1]
    pred = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    right = [p == s.answer for p, s in zip(pred, samples)]
    acc = sum(right) / len(right)
    assert acc >= SLICE_BAR, f"accuracy {acc:.3f} on 60 test questions < {SLICE_BAR}"


# Issue 3's pruning bar, measured on the full test split in the training note: keeping a random 25% of the
# visual tokens before the LLM costs >= 10 points, FastV's 25% (last-token attention at layer 2) clearly less.
# On this fixed 200-question slice: random costs >= 8 points and FastV at most half of what random costs.
@pytestmark_checkpoint
def test_random_pruning_hurts_fastv_much_less():
    from vtcompile.api import compile_pruned
    from vtcompile.evaluate import evaluate, load_data

    samples, _ = load_data("testbed", limit=200)
    acc, unpruned = {}, None
    for spec in (None, "randomdrop:k=0,r=0.75", "fastv:k=2,r=0.75"):
        torch.manual_seed(0)
        cm = compile_pruned("testbed", spec, progress=False)
        unpruned = unpruned or cm  # fidelity against it, not a second unpruned build per spec
        res = evaluate(cm, samples, progress=False, max_new_tokens=1, reference=unpruned)  # single-token answers
        if spec:
            assert res["visual_tokens_kept_mean"] == 36
        acc[spec] = res["accuracy"]
    random_drop = acc[None] - acc["randomdrop:k=0,r=0.75"]
    fastv_drop = acc[None] - acc["fastv:k=2,r=0.75"]
    assert random_drop >= 0.08, acc
    assert fastv_drop <= random_drop / 2, acc


def test_trainer_smoke_writes_a_loadable_checkpoint(tmp_path):
    """A few steps of every phase: every loss term runs, the checkpoint + recipe land and load back."""
    from vtcompile.testbed import build, train

    out = tmp_path / "tb"
    recipe = train.train(out, steps=3, vision_steps=2, val_size=10, eval_every=0, threads=2, progress=False,
                         exit_after=2, count_sink=3, precision="bf16",  # the optional loss terms run too
                         polish_steps=2, polish_exit_layers=(1, 2), polish_exit_keep=("count",), finish_steps=2,
                         compile_layers=False)  # test_compiled_training_step_matches_eager covers the compiled step
    assert recipe["phase_2_end_to_end"]["turn_kind_weights"]["relpos"] == train.DEFAULT_TURN_WEIGHTS["relpos"]
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["phase_2_end_to_end"]["steps"] == 3 and saved["precision"].startswith("bf16 autocast")
    polish = saved["phase_3_polish"]
    assert polish["steps"] == 2 and polish["visual_exit_training"]["exit_after_layers"] == [1, 2]
    assert polish["visual_exit_training"]["turns_that_keep_the_visual_tokens"] == ["count"]
    assert saved["compile"] is None
    assert polish["train_split"] == "train, seed 0, indices 48..79"  # after phase 2's 3 x 16 dialogues
    finish = saved["phase_4_finish"]
    assert finish["steps"] == 2 and finish["train_split"] == "train, seed 0, indices 80..111"  # after phase 3's
    model, processor = build.load(out)
    assert model.config.text_config.num_hidden_layers >= 6 and processor.tokenizer is not None
    with pytest.raises(FileExistsError):
        train.train(out, steps=1, vision_steps=1, val_size=5, eval_every=0, progress=False)


@pytestmark_checkpoint
def test_visual_exit_training_equals_the_masked_key_reference():
    """The trainer's visual exit (key masks via hooks on the eager decoder) is DyVTE's exit: exiting rows match
    the oracle with every visual key masked after the exit layer; the other rows are untouched."""
    from types import SimpleNamespace

    from vtcompile.compiler.reference import masked_key_logits
    from vtcompile.testbed import build, load, train

    eager, processor = load(attn_implementation="eager")
    sdpa, _ = load()
    enc = build.PromptEncoder(processor.tokenizer)
    dialogues = [scenes.make_dialogue("val", 0, i, 3) for i in range(4)]
    ids, pos, _, ev, obj, _, _ = train._dialogue_batch(enc, dialogues)
    pv = build.pixel_values([d[0].image for d in dialogues], processor.image_processor)
    layers = sdpa.config.text_config.num_hidden_layers
    row_exit = torch.tensor([2, layers, 1, layers])  # rows 0 and 2 exit after layers 2 and 1, rows 1 and 3 never
    rows = row_exit < layers
    with torch.no_grad():
        full = train._forward(eager, ids, pv, pos, ev, obj)[0]
        exited = train._forward(eager, ids, pv, pos, ev, obj, row_exit=row_exit, attentions=False)[0]
        m = sdpa.model
        feats = m.multi_modal_projector(m.vision_tower(pv, output_hidden_states=True).hidden_states[-1][:, 1:])
        visual = ids == sdpa.config.image_token_id
        emb = m.get_input_embeddings()(ids).masked_scatter(visual[..., None], feats)
        keeps = [~(visual & (row_exit < i)[:, None]) for i in range(layers)]
        seq = ids.shape[1]
        ref = masked_key_logits(SimpleNamespace(model=sdpa), emb, torch.ones_like(ids),
                                torch.arange(seq)[None].expand(4, -1), keeps)
    ref = ref[pos[:, 0], pos[:, 1]]
    assert torch.allclose(exited, ref, atol=1e-4)
    still = ~rows[pos[:, 0]]
    assert torch.equal(exited[still], full[still])
    assert (exited[~still] - full[~still]).abs().amax() > 1e-2  # the exit really changed the exiting rows


@pytestmark_checkpoint
def test_visual_exit_training_keeps_the_visual_tokens_for_exempt_turns():
    """--polish-exit-keep: in an exiting row, the tokens of the kept kinds' turns still see the visual tokens (as
    they are without an exit), the others do not: a kept first turn answers as without an exit, a first turn
    that is not kept answers as with the plain exit."""
    from vtcompile.testbed import build, load, train

    eager, processor = load(attn_implementation="eager")
    enc = build.PromptEncoder(processor.tokenizer)
    dialogues = [scenes.make_dialogue("val", 0, i, 3) for i in range(2)]
    ids, pos, _, ev, obj, _, _ = train._dialogue_batch(enc, dialogues)
    pv = build.pixel_values([d[0].image for d in dialogues], processor.image_processor)
    row_exit = torch.tensor([1, 1])
    chosen = [j == 0 if b == 0 else j == 1 for b in range(2) for j in range(3)]  # row 0 keeps turn 0, row 1 turn 1
    exempt = train._turn_mask(ids, pos, chosen, eager.config.image_token_id)
    first_visual = int((ids[0] == eager.config.image_token_id).nonzero().min())
    assert not exempt[:, : first_visual + build.NUM_VISUAL_TOKENS].any()
    assert exempt[0, pos[0, 1]] and not exempt[0, pos[1, 1]] and exempt[1, pos[4, 1]] and not exempt[1, pos[3, 1]]
    with torch.no_grad():
        full = train._forward(eager, ids, pv, pos, ev, obj, attentions=False)[0]
        exited = train._forward(eager, ids, pv, pos, ev, obj, row_exit=row_exit, attentions=False)[0]
        kept = train._forward(eager, ids, pv, pos, ev, obj, row_exit=row_exit, attentions=False, exit_exempt=exempt)[0]
    assert torch.allclose(kept[0], full[0], atol=1e-5)  # row 0, turn 0: kept
    assert torch.allclose(kept[3], exited[3], atol=1e-5)  # row 1, turn 0: not kept
    assert (kept[0] - exited[0]).abs().amax() > 1e-2 and (kept[3] - full[3]).abs().amax() > 1e-2
    assert (kept[4] - exited[4]).abs().amax() > 1e-2  # row 1, turn 1 (kept) reads the visual tokens again


def test_trainer_rejects_inconsistent_exit_settings(tmp_path):
    from vtcompile.testbed import train

    with pytest.raises(ValueError, match="exit_after"):
        train.train(tmp_path / "a", steps=1, vision_steps=1, exit_after=5, progress=False)
    with pytest.raises(ValueError, match="attn_layers"):
        train.train(tmp_path / "b", steps=1, vision_steps=1, exit_after=2, attn_layers=(1, 2, 3), progress=False)
    with pytest.raises(ValueError, match="fraction"):
        train.train(tmp_path / "c", steps=1, vision_steps=1, exit_after=2, exit_frac=1.5, progress=False)
    with pytest.raises(ValueError, match="count_sink"):
        train.train(tmp_path / "d", steps=1, vision_steps=1, count_sink=-1, progress=False)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        train.train(tmp_path / "e", steps=1, vision_steps=1, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="polish_exit_layers"):
        train.train(tmp_path / "f", steps=1, vision_steps=1, polish_exit_layers=(5,), progress=False)
    with pytest.raises(ValueError, match="polish_steps"):
        train.train(tmp_path / "g", steps=1, vision_steps=1, polish_steps=-1, progress=False)
    with pytest.raises(ValueError, match="finish_steps"):
        train.train(tmp_path / "h", steps=1, vision_steps=1, finish_steps=-1, progress=False)
    with pytest.raises(ValueError, match="polish_exit_keep"):
        train.train(tmp_path / "k", steps=1, vision_steps=1, polish_exit_keep=("counts",), progress=False)
    with pytest.raises(ValueError, match="vision_attention 'flash'"):
        train.train(tmp_path / "i", steps=1, vision_steps=1, vision_attention="flash", progress=False)


@pytest.mark.skipif(os.environ.get("VTCOMPILE_FULL_MATRIX") != "1",
                    reason="compiles every testbed layer's forward and backward (~50 s on 2 cores): in the full run "
                           "(VTCOMPILE_FULL_MATRIX=1), which retraining the testbed also calls for")
def test_compiled_training_step_matches_eager():
    """--compile: a training step through torch.compile'd layers gives the eager step's loss and gradients
    (fp32; the answer loss, the grounding loss on the attention maps and visual-exit hooks with kept turns in one
    forward), and
    the layers are plain modules again after the block."""
    import torch

    from vtcompile.testbed import build, train

    model, processor = build.build_model(seed=0)
    enc = build.PromptEncoder(processor.tokenizer)
    dialogues = [scenes.make_dialogue("train", 0, i, 3, train.DEFAULT_TURN_WEIGHTS) for i in range(4)]
    ids, pos, target, ev, obj, sink, _ = train._dialogue_batch(enc, dialogues)
    pv = build.pixel_values([d[0].image for d in dialogues], processor.image_processor)
    row_exit = torch.tensor([2, 6, 1, 6])  # rows 0 and 2 exit after layers 2 and 1
    exempt = train._turn_mask(ids, pos, [j % 2 == 1 for j in range(len(pos))], model.config.image_token_id)
    runs = []
    from .test_targets import fast_inductor  # scalar kernels: half the compile time, the same graph-level lowering

    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        with train._attention(model, ("eager", "eager")), train._compiled_layers(model, compiled), fast_inductor():
            logits, _, att, ids2, pos2, ev2, _ = train._forward(model, ids, pv, pos, ev, obj, row_exit=row_exit,
                                                                exit_exempt=exempt)
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + train._attention_loss(att, [1, 2], ids2, model.config.image_token_id, pos2, ev2, sink))
            loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (comp_loss, comp_grads) = runs
    assert comp_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == comp_grads.keys() and len(eager_grads) > 50
    # atol from the largest gradient of the model: a key bias's gradient is zero up to rounding (softmax ignores
    # a shift shared by every key), and its rounding noise differs between kernels
    scale = max(g.abs().max().item() for g in eager_grads.values())
    for name, g in eager_grads.items():
        assert torch.allclose(comp_grads[name], g, rtol=1e-3, atol=1e-6 * scale), name
    layers = [*model.model.language_model.layers, *model.model.vision_tower.encoder.layers]
    assert all(layer._compiled_call_impl is None for layer in layers)

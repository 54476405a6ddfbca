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
    n = 70 * len(scenes.KINDS)
    samples = list(scenes.iter_samples("val", 0, n))
    by_kind = collections.Counter(s.kind for s in samples)
    assert set(by_kind) == set(scenes.KINDS)
    assert all(v == n // len(scenes.KINDS) for v in by_kind.values())
    expected = {
        "color": set(scenes.COLOR_NAMES),
        "shape": set(scenes.SHAPES),
        "count": set(scenes.NUMBER_WORDS[1:]),
        "exist": {"yes", "no"},
        "relpos": set(scenes.RELATIONS),
        "list": set(range(1, scenes.MAX_OBJECTS + 1)),  # list answers: how many objects they name
    }
    for kind, answers in expected.items():
        got = collections.Counter(s.answer.count(",") + 1 if kind == "list" else s.answer
                                  for s in samples if s.kind == kind)
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
        elif s.kind == "list":  # every object once, ordered by the column, then the row, its box starts in
            named = [tuple(item.split()) for item in s.answer.split(", ")]
            ordered = sorted(objs, key=lambda o: (o.x // scenes.CELL, o.y // scenes.CELL))
            assert named == [(o.color, o.shape) for o in ordered]
            cells = [(o.x // scenes.CELL, o.y // scenes.CELL) for o in objs]
            assert len(set(cells)) == len(cells)  # no ties left to the objects' own order


def test_list_kind_is_deterministic_and_reads_left_to_right():
    """Same (split, seed, index) -> same list sample; its answer names the objects in reading order."""
    for i in range(12):
        a, b = (scenes.make_sample("test", 4, i, kind="list") for _ in range(2))
        assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer, a.objects) == (b.question, b.answer,
                                                                                                b.objects)
        assert a.kind == "list" and a.question == scenes.LIST_QUESTION and a.answer == scenes.list_answer(a.objects)
    assert scenes.make_sample("test", 4, 5).kind == "list"  # kinds cycle: the list kind is every len(KINDS)-th


def _obj(shape, color, size, x, y):
    return scenes.SceneObject(shape, color, size, x, y)


def test_reading_order_on_hand_made_scenes():
    objs = (
        _obj("cross", "red", "small", 81, 40),  # column 10
        _obj("circle", "blue", "large", 24, 64),  # column 3, lower
        _obj("square", "green", "small", 25, 8),  # column 3, upper: same column -> top first
        _obj("triangle", "white", "small", 1, 88),  # column 0
        _obj("circle", "yellow", "large", 49, 24),  # column 6 (spans 6-7: its left edge counts)
        _obj("square", "purple", "small", 63, 0),  # column 7 by its left edge, 1 px short of column 8
    )
    assert scenes.reading_order(objs) == [3, 2, 1, 4, 5, 0]
    assert scenes.list_answer(objs) == ("white triangle, green square, blue circle, yellow circle, purple square, "
                                        "red cross")
    assert scenes.evidence(objs, scenes.LIST_QUESTION) == [[3, 2, 1, 4, 5, 0]]
    assert scenes.list_answer(objs[:1]) == "red cross"
    # the order depends on where objects are, never on the order they are stored in
    assert scenes.list_answer(objs[::-1]) == scenes.list_answer(objs)


def test_every_question_and_answer_tokenizes_without_unk():
    """The tokenizer built from scenes.vocabulary() covers every question and answer, multi-turn ones included:
    a list answer is its words and commas."""
    from vtcompile.testbed import build

    tok = build.build_tokenizer()
    enc = build.PromptEncoder(tok)
    for i in range(120):
        sample, qas = scenes.make_dialogue("train", 0, i, 8)
        for q, a, kind in qas:
            assert tok.unk_token_id not in tok(scenes.format_prompt(q), add_special_tokens=False)["input_ids"], q
            ids = enc.answer_ids(a)
            if kind == "list":
                assert len(ids) == 3 * (a.count(",") + 1) - 1 <= 3 * scenes.MAX_OBJECTS - 1
                assert tok.decode(ids) == a  # generated ids decode to the answer text, commas attached
            else:
                assert len(ids) == 1
    assert set(scenes.answer_words()) <= set(scenes.vocabulary())
    with pytest.raises(ValueError, match="unknown words"):
        enc.answer_ids("red hexagon")


def test_jsonl_round_trip(tmp_path):
    path = scenes.write_split(tmp_path, "val", 12, seed=5)
    assert path == tmp_path / "val.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 12
    raw = json.loads(lines[0])
    assert set(raw) == {"image", "question", "answer", "kind"} and not raw["image"].startswith("/")
    records = scenes.read_jsonl(path)
    assert {r["kind"] for r in records} == set(scenes.KINDS)
    for rec, s in zip(records, scenes.iter_samples("val", 5, 12)):
        assert (rec["question"], rec["answer"], rec["kind"]) == (s.question, s.answer, s.kind)
        if s.kind == "list":  # the whole answer, commas included, no eos
            assert rec["answer"] == scenes.list_answer(s.objects) and "</s>" not in rec["answer"]
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
        elif s.kind == "list":
            assert groups == [scenes.reading_order(s.objects)] and sorted(groups[0]) == list(range(len(s.objects)))
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


def _recipe() -> dict:
    from vtcompile.testbed import checkpoint_dir

    return json.loads((checkpoint_dir() / "recipe.json").read_text())


def _ends_answers(recipe: dict) -> bool:
    """Whether the checkpoint was trained to end its answers: its recipe.json names the end token (recipes written
    before answers ended with eos name none; those checkpoints are scored on the next token)."""
    return bool(recipe.get("answer_end_token"))


def _test_slice(recipe: dict, n: int) -> list:
    """The first ``n`` test questions (seed 0) of the kinds the checkpoint was trained on (recipe.json)."""
    kinds = set(recipe["data"]["kinds"])
    return [s for s in scenes.iter_samples("test", 0, 2 * n) if s.kind in kinds][:n]


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
    assert {"train_time_s", "val_accuracy", "test_accuracy", "data", "threads"} <= set(recipe)
    # settings: the TrainConfig (this trainer) or the flat layout of the trainer before it
    assert "config" in recipe or {"seed", "batch_size", "phase_1_vision", "phase_2_end_to_end"} <= set(recipe)
    kinds = set(recipe["data"]["kinds"])
    assert kinds <= set(scenes.KINDS) and kinds <= set(recipe["val_accuracy"]) and kinds <= set(recipe["test_accuracy"])
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
    for word in scenes.answer_words(_recipe()["data"]["kinds"]):
        assert len(processor.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


# Quality bar of the shipped model is >= 90% on the test split (see recipe.json / the train report); on this
# fixed 60-question slice we allow a 7-point margin for the small sample.
SLICE_BAR = 0.83


@pytestmark_checkpoint
def test_accuracy_on_fixed_test_slice(testbed):
    """Whole generated answers (greedy, until eos) for a checkpoint trained to end them, else the next token."""
    from vtcompile.testbed.evaluate import evaluate_generated

    model, processor = testbed
    recipe = _recipe()
    samples = _test_slice(recipe, 60)
    if _ends_answers(recipe):
        acc = evaluate_generated(model, processor, samples)["overall"]
    else:
        prompts = [scenes.format_prompt(s.question) for s in samples]
        enc = processor(images=[s.image for s in samples], text=prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits[:, -1]
        pred = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        acc = sum(p == s.answer for p, s in zip(pred, samples)) / len(samples)
    assert acc >= SLICE_BAR, f"accuracy {acc:.3f} on 60 test questions < {SLICE_BAR}"


# Issue 3's pruning bar, measured on the full test split in the training note: keeping a random 25% of the
# visual tokens before the LLM costs >= 10 points, FastV's 25% (last-token attention at layer 2) clearly less.
# On this fixed 200-question slice: random costs >= 8 points and FastV at most half of what random costs.
@pytestmark_checkpoint
def test_random_pruning_hurts_fastv_much_less():
    from vtcompile.api import compile_pruned
    from vtcompile.evaluate import Reference, evaluate, load_data

    recipe = _recipe()  # the checkpoint's own kinds; whole answers if it ends them, else the next token
    samples = [s for s in load_data("testbed", limit=400)[0] if s.kind in recipe["data"]["kinds"]][:200]
    acc, unpruned = {}, None
    for spec in (None, "randomdrop:k=0,r=0.75", "fastv:k=2,r=0.75"):
        torch.manual_seed(0)
        cm = compile_pruned("testbed", spec, progress=False)
        unpruned = unpruned or Reference(cm)  # fidelity against it: its answers generated once, by the first row
        res = evaluate(cm, samples, progress=False, max_new_tokens=24 if _ends_answers(recipe) else 1,
                       reference=unpruned)
        if spec:
            assert res["visual_tokens_kept_mean"] == 36
        acc[spec] = res["accuracy"]
    random_drop = acc[None] - acc["randomdrop:k=0,r=0.75"]
    fastv_drop = acc[None] - acc["fastv:k=2,r=0.75"]
    assert random_drop >= 0.08, acc
    assert fastv_drop <= random_drop / 2, acc


def test_trainer_smoke_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    """A few steps of every phase: every loss term runs, every answer of every turn is a loss target followed by
    eos, the list kind comes up, the checkpoint + recipe land and load back."""
    from vtcompile.testbed import build, train
    from vtcompile.testbed.train import phases

    batches = []
    real_batch = phases.dialogue_batch
    monkeypatch.setattr(phases, "dialogue_batch", lambda *a, **k: batches.append(real_batch(*a, **k)) or batches[-1])
    out = tmp_path / "tb"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's count, other than the run's 2
    try:
        recipe = train.train(out, steps=3, vision_steps=2, val_size=10, eval_every=0, threads=2, progress=False,
                             exit_after=2, count_sink=3, precision="bf16",  # the optional loss terms run too
                             polish_steps=2, polish_exit_layers=(1, 2), polish_exit_keep=("count",), finish_steps=2,
                             compile_layers=False,  # test_compiled_training_step_matches_eager: the compiled step
                             vision_batch_size=4, batch_size=2)  # small: bf16 is emulated, slowly, on CPUs without it
        assert recipe["threads"] == 2 and torch.get_num_threads() == 1  # the caller's thread count restored
    finally:
        torch.set_num_threads(threads)
    assert len(batches) == 3 + 2 + 2  # phases 2-4
    eos = build.build_tokenizer().eos_token_id
    for b in batches:
        for q, (row, pos) in enumerate(b.positions.tolist()):
            mine = b.token_answer == q
            targets, at = b.targets[mine].tolist(), b.token_positions[mine]
            assert at[:, 0].eq(row).all() and at[:, 1].tolist() == list(range(pos, b.ends[q] + 1))
            assert targets[-1] == eos and eos not in targets[:-1] and b.ids[row, b.ends[q] + 1] == eos
            if b.kinds[q] == "list":
                assert len(targets) >= 3  # "colour shape" + eos at least
            else:
                assert len(targets) == 2  # the one-word answer + eos
    kinds = collections.Counter(k for b in batches for k in b.kinds)
    assert set(kinds) == set(scenes.KINDS), kinds
    assert recipe["answer_end_token"] == "</s>"
    by_phase = {p["phase"]: p for p in recipe["phases"]}
    assert list(by_phase) == ["1/4 vision", "2/4 end to end", "3/4 polish", "4/4 finish"]
    assert by_phase["2/4 end to end"]["turn_kind_weights"]["relpos"] == train.TrainConfig().turn_weights["relpos"]
    saved = json.loads((out / "recipe.json").read_text())
    assert train.TrainConfig.from_dict(saved["config"]) == train.TrainConfig(
        steps=3, vision_steps=2, val_size=10, eval_every=0, threads=2, exit_after=2, count_sink=3, polish_steps=2,
        polish_exit_layers=(1, 2), polish_exit_keep=("count",), finish_steps=2, compile_layers=False,
        vision_batch_size=4, batch_size=2)
    assert saved["command"].startswith(
        "python -m vtcompile.testbed.train --out DIR --vision-steps 2 --vision-batch-size 4 --steps 3 --batch-size 2")
    polish, finish = saved["phases"][2], saved["phases"][3]
    assert polish["steps"] == 2 and polish["visual_exit"]["after_layers"] == [1, 2]
    assert polish["visual_exit"]["turns_that_keep_the_visual_tokens"] == ["count"]
    assert set(saved["val_accuracy"]) == {"overall", *scenes.KINDS} and 0 <= saved["val_eos_rate"] <= 1
    assert polish["train_split"] == "train, seed 0, indices 6..9"  # after phase 2's 3 x 2 dialogues
    assert finish["steps"] == 2 and finish["train_split"] == "train, seed 0, indices 10..13"  # after phase 3's
    assert finish["visual_exit"] is None
    model, processor = build.load(out)
    assert model.config.text_config.num_hidden_layers >= 6 and processor.tokenizer is not None
    with pytest.raises(FileExistsError):
        train.train(out, steps=1, vision_steps=1, val_size=5, eval_every=0, progress=False)


def test_train_config_round_trips_and_derives_its_command_line():
    """Defaults live once, in TrainConfig: the CLI's defaults are its defaults, every field is a flag, JSON and the
    recorded command line (recipe.json) give the same config back."""
    import argparse
    import dataclasses

    from vtcompile.testbed.train import TrainConfig
    from vtcompile.testbed.train.config import add_arguments, from_args

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert from_args(ap.parse_args([])) == TrainConfig()
    assert {a.dest for a in ap._actions} - {"help"} == {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(seed=3, steps=10, turn_weights={"count": 3}, polish_exit_layers=(), polish_exit_keep=(),
                      attn_layers=(1, 2), exit_after=2, compile_layers=False, threads=1, lr=5e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert from_args(ap.parse_args(cfg.command_line().split())) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"stepz": 3})


def _exit_batch(n_rows: int):
    """A random-weight testbed model (eval mode), its processor and a batch of ``n_rows`` 3-turn val dialogues: the
    exit tests check equivalences, which need no training."""
    from vtcompile.testbed import build
    from vtcompile.testbed.train.data import dialogue_batch

    model, processor = build.build_model(seed=0)
    model.eval()
    dialogues = [d for d in (scenes.make_dialogue("val", 0, i, 3) for i in range(4 * n_rows)) if len(d[1]) == 3]
    dialogues = dialogues[:n_rows]  # three turns each (a scene can run out of questions)
    batch = dialogue_batch(build.PromptEncoder(processor.tokenizer), dialogues)
    pv = build.pixel_values([d[0].image for d in dialogues], processor.image_processor)
    return model, batch, pv


def test_visual_exit_training_equals_the_masked_key_reference():
    """The trainer's visual exit (key masks via hooks on the eager decoder) is DyVTE's exit: exiting rows match
    the oracle with every visual key masked after the exit layer; the other rows are untouched."""
    from vtcompile.compiler.reference import masked_key_logits
    from vtcompile.models import ModelSpec, adapt
    from vtcompile.testbed.train.forward import attention, forward

    model, batch, pv = _exit_batch(4)
    ids, pos, ev, obj = batch.ids, batch.positions, batch.evidence, batch.objects
    layers = model.config.text_config.num_hidden_layers
    row_exit = torch.tensor([2, layers, 1, layers])  # rows 0 and 2 exit after layers 2 and 1, rows 1 and 3 never
    rows = row_exit < layers
    with torch.no_grad():
        with attention(model, ("eager", "eager")):
            full = forward(model, ids, pv, pos, ev, obj).logits
            exited = forward(model, ids, pv, pos, ev, obj, row_exit=row_exit, attentions=False).logits
        m = model.model  # the reference: the model's own (sdpa) decoder with per-layer key masks
        feats = m.multi_modal_projector(m.vision_tower(pv, output_hidden_states=True).hidden_states[-1][:, 1:])
        visual = ids == model.config.image_token_id
        emb = m.get_input_embeddings()(ids).masked_scatter(visual[..., None], feats)
        keeps = [~(visual & (row_exit < i)[:, None]) for i in range(layers)]
        seq = ids.shape[1]
        ref = masked_key_logits(adapt(model, ModelSpec(name="trainer", source="in-memory")), emb, torch.ones_like(ids),
                                torch.arange(seq)[None].expand(4, -1), keeps)
    ref = ref[pos[:, 0], pos[:, 1]]
    assert torch.allclose(exited, ref, atol=1e-4)
    still = ~rows[pos[:, 0]]
    assert torch.equal(exited[still], full[still])
    assert (exited[~still] - full[~still]).abs().amax() > 1e-2  # the exit really changed the exiting rows


def test_visual_exit_training_keeps_the_visual_tokens_for_exempt_turns():
    """--polish-exit-keep: in an exiting row, the tokens of the kept kinds' turns (question and answer) still see
    the visual tokens (as they are without an exit), the others do not: a kept first turn answers as without an
    exit, a first turn that is not kept answers as with the plain exit."""
    from vtcompile.testbed import build
    from vtcompile.testbed.train.data import turn_mask
    from vtcompile.testbed.train.forward import attention, forward

    model, batch, pv = _exit_batch(2)
    ids, pos, ev, obj = batch.ids, batch.positions, batch.evidence, batch.objects
    row_exit = torch.tensor([1, 1])
    chosen = [j == 0 if b == 0 else j == 1 for b in range(2) for j in range(3)]  # row 0 keeps turn 0, row 1 turn 1
    exempt = turn_mask(batch, chosen, model.config.image_token_id)
    first_visual = int((ids[0] == model.config.image_token_id).nonzero().min())
    assert not exempt[:, : first_visual + build.NUM_VISUAL_TOKENS].any()
    assert exempt[0, pos[0, 1]] and not exempt[0, pos[1, 1]] and exempt[1, pos[4, 1]] and not exempt[1, pos[3, 1]]
    assert exempt[0, pos[0, 1]: batch.ends[0] + 1].all() and not exempt[0, batch.ends[0] + 1:].any()  # its answer too
    with torch.no_grad(), attention(model, ("eager", "eager")):
        full = forward(model, ids, pv, pos, ev, obj, attentions=False).logits
        exited = forward(model, ids, pv, pos, ev, obj, row_exit=row_exit, attentions=False).logits
        kept = forward(model, ids, pv, pos, ev, obj, row_exit=row_exit, attentions=False, exit_exempt=exempt).logits
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

    from vtcompile.testbed import build
    from vtcompile.testbed.train import TrainConfig
    from vtcompile.testbed.train.data import answer_loss, dialogue_batch, turn_mask
    from vtcompile.testbed.train.forward import attention, compiled_layers, forward
    from vtcompile.testbed.train.losses import attention_loss

    model, processor = build.build_model(seed=0)
    enc = build.PromptEncoder(processor.tokenizer)
    dialogues = [scenes.make_dialogue("train", 0, i, 3, TrainConfig().turn_weights) for i in range(4)]
    batch = dialogue_batch(enc, dialogues)
    ids, pos, ev, obj, sink = batch.ids, batch.positions, batch.evidence, batch.objects, batch.sink
    pv = build.pixel_values([d[0].image for d in dialogues], processor.image_processor)
    row_exit = torch.tensor([2, 6, 1, 6])  # rows 0 and 2 exit after layers 2 and 1
    exempt = turn_mask(batch, [j % 2 == 1 for j in range(len(pos))], model.config.image_token_id)
    runs = []
    from .test_targets import fast_inductor  # scalar kernels: half the compile time, the same graph-level lowering

    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        with attention(model, ("eager", "eager")), compiled_layers(model, compiled), fast_inductor():
            logits, _, att, ids2, pos2, ev2, _ = forward(model, ids, pv, pos, ev, obj, row_exit=row_exit,
                                                         exit_exempt=exempt, token_positions=batch.token_positions)
            loss = (answer_loss(logits, batch)
                    + attention_loss(att, [1, 2], ids2, model.config.image_token_id, pos2, ev2, sink))
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

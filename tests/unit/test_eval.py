"""vtcompile eval / evaluate(): JSON schema, JSONL handling and every bad input, on a random-weight model of
the testbed geometry with real processor files (fast; accuracy of the trained testbed is tested elsewhere)."""
from __future__ import annotations

import json
import types

import pytest

from vtcompile.errors import InputError
from vtcompile.evaluate import evaluate, load_data, normalize_answer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from vtcompile.testbed.build import build_model, save_checkpoint

    torch.manual_seed(0)
    model, processor = build_model(seed=0)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("ckpt") / "random-testbed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vtcompile.testbed.scenes import write_split

    return write_split(tmp_path_factory.mktemp("data"), "test", 6)


@pytest.fixture
def run(capsys):
    """The CLI's main() in-process (test_cli.py keeps the subprocess smoke tests): (exit code, stdout, stderr)."""
    from vtcompile.cli import main

    def call(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return call


def test_eval_json_schema(checkpoint, data, run):
    r = run("eval", "--model", str(checkpoint), "--pass", "fastv", "--data", str(data), "--json",
            "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    res = first = json.loads(r.stdout)
    assert res["n"] == 6 and res["skipped_bad"] == 0 and res["max_new_tokens"] == 4
    assert res["scoring"] == "whole generated answer (<= 4 tokens), VQA-normalised"
    assert set(res["accuracy_by_kind"]) == set(res["count_by_kind"]) and sum(res["count_by_kind"].values()) == 6
    assert 0 <= res["accuracy"] <= 1 and 0 <= res["ended_with_eos"] <= 1
    fid = res["fidelity"]
    assert 0 <= fid["top1_agreement"] <= 1 and fid["mean_kl"] >= 0
    assert 0 <= fid["identical_answers"] <= 1 and 0 <= fid["token_agreement"] <= 1
    assert 0 < res["paper_flops_ratio"] < 1 and 0 < res["true_flops_ratio"] < 1
    assert res["visual_tokens"] == 144 and res["visual_tokens_kept_mean"] == 72
    assert res["wall_seconds"] > 0 and res["passes"][0]["pass"] == "fastv"
    r = run("eval", "--model", str(checkpoint), "--data", str(data), "--json", "--max-new-tokens", "1", "--skip-bad")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # next-token scoring keeps the schema, without the generated-answer fields
    assert res["n"] + res["skipped_bad"] == 6  # multi-token answers cannot be scored by the next token
    assert res["scoring"] == "next token" and res["ended_with_eos"] is None and "identical_answers" not in \
        res["fidelity"]
    from vtcompile.evaluate import result_table

    table = result_table(first)  # what eval prints without --json
    assert "overall" in table and "answers identical to unpruned" in table


def _write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_jsonl_lines_name_the_line(tmp_path, data, checkpoint):
    good = data.read_text().splitlines()[0]
    image = json.loads(good)["image"]
    img = str(data.parent / image)
    cases = [
        ("{not json", "line 2 of .* is not valid JSON"),
        (json.dumps({"image": img, "question": "what?"}), "line 2 of .* lacks string field"),
        ("[1, 2]", "line 2 of .* is not a JSON object"),
    ]
    for bad, needle in cases:
        with pytest.raises(InputError, match=needle):
            load_data(str(_write(tmp_path, [good.replace(image, img), bad])))
    samples, skipped = load_data(str(_write(tmp_path, [good.replace(image, img), "{not json"])), skip_bad=True)
    assert len(samples) == 1 and skipped == 1


def test_unreadable_image_and_unknown_answer(tmp_path, checkpoint):
    from vtcompile import compile_pruned

    cm = compile_pruned(str(checkpoint))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    path = _write(tmp_path, [json.dumps({"image": str(broken), "question": "what color is the circle?",
                                         "answer": "red"})])
    with pytest.raises(InputError, match="does not open"):
        evaluate(cm, str(path), progress=False)
    ok_img = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (96, 96)).save(ok_img)
    path = _write(tmp_path, [json.dumps({"image": str(ok_img), "question": "what color is the circle?",
                                         "answer": "magenta-ish"}),
                             json.dumps({"image": str(ok_img), "question": "what color is the circle?",
                                         "answer": "red"})])
    with pytest.raises(InputError, match="not a single token"):
        evaluate(cm, str(path), progress=False, max_new_tokens=1)
    res = evaluate(cm, str(path), progress=False, skip_bad=True, max_new_tokens=1)
    assert res["n"] == 1 and res["skipped_bad"] == 1
    res = evaluate(cm, str(path), progress=False, max_new_tokens=3)  # a generated answer may take any words
    assert res["n"] == 2 and res["skipped_bad"] == 0


def test_checkpoint_without_processor_is_refused(tmp_path, data, run):
    from vtcompile.models import load_model

    model = load_model("tiny").model
    model.save_pretrained(tmp_path / "noproc")
    r = run("eval", "--model", str(tmp_path / "noproc"), "--data", str(data))
    assert r.returncode != 0 and "needs the model's processor files" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_file(run):
    r = run("eval", "--model", "tiny", "--data", "/nonexistent.jsonl")
    assert r.returncode != 0 and "neither 'testbed' nor an existing JSONL file" in r.stderr


def test_per_sample_correctness_is_in_data_order():
    """evaluate(per_sample=True): 1/0 per sample in data order, equal to evaluating each sample alone; two
    samples given each other's answers (of other kinds, so both wrong) score 0 where they sit."""
    import dataclasses

    from .common import compiled

    samples = [s for s in load_data("testbed", limit=16, split="test")[0] if " " not in s.answer][:8]
    i, j = 2, next(k for k in range(3, 8) if samples[k].kind != samples[2].kind)
    samples[i], samples[j] = (dataclasses.replace(samples[i], answer=samples[j].answer),
                              dataclasses.replace(samples[j], answer=samples[i].answer))
    cm = compiled("testbed", None)
    res = evaluate(cm, samples, per_sample=True, progress=False, max_new_tokens=1)
    alone = [evaluate(cm, [s], progress=False, max_new_tokens=1)["accuracy"] for s in samples]
    assert res["correct"] == alone and res["correct"][i] == res["correct"][j] == 0
    assert sum(res["correct"]) / 8 == res["accuracy"] and sum(res["correct"]) >= 5
    assert res["kinds"] == [s.kind for s in samples] and "exits" not in res  # no branches: no exit per sample
    assert "correct" not in evaluate(cm, samples[:2], progress=False, max_new_tokens=1)


def test_answers_are_compared_after_vqa_normalisation():
    """Whole answers are compared after the VQA convention's normalisation: case, punctuation, articles and number
    words no longer decide whether an answer is right ("No" was wrong for "no"); different words still do."""
    import dataclasses

    from .common import compiled

    assert normalize_answer("No.") == normalize_answer("no") == "no"
    assert normalize_answer("  The Red circle,blue  square! ") == "red circle blue square"
    assert normalize_answer("Two") == normalize_answer("2") == "2" and normalize_answer("an apple") == "apple"
    assert normalize_answer("red circle") != normalize_answer("red square")
    samples = load_data("testbed", limit=6, split="test")[0]
    restyled = [dataclasses.replace(s, answer=f"The {s.answer.upper()}.") for s in samples]
    wrong = [dataclasses.replace(s, answer=s.answer + " square") for s in samples]
    cm = compiled("testbed", None)
    runs = [evaluate(cm, d, per_sample=True, progress=False, max_new_tokens=24)["correct"]
            for d in (samples, restyled, wrong)]
    assert runs[0] == runs[1] and sum(runs[0]) >= 5  # the shipped testbed answers these right
    assert sum(runs[2]) == 0


def test_reference_answers_are_generated_once_and_give_the_same_fidelity(monkeypatch):
    """evaluate(reference=Reference(unpruned)): the unpruned model answers each batch once over several evaluate
    calls (the bench's rows, the accuracy tests), and the fidelity equals that against the plain model."""
    from vtcompile import evaluate as E

    from .common import compiled

    samples = load_data("testbed", limit=6, split="test")[0]
    ref, cm = E.Reference(compiled("testbed", None)), compiled("testbed", "fastv")
    calls, real = [], E._answers
    monkeypatch.setattr(E, "_answers", lambda m, *a: calls.append(m) or real(m, *a))
    first = E.evaluate(cm, samples, batch_size=4, progress=False, max_new_tokens=8, reference=ref)
    again = E.evaluate(cm, samples, batch_size=4, progress=False, max_new_tokens=8, reference=ref)
    unpruned = E.evaluate(ref.model, samples, batch_size=4, progress=False, max_new_tokens=8, reference=ref)
    assert sum(m is ref.model for m in calls) == 2  # 6 samples in batches of 4, generated by the first call only
    assert sum(m is cm for m in calls) == 4
    plain = E.evaluate(cm, samples, batch_size=4, progress=False, max_new_tokens=8, reference=ref.model)
    assert first["fidelity"] == again["fidelity"] == plain["fidelity"] and first["accuracy"] == plain["accuracy"]
    assert unpruned["fidelity"]["top1_agreement"] == 1.0 and unpruned["fidelity"]["identical_answers"] == 1.0
    assert sum(m is ref.model for m in calls) == 4  # a plain model is no Reference: its answers generated again

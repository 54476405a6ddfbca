"""Testbed answers end: whole generated answers (greedy, until eos) through transformers' own generate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vtcompile.testbed import scenes

torch = pytest.importorskip("torch")


class _Scripted:
    """A stand-in model whose greedy generate continues each row with fixed tokens (right-padded with pad)."""

    training = False

    def __init__(self, rows):
        self.rows = rows

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, max_new_tokens, pad_token_id, **_):
        new = torch.full((len(input_ids), max_new_tokens), pad_token_id)
        for i, row in enumerate(self.rows[:len(input_ids)]):
            new[i, :len(row)] = torch.tensor(row[:max_new_tokens])
        self.rows = self.rows[len(input_ids):]
        return torch.cat([input_ids, new], 1)


def test_generated_answers_are_cut_at_eos_and_compared_whole():
    from vtcompile.testbed import build
    from vtcompile.testbed.evaluate import evaluate_generated

    processor = build.build_processor()
    tok = processor.tokenizer
    samples = [scenes.make_sample("test", 0, i, kind=k) for i, k in enumerate(("color", "list", "count", "exist"))]
    ids = [tok(s.answer, add_special_tokens=False)["input_ids"] for s in samples]
    eos, bos = tok.eos_token_id, tok.bos_token_id
    model = _Scripted([
        ids[0] + [eos],  # right, ended
        ids[1] + [eos, *ids[0]],  # right: what follows eos is not the answer
        ids[2] + ids[2] * 30,  # the right word, then no end: wrong, not ended
        [bos] + ids[3] + [eos],  # a special token in the answer: wrong, ended
    ])
    res = evaluate_generated(model, processor, samples, batch_size=3, per_sample=True)
    assert [end for _, end in res["answers"]] == [True, True, False, True]
    assert res["answers"][1][0] == samples[1].answer and ", " in samples[1].answer
    assert res["per_kind"] == {"color": 1.0, "count": 0.0, "exist": 0.0, "list": 1.0}
    assert res["overall"] == 0.5 and res["eos_rate"] == 0.75 and res["n"] == 4


def _checkpoint() -> Path | None:
    """The shipped checkpoint, or the directory VTCOMPILE_TESTBED_CANDIDATE names (a retrained candidate, checked
    before it is swapped in)."""
    from vtcompile.testbed import CheckpointMissingError, checkpoint_dir

    if os.environ.get("VTCOMPILE_TESTBED_CANDIDATE"):
        return Path(os.environ["VTCOMPILE_TESTBED_CANDIDATE"])
    try:
        return checkpoint_dir()
    except CheckpointMissingError:
        return None


def _end_token() -> str | None:
    """The token recipe.json says the checkpoint was trained to end every answer with (None: it records none)."""
    path = _checkpoint()
    return json.loads((path / "recipe.json").read_text()).get("answer_end_token") if path else None


# Until the checkpoint retrained for issue 24 is shipped, the shipped recipe.json names no answer end token (the
# trainer before it trained the answer token only, and transformers' generate then says 'green no no no ...').
@pytest.mark.skipif(_end_token() is None, reason="the testbed checkpoint's recipe.json records no answer_end_token: "
                                                  "it was trained before answers ended with eos (issue 24)")
def test_checkpoint_generate_ends_every_answer_with_eos():
    """transformers' own from_pretrained + generate on the checkpoint directory: on 60 fixed test questions (10 of
    each kind) every answer ends with the recorded end token within 24 new tokens, and whole answers are right."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = _checkpoint()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    assert _end_token() == tok.eos_token
    samples = list(scenes.iter_samples("test", 0, 10 * len(scenes.KINDS)))
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
        add_generation_prompt=True) for s in samples]
    assert tok.padding_side == "left"
    enc = processor(images=[s.image for s in samples], text=prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    ended = [tok.eos_token_id in row for row in new]
    assert all(ended), [tok.decode(row) for row, e in zip(new, ended) if not e]
    answers = [tok.decode(row[:row.index(tok.eos_token_id)]).strip() for row in new]
    right = sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)
    assert right >= 0.83, [(s.question, s.answer, a) for a, s in zip(answers, samples) if a != s.answer]

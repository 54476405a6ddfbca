"""Accuracy of a testbed model (a transformers ``LlavaForConditionalGeneration``) on generated questions: whole
generated answers (``evaluate_generated``, the measure of record) or the greedy next token (``evaluate_next_token``,
for checkpoints trained before answers ended with eos; single-token answers only)."""

from __future__ import annotations

from collections import defaultdict

from . import build


def evaluate_next_token(model, tokenizer, samples, batch_size: int = 64, image_processor=None) -> dict:
    """Exact match of the greedy next token vs the answer; returns {"overall": acc, "per_kind": {...}, "n": n}."""
    import torch

    enc = build.PromptEncoder(tokenizer)
    right = defaultdict(int)
    total = defaultdict(int)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            ids, mask = enc.batch([s.question for s in chunk])
            pv = build.pixel_values([s.image for s in chunk], image_processor)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pv, logits_to_keep=1).logits[:, -1]
            pred = logits.argmax(-1).tolist()
            for s, p in zip(chunk, pred):
                total[s.kind] += 1
                right[s.kind] += int(p == enc.answer_id(s.answer))
    model.train(was_training)
    n = sum(total.values())
    return {
        "overall": sum(right.values()) / max(n, 1),
        "per_kind": {k: right[k] / total[k] for k in sorted(total)},
        "n": n,
    }


def generate_answers(model, processor, samples, batch_size: int = 64,
                     max_new_tokens: int = 24) -> list[tuple[str, bool]]:
    """(answer text, ended) per sample: transformers' own greedy ``generate`` on left-padded batches of the chat
    prompt (the processor's template: "USER: <image>\\n{question} ASSISTANT:"), at most ``max_new_tokens`` new
    tokens. The answer is the text of the tokens before the first eos (all of them if none came: ``ended`` False),
    stripped; special tokens other than eos stay in it, so they count as wrong."""
    import torch

    tok = processor.tokenizer
    if tok.padding_side != "left":
        raise ValueError(f"batched generation needs left padding; the tokenizer pads {tok.padding_side}")
    out = []
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            prompts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                add_generation_prompt=True) for s in chunk]
            enc = processor(images=[s.image for s in chunk], text=prompts, padding=True, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                ended = tok.eos_token_id in row
                row = row[:row.index(tok.eos_token_id)] if ended else row
                out.append((tok.decode(row, skip_special_tokens=False).strip(), ended))
    return out


def evaluate_generated(model, processor, samples, batch_size: int = 64, max_new_tokens: int = 24,
                       per_sample: bool = False) -> dict:
    """Exact match of WHOLE generated answers (``generate_answers``: greedy, until eos, at most ``max_new_tokens``)
    against each sample's answer, overall and per kind, and the share of answers that ended with eos.

    Returns {"overall", "per_kind": {kind: acc}, "eos_rate", "eos_per_kind", "n"} (+ "answers": [(text, ended)]
    with ``per_sample``). The model is evaluated in eval mode and left in the mode it was in."""
    right, ended, total = defaultdict(int), defaultdict(int), defaultdict(int)
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, processor, samples, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    for s, (text, end) in zip(samples, answers):
        total[s.kind] += 1
        right[s.kind] += int(end and text == s.answer)
        ended[s.kind] += int(end)
    n = sum(total.values())
    res = {
        "overall": sum(right.values()) / max(n, 1),
        "per_kind": {k: right[k] / total[k] for k in sorted(total)},
        "eos_rate": sum(ended.values()) / max(n, 1),
        "eos_per_kind": {k: ended[k] / total[k] for k in sorted(total)},
        "n": n,
    }
    if per_sample:
        res["answers"] = answers
    return res

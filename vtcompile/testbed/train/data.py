"""Training batches: multi-turn dialogues about one scene each, as token ids plus what the losses need."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import build, scenes

READOUT_SCALE = 24.0  # px per unit of the relative-position readout (a relation needs >= 20 px)


class DialogueBatch(NamedTuple):
    """Right-padded dialogues and what the losses need. Answers are numbered in dialogue order, turn by turn
    (Q in all); their tokens and the eos after each are the targets of the answer loss (T in all)."""

    ids: "torch.Tensor"  # [B, S] long, right-padded with the pad id
    positions: "torch.Tensor"  # [Q, 2] (row, answer position: the position whose next token is the answer's first)
    token_positions: "torch.Tensor"  # [T, 2] (row, position) of every answer-loss target: the answer tokens, eos
    targets: "torch.Tensor"  # [T] the next token there
    token_answer: "torch.Tensor"  # [T] the answer each target belongs to
    ends: "torch.Tensor"  # [Q] the position whose next token is the answer's eos (the turn's last position)
    evidence: "torch.Tensor"  # [Q, 4, S] 0/1 grounding targets at the answer positions (see dialogue_batch)
    objects: "torch.Tensor"  # [B, S] bool: visual tokens of any object
    sink: "torch.Tensor"  # [Q, 2] bool: per half of the heads, whether its grounding is a count's sink form
    readout: "torch.Tensor"  # [Q, 3] relative-position readout target (dx, dy, applies)
    kinds: tuple[str, ...]  # [Q] question kind of each answer


def dialogues(seed: int, first_index: int, n: int, turns: int, turn_weights: dict[str, int]) -> list:
    """Train-split dialogues ``first_index .. first_index + n - 1`` (``scenes.make_dialogue``)."""
    return [scenes.make_dialogue("train", seed, first_index + j, turns, turn_weights) for j in range(n)]


def dialogue_batch(enc: build.PromptEncoder, dialogues, count_sink: int = 0) -> DialogueBatch:
    """Token ids and loss targets of ``dialogues`` ([(sample, [(question, answer, kind), ...]), ...]).

    Every turn is ``{question prompt} {answer tokens}</s>``: the answer loss covers each answer token and the eos
    that ends it, in every turn, so generation learns to stop. Turn 1's prompt is exactly the evaluation prompt
    ``USER: <image>\n{q} ASSISTANT:``; later turns follow the LLaVA-1.5 conversation format
    ``... ASSISTANT: {a}</s>USER: {q} ASSISTANT:``.

    Per answer four 0/1 masks over the sequence, the grounding targets of the answer position for the first and
    second half of the attention heads: in layers >= 1 the two objects of a relative-position question, the
    evidence tokens twice otherwise (a list question: every object), for a count one token per object; in layer 0
    the words naming those two objects, the whole question twice otherwise; for a count the first group also holds
    BOS, its sink, and with ``count_sink`` > 0 the second group the first ``count_sink`` tokens, its own sink.
    """
    import torch

    eos = enc.tok.eos_token_id
    seqs, objects = [], []
    positions, token_positions, targets, token_answer, ends = [], [], [], [], []
    evidence, sink, readout, kinds = [], [], [], []
    for b, (sample, qas) in enumerate(dialogues):
        owner = scenes.patch_objects(sample.objects, build.PATCH_SIZE)
        anchors = scenes.patch_anchors(sample.objects, build.PATCH_SIZE)
        first_visual = enc.ids(qas[0][0]).index(enc.image_id)
        objects.append(first_visual + np.flatnonzero(owner >= 0))
        ids: list[int] = []
        for j, (q, a, kind) in enumerate(qas):
            if j == 0:
                ids = list(enc.ids(q))
                q_start = first_visual + build.NUM_VISUAL_TOKENS
            else:
                q_start = len(ids) + 2  # after "USER:"
                ids += enc.tok(f"USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"]
            question = np.arange(q_start, len(ids) - 2)  # the question's words, before "ASSISTANT:"
            answer = enc.answer_ids(a) + [eos]
            p = len(ids) - 1
            positions.append((b, p))
            token_positions += [(b, p + t) for t in range(len(answer))]
            targets += answer
            token_answer += [len(kinds)] * len(answer)
            ends.append(p + len(answer) - 1)
            kinds.append(kind)
            ids += answer
            if kind == "relpos":  # "where is the C1 S1 relative to the C2 S2 ?": each half reads its object
                words = [question[[3, 4]], question[[8, 9]]]
            else:
                words = [question, question]
            groups = scenes.evidence(sample.objects, q)
            if kind == "count":  # one token per object: what a count is made of
                cols = [anchors[np.asarray(g, dtype=np.int64)] for g in groups]
                cols = [c[c >= 0] for c in cols]
            else:
                cols = [np.flatnonzero(np.isin(owner, g)) for g in groups]
            cols = [first_visual + c for c in (cols if len(cols) == 2 else cols * 2)]
            if kind == "count":  # first half: a sink (BOS) and one token per object, evenly; with count_sink, the
                # second half too, with the first count_sink tokens as its sink: two readings of the count whose
                # steps are largest at small (1 / (c + 1)) and at larger counts (n / (c + n)) respectively
                cols[0] = np.concatenate([[0], cols[0]])
                if count_sink:
                    cols[1] = np.concatenate([np.arange(min(count_sink, first_visual)), cols[1]])
            sink.append((kind == "count", kind == "count" and count_sink > 0))
            readout.append(readout_target(sample.objects, groups, kind))
            evidence.append(cols + words)
        seqs.append(ids)
    n = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), n), enc.pad_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        input_ids[i, : len(x)] = torch.tensor(x)
    ev = torch.zeros(len(evidence), 4, n)
    for i, groups in enumerate(evidence):
        for g, cols in enumerate(groups):
            ev[i, g, torch.from_numpy(cols)] = 1.0
    obj = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, cols in enumerate(objects):
        obj[i, torch.from_numpy(cols)] = True
    return DialogueBatch(input_ids, torch.tensor(positions), torch.tensor(token_positions), torch.tensor(targets),
                         torch.tensor(token_answer), torch.tensor(ends), ev, obj, torch.tensor(sink),
                         torch.tensor(readout), tuple(kinds))


def answer_loss(logits, batch: DialogueBatch):
    """Cross-entropy of every answer token and eos (``logits`` [T, V] at ``batch.token_positions``), summed per
    answer and averaged over the answers: a one-word answer weighs what it weighed before answers ended with eos
    (its eos is learnt within the first steps), a list answer as many times more as it has tokens."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum") / len(batch.positions)


def readout_target(objects, groups, kind: str) -> list[float]:
    """What the readout probe predicts at an answer position: (dx, dy, applies) - the centre offset of the two
    objects of a relative-position question (``READOUT_SCALE`` px units); other kinds have none (applies 0).
    (A run that also read out the centred count of count questions reached 55% on counts, against 59.5% for the
    same fp32 recipe without it.)"""
    if kind == "relpos":
        (ax, ay), (bx, by) = objects[groups[0][0]].center, objects[groups[1][0]].center
        return [(ax - bx) / READOUT_SCALE, (ay - by) / READOUT_SCALE, 1.0]
    return [0.0, 0.0, 0.0]


def turn_mask(batch: DialogueBatch, chosen, image_id: int):
    """[B, S] bool: the tokens of the chosen turns (``chosen``: one bool per answer). A turn runs from the previous
    turn's eos (the first: from after the image) through the position that predicts its own eos, so every token of
    its question and answer is in it."""
    import torch

    out = torch.zeros(batch.ids.shape, dtype=torch.bool)
    start = {}
    for (b, _), end, pick in zip(batch.positions.tolist(), batch.ends.tolist(), chosen):
        if b not in start:
            start[b] = int((batch.ids[b] == image_id).nonzero().max()) + 1
        if pick:
            out[b, start[b]: end + 1] = True
        start[b] = end + 1  # the eos after the answer starts the next turn
    return out

"""Accuracy and fidelity of a (pruned) model on VQA data.

Answers are generated (greedy, until eos, at most `max_new_tokens`) through the compiled model's own generate and
compared WHOLE with the reference answer after the VQA convention's normalisation (normalize_answer: lower case,
punctuation removed, the articles a/an/the dropped, number words zero..ten as digits, whitespace collapsed), so "No."
and "no" are the same answer and "red circle, blue square" equals "Red circle blue square"; `max_new_tokens=1` scores
the next token instead (single-token answers: the token's id). Reports exact-match accuracy per kind and overall,
the share of answers that ended (eos), fidelity against the unpruned model (first-token top-1 agreement and KL; for generated answers also the
share identical to the unpruned answer and the mean token agreement over the first 16 tokens), FLOPs ratios,
visual tokens kept and wall time (compiling stages on first use excluded, given apart).
"""
from __future__ import annotations

import logging
import re
import string
import time

import torch

from .data import PromptEncoder, Sample, load_data, sample_image
from .errors import InputError

AGREEMENT_TOKENS = 16
log = logging.getLogger(__name__)
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: lower case, punctuation removed (a space in its place, so
    "circle,blue" is two words), articles dropped, number words as digits, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _answers(cm, ids, pixels, mask, max_new_tokens: int, tok) -> dict:
    """Generate for one batch: first-token logits, answer texts, whether each ended, new token ids, exits."""
    from .runtime.generate import GenerationStats, generate

    prepared = cm.prepare(ids, pixels, mask)
    exe = cm.executable(prepared.n_visual)
    seen = {}
    config = cm.generation_config(max_new_tokens=max_new_tokens)
    if max_new_tokens == 1:
        result = exe.prefill(prepared)
        first = result.values["logits"][:, -1].float()
        new = first.argmax(-1)[:, None]
        return {"first": first, "new": new, "exits": result.exit_layers, "kept": result.values["visual"].sum(1),
                "texts": None, "ended": None}
    stats = GenerationStats()
    out = generate(exe.prefill, exe.step_stage(), cm.frontend.embed_tokens, prepared, config, stats=stats,
                   signature=exe.signature, on_prefill=lambda r: seen.update(result=r), pool=cm.cache_pool)
    result = seen["result"]
    new = out[:, ids.shape[1]:]
    eos = set(config.eos_token_id)
    texts, ended = [], []
    for row in new.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        ended.append(stop is not None)
        body = row if stop is None else row[:stop]
        texts.append(tok.decode(body, skip_special_tokens=True).strip())
    return {"first": result.values["logits"][:, -1].float(), "new": new, "exits": result.exit_layers,
            "kept": result.values["visual"].sum(1), "texts": texts, "ended": ended}


class Reference:
    """The unpruned model as evaluate's fidelity reference, its answers kept per batch of inputs: evaluating several
    pruned models on the same data against one Reference generates the unpruned answers once (a bench's rows, the
    accuracy tests). Pass it as evaluate(..., reference=Reference(unpruned))."""

    def __init__(self, model):
        self.model = model
        self._answers: dict[tuple, dict] = {}

    def answers(self, ids, pixels, mask, max_new_tokens: int, tok) -> dict:
        key = (max_new_tokens, _digest(ids, pixels, mask))
        if key not in self._answers:
            self._answers[key] = _answers(self.model, ids, pixels, mask, max_new_tokens, tok)
        return self._answers[key]


def _digest(*tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def evaluate(model, data="testbed", limit: int | None = None, batch_size: int = 16, skip_bad: bool = False,
             progress: bool = True, per_sample: bool = False, max_new_tokens: int = 24, reference=None) -> dict:
    """Accuracy per kind and overall, fidelity vs the unpruned model, FLOPs, tokens kept, wall time.

    model: a CompiledModel (from compile_pruned / load_compiled), or anything compile_pruned accepts (then no
    passes). data: 'testbed', a JSONL path, or a list of Sample. max_new_tokens: answers are generated up to this
    many tokens and compared whole; 1 scores the next token. per_sample: also return "correct", 1/0 for each
    evaluated sample in data order (bad samples skipped), "kinds", each one's question kind, and for a program with
    branches "exits", each one's exit layer (-1: none). reference: the unpruned CompiledModel to measure fidelity
    against (default: built from the same model), or a Reference holding it (its answers are reused across calls)."""
    from tqdm import tqdm

    from .api import CompiledModel, compile_pruned
    from .metrics import next_token_fidelity

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, found {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, found {batch_size!r}")
    cm = model if isinstance(model, CompiledModel) else compile_pruned(model, progress=False)
    if reference is None:
        reference = cm if not cm.passes else _unpruned(cm)
    if not isinstance(reference, Reference):
        reference = Reference(reference)  # kept for this call only
    ref_model = reference.model
    samples, bad = (data, 0) if isinstance(data, list) else load_data(data, limit, skip_bad)
    enc = PromptEncoder(cm.frontend.processor)
    tok = enc.tok
    models = [cm] if ref_model is cm else [cm, ref_model]
    setup0 = sum(sum(m.setup_seconds()) for m in models)
    t0 = time.perf_counter()
    per_kind: dict[str, list[int]] = {}
    ref_first, new_first = [], []
    kept_visual, exits, correct, ended, same, agree, kinds = [], [], [], [], [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk, images, answers = [], [], []
        for s in samples[start:start + batch_size]:
            try:
                answers.append(enc.answer_id(s) if max_new_tokens == 1 else s.answer)
                images.append(sample_image(s))
                chunk.append(s)
            except InputError:
                if not skip_bad:
                    raise
                bad += 1
        if not chunk:
            continue
        ids, pixels, mask = enc.batch([s.question for s in chunk], images)
        if ref_model is cm:
            got = ref = reference.answers(ids, pixels, mask, max_new_tokens, tok)
        else:
            got = _answers(cm, ids, pixels, mask, max_new_tokens, tok)
            ref = reference.answers(ids, pixels, mask, max_new_tokens, tok)
        new_first.append(got["first"])
        ref_first.append(ref["first"])
        kept_visual += got["kept"].tolist()
        if got["exits"] is not None:
            exits += got["exits"]
        if max_new_tokens == 1:
            hits = [int(p == a) for p, a in zip(got["new"][:, 0].tolist(), answers)]
        else:
            hits = [int(normalize_answer(t) == normalize_answer(a)) for t, a in zip(got["texts"], answers)]
            ended += got["ended"]
            same += [int(a == b) for a, b in zip(got["texts"], ref["texts"])]
            agree += _token_agreement(got["new"], ref["new"])
        for s, h in zip(chunk, hits):
            per_kind.setdefault(s.kind, []).append(h)
        correct += hits
        kinds += [s.kind for s in chunk]
    if not per_kind:
        raise InputError("no sample could be evaluated" + (f" ({bad} bad skipped)" if bad else ""))
    setup = sum(sum(m.setup_seconds()) for m in models) - setup0  # stages compiled or loaded at their first use
    seconds = time.perf_counter() - t0 - setup
    fid = next_token_fidelity(torch.cat(ref_first), torch.cat(new_first))
    fidelity = {"top1_agreement": fid["top1_agreement"], "mean_kl": fid["mean_kl"]}
    if max_new_tokens > 1:
        fidelity.update(identical_answers=sum(same) / len(same), token_agreement=sum(agree) / len(agree))
    flops = cm.report.flops
    paper_ratio, true_ratio = flops.paper / flops.baseline_paper, flops.true / flops.baseline_true
    exit_hist = exits_by_kind = None
    if exits:  # a program with branches: FLOPs are the mean over rows of each row's own schedule
        paper_ratio, true_ratio = _branch_flops(cm.report, exits)
        exit_hist = _histogram(exits)
        exits_by_kind = {}
        for k in sorted(per_kind):
            taken = [e for e, kind in zip(exits, kinds) if kind == k]
            exits_by_kind[k] = {"exits": _histogram(taken), "paper_flops_ratio": _branch_flops(cm.report, taken)[0]}
    n = sum(len(v) for v in per_kind.values())
    return {
        "model": cm.report.model,
        "passes": cm.report.passes,
        "data": data if isinstance(data, str) else "samples",
        "n": n,
        "scoring": "next token" if max_new_tokens == 1 else (f"whole generated answer (<= {max_new_tokens} tokens), "
                                                             "VQA-normalised"),
        "max_new_tokens": max_new_tokens,
        "skipped_bad": bad,
        "accuracy": sum(sum(v) for v in per_kind.values()) / n,
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "count_by_kind": {k: len(v) for k, v in sorted(per_kind.items())},
        "ended_with_eos": (sum(ended) / len(ended)) if ended else None,
        "fidelity": fidelity,
        "paper_flops_ratio": paper_ratio,
        "true_flops_ratio": true_ratio,
        "exit_layers": exit_hist,
        "exit_layers_by_kind": exits_by_kind,
        "visual_tokens": flops.n_visual,
        "visual_tokens_kept_mean": sum(kept_visual) / max(1, len(kept_visual)),
        "wall_seconds": seconds,
        "compile_seconds": setup,
        **({"correct": correct, "kinds": kinds, **({"exits": exits} if exits else {})} if per_sample else {}),
    }


def _token_agreement(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per row: share of the first AGREEMENT_TOKENS new tokens equal in both (positions either has, padded)."""
    n = min(AGREEMENT_TOKENS, max(a.shape[1], b.shape[1]))
    out = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        ra, rb = (ra + [None] * n)[:n], (rb + [None] * n)[:n]
        out.append(sum(x == y for x, y in zip(ra, rb)) / n)
    return out


def _unpruned(cm):
    """The unpruned model to measure fidelity against (for an artifact: rebuilt from its manifest)."""
    from .api import compile_pruned
    from .errors import VtcompileError
    from .models import build_from_spec

    if cm.adapter is not None:
        return compile_pruned(cm.adapter, progress=False)
    try:
        adapter = build_from_spec(cm.spec)
    except VtcompileError as exc:
        raise InputError(f"fidelity is measured against the unpruned model, which the artifact does not hold and "
                         f"which cannot be rebuilt here: {exc}") from None
    return compile_pruned(adapter, progress=False)


def _histogram(exits: list[int]) -> dict[str, int]:
    """{exit layer (JSON key; -1: none): rows that took it}."""
    return {str(e): exits.count(e) for e in sorted(set(exits))}


def _branch_flops(report, taken: list[int]) -> tuple[float, float]:
    """Mean FLOPs ratios when each row runs the branch it took (-1: none): the report's row for that branch."""
    rows = {r["after_layer"]: r for r in report.exits}
    return (sum(rows[e]["paper_ratio"] for e in taken) / len(taken),
            sum(rows[e]["true_ratio"] for e in taken) / len(taken))


def self_check(cm, agreement_floor: float = 0.9) -> dict:
    """Next-token fidelity of a compiled model vs its unpruned model, judged: on the testbed its val questions,
    elsewhere a synthetic left-padded batch in the family's layout. Agreement below the floor is a warning (logged,
    and in the verdict)."""
    from .metrics import next_token_fidelity
    from .runtime.inputs import prepare

    if cm.spec.name == "testbed":
        data, _ = load_data("testbed", limit=16, split="val")
        batch = dict(zip(("input_ids", "pixel_values", "attention_mask"), PromptEncoder(cm.frontend.processor).batch(
            [s.question for s in data], [sample_image(s) for s in data])))
        what = "16 testbed val questions"
    else:
        batch = cm.frontend.example_inputs(batch=2)
        what = "synthetic, 2 rows, left padding"
    out = cm(**batch)
    with torch.no_grad():
        positions = prepare(cm.frontend, **batch).position_ids
        ref = cm.adapter.model(**batch, position_ids=cm.adapter.lm_position_ids(positions)).logits
    fid = next_token_fidelity(ref[:, -1], out.logits[:, -1])
    ok = fid["top1_agreement"] >= agreement_floor
    verdict = "ok" if ok else (f"WARNING: the pruned model's next token differs from the unpruned one on "
                               f"{1 - fid['top1_agreement']:.0%} of the prompts")
    if not ok:
        log.warning(verdict)
    return dict(fid, prompt=what, verdict=verdict)


def self_check_table(check: dict) -> str:
    from tabulate import tabulate

    return tabulate([[check["prompt"], check["n"], f"{check['top1_agreement']:.3f}", f"{check['mean_kl']:.2e}",
                      check["verdict"]]],
                    headers=["self-check prompts", "rows", "top-1 agreement vs unpruned", "mean KL", "verdict"],
                    tablefmt="simple_outline")


def result_table(res: dict) -> str:
    from tabulate import tabulate

    rows = [[k, res["count_by_kind"][k], f"{100 * v:.1f}"] for k, v in res["accuracy_by_kind"].items()]
    rows.append(["overall", res["n"], f"{100 * res['accuracy']:.1f}"])
    headers = ["kind", "n", "accuracy %"]
    by_kind = res.get("exit_layers_by_kind")
    if by_kind:  # a program with branches: where each kind's questions left the visual tokens, and what that saved
        layers = sorted({int(e) for e in res["exit_layers"]}, key=lambda e: (e < 0, e))
        headers += [f"exit after {e}" if e >= 0 else "no exit" for e in layers] + ["paper FLOPs %"]
        for row, k in zip(rows, list(res["accuracy_by_kind"]) + [None]):
            hist, ratio = ((by_kind[k]["exits"], by_kind[k]["paper_flops_ratio"]) if k is not None
                           else (res["exit_layers"], res["paper_flops_ratio"]))
            row += [hist.get(str(e), 0) for e in layers] + [f"{100 * ratio:.1f}"]
    head = tabulate(rows, headers=headers, tablefmt="simple_outline")
    fid = res["fidelity"]
    summary = tabulate([
        ["model", res["model"]],
        ["passes", ", ".join(p["pass"] for p in res["passes"]) or "none"],
        ["scoring", res["scoring"]],
        *([["answers ending with eos", f"{res['ended_with_eos']:.1%}"]] if res.get("ended_with_eos") is not None
          else []),
        ["first-token top-1 agreement vs unpruned", f"{fid['top1_agreement']:.3f}"],
        ["first-token mean KL vs unpruned", f"{fid['mean_kl']:.2e}"],
        *([["answers identical to unpruned", f"{fid['identical_answers']:.1%}"],
           [f"token agreement (first {AGREEMENT_TOKENS}) vs unpruned", f"{fid['token_agreement']:.3f}"]]
          if "identical_answers" in fid else []),
        ["paper / true FLOPs ratio", f"{res['paper_flops_ratio']:.1%} / {res['true_flops_ratio']:.1%}"],
        ["visual tokens kept (last layer)", f"{res['visual_tokens_kept_mean']:.1f} of {res['visual_tokens']}"],
        *([["exit layer: rows", " ".join(f"{k}:{v}" for k, v in res["exit_layers"].items())]]
          if res.get("exit_layers") else []),
        ["bad samples skipped", res["skipped_bad"]],
        ["wall time s (compiling excluded)", f"{res['wall_seconds']:.1f}"],
        *([["compiling / loading stages s", f"{res['compile_seconds']:.1f}"]] if res.get("compile_seconds") else []),
    ], tablefmt="simple_outline")
    return head + "\n" + summary


__all__ = ["Sample", "evaluate", "load_data", "normalize_answer", "result_table", "self_check"]

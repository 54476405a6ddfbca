"""Accuracy and fidelity of a (pruned) model on single-token-answer VQA data.

Data: "testbed" (the held-out test split of the shipped testbed, generated in memory) or a JSONL file with
one {"image": path, "question": str, "answer": str[, "kind": str]} per line (image paths relative to the
file). Reports exact-match accuracy per kind and overall, fidelity against the unpruned model (top-1
agreement and mean KL of the answer-token distribution), FLOPs ratios, visual tokens kept and wall time.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
DEFAULT_TESTBED_LIMIT = 500


@dataclass
class Sample:
    image: object  # PIL image or a path
    question: str
    answer: str
    kind: str
    where: str  # "line N of FILE" or "testbed test #i", for error messages


def load_data(data: str = "testbed", limit: int | None = None, skip_bad: bool = False,
              split: str = "test") -> tuple[list[Sample], int]:
    """Samples and the number of bad lines skipped (always 0 unless skip_bad).

    'testbed' generates the testbed's `split` in memory (test for evaluation, train for calibration).
    """
    if data == "testbed":
        from .testbed.scenes import iter_samples

        n = limit or DEFAULT_TESTBED_LIMIT
        return [Sample(s.image, s.question, s.answer, s.kind, f"testbed {split} #{s.index}")
                for s in iter_samples(split, n=n)], 0
    path = Path(data)
    if not path.is_file():
        raise InputError(f"data {data!r} is neither 'testbed' nor an existing JSONL file")
    samples, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(_parse_line(line, path, number))
            except InputError:
                if not skip_bad:
                    raise
                bad += 1
            if limit and len(samples) >= limit:
                break
    if not samples:
        raise InputError(f"{path} holds no usable samples" + (f" ({bad} bad lines skipped)" if bad else ""))
    return samples, bad


def _parse_line(line: str, path: Path, number: int) -> Sample:
    where = f"line {number} of {path}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON ({exc.msg}); expected "
                         '{"image": ..., "question": ..., "answer": ...}. Fix it or pass --skip-bad.') from None
    if not isinstance(rec, dict):
        raise InputError(f"{where} is not a JSON object. Fix it or pass --skip-bad.")
    missing = [k for k in ("image", "question", "answer") if not isinstance(rec.get(k), str)]
    if missing:
        raise InputError(f"{where} lacks string field(s) {', '.join(missing)}. Fix it or pass --skip-bad.")
    image = Path(rec["image"])
    if not image.is_absolute():
        image = path.parent / image
    return Sample(str(image), rec["question"], rec["answer"].strip(), str(rec.get("kind", "all")), where)


def open_image(sample: Sample):
    from PIL import Image

    if not isinstance(sample.image, str):
        return sample.image.convert("RGB")
    try:
        with Image.open(sample.image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"{sample.where}: image {sample.image} does not open ({exc}). Fix it or pass "
                         "--skip-bad.") from None


class PromptEncoder:
    """Prompts and answers through the model's own processor (left padding)."""

    def __init__(self, processor, template: str):
        if processor is None:
            raise InputError("reading prompts from a data set (eval, calibration) needs the model's processor files "
                             "(tokenizer + image processor); this model has none. Save them next to the weights "
                             "(processor.save_pretrained(DIR)), or calibrate a random-weight model with "
                             "--calibration synthetic.")
        self.processor = processor
        self.tok = processor.tokenizer
        self.tok.padding_side = "left"
        self.template = template
        self.unk = self.tok.unk_token_id

    def answer_id(self, sample: Sample) -> int:
        ids = self.tok(sample.answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.unk:
            raise InputError(f"{sample.where}: answer {sample.answer!r} is not a single token of the model's "
                             "vocabulary; evaluation compares the next token with the answer")
        return ids[0]

    def batch(self, samples: list[Sample], images):
        prompts = [self.template.format(question=s.question) for s in samples]
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        return enc["input_ids"], enc["pixel_values"], enc["attention_mask"]


def evaluate(model, data="testbed", limit: int | None = None, batch_size: int = 16, skip_bad: bool = False,
             progress: bool = True, template: str = PROMPT_TEMPLATE, per_sample: bool = False) -> dict:
    """Accuracy per kind and overall, fidelity vs the unpruned model, FLOPs, tokens kept, wall time.

    model: a CompiledModel (from compile_pruned / load_compiled), or anything compile_pruned accepts
    (then no passes). data: 'testbed', a JSONL path, or a list of Sample. per_sample: also return
    "correct", 1/0 for each evaluated sample in data order (bad samples skipped).
    """
    from tqdm import tqdm

    from .api import CompiledModel, compile_pruned
    from .metrics import next_token_fidelity

    loaded = hasattr(model, "manifest")  # an artifact from load_compiled
    cm = model if isinstance(model, CompiledModel) or loaded else compile_pruned(model)
    reference = cm if not cm.passes else _unpruned(cm)
    samples, bad = (data, 0) if isinstance(data, list) else load_data(data, limit, skip_bad)
    enc = PromptEncoder(cm.adapter.processor, template)
    t0 = time.perf_counter()
    per_kind: dict[str, list[int]] = {}
    ref_rows, new_rows = [], []
    kept_visual, exits, correct = [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk, images, answers = [], [], []
        for s in samples[start:start + batch_size]:
            try:
                answers.append(enc.answer_id(s))
                images.append(open_image(s))
                chunk.append(s)
            except InputError:
                if not skip_bad:
                    raise
                bad += 1
        if not chunk:
            continue
        ids, pixels, mask = enc.batch(chunk, images)
        out = cm(ids, pixels, mask)
        last = out.logits[:, -1].float()
        ref_last = last if reference is cm else reference(ids, pixels, mask).logits[:, -1].float()
        new_rows.append(last)
        ref_rows.append(ref_last)
        kept_visual += out.kept_visual.sum(1).tolist()
        if out.exit_layers is not None:
            exits += out.exit_layers
        for s, a, pred in zip(chunk, answers, last.argmax(-1).tolist()):
            per_kind.setdefault(s.kind, []).append(int(pred == a))
            correct.append(int(pred == a))
    if not per_kind:
        raise InputError("no sample could be evaluated" + (f" ({bad} bad skipped)" if bad else ""))
    seconds = time.perf_counter() - t0
    fid = next_token_fidelity(torch.cat(ref_rows), torch.cat(new_rows))
    flops = cm.report.flops
    paper_ratio, true_ratio = flops.paper / flops.baseline_paper, flops.true / flops.baseline_true
    exit_hist = None
    if exits:  # dynamic exits: FLOPs are the mean over rows of each row's own schedule
        paper_ratio, true_ratio = _exit_flops(flops, exits)
        exit_hist = {str(e): exits.count(e) for e in sorted(set(exits))}
    n = sum(len(v) for v in per_kind.values())
    return {
        "model": cm.report.model,
        "passes": cm.report.passes,
        "data": data if isinstance(data, str) else "samples",
        "n": n,
        "skipped_bad": bad,
        "accuracy": sum(sum(v) for v in per_kind.values()) / n,
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "count_by_kind": {k: len(v) for k, v in sorted(per_kind.items())},
        "fidelity": {"top1_agreement": fid["top1_agreement"], "mean_kl": fid["mean_kl"]},
        "paper_flops_ratio": paper_ratio,
        "true_flops_ratio": true_ratio,
        "exit_layers": exit_hist,
        "visual_tokens": flops.n_visual,
        "visual_tokens_kept_mean": sum(kept_visual) / max(1, len(kept_visual)),
        "wall_seconds": seconds,
        **({"correct": correct} if per_sample else {}),
    }


def _unpruned(cm):
    """The unpruned model to measure fidelity against (for an artifact: rebuilt from its manifest)."""
    from .api import CompiledModel
    from .errors import VtcompileError
    from .models import ModelSpec, build_from_spec

    if isinstance(cm, CompiledModel):
        return CompiledModel(cm.adapter, [], "eager", progress=False)
    try:
        adapter = build_from_spec(ModelSpec.from_dict(cm.manifest["model"]))
    except VtcompileError as exc:
        raise InputError(f"fidelity is measured against the unpruned model, which the artifact does not hold and "
                         f"which cannot be rebuilt here: {exc}") from None
    return CompiledModel(adapter, [], "eager", progress=False)


def _exit_flops(flops, exits: list[int]) -> tuple[float, float]:
    """Mean FLOPs ratios when each row's visual tokens exit after its own layer (-1: never)."""
    from .compiler.flops import FlopsReport

    paper = true = 0.0
    for e in exits:
        attn = [0 if e >= 0 and layer > e else v for layer, v in enumerate(flops.schedule)]
        mlp = [0 if e >= 0 and layer > e else v for layer, v in enumerate(flops.mlp_schedule)]
        rep = FlopsReport(flops.geometry, flops.n_visual, flops.n_text, attn, mlp)
        paper += rep.paper / rep.baseline_paper
        true += rep.true / rep.baseline_true
    return paper / len(exits), true / len(exits)


def result_table(res: dict) -> str:
    from tabulate import tabulate

    rows = [[k, res["count_by_kind"][k], f"{100 * v:.1f}"] for k, v in res["accuracy_by_kind"].items()]
    rows.append(["overall", res["n"], f"{100 * res['accuracy']:.1f}"])
    head = tabulate(rows, headers=["kind", "n", "accuracy %"], tablefmt="simple_outline")
    summary = tabulate([
        ["model", res["model"]],
        ["passes", ", ".join(p["pass"] for p in res["passes"]) or "none"],
        ["top-1 agreement vs unpruned", f"{res['fidelity']['top1_agreement']:.3f}"],
        ["mean KL vs unpruned", f"{res['fidelity']['mean_kl']:.2e}"],
        ["paper / true FLOPs ratio", f"{res['paper_flops_ratio']:.1%} / {res['true_flops_ratio']:.1%}"],
        ["visual tokens kept (last layer)", f"{res['visual_tokens_kept_mean']:.1f} of {res['visual_tokens']}"],
        *([["exit layer: rows", " ".join(f"{k}:{v}" for k, v in res["exit_layers"].items())]]
          if res.get("exit_layers") else []),
        ["bad samples skipped", res["skipped_bad"]],
        ["wall time s", f"{res['wall_seconds']:.1f}"],
    ], tablefmt="simple_outline")
    return head + "\n" + summary

"""Prompts and data: the one owner of the prompt format, data sets, images and calibration prompts.

Prompt format: the processor's chat template where it has one (apply_chat_template with one image entry per
image and the question as text, plus the generation prompt), else LLaVA-1.5's "USER: <image>\\n{question}
ASSISTANT:". A prompt that already holds the image token is taken as already formatted. Models without a
processor (tiny random presets) take token ids, with one image-token id per image.

Data: "testbed" (a split of the shipped testbed, generated in memory) or a JSONL file with one
{"image": path, "question": str, "answer": str[, "kind": str]} per line (image paths relative to the file).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

log = logging.getLogger(__name__)
LLAVA_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"
DEFAULT_TESTBED_LIMIT = 500


# -- prompts --------------------------------------------------------------------------------------------
def image_token(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def format_prompt(processor, question: str, n_images: int = 1) -> str:
    """One user turn with `n_images` images and `question`, ending where the assistant's answer starts."""
    token = image_token(processor)
    if n_images and token in question:  # already in the chat format
        return question
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = "".join(token for _ in range(n_images))
    return LLAVA_TEMPLATE.format(image=images, question=question) if n_images else \
        LLAVA_TEMPLATE.replace("{image}\n", "").format(question=question)


def to_rgb(image):
    """An 8-bit RGB image. High-bit-depth greyscale (16-bit PNG: PIL mode I;16, 32-bit integer I, float F) is scaled
    to 0-255: PIL's own convert("RGB") clips such values at 255, which turns most 16-bit images white."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0  # float images hold 0-1 (or already 0-255)
        else:  # 32-bit integers: 16-bit data (TIFF, older PIL PNGs) unless it already fits in 8 bits
            scale = 1.0 if top <= 255 else 255.0 / 65535.0 if top <= 65535 else 255.0 / 4294967295.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def open_image(image):
    """A PIL image in 8-bit RGB from a path or an image; a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, (str, Path)):
        return to_rgb(image)
    try:
        with Image.open(image) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise InputError(f"image {image} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"image {image} is a directory; give an image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"image {image} does not open as an image ({exc})") from None


class PromptEncoder:
    """Prompts through the model's own processor: left padding, the chat format."""

    def __init__(self, processor):
        if processor is None:
            raise InputError("reading prompts as text (eval, calibration, --prompt) needs the model's processor "
                             "files (tokenizer + image processor); this model has none. Save them next to the "
                             "weights (processor.save_pretrained(DIR)), give token ids (--input-ids), or calibrate "
                             "a random-weight model with --calibration synthetic.")
        self.processor = processor
        self.tok = processor.tokenizer
        self.tok.padding_side = "left"
        self.unk = self.tok.unk_token_id

    def answer_id(self, sample: "Sample") -> int:
        ids = self.tok(sample.answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.unk:
            raise InputError(f"{sample.where}: answer {sample.answer!r} is not a single token of the model's "
                             "vocabulary; next-token scoring (--max-new-tokens 1) compares one token")
        return ids[0]

    def batch(self, questions: list[str], images: list) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(input_ids, pixel_values, attention_mask) for one image per question (None: a text-only prompt)."""
        enc = self.encode(questions, images)
        return enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"]

    def encode(self, questions: list[str], images: list) -> dict[str, torch.Tensor]:
        """Every output of the processor (input_ids, attention_mask, pixel_values and what else the family's
        processor returns, e.g. Qwen2-VL's image_grid_thw) for one image per question (None: a text-only prompt)."""
        token = image_token(self.processor)
        for i, (q, im) in enumerate(zip(questions, images)):
            n, want = q.count(token), 0 if im is None else 1
            if n > want:  # a prompt in the chat format names its images itself; each one needs its own image
                raise InputError(f"prompt {i + 1} holds {n} {token} placeholders but {want} image(s) go with it; "
                                 f"each prompt takes one image (--image): keep one {token} in it, or none and the "
                                 "chat format places the image")
        prompts = [format_prompt(self.processor, q, 0 if im is None else 1) for q, im in zip(questions, images)]
        present = [im for im in images if im is not None]
        if present:
            enc = self.processor(images=present, text=prompts, return_tensors="pt", padding=True)
        else:
            enc = self.processor(text=prompts, return_tensors="pt", padding=True)
        return dict(enc)


def prompt_inputs(frontend, images: list, prompts: list[str] | None = None,
                  input_ids: list | None = None) -> dict[str, torch.Tensor]:
    """A batch of prompts, one image (or None) each, as keyword arguments of CompiledModel.generate (input_ids,
    attention_mask, and pixel_values with the family's image inputs when an image is given).

    With a processor: the prompts as text in the model's chat format. Without one (tiny random models):
    `input_ids`, one list of token ids per prompt where each image is one image-token id (expanded to that image's
    visual tokens) or already expanded; the images go through the family's plain image inputs
    (Frontend.plain_image_inputs)."""
    pil = [open_image(im) if im is not None else None for im in images]
    if input_ids is None:
        if prompts is None:
            raise InputError("give --prompt TEXT (with the model's processor) or --input-ids JSON")
        if frontend.processor is None:
            raise InputError(
                "this model has no processor (tokenizer + image processor), as tiny random models do. Pass token ids "
                f"instead: --input-ids '[5, 9, {frontend.image_token_id}, 7]' (one image token id "
                f"{frontend.image_token_id} per --image).")
        encoder = PromptEncoder(frontend.processor)
        warn_unknown_words(encoder.tok, prompts)
        return encoder.encode(prompts, pil)
    present = [im for im in pil if im is not None]
    image_inputs, counts = frontend.plain_image_inputs(present) if present else ({}, [])
    counts = iter(counts)
    rows = []
    for ids, im in zip(input_ids, pil):
        ids = [int(t) for t in ids]
        n_tok = sum(t == frontend.image_token_id for t in ids)
        n_img, per_image = (0, 0) if im is None else (1, next(counts))
        if n_tok == n_img and n_img:  # one placeholder per image: expand it like a processor does
            ids = [x for t in ids for x in ([t] * per_image if t == frontend.image_token_id else [t])]
        elif n_tok != n_img * per_image:
            raise InputError(f"--input-ids hold {n_tok} image token(s) (id {frontend.image_token_id}) for {n_img} "
                             f"image(s); give one placeholder (or {per_image} tokens, this image's count) per --image")
        rows.append(ids)
    length = max(len(r) for r in rows)
    pad = frontend.generation.get("pad_token_id") or 0
    ids_t = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids_t, "attention_mask": mask, **image_inputs}


def warn_unknown_words(tokenizer, prompts: list[str], share: float = 0.5) -> list[int]:
    """Warn (logging) about prompts the model cannot read: empty ones, and ones where at least `share` of the words
    are unknown to its tokenizer (<unk>): the model answers them anyway, and the answer means little. Returns the
    indices of the prompts warned about."""
    unk = getattr(tokenizer, "unk_token_id", None)
    warned = []
    for i, text in enumerate(prompts):
        label = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
        question = text.replace(image_token(None), " ")
        if not question.strip():
            log.warning("%s is empty: the model answers with nothing to go on but the image", label)
            warned.append(i)
            continue
        if unk is None:
            continue
        enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc.get("offset_mapping") or []
        unknown = [question[a:b] for t, (a, b) in zip(ids, spans) if t == unk] if spans else \
            ["?"] * sum(t == unk for t in ids)
        if ids and len(unknown) >= share * len(ids):
            size = len(tokenizer)
            hint = (f" This tokenizer knows {size} tokens; `vtcompile models` lists the words of the shipped testbed."
                    if size < 1000 else "")
            log.warning("%s: %d of its %d words are unknown to the model's tokenizer (<unk>): %s. The model reads "
                        "them as <unk>, so its answer means little.%s", label, len(unknown), len(ids),
                        ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else ""), hint)
            warned.append(i)
    return warned


# -- data sets ------------------------------------------------------------------------------------------
@dataclass
class Sample:
    image: object  # PIL image or a path
    question: str
    answer: str
    kind: str
    where: str  # "line N of FILE" or "testbed test #i", for error messages


def check_data_arg(data: str) -> None:
    """Fail early (before loading a model) on a data argument that is neither 'testbed' nor a file."""
    if data != "testbed" and not Path(data).is_file():
        raise InputError(f"data {data!r} is neither 'testbed' nor an existing JSONL file")


def load_data(data: str = "testbed", limit: int | None = None, skip_bad: bool = False,
              split: str = "test") -> tuple[list[Sample], int]:
    """Samples and the number of bad lines skipped (always 0 unless skip_bad).

    'testbed' generates the testbed's `split` in memory (test for evaluation, train for calibration)."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 (or None for the default), found {limit}")
    check_data_arg(data)
    if data == "testbed":
        from .testbed.scenes import iter_samples

        n = limit or DEFAULT_TESTBED_LIMIT
        return [Sample(s.image, s.question, s.answer, s.kind, f"testbed {split} #{s.index}")
                for s in iter_samples(split, n=n)], 0
    path = Path(data)
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


def sample_image(sample: Sample):
    try:
        return open_image(sample.image)
    except InputError as exc:
        raise InputError(f"{sample.where}: {exc}. Fix it or pass --skip-bad.") from None


# -- calibration ----------------------------------------------------------------------------------------
_PROMPT = ("input_ids", "pixel_values", "attention_mask")


def calibration_prompts(frontend, calibration, samples: int) -> list[dict]:
    """Calibration prompts, one per batch, as {input name: tensor} (what CompiledModel.prepare takes).

    calibration: 'testbed' (its train split) or a JSONL file, through the model's processor; 'synthetic' (random
    prompts, for random-weight smoke tests); or a list of (input_ids, pixel_values, attention_mask) tuples or of
    dicts as the processor returns them."""
    if isinstance(calibration, str) and calibration == "synthetic":
        return [frontend.example_inputs(batch=1, seed=1000 + i) for i in range(samples)]
    if isinstance(calibration, (str, Path)):
        data, _ = load_data(str(calibration), limit=samples, split="train")
        enc = PromptEncoder(frontend.processor)
        return [dict(zip(_PROMPT, enc.batch([s.question], [sample_image(s)]))) for s in data]
    if isinstance(calibration, (list, tuple)):
        items = list(calibration)[:samples]
        return [dict(i) if isinstance(i, dict) else dict(zip(_PROMPT, i)) for i in items]
    raise InputError(f"calibration data {calibration!r} is not understood; give 'testbed', a JSONL file, a list "
                     "of (input_ids, pixel_values, attention_mask) tuples, or 'synthetic'")


def testbed_words() -> list[str]:
    """The words of the shipped testbed's tokenizer (its vocabulary without special tokens); [] without it."""
    from .errors import ModelNotFoundError
    from .models import resolve_spec

    try:
        path = Path(resolve_spec("testbed").path) / "tokenizer.json"
        tok = json.loads(path.read_text())
    except (ModelNotFoundError, OSError, ValueError):
        return []
    special = {t["content"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    return sorted(w for w in vocab if w not in special and any(c.isalnum() for c in w))

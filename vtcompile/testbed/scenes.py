"""Deterministic synthetic scenes and questions about them for the testbed model.

A scene is a small RGB image (``IMAGE_SIZE`` x ``IMAGE_SIZE``) with 1-6 objects (shape x colour x size)
at random non-overlapping positions on a noisy, textured background. Objects are small relative to the
image, so most image patches are background and only a few carry the answer - the property that lets
the testbed tell good visual-token pruning from bad.

Every sample is one question about its own scene; the scene is generated *for* the question (the answer is
drawn first, uniformly, then a scene that realises it), so answers are balanced within each kind and the
question text alone carries no information about the answer. Answers are one word, except the ``list`` kind's:
every object of the scene as "colour shape", comma-separated, in reading order (``reading_order``), e.g.
"red circle, blue square, green cross" (up to 17 tokens with the commas).

Only PIL and numpy are used. A sample is a pure function of ``(split, seed, index)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (30, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (235, 215, 30),
    "purple": (160, 50, 215),
    "white": (240, 240, 240),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Objects sit on the 8-px patch grid of the vision tower (random cell, 0-1 px jitter): a small object fills
# one patch (7 px), a large one 2x2 patches (15 px). Each patch then sees a whole object or a fixed
# quadrant of one, which a from-scratch ViT learns within the CPU training budget (free placement at 9-18 px
# left per-patch shape recognition at chance after 400 steps), and the visual evidence of a scene is 1-24 of
# the 144 visual tokens.
CELL = 8
SIZES: dict[str, int] = {"small": 7, "large": 15}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

KINDS: tuple[str, ...] = ("color", "shape", "count", "exist", "relpos", "list")
LIST_QUESTION = "what objects are there from left to right?"
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

MAX_OBJECTS = 6
_GAP = 3  # minimum free pixels between two objects' bounding boxes (cells are >= 1 cell apart: >= 7 px)
_JITTER = 2  # offset of an object inside its cell(s): 0 .. _JITTER - 1 px
_REL_MIN = 20  # relpos: centre distance along the asked axis >= this ...
_REL_RATIO = 0.5  # ... and the other axis' distance <= ratio * that distance


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # left of bounding box
    y: int  # top of bounding box

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def center(self) -> tuple[float, float]:
        s = self.side
        return (self.x + s / 2.0, self.y + s / 2.0)


@dataclasses.dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    objects: tuple[SceneObject, ...]
    index: int = 0


# ----------------------------------------------------------------------------------------------------
# rendering


def _background(rng: np.random.Generator) -> np.ndarray:
    """Noisy grey texture: random base level and tint, low-frequency blobs, pixel noise, faint stripes."""
    n = IMAGE_SIZE
    base = rng.uniform(55, 115)
    tint = rng.uniform(-8, 8, size=3)
    low = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    low_img = Image.fromarray(low).resize((n, n), Image.BICUBIC)
    low_arr = np.asarray(low_img, dtype=np.float32)[..., None] * rng.uniform(6, 14)
    noise = rng.normal(0.0, rng.uniform(6, 14), size=(n, n, 3))
    img = base + tint + low_arr + noise
    if rng.random() < 0.5:  # faint stripes in a random direction
        yy, xx = np.mgrid[0:n, 0:n]
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        phase = (np.cos(ang) * xx + np.sin(ang) * yy) * (2 * np.pi / period)
        img = img + (np.sin(phase) * rng.uniform(3, 8))[..., None]
    return np.clip(img, 0, 255)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, rgb: tuple[int, int, int]) -> None:
    x0, y0, s = obj.x, obj.y, obj.side
    x1, y1 = x0 + s - 1, y0 + s - 1
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif obj.shape == "square":
        m = s // 10
        draw.rectangle([x0 + m, y0 + m, x1 - m, y1 - m], fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + s / 2.0 - 0.5, y0), (x0, y1), (x1, y1)], fill=rgb)
    elif obj.shape == "cross":
        t = max(3, round(s * 0.34))
        a = x0 + (s - t) // 2
        b = y0 + (s - t) // 2
        draw.rectangle([a, y0, a + t - 1, y1], fill=rgb)
        draw.rectangle([x0, b, x1, b + t - 1], fill=rgb)
    else:  # pragma: no cover - guarded by the generator
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(_background(rng).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in objects:
        jitter = rng.integers(-18, 19, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255))
        _draw_object(draw, obj, rgb)
    return img


def patch_objects(objects, patch: int = 8, min_pixels: int = 6) -> np.ndarray:
    """Per-patch index of the object covering most of the patch (at least ``min_pixels``), -1 = background.

    Row-major over the (IMAGE_SIZE // patch)^2 grid.
    """
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(objects):
        _draw_object(draw, obj, i + 1)
    m = np.asarray(mask)
    g = IMAGE_SIZE // patch
    blocks = m.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    owner = np.full(g * g, -1, dtype=np.int64)
    if not objects:
        return owner
    counts = np.stack([(blocks == i + 1).sum(1) for i in range(len(objects))])  # [n_obj, patches]
    best = counts.argmax(0)
    own = counts.max(0) >= min_pixels
    owner[own] = best[own]
    return owner


def patch_labels(objects, patch: int = 8, min_pixels: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch (colour, shape) class of the object covering most of the patch (0 = background).

    Row-major over the (IMAGE_SIZE // patch)^2 grid; colour class i+1 = COLOR_NAMES[i], shape class
    i+1 = SHAPES[i]. Used as an auxiliary training target for the vision tower.
    """
    owner = patch_objects(objects, patch, min_pixels)
    color_of = np.array([0] + [COLOR_NAMES.index(o.color) + 1 for o in objects], dtype=np.int64)
    shape_of = np.array([0] + [SHAPES.index(o.shape) + 1 for o in objects], dtype=np.int64)
    return color_of[owner + 1], shape_of[owner + 1]


def patch_anchors(objects, patch: int = 8, min_pixels: int = 6) -> np.ndarray:
    """Per object, the index of its first patch in row-major order (-1 if it owns none): one token per object,
    the unit a count is made of whatever the object's size."""
    owner = patch_objects(objects, patch, min_pixels)
    out = np.full(len(objects), -1, dtype=np.int64)
    for i in range(len(objects)):
        hits = np.flatnonzero(owner == i)
        if len(hits):
            out[i] = hits[0]
    return out


def reading_order(objects) -> list[int]:
    """Indices of ``objects`` in the order the list kind names them: left to right by the grid column (``CELL``
    px, the vision tower's patch) that holds the object's left edge, and objects whose left edges share a column
    from top to bottom by the row of their top edge. Generated objects start inside their cell (0-1 px jitter) and
    never share a cell, so the order is strict and can be read off the patch grid; sub-patch offsets never decide
    it. (Remaining ties, possible only in hand-made scenes, keep the objects' own order.)"""
    return sorted(range(len(objects)), key=lambda i: (objects[i].x // CELL, objects[i].y // CELL))


def list_answer(objects) -> str:
    """The list kind's answer: every object as "colour shape", comma-separated, in ``reading_order``."""
    return ", ".join(f"{objects[i].color} {objects[i].shape}" for i in reading_order(objects))


_Q_EVIDENCE = (
    (re.compile(r"^what color is the (\w+)\?$"), lambda o, m: o.shape == m[1]),
    (re.compile(r"^what shape is the (\w+) object\?$"), lambda o, m: o.color == m[1]),
    (re.compile(r"^how many (\w+) objects are there\?$"), lambda o, m: o.color == m[1]),
    (re.compile(r"^how many (\w+) are there\?$"), lambda o, m: SHAPE_PLURALS[o.shape] == m[1]),
)
_EXIST = re.compile(r"^is there a (\w+) (\w+)\?$")
_RELPOS = re.compile(r"^where is the (\w+) (\w+) relative to the (\w+) (\w+)\?$")


def evidence(objects, question: str) -> list[list[int]]:
    """Indices of the objects a question is about (the image regions its answer depends on), in groups:
    relative position gives [[first object], [second object]], every other kind a single group; the list kind
    names every object (in ``reading_order``).

    Existence: the matching objects if there are any, otherwise the objects that share the colour or the
    shape (the near misses that have to be ruled out), otherwise every object.
    """
    if question == LIST_QUESTION:
        return [reading_order(objects)]
    m = _RELPOS.match(question)
    if m:
        return [[i for i, o in enumerate(objects) if (o.color, o.shape) == (m[1], m[2])],
                [i for i, o in enumerate(objects) if (o.color, o.shape) == (m[3], m[4])]]
    m = _EXIST.match(question)
    if m:
        both = [i for i, o in enumerate(objects) if (o.color, o.shape) == (m[1], m[2])]
        either = [i for i, o in enumerate(objects) if o.color == m[1] or o.shape == m[2]]
        return [both or either or list(range(len(objects)))]
    for pat, pred in _Q_EVIDENCE:
        m = pat.match(question)
        if m:
            return [[i for i, o in enumerate(objects) if pred(o, m)]]
    raise ValueError(f"not a testbed question: {question!r}")


# ----------------------------------------------------------------------------------------------------
# scene construction


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    ax, ay, asz = a
    bx, by, bsz = b
    return not (
        ax + asz + _GAP <= bx or bx + bsz + _GAP <= ax or ay + asz + _GAP <= by or by + bsz + _GAP <= ay
    )


def _place(rng: np.random.Generator, side: int, boxes: list[tuple[int, int, int]], tries: int = 200):
    ncell = -(-side // CELL)
    grid = IMAGE_SIZE // CELL
    for _ in range(tries):
        gx = int(rng.integers(0, grid - ncell + 1))
        gy = int(rng.integers(0, grid - ncell + 1))
        x = gx * CELL + int(rng.integers(0, min(_JITTER, ncell * CELL - side + 1)))
        y = gy * CELL + int(rng.integers(0, min(_JITTER, ncell * CELL - side + 1)))
        # keep at least one free cell between objects
        cell_box = (gx * CELL - CELL, gy * CELL - CELL, (ncell + 2) * CELL)
        if not any(_overlaps((x, y, side), b) or _cells_touch(cell_box, b) for b in boxes):
            return x, y
    return None


def _cells_touch(cell_box: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    cx, cy, cs = cell_box
    bx, by, bs = b
    return not (cx + cs <= bx or bx + bs <= cx or cy + cs <= by or by + bs <= cy)


class _Retry(Exception):
    pass


def _layout(rng: np.random.Generator, attrs: list[tuple[str, str]]) -> list[SceneObject]:
    """Place objects with the given (shape, colour) at random free positions; random sizes."""
    boxes: list[tuple[int, int, int]] = []
    objs = []
    for shape, color in attrs:
        size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
        pos = _place(rng, SIZES[size], boxes)
        if pos is None:
            raise _Retry
        boxes.append((pos[0], pos[1], SIZES[size]))
        objs.append(SceneObject(shape, color, size, pos[0], pos[1]))
    return objs


def _pick(rng: np.random.Generator, items, exclude=()) -> str:
    pool = [i for i in items if i not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _random_attrs(rng, n, *, shape_not=(), color_not=(), pair_not=()) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        while True:
            s = _pick(rng, SHAPES, shape_not)
            c = _pick(rng, COLOR_NAMES, color_not)
            if (s, c) not in pair_not:
                break
        out.append((s, c))
    return out


def _shuffled(rng, objs: list) -> tuple:
    order = rng.permutation(len(objs))
    return tuple(objs[i] for i in order)


def _q_color(rng):
    shape = _pick(rng, SHAPES)
    color = _pick(rng, COLOR_NAMES)
    n_other = int(rng.integers(0, MAX_OBJECTS))
    attrs = [(shape, color)] + _random_attrs(rng, n_other, shape_not=(shape,))
    objs = _layout(rng, attrs)
    return objs, f"what color is the {shape}?", color


def _q_shape(rng):
    shape = _pick(rng, SHAPES)
    color = _pick(rng, COLOR_NAMES)
    n_other = int(rng.integers(0, MAX_OBJECTS))
    attrs = [(shape, color)] + _random_attrs(rng, n_other, color_not=(color,))
    objs = _layout(rng, attrs)
    return objs, f"what shape is the {color} object?", shape


def _q_count(rng):
    k = int(rng.integers(1, MAX_OBJECTS + 1))
    n_other = int(rng.integers(0, MAX_OBJECTS - k + 1))
    if rng.random() < 0.5:
        color = _pick(rng, COLOR_NAMES)
        attrs = [(_pick(rng, SHAPES), color) for _ in range(k)]
        attrs += _random_attrs(rng, n_other, color_not=(color,))
        q = f"how many {color} objects are there?"
    else:
        shape = _pick(rng, SHAPES)
        attrs = [(shape, _pick(rng, COLOR_NAMES)) for _ in range(k)]
        attrs += _random_attrs(rng, n_other, shape_not=(shape,))
        q = f"how many {SHAPE_PLURALS[shape]} are there?"
    objs = _layout(rng, attrs)
    return objs, q, NUMBER_WORDS[k]


def _q_exist(rng):
    shape = _pick(rng, SHAPES)
    color = _pick(rng, COLOR_NAMES)
    yes = bool(rng.random() < 0.5)
    attrs = []
    if yes:
        attrs.append((shape, color))
    # distractors that share one attribute with the target make the question need binding
    if rng.random() < 0.7:
        attrs.append((shape, _pick(rng, COLOR_NAMES, (color,))))
    if rng.random() < 0.7:
        attrs.append((_pick(rng, SHAPES, (shape,)), color))
    lo = max(0, 1 - len(attrs))
    n_other = int(rng.integers(lo, MAX_OBJECTS - len(attrs) + 1))
    attrs += _random_attrs(rng, n_other, pair_not=((shape, color),))
    objs = _layout(rng, attrs)
    return objs, f"is there a {color} {shape}?", "yes" if yes else "no"


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    """Unambiguous relation of a to b, or None."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dx) >= _REL_MIN and abs(dy) <= _REL_RATIO * abs(dx):
        return "left" if dx < 0 else "right"
    if abs(dy) >= _REL_MIN and abs(dx) <= _REL_RATIO * abs(dy):
        return "above" if dy < 0 else "below"
    return None


def _q_relpos(rng):
    want = _pick(rng, RELATIONS)
    s1, c1 = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    while True:
        s2, c2 = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
        if (s2, c2) != (s1, c1):
            break
    for _ in range(100):
        a, b = _layout(rng, [(s1, c1), (s2, c2)])
        if _relation(a, b) == want:
            break
    else:
        raise _Retry
    n_other = int(rng.integers(0, MAX_OBJECTS - 1))
    others = _random_attrs(rng, n_other, pair_not=((s1, c1), (s2, c2)))
    boxes = [(a.x, a.y, a.side), (b.x, b.y, b.side)]
    objs = [a, b]
    for shape, color in others:
        size = _pick(rng, SIZE_NAMES)
        pos = _place(rng, SIZES[size], boxes)
        if pos is None:
            raise _Retry
        boxes.append((pos[0], pos[1], SIZES[size]))
        objs.append(SceneObject(shape, color, size, pos[0], pos[1]))
    q = f"where is the {c1} {s1} relative to the {c2} {s2}?"
    return objs, q, want


def _q_list(rng):
    n = int(rng.integers(1, MAX_OBJECTS + 1))  # as many scenes of each size: answers of 2-17 tokens
    objs = _layout(rng, _random_attrs(rng, n))
    return objs, LIST_QUESTION, list_answer(objs)


_MAKERS = {"color": _q_color, "shape": _q_shape, "count": _q_count, "exist": _q_exist, "relpos": _q_relpos,
           "list": _q_list}


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    # The split id is part of the seed sequence: splits never share a generator state.
    return np.random.default_rng([SPLITS[split], int(seed), int(index)])


def make_sample(split: str, seed: int, index: int, kind: str | None = None) -> Sample:
    """Sample ``index`` of ``split``. Kinds cycle through ``KINDS`` so every kind is equally frequent."""
    rng = _rng(split, seed, index)
    if kind is None:
        kind = KINDS[index % len(KINDS)]
    if kind not in _MAKERS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    for _ in range(50):
        try:
            objs, question, answer = _MAKERS[kind](rng)
            break
        except _Retry:
            continue
    else:  # pragma: no cover - never observed
        raise RuntimeError("could not lay out a scene")
    objs = _shuffled(rng, list(objs))
    image = render(objs, rng)
    return Sample(image=image, question=question, answer=answer, kind=kind, objects=objs, index=index)


def scene_questions(objects, rng: np.random.Generator, n: int, exclude=(),
                    kind_weights: dict[str, int] | None = None) -> list[tuple[str, str, str]]:
    """Up to ``n`` further (question, answer, kind) about an existing scene, one kind after another.

    Used for multi-turn training dialogues (several answers per image); answers here are only as balanced
    as the scene allows, which is why evaluation uses the conditioned first question of each sample.
    ``kind_weights`` (default 1 each) repeats a kind in the cycle, so the harder kinds get more answers per image.
    """
    objs = list(objects)
    shape_count = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    color_count = {c: sum(o.color == c for o in objs) for c in COLOR_NAMES}
    pairs = {(o.color, o.shape) for o in objs}
    pair_count = {p: sum((o.color, o.shape) == p for o in objs) for p in pairs}
    unique = [o for o in objs if pair_count[(o.color, o.shape)] == 1]
    cands: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    for o in objs:
        if shape_count[o.shape] == 1:
            cands["color"].append((f"what color is the {o.shape}?", o.color))
        if color_count[o.color] == 1:
            cands["shape"].append((f"what shape is the {o.color} object?", o.shape))
    for c, k in color_count.items():
        if k:
            cands["count"].append((f"how many {c} objects are there?", NUMBER_WORDS[k]))
    for sh, k in shape_count.items():
        if k:
            cands["count"].append((f"how many {SHAPE_PLURALS[sh]} are there?", NUMBER_WORDS[k]))
    for a in unique:
        for b in unique:
            if a is not b:
                r = _relation(a, b)
                if r is not None:
                    cands["relpos"].append((f"where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?", r))
    cands["list"].append((LIST_QUESTION, list_answer(objs)))
    for c in COLOR_NAMES:
        for sh in SHAPES:
            cands["exist"].append((f"is there a {c} {sh}?", "yes" if (c, sh) in pairs else "no"))
    asked = set(exclude)
    out = []
    weights = kind_weights or {}
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown question kind(s) {sorted(unknown)}; expected some of {KINDS}")
    cycle = [k for k in KINDS for _ in range(int(weights.get(k, 1)))]
    kinds = [cycle[i] for i in rng.permutation(len(cycle))]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        pool = [qa for qa in cands[kind] if qa[0] not in asked]
        if kind == "exist":  # balance yes / no
            want = "yes" if rng.random() < 0.5 else "no"
            pool = [qa for qa in pool if qa[1] == want] or pool
        if pool:
            q, a = pool[int(rng.integers(len(pool)))]
            asked.add(q)
            out.append((q, a, kind))
    return out


def make_dialogue(split: str, seed: int, index: int, turns: int,
                  kind_weights: dict[str, int] | None = None) -> tuple[Sample, list[tuple[str, str, str]]]:
    """Sample ``index`` plus up to ``turns - 1`` further questions about the same image (training only)."""
    s = make_sample(split, seed, index)
    rng = np.random.default_rng([SPLITS[split], int(seed), int(index), 1])
    extra = (scene_questions(s.objects, rng, turns - 1, exclude=(s.question,), kind_weights=kind_weights)
             if turns > 1 else [])
    return s, [(s.question, s.answer, s.kind)] + extra


def iter_samples(split: str, seed: int = 0, n: int | None = None, start: int = 0) -> Iterator[Sample]:
    """In-memory samples ``start, start+1, ...`` of a split (endless when ``n`` is None)."""
    i = start
    while n is None or i < start + n:
        yield make_sample(split, seed, i)
        i += 1


# ----------------------------------------------------------------------------------------------------
# prompts and vocabulary


def format_prompt(question: str, image_token: str = "<image>") -> str:
    """LLaVA-1.5 style prompt; the answer follows it, and then the tokenizer's eos token."""
    return f"USER: {image_token}\n{question} ASSISTANT:"


_ANSWER_WORDS = {"color": set(COLOR_NAMES), "shape": set(SHAPES), "count": set(NUMBER_WORDS[1:]),
                 "exist": {"yes", "no"}, "relpos": set(RELATIONS), "list": set(COLOR_NAMES) | set(SHAPES) | {","}}


def answer_words(kinds=KINDS) -> list[str]:
    """Every word (token) the answers of ``kinds`` use."""
    return sorted(set().union(*(_ANSWER_WORDS[k] for k in kinds)))


def vocabulary() -> list[str]:
    """Every word the prompts, questions and answers use (lower-cased, punctuation split off)."""
    words = {"user", "assistant", ":", "?", "what", "color", "shape", "is", "the", "object", "objects", "how",
             "many", "are", "there", "a", "where", "relative", "to", "from", ","}
    words |= set(COLOR_NAMES) | set(SHAPES) | set(SHAPE_PLURALS.values()) | set(NUMBER_WORDS)
    words |= set(SIZE_NAMES) | set(RELATIONS) | {"yes", "no", "of", "and", "size", "image", "picture"}
    return sorted(words)


# ----------------------------------------------------------------------------------------------------
# files


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def write_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0, force: bool = False) -> Path:
    """Write ``n`` samples of ``split`` as PNGs plus ``<out_dir>/<split>.jsonl``; returns the JSONL path.

    Each line: {"image": path relative to out_dir, "question", "answer", "kind"}; the answer is the whole answer
    text (a list answer with its commas), without the eos token the model ends it with. An existing
    ``<split>.jsonl`` or ``images/<split>/`` is refused unless ``force`` (then both are replaced); the images and the
    JSONL are written beside their destinations and moved into place complete (vtcompile/files.py).
    """
    from ..errors import InputError
    from ..files import apply_umask, old_dir, replace_file, temp_dir, temp_path

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory to write {split}.jsonl and images/{split}/ into")
    img_dir = out / "images" / split
    jsonl = out / f"{split}.jsonl"
    existing = [p for p in (jsonl, img_dir) if p.exists()]
    if existing and not force:
        raise InputError(f"{out} already holds {' and '.join(p.relative_to(out).as_posix() for p in existing)}; pass "
                         "--force to replace them, or choose another --out")
    if img_dir.exists() and not img_dir.is_dir():
        raise InputError(f"{img_dir} is a file; move it away or choose another --out")
    tmp_images, tmp_jsonl = temp_dir(img_dir), temp_path(jsonl)
    try:
        with open(tmp_jsonl, "w", encoding="utf-8") as f:
            for s in iter_samples(split, seed, n):
                name = f"{s.index:06d}.png"
                s.image.save(tmp_images / name, format="PNG")
                rec = {"image": f"images/{split}/{name}", "question": s.question, "answer": s.answer, "kind": s.kind}
                f.write(json.dumps(rec) + "\n")
        apply_umask(tmp_images)
        if img_dir.exists():
            old = old_dir(img_dir)
            os.replace(img_dir, old / split)
            os.replace(tmp_images, img_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_images, img_dir)
        replace_file(tmp_jsonl, jsonl)
    except BaseException:
        shutil.rmtree(tmp_images, ignore_errors=True)
        tmp_jsonl.unlink(missing_ok=True)
        raise
    return jsonl


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a split file; relative image paths are resolved against the file's directory."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            img = Path(rec["image"])
            if not img.is_absolute():
                img = path.parent / img
            rec["image"] = str(img)
            records.append(rec)
    return records

"""Property-based fuzzing of the oracles (hypothesis): drawn model x input layout x program, zero mismatches.

Drawn models are tiny random LLaVAs of every backbone the family protocol accepts (llama, mistral, qwen2, gemma),
windowed or not (windows shorter and longer than the prompt), MHA or GQA, 2-5 layers, head_dim 8/16, vision
geometries of 4-17 visual tokens per image (feature layer -1/-2, CLS kept or not), tied embeddings or not; float32, and bfloat16 in the large profile's property 1.
Drawn inputs: batch 1-4, rows of different lengths left-padded, 1-3 images per row at any position, text before,
between and after. Drawn programs: 1-3 registered passes with every field inside its documented range (from the
config's field metadata; fields that depend on the model or on each other drawn by hand), in the order the pipeline
takes them (selectors before the LLM, cuts by layer, layer rewriters last).

Properties (one test each; 2 and 3 share one drawn program):
  1. no pass == transformers (prefill logits within TOL, greedy tokens equal);
  2. every drawn program == the masked-key reference in prefill and at every decode step;
  3. each layer's attention sees the scheduled visual count per row (per image for selectors before the LLM; 0 after
     a DyVTE exit) and every text token;
  4. inductor == eager (large profile only: each drawn program is an AOTInductor compile);
  5. an eager artifact round trip generates the same tokens;
  6. a config the passes refuse raises a VtcompileError with a message, never another exception.

Profiles: the default suite runs a fixed small number of examples (10, and the explicit ones), derandomised (the same examples every run)
and without shrinking, and leaves out the passes that calibrate; VTCOMPILE_FULL_MATRIX=1 runs the large profile
(303 random examples, calibrating passes and property 4 included, failures shrunk); hypothesis' example database
lives outside the repository (~/.cache/vtcompile/hypothesis, large profile only). A failure the fuzzer finds
becomes an explicit @example on its test.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, event, example, given, reject, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vtcompile import compile_pruned, load_compiled  # noqa: E402
from vtcompile.errors import PassConfigError, UnsupportedModelError, VtcompileError  # noqa: E402
from vtcompile.models.family import rope_positions  # noqa: E402

from .test_generate import assert_matches_oracle  # noqa: E402
from .test_headskip import head_oracle_diff  # noqa: E402

FULL = os.environ.get("VTCOMPILE_FULL_MATRIX") == "1"
TOL = 1e-4
NEW = 6  # new tokens per generation check
IMAGE_TOKEN, PAD, VOCAB = 127, 0, 128

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
# no shrinking in the default suite: a failure prints the example as drawn (shrinking it can take many minutes)
settings.register_profile("vtcompile-default", derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], **_common)
# VTCOMPILE_FUZZ_SHRINK=0: the large profile reports a failure as drawn (or replayed from the database) at once
settings.register_profile("vtcompile-full", derandomize=False, **_common, database=hypothesis.database.
                          DirectoryBasedExampleDatabase(Path.home() / ".cache" / "vtcompile" / "hypothesis"),
                          phases=[p for p in Phase if p is not Phase.shrink or
                                  os.environ.get("VTCOMPILE_FUZZ_SHRINK", "1") != "0"])
PROFILE = settings.get_profile("vtcompile-full" if FULL else "vtcompile-default")


def examples(default: int, full: int):
    """Settings of one property: its example count in the default and the large profile."""
    return settings(PROFILE, max_examples=full if FULL else default)


# -- models ------------------------------------------------------------------------------------------------------
@st.composite
def model_configs(draw, max_layers: int = 5) -> dict:
    backbone = draw(st.sampled_from(["llama", "mistral", "qwen2", "gemma"]))
    layers = draw(st.integers(2, max_layers))
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    hidden = heads * head_dim if backbone == "qwen2" else draw(st.sampled_from([32, 64]))
    text = dict(model_type=backbone, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                max_position_embeddings=256, tie_word_embeddings=draw(st.booleans()), pad_token_id=PAD)
    if backbone != "qwen2":
        text["head_dim"] = head_dim
    window = draw(st.one_of(st.none(), st.integers(4, 48)))  # shorter or longer than the prompt
    if backbone == "mistral":
        text["sliding_window"] = window
    elif backbone == "qwen2" and window is not None:
        text.update(use_sliding_window=True, sliding_window=window, max_window_layers=draw(st.integers(0, layers)))
    image, patch = draw(st.sampled_from([(16, 8), (32, 8), (24, 8)]))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image,
                  patch_size=patch, projection_dim=32)
    llava = dict(image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu",
                 vision_feature_layer=draw(st.sampled_from([-1, -2])),
                 vision_feature_select_strategy=draw(st.sampled_from(["default", "full"])), pad_token_id=PAD)
    return dict(text=text, vision=vision, llava=llava, seed=draw(st.integers(0, 2 ** 16)), dtype="float32")


def build_model(cfg: dict):
    from transformers import CONFIG_MAPPING, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(cfg["text"])
    text_config = CONFIG_MAPPING[text.pop("model_type")](**text)
    n = (cfg["vision"]["image_size"] // cfg["vision"]["patch_size"]) ** 2
    per_image = n + (cfg["llava"]["vision_feature_select_strategy"] == "full")
    config = LlavaConfig(vision_config=CLIPVisionConfig(**cfg["vision"]), text_config=text_config,
                         image_seq_length=per_image, **cfg["llava"])
    torch.manual_seed(cfg["seed"])
    model = LlavaForConditionalGeneration(config).eval().to(getattr(torch, cfg["dtype"]))
    model.generation_config.eos_token_id = None
    return model, per_image


# -- inputs ------------------------------------------------------------------------------------------------------
@st.composite
def layouts(draw) -> dict:
    """Per row: text before the first image, between images, after the last one (>= 1: prompts end in text)."""
    batch = draw(st.integers(1, 4))
    n_images = draw(st.integers(1, 3))
    rows = [dict(before=draw(st.integers(0, 6)), between=draw(st.integers(0, 3)), after=draw(st.integers(1, 8)))
            for _ in range(batch)]
    return dict(n_images=n_images, rows=rows, seed=draw(st.integers(0, 2 ** 16)))


def make_inputs(layout: dict, per_image: int, image_size: int):
    gen = torch.Generator().manual_seed(layout["seed"])

    def text(n):
        return torch.randint(1, IMAGE_TOKEN, (n,), generator=gen).tolist()

    bodies = []
    for row in layout["rows"]:
        body = text(row["before"])
        for i in range(layout["n_images"]):
            body += [IMAGE_TOKEN] * per_image + (text(row["between"]) if i < layout["n_images"] - 1 else [])
        bodies.append(body + text(row["after"]))
    length = max(len(b) for b in bodies)
    ids = torch.tensor([[PAD] * (length - len(b)) + b for b in bodies])
    mask = torch.tensor([[0] * (length - len(b)) + [1] * len(b) for b in bodies])
    pixels = torch.randn(len(bodies) * layout["n_images"], 3, image_size, image_size, generator=gen)
    return ids, pixels.to(getattr(torch, layout.get("dtype", "float32"))), mask


# -- programs ----------------------------------------------------------------------------------------------------
_CAP_INT = 8  # an int without a documented high (samples, epochs, trials, seeds, widths) is drawn in [low, low + 8]
# Drawn by hand in pass_specs, not from metadata: they depend on the model (layers, heads) or on each other, or they
# decide whether the pass calibrates (large profile only). A field in neither list is drawn from its metadata.
_BY_HAND = {"fastv": {"k"}, "dart": {"k"}, "randomdrop": {"k"}, "pyramiddrop": {"layers", "ratios"},
            "dyvte": {"exit_layer", "layers"}, "headskip": {"heads", "budget", "first_layer", "criterion"},
            "attnskip": {"layers", "count", "first_layer", "adapter"}}
_LEFT = {"routers", "recipe"}  # file paths: left at their default (test_cli covers missing and malformed files)


def _field_values(cls, f):
    """A field's values from its metadata: numbers in [low, high] (open ends excluded, an int without high in
    [low, low + _CAP_INT], a float without high up to low + max(1, 4 x default)), a criterion, label or cuts from its
    pass module's CRITERIA, LABELS or CUTS (the choices its help lists), booleans."""
    import sys
    import typing

    kind, m = typing.get_type_hints(cls)[f.name], f.metadata
    low, high = m.get("low"), m.get("high")
    if kind is bool:
        return st.booleans()
    if kind is int:
        low = (low or 0) + bool(m.get("low_open"))
        return st.integers(low, high - bool(m.get("high_open")) if high is not None else low + _CAP_INT)
    if kind is float:
        high = high if high is not None else low + max(1.0, 4 * abs(f.default))

        def inside(x):
            return (x > low if m.get("low_open") else x >= low) and (x < high if m.get("high_open") else x <= high)

        return st.floats(low, high, exclude_min=bool(m.get("low_open")), exclude_max=bool(m.get("high_open")),
                         allow_subnormal=False).map(lambda x: float(f"{x:.3g}")).filter(inside)
    choices = {"criterion": "CRITERIA", "label": "LABELS", "cuts": "CUTS"}  # a str field: its pass module's choices
    if kind is str and f.name in choices:
        return st.sampled_from(getattr(sys.modules[cls.__module__], choices[f.name]))
    raise AssertionError(f"{cls.name}.{f.name} ({kind}): add a way to draw it, or list it in _BY_HAND/_LEFT")


def _spec(name: str, by_hand: dict, draw) -> str:
    """name:field=value,... with the fields drawn by hand and every other field drawn from its metadata."""
    from dataclasses import fields

    from vtcompile.passes import REGISTRY

    cls = REGISTRY[name].config
    values = {**by_hand, **{f.name: draw(_field_values(cls, f)) for f in fields(cls)  # by hand first: pre_llm
                            if f.name not in _BY_HAND.get(name, ()) and f.name not in _LEFT}}  # reads k=0
    return f"{name}:" + ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                                 for k, v in values.items())


def _ratio(lo=0.0, hi=0.9):
    return st.floats(lo, hi, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def pass_specs(draw, layers: int, heads: int, heavy: bool) -> tuple[int, str]:
    """(sort key, spec) of one pass with every field inside its documented range. Sort key: the pipeline's order
    (selectors before the LLM, then cuts by layer, then layer rewriters). heavy adds what calibrates on synthetic
    prompts (FitPrune, DyVTE routers, head ablation and the other head scores, attnskip's count and adapters):
    seconds per example, so the large profile only."""
    names = ["fastv", "dart", "randomdrop", "divprune", "gprune", "cdpruner", "dyvte", "headskip", "attnskip"]
    if layers >= 4:
        names.append("pyramiddrop")
    if heavy:  # passes that calibrate on synthetic prompts (seconds each): the large profile
        names.append("fitprune")
    name = draw(st.sampled_from(names))
    if name in ("fastv", "dart"):
        k = draw(st.integers(1, layers - 1))
        return k, _spec(name, dict(k=k), draw)
    if name == "randomdrop":
        k = draw(st.integers(0, layers - 1))
        return k, _spec(name, dict(k=k), draw)
    if name in ("divprune", "gprune", "cdpruner"):
        return 0, _spec(name, {}, draw)
    if name == "pyramiddrop":
        cuts = sorted(draw(st.sets(st.integers(1, layers - 1), min_size=1, max_size=3)))
        ratios = sorted((draw(_ratio(0.05, 1.0)) for _ in cuts), reverse=True)
        return cuts[0], _spec(name, dict(layers=cuts, ratios=ratios), draw)
    if name == "dyvte":
        if heavy and draw(st.booleans()):  # routers trained on synthetic prompts: exits decided per row at run time
            candidates = sorted(draw(st.sets(st.integers(0, layers - 2), max_size=layers - 1)))  # empty: every one
            return 1, _spec(name, dict(layers=candidates), draw)
        exit_layer = draw(st.integers(0, layers - 2))
        return exit_layer + 1, _spec(name, dict(exit_layer=exit_layer), draw)
    if name == "fitprune":
        return 1, _spec(name, {}, draw)
    if name == "headskip":
        if draw(st.booleans()):  # explicit heads: every layer keeps at least one (else the pass refuses)
            per_layer = [draw(st.sets(st.integers(0, heads - 1), max_size=heads - 1)) for _ in range(layers)]
            chosen = [f"{layer}.{h}" for layer, hs in enumerate(per_layer) for h in sorted(hs)]
            if chosen:
                return 100, _spec(name, dict(heads=chosen), draw)
        # the budget form: at most heads - 1 of each layer's heads go (a larger budget is refused)
        criterion = draw(st.sampled_from(["output", "visual", "ablation", "random"] if heavy else ["random"]))
        return 100, _spec(name, dict(budget=draw(_ratio(0.0, (heads - 1) / heads)), criterion=criterion,
                                     first_layer=draw(st.integers(0, layers - 1))), draw)
    if heavy and draw(st.booleans()):  # attnskip chooses `count` layers >= first_layer on calibration prompts
        first = draw(st.integers(0, layers - 1))
        return 100, _spec(name, dict(count=draw(st.integers(0, layers - first)), first_layer=first,
                                     adapter=draw(st.booleans())), draw)
    skip = sorted(draw(st.sets(st.integers(0, layers - 1), min_size=1, max_size=max(1, layers // 2))))
    return 100, _spec(name, dict(layers=skip, adapter=heavy and draw(st.booleans())), draw)


@st.composite
def programs(draw, layers: int, heads: int = 2, heavy: bool = FULL) -> list[str]:
    drawn = draw(st.lists(pass_specs(layers, heads, heavy), min_size=1, max_size=3,
                          unique_by=lambda p: p[1].split(":")[0]))
    return [spec for _, spec in sorted(drawn, key=lambda p: p[0])]


def _no_example(**_):
    return lambda test: test


@st.composite
def cases(draw, max_layers: int = 5, heavy: bool = FULL) -> tuple[dict, list[str]]:
    """(model config, program): one argument, so that a failure can be replayed as an explicit @example."""
    cfg = draw(model_configs(max_layers))
    return cfg, draw(programs(cfg["text"]["num_hidden_layers"], cfg["text"]["num_attention_heads"], heavy))


def _calibrates(spec: str) -> bool:
    from vtcompile.passes import parse_pass_spec

    try:
        p, config = parse_pass_spec(spec)
    except VtcompileError:  # property 6's careless configs: compile_pruned refuses them itself
        return False
    return p.calibrate is not None and config.needs_calibration()


def compile_drawn(model, specs, target: str = "eager"):
    return compile_pruned(model, specs, target=target, progress=False,
                          calibration="synthetic" if any(map(_calibrates, specs)) else None)


def compile_case(case, layout):
    """(model, per_image, specs, (ids, pixels, mask), compiled eager program) of a drawn case; a config the passes
    refuse is rejected here (property 6's business; too many and hypothesis' filter health check fails)."""
    cfg, specs = case
    model, per_image = build_model(cfg)
    inputs = make_inputs(layout, per_image, cfg["vision"]["image_size"])
    try:
        cm = compile_drawn(model, specs)
    except (PassConfigError, UnsupportedModelError) as exc:
        event(f"refused: {str(exc)[:90]}")  # --hypothesis-show-statistics lists them
        reject()
    return model, per_image, specs, inputs, cm


# -- 1. no pass == transformers ------------------------------------------------------------------------------------
TOL_BF16 = 3e-2  # bfloat16: 8 bits of mantissa, logits of order 1


@examples(default=2, full=30)
@given(cfg=model_configs(), layout=layouts(), bf16=st.booleans() if FULL else st.just(False))
def test_fuzz_no_pass_equals_transformers(cfg, layout, bf16):
    """float32: prefill logits within TOL and the same greedy tokens. bfloat16 (large profile): prefill logits within
    TOL_BF16 (greedy tokens of random weights in bfloat16 hit near ties, so they are not compared)."""
    cfg = {**cfg, "dtype": "bfloat16" if bf16 else "float32"}
    model, per_image = build_model(cfg)
    ids, pixels, mask = make_inputs({**layout, "dtype": cfg["dtype"]}, per_image, cfg["vision"]["image_size"])
    cm = compile_pruned(model, progress=False)
    out = cm(ids, pixels, mask)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=rope_positions(mask)).logits
    assert out.logits.shape == want.shape  # no pass keeps every position
    real = mask.bool()
    assert (out.logits.float() - want.float()).abs().amax(-1)[real].max().item() <= (TOL_BF16 if bf16 else TOL)
    if bf16:
        return
    tokens = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    assert torch.equal(tokens, ref)


# -- 2 + 3. every program == the masked-key reference; scheduled counts; text never dropped -------------------------
def _check_counts(cm, ids, pixels, mask, per_image: int, n_images: int, pre_llm: bool):
    out = cm(ids, pixels, mask)
    prep = cm.prepare(ids, pixels, mask)
    exe = cm.executable(prep.n_visual)
    visual, real = prep.visual_mask, mask.bool()
    text = real & ~visual
    exits = out.exit_layers or [-1] * ids.shape[0]
    for layer in range(cm.frontend.geometry.num_layers):
        pos = out.outputs.get(f"key_positions_{layer}")
        if pos is None:  # attnskip removed this layer's attention: it sees nothing
            continue
        seen = torch.zeros_like(real).scatter_(1, pos.clamp(min=0), pos >= 0)
        for row in range(ids.shape[0]):
            assert bool(seen[row][text[row]].all()), (layer, row, "a text token was dropped")
            n = int(seen[row][visual[row]].sum())
            want = 0 if 0 <= exits[row] < layer else exe.schedule[layer]
            assert n == want, (layer, row, n, want, exits)
            if pre_llm and layer == 0 and want:  # a selector before the LLM keeps the same share of each image
                cols = visual[row].nonzero().flatten().view(n_images, per_image)
                assert seen[row][cols].sum(1).tolist() == [want // n_images] * n_images


def _tiny_llama(layers: int, seed: int = 0, image_size: int = 16) -> dict:
    return dict(text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                          tie_word_embeddings=False, pad_token_id=PAD, head_dim=16),
                vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=8, projection_dim=32),
                llava=dict(image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", pad_token_id=PAD), seed=seed, dtype="float32")


@examples(default=3, full=100)
@given(case=cases(max_layers=5 if FULL else 4), layout=layouts())
# found by the large profile (2026-12-06): a per-image count checked after in-LLM cuts (the test's own mistake)
@example(case=(_tiny_llama(4, seed=5765), ["divprune:keep=0.548", "pyramiddrop:layers=1/3,ratios=0.548/0.5",
                                           "fastv:k=3,r=0.199"]),
         layout={"n_images": 2, "rows": [{"before": 4, "between": 0, "after": 6}, {"before": 4, "between": 2,
                                          "after": 4}, {"before": 4, "between": 0, "after": 4}], "seed": 135})
# found by the large profile (2026-12-07): DyVTE routers then randomdrop at layer 4; the generation oracle's helper
# assumed that with exits only an exit removes visual keys (the test's mistake: rows that stay keep the later cuts).
# Replayed in the large profile only: training its routers and compiling its exit branches takes minutes.
@(example if FULL else _no_example)(
    case=({**_tiny_llama(5, seed=377),
           "text": {**_tiny_llama(5)["text"], "model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "sliding_window": None},
           "llava": {**_tiny_llama(5)["llava"], "vision_feature_layer": -1}},
          ["dyvte:samples=8,epochs=20,threshold=0.622,label=token,max_loss=0", "randomdrop:k=4,r=0.622"]),
    layout={"n_images": 2, "rows": [{"before": 4, "between": 1, "after": 6}], "seed": 334})
# found by the large profile (2026-12-07): a selection before fitprune (divprune, randomdrop k=0; fastv and a DyVTE exit
# too) crashed fitprune's calibration with an IndexError (full-prompt visual mask on the pruned token set) - a product
# bug: fitprune now refuses to calibrate after a token-removing pass (a PassConfigError, rejected here)
@example(case=(_tiny_llama(2), ["divprune:keep=0.5", "fitprune:budget=0.5,samples=2"]),
         layout={"n_images": 1, "rows": [{"before": 1, "between": 0, "after": 2}], "seed": 0})
def test_fuzz_program_equals_masked_key_reference_and_keeps_its_schedule(case, layout):
    _, per_image, specs, (ids, pixels, mask), cm = compile_case(case, layout)
    assert head_oracle_diff(cm, ids, pixels, mask) <= TOL  # the masked-key reference, removed heads zeroed
    assert_matches_oracle(cm, ids, pixels, mask, n=NEW)
    pre_llm = specs[0].split(":")[0] in ("divprune", "gprune", "cdpruner") and not any(
        s.startswith(("dyvte:exit_layer=0", "randomdrop:k=0")) for s in specs)
    _check_counts(cm, ids, pixels, mask, per_image, layout["n_images"], pre_llm)


# -- 4. inductor == eager (large profile) ------------------------------------------------------------------------
@pytest.mark.skipif(not FULL, reason="each example is an AOTInductor compile: VTCOMPILE_FULL_MATRIX=1 runs it")
@examples(default=1, full=8)  # skipped outside the large profile
@given(case=cases(max_layers=3, heavy=False), layout=layouts())
# found by the large profile (2026-12-07): randomdrop's kept tokens differ between Inductor and eager under one seed
# (logits 0.537 apart): the test's mistake, not a product bug; random programs are held to their own oracle
@example(case=({**_tiny_llama(2, seed=16775, image_size=32), "text": {**_tiny_llama(2)["text"], "model_type": "gemma"},
                "llava": {**_tiny_llama(2)["llava"], "vision_feature_select_strategy": "full"}},
               ["divprune:keep=0.315", "randomdrop:k=1,r=0.855"]),
         layout={"n_images": 3, "rows": [{"before": 6, "between": 0, "after": 4}, {"before": 0, "between": 1,
                                                                                      "after": 7}], "seed": 576})
def test_fuzz_inductor_equals_eager(case, layout):
    model, _, specs, (ids, pixels, mask), eager = compile_case(case, layout)
    inductor = compile_drawn(model, specs, target="inductor")  # calibration on synthetic prompts is deterministic
    if any(s.startswith("randomdrop") for s in specs):
        # random scores (rand_like in the graph) come from Inductor's own generator, not eager's: the kept tokens
        # differ by design, so the compiled program is held to the masked-key reference of its own choice
        assert head_oracle_diff(inductor, ids, pixels, mask) <= TOL
        assert_matches_oracle(inductor, ids, pixels, mask, n=NEW)
        return
    want = eager.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(inductor.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[]), want)
    assert (inductor(ids, pixels, mask).logits - eager(ids, pixels, mask).logits).abs().max().item() <= 1e-3


# -- 5. eager artifact round trip --------------------------------------------------------------------------------
@examples(default=1, full=15)
@given(case=cases(max_layers=4), layout=layouts())
# found by the large profile (2026-12-07): a Gemma artifact lost the embedding scale (sqrt(hidden)) - a product bug,
# fixed in artifacts.py (the manifest stores the scale)
@example(case=({**_tiny_llama(2), "text": {**_tiny_llama(2)["text"], "model_type": "gemma", "num_key_value_heads": 1,
                                           "head_dim": 8},
                "llava": {**_tiny_llama(2)["llava"], "vision_feature_layer": -1}}, ["fastv:k=1,r=0.0"]),
         layout={"n_images": 1, "rows": [{"before": 0, "between": 0, "after": 1}], "seed": 0})
def test_fuzz_artifact_round_trip_generates_the_same_tokens(case, layout, tmp_path_factory):
    _, _, _, (ids, pixels, mask), cm = compile_case(case, layout)
    want = cm.generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[])
    path = cm.save(tmp_path_factory.mktemp("fuzz") / "art")
    assert torch.equal(load_compiled(path).generate(ids, pixels, mask, max_new_tokens=NEW, eos_token_id=[]), want)


# -- 6. refusals are the project's errors ------------------------------------------------------------------------
_ANY_VALUE = st.one_of(st.integers(-3, 40), st.floats(-2.0, 3.0, allow_nan=False).map(lambda x: round(x, 3)),
                       st.just(float("nan")), st.sampled_from(["", "x", "1/2", "0.5/2", "true", "-1/7"]))


@st.composite
def careless_specs(draw, layers: int) -> list[str]:
    """Valid programs with one field of one pass set to anything (out of range, wrong type, NaN, junk lists)."""
    from vtcompile.passes import REGISTRY

    specs = draw(programs(layers, heavy=False))  # _tiny_llama: 2 heads
    i = draw(st.integers(0, len(specs) - 1))
    name = specs[i].split(":")[0]
    field = draw(st.sampled_from([f for f in REGISTRY[name].config.__dataclass_fields__
                                  if f not in ("routers", "recipe")]))  # file paths: test_cli's missing files
    value = draw(_ANY_VALUE)
    value = "nan" if isinstance(value, float) and math.isnan(value) else value
    fields = dict(item.split("=", 1) for item in specs[i].partition(":")[2].split(",") if item)
    fields[field] = str(value)
    specs[i] = name + ":" + ",".join(f"{k}={v}" for k, v in fields.items())
    return specs


@examples(default=4, full=150)
@given(layers=st.integers(2, 5), data=st.data())
def test_fuzz_refused_configs_raise_the_projects_error(layers, data):
    cfg = _tiny_llama(layers)
    model, per_image = build_model(cfg)
    specs = data.draw(careless_specs(layers), label="passes")
    try:
        cm = compile_drawn(model, specs)
    except VtcompileError as exc:
        assert str(exc).strip(), "a refusal without a message"
        return
    ids, pixels, mask = make_inputs(dict(n_images=1, rows=[dict(before=2, between=0, after=3)], seed=0), per_image, 16)
    assert cm(ids, pixels, mask).logits.isfinite().all()  # accepted: it runs

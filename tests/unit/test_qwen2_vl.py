"""The Qwen2-VL family (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration) on tiny random configs
with GQA: batch 2, left padding, two DIFFERENT image sizes in the batch (so the rows hold different visual counts).

No pass == transformers' generate (tokens, and every step's logits within 1e-4); every token pass the family takes
== the masked-key reference at the SAME M-RoPE positions, in prefill and at every decode step; each row keeps its own
ratio of its own visual tokens and never loses a text token; M-RoPE positions == transformers' get_rope_index.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.compiler.reference import head_plan, masked_key_generate, masked_key_logits
from vtcompile.errors import InputError
from vtcompile.models import load_model
from vtcompile.models.qwen2_vl import example_inputs

from .test_generate import generate_with_logits as run_with_logits
from .test_generate import oracle_keys

TOL = 1e-4
NEW = 8
MODELS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
SIZES = [(56, 84), (56, 56)]  # 6 and 4 visual tokens: the rows differ


@functools.lru_cache(maxsize=None)
def family(name: str):
    return load_model(name)


@functools.lru_cache(maxsize=None)
def compiled(name: str, passes: str | tuple | None):
    passes = list(passes) if isinstance(passes, tuple) else passes
    calibrating = any(p.split(":")[0] in ("attnskip", "fitprune", "headskip") or p.startswith("dyvte:samples")
                      for p in ([passes] if isinstance(passes, str) else passes or []))
    return compile_pruned(family(name), passes, calibration="synthetic" if calibrating else None, progress=False)


def inputs(name: str, sizes=SIZES, seed: int = 0) -> dict:
    """Prompt tensors as the processor returns them (mm_token_type_ids included)."""
    a = family(name)
    ids, pixels, mask, grid = example_inputs(a.frontend, batch=len(sizes), sizes=sizes, seed=seed)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, image_grid_thw=grid,
                mm_token_type_ids=(ids == a.config.image_token_id).int())


def generate_with_logits(cm, batch: dict, n: int = NEW):
    """test_generate's runner on a batch named as the processor names it."""
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    return run_with_logits(cm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], n, **images)


@pytest.mark.parametrize("name", MODELS)
def test_mrope_positions_equal_transformers_get_rope_index(name):
    a = family(name)
    batch = inputs(name, sizes=[(56, 84), (84, 56), (56, 56)], seed=1)
    want, delta = a.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                               image_grid_thw=batch["image_grid_thw"],
                                               attention_mask=batch["attention_mask"])
    got, nxt = a.frontend.positions(batch["attention_mask"], batch["input_ids"], image_grid_thw=batch["image_grid_thw"])
    real = batch["attention_mask"].bool()
    assert torch.equal(got[real], want.permute(1, 2, 0)[real])
    assert torch.equal(nxt.flatten(), delta.flatten() + batch["attention_mask"].sum(1))  # each row's rope delta


@pytest.mark.parametrize("name", MODELS)
def test_no_pass_equals_transformers_generate(name):
    batch = inputs(name, seed=2)
    cm = compiled(name, None)
    out = cm.generate(**batch, max_new_tokens=NEW, eos_token_id=[])
    tokens, logits, _, _ = generate_with_logits(cm, batch)
    with torch.no_grad():
        ref = cm.adapter.model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                        pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out, ref.sequences)
    assert torch.equal(tokens, ref.sequences[:, batch["input_ids"].shape[1]:])
    assert (torch.stack(ref.logits, 1) - logits).abs().max().item() <= TOL


PASSES = {"fastv": "fastv:k=1,r=0.5", "pyramiddrop": "pyramiddrop:layers=1/2/3,ratios=0.5/0.25/0.125",
          "randomdrop": "randomdrop:k=0,r=0.5", "dyvte static": "dyvte:exit_layer=2", "dart": "dart:keep=0.5,pivots=1",
          "fastv+attnskip": ["fastv:k=1,r=0.5", "attnskip:count=1"], "gprune": "gprune:keep=0.5",
          "divprune+fastv": ["divprune:keep=0.5", "fastv:k=1,r=0.5"], "cdpruner": "cdpruner:keep=0.5",
          "fitprune": "fitprune:budget=0.5", "headskip": "headskip", "dyvte routers": "dyvte:samples=16,layers=1/2,label=token,max_loss=0"}


# each pass on one of the two classes, alternating (both classes share the decoder; their vision towers differ)
@pytest.mark.parametrize("name,passes", [(MODELS[i % 2], p) for i, p in enumerate(PASSES)])
def test_pass_equals_masked_key_reference_in_prefill_and_generation(name, passes):
    spec = PASSES[passes]
    cm = compiled(name, spec if isinstance(spec, str) else tuple(spec))
    batch = inputs(name, seed=3)
    tokens, logits, result, prepared = generate_with_logits(cm, batch)
    keys = oracle_keys(cm, prepared, result)
    plan = head_plan(cm.program_for(int(prepared.visual_mask[0].sum())))
    # prefill: every kept position's logits
    ref = masked_key_logits(cm.adapter, prepared.inputs_embeds, prepared.attention_mask, prepared.position_ids, keys,
                            **plan)
    positions = result.values["positions"]
    ref = torch.gather(ref, 1, positions.clamp(min=0)[..., None].expand(-1, -1, ref.shape[-1]))
    real = (positions >= 0) & torch.gather(prepared.attention_mask, 1, positions.clamp(min=0)).bool()
    assert (ref - result.values["logits"]).abs().amax(-1)[real].max().item() <= TOL
    # generation: every step
    gen = masked_key_generate(cm.adapter, prepared.inputs_embeds, prepared.attention_mask, keys, tokens,
                              position_ids=prepared.position_ids, next_position=prepared.next_position, **plan)
    assert (gen - logits).abs().max().item() <= TOL
    assert torch.equal(gen.argmax(-1), tokens)


@pytest.mark.parametrize("name,passes", [(MODELS[0], "fastv:k=1,r=0.5"), (MODELS[1], "divprune:keep=0.5")])
def test_each_row_keeps_its_own_ratio_of_its_own_visual_tokens(name, passes):
    cm = compiled(name, passes)  # in the decoder, and before it (per image)
    batch = inputs(name, sizes=[(56, 84), (56, 56), (112, 56)], seed=5)
    prepared = cm.prepare(**batch)
    out = cm(**batch)
    counts = prepared.visual_mask.sum(1).tolist()
    assert counts == [6, 4, 8]
    kept = out.kept_visual.sum(1).tolist()
    assert kept == [n - round(0.5 * n) for n in counts] == [3, 2, 4]
    for row in range(3):  # every text token of every row is kept
        pos = out.kept_positions[row]
        pos = pos[pos >= 0]
        text = (prepared.attention_mask[row].bool() & ~prepared.visual_mask[row]).nonzero().flatten()
        assert set(text.tolist()) <= set(pos.tolist())
    # and each row is answered as if alone
    together = cm.generate(**batch, max_new_tokens=4, eos_token_id=[])[:, -4:]
    patches = batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    for row in range(3):
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real][None]
        alone = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=batch["image_grid_thw"][row:row + 1],
                     pixel_values=batch["pixel_values"][([0] + patches)[row]:patches[row]])
        assert torch.equal(together[row], cm.generate(**alone, max_new_tokens=4, eos_token_id=[])[0, -4:]), row


# Ten image sizes (multiples of 28 px): ten visual counts, (H/28)(W/28) after the 2x2 merger
TEN_SIZES = [(56, 56), (56, 84), (84, 84), (56, 112), (84, 112), (112, 112), (56, 140), (84, 140), (112, 140),
             (28, 56)]


def test_programs_are_built_per_visual_count_and_the_decode_step_is_shared():
    """Ten image sizes in one batch: one program per visual count (ten; the README's compile count) and ONE decode
    step for every row; a second call with the same counts builds nothing."""
    cm = compile_pruned(family("tiny-qwen2-vl"), "fastv:k=1,r=0.5", progress=False)
    assert set(cm.executables) == {4}  # the reference image's count (the tiny preset's 56x56), built at compile time
    batch = inputs("tiny-qwen2-vl", sizes=TEN_SIZES)
    first = cm.generate(**batch, max_new_tokens=2, eos_token_id=[])
    counts = {h * w // 28 ** 2 for h, w in TEN_SIZES}
    assert len(counts) == 10 and set(cm.executables) == counts  # one program per visual count in the batch
    assert sum(e.decode is not None for e in cm.executables.values()) == 1  # one decode step for all
    programs = {c: e.program for c, e in cm.executables.items()}
    assert torch.equal(cm.generate(**batch, max_new_tokens=2, eos_token_id=[]), first)
    assert cm.executables.keys() == programs.keys()  # nothing built again: the very same programs
    assert all(cm.executables[c].program is p for c, p in programs.items())


def test_bad_inputs_are_clear_errors():
    name = "tiny-qwen2-vl"
    cm = compiled(name, None)
    batch = inputs(name)
    with pytest.raises(InputError, match="image_grid_thw"):
        cm(**{k: v for k, v in batch.items() if k != "image_grid_thw"})
    with pytest.raises(InputError, match="unexpected input"):
        cm(**batch, image_sizes=torch.tensor([[56, 56]]))
    wrong = dict(batch, image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with pytest.raises(InputError, match="patches"):
        cm(**wrong)
    with pytest.raises(InputError, match=r"\[n_patches, 1176\]"):
        cm(**dict(batch, pixel_values=torch.zeros(2, 3, 56, 56)))
    video = batch["input_ids"].clone()
    video[0, -1] = cm.frontend.config.video_token_id
    with pytest.raises(InputError, match="video"):
        cm(**dict(batch, input_ids=video))


def test_per_image_selectors_refuse_rows_of_several_images():
    name = "tiny-qwen2-vl"
    cm = compiled(name, "divprune:keep=0.5")
    img = family(name).config.image_token_id
    ids = torch.tensor([[5, 6, 7] + [img] * 4 + [8] + [img] * 4 + [9, 10, 11]])  # two 56x56 images in one row
    two = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]),
               pixel_values=torch.randn(32, 1176))
    with pytest.raises(InputError, match="several images"):
        cm(**two)
    assert compiled(name, "fastv:k=1,r=0.5")(**two).kept_visual.sum().item() == 4  # in-decoder passes take them


def test_flops_count_visual_tokens_from_the_image_size(capsys):
    import json

    from vtcompile.cli import main

    assert main(["flops", "--model", "qwen2.5-vl-7b", "--pass", "fastv", "--image-size", "448x672", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["visual_tokens_per_layer"][:3] == [384, 384, 192]  # (448/28)(672/28); fastv K=2, R=0.5 (published)
    # KV cache of the prompt after prefill, bf16: per token and layer K and V of 4 kv heads x 128 dims x 2 bytes
    per_token = 2 * 4 * 128 * 2
    assert d["baseline_kv_cache_bytes"] == 28 * per_token * (384 + 64)
    assert d["kv_cache_bytes"] == per_token * (2 * (384 + 64) + 26 * (192 + 64))
    assert main(["flops", "--model", "qwen2.5-vl-7b", "--image-size", "440x448"]) != 0
    assert "multiples of 28" in capsys.readouterr().err
    assert main(["flops", "--model", "llava-1.5-7b", "--image-size", "448x448"]) != 0
    assert "resizes every image to one size" in capsys.readouterr().err


def tiny_processor():
    """A Qwen2VLProcessor over the tiny presets' ids: a WordLevel tokenizer (w0..w149 and Qwen's special tokens at
    150..) and Qwen2-VL's image processor (14-pixel patches, 2x2 merge, sides resized to multiples of 28)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>",
               "[UNK]"]
    vocab = {f"w{i}": i for i in range(150)} | {t: 150 + i for i, t in enumerate(special)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", padding_side="left")
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    # Qwen2VLProcessor's constructor type-checks a video processor, whose classes need torchvision (not installed
    # here): the processor is assembled without it (its __call__ uses the video processor only for videos).
    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor, proc.chat_template = images, fast, None, None
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id, proc.video_token_id = 150, 151
    return proc


@pytest.mark.parametrize("name", MODELS)
def test_generate_takes_the_processor_outputs_as_they_come(name):
    """cm.generate(**processor(images=..., text=..., return_tensors="pt")) == transformers' generate on the same."""
    from PIL import Image

    gen = torch.Generator().manual_seed(7)
    pictures = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy())
                for h, w in [(56, 84), (84, 84)]]
    text = ["w1 w2 <|vision_start|><|image_pad|><|vision_end|> w3 w4 w5",
            "<|vision_start|><|image_pad|><|vision_end|> w6"]
    enc = tiny_processor()(images=pictures, text=text, return_tensors="pt", padding=True)
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6], [1, 6, 6]]
    cm = compiled(name, None)
    out = cm.generate(**enc, max_new_tokens=NEW, eos_token_id=[])
    with torch.no_grad():
        ref = cm.adapter.model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=154)
    assert torch.equal(out, ref)
    pruned = compiled(name, "fastv:k=1,r=0.5")(**enc)
    assert pruned.kept_visual.sum(1).tolist() == [3, 5]  # 6 and 9 visual tokens, half of each (rounded)


def _loads_and_generates_in_a_new_process(art, batch: dict, want: torch.Tensor, tmp_path) -> None:
    """A new process without the model loads the artifact (programs for 4 and 6 visual tokens), generates `want`
    compiling nothing, and refuses a third size, saying why."""
    import subprocess
    import sys

    torch.save({"batch": batch, "want": want}, tmp_path / "io.pt")
    code = f"""
import torch
from vtcompile import load_compiled
from vtcompile.errors import InputError
from vtcompile.models.qwen2_vl import example_inputs
io = torch.load({str(tmp_path / "io.pt")!r})
cm = load_compiled({str(art)!r})
assert cm.adapter is None and sorted(cm.executables) == [4, 6], sorted(cm.executables)
new = io["want"].shape[1] - io["batch"]["input_ids"].shape[1]
assert torch.equal(cm.generate(**io["batch"], max_new_tokens=new, eos_token_id=[]), io["want"])
assert cm.last_generation.compile_seconds == 0.0, cm.last_generation.to_dict()
ids, pixels, mask, grid = example_inputs(cm.frontend, batch=1, sizes=[(84, 84)])
try:
    cm(input_ids=ids, pixel_values=pixels, attention_mask=mask, image_grid_thw=grid)
except InputError as exc:
    assert "9" in str(exc) and "own program" in str(exc), exc
else:
    raise AssertionError("a count the artifact has no program for was accepted")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_inductor_generates_the_eager_tokens_on_rows_of_different_sizes(tmp_path):
    """Inductor (AOTInductor packages on CPU) compiles one program per visual count (here 4 and 6) and one decode
    step, each once: a second call compiles nothing, and the tokens are eager's. Saved, the artifact holds those
    packages and a new process generates the same tokens from it. Scalar kernels, as in test_targets."""
    from .test_targets import fast_inductor

    batch = inputs("tiny-qwen2-vl", seed=3)
    eager = compile_pruned(family("tiny-qwen2-vl"), "fastv:k=1,r=0.5", progress=False)
    want = eager.generate(**batch, max_new_tokens=6, eos_token_id=[])
    with fast_inductor():
        inductor = eager.with_target("inductor")
        assert torch.equal(inductor.generate(**batch, max_new_tokens=6, eos_token_id=[]), want)
    assert sorted(inductor.executables) == [4, 6]
    assert torch.equal(inductor.generate(**batch, max_new_tokens=6, eos_token_id=[]), want)
    assert inductor.last_generation.compile_seconds == 0.0  # every stage compiled once, in the first call
    _loads_and_generates_in_a_new_process(inductor.save(tmp_path / "art"), batch, want, tmp_path)


@pytest.mark.parametrize("target", ["onnx"])  # eager artifacts: the same vision files, less to check
def test_artifact_loads_and_generates_in_a_new_process(tmp_path, target):
    """On the target, the eager tokens; saved after serving two image sizes (programs for 6 and 4 visual tokens), a
    new process without the model loads it and generates the same tokens; a third size is refused, saying why.
    (Inductor: test_inductor_generates_the_eager_tokens_on_rows_of_different_sizes.)"""
    name = "tiny-qwen2-vl"
    batch = inputs(name, seed=6)
    want = compiled(name, "fastv:k=1,r=0.5").generate(**batch, max_new_tokens=5, eos_token_id=[])  # eager
    cm = compile_pruned(family(name), "fastv:k=1,r=0.5", target=target, progress=False)
    assert torch.equal(cm.generate(**batch, max_new_tokens=5, eos_token_id=[]), want)  # the target == eager
    art = cm.save(tmp_path / "art")
    assert (art / "vision.safetensors").is_file()
    _loads_and_generates_in_a_new_process(art, batch, want, tmp_path)


def test_cli_optimize_builds_the_programs_of_the_image_sizes_asked_for(tmp_path, capsys):
    import json

    from vtcompile.cli import main

    out = tmp_path / "art"
    assert main(["optimize", "--model", "tiny-qwen2-vl", "--pass", "fastv:k=1,r=0.5", "--image-size", "56x84",
                 "--image-size", "84x84", "--no-check", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p["n_visual"] for p in manifest["programs"]) == [4, 6, 9]  # the reference 56x56, then 6 and 9
    assert main(["optimize", "--model", "tiny-qwen2-vl", "--pass", "fastv", "--image-size", "50x84"]) != 0
    assert "multiples of 28" in capsys.readouterr().err


def test_cli_run_takes_images_of_any_size_with_token_ids(tmp_path, capsys):
    """`vtcompile run --model tiny-qwen2-vl --image A --image B --input-ids ...`: without a processor each image goes
    through transformers' PIL image processor of the family, so its count follows its size (96x96 -> 84x84, 9
    tokens; 150x90 -> 140x84, 15), each placeholder expands to its own image's count, and the answers are the API's
    on the same inputs."""
    import json

    from PIL import Image

    from vtcompile.cli import main
    from vtcompile.data import prompt_inputs

    rng = torch.Generator().manual_seed(0)
    paths = []
    for i, (w, h) in enumerate([(96, 96), (150, 90)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()).save(paths[-1])
    ids = [[5, 9, 150, 7], [5, 150, 7, 8, 9]]
    batch = prompt_inputs(family("tiny-qwen2-vl").frontend, paths, input_ids=ids)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 10]]
    assert (batch["input_ids"] == 150).sum(1).tolist() == [9, 15]
    want = compiled("tiny-qwen2-vl", "fastv:k=1,r=0.5").generate(**batch, max_new_tokens=4)
    assert main(["run", "--model", "tiny-qwen2-vl", "--pass", "fastv:k=1,r=0.5", "--image", str(paths[0]), "--image",
                 str(paths[1]), "--input-ids", json.dumps(ids), "--max-new-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"]
    assert got == want[:, batch["input_ids"].shape[1]:].tolist()


def test_serve_refuses_the_family_before_anything_starts(capsys, monkeypatch):
    """The serving engine runs one program of one visual count: a dynamic-resolution family is refused with a
    message saying so (the engine, and the command before an engine process or a socket starts)."""
    from vtcompile.cli import main
    from vtcompile.errors import UnsupportedModelError
    from vtcompile.serve.app import Service
    from vtcompile.serve.engine import Engine

    def started(*args, **kwargs):  # what the command calls to fork the engine process, before it opens the socket
        raise AssertionError("the service was built for a model the engine cannot serve")

    monkeypatch.setattr(Service, "build", classmethod(started))

    with pytest.raises(UnsupportedModelError, match="fixed number of visual tokens per image"):
        Engine(compiled("tiny-qwen2-vl", None))
    assert main(["serve", "--model", "tiny-qwen2-vl", "--port", "0"]) != 0
    assert "fixed number of visual tokens per image" in capsys.readouterr().err


def test_text_prompts_go_through_the_family_processor():
    """With a processor, prompt_inputs (run --prompt) hands generate every processor output (image_grid_thw and
    mm_token_type_ids included): the tokens are transformers' generate on the same text and image."""
    from PIL import Image

    from vtcompile.data import prompt_inputs

    cm = compiled("tiny-qwen2-vl", None)
    picture = Image.fromarray((torch.rand(84, 56, 3, generator=torch.Generator().manual_seed(3)) * 255)
                              .to(torch.uint8).numpy())
    frontend = type(cm.frontend).__new__(type(cm.frontend))
    frontend.__dict__.update(cm.frontend.__dict__, processor=tiny_processor())
    batch = prompt_inputs(frontend, [picture], ["w1 <|vision_start|><|image_pad|><|vision_end|> w2 w3"])
    assert batch["image_grid_thw"].tolist() == [[1, 6, 4]] and (batch["input_ids"] == 150).sum() == 6
    assert "mm_token_type_ids" in batch
    out = cm.generate(**batch, max_new_tokens=NEW, eos_token_id=[])
    with torch.no_grad():
        ref = cm.adapter.model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                        pad_token_id=154)
    assert torch.equal(out, ref)

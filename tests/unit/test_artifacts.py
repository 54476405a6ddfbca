"""Artifacts: self-contained directories that load in a new process without the model, refuse modified files,
and answer prompts through `vtcompile run`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtcompile import CompiledModel, compile_pruned, load_compiled
from vtcompile.artifacts import ARTIFACT_FORMAT, DIGEST, manifest_digest, sign
from vtcompile.errors import ArtifactError, InputError
from vtcompile.models.llava import LlavaFamily

from .common import adapter, compiled, prompt
from .test_targets import PASSES, assert_parity


@pytest.fixture(scope="module")
def eager_art(tmp_path_factory):
    # A model of its own, holding the one-image program only: the shared compiled model (test_targets' reference)
    # holds a program for every image count the tests of its worker ran before, which depends on how pytest-xdist
    # handed out the files (a two-image program there made this artifact hold two: CI-like run, 2026-12-07).
    # CDPruner: a selector conditioned on the prompt's text, so the round trip below carries the text path of a
    # pre-LLM selection (fastv's graph goes through an artifact on inductor and onnx below).
    return compile_pruned(adapter("tiny-gqa"), PASSES["cdpruner"], progress=False).save(
        tmp_path_factory.mktemp("a") / "art")


def test_layout_and_manifest(eager_art):
    m = json.loads((eager_art / "manifest.json").read_text())
    assert m["format"] == ARTIFACT_FORMAT and m["target"] == "eager"
    assert {"vtcompile", "torch", "transformers"} <= set(m["versions"])
    assert m["passes"] == [{"pass": "cdpruner", "config": {"keep": 0.25, "theta": 1.0, "negative": True}}]
    (program,) = m["programs"]
    assert program["n_visual"] == 16 and program["base"]["stages"] == ["decoder-v16"]
    assert program["stages"]["decoder-v16"]["files"] == ["decoder-v16.pt2"]
    assert program["decode"]["files"] == ["decoder-v16-decode.pt2"] and program["decode"]["role"] == "decode"
    assert [o["name"] for o in program["signature"]["outputs"]][:6] == ["logits", "positions", "visual",
                                                                        "key_positions_0", "k_0", "v_0"]
    assert set(m["files"]) == {"config.json", "embeddings.safetensors", "vision.pt2", "decoder-v16.pt2",
                               "decoder-v16-decode.pt2"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert "flops" in m["report"] and m["input_spec"]["visual_tokens_per_image"] == 16


ROOT = Path(__file__).resolve().parents[2]


def assert_new_process_matches(path, geometry: str, spec: str, kinds, tmp_path, exact: bool = False) -> None:
    """Load the artifact in a new process in which building the model and compiling anything raise, with an Inductor
    cache of its own that must stay empty, and check there: prefill parity with the eager program (kept positions
    exact, logits within 1e-4, or equal when `exact`), the same 8 greedy tokens from `generate`, and no compile or
    stage load in the generate calls' timings."""
    ref = compiled(geometry, spec)
    cases = []
    for kind in kinds:
        ids, pixels, mask = prompt(geometry, kind)
        out = ref(ids, pixels, mask)
        cases.append({"kind": kind, "ids": ids, "pixels": pixels, "mask": mask, "logits": out.logits,
                      "kept_positions": out.kept_positions, "kept_visual": out.kept_visual,
                      "tokens": ref.generate(ids, pixels, mask, max_new_tokens=8, eos_token_id=[])})
    torch.save(cases, tmp_path / "io.pt")
    code = f"""
import types, torch, vtcompile.models as m
def refuse(*a, **k):
    raise AssertionError("load_compiled rebuilt the model")
m.build_from_spec = m.load_model = refuse
import torch._inductor
torch.compile = torch._inductor.aoti_compile_and_package = torch._inductor.aot_compile = refuse
from vtcompile import load_compiled
from tests.unit.test_targets import assert_parity, fast_inductor
with fast_inductor():
    lm = load_compiled({str(path)!r})
    for c in torch.load({str(tmp_path / 'io.pt')!r}):
        ref = types.SimpleNamespace(**c)
        out = lm(c["ids"], c["pixels"], c["mask"])
        assert_parity(out, ref, c["mask"])
        assert not {exact} or (out.logits - ref.logits).abs().max().item() == 0.0, c["kind"]
        tokens = lm.generate(c["ids"], c["pixels"], c["mask"], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(tokens, c["tokens"]), (c["kind"], tokens, c["tokens"])
        assert lm.last_generation.compile_seconds == 0.0, lm.last_generation
        print(c["kind"], "ok")
"""
    import os

    cache = tmp_path / "inductor-cache-of-the-new-process"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*")), list(cache.rglob("*"))
    assert r.stdout.split() == [w for k in kinds for w in (k, "ok")]


def test_loads_in_a_new_process_without_the_model(eager_art, tmp_path):
    assert_new_process_matches(eager_art, "tiny-gqa", PASSES["cdpruner"], ["mid_pad_b2"], tmp_path, exact=True)


def test_corrupt_stage_file_is_refused(eager_art, tmp_path):
    import shutil

    art = shutil.copytree(eager_art, tmp_path / "c")
    stage = art / "decoder-v16.pt2"
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="decoder-v16.pt2 does not match the manifest .* corrupt or was modified"):
        load_compiled(art)
    stage.unlink()
    with pytest.raises(ArtifactError, match="incomplete: decoder-v16.pt2 is listed"):
        load_compiled(art)


@pytest.mark.parametrize("key,value,needle", [
    ("vtcompile", "0.0.9", "written by vtcompile 0.0.9; this is vtcompile"),
    ("torch", "2.1.0", "written with torch 2.1.0"),
])
def test_version_mismatch_is_refused(eager_art, tmp_path, key, value, needle):
    import shutil

    art = shutil.copytree(eager_art, tmp_path / "v")
    m = json.loads((art / "manifest.json").read_text())
    m["versions"][key] = value
    (art / "manifest.json").write_text(json.dumps(sign(m)))  # as that version would have written it
    with pytest.raises(ArtifactError, match=needle):
        load_compiled(art)


def test_edited_manifest_is_refused_by_load_and_inspect(eager_art, tmp_path, capsys):
    """The manifest's digest covers its own content: an edited pass config (cdpruner keep=0.25 -> 0.9) passed every
    file's sha256 before; now loading and `inspect` refuse it, and restoring the value makes it load again."""
    import shutil

    from vtcompile.cli import main

    art = shutil.copytree(eager_art, tmp_path / "e")
    text = (art / "manifest.json").read_text()
    m = json.loads(text)
    assert m[DIGEST] == manifest_digest(m) and len(m[DIGEST]) == 64
    config = m["passes"][0]["config"]
    assert config["keep"] == 0.25  # the value restored below is the one the artifact was written with
    config["keep"] = 0.9
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(ArtifactError, match="does not match its own digest .* edited or corrupted"):
        load_compiled(art)
    assert main(["inspect", str(art)]) == 2
    assert "does not match its own digest" in capsys.readouterr().err
    # formatting is not content: the same values re-indented still verify
    config["keep"] = 0.25
    (art / "manifest.json").write_text(json.dumps(m, separators=(",", ":")))
    assert main(["inspect", str(art)]) == 0
    assert "sha256 verified" in capsys.readouterr().out


def test_artifact_files_follow_the_umask(eager_art):
    """Files and directories of an artifact get the user's umask like any other file (mkdtemp made the directory
    0700, safetensors the embeddings 0600)."""
    from vtcompile.files import umask

    mask = umask()
    assert (eager_art.stat().st_mode & 0o777) == 0o777 & ~mask
    for f in eager_art.rglob("*"):
        want = (0o777 if f.is_dir() else 0o666) & ~mask
        assert (f.stat().st_mode & 0o777) == want, (f, oct(f.stat().st_mode))


def test_force_replaces_only_an_artifact_that_holds_nothing_else(eager_art, tmp_path):
    """--force replaces an artifact whose directory holds exactly the files its manifest lists; a file of the user's
    inside it (or one the manifest does not list) makes it refuse, and nothing is deleted."""
    import shutil

    cm = compiled("tiny-gqa", PASSES["cdpruner"])
    art = shutil.copytree(eager_art, tmp_path / "f")
    (art / "notes.txt").write_text("mine")
    (art / "processor").mkdir()
    with pytest.raises(ArtifactError, match=r"holds 2 file\(s\) its manifest does not list \(notes.txt, processor/\)"):
        cm.save(art, force=True)
    assert (art / "notes.txt").read_text() == "mine" and (art / "manifest.json").is_file()
    (art / "notes.txt").unlink()
    (art / "processor").rmdir()
    assert cm.save(art, force=True) == art
    assert json.loads((art / "manifest.json").read_text())["format"] == ARTIFACT_FORMAT


def test_stale_temporary_directories_are_removed_on_the_next_write(tmp_path, caplog):
    """A killed write leaves `.NAME.tmp-<pid>-*`: the next write to the same place (temp_dir, which write_artifact,
    copy_artifact and `testbed data` start with) removes it when its pid is gone (or, without a pid, when it is an hour
    old) and says so; a live writer's, a fresh one without a pid and another destination's are left alone. The killed
    write end to end: test_cli.py::test_killed_write_leaves_nothing_the_next_one_does_not_clean."""
    import os
    import shutil
    import time

    from vtcompile.files import temp_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".art.tmp-{dead}-abcd1234"
    stale.mkdir()
    (stale / "embeddings.safetensors").write_bytes(b"x" * 1000)
    old = tmp_path / ".art.tmp-q1w2e3r4"  # the naming before pids: stale once an hour old
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / ".art.tmp-a1b2c3d4"
    fresh.mkdir()
    live = tmp_path / f".art.tmp-{os.getppid()}-zzzz0000"  # a running process's write
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abcd1234"  # another destination's
    other.mkdir()
    with caplog.at_level("WARNING", logger="vtcompile"):
        mine = temp_dir(tmp_path / "art")
    assert mine.name.startswith(f".art.tmp-{os.getpid()}-")
    assert not stale.exists() and not old.exists()
    assert fresh.exists() and live.exists() and other.exists()
    said = caplog.text
    assert f"removed {stale}, left behind by an earlier write to {tmp_path / 'art'} that was killed (pid {dead}" in said
    assert f"removed {old}" in said and str(fresh) not in said
    for d in (mine, fresh, live, other):
        shutil.rmtree(d)


def test_loaded_model_reports_and_refuses_other_image_counts(eager_art):
    lm = load_compiled(eager_art)
    assert isinstance(lm, CompiledModel) and lm.target.name == "eager"  # the one compiled-model type
    assert "cdpruner(keep=0.25, negative=True, theta=1.0)" in lm.report.summary_table()
    ids, pixels, mask = prompt("tiny-gqa", "two_images")
    with pytest.raises(InputError, match="holds programs for 16 .* this prompt has 32"):
        lm(ids, pixels, mask)


# The ONNX artifact's round trip is test_cli_optimize_onnx_then_run_with_input_ids (one ONNX export for the CLI,
# the artifact's layout and parity, and the exported graph's dynamic axes).
def test_target_artifact_round_trip(tmp_path, monkeypatch):
    """compile_pruned(target="inductor") AOT-compiles the stage once, timed apart; every batch size (1 included),
    prompt length and padding then runs that package: nothing compiles again, neither Inductor nor Dynamo; the same
    for the decode step over generate calls. Saved, the artifact holds the prefill and decode packages and loads in
    a new process to the same logits and tokens; on another machine it is refused with a clear error."""
    from torch._dynamo.utils import counters

    from vtcompile.models.llava import example_inputs
    from vtcompile.targets.inductor import AotStage

    from .test_targets import fast_inductor

    geometry, family = "tiny-gqa", "fastv"
    with fast_inductor():  # end to end through compile_pruned
        cm = compile_pruned(adapter(geometry), family, target="inductor", progress=False)
    ref = compiled(geometry, family)
    (lazy,) = cm.executable(16).prefill_stages()
    assert isinstance(lazy.lowered, AotStage) and lazy.compile_seconds > 0  # compiled at lowering, timed apart
    assert cm.report.compile_seconds >= lazy.compile_seconds
    seconds, graphs = lazy.compile_seconds, counters["stats"]["unique_graphs"]
    for batch, before, after, pad in [(1, 3, 5, 0), (1, 9, 30, 0), (3, 2, 7, 4), (2, 11, 1, 6)]:
        ids, pixels, mask = example_inputs(adapter(geometry), batch=batch, text_before=before,
                                           text_after=after, pad=pad, seed=batch + before)
        assert_parity(cm(ids, pixels, mask), ref(ids, pixels, mask), mask)
    assert lazy.compile_seconds == seconds and counters["stats"]["unique_graphs"] == graphs

    # One AOT-compiled decode step, written to its caches in place, serves every step of a call and new prompt
    # lengths, batch sizes and max_new_tokens (other cache lengths): the first generate compiles it (given apart in
    # last_generation, not in its timings), later calls compile nothing.
    first = prompt(geometry, "mid_pad_b2")
    with fast_inductor():
        assert torch.equal(cm.generate(*first, max_new_tokens=6, eos_token_id=[]),
                           ref.generate(*first, max_new_tokens=6, eos_token_id=[]))
    stats, step = cm.last_generation, cm.executable(16).decode
    assert type(step.lowered).__name__ == "AotStage" and step.compile_seconds > 0
    assert stats.compile_seconds >= step.compile_seconds
    assert stats.ttft_seconds + stats.decode_seconds < stats.compile_seconds  # the run's ms, not the compile's s
    decode_seconds = step.compile_seconds
    for batch, before, after, pad, n in [(1, 3, 5, 0, 12), (3, 2, 7, 4, 5), (2, 11, 1, 6, 20)]:
        ids, pixels, mask = example_inputs(adapter(geometry), batch=batch, text_before=before,
                                           text_after=after, pad=pad, seed=batch)
        out = cm.generate(ids, pixels, mask, max_new_tokens=n, eos_token_id=[])
        assert torch.equal(out, ref.generate(ids, pixels, mask, max_new_tokens=n, eos_token_id=[]))
        assert cm.last_generation.compile_seconds == 0.0

    path = cm.save(tmp_path / "inductor")  # the two packages compiled above, nothing compiled again
    assert lazy.compile_seconds == seconds and step.compile_seconds == decode_seconds
    m = json.loads((path / "manifest.json").read_text())
    assert m["target"] == "inductor" and m["programs"][0]["stages"]["decoder-v16"]["files"] == ["decoder-v16.pt2"]
    assert m["programs"][0]["decode"]["files"] == ["decoder-v16-decode.pt2"]
    assert_new_process_matches(path, geometry, family, ["mid_pad_b2", "image_first"], tmp_path)
    import platform  # a package's kernels are for the machine that compiled them: a clear error elsewhere

    here = platform.machine()
    monkeypatch.setattr(platform, "machine", lambda: "elsewhere")
    with pytest.raises(ArtifactError, match=rf"was compiled for machine {here} \(this machine: elsewhere\): its "
                                            r"kernels cannot run here. Re-create the artifact on this machine"):
        load_compiled(path)(*prompt(geometry, "image_first"))


def test_dyvte_routers_artifact_round_trip(tmp_path):
    """A program with dynamic exits saves as per-layer stages + routers and loads back to the same exits and
    logits (rows exiting after layers 0, 1 and 2, regrouped batches); the routers file is covered by the
    manifest's checksums."""
    from .test_dyvte import trained
    from .test_targets import assert_exit_parity

    cm = trained("tiny")
    path = cm.save(tmp_path / "dy")
    m = json.loads((path / "manifest.json").read_text())
    program = m["programs"][0]
    assert program["decision"]["kind"] == "dyvte.routers" and program["decision"]["meta"]["threshold"] == 0.5
    assert program["decision"]["file"] == "decoder-v16-decision.safetensors"
    files = [f for s in program["stages"].values() for f in s["files"]]
    layers = 4
    assert sum(f.startswith("decoder-v16-layer") for f in files) == layers
    assert sum("-branch" in f for f in files) == sum(layers - 1 - e for e in (0, 1, 2))
    lm = load_compiled(path)
    seen = set()
    for kind, seed in (("mid_pad_b2", 5), ("image_first", 7), ("mid_pad_b2", 11)):
        ids, pixels, mask = prompt("tiny", kind, seed=seed)
        out = lm(ids, pixels, mask)
        assert_exit_parity(out, cm(ids, pixels, mask), mask)
        seen.update(out.exit_layers)
    assert {0, 1, 2} <= seen  # the trained routers still route as this test assumes
    # The threshold is part of the saved decision: the same routers saved with another threshold load back routing
    # as the program compiled with it (test_dyvte: a higher threshold never exits a row earlier).
    high = compile_pruned(adapter("tiny"), "dyvte:threshold=0.999,max_loss=0", recipes={"dyvte": cm.recipes["dyvte"]},
                          progress=False)
    original = (path / "manifest.json").read_text()
    (entry,) = [p for p in m["passes"] if p["pass"] == "dyvte"]
    entry["config"]["threshold"] = 0.999
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="does not match its own digest"):  # an edited manifest is refused
        load_compiled(path)
    (path / "manifest.json").write_text(original)
    high_path = high.save(tmp_path / "dy-high")
    (entry,) = json.loads((high_path / "manifest.json").read_text())["programs"]
    assert entry["decision"]["meta"]["threshold"] == 0.999
    lm, changed = load_compiled(high_path), False
    for kind, seed in (("mid_pad_b2", 5), ("image_first", 7), ("mid_pad_b2", 11)):
        ids, pixels, mask = prompt("tiny", kind, seed=seed)
        exits = lm(ids, pixels, mask).exit_layers
        assert exits == high(ids, pixels, mask).exit_layers
        changed |= exits != cm(ids, pixels, mask).exit_layers
    assert changed  # the threshold decided something on these prompts
    routers_file = path / "decoder-v16-decision.safetensors"
    data = bytearray(routers_file.read_bytes())
    data[-1] ^= 0xFF
    routers_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="decision.safetensors does not match the manifest"):
        load_compiled(path)


def _tiny_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in "USER ASSISTANT : what color is the shape ? red blue".split():
        vocab.setdefault(w, len(vocab))
    vocab["<image>"] = 127
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", image_token="<image>")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path)
    return path


def test_cli_run_with_processor(image, tmp_path, capsys):
    """In-process (the subprocess runs are test_loads_in_a_new_process and test_cli.py's smoke tests)."""
    from vtcompile.cli import main

    base = adapter("tiny")
    with_proc = LlavaFamily(base.model, base.spec, _tiny_processor())
    path = compile_pruned(with_proc, "fastv").save(tmp_path / "p")
    assert (path / "processor").is_dir()
    capsys.readouterr()
    code = main(["run", str(path), "--image", str(image), "--prompt", "what color is the shape ?", "--json",
                 "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out)
    assert res["prompt_tokens"] > 16 and isinstance(res["answers"][0], str) and len(res["token_ids"][0]) <= 5
    assert res["kv_prompt_bytes"] > 0


def test_cli_optimize_onnx_then_run_with_input_ids(image, tmp_path, capsys):
    """`vtcompile optimize --target onnx` then `vtcompile run` on the artifact (the CLI in-process; test_cli.py has
    the subprocess smoke tests): the artifact's files, parity of the loaded programs with eager, generation through
    the exported decode step, the exported graph's symbolic batch and sequence, and an answer from token ids."""
    from vtcompile.cli import main

    out = tmp_path / "o"
    assert main(["optimize", "--model", "tiny", "--pass", "dart", "--target", "onnx", "--out", str(out),
                 "--no-check"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "target" in printed and "onnx" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == "onnx" and m["programs"][0]["stages"]["decoder-v16"]["files"] == ["decoder-v16.onnx"]
    assert m["programs"][0]["decode"]["files"] == ["decoder-v16-decode.onnx"]
    lm = load_compiled(out)
    for kind in ("mid_pad_b2", "image_first"):
        ids, pixels, mask = prompt("tiny", kind)
        assert_parity(lm(ids, pixels, mask), compiled("tiny", "dart")(ids, pixels, mask), mask)
    # generation through the exported functional decode step equals eager's
    assert torch.equal(lm.generate(ids, pixels, mask, max_new_tokens=8, eos_token_id=[]),
                       compiled("tiny", "dart").generate(ids, pixels, mask, max_new_tokens=8, eos_token_id=[]))
    (lazy,) = lm.executable(16).prefill_stages()
    sess = lazy.lowered.session
    dims = [i.shape[:2] for i in sess.get_inputs()]
    assert all(isinstance(b, str) and isinstance(s, str) for b, s in dims), dims
    assert [i.name for i in sess.get_inputs()] == ["inputs_embeds", "attention_mask", "position_ids", "visual_mask"]
    outs = sess.get_outputs()  # logits, positions, visual, then each layer's distinct key positions, keys, values
    assert len(outs[0].shape) == 3 and len(outs) == 3 + 2 * 4 + 1  # the positions of layers 0-1 once, then 2-3
    assert all(isinstance(o.shape[0], str) for o in outs)  # every output has the symbolic batch
    assert main(["run", str(out), "--image", str(image), "--input-ids", "[5, 9, 127, 7, 8]", "--json",
                 "--max-new-tokens", "4"]) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_tokens"] == 20 and res["answers"] == [None] and len(res["token_ids"][0]) == 4
    assert res["target"] == "onnx"


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "hi"], "has no processor"),
    (["--input-ids", "[5, 7]"], "hold 0 image token(s)"),
    (["--input-ids", "[5, 127]", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--input-ids", "five"], "must be a JSON list"),
])
def test_cli_run_bad_input_is_a_clear_error(eager_art, image, capsys, args, needle):
    from vtcompile.cli import main

    assert main(["run", str(eager_art), "--image", str(image), *args]) != 0
    assert needle in capsys.readouterr().err

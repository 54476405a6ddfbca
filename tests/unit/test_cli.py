"""The vtcompile command: a few end-to-end runs as a user would (subprocess), and every bad input and papercut
through the CLI's main() in-process (each says what was expected, exits non-zero, and loads nothing first)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtcompile.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vtcompile", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model: the argument checks must come first."""
    import vtcompile.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(vtcompile.models, "build_from_spec", refuse)


def test_optimize_prints_report_and_writes_artifact(tmp_path):
    r = run("optimize", "--model", "tiny", "--pass", "fastv:k=2,r=0.5", "--out", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout and "fastv(k=2, r=0.5)" in r.stdout
    assert "top-1 agreement" in r.stdout and "saves" in r.stdout and "KV cache after prefill" in r.stdout
    assert f"artifact written to {tmp_path / 'art'}" in r.stdout
    r2 = run("inspect", str(tmp_path / "art"))
    assert r2.returncode == 0 and "16 16 8 8" in r2.stdout and "sha256 verified" in r2.stdout


def test_flops_json_for_llava_7b_without_weights(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--pass", "fastv", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert round(d["baseline_paper_tflops"], 2) == 3.82 and round(d["paper_tflops"], 2) == 2.01
    assert d["visual_tokens_per_layer"][:3] == [576, 576, 288] and d["true_tflops"] < d["baseline_true_tflops"]
    # KV cache of the prompt after prefill, bf16: 32 layers x 2 (K, V) x 4096 x 2 bytes per token
    assert d["baseline_kv_cache_bytes"] == 32 * 2 * 4096 * 2 * (576 + 64)
    assert d["kv_cache_bytes"] == 2 * 2 * 4096 * 2 * (576 + 64) + 30 * 2 * 4096 * 2 * (288 + 64)


def test_listing_commands(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "dyvte" in out
    assert max(len(line) for line in out.splitlines()) <= 100  # wrapped to the terminal
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llava-1.5-7b" in out and "tiny" in out
    words = " ".join(out.split("The testbed knows ", 1)[1].split())
    assert words.startswith("52 words (any other word reads as <unk>): a above and are assistant")
    assert " circle " in words and "<image>" not in words and "</s>" not in words


@pytest.mark.parametrize("args,needle", [
    (["optimize", "--model", "llava-9b"], "unknown model 'llava-9b'. Known models:"),
    (["optimize", "--model", "llava-1.5-7b"], "no local weights for 'llava-1.5-7b'"),
    (["optimize", "--pass", "fastv:r=1.5"], "r=1.5 is out of range"),
    (["optimize", "--pass", "fastv:depth=2"], "unknown field(s) depth"),
    (["optimize", "--pass", "fastv:k"], "expected key=value"),
    (["optimize", "--pass", "nope"], "unknown pass 'nope'"),
    (["optimize", "--pass", "fastv,pyramiddrop"], "give each its own --pass"),
    (["optimize", "--pass", "fastv:k=2,pyramiddrop"], "give each its own --pass"),
    (["optimize", "--target", "tensorrt"], "target 'tensorrt' is not available"),
    (["optimize", "--weights", "/nonexistent", "--model", "llava-1.5-7b"], "has no config.json"),
    (["inspect", "/nonexistent"], "no manifest.json"),
    (["eval", "--limit", "0"], "--limit must be >= 1, found 0"),
    (["eval", "--limit", "-3"], "--limit must be >= 1, found -3"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["eval", "--data", "/nonexistent.jsonl"], "neither 'testbed' nor an existing JSONL file"),
    (["run", "--image", "/nonexistent.png", "--prompt", "hi"], "image /nonexistent.png does not exist"),
    (["run", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["run"], "give --prompt TEXT"),
    (["flops", "--images", "0"], "--images and --text-tokens must be >= 1"),
    # flags that would be ignored say what applies
    (["run", "art/", "--target", "onnx", "--prompt", "hi"], "--target do(es) not apply to an artifact: art runs"),
    (["run", "art/", "--model", "tiny", "--prompt", "hi"], "--model do(es) not apply to an artifact"),
    (["run", "art/", "--calibration", "testbed", "--layers", "2", "--prompt", "hi"], "--layers, --calibration do(es)"),
    (["run", "art/", "--seed", "3", "--prompt", "hi"], "--seed seeds sampling (--sample)"),
    (["run", "--prompt", "hi", "--temperature", "0.7", "--top-p", "0.9"], "--temperature, --top-p appl(ies) only "
                                                                           "with --sample"),
    (["run", "--prompt", "hi", "--top-k", "5"], "--top-k appl(ies) only with --sample"),
    (["run", "--prompt", "hi", "--input-ids", "[5, 7]"], "give --prompt (text, read by the model's processor) or "
                                                         "--input-ids (token ids), not both"),
    (["run", "--input-ids", "[[5, 7], []]"], "must be a JSON list of token ids"),
    (["optimize", "--pass", "fastv", "--calibration", "testbed"], "--calibration applies to passes that fit a recipe "
                                                                  "on data (attnskip, dyvte, fitprune, headskip); "
                                                                  "fastv fit(s) none: drop --calibration"),
    (["run", "--pass", "pyramiddrop", "--calibration", "testbed", "--prompt", "hi"], "drop --calibration"),
    (["eval", "--artifact", "art/", "--model", "tiny"], "--model do(es) not apply to --artifact"),
])
def test_bad_input_is_a_clear_error_before_any_loading(args, needle, tmp_path, capsys, no_model):
    if args[0] == "optimize":
        args = args + ["--out", str(tmp_path / "o")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_bad_input_from_the_shell():
    """One bad input end to end: message on stderr, no traceback, non-zero exit."""
    r = run("optimize", "--model", "tiny", "--pass", "fastv:k=9")
    assert r.returncode != 0 and "k=9 is beyond the last layer" in r.stderr and "Traceback" not in r.stderr


def test_layers_too_few_for_a_pass(capsys):
    assert main(["optimize", "--model", "tiny", "--layers", "1", "--pass", "fastv"]) != 0
    assert "needs a decoder with at least 2 layers" in capsys.readouterr().err


def test_calibrating_pass_on_the_testbed_defaults_to_its_train_split(no_model):
    """--pass fitprune on the shipped testbed calibrates on its train split (as asked when FitPrune was filed); on
    another model the error names the CLI flag, not a Python parameter."""
    import argparse

    from vtcompile.cli.common import calibration_data as _calibration
    from vtcompile.cli.common import parse_passes as _passes
    from vtcompile.cli.common import spec_of as _spec
    from vtcompile.passes import resolve_passes

    args = argparse.Namespace(passes=["fitprune"], calibration=None, model="testbed", weights=None,
                              random_weights=False, layers=None, dtype=None, seed=0)
    assert _calibration(args, _passes(args), _spec(args)) == "testbed"
    args.calibration = "data.jsonl"
    assert _calibration(args, _passes(args), _spec(args)) == "data.jsonl"
    args.model, args.calibration = "tiny", None
    assert _calibration(args, resolve_passes("fitprune"), _spec(args)) is None


def test_calibration_missing_names_the_flag(capsys):
    assert main(["optimize", "--model", "tiny", "--pass", "fitprune", "--no-check"]) != 0
    err = capsys.readouterr().err
    assert "--calibration DATA" in err and "give calibration=" not in err


def test_report_says_what_was_saved_and_that_no_artifact_was_written(capsys):
    assert main(["optimize", "--model", "tiny", "--pass", "fastv"]) == 0
    out = capsys.readouterr().out
    assert "(saves 25.6%)" in out and "no artifact written (give --out DIR to write one)" in out


def test_quiet_keeps_stderr_to_warnings_and_verbose_adds_debug(capsys):
    """-q: no progress or info lines, the report still on stdout; -v: debug lines too; not both."""
    assert main(["-q", "optimize", "--model", "tiny", "--pass", "fastv", "--no-check"]) == 0
    out, err = capsys.readouterr()
    assert "(saves 25.6%)" in out and err == ""
    assert main(["optimize", "--model", "tiny", "--pass", "fastv", "--no-check"]) == 0
    assert "[vtcompile] loading tiny" in capsys.readouterr().err  # the default level shows progress
    import logging

    main(["-v", "passes"])
    assert logging.getLogger("vtcompile").getEffectiveLevel() == logging.DEBUG
    with pytest.raises(SystemExit):
        main(["-v", "-q", "passes"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_self_check_judges_its_own_numbers():
    """The verdict follows the agreement: below the floor it is a warning, not silence."""
    from vtcompile.evaluate import self_check

    from .common import compiled

    cm = compiled("tiny", "dyvte:exit_layer=0")
    strict, lenient = self_check(cm, agreement_floor=1.01), self_check(cm, agreement_floor=0.0)
    assert strict["verdict"].startswith("WARNING: the pruned model's next token differs")
    assert lenient["verdict"] == "ok" and strict["top1_agreement"] == lenient["top1_agreement"]


def test_inspect_verifies_checksums_and_shows_every_field(tmp_path, capsys):
    from .common import compiled

    art = compiled("tiny", "pyramiddrop:layers=1/2/3").save(tmp_path / "a")
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "pyramiddrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125])" in out
    assert "M ->" in out and "0.000 ->" not in out  # readable units, not 0.000 TFLOPs
    data = bytearray((art / "decoder-v16.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "decoder-v16.pt2").write_bytes(bytes(data))
    assert main(["inspect", str(art)]) != 0
    assert "does not match the manifest" in capsys.readouterr().err


def test_existing_output_dir_is_refused_and_force_replaces_only_an_artifact(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["optimize", "--model", "tiny", "--out", str(out), "--no-check"]) != 0
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["optimize", "--model", "tiny", "--out", str(out), "--no-check", "--force"]) != 0
    assert "is not a vtcompile artifact" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"
    art = tmp_path / "art"  # a directory with a manifest listing all else in it is an artifact: --force replaces it
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"files": {"decoder-v16.pt2": {}}}))
    (art / "decoder-v16.pt2").write_text("old")
    assert main(["optimize", "--model", "tiny", "--pass", "fastv", "--out", str(art), "--no-check", "--force"]) == 0
    assert json.loads((art / "manifest.json").read_text())["passes"][0]["pass"] == "fastv"
    assert (art / "decoder-v16.pt2").read_bytes() != b"old"


def test_testbed_data_writes_jsonl_that_eval_reads(tmp_path, capsys):
    from vtcompile.data import load_data

    assert main(["testbed", "data", "--out", str(tmp_path), "-n", "4", "--split", "val", "--split", "test"]) == 0
    for split in ("val", "test"):
        samples, bad = load_data(str(tmp_path / f"{split}.jsonl"))
        assert len(samples) == 4 and bad == 0
    assert main(["testbed", "data", "--out", str(tmp_path), "-n", "0"]) != 0
    assert "-n must be >= 1" in capsys.readouterr().err
    assert (tmp_path / "images" / "test").stat().st_mode & 0o777 == 0o777 & ~__import__("vtcompile.files").files.umask()


def test_testbed_data_never_overwrites_without_force(tmp_path, capsys):
    """An existing test.jsonl (a user's, or an earlier run's) is refused without --force and left as it was; --force
    replaces the split's JSONL and images; --out naming a file is an error, not a NotADirectoryError."""
    (tmp_path / "test.jsonl").write_text("mine\n")
    assert main(["testbed", "data", "--out", str(tmp_path), "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} already holds test.jsonl; pass --force to replace them" in err
    assert (tmp_path / "test.jsonl").read_text() == "mine\n" and not (tmp_path / "images").exists()
    assert main(["testbed", "data", "--out", str(tmp_path), "-n", "2", "--force"]) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "images" / "test").iterdir()) == ["000000.png", "000001.png"]
    assert main(["testbed", "data", "--out", str(tmp_path), "-n", "3"]) == 2  # images/test and test.jsonl now
    assert "already holds test.jsonl and images/test" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    assert main(["testbed", "data", "--out", str(tmp_path / "test.jsonl")]) == 2
    assert f"--out {tmp_path / 'test.jsonl'} is a file; give a directory" in capsys.readouterr().err


def test_testbed_train_help_lists_its_options():
    r = run("testbed", "train", "--help")
    assert r.returncode == 0 and "--out" in r.stdout and "--turn-weights" in r.stdout


def test_flops_of_head_passes_without_weights(capsys):
    """`vtcompile flops` counts the heads a head pass removes (from its config, no weights)."""
    assert main(["flops", "--model", "llava-1.5-7b", "--pass", "attnskip:layers=2/4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["paper_tflops"] < d["baseline_paper_tflops"]
    # MHA: two layers without attention keep no K/V cache (bf16, 576 visual + 64 text tokens)
    assert d["baseline_kv_cache_bytes"] - d["kv_cache_bytes"] == 2 * 2 * 4096 * 2 * (576 + 64)
    assert main(["flops", "--model", "llava-1.5-7b", "--pass", "headskip:heads=3.0/3.1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["paper_tflops"] < d["baseline_paper_tflops"]
    assert d["baseline_kv_cache_bytes"] - d["kv_cache_bytes"] == 2 * 2 * 128 * 2 * (576 + 64)
    assert main(["flops", "--model", "llava-1.5-7b", "--pass", "headskip:budget=0.25"]) != 0
    assert "give --calibration" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["run", "art/", "--target", "onnx", "--prompt", "hi"], "--target do(es) not apply to an artifact"),
    (["run", "--prompt", "hi", "--temperature", "0.7"], "--temperature appl(ies) only with --sample"),
    (["run", "--prompt", "hi", "--input-ids", "[5, 7]"], "not both"),
    (["testbed", "data", "--out", "README.md"], "--out README.md is a file"),
])
def test_careless_flags_from_the_shell(args, needle):
    """What a user types: exit 2, one line on stderr after the progress lines, no traceback (the other refusals exit
    through the same main(), tested in-process above; fastv twice: test_inputs.py)."""
    r = run(*args, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if not line.startswith("[vtcompile]")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.stderr, r.stderr



def test_closed_pipe_and_ctrl_c_exit_quietly(tmp_path):
    """`vtcompile flops ... | head` ends with 141 (SIGPIPE's 128 + 13, as the shell reports a killed writer) once
    head has gone (`head -n 0` exits at once: the table is written into a closed pipe), and Ctrl-C during a compile
    with 130 (128 + SIGINT), each without a traceback."""
    import signal
    import time

    piped = subprocess.run(["bash", "-c", f"{sys.executable} -m vtcompile flops --model llava-1.5-7b --pass fastv "
                                          "| head -n 0; echo ${PIPESTATUS[0]} >&2"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert piped.stderr.strip().splitlines()[-1] == "141", piped.stderr
    assert "Traceback" not in piped.stderr and "BrokenPipeError" not in piped.stderr, piped.stderr
    proc = subprocess.Popen([sys.executable, "-m", "vtcompile", "optimize", "--model", "tiny", "--pass", "fastv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stderr.readline()  # "[vtcompile] loading tiny ...": arguments checked, work under way
    assert line.startswith("[vtcompile] loading"), line
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    # 130, or death by SIGINT, which a shell reports as 130 too: CPython ends that way when the interrupt passed
    # through code a C extension ran (its flag for an unhandled KeyboardInterrupt stays set), whoever caught it
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and err.rstrip().endswith(
        "vtcompile: interrupted"), err


def test_killed_write_leaves_nothing_the_next_one_does_not_clean(tmp_path):
    """A killed write (here `testbed data`, which writes 400 PNGs first; `optimize --out` takes its temporary directory
    from the same vtcompile.files.temp_dir) leaves its hidden temporary directory; the next write to the same place
    removes it and says so on stderr."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "vtcompile", "testbed", "data", "--out", str(tmp_path), "-n", "400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while not list((tmp_path / "images").glob(".test.tmp-*/000010.png")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (left,) = (tmp_path / "images").glob(".test.tmp-*")
    assert left.name.startswith(f".test.tmp-{proc.pid}-") and not (tmp_path / "test.jsonl").exists()
    r = run("testbed", "data", "--out", str(tmp_path), "-n", "2", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"removed {left}, left behind by an earlier write to {tmp_path / 'images' / 'test'} that was killed " \
           f"(pid {proc.pid}" in r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["000000.png", "000001.png", "images", "test", "test.jsonl"]


def test_calibrate_writes_recipe_and_routers_with_the_umask(tmp_path, capsys):
    """calibrate's JSON and its routers' safetensors (written 0600 by safetensors) get the umask's modes, through
    temporaries that do not stay behind; a second run without --force is refused."""
    from vtcompile.files import umask

    out = tmp_path / "routers.json"
    args = ["calibrate", "--model", "tiny", "--pass", "dyvte:samples=4,epochs=2,holdout=0", "--calibration",
            "synthetic", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert f"reuse with --pass dyvte:routers={out}" in capsys.readouterr().out  # the recipe, with its threshold
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routers.json", "routers.safetensors"]
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask(), (p, oct(p.stat().st_mode))
    assert json.loads(out.read_text())["weights_file"] == "routers.safetensors"
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_run_keeps_messages_off_the_answer_and_warns_about_unknown_words(tmp_path, capsys):
    """`vtcompile run` on the testbed: the answer and its table on stdout, every progress, compile and warning line
    on stderr (a streamed answer never has a log line in it); a prompt of unknown words is answered with a warning
    (exit 0), the compile time is given apart from the timings."""
    import numpy as np
    from PIL import Image

    image = tmp_path / "grey16.png"
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(image)
    assert main(["run", "--pass", "fastv", "--image", str(image), "--prompt", "what is the flux capacitor doing",
                 "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "[vtcompile]" not in out and "│ answer" in out and "time to first token s" in out
    assert "[vtcompile] compiled in " in err and "passes + lowering to eager" in err
    assert "3 of its 6 words are unknown to the model's tokenizer (<unk>): 'flux', 'capacitor', 'doing'" in err

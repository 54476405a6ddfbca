"""The vtcompile command: a few end-to-end runs as a user would (subprocess), and every bad input and papercut
through the CLI's main() in-process (each says what was expected, exits non-zero, and loads nothing first)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vtcompile.cli import main


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

    from vtcompile.cli import _calibration, _passes, _spec
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


def test_self_check_judges_its_own_numbers():
    """The verdict follows the agreement: below the floor it is a warning, not silence."""
    from vtcompile.cli import self_check

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
    art = tmp_path / "art"  # a directory with a manifest is an artifact: --force replaces it whole
    art.mkdir()
    (art / "manifest.json").write_text("{}")
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

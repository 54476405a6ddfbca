"""The vtcompile command, run as a user would (subprocess): reports, JSON, and every bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vtcompile", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_optimize_prints_report_and_writes_artifact(tmp_path):
    r = run("optimize", "--model", "tiny", "--pass", "fastv:k=2,r=0.5", "--out", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout and "fastv(k=2, r=0.5)" in r.stdout
    assert "top-1 agreement" in r.stdout
    r2 = run("inspect", str(tmp_path / "art"))
    assert r2.returncode == 0 and "16 16 8 8" in r2.stdout


def test_flops_json_for_llava_7b_without_weights():
    r = run("flops", "--model", "llava-1.5-7b", "--pass", "fastv", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert round(d["baseline_paper_tflops"], 2) == 3.82 and round(d["paper_tflops"], 2) == 2.01
    assert d["visual_tokens_per_layer"][:3] == [576, 576, 288] and d["true_tflops"] < d["baseline_true_tflops"]


def test_listing_commands():
    assert "fastv" in run("passes").stdout
    out = run("models").stdout
    assert "llava-1.5-7b" in out and "tiny" in out
    assert run("optimize", "--help").returncode == 0


@pytest.mark.parametrize("args,needle", [
    (["optimize", "--model", "llava-9b"], "unknown model 'llava-9b'. Known models:"),
    (["optimize", "--model", "llava-1.5-7b"], "no local weights for 'llava-1.5-7b'"),
    (["optimize", "--pass", "fastv:r=1.5"], "r=1.5 is out of range"),
    (["optimize", "--pass", "fastv:k=9"], "k=9 is beyond the last layer"),
    (["optimize", "--pass", "fastv:depth=2"], "unknown field(s) depth"),
    (["optimize", "--pass", "fastv:k"], "expected key=value"),
    (["optimize", "--pass", "nope"], "unknown pass 'nope'"),
    (["optimize", "--layers", "1", "--pass", "fastv"], "needs a decoder with at least 2 layers"),
    (["optimize", "--target", "tensorrt"], "target 'tensorrt' is not available"),
    (["optimize", "--weights", "/nonexistent", "--model", "llava-1.5-7b"], "has no config.json"),
    (["inspect", "/nonexistent"], "no manifest.json"),
])
def test_bad_input_is_a_clear_error(args, needle, tmp_path):
    r = run(*args, "--out", str(tmp_path / "o")) if args[0] == "optimize" else run(*args)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_existing_output_dir_is_refused_and_force_replaces_only_an_artifact(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("optimize", "--model", "tiny", "--out", str(out), "--no-check")
    assert r.returncode != 0 and "already exists" in r.stderr and (out / "keep.txt").exists()
    r = run("optimize", "--model", "tiny", "--out", str(out), "--no-check", "--force")
    assert r.returncode != 0 and "is not a vtcompile artifact" in r.stderr and (out / "keep.txt").read_text() == "x"
    art = tmp_path / "art"
    assert run("optimize", "--model", "tiny", "--out", str(art), "--no-check").returncode == 0
    r = run("optimize", "--model", "tiny", "--pass", "fastv", "--out", str(art), "--no-check", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((art / "manifest.json").read_text())["passes"][0]["pass"] == "fastv"


def test_testbed_data_writes_jsonl_that_eval_reads(tmp_path):
    from vtcompile.evaluate import load_data

    r = run("testbed", "data", "--out", str(tmp_path), "-n", "4", "--split", "val", "--split", "test")
    assert r.returncode == 0, r.stderr
    for split in ("val", "test"):
        samples, bad = load_data(str(tmp_path / f"{split}.jsonl"))
        assert len(samples) == 4 and bad == 0
        assert {s.kind for s in samples} <= {"color", "shape", "count", "exist", "relpos"}
    r = run("testbed", "data", "--out", str(tmp_path), "-n", "0")
    assert r.returncode != 0 and "-n must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_testbed_train_help_lists_its_options():
    r = run("testbed", "train", "--help")
    assert r.returncode == 0 and "--out" in r.stdout and "--turn-weights" in r.stdout

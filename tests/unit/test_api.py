"""compile_pruned / load_compiled / artifacts / bad input through the Python API."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vtcompile import compile_pruned, load_compiled
from vtcompile.artifacts import sign
from vtcompile.errors import ArtifactError, InputError, ModelNotFoundError, TargetUnavailableError, VtcompileError
from vtcompile.models.llava import example_inputs

from .common import adapter, compiled, prompt


def test_import_is_lean():
    code = "import sys, vtcompile; print(any(m.split('.')[0] in ('torch', 'transformers', 'onnxruntime', 'tensorrt') " \
           "for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_save_load_round_trip(tmp_path):
    cm = compiled("tiny-gqa", "fastv:k=2,r=0.75")
    ids, pixels, mask = prompt("tiny-gqa", "mid_pad_b2")
    out = cm(ids, pixels, mask)
    path = cm.save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["passes"] == [{"pass": "fastv", "config": {"k": 2, "r": 0.75}}]
    assert manifest["report"]["random_weights"] is True
    assert {"vtcompile", "torch", "transformers"} <= set(manifest["versions"])
    again = load_compiled(path)(ids, pixels, mask)
    assert torch.equal(again.kept_positions, out.kept_positions)
    assert (again.logits - out.logits).abs().max().item() == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary directory left behind


def test_save_refuses_existing_dir_and_force_replaces_only_artifacts(tmp_path):
    cm = compiled("tiny", "fastv")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists"):
        cm.save(tmp_path / "x")
    with pytest.raises(ArtifactError, match="is not a vtcompile artifact .*--force only replaces an artifact"):
        cm.save(tmp_path / "x", force=True)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"  # nothing of the user's was deleted
    (tmp_path / "y").mkdir()  # a directory with a manifest listing everything else in it is an artifact
    (tmp_path / "y" / "manifest.json").write_text(json.dumps({"files": {"stale.txt": {}}}))
    (tmp_path / "y" / "stale.txt").write_text("from an older artifact")
    cm.save(tmp_path / "y", force=True)  # an artifact is replaced whole
    assert (tmp_path / "y" / "manifest.json").is_file() and not (tmp_path / "y" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "y"]  # no temporary directory left behind


def test_load_refuses_bad_manifests(tmp_path):
    path = compiled("tiny", "fastv").save(tmp_path / "a")
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(m, format=99)))
    with pytest.raises(ArtifactError, match="format 99"):
        load_compiled(path)
    m["config_hash"] = "0" * 16
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="does not match its own digest"):  # an edited manifest
        load_compiled(path)
    (path / "manifest.json").write_text(json.dumps(sign(m)))  # a manifest written with another model's hash
    with pytest.raises(ArtifactError, match="config hash"):
        load_compiled(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_compiled(path)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_compiled(tmp_path)


def test_in_memory_transformers_model_is_accepted(tmp_path):
    model = adapter("tiny").model
    cm = compile_pruned(model, "fastv")
    ids, pixels, mask = prompt("tiny", "image_first")
    ref = compiled("tiny", "fastv")(ids, pixels, mask)
    assert torch.equal(cm(ids, pixels, mask).logits, ref.logits)
    path = cm.save(tmp_path / "mem")  # weights go into the artifact (stages, embeddings, config)
    assert (path / "config.json").is_file() and (path / "decoder-v16.pt2").is_file()
    assert torch.equal(load_compiled(path)(ids, pixels, mask).logits, ref.logits)


def test_image_token_count_must_match_pixel_values():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "two_images")
    with pytest.raises(InputError, match="64 image tokens .* but 3 image"):
        cm(ids, pixels[:3], mask)


def test_right_padding_is_refused():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")
    with pytest.raises(InputError, match="left-padded"):
        cm(ids.flip(1), pixels, mask.flip(1))


def test_second_image_count_builds_its_own_program():
    cm = compiled("tiny", "fastv")
    ids, pixels, mask = prompt("tiny", "two_images")
    out = cm(ids, pixels, mask)
    assert 32 in cm.executables
    assert out.kept_visual.sum(1).tolist() == [16, 16]


def test_bad_model_and_target():
    with pytest.raises(ModelNotFoundError, match="Known models: .*tiny"):
        compile_pruned("llava-9b")
    with pytest.raises(ModelNotFoundError, match="--random-weights"):
        compile_pruned("llava-1.5-7b")
    with pytest.raises(TargetUnavailableError, match="tensorrt"):
        compile_pruned("tiny", target="tensorrt")
    with pytest.raises(VtcompileError, match="need\\(s\\) none"):
        compile_pruned("tiny", "fastv", calibration=[1])


def test_example_inputs_shapes():
    ids, pixels, mask = example_inputs(adapter("tiny"), batch=3, n_images=2, pad=4)
    assert ids.shape[0] == 3 and pixels.shape[0] == 6 and (ids == 127).sum(1).tolist() == [32] * 3
    assert mask[:, -1].all() and mask[1, :4].sum() == 0

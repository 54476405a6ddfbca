"""Typed recipes (passes/base.py Recipe): every calibrating pass returns its own recipe class, which round-trips
through its files (JSON + safetensors) and its dict form, describes itself for the report, and compiles again to
the same program."""
from __future__ import annotations

import functools
import stat

import pytest
import torch

from vtcompile import compile_pruned
from vtcompile.errors import PassConfigError
from vtcompile.passes import REGISTRY

from .common import adapter, prompt

# a cheap calibration of every calibrating pass on the tiny model
CALIBRATED = {
    "fitprune": "fitprune:budget=0.5,samples=4",
    "dyvte": "dyvte:samples=6,epochs=5,layers=0/1,label=token,max_loss=0",
    "headskip": "headskip:budget=0.25,criterion=output",
    "attnskip": "attnskip:count=1,adapter=true",
}


def test_every_calibrating_pass_has_a_recipe_class_and_a_case_here():
    calibrating = {name for name, p in REGISTRY.items() if p.calibrate is not None}
    assert calibrating == set(CALIBRATED)
    assert all(REGISTRY[name].recipe is not None for name in calibrating)


@functools.lru_cache(maxsize=None)
def _calibrated(name):
    torch.manual_seed(0)
    return compile_pruned(adapter("tiny"), CALIBRATED[name], calibration="synthetic", progress=False)


@pytest.mark.parametrize("name", sorted(CALIBRATED))
def test_recipe_round_trips_and_compiles_the_same_program(name, tmp_path):
    cm = _calibrated(name)
    recipe = cm.recipes[name]
    assert isinstance(recipe, REGISTRY[name].recipe)
    assert cm.report.recipes[name]["summary"] == recipe.describe() and recipe.describe()
    files = recipe.save(tmp_path / f"{name}.json")
    again = REGISTRY[name].recipe.load(files[0])
    assert again.to_dict() == recipe.to_dict()
    assert again.tensors().keys() == recipe.tensors().keys()
    assert all(torch.equal(again.tensors()[k], v) for k, v in recipe.tensors().items())
    assert (len(files) == 2) == bool(recipe.tensors())
    for f in files:  # the user's umask decides (0644 under the usual 022), not safetensors' 0600
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044
    from_dict = REGISTRY[name].recipe.from_dict(recipe.to_dict(), recipe.tensors())
    rebuilt = compile_pruned(adapter("tiny"), CALIBRATED[name], recipes={name: from_dict}, progress=False)
    ids, pixels, mask = prompt("tiny", "mid_pad_b2")
    a, b = cm(ids, pixels, mask), rebuilt(ids, pixels, mask)
    assert a.exit_layers == b.exit_layers and torch.equal(a.logits, b.logits)


def test_a_recipe_of_another_pass_or_with_unknown_fields_is_refused():
    from vtcompile.passes.fitprune import FitPruneRecipe
    from vtcompile.passes.headskip import HeadSkipRecipe

    with pytest.raises(PassConfigError, match="fitted by pass 'headskip'"):
        FitPruneRecipe.from_dict(HeadSkipRecipe(heads=["1.0"]).to_dict())
    with pytest.raises(PassConfigError, match="unknown recipe field"):
        FitPruneRecipe.from_dict({"removed": {"1": 2}, "alhpa": 0.1})
    with pytest.raises(Exception, match="do not include"):
        compile_pruned(adapter("tiny"), "fastv", recipes={"fitprune": {"removed": {"1": 2}}})

"""Targets on CUDA: inductor, onnx (CUDA/TensorRT providers) and tensorrt against eager on the same GPU.

Skipped without CUDA (tests/conftest.py); the tensorrt tests also need torch-tensorrt, the onnx ones
onnxruntime-gpu. None of these could be run where they were written (no GPU): treat a failure here as the
first real run of that code path, not as a regression.
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from vtcompile import compile_pruned, load_compiled
from vtcompile.models import load_model
from vtcompile.models.llava import example_inputs

pytestmark = pytest.mark.gpu
TOL = 1e-4
PASSES = {"none": None, "fastv": "fastv", "pyramiddrop": "pyramiddrop"}


@functools.lru_cache(maxsize=None)
def cuda_adapter(name: str):
    adapter = load_model(name)
    adapter.model.to("cuda")
    return adapter


@functools.lru_cache(maxsize=None)
def compiled(name: str, family: str, target: str):
    return compile_pruned(cuda_adapter(name), PASSES[family], target=target)


def _prompts(name):
    a = cuda_adapter(name)
    return [example_inputs(a, batch=2, pad=3), example_inputs(a, batch=1, text_before=0, pad=0, seed=1)]


def _check(cm, ref, ids, pixels, mask):
    out, exp = cm(ids, pixels, mask), ref(ids, pixels, mask)
    assert torch.equal(out.kept_positions.cpu(), exp.kept_positions.cpu())
    real = torch.gather(mask.cuda(), 1, exp.kept_positions.cuda()).bool()
    diff = (out.logits.float().cuda() - exp.logits.float()).abs().amax(-1)[real].max().item()
    assert diff <= TOL, diff


def _needs(target):
    if target == "tensorrt" and importlib.util.find_spec("torch_tensorrt") is None:
        pytest.skip("torch-tensorrt is not installed")
    if target == "onnx":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")


@pytest.mark.parametrize("target", ["inductor", "onnx", "tensorrt"])
@pytest.mark.parametrize("family", list(PASSES))
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_target_matches_eager_on_cuda(name, family, target):
    _needs(target)
    cm, ref = compiled(name, family, target), compiled(name, family, "eager")
    for ids, pixels, mask in _prompts(name):
        _check(cm, ref, ids, pixels, mask)


@pytest.mark.parametrize("target", ["inductor", "onnx", "tensorrt"])
def test_cuda_artifact_round_trip(target, tmp_path):
    _needs(target)
    cm = compiled("tiny-gqa", "fastv", target)
    lm = load_compiled(cm.save(tmp_path / target))
    for ids, pixels, mask in _prompts("tiny-gqa"):
        _check(lm, compiled("tiny-gqa", "fastv", "eager"), ids, pixels, mask)
